// Body of the per-chunk MMD loops; included by one .cpp per instruction set, inside a namespace of its own.
// It includes nothing from the C++ standard library on purpose: an inline library function compiled here
// with a wider target could be merged by the linker into the baseline code path (ODR) and fault on older
// CPUs. Shapes as in mmd_cpu_kernels.h.
#ifndef IMM_FAST_MMD_KERNEL_NS
#error "define IMM_FAST_MMD_KERNEL_NS before including mmd_cpu_kernels_impl.h"
#endif

namespace IMM_FAST_MMD_KERNEL_NS {

// Squared distances from differences (never |a|^2 + |b|^2 - 2ab, which cancels for near-duplicate rows);
// four rows b per pass so that row a is loaded once per four pairs.
template <typename T>
static void pair_sq(const T* const* rows, int n, int64_t len, T* out) {
  int64_t p = 0;
  for (int a = 0; a < n; ++a) {
    const T* ra = rows[a];
    int b = a + 1;
    for (; b + 4 <= n; b += 4) {
      const T* r0 = rows[b];
      const T* r1 = rows[b + 1];
      const T* r2 = rows[b + 2];
      const T* r3 = rows[b + 3];
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < len; ++k) {
        const T v = ra[k];
        const T d0 = v - r0[k], d1 = v - r1[k], d2 = v - r2[k], d3 = v - r3[k];
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
      }
      out[p] = s0;
      out[p + 1] = s1;
      out[p + 2] = s2;
      out[p + 3] = s3;
      p += 4;
    }
    for (; b < n; ++b) {
      const T* r0 = rows[b];
      T s0 = 0;
#pragma omp simd reduction(+ : s0)
      for (int64_t k = 0; k < len; ++k) {
        const T d0 = ra[k] - r0[k];
        s0 += d0 * d0;
      }
      out[p++] = s0;
    }
  }
}

// Gradient rows as sum_b W_ab (z_a - z_b): the difference form keeps near-duplicate particles accurate
// (W_a. z_a - W z would cancel). Terms are added in a fixed order (b ascending, four at a time).
template <typename T>
static void grad_rows(const T* const* rows, int n, int a0, int a1, int64_t len, const T* W, T* const* outs) {
  for (int a = a0; a < a1; ++a) {
    T* o = outs[a - a0];
    const T* ra = rows[a];
    const T* wa = W + (int64_t)a * n;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) o[k] = 0;
    int b = 0;
    for (; b + 4 <= n; b += 4) {
      const T* r0 = rows[b];
      const T* r1 = rows[b + 1];
      const T* r2 = rows[b + 2];
      const T* r3 = rows[b + 3];
      const T w0 = wa[b], w1 = wa[b + 1], w2 = wa[b + 2], w3 = wa[b + 3];  // W_aa = 0 (distance 0 is clamped)
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const T v = ra[k];
        o[k] += (w0 * (v - r0[k]) + w1 * (v - r1[k])) + (w2 * (v - r2[k]) + w3 * (v - r3[k]));
      }
    }
    for (; b < n; ++b) {
      const T* r0 = rows[b];
      const T w0 = wa[b];
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) o[k] += w0 * (ra[k] - r0[k]);
    }
  }
}

static void pair_sq_f(const float* const* rows, int n, int64_t len, float* out) { pair_sq<float>(rows, n, len, out); }
static void pair_sq_d(const double* const* rows, int n, int64_t len, double* out) {
  pair_sq<double>(rows, n, len, out);
}
static void grad_f(const float* const* rows, int n, int a0, int a1, int64_t len, const float* W, float* const* outs) {
  grad_rows<float>(rows, n, a0, a1, len, W, outs);
}
static void grad_d(const double* const* rows, int n, int a0, int a1, int64_t len, const double* W,
                   double* const* outs) {
  grad_rows<double>(rows, n, a0, a1, len, W, outs);
}

}  // namespace IMM_FAST_MMD_KERNEL_NS
