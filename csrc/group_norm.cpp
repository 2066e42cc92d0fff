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
// first entry (channel g·C/G, pixel 0) for the variance, accumulated in double, as batch_norm.cpp
// and layer_norm.cpp. The per-(n, c) sums of the backward are accumulated in double too.
// Layouts: NCHW (a set is one contiguous run of C/G planes: the (n, g) sets are spread over
// threads) and channels-last NHWC (sample n is H·W rows of C channels: the samples are spread over
// threads, each keeping per-channel sums). Outputs have the input's layout. float32 and float64;
// bfloat16 / float16 through InFloat32 (low_precision.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "low_precision.h"
#include "normalization.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace manualconv {
namespace {

// ---------------------------------------------------------------------------------------------
// Arguments

// A 4-D map is channels-last (NHWC) when it is laid out so and not also NCHW-contiguous.
bool is_nhwc(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_map(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (n, C, H, W), got size ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// A vector of `size` entries of the input's dtype (made contiguous); nullopt when absent.
std::optional<at::Tensor> vector_arg(const std::optional<at::Tensor>& v, int64_t size,
                                     const at::Tensor& input, const char* op, const char* name) {
  if (!v || !v->defined()) return std::nullopt;
  TORCH_CHECK(v->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(v->dim() == 1 && v->size(0) == size, op, ": ", name, " must have size [", size,
              "], got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the input's dtype ", input.scalar_type(), ", got ", v->scalar_type());
  return v->contiguous();
}

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
// Forward

// μ_ng, σ⁻¹_ng of every (sample, group) set.
template <typename scalar_t>
void group_statistics(const scalar_t* x, const Groups& s, double eps, scalar_t* mean, scalar_t* invstd) {
  const int64_t M = s.M(), Cg = s.Cg();
  auto finish = [&](int64_t ng, const ShiftedSums& sums) {
    const auto [mu, var] = mean_and_var(sums, M);
    mean[ng] = static_cast<scalar_t>(mu);
    invstd[ng] = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
  };
  if (!s.nhwc) {  // set (n, g) is the contiguous run x[(n·G + g)·M …]
    at::parallel_for(0, s.n * s.G, std::max<int64_t>(1, 4096 / std::max<int64_t>(M, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const scalar_t* set = x + ng * M;
        ShiftedSums sums;
        add_contiguous(sums, set, M, static_cast<double>(set[0]));
        finish(ng, sums);
      }
    });
    return;
  }
  // NHWC: per sample, per-channel shifted sums (K of the channel's group), merged per group
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(s.C), shifted(s.C), shifted_sq(s.C), K(s.C);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* sample = x + n * s.P * s.C;
      for (int64_t c = 0; c < s.C; ++c) K[c] = sample[(c / Cg) * Cg];  // pixel 0, the group's first channel
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(shifted.begin(), shifted.end(), 0.0);
      std::fill(shifted_sq.begin(), shifted_sq.end(), 0.0);
      for (int64_t p = 0; p < s.P; ++p) {
        const scalar_t* row = sample + p * s.C;
        for (int64_t c = 0; c < s.C; ++c) {
          const double v = row[c], d = v - K[c];
          sum[c] += v;
          shifted[c] += d;
          shifted_sq[c] += d * d;
        }
      }
      for (int64_t g = 0; g < s.G; ++g) {
        ShiftedSums sums;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) sums.merge({sum[c], shifted[c], shifted_sq[c]});
        finish(n * s.G + g, sums);
      }
    }
  });
}

// y = x·a_nc + b_nc, a_nc = γ_c·σ⁻¹_ng, b_nc = β_c − μ_ng·a_nc (rounded once from double)
template <typename scalar_t>
void group_affine(const scalar_t* x, const Groups& s, const scalar_t* mean, const scalar_t* invstd,
                  const scalar_t* gamma, const scalar_t* beta, scalar_t* y) {
  const int64_t Cg = s.Cg();
  auto coefficients = [&](int64_t n, int64_t c, scalar_t& a, scalar_t& b) {
    const int64_t ng = n * s.G + c / Cg;
    const double ac = gamma ? static_cast<double>(gamma[c]) * invstd[ng] : static_cast<double>(invstd[ng]);
    a = static_cast<scalar_t>(ac);
    b = static_cast<scalar_t>((beta ? static_cast<double>(beta[c]) : 0.0) - static_cast<double>(mean[ng]) * ac);
  };
  if (!s.nhwc) {
    at::parallel_for(0, s.n * s.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(s.P, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        scalar_t a, b;
        coefficients(plane / s.C, plane % s.C, a, b);
        const scalar_t* in = x + plane * s.P;
        scalar_t* out = y + plane * s.P;
        for (int64_t p = 0; p < s.P; ++p) out[p] = in[p] * a + b;
      }
    });
    return;
  }
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> a(s.C), b(s.C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < s.C; ++c) coefficients(n, c, a[c], b[c]);
      for (int64_t p = 0; p < s.P; ++p) {
        const scalar_t* in = x + (n * s.P + p) * s.C;
        scalar_t* out = y + (n * s.P + p) * s.C;
        for (int64_t c = 0; c < s.C; ++c) out[c] = in[c] * a[c] + b[c];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// Σδy_nc and Σ(δy·x̂)_nc of every (sample, channel), in double: (n·C) entries each.
template <typename scalar_t>
void channel_delta_sums(const scalar_t* dy, const scalar_t* x, const Groups& s, const scalar_t* mean,
                        const scalar_t* invstd, double* sum_dy, double* sum_dy_xhat) {
  const int64_t Cg = s.Cg();
  if (!s.nhwc) {
    at::parallel_for(0, s.n * s.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(s.P, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t ng = (plane / s.C) * s.G + (plane % s.C) / Cg;
        const double mu = mean[ng], is = invstd[ng];
        const scalar_t *d = dy + plane * s.P, *in = x + plane * s.P;
        double s_dy[4] = {0, 0, 0, 0}, s_dy_xhat[4] = {0, 0, 0, 0};
        int64_t p = 0;
        for (; p + 4 <= s.P; p += 4) {
          for (int l = 0; l < 4; ++l) {
            s_dy[l] += d[p + l];
            s_dy_xhat[l] += static_cast<double>(d[p + l]) * ((in[p + l] - mu) * is);
          }
        }
        for (; p < s.P; ++p) {
          s_dy[0] += d[p];
          s_dy_xhat[0] += static_cast<double>(d[p]) * ((in[p] - mu) * is);
        }
        sum_dy[plane] = (s_dy[0] + s_dy[1]) + (s_dy[2] + s_dy[3]);
        sum_dy_xhat[plane] = (s_dy_xhat[0] + s_dy_xhat[1]) + (s_dy_xhat[2] + s_dy_xhat[3]);
      }
    });
    return;
  }
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mu(s.C), is(s.C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < s.C; ++c) {
        mu[c] = mean[n * s.G + c / Cg];
        is[c] = invstd[n * s.G + c / Cg];
      }
      double* a = sum_dy + n * s.C;
      double* b = sum_dy_xhat + n * s.C;
      std::fill(a, a + s.C, 0.0);
      std::fill(b, b + s.C, 0.0);
      for (int64_t p = 0; p < s.P; ++p) {
        const scalar_t *d = dy + (n * s.P + p) * s.C, *in = x + (n * s.P + p) * s.C;
        for (int64_t c = 0; c < s.C; ++c) {
          a[c] += d[c];
          b[c] += static_cast<double>(d[c]) * ((in[c] - mu[c]) * is[c]);
        }
      }
    }
  });
}

// δx = (x − μ_ng)·u_ng + δy·v_nc + w_ng (the header's formula), from the per-(n, c) sums.
template <typename scalar_t>
void group_grad_input(const scalar_t* dy, const scalar_t* x, const Groups& s, const scalar_t* mean,
                      const scalar_t* invstd, const scalar_t* gamma, const double* sum_dy,
                      const double* sum_dy_xhat, scalar_t* dx) {
  const int64_t Cg = s.Cg(), M = s.M();
  // u_ng, w_ng per (sample, group); v_nc per (sample, channel)
  std::vector<scalar_t> u(s.n * s.G), w(s.n * s.G), v(s.n * s.C);
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t ng = n * s.G + g;
      const double is = invstd[ng];
      double sum_g = 0, sum_g_xhat = 0;  // Σg, Σ(g·x̂) with g = γ_c·δy
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double gc = gamma ? static_cast<double>(gamma[c]) : 1.0;
        sum_g += gc * sum_dy[n * s.C + c];
        sum_g_xhat += gc * sum_dy_xhat[n * s.C + c];
        v[n * s.C + c] = static_cast<scalar_t>(gc * is);
      }
      u[ng] = static_cast<scalar_t>(-is * is * sum_g_xhat / M);
      w[ng] = static_cast<scalar_t>(-is * sum_g / M);
    }
  }
  if (!s.nhwc) {
    at::parallel_for(0, s.n * s.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(s.P, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t ng = (plane / s.C) * s.G + (plane % s.C) / Cg;
        const scalar_t mu = mean[ng], un = u[ng], wn = w[ng], vc = v[plane];
        const scalar_t *d = dy + plane * s.P, *in = x + plane * s.P;
        scalar_t* out = dx + plane * s.P;
        for (int64_t p = 0; p < s.P; ++p) out[p] = (in[p] - mu) * un + d[p] * vc + wn;
      }
    });
    return;
  }
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> mu(s.C), uc(s.C), wc(s.C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < s.C; ++c) {
        const int64_t ng = n * s.G + c / Cg;
        mu[c] = mean[ng], uc[c] = u[ng], wc[c] = w[ng];
      }
      const scalar_t* vn = v.data() + n * s.C;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t r = (n * s.P + p) * s.C;
        for (int64_t c = 0; c < s.C; ++c) dx[r + c] = (x[r + c] - mu[c]) * uc[c] + dy[r + c] * vn[c] + wc[c];
      }
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
  const bool nhwc = is_nhwc(input);
  const at::Tensor x = input.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const Groups s = groups_of(x, num_groups, nhwc, op);
  TORCH_CHECK(s.M() > 0 || s.n == 0, op, ": each group must have at least one entry, got size ", input.sizes());
  const auto g = vector_arg(weight, s.C, input, op, "weight");
  const auto b = vector_arg(bias, s.C, input, op, "bias");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({s.n, s.G}, x.options()), invstd = at::empty({s.n, s.G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_group_norm_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t *mp = mean.data_ptr<scalar_t>(), *ip = invstd.data_ptr<scalar_t>();
    group_statistics(xp, s, eps, mp, ip);
    group_affine(xp, s, mp, ip, g ? g->const_data_ptr<scalar_t>() : nullptr,
                 b ? b->const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
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
  const bool nhwc = is_nhwc(input);
  const auto layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(layout), dy = grad_output.contiguous(layout);
  const Groups s = groups_of(x, num_groups, nhwc, op);
  TORCH_CHECK(mean.numel() == s.n * s.G && invstd.numel() == s.n * s.G, op,
              ": mean and invstd must have one entry per (sample, group) (", s.n * s.G, ")");
  TORCH_CHECK(mean.scalar_type() == input.scalar_type() && invstd.scalar_type() == input.scalar_type(), op,
              ": mean and invstd must have the input's dtype");
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  const auto g = vector_arg(weight, s.C, input, op, "weight");
  at::Tensor grad_input = at::empty_like(x);
  at::Tensor grad_weight = at::empty({s.C}, x.options()), grad_bias = at::empty({s.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_group_norm_backward", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t *mp = mu.const_data_ptr<scalar_t>(), *ip = is.const_data_ptr<scalar_t>();
    const scalar_t* gp = g ? g->const_data_ptr<scalar_t>() : nullptr;
    std::vector<double> sum_dy(s.n * s.C), sum_dy_xhat(s.n * s.C);
    channel_delta_sums(dyp, xp, s, mp, ip, sum_dy.data(), sum_dy_xhat.data());
    group_grad_input(dyp, xp, s, mp, ip, gp, sum_dy.data(), sum_dy_xhat.data(), grad_input.data_ptr<scalar_t>());
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
