// imm_fast_C::mmd_fwd: grouped MMD^2 and its gradients in one call (CPU: mmd.cpp, CUDA: mmd_cuda.cu).
//
// Shapes: x, y (B, D), B = G*M rows, group g = rows g*M .. g*M+M-1 (any row stride, unit column stride);
// scale (G,) fp32/fp64; outputs mmd2 (G,) (fp64 for fp64 inputs, else fp32), gx/gy (B, D) in the input dtype,
// or (0,) tensors when not asked for (imm_fast._backend.absent: one convention for every backend and fake).
// A row with an inf or NaN value makes its group's MMD2 and gradients NaN, as in the reference.
// Laplace: k = exp(-scale_g * max(d, eps) / Dn); rbf: k = exp(-scale_g * max(d^2, eps^2) / Dn);
// Dn = D if normalize_dim else 1. MMD2_g = (1/M^2) sum_ij [k(x_i,x_j) + k(y_i,y_j) - 2 k(x_i,y_j)].
// gx_i = d MMD2_g / d x_i (unweighted); pairs inside the clamp (d < eps) contribute no gradient.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "mmd_pair.h"

namespace imm_fast {

// Validation shared by the CPU and CUDA implementations; returns the number of groups G.
inline int64_t mmd_check(const at::Tensor& x, const at::Tensor& y, int64_t group_size, const at::Tensor& scale,
                         double eps) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "mmd_fwd: x and y must be 2-D (B, D), got ", x.sizes(), " and ",
              y.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), "mmd_fwd: y must have x's shape ", x.sizes(), ", got ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "mmd_fwd: x and y must share a dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "mmd_fwd: dtype must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.device() == y.device() && scale.device() == x.device(),
              "mmd_fwd: x, y and scale must be on one device, got ", x.device(), ", ", y.device(), ", ",
              scale.device());
  TORCH_CHECK(group_size >= 1, "mmd_fwd: group_size must be >= 1, got ", group_size);
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(B >= 1 && B % group_size == 0, "mmd_fwd: group_size=", group_size, " must divide B=", B);
  TORCH_CHECK(D >= 1, "mmd_fwd: rows need at least one value (D >= 1), got shape ", x.sizes());
  TORCH_CHECK(D == 1 || (x.stride(1) == 1 && y.stride(1) == 1),
              "mmd_fwd: x and y need a unit column stride, got strides ", x.strides(), " and ", y.strides());
  const int64_t G = B / group_size;
  TORCH_CHECK(scale.numel() == G, "mmd_fwd: scale must have G=", G, " values, got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble,
              "mmd_fwd: scale must be float32 or float64, got ", scale.scalar_type());
  TORCH_CHECK(eps > 0, "mmd_fwd: eps must be > 0, got ", eps);
  return G;
}

// Per-pair coefficients of one group from its squared distances (all in double; 4M^2 exps, cheap).
// d2: P = n(n-1)/2 squared distances, n = 2M, pair index tri(a, b) = a*n - a*(a+1)/2 + b - a - 1 (a < b);
// self: n values, 0 or NaN per row (see mmd_pair.h). W (n x n, out): dMMD2/dz_a = sum_b W_ab (z_a - z_b).
// Returns MMD2_g.
template <typename W_t>
inline double mmd_coefficients(const double* d2, const double* self, int64_t M, double scale, double eps, bool rbf,
                               double Dn, W_t* W) {
  const int64_t n = 2 * M;
  const double f = scale / Dn, invM2 = 1.0 / (double(M) * double(M));
  double total = 0;
  for (int64_t a = 0; a < n; ++a) total += mmd_pair(self[a], f, eps, rbf, 0.0).k;  // diagonal: distance 0
  int64_t p = 0;
  for (int64_t a = 0; a < n; ++a) {
    W[a * n + a] = W_t(0);
    for (int64_t b = a + 1; b < n; ++b, ++p) {
      const double c = ((a < M) == (b < M)) ? 1.0 : -1.0;  // +k for xx and yy pairs, -k for xy and yx
      const MmdPair pr = mmd_pair(d2[p] + self[a] + self[b], f, eps, rbf, c * invM2);
      total += 2.0 * c * pr.k;
      W[a * n + b] = W[b * n + a] = W_t(pr.w);
    }
  }
  return total * invM2;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmd_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                                           int64_t group_size, const at::Tensor& scale,
                                                           double eps, bool rbf, bool normalize_dim,
                                                           bool need_gx, bool need_gy);

}  // namespace imm_fast
