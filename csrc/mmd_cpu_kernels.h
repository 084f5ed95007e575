// Per-chunk inner loops of the CPU MMD op, compiled once per instruction set (mmd_cpu_base.cpp: the
// compiler's baseline; mmd_cpu_avx2.cpp: AVX2+FMA, picked at run time only on CPUs that have it), so a
// cached build never runs instructions the CPU lacks and no -march=native is needed.
//
// Shapes: n = 2M rows of one group (x particles 0..M-1, then y particles M..2M-1); each pointer rows[i]
// already points at the current chunk of its row (len <= kMmdChunk contiguous values).
#pragma once
#include <stdint.h>

namespace imm_fast {

// Fixed chunk of D handled at once: the n row slices stay in L1, and the per-chunk partial sums are always
// added in chunk order, so results do not depend on the thread count or on how work is split.
constexpr int64_t kMmdChunk = 512;

struct MmdCpuKernels {
  // out[tri(a, b)] = sum_k (rows[a][k] - rows[b][k])^2 for a < b, tri(a, b) = a*n - a*(a+1)/2 + b - a - 1.
  void (*pair_sq_f)(const float* const* rows, int n, int64_t len, float* out);
  void (*pair_sq_d)(const double* const* rows, int n, int64_t len, double* out);
  // outs[a - a0][k] = sum_{b != a} W[a*n + b] * (rows[a][k] - rows[b][k]) for a0 <= a < a1 (W: n x n).
  void (*grad_f)(const float* const* rows, int n, int a0, int a1, int64_t len, const float* W, float* const* outs);
  void (*grad_d)(const double* const* rows, int n, int a0, int a1, int64_t len, const double* W,
                 double* const* outs);
};

const MmdCpuKernels& mmd_cpu_kernels_base();
const MmdCpuKernels* mmd_cpu_kernels_avx2();  // nullptr when not compiled for this target

}  // namespace imm_fast
