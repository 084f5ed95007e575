// MMD chunk loops compiled for AVX2+FMA (x86-64 only); mmd.cpp calls them only when the running CPU and OS
// support AVX2 and FMA (__builtin_cpu_supports), so the cached build stays portable without -march=native.
#include "mmd_cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IMM_FAST_MMD_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define IMM_FAST_MMD_KERNEL_NS imm_fast_mmd_avx2
#include "mmd_cpu_kernels_impl.h"
#pragma GCC pop_options
#endif

namespace imm_fast {

const MmdCpuKernels* mmd_cpu_kernels_avx2() {
#ifdef IMM_FAST_MMD_HAVE_AVX2
  static const MmdCpuKernels k = {imm_fast_mmd_avx2::pair_sq_f, imm_fast_mmd_avx2::pair_sq_d,
                                  imm_fast_mmd_avx2::grad_f, imm_fast_mmd_avx2::grad_d};
  return &k;
#else
  return nullptr;
#endif
}

}  // namespace imm_fast
