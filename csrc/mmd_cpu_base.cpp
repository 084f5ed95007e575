// MMD chunk loops at the compiler's baseline instruction set (any CPU the build targets).
#include "mmd_cpu_kernels.h"

#define IMM_FAST_MMD_KERNEL_NS imm_fast_mmd_base
#include "mmd_cpu_kernels_impl.h"

namespace imm_fast {

const MmdCpuKernels& mmd_cpu_kernels_base() {
  static const MmdCpuKernels k = {imm_fast_mmd_base::pair_sq_f, imm_fast_mmd_base::pair_sq_d,
                                  imm_fast_mmd_base::grad_f, imm_fast_mmd_base::grad_d};
  return k;
}

}  // namespace imm_fast
