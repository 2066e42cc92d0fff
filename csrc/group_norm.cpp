// group_norm: each (sample n, group g) set of M = C/G·H·W entries normalised by its own statistics,
// then the per-channel affine map.
//
//   forward   μ_ng = Σ x / M,  var_ng = Σ (x − μ_ng)² / M,  σ⁻¹_ng = 1/√(var_ng + ε),
//             y = γ_c·(x − μ_ng)·σ⁻¹_ng + β_c  =  x·a_nc + b_nc,  a_nc = γ_c·σ⁻¹_ng,  b_nc = β_c − μ_ng·a_nc
//   backward  with the affine folded in (g = γ_c·δy):
//               δx = σ⁻¹_ng/M · (M·g − Σg − x̂·Σ(g·x̂)),   x̂ = (x − μ_ng)·σ⁻¹_ng
//                  = (x − μ_ng)·u_ng + δy·v_nc + w_ng,
//                    v_nc = γ_c·σ⁻¹_ng,  u_ng = −σ⁻²_ng·Σ(g·x̂)/M,  w_ng = −σ⁻¹_ng·Σg/M,
//               Σg = Σ_c γ_c·Σδy_nc,  Σ(g·x̂) = Σ_c γ_c·Σ(δy·x̂)_nc   (sums over the group's channels)
//             ∂J/∂γ_c = Σ_n Σ(δy·x̂)_nc,   ∂J/∂β_c = Σ_n Σδy_nc
//
// Statistics in one pass (normalization.h): Σx for μ, and Σ(x − K), Σ(x − K)² about K = the set's
// first entry (channel g·C/G, pixel 0) for the variance. NCHW: a set's sums and the per-(n, c)
// sums of the backward run over contiguous runs in lanes of the input's precision (lane_sums, as
// layer_norm.cpp; torch's group norm sums float32 in float32 too): a float32 sum of n terms in any
// order meets the n·ε·Σ|terms| bound of tests/oracle.py, and lanes keep it about n/32 + 5 roundings
// deep. NHWC: per-channel sums across the rows, in double (the loop runs across channels, so it
// vectorises without lanes).
// Layouts: NCHW (a set is one contiguous run of C/G planes: the (n, g) sets are spread over
// threads) and channels-last NHWC (sample n is H·W rows of C channels: the samples are spread over
// threads, each keeping per-channel sums). Each set (NCHW) or sample (NHWC) is summed and then
// written while it is still in cache. Outputs have the input's layout. float32 and float64;
// bfloat16 / float16 through InFloat32 (low_precision.h).
// Speed (AMD EPYC Zen 4, AVX-512, 1 thread, float32, (128, 64, 16, 16) in 16 groups, against
// torch's kernels in one process, median CPU time, machine shared so noisy): NCHW forward
// 0.33–0.36 ms (torch 0.53–0.54), backward 0.54–0.78 ms (torch 0.74–0.98), where the sums in 8
// double lanes took 0.52–0.54 and 0.77–0.86; NHWC forward 0.87–1.16 ms (torch 4.0–4.6), backward
// 1.4–1.9 ms (torch 3.3–3.9). The first version, two passes over the whole map with the sums in
// baseline (SSE2) code, took 2.4 and 2.5 ms.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "low_precision.h"
#include "normalization.h"
#include "output_cache.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace manualconv {
namespace {

// ---------------------------------------------------------------------------------------------
// Arguments (check_map, vector_arg: normalization.h)

// The sizes of a group norm over an (n, C, H, W) map in G groups.
struct Groups {
  int64_t n, C, G, P;  // samples, channels, groups, pixels per plane
  bool nhwc;
  int64_t Cg() const { return C / G; }
  int64_t M() const { return Cg() * P; }  // entries per (sample, group)
};

Groups groups_of(const at::Tensor& x, int64_t G, bool nhwc, const char* op) {
  const int64_t C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, op, ": num_groups must divide the channels (", C, "), got ", G);
  return {x.size(0), C, G, x.size(2) * x.size(3), nhwc};
}

// ---------------------------------------------------------------------------------------------
// The hot loops, each built for the capability the kernels use (AVX-512, AVX2 or the baseline:
// run_for_cpu). The NCHW sums run in kLaneCount lanes (normalization.h), so each add is independent
// of the last and the loop vectorises; the adds run in the same lane order on every build.

// Σδy and Σδy·x̂ (x̂ = (x − μ)·σ⁻¹) of n contiguous entries.
template <typename scalar_t>
__attribute__((always_inline)) inline std::pair<double, double> run_delta_sums(const scalar_t* dy, const scalar_t* x,
                                                                               int64_t n, scalar_t mu, scalar_t is) {
  scalar_t s_dy[kLaneCount] = {}, s_dy_xhat[kLaneCount] = {};
  int64_t p = 0;
  for (; p + kLaneCount <= n; p += kLaneCount) {
    for (int l = 0; l < kLaneCount; ++l) s_dy[l] += dy[p + l], s_dy_xhat[l] += dy[p + l] * ((x[p + l] - mu) * is);
  }
  for (int l = 0; p + l < n; ++l) {  // the tail, one entry per lane
    s_dy[l] += dy[p + l], s_dy_xhat[l] += dy[p + l] * ((x[p + l] - mu) * is);
  }
  return {static_cast<double>(fold_lanes(s_dy)), static_cast<double>(fold_lanes(s_dy_xhat))};
}

// NHWC: per-channel Σx, Σ(x − K_c), Σ(x − K_c)² over P rows of C channels.
template <typename scalar_t>
__attribute__((always_inline)) inline void rows_sums(const scalar_t* x, int64_t P, int64_t C, const double* K, double* sum, double* shifted,
                      double* shifted_sq) {
  for (int64_t p = 0; p < P; ++p) {
    const scalar_t* row = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const double v = row[c], d = v - K[c];
      sum[c] += v, shifted[c] += d, shifted_sq[c] += d * d;
    }
  }
}

// NHWC: per-channel Σδy and Σδy·x̂ over P rows of C channels.
template <typename scalar_t>
__attribute__((always_inline)) inline void rows_delta_sums(const scalar_t* dy, const scalar_t* x, int64_t P, int64_t C, const double* mu,
                            const double* is, double* s_dy, double* s_dy_xhat) {
  for (int64_t p = 0; p < P; ++p) {
    const scalar_t *d = dy + p * C, *in = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      s_dy[c] += d[c];
      s_dy_xhat[c] += static_cast<double>(d[c]) * ((in[c] - mu[c]) * is[c]);
    }
  }
}

// The NHWC loops, each built for the kernels' capability (cpu_capability.h's run_for_cpu; the NCHW
// kernels below run their whole loop over sets through it).
template <typename T>
void sums_of_rows(const T* x, int64_t P, int64_t C, const double* K, double* sum, double* shifted,
                  double* shifted_sq) {
  run_for_cpu([&] { rows_sums(x, P, C, K, sum, shifted, shifted_sq); });
}
template <typename T>
void delta_sums_of_rows(const T* dy, const T* x, int64_t P, int64_t C, const double* mu,
                        const double* is, double* s_dy, double* s_dy_xhat) {
  run_for_cpu([&] { rows_delta_sums(dy, x, P, C, mu, is, s_dy, s_dy_xhat); });
}
template <typename T>
void affine_of_rows(const T* x, int64_t P, int64_t C, const T* a, const T* b, T* y) {
  run_for_cpu([&] { rows_affine(x, P, C, a, b, y); });
}
template <typename T>
void grad_input_of_rows(const T* dy, const T* x, int64_t P, int64_t C, const T* mu, const T* u,
                        const T* v, const T* w, T* dx) {
  run_for_cpu([&] { rows_grad_input(dy, x, P, C, mu, u, v, w, dx); });
}

// ---------------------------------------------------------------------------------------------
// Forward and backward, one (sample, group) set (NCHW) or one sample (NHWC) at a time, so the
// second pass over its entries finds them in cache.

// Grain of the NCHW loops over sets: about 4096 entries per task.
inline int64_t set_grain(int64_t entries) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(entries, 1)); }

// (μ, σ⁻¹) of one set from its sums, rounded once.
template <typename scalar_t>
void set_statistics(const ShiftedSums& sums, int64_t M, double eps, scalar_t& mean, scalar_t& invstd) {
  const auto [mu, var] = mean_and_var(sums, M);
  mean = static_cast<scalar_t>(mu);
  invstd = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
}

// a_nc = γ_c·σ⁻¹_ng, b_nc = β_c − μ_ng·a_nc, in double, rounded once.
template <typename scalar_t>
void channel_coefficients(int64_t c, scalar_t mean, scalar_t invstd, const scalar_t* gamma, const scalar_t* beta,
                          scalar_t& a, scalar_t& b) {
  const double ac = gamma ? static_cast<double>(gamma[c]) * invstd : static_cast<double>(invstd);
  a = static_cast<scalar_t>(ac);
  b = static_cast<scalar_t>((beta ? static_cast<double>(beta[c]) : 0.0) - static_cast<double>(mean) * ac);
}

// μ_ng, σ⁻¹_ng of every set, and y = x·a_nc + b_nc.
template <typename scalar_t>
void group_norm_forward_kernel(const scalar_t* x, const Groups& s, double eps, const scalar_t* gamma,
                               const scalar_t* beta, scalar_t* mean, scalar_t* invstd, scalar_t* y) {
  const int64_t M = s.M(), Cg = s.Cg();
  if (!s.nhwc) {  // set (n, g) is the contiguous run x[(n·G + g)·M …], planes of channels g·C/G…
    at::parallel_for(0, s.n * s.G, set_grain(M), [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {
        for (int64_t ng = begin; ng < end; ++ng) {
          const scalar_t* set = x + ng * M;
          set_statistics(lane_sums(set, M, set[0]), M, eps, mean[ng], invstd[ng]);
          for (int64_t k = 0; k < Cg; ++k) {
            scalar_t a, b;
            channel_coefficients((ng % s.G) * Cg + k, mean[ng], invstd[ng], gamma, beta, a, b);
            run_affine(set + k * s.P, s.P, a, b, y + ng * M + k * s.P);
          }
        }
      });
    });
    return;
  }
  // NHWC: per sample, per-channel shifted sums (K of the channel's group), merged per group
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(s.C), shifted(s.C), shifted_sq(s.C), K(s.C);
    std::vector<scalar_t> a(s.C), b(s.C);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* sample = x + n * s.P * s.C;
      for (int64_t c = 0; c < s.C; ++c) K[c] = sample[(c / Cg) * Cg];  // pixel 0, the group's first channel
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(shifted.begin(), shifted.end(), 0.0);
      std::fill(shifted_sq.begin(), shifted_sq.end(), 0.0);
      sums_of_rows(sample, s.P, s.C, K.data(), sum.data(), shifted.data(), shifted_sq.data());
      for (int64_t g = 0; g < s.G; ++g) {
        ShiftedSums sums;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) sums.merge({sum[c], shifted[c], shifted_sq[c]});
        const int64_t ng = n * s.G + g;
        set_statistics(sums, M, eps, mean[ng], invstd[ng]);
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) channel_coefficients(c, mean[ng], invstd[ng], gamma, beta, a[c], b[c]);
      }
      affine_of_rows(sample, s.P, s.C, a.data(), b.data(), y + n * s.P * s.C);
    }
  });
}

// u_ng, w_ng of one set and v_nc of its channels (the header's formula) from the per-(n, c) sums.
template <typename scalar_t>
void set_grad_coefficients(int64_t g, int64_t Cg, int64_t M, double is, const scalar_t* gamma, const double* sum_dy,
                           const double* sum_dy_xhat, scalar_t& u, scalar_t& w, scalar_t* v) {
  double sum_g = 0, sum_g_xhat = 0;  // Σg, Σ(g·x̂) with g = γ_c·δy
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    const double gc = gamma ? static_cast<double>(gamma[c]) : 1.0;
    sum_g += gc * sum_dy[c];
    sum_g_xhat += gc * sum_dy_xhat[c];
    v[c] = static_cast<scalar_t>(gc * is);
  }
  u = static_cast<scalar_t>(-is * is * sum_g_xhat / M);
  w = static_cast<scalar_t>(-is * sum_g / M);
}

// Σδy_nc, Σ(δy·x̂)_nc of every (sample, channel) (n·C entries each, in double), and
// δx = (x − μ_ng)·u_ng + δy·v_nc + w_ng.
template <typename scalar_t>
void group_norm_backward_kernel(const scalar_t* dy, const scalar_t* x, const Groups& s, const scalar_t* mean,
                                const scalar_t* invstd, const scalar_t* gamma, double* sum_dy, double* sum_dy_xhat,
                                scalar_t* dx) {
  const int64_t Cg = s.Cg(), M = s.M();
  if (!s.nhwc) {
    at::parallel_for(0, s.n * s.G, set_grain(M), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(s.C);
      run_for_cpu([&] {
        for (int64_t ng = begin; ng < end; ++ng) {
          const int64_t n = ng / s.G, g = ng % s.G;
          double *a = sum_dy + n * s.C, *b = sum_dy_xhat + n * s.C;
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
            const int64_t offset = (n * s.C + c) * s.P;
            std::tie(a[c], b[c]) = run_delta_sums(dy + offset, x + offset, s.P, mean[ng], invstd[ng]);
          }
          scalar_t u, w;
          set_grad_coefficients(g, Cg, M, invstd[ng], gamma, a, b, u, w, v.data());
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
            const int64_t offset = (n * s.C + c) * s.P;
            run_grad_input(dy + offset, x + offset, s.P, mean[ng], u, v[c], w, dx + offset);
          }
        }
      });
    });
    return;
  }
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mu(s.C), is(s.C);
    std::vector<scalar_t> mu_c(s.C), u(s.C), v(s.C), w(s.C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < s.C; ++c) {
        mu[c] = mean[n * s.G + c / Cg];
        is[c] = invstd[n * s.G + c / Cg];
      }
      double *a = sum_dy + n * s.C, *b = sum_dy_xhat + n * s.C;
      std::fill(a, a + s.C, 0.0);
      std::fill(b, b + s.C, 0.0);
      const int64_t offset = n * s.P * s.C;
      delta_sums_of_rows(dy + offset, x + offset, s.P, s.C, mu.data(), is.data(), a, b);
      for (int64_t g = 0; g < s.G; ++g) {
        const int64_t ng = n * s.G + g;
        scalar_t un, wn;
        set_grad_coefficients(g, Cg, M, invstd[ng], gamma, a, b, un, wn, v.data());
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) mu_c[c] = mean[ng], u[c] = un, w[c] = wn;
      }
      grad_input_of_rows(dy + offset, x + offset, s.P, s.C, mu_c.data(), u.data(), v.data(), w.data(), dx + offset);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Operators

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, double eps) {
  const char* op = "group_norm_forward";
  check_map(input, op, "input");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = manualconv::contiguous(input, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const Groups s = groups_of(x, num_groups, nhwc, op);
  TORCH_CHECK(s.M() > 0 || s.n == 0, op, ": each group must have at least one entry, got size ", input.sizes());
  const auto g = vector_arg(weight, s.C, input, op, "weight");
  const auto b = vector_arg(bias, s.C, input, op, "bias");
  at::Tensor y = manualconv::empty_like(x);
  at::Tensor mean = manualconv::empty({s.n, s.G}, x.options()), invstd = manualconv::empty({s.n, s.G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_group_norm_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t *mp = mean.data_ptr<scalar_t>(), *ip = invstd.data_ptr<scalar_t>();
    group_norm_forward_kernel(xp, s, eps, g ? g->const_data_ptr<scalar_t>() : nullptr,
                              b ? b->const_data_ptr<scalar_t>() : nullptr, mp, ip, y.data_ptr<scalar_t>());
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, int64_t num_groups) {
  const char* op = "group_norm_backward";
  check_map(input, op, "input");
  check_map(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(), op,
              ": grad_output must have the input's size and dtype, got ", grad_output.sizes());
  const bool nhwc = is_channels_last(input);
  const auto layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = manualconv::contiguous(input, layout), dy = manualconv::contiguous(grad_output, layout);
  const Groups s = groups_of(x, num_groups, nhwc, op);
  TORCH_CHECK(mean.numel() == s.n * s.G && invstd.numel() == s.n * s.G, op,
              ": mean and invstd must have one entry per (sample, group) (", s.n * s.G, ")");
  TORCH_CHECK(mean.scalar_type() == input.scalar_type() && invstd.scalar_type() == input.scalar_type(), op,
              ": mean and invstd must have the input's dtype");
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  const auto g = vector_arg(weight, s.C, input, op, "weight");
  at::Tensor grad_input = manualconv::empty_like(x);
  at::Tensor grad_weight = manualconv::empty({s.C}, x.options()), grad_bias = manualconv::empty({s.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_group_norm_backward", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t *mp = mu.const_data_ptr<scalar_t>(), *ip = is.const_data_ptr<scalar_t>();
    const scalar_t* gp = g ? g->const_data_ptr<scalar_t>() : nullptr;
    std::vector<double> sum_dy(s.n * s.C), sum_dy_xhat(s.n * s.C);
    group_norm_backward_kernel(dyp, xp, s, mp, ip, gp, sum_dy.data(), sum_dy_xhat.data(),
                               grad_input.data_ptr<scalar_t>());
    scalar_t *gw = grad_weight.data_ptr<scalar_t>(), *gb = grad_bias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < s.C; ++c) {  // ∂J/∂γ_c = Σ_n Σ(δy·x̂)_nc, ∂J/∂β_c = Σ_n Σδy_nc
      double w_c = 0, b_c = 0;
      for (int64_t n = 0; n < s.n; ++n) w_c += sum_dy_xhat[n * s.C + c], b_c += sum_dy[n * s.C + c];
      gw[c] = static_cast<scalar_t>(w_c);
      gb[c] = static_cast<scalar_t>(b_c);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def(
      "group_norm_forward(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, int num_groups) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("group_norm_forward", TORCH_FN(manualconv::InFloat32<&manualconv::group_norm_forward>::call));
  m.impl("group_norm_backward", TORCH_FN(manualconv::InFloat32<&manualconv::group_norm_backward>::call));
}
