// layer_norm: rows of an (M, D) matrix normalised over their D entries (group norm uses it too:
// one row per (sample, group)).
//
//   forward   μ_m = Σ x / D,  var_m = Σ (x − μ_m)² / D,  σ⁻¹_m = 1/√(var_m + ε),
//             y = γ ⊙ (x − μ_m)·σ⁻¹_m + β
//   backward  g = γ ⊙ δy:  δx = σ⁻¹/D · (D·g − Σg − x̂·Σ(g·x̂)),   x̂ = (x − μ_m)·σ⁻¹_m
//             ∂J/∂γ_j = Σ_m δy_mj·x̂_mj,   ∂J/∂β_j = Σ_m δy_mj   (only with γ; else both are empty)
//
// Statistics in one pass over the row (normalization.h): Σx for μ, and Σ(x − K), Σ(x − K)² about
// K = the row's first entry for the variance, accumulated in double. Rows are spread over threads;
// the column sums ∂J/∂γ, ∂J/∂β are accumulated per chunk of rows in the δx pass. float32 and float64.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "normalization.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace manualconv {
namespace {

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows M, entries D), got size ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}


template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

// μ and σ⁻¹ of one row of D entries (one pass, normalization.h; NaN/inf propagate as in plain sums).
template <typename scalar_t>
std::pair<double, double> row_statistics(const scalar_t* x, int64_t D, double eps) {
  ShiftedSums s;
  add_contiguous(s, x, D, static_cast<double>(x[0]));
  const auto [mean, var] = mean_and_var(s, D);
  return {mean, 1.0 / std::sqrt(var + eps)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "layer_norm_forward";
  check_rows(input, op, "input");
  const int64_t M = input.size(0), D = input.size(1);
  TORCH_CHECK(D > 0 || M == 0, op, ": rows must have at least one entry, got size ", input.sizes());
  const at::Tensor x = input.contiguous();
  const auto g = vector_arg(weight, D, input, op, "weight");
  const auto b = vector_arg(bias, D, input, op, "bias");
  at::Tensor y = at::empty_like(x), mean = at::empty({M}, x.options()), invstd = at::empty({M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_layer_norm_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t *gp = data_or_null<scalar_t>(g), *bp = data_or_null<scalar_t>(b);
    scalar_t *yp = y.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>(), *ip = invstd.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* row = xp + m * D;
        scalar_t* out = yp + m * D;
        const auto [mu_d, is_d] = row_statistics(row, D, eps);
        const scalar_t mu = static_cast<scalar_t>(mu_d), is = static_cast<scalar_t>(is_d);
        mp[m] = mu, ip[m] = is;
        for (int64_t j = 0; j < D; ++j) {
          scalar_t v = (row[j] - mu) * is;  // x̂
          if (gp) v = v * gp[j];
          if (bp) v = v + bp[j];
          out[j] = v;
        }
      }
    });
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight) {
  const char* op = "layer_norm_backward";
  check_rows(input, op, "input");
  check_rows(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(),
              op, ": grad_output must have the input's size and dtype, got ", grad_output.sizes());
  const int64_t M = input.size(0), D = input.size(1);
  TORCH_CHECK(mean.numel() == M && invstd.numel() == M, op,
              ": mean and invstd must have one entry per row (", M, ")");
  const at::Tensor x = input.contiguous(), dy = grad_output.contiguous();
  const at::Tensor mu = mean.contiguous().to(input.scalar_type()), is = invstd.contiguous().to(input.scalar_type());
  const auto g = vector_arg(weight, D, input, op, "weight");
  at::Tensor grad_input = at::empty_like(x);
  // without γ there is no affine map (and no β): ∂J/∂γ, ∂J/∂β are returned empty, not computed
  const int64_t affine = g ? D : 0;
  at::Tensor grad_weight = at::empty({affine}, x.options()), grad_bias = at::empty({affine}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_layer_norm_backward", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t *mp = mu.const_data_ptr<scalar_t>(), *ip = is.const_data_ptr<scalar_t>();
    const scalar_t* gp = data_or_null<scalar_t>(g);
    scalar_t* dxp = grad_input.data_ptr<scalar_t>();
    // δx per row: with c = x − μ, g = γ ⊙ δy: δx = σ⁻¹·(g − Σg/D − c·σ⁻²·Σ(g·c)/D); in the same pass
    // over the row, ∂J/∂γ_j += δy·x̂, ∂J/∂β_j += δy into the chunk's partial sums (fixed chunks of
    // rows, added in chunk order: the result does not depend on the thread that ran a chunk)
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M * D / 4096));
    std::vector<double> partial_w(chunks * affine, 0.0), partial_b(chunks * affine, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        double* s_w = partial_w.data() + chunk * affine;
        double* s_b = partial_b.data() + chunk * affine;
        for (int64_t m = M * chunk / chunks; m < M * (chunk + 1) / chunks; ++m) {
          const scalar_t *row = xp + m * D, *d = dyp + m * D;
          scalar_t* out = dxp + m * D;
          const scalar_t mu_m = mp[m];
          const double is_m = ip[m];
          double sum_g = 0, sum_gc = 0;
          for (int64_t j = 0; j < D; ++j) {
            const double gj = gp ? static_cast<double>(d[j]) * gp[j] : static_cast<double>(d[j]);
            sum_g += gj;
            sum_gc += gj * static_cast<double>(row[j] - mu_m);
          }
          const scalar_t a = static_cast<scalar_t>(is_m);
          const scalar_t k = static_cast<scalar_t>(-is_m * is_m * is_m * sum_gc / D);
          const scalar_t c = static_cast<scalar_t>(-is_m * sum_g / D);
          for (int64_t j = 0; j < D; ++j) {
            const scalar_t gj = gp ? d[j] * gp[j] : d[j];
            out[j] = gj * a + (row[j] - mu_m) * k + c;
          }
          if (affine == 0) continue;
          const scalar_t is_s = ip[m];
          for (int64_t j = 0; j < D; ++j) {  // ∂J/∂γ_j += δy·x̂, ∂J/∂β_j += δy
            s_w[j] += static_cast<double>(d[j]) * static_cast<double>((row[j] - mu_m) * is_s);
            s_b[j] += d[j];
          }
        }
      }
    });
    scalar_t *gw = grad_weight.data_ptr<scalar_t>(), *gb = grad_bias.data_ptr<scalar_t>();
    for (int64_t j = 0; j < affine; ++j) {
      double w_j = 0, b_j = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) w_j += partial_w[chunk * affine + j], b_j += partial_b[chunk * affine + j];
      gw[j] = static_cast<scalar_t>(w_j);
      gb[j] = static_cast<scalar_t>(b_j);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def(
      "layer_norm_forward(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("layer_norm_forward", &manualconv::layer_norm_forward);
  m.impl("layer_norm_backward", &manualconv::layer_norm_backward);
}
