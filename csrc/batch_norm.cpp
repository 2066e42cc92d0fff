// batch_norm: per-channel batch statistics, the normalising affine map, and the derived backward.
//
//   statistics  μ_c = Σ x / N,  var_c = Σ (x − μ_c)² / N     over the N = n·H·W entries of channel c
//   apply       y = γ_c·(x − μ_c)·σ⁻¹_c + β_c  =  x·a_c + b_c,  a_c = γ_c·σ⁻¹_c,  b_c = β_c − μ_c·a_c
//   backward    training (μ, σ the batch's own):
//                 δx = γ_c·σ⁻¹_c/N · (N·δy − Σδy − x̂·Σ(δy·x̂)),   x̂ = (x − μ_c)·σ⁻¹_c
//               eval (μ, σ the running statistics, constants):  δx = γ_c·σ⁻¹_c·δy
//               both: ∂J/∂γ_c = Σ δy·x̂,  ∂J/∂β_c = Σ δy
//
// Statistics in one pass (normalization.h): Σx for μ, and Σ(x − K), Σ(x − K)² about K = the
// channel's first entry for the variance, accumulated in double.
// Layouts: NCHW (each channel is n contiguous planes of H·W: channels are spread over threads)
// and channels-last NHWC (each pixel is a contiguous row of C channels: rows are spread over
// threads, each chunk of rows keeps its own per-channel sums, added in chunk order). Outputs
// have the input's layout. float32 and float64.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "normalization.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace manualconv {
namespace {

// ---------------------------------------------------------------------------------------------
// Arguments

// The (n, C, H, W) map as a dense tensor of one of the two layouts (a copy only for other strides).
at::Tensor dense_map(const at::Tensor& t, bool nhwc) {
  return t.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// A per-channel vector: C entries of the input's dtype (made contiguous).
at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& input, const char* op,
                          const char* name) {
  TORCH_CHECK(v.defined() && v.device().is_cpu(), op, ": ", name, " must be a defined CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == input.size(1), op, ": ", name, " must have size [",
              input.size(1), "] (one entry per channel), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", v.scalar_type());
  return v.contiguous();
}

// Where channel c's entries are: NCHW, plane (n, c) starts at (n·C + c)·P and is P = H·W long;
// NHWC, pixel r (of N·P) holds its C channels at r·C.
struct Map {
  int64_t n, C, P;
  bool nhwc;
  int64_t entries() const { return n * P; }  // per channel
};

Map map_of(const at::Tensor& t, bool nhwc) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), nhwc};
}

// Chunks of NHWC pixel rows, one per thread, each with its own partial sums.
int64_t row_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 64));
}

// ---------------------------------------------------------------------------------------------
// Statistics

template <typename scalar_t>
void statistics_kernel(const scalar_t* x, const Map& m, scalar_t* mean, scalar_t* var) {
  const int64_t count = m.entries();
  if (count == 0) {  // no entries: 0/0, as the plain sums give
    for (int64_t c = 0; c < m.C; ++c) mean[c] = var[c] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  auto finish = [&](int64_t c, const ShiftedSums& s) {
    const auto [mu, v] = mean_and_var(s, count);
    mean[c] = static_cast<scalar_t>(mu);
    var[c] = static_cast<scalar_t>(v);
  };
  if (!m.nhwc) {
    at::parallel_for(0, m.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const double K = x[c * m.P];
        ShiftedSums s;
        for (int64_t i = 0; i < m.n; ++i) add_contiguous(s, x + (i * m.C + c) * m.P, m.P, K);
        finish(c, s);
      }
    });
    return;
  }
  // per chunk of rows, the three sums of every channel in separate arrays (so the loop over a
  // row's contiguous channels vectorizes), each channel's entries added in row order
  const int64_t rows = m.entries(), chunks = row_chunks(rows), C = m.C;
  std::vector<double> K(x, x + C);  // K = pixel 0's value
  std::vector<double> sum(chunks * C, 0.0), shifted(chunks * C, 0.0), shifted_sq(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double *S = sum.data() + k * C, *D = shifted.data() + k * C, *Q = shifted_sq.data() + k * C;
      const double* shift = K.data();
      run_for_cpu([&] {
        for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r) {
          const scalar_t* row = x + r * C;
          for (int64_t c = 0; c < C; ++c) {
            const double v = row[c], d = v - shift[c];
            S[c] += v, D[c] += d, Q[c] += d * d;
          }
        }
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    ShiftedSums total;
    for (int64_t k = 0; k < chunks; ++k) {
      total.merge({sum[k * C + c], shifted[k * C + c], shifted_sq[k * C + c]});
    }
    finish(c, total);
  }
}

// ---------------------------------------------------------------------------------------------
// y = x·a_c + b_c (the apply step)

template <typename scalar_t>
void channel_affine_kernel(const scalar_t* x, const Map& m, const scalar_t* a, const scalar_t* b,
                           scalar_t* y) {
  if (!m.nhwc) {
    at::parallel_for(0, m.n * m.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % m.C;
        const scalar_t ac = a[c], bc = b[c];
        const scalar_t* in = x + plane * m.P;
        scalar_t* out = y + plane * m.P;
        for (int64_t p = 0; p < m.P; ++p) out[p] = in[p] * ac + bc;
      }
    });
    return;
  }
  at::parallel_for(0, m.entries(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* in = x + r * m.C;
      scalar_t* out = y + r * m.C;
      for (int64_t c = 0; c < m.C; ++c) out[c] = in[c] * a[c] + b[c];
    }
  });
}

// a_c = γ_c·σ⁻¹_c, b_c = β_c − μ_c·a_c (γ = 1, β = 0 when absent), in double, rounded once.
template <typename scalar_t>
void affine_coefficients(const at::Tensor& mean, const at::Tensor& invstd,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         std::vector<scalar_t>& a, std::vector<scalar_t>& b) {
  const int64_t C = mean.size(0);
  const scalar_t* mu = mean.const_data_ptr<scalar_t>();
  const scalar_t* is = invstd.const_data_ptr<scalar_t>();
  const scalar_t* g = weight ? weight->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* be = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  a.resize(C), b.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t ac = g ? static_cast<scalar_t>(g[c] * is[c]) : is[c];
    a[c] = ac;
    b[c] = (be ? be[c] : scalar_t(0)) - mu[c] * ac;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Σδy and Σ δy·x̂ of one channel.
struct DeltaSums {
  double dy = 0, dy_xhat = 0;
};

// Adds n contiguous entries of one channel to its sums, in four independent lanes; with dx, also
// writes eval mode's δx = δy·a (a = γσ⁻¹) in the same pass.
template <typename scalar_t>
void add_delta_run(DeltaSums& s, const scalar_t* dy, const scalar_t* x, int64_t n, double mu, double is,
                   scalar_t* dx, scalar_t a) {
  double s_dy[4] = {0, 0, 0, 0}, s_dy_xhat[4] = {0, 0, 0, 0};
  auto add = [&](int64_t p, int l) {
    const double d = dy[p];
    s_dy[l] += d;
    s_dy_xhat[l] += d * ((x[p] - mu) * is);
  };
  int64_t p = 0;
  for (; p + 4 <= n; p += 4) {
    for (int l = 0; l < 4; ++l) add(p + l, l);
  }
  for (; p < n; ++p) add(p, 0);
  for (int l = 0; l < 4; ++l) s.dy += s_dy[l], s.dy_xhat += s_dy_xhat[l];
  if (dx) {
    for (int64_t q = 0; q < n; ++q) dx[q] = dy[q] * a;
  }
}

// Σδy and Σδy·x̂ per channel; with dx (eval mode), δx = δy·a_c written in the same pass.
template <typename scalar_t>
std::vector<DeltaSums> delta_sums(const scalar_t* dy, const scalar_t* x, const Map& m,
                                  const scalar_t* mean, const scalar_t* invstd, scalar_t* dx,
                                  const scalar_t* a) {
  std::vector<DeltaSums> sums(m.C);
  if (!m.nhwc) {
    at::parallel_for(0, m.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t i = 0; i < m.n; ++i) {
          const int64_t offset = (i * m.C + c) * m.P;
          add_delta_run(sums[c], dy + offset, x + offset, m.P, mean[c], invstd[c],
                        dx ? dx + offset : nullptr, dx ? a[c] : scalar_t(0));
        }
      }
    });
    return sums;
  }
  // per chunk of rows, Σδy and Σδy·x̂ of every channel in separate arrays (the loop over a row's
  // contiguous channels vectorizes), each channel's entries added in row order
  const int64_t rows = m.entries(), chunks = row_chunks(rows), C = m.C;
  std::vector<double> mu(mean, mean + C), is(invstd, invstd + C);
  std::vector<double> s_dy(chunks * C, 0.0), s_dy_xhat(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double *Sd = s_dy.data() + k * C, *Sx = s_dy_xhat.data() + k * C;
      const double *M = mu.data(), *I = is.data();
      run_for_cpu([&] {
        for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r) {
          const scalar_t *dy_row = dy + r * C, *x_row = x + r * C;
          for (int64_t c = 0; c < C; ++c) {
            const double d = dy_row[c];
            Sd[c] += d;
            Sx[c] += d * ((x_row[c] - M[c]) * I[c]);
          }
          if (dx) {
            for (int64_t c = 0; c < C; ++c) dx[r * C + c] = dy_row[c] * a[c];
          }
        }
      });
    }
  });
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      sums[c].dy += s_dy[k * C + c];
      sums[c].dy_xhat += s_dy_xhat[k * C + c];
    }
  }
  return sums;
}

// training: δx = (δy − Σδy/N − (x − μ)·σ⁻¹·Σ(δy·x̂)/N)·γσ⁻¹
//   (the derived formula with x̂ = (x − μ)·σ⁻¹), as (x − μ)·u_c + δy·v_c + w_c
template <typename scalar_t>
void training_grad_input(const scalar_t* dy, const scalar_t* x, const Map& m, const scalar_t* mean,
                         const scalar_t* invstd, const scalar_t* weight,
                         const std::vector<DeltaSums>& sums, scalar_t* dx) {
  const int64_t count = m.entries();
  std::vector<scalar_t> u(m.C), v(m.C), w(m.C);
  for (int64_t c = 0; c < m.C; ++c) {
    const double is = invstd[c], scale = (weight ? static_cast<double>(weight[c]) : 1.0) * is;
    const double k = sums[c].dy_xhat * is / count, mean_dy = sums[c].dy / count;
    u[c] = static_cast<scalar_t>(-k * scale);
    v[c] = static_cast<scalar_t>(scale);
    w[c] = static_cast<scalar_t>(-mean_dy * scale);
  }
  auto body = [&](int64_t offset, int64_t c, int64_t len, int64_t step) {
    const scalar_t mu = mean[c];
    for (int64_t e = 0; e < len; ++e) {
      const int64_t i = offset + e * step;
      dx[i] = (x[i] - mu) * u[c] + dy[i] * v[c] + w[c];
    }
  };
  if (!m.nhwc) {
    at::parallel_for(0, m.n * m.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) body(plane * m.P, plane % m.C, m.P, 1);
    });
    return;
  }
  at::parallel_for(0, m.entries(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < m.C; ++c) body(r * m.C + c, c, 1, 1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Operators

std::tuple<at::Tensor, at::Tensor> batch_norm_statistics(const at::Tensor& input) {
  const char* op = "batch_norm_statistics";
  check_map(input, op, "input");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = dense_map(input, nhwc);
  at::Tensor mean = at::empty({input.size(1)}, input.options());
  at::Tensor var = at::empty({input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_batch_norm_statistics", [&] {
    statistics_kernel(x.const_data_ptr<scalar_t>(), map_of(x, nhwc), mean.data_ptr<scalar_t>(),
                      var.data_ptr<scalar_t>());
  });
  return {mean, var};
}

at::Tensor batch_norm_apply(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "batch_norm_apply";
  check_map(input, op, "input");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = dense_map(input, nhwc);
  const at::Tensor mu = channel_vector(mean, input, op, "mean");
  const at::Tensor is = channel_vector(invstd, input, op, "invstd");
  std::optional<at::Tensor> g, b;
  if (weight && weight->defined()) g = channel_vector(*weight, input, op, "weight");
  if (bias && bias->defined()) b = channel_vector(*bias, input, op, "bias");
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_batch_norm_apply", [&] {
    std::vector<scalar_t> a, shift;
    affine_coefficients<scalar_t>(mu, is, g, b, a, shift);
    channel_affine_kernel(x.const_data_ptr<scalar_t>(), map_of(x, nhwc), a.data(), shift.data(),
                          y.data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool training) {
  const char* op = "batch_norm_backward";
  check_map(input, op, "input");
  check_map(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output must have the input's size ",
              input.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op,
              ": grad_output must have the input's dtype");
  const bool nhwc = is_channels_last(input);
  const at::Tensor x = dense_map(input, nhwc), dy = dense_map(grad_output, nhwc);
  const at::Tensor mu = channel_vector(mean, input, op, "mean");
  const at::Tensor is = channel_vector(invstd, input, op, "invstd");
  std::optional<at::Tensor> g;
  if (weight && weight->defined()) g = channel_vector(*weight, input, op, "weight");
  const int64_t C = input.size(1);
  at::Tensor grad_input = at::empty_like(x);
  at::Tensor grad_weight = at::empty({C}, input.options()), grad_bias = at::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_batch_norm_backward", [&] {
    const Map m = map_of(x, nhwc);
    const scalar_t* mu_p = mu.const_data_ptr<scalar_t>();
    const scalar_t* is_p = is.const_data_ptr<scalar_t>();
    const scalar_t* g_p = g ? g->const_data_ptr<scalar_t>() : nullptr;
    // eval: δx = δy·a_c, a_c = γ_c·σ⁻¹_c, written during the pass that sums δy and δy·x̂
    std::vector<scalar_t> a(C);
    for (int64_t c = 0; c < C; ++c) a[c] = g_p ? static_cast<scalar_t>(g_p[c] * is_p[c]) : is_p[c];
    scalar_t* eval_dx = training ? nullptr : grad_input.data_ptr<scalar_t>();
    const std::vector<DeltaSums> sums =
        delta_sums(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m, mu_p, is_p, eval_dx, a.data());
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      gw[c] = static_cast<scalar_t>(sums[c].dy_xhat);  // Σ δy·x̂
      gb[c] = static_cast<scalar_t>(sums[c].dy);       // Σ δy
    }
    if (training) {
      training_grad_input(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m, mu_p, is_p, g_p,
                          sums, grad_input.data_ptr<scalar_t>());
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("batch_norm_statistics(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_apply(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) "
      "-> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("batch_norm_statistics", &manualconv::batch_norm_statistics);
  m.impl("batch_norm_apply", &manualconv::batch_norm_apply);
  m.impl("batch_norm_backward", &manualconv::batch_norm_backward);
}
