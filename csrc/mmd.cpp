// CPU implementation of imm_fast_C::mmd_fwd (see mmd.h for the contract) and the op's schema.
//
// Shapes: B = G*M rows of D values; n = 2M rows per group (x rows, then y rows); P = n(n-1)/2 pairs;
// D is walked in chunks of kMmdChunk values (nch chunks).
// Plan per group: (1) squared distances from differences, chunk by chunk, each chunk's partial sums added in
// chunk order in double; (2) kernel values and gradient coefficients W (double); (3) gradient rows
// sum_b W_ab (z_a - z_b), chunk by chunk. OpenMP runs over groups when there are enough of them, else over
// (group, chunk) items; both give bit-identical results, whatever the thread count.
#include "mmd.h"
#include "mmd_cpu_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace imm_fast {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // also checks the OS saves YMM
#else
  return false;
#endif
}

// IMM_FAST_CPU_ISA=base forces the baseline loops (tests compare both paths in one process).
const MmdCpuKernels& pick_kernels() {
  static const bool avx2 = cpu_has_avx2_fma() && mmd_cpu_kernels_avx2() != nullptr;
  const char* env = std::getenv("IMM_FAST_CPU_ISA");
  if (avx2 && !(env && std::strcmp(env, "base") == 0)) return *mmd_cpu_kernels_avx2();
  return mmd_cpu_kernels_base();
}

inline void pair_sq(const MmdCpuKernels& K, const float* const* r, int n, int64_t len, float* out) {
  K.pair_sq_f(r, n, len, out);
}
inline void pair_sq(const MmdCpuKernels& K, const double* const* r, int n, int64_t len, double* out) {
  K.pair_sq_d(r, n, len, out);
}
inline void grad(const MmdCpuKernels& K, const float* const* r, int n, int a0, int a1, int64_t len,
                 const float* W, float* const* o) {
  K.grad_f(r, n, a0, a1, len, W, o);
}
inline void grad(const MmdCpuKernels& K, const double* const* r, int n, int a0, int a1, int64_t len,
                 const double* W, double* const* o) {
  K.grad_d(r, n, a0, a1, len, W, o);
}

// One call's problem and the per-(group, chunk) steps; T: storage dtype, C: compute dtype (float, or double
// for double inputs). bf16/fp16 rows are widened into per-thread scratch; float/double rows are used in place.
template <typename T>
struct MmdCpu {
  using C = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  static constexpr bool kDirect = std::is_same<T, C>::value;

  const MmdCpuKernels& K;
  const T* x;          // (B, D), row stride sx
  const T* y;          // (B, D), row stride sy
  int64_t sx, sy;      // row strides of x and y (elements)
  T* gx;               // (B, D) contiguous, or nullptr when not needed
  T* gy;               // (B, D) contiguous, or nullptr when not needed
  int64_t M, D, n, P, nch;
  int a0, a1;          // gradient rows computed: [a0, a1) of the n group rows

  // Per-thread scratch: row pointers and, for bf16/fp16, widened rows and gradient rows.
  struct Scratch {
    std::vector<const C*> rows;
    std::vector<C*> outs;
    std::vector<C> in, out;
    std::vector<C> part;  // P partial sums of one chunk, then n self terms (0 or NaN, see mmd_pair.h)
  };
  Scratch scratch() const {
    Scratch s;
    s.rows.resize(n);
    s.outs.resize(n);
    s.part.resize(P + n);
    if (!kDirect) {
      s.in.resize(n * kMmdChunk);
      s.out.resize(n * kMmdChunk);
    }
    return s;
  }

  const T* row(int64_t g, int64_t i) const {  // row i of group g's n rows
    return i < M ? x + (g * M + i) * sx : y + (g * M + i - M) * sy;
  }
  T* grow(int64_t g, int64_t i) const {
    return i < M ? gx + (g * M + i) * D : gy + (g * M + i - M) * D;
  }

  int64_t chunk_len(int64_t c) const { return std::min(kMmdChunk, D - c * kMmdChunk); }

  void load(Scratch& s, int64_t g, int64_t c) const {
    const int64_t k0 = c * kMmdChunk, len = chunk_len(c);
    for (int64_t i = 0; i < n; ++i) {
      const T* src = row(g, i) + k0;
      if constexpr (kDirect) {
        s.rows[i] = reinterpret_cast<const C*>(src);
      } else {
        C* dst = s.in.data() + i * kMmdChunk;
        for (int64_t k = 0; k < len; ++k) dst[k] = static_cast<C>(src[k]);
        s.rows[i] = dst;
      }
    }
  }

  // P partial squared distances of chunk c of group g, then the n rows' self terms, into s.part.
  void partial(Scratch& s, int64_t g, int64_t c) const {
    load(s, g, c);
    const int64_t len = chunk_len(c);
    pair_sq(K, s.rows.data(), int(n), len, s.part.data());
    for (int64_t i = 0; i < n; ++i) {
      const C* r = s.rows[i];
      C t = 0;
      // 0, or NaN for an inf / NaN value: any summation order gives the same, so let it vectorize.
#pragma omp simd reduction(+ : t)
      for (int64_t k = 0; k < len; ++k) t += r[k] - r[k];
      s.part[P + i] = t;
    }
  }

  // Gradient rows [a0, a1) of chunk c of group g; W: n x n coefficients of the group.
  void gradient(Scratch& s, int64_t g, int64_t c, const C* W) const {
    load(s, g, c);
    const int64_t k0 = c * kMmdChunk, len = chunk_len(c);
    for (int64_t a = a0; a < a1; ++a) {
      if constexpr (kDirect) s.outs[a - a0] = reinterpret_cast<C*>(grow(g, a) + k0);
      else s.outs[a - a0] = s.out.data() + (a - a0) * kMmdChunk;
    }
    grad(K, s.rows.data(), int(n), a0, a1, len, W, s.outs.data());
    if constexpr (!kDirect) {
      for (int64_t a = a0; a < a1; ++a) {
        const C* src = s.outs[a - a0];
        T* dst = grow(g, a) + k0;
        for (int64_t k = 0; k < len; ++k) dst[k] = static_cast<T>(src[k]);
      }
    }
  }
};

template <typename T>
void run_cpu(const at::Tensor& x, const at::Tensor& y, int64_t M, const double* scale, double eps, bool rbf,
             bool normalize_dim, at::Tensor& mmd2, at::Tensor& gx, at::Tensor& gy, bool need_gx, bool need_gy) {
  using P_t = MmdCpu<T>;
  using C = typename P_t::C;
  const int64_t B = x.size(0), D = x.size(1), G = B / M, n = 2 * M;
  P_t p{pick_kernels(),
        x.const_data_ptr<T>(), y.const_data_ptr<T>(),
        D == 1 ? 1 : x.stride(0), D == 1 ? 1 : y.stride(0),
        need_gx ? gx.mutable_data_ptr<T>() : nullptr, need_gy ? gy.mutable_data_ptr<T>() : nullptr,
        M, D, n, n * (n - 1) / 2, (D + kMmdChunk - 1) / kMmdChunk,
        need_gx ? 0 : int(M), need_gy ? int(n) : int(M)};
  const bool grads = need_gx || need_gy;
  const double Dn = normalize_dim ? double(D) : 1.0;
  const int64_t Q = p.P + n;             // per group: P squared distances, then n self terms
  std::vector<double> d2(G * Q, 0.0);    // (G, Q)
  std::vector<C> W(G * n * n);           // (G, n, n) gradient coefficients
  std::vector<double> out(G);            // (G,) MMD2 in double
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();

  auto finish_group = [&](int64_t g) {
    const double* dg = d2.data() + g * Q;
    out[g] = mmd_coefficients(dg, dg + p.P, M, scale[g], eps, rbf, Dn, W.data() + g * n * n);
  };

  if (G >= 4 * int64_t(nt)) {
    // Enough groups: one thread does a whole group, so its rows are still in cache for the gradient pass.
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      auto s = p.scratch();
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G; ++g) {
        double* dg = d2.data() + g * Q;
        for (int64_t c = 0; c < p.nch; ++c) {
          p.partial(s, g, c);
          for (int64_t q = 0; q < Q; ++q) dg[q] += double(s.part[q]);
        }
        finish_group(g);
        if (grads)
          for (int64_t c = 0; c < p.nch; ++c) p.gradient(s, g, c, W.data() + g * n * n);
      }
    }
  } else {
    // Few groups: split D into chunks across threads; partial sums are kept per chunk and added in order.
    const int64_t items = G * p.nch;
    std::vector<C> parts(items * Q);  // (G, nch, Q)
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      auto s = p.scratch();
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        p.partial(s, it / p.nch, it % p.nch);
        std::copy(s.part.begin(), s.part.end(), parts.begin() + it * Q);
      }
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G; ++g) {
        double* dg = d2.data() + g * Q;
        for (int64_t c = 0; c < p.nch; ++c)
          for (int64_t q = 0; q < Q; ++q) dg[q] += double(parts[(g * p.nch + c) * Q + q]);
        finish_group(g);
      }
      if (grads) {
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; ++it)
          p.gradient(s, it / p.nch, it % p.nch, W.data() + (it / p.nch) * n * n);
      }
    }
  }
  if (mmd2.scalar_type() == at::kDouble) {
    std::copy(out.begin(), out.end(), mmd2.mutable_data_ptr<double>());
  } else {
    float* m = mmd2.mutable_data_ptr<float>();
    for (int64_t g = 0; g < G; ++g) m[g] = float(out[g]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmd_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                                           int64_t group_size, const at::Tensor& scale,
                                                           double eps, bool rbf, bool normalize_dim,
                                                           bool need_gx, bool need_gy) {
  const int64_t G = mmd_check(x, y, group_size, scale, eps);
  const int64_t B = x.size(0), D = x.size(1);
  const auto st = x.scalar_type();
  auto mmd2 = at::empty({G}, x.options().dtype(st == at::kDouble ? at::kDouble : at::kFloat));
  auto gx = need_gx ? at::empty({B, D}, x.options()) : at::empty({0}, x.options());
  auto gy = need_gy ? at::empty({B, D}, y.options()) : at::empty({0}, y.options());
  const auto sc = scale.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "imm_fast_mmd_fwd_cpu", [&] {
    run_cpu<scalar_t>(x, y, group_size, sc.const_data_ptr<double>(), eps, rbf, normalize_dim, mmd2, gx, gy,
                      need_gx, need_gy);
  });
  return {mmd2, gx, gy};
}

}  // namespace imm_fast

TORCH_LIBRARY(imm_fast_C, m) {
  m.def(
      "mmd_fwd(Tensor x, Tensor y, int group_size, Tensor scale, float eps, bool rbf, bool normalize_dim, "
      "bool need_gx, bool need_gy) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(imm_fast_C, CPU, m) { m.impl("mmd_fwd", &imm_fast::mmd_fwd_cpu); }
