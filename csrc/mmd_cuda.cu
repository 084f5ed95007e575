// CUDA implementation of imm_fast_C::mmd_fwd (contract in mmd.h); built only with a CUDA build of torch and
// a CUDA toolkit. One block per group, threads over D:
//   (1) squared distances of the group's P = n(n-1)/2 row pairs (n = 2M) from differences, four pairs per
//       pass, each a fixed-order block reduction (warp shuffles, then one value per warp): deterministic;
//   (2) kernel values and gradient coefficients W (n x n) in double (mmd_pair.h, shared with the CPU
//       source), MMD2_g by a block reduction; a row with an inf / NaN value makes its group NaN;
//   (3) gradient rows sum_b W_ab (z_a - z_b), threads over D (difference form: no cancellation).
// Shapes: x, y (B, D) with row strides sx, sy; B = G*M; work (G, P + n + n*n) in the compute dtype C (float, or
// double for double inputs); mmd2 (G,) in C; gx, gy (B, D) contiguous in the input dtype T.
#include "mmd.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

namespace imm_fast {
namespace {

constexpr int kThreads = 256;          // threads per block (a multiple of 32)
constexpr int kWarps = kThreads / 32;  // partial sums per reduction
constexpr int kPairs = 4;              // pairs reduced together in step (1)

// Sums v[0..NV) over the block; thread 0 gets the totals. red: kWarps*NV shared slots. Ends with a barrier,
// so red can be reused right away.
template <int NV, typename C>
__device__ void block_sum(C (&v)[NV], C* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_down_sync(0xffffffffu, v[i], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) red[warp * NV + i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      C s = 0;
      for (int w = 0; w < kWarps; ++w) s += red[w * NV + i];  // fixed order: deterministic
      v[i] = s;
    }
  }
  __syncthreads();
}

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) mmd_fwd_kernel(
    const T* __restrict__ x,      // (B, D) student rows, row stride sx, unit column stride
    const T* __restrict__ y,      // (B, D) target rows, row stride sy, unit column stride
    int64_t sx,                   // row stride of x (elements)
    int64_t sy,                   // row stride of y (elements)
    const C* __restrict__ scale,  // (G,) kernel scale per group
    int M,                        // particles per group
    int64_t D,                    // values per row
    double eps, bool rbf, double Dn,
    int a0, int a1,               // gradient rows [a0, a1) of the group's n rows (x rows < M <= y rows)
    C* __restrict__ work,         // (G, P + n + n*n) scratch: squared distances, self terms, then W
    C* __restrict__ mmd2,         // (G,) output
    T* __restrict__ gx,           // (B, D) contiguous, unused unless a0 < M
    T* __restrict__ gy,           // (B, D) contiguous, unused unless a1 > M
    bool w_in_smem) {             // W fits in dynamic shared memory
  extern __shared__ __align__(16) unsigned char smem_raw[];  // W when w_in_smem
  __shared__ C red[kWarps * (kPairs + 1)];
  const int64_t g = blockIdx.x;
  const int n = 2 * M;
  const int64_t P = int64_t(n) * (n - 1) / 2;
  C* d2 = work + g * (P + n + int64_t(n) * n);  // (P,)
  C* self = d2 + P;                             // (n,)
  C* Wg = self + n;                             // (n, n)
  auto row = [&](int i) -> const T* { return i < M ? x + (g * M + i) * sx : y + (g * M + i - M) * sy; };

  // (1) squared distances, pairs (a, b..b+3) per pass; the first pass of row a also sums its self term
  // (0, or NaN for an inf / NaN value; see mmd_pair.h). The last row has no pairs: one pass for its self term.
  for (int a = 0; a < n; ++a) {
    const T* ra = row(a);
    for (int b0 = a + 1; b0 < n || b0 == a + 1; b0 += kPairs) {
      const int nb = max(0, min(kPairs, n - b0));
      const T* rb[kPairs];
#pragma unroll
      for (int j = 0; j < kPairs; ++j) rb[j] = row(j < nb ? b0 + j : a);  // padding: row a, discarded
      C s[kPairs + 1] = {};
      for (int64_t k = threadIdx.x; k < D; k += kThreads) {
        const C v = static_cast<C>(ra[k]);
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
          const C d = v - static_cast<C>(rb[j][k]);
          s[j] += d * d;
        }
        s[kPairs] += v - v;
      }
      block_sum<kPairs + 1>(s, red);
      if (threadIdx.x == 0) {
        const int64_t p = int64_t(a) * n - int64_t(a) * (a + 1) / 2 + (b0 - a - 1);  // tri(a, b0)
        for (int j = 0; j < nb; ++j) d2[p + j] = s[j];
        if (b0 == a + 1) self[a] = s[kPairs];
      }
    }
  }
  __syncthreads();

  // (2) coefficients (mmd_pair.h); thread t handles rows a = t, t + kThreads, ...
  const double f = double(scale[g]) / Dn, invM2 = 1.0 / (double(M) * double(M));
  C tot[1] = {0};
  for (int a = threadIdx.x; a < n; a += kThreads) {
    double part = mmd_pair(double(self[a]), f, eps, rbf, 0.0).k;  // the diagonal pair, distance 0
    Wg[int64_t(a) * n + a] = C(0);
    const int64_t pa = int64_t(a) * n - int64_t(a) * (a + 1) / 2 - a - 1;  // tri(a, b) = pa + b
    for (int b = a + 1; b < n; ++b) {
      const double c = ((a < M) == (b < M)) ? 1.0 : -1.0;  // +k for xx / yy pairs, -k for xy / yx
      const MmdPair pr = mmd_pair(double(d2[pa + b]) + double(self[a]) + double(self[b]), f, eps, rbf, c * invM2);
      part += 2.0 * c * pr.k;
      Wg[int64_t(a) * n + b] = C(pr.w);
      Wg[int64_t(b) * n + a] = C(pr.w);
    }
    tot[0] += C(part * invM2);
  }
  block_sum<1>(tot, red);  // its barriers also publish Wg to the block
  if (threadIdx.x == 0) mmd2[g] = tot[0];
  if (a0 >= a1) return;

  const C* W = Wg;
  if (w_in_smem) {
    C* Ws = reinterpret_cast<C*>(smem_raw);
    for (int i = threadIdx.x; i < n * n; i += kThreads) Ws[i] = Wg[i];
    __syncthreads();
    W = Ws;
  }

  // (3) gradient rows.
  for (int64_t k = threadIdx.x; k < D; k += kThreads) {
    for (int a = a0; a < a1; ++a) {
      const C v = static_cast<C>(row(a)[k]);
      const C* wa = W + int64_t(a) * n;
      C acc = 0;
      for (int b = 0; b < n; ++b) acc += wa[b] * (v - static_cast<C>(row(b)[k]));
      T* out = a < M ? gx + (g * M + a) * D : gy + (g * M + a - M) * D;
      out[k] = static_cast<T>(acc);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmd_fwd_cuda(const at::Tensor& x, const at::Tensor& y,
                                                            int64_t group_size, const at::Tensor& scale,
                                                            double eps, bool rbf, bool normalize_dim,
                                                            bool need_gx, bool need_gy) {
  const int64_t G = mmd_check(x, y, group_size, scale, eps);
  TORCH_CHECK(x.is_cuda(), "mmd_fwd_cuda: x must be a CUDA tensor");
  TORCH_CHECK(group_size <= (1 << 20), "mmd_fwd_cuda: group_size=", group_size, " is too large");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1), M = group_size, n = 2 * M, P = n * (n - 1) / 2;
  const auto st = x.scalar_type();
  const auto ct = st == at::kDouble ? at::kDouble : at::kFloat;
  auto mmd2 = at::empty({G}, x.options().dtype(ct));
  auto gx = need_gx ? at::empty({B, D}, x.options()) : at::empty({0}, x.options());
  auto gy = need_gy ? at::empty({B, D}, y.options()) : at::empty({0}, y.options());
  auto work = at::empty({G, P + n + n * n}, x.options().dtype(ct));
  const auto sc = scale.to(ct).contiguous();
  const int a0 = need_gx ? 0 : int(M), a1 = need_gy ? int(n) : int(M);
  const size_t w_bytes = size_t(n * n) * (ct == at::kDouble ? sizeof(double) : sizeof(float));
  const bool w_in_smem = (need_gx || need_gy) && w_bytes <= 32 * 1024;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "imm_fast_mmd_fwd_cuda", [&] {
    using C = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
    mmd_fwd_kernel<scalar_t, C><<<dim3(unsigned(G)), kThreads, w_in_smem ? w_bytes : 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), D == 1 ? 1 : x.stride(0),
        D == 1 ? 1 : y.stride(0), sc.const_data_ptr<C>(), int(M), D, eps, rbf,
        normalize_dim ? double(D) : 1.0, a0, a1, work.mutable_data_ptr<C>(), mmd2.mutable_data_ptr<C>(),
        need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr, need_gy ? gy.mutable_data_ptr<scalar_t>() : nullptr,
        w_in_smem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mmd2, gx, gy};
}

}  // namespace
}  // namespace imm_fast

TORCH_LIBRARY_IMPL(imm_fast_C, CUDA, m) { m.impl("mmd_fwd", &imm_fast::mmd_fwd_cuda); }
