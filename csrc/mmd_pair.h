// The MMD pair coefficient, written once for the CPU (mmd.h / mmd.cpp) and CUDA (mmd_cuda.cu) sources.
//
// For one pair of a group's rows (a, b) with squared distance q (double), f = scale_g / Dn and
// c = +1 (xx, yy pairs) or -1 (xy, yx pairs):
//   k = exp(-f * max(d, eps))                 laplace (d = sqrt(q))
//   k = exp(-f * max(q, eps^2))               rbf
//   w = (2/M^2) c dk/dz_a / (z_a - z_b)       so that dMMD2_g/dz_a = sum_b w_ab (z_a - z_b); 0 inside the floor
// Non-finite rows: `self` is sum_k (z_ak - z_ak) of a row, 0 or NaN (an inf or NaN value); adding
// self_a + self_b to q makes every pair of such a row NaN, and mmd_pair(self_a).k its NaN diagonal term, as the
// reference's differences give. Comparisons are written so that NaN propagates (no fmax / fmin).
#pragma once

#include <math.h>  // ::exp / ::sqrt (double): the C library on the host, CUDA's math in device code

#if defined(__CUDACC__)
#define IMM_FAST_HD __host__ __device__
#else
#define IMM_FAST_HD
#endif

namespace imm_fast {

struct MmdPair {
  double k;  // kernel value
  double w;  // gradient coefficient (times c and 2/M^2)
};

IMM_FAST_HD inline MmdPair mmd_pair(double q, double f, double eps, bool rbf, double c_invM2) {
  q = q < 0 ? 0.0 : q;  // rounding can leave tiny negatives; NaN stays NaN
  MmdPair p;
  if (rbf) {
    const double eps2 = eps * eps;
    p.k = ::exp(-f * (q < eps2 ? eps2 : q));
    p.w = !(q < eps2) ? -4.0 * c_invM2 * f * p.k : 0.0;  // (2/M^2) c dk/d(q) * 2
  } else {
    const double d = ::sqrt(q);
    p.k = ::exp(-f * (d < eps ? eps : d));
    p.w = !(d < eps) ? -2.0 * c_invM2 * f * p.k / d : 0.0;  // (2/M^2) c dk/dd / d
  }
  return p;
}

}  // namespace imm_fast
