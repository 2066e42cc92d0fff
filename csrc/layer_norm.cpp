// layer_norm: rows of an (M, D) matrix normalised over their D entries (group norm uses it too:
// one row per (sample, group)).
//
//   forward   μ_m = Σ x / D,  var_m = Σ (x − μ_m)² / D,  σ⁻¹_m = 1/√(var_m + ε),
//             y = γ ⊙ (x − μ_m)·σ⁻¹_m + β
//   backward  g = γ ⊙ δy:  δx = σ⁻¹/D · (D·g − Σg − x̂·Σ(g·x̂)),   x̂ = (x − μ_m)·σ⁻¹_m
//             ∂J/∂γ_j = Σ_m δy_mj·x̂_mj,   ∂J/∂β_j = Σ_m δy_mj   (only with γ; else both are empty)
//
// Statistics in one pass over the row (normalization.h's lane_sums): Σx for μ, and Σ(x − K),
// Σ(x − K)² about K = the row's first entry for the variance. The backward's two row sums Σg,
// Σ(g·(x − μ)) in one pass, then δx and the row's share of ∂J/∂γ, ∂J/∂β while the row is in cache.
// Every sum runs in lanes of the input's precision (float32 for float32, as torch's layer norm,
// which sums float32 rows in float32), built for the kernels' instruction set (run_for_cpu): the
// n·ε·Σ|terms| bound of a float32 sum of n terms (tests/oracle.py) holds for any order, and lanes
// make it about log2(lanes) + n/lanes roundings deep instead of n. The per-row scalars (μ, σ⁻¹ and
// the δx coefficients) are formed in double from the sums and rounded once. Rows are spread over
// threads; the column sums ∂J/∂γ, ∂J/∂β are accumulated per fixed chunk of rows (in the input's
// precision: a chunk's sum of its rows meets the rows·ε bound) and the chunks added in double, in
// chunk order. float32 and float64.
// Speed (AMD EPYC Zen 4, AVX-512, 1 thread, float32, 8192 rows of 384, the operators against
// torch's in one process, median CPU time, machine shared so noisy): forward 0.97–1.33 ms (torch
// 1.07–1.11), backward 1.24–1.41 ms (torch 1.28–2.11); the previous version, which summed each row
// serially in double, took 3.3 and 4.7 ms.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "normalization.h"
#include "output_cache.h"

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

// ---------------------------------------------------------------------------------------------
// The row loops, each inlined into a loop over a thread's rows built for the kernels' instruction
// set (run_for_cpu); the sums in kLaneCount lanes (normalization.h).

// μ and σ⁻¹ = 1/√(var + ε) of one row of D entries (one pass; NaN/inf propagate as in plain sums).
template <typename scalar_t>
__attribute__((always_inline)) inline std::pair<double, double> row_statistics(const scalar_t* x, int64_t D,
                                                                               double eps) {
  const auto [mean, var] = mean_and_var(lane_sums(x, D, x[0]), D);
  return {mean, 1.0 / std::sqrt(var + eps)};
}

// y = γ ⊙ (x − μ)·σ⁻¹ + β over one row.
template <typename scalar_t>
__attribute__((always_inline)) inline void row_output(const scalar_t* x, int64_t D, scalar_t mu, scalar_t is,
                                                      const scalar_t* gamma, const scalar_t* beta, scalar_t* y) {
  for (int64_t j = 0; j < D; ++j) {
    scalar_t v = (x[j] - mu) * is;  // x̂
    if (gamma) v = v * gamma[j];
    if (beta) v = v + beta[j];
    y[j] = v;
  }
}

// Σg and Σ(g·(x − μ)) of one row, g = γ ⊙ δy (g = δy without γ).
template <typename scalar_t>
__attribute__((always_inline)) inline std::pair<double, double> row_delta_sums(const scalar_t* dy, const scalar_t* x,
                                                                               const scalar_t* gamma, int64_t D,
                                                                               scalar_t mu) {
  scalar_t s_g[kLaneCount] = {}, s_gc[kLaneCount] = {};
  int64_t j = 0;
  for (; j + kLaneCount <= D; j += kLaneCount) {
    for (int l = 0; l < kLaneCount; ++l) {
      const scalar_t g = gamma ? dy[j + l] * gamma[j + l] : dy[j + l];
      s_g[l] += g, s_gc[l] += g * (x[j + l] - mu);
    }
  }
  for (int l = 0; j + l < D; ++l) {  // the tail, one entry per lane
    const scalar_t g = gamma ? dy[j + l] * gamma[j + l] : dy[j + l];
    s_g[l] += g, s_gc[l] += g * (x[j + l] - mu);
  }
  return {static_cast<double>(fold_lanes(s_g)), static_cast<double>(fold_lanes(s_gc))};
}

// δx = σ⁻¹/D·(D·g − Σg − x̂·Σ(g·x̂)) = g·a + (x − μ)·k + c over one row, with a = σ⁻¹,
// k = −σ⁻³·Σ(g·(x − μ))/D, c = −σ⁻¹·Σg/D.
template <typename scalar_t>
__attribute__((always_inline)) inline void row_grad_input(const scalar_t* dy, const scalar_t* x, const scalar_t* gamma,
                                                          int64_t D, scalar_t mu, scalar_t a, scalar_t k, scalar_t c,
                                                          scalar_t* dx) {
  for (int64_t j = 0; j < D; ++j) {
    const scalar_t g = gamma ? dy[j] * gamma[j] : dy[j];
    dx[j] = g * a + (x[j] - mu) * k + c;
  }
}

// ∂J/∂γ_j += δy·x̂, ∂J/∂β_j += δy: one row's share of the column sums.
template <typename scalar_t>
__attribute__((always_inline)) inline void row_affine_grads(const scalar_t* dy, const scalar_t* x, int64_t D,
                                                            scalar_t mu, scalar_t is, scalar_t* s_w, scalar_t* s_b) {
  for (int64_t j = 0; j < D; ++j) {
    s_w[j] += dy[j] * ((x[j] - mu) * is);
    s_b[j] += dy[j];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "layer_norm_forward";
  check_rows(input, op, "input");
  const int64_t M = input.size(0), D = input.size(1);
  TORCH_CHECK(D > 0 || M == 0, op, ": rows must have at least one entry, got size ", input.sizes());
  const at::Tensor x = manualconv::contiguous(input);
  const auto g = vector_arg(weight, D, input, op, "weight");
  const auto b = vector_arg(bias, D, input, op, "bias");
  at::Tensor y = manualconv::empty_like(x), mean = manualconv::empty({M}, x.options()), invstd = manualconv::empty({M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_layer_norm_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t *gp = data_or_null<scalar_t>(g), *bp = data_or_null<scalar_t>(b);
    scalar_t *yp = y.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>(), *ip = invstd.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {
        for (int64_t m = begin; m < end; ++m) {
          const auto [mu, is] = row_statistics(xp + m * D, D, eps);
          mp[m] = static_cast<scalar_t>(mu), ip[m] = static_cast<scalar_t>(is);
          row_output(xp + m * D, D, mp[m], ip[m], gp, bp, yp + m * D);
        }
      });
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
  const at::Tensor x = manualconv::contiguous(input), dy = manualconv::contiguous(grad_output);
  const at::Tensor mu = mean.contiguous().to(input.scalar_type()), is = invstd.contiguous().to(input.scalar_type());
  const auto g = vector_arg(weight, D, input, op, "weight");
  at::Tensor grad_input = manualconv::empty_like(x);
  // without γ there is no affine map (and no β): ∂J/∂γ, ∂J/∂β are returned empty, not computed
  const int64_t affine = g ? D : 0;
  at::Tensor grad_weight = manualconv::empty({affine}, x.options()), grad_bias = manualconv::empty({affine}, x.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_layer_norm_backward", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t *mp = mu.const_data_ptr<scalar_t>(), *ip = is.const_data_ptr<scalar_t>();
    const scalar_t* gp = data_or_null<scalar_t>(g);
    scalar_t* dxp = grad_input.data_ptr<scalar_t>();
    // fixed chunks of rows, each with its own partial ∂J/∂γ, ∂J/∂β, added in chunk order below: the
    // result does not depend on the thread that ran a chunk
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M * D / 4096));
    std::vector<scalar_t> partial_w(chunks * affine, 0), partial_b(chunks * affine, 0);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      // the chunk's sums in the running thread's own buffers, copied out when the chunk is done:
      // adjacent chunks' sums in one shared array would share a cache line that both threads
      // write for every row (measured, Zen 4, 2 threads, 8192 rows of 384: 1.20 ms, no faster
      // than 1 thread; torch 0.77)
      std::vector<scalar_t> s_w(affine), s_b(affine);
      for (int64_t chunk = first; chunk < last; ++chunk) {
        std::fill(s_w.begin(), s_w.end(), scalar_t(0));
        std::fill(s_b.begin(), s_b.end(), scalar_t(0));
        run_for_cpu([&] {
          for (int64_t m = M * chunk / chunks; m < M * (chunk + 1) / chunks; ++m) {
            const scalar_t *row = xp + m * D, *d = dyp + m * D;
            const double is_m = ip[m];
            const auto [sum_g, sum_gc] = row_delta_sums(d, row, gp, D, mp[m]);
            row_grad_input(d, row, gp, D, mp[m], ip[m], static_cast<scalar_t>(-is_m * is_m * is_m * sum_gc / D),
                           static_cast<scalar_t>(-is_m * sum_g / D), dxp + m * D);
            if (affine) row_affine_grads(d, row, D, mp[m], ip[m], s_w.data(), s_b.data());
          }
        });
        std::copy(s_w.begin(), s_w.end(), partial_w.begin() + chunk * affine);
        std::copy(s_b.begin(), s_b.end(), partial_b.begin() + chunk * affine);
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
