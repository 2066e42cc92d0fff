// Depthwise convolution (groups = C = O: one kH × kW filter per channel, mobilenet's and
// efficientnet's 3×3 and 5×5 layers), the layers select_conv2d_kernel (conv2d.cpp) gives it:
//
//   forward      y[n, i, j, c]  = b[c] + Σ_{a, b} x_pad[n, i·sH + a·dH, j·sW + b·dW, c] · W[c, a, b]
//   input grad   δx[n, h, w, c] = Σ_{a, b : h = i·sH + a·dH − pH, w = j·sW + b·dW − pW} δy[n, i, j, c] · W[c, a, b]
//   weight grad  ∂J/∂W[c, a, b] = Σ_{n, i, j} δy[n, i, j, c] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c]
//
// The im2col + GEMM path runs such a layer as C GEMMs of one output row each, 50–100× slower than
// torch's (mobilenet_v2's training step at 0.23 of torch's speed). Here every formula is a loop over
// the C contiguous channels of a pixel (channels-last: NCHW tensors are laid out channels-last for
// it and back), built for the kernels' capability (run_for_cpu), so the compiler vectorises it.
// As the GEMM path: the forward and the weight gradient multiply the zero padding too (a tap outside
// the image reads a row of zeros: 0·inf = NaN where im2col gives it), the input gradient gathers
// only the outputs that read the pixel (col2im never multiplies padding). The weight gradient sums
// each output row in the input's precision, the rows in double, per chunk of rows (one chunk per
// thread), the chunks in order.

#include "conv2d.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_capability.h"
#include "output_cache.h"

namespace manualconv {
namespace {

// W (C, 1, kH, kW) as (kH, kW, C): tap (a, b)'s C weights contiguous
at::Tensor taps_by_channel(const at::Tensor& weight, const Conv2dGeometry& g) {
  return weight.reshape({g.C, g.kH, g.kW}).permute({1, 2, 0}).contiguous();
}

// The pixel row x[h, w, :] of one channels-last sample, or `zeros` outside the image
template <typename scalar_t>
inline const scalar_t* pixel_or_zeros(const scalar_t* sample, const Conv2dGeometry& g, int64_t h, int64_t w,
                                      const scalar_t* zeros) {
  return h >= 0 && h < g.H && w >= 0 && w < g.W ? sample + (h * g.W + w) * g.C : zeros;
}

// Each formula below runs its channel loop innermost, over a pixel's C contiguous channels (an
// output row in L1 updated tap by tap). Holding a block of channels' sums in a fixed-size array
// across the taps instead measured 1.3-2.7× slower (AMD EPYC Zen 4: GCC 12 keeps the array on the
// stack between blocks; 144 channels @16, batch 32, one thread, 3.5 against 1.2 ms).

// y[n, i, :, :] (one output row, every channel)
template <typename scalar_t>
void forward_row(const scalar_t* x_n, const scalar_t* wt, const scalar_t* bias, const Conv2dGeometry& g, int64_t i,
                 const scalar_t* zeros, scalar_t* y_row) {
  const int64_t C = g.C;
  for (int64_t j = 0; j < g.W_out; ++j) {
    scalar_t* __restrict out = y_row + j * C;
    for (int64_t c = 0; c < C; ++c) out[c] = bias ? bias[c] : scalar_t(0);
    for (int64_t a = 0; a < g.kH; ++a) {
      for (int64_t b = 0; b < g.kW; ++b) {
        const scalar_t* __restrict in =
            pixel_or_zeros(x_n, g, i * g.sH + a * g.dH - g.pH, j * g.sW + b * g.dW - g.pW, zeros);
        const scalar_t* __restrict w = wt + (a * g.kW + b) * C;
        for (int64_t c = 0; c < C; ++c) out[c] += in[c] * w[c];
      }
    }
  }
}

// δx[n, h, :, :] (one input row, every channel): the outputs (i, j) whose tap (a, b) reads (h, w)
template <typename scalar_t>
void grad_input_row(const scalar_t* dy_n, const scalar_t* wt, const Conv2dGeometry& g, int64_t h, scalar_t* dx_row) {
  const int64_t C = g.C;
  for (int64_t w = 0; w < g.W; ++w) {
    scalar_t* __restrict out = dx_row + w * C;
    for (int64_t c = 0; c < C; ++c) out[c] = scalar_t(0);
    for (int64_t a = 0; a < g.kH; ++a) {
      const int64_t ti = h + g.pH - a * g.dH;  // = i·sH
      if (ti < 0 || ti % g.sH != 0 || ti / g.sH >= g.H_out) continue;
      for (int64_t b = 0; b < g.kW; ++b) {
        const int64_t tj = w + g.pW - b * g.dW;  // = j·sW
        if (tj < 0 || tj % g.sW != 0 || tj / g.sW >= g.W_out) continue;
        const scalar_t* __restrict d = dy_n + ((ti / g.sH) * g.W_out + tj / g.sW) * C;
        const scalar_t* __restrict k = wt + (a * g.kW + b) * C;
        for (int64_t c = 0; c < C; ++c) out[c] += d[c] * k[c];
      }
    }
  }
}

// row_sum[(a, b), c] = Σ_j δy[n, i, j, c] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c] (one output row)
template <typename scalar_t>
void grad_weight_row(const scalar_t* x_n, const scalar_t* dy_n, const Conv2dGeometry& g, int64_t i,
                     const scalar_t* zeros, scalar_t* row_sum) {
  const int64_t C = g.C;
  std::fill(row_sum, row_sum + g.kH * g.kW * C, scalar_t(0));
  for (int64_t j = 0; j < g.W_out; ++j) {
    const scalar_t* __restrict d = dy_n + (i * g.W_out + j) * C;
    for (int64_t a = 0; a < g.kH; ++a) {
      for (int64_t b = 0; b < g.kW; ++b) {
        const scalar_t* __restrict in =
            pixel_or_zeros(x_n, g, i * g.sH + a * g.dH - g.pH, j * g.sW + b * g.dW - g.pW, zeros);
        scalar_t* __restrict sum = row_sum + (a * g.kW + b) * C;
        for (int64_t c = 0; c < C; ++c) sum[c] += d[c] * in[c];
      }
    }
  }
}

at::Tensor channels_last(const at::Tensor& t) { return manualconv::contiguous(t, at::MemoryFormat::ChannelsLast); }

// The result in the layout of the op's input (channels-last or NCHW), as every conv kernel's
at::Tensor in_layout_of(const at::Tensor& result, const at::Tensor& like) {
  return is_channels_last(like) ? result : manualconv::contiguous(result);
}

}  // namespace

at::Tensor conv2d_forward_depthwise(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                    const Conv2dGeometry& g) {
  const at::Tensor x = channels_last(input);
  const at::Tensor wt = taps_by_channel(weight, g);
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = manualconv::empty(g.output_size(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_forward_depthwise", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* w_data = wt.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    const std::vector<scalar_t> zeros(g.C, scalar_t(0));
    at::parallel_for(0, g.N * g.H_out, 1, [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / g.H_out, i = r % g.H_out;
          forward_row(x_data + n * g.H * g.W * g.C, w_data, b_data, g, i, zeros.data(),
                      y_data + r * g.W_out * g.C);
        }
      });
    });
  });
  return in_layout_of(y, input);
}

at::Tensor conv2d_grad_input_depthwise(const at::Tensor& grad_output, const at::Tensor& weight,
                                       const Conv2dGeometry& g) {
  const at::Tensor dy = channels_last(grad_output);
  const at::Tensor wt = taps_by_channel(weight, g);
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W}, dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_conv2d_grad_input_depthwise", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const scalar_t* w_data = wt.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / g.H, h = r % g.H;
          grad_input_row(dy_data + n * g.H_out * g.W_out * g.C, w_data, g, h, dx_data + r * g.W * g.C);
        }
      });
    });
  });
  return in_layout_of(dx, grad_output);
}

at::Tensor conv2d_grad_weight_depthwise(const at::Tensor& input, const at::Tensor& grad_output,
                                        const Conv2dGeometry& g) {
  const at::Tensor x = channels_last(input), dy = channels_last(grad_output);
  const int64_t rows = g.N * g.H_out, taps = g.kH * g.kW * g.C;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<double> chunk_sums(chunks * taps, 0.0);  // per chunk of output rows, Σ in double
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_grad_weight_depthwise", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const std::vector<scalar_t> zeros(g.C, scalar_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t k_begin, int64_t k_end) {
      std::vector<scalar_t> row_sum(taps);
      for (int64_t k = k_begin; k < k_end; ++k) {
        double* __restrict total = chunk_sums.data() + k * taps;
        for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r) {
          const int64_t n = r / g.H_out, i = r % g.H_out;
          run_for_cpu([&] {
            grad_weight_row(x_data + n * g.H * g.W * g.C, dy_data + n * g.H_out * g.W_out * g.C, g, i,
                            zeros.data(), row_sum.data());
            for (int64_t t = 0; t < taps; ++t) total[t] += static_cast<double>(row_sum[t]);
          });
        }
      }
    });
  });
  // ∂J/∂W as (C, 1, kH, kW), from the chunks' (kH, kW, C) sums added in chunk order
  at::Tensor dw = manualconv::empty({g.C, 1, g.kH, g.kW},
                            x.options().memory_format(is_channels_last(input) ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_grad_weight_depthwise_total", [&] {
    scalar_t* out = dw.mutable_data_ptr<scalar_t>();  // (C, kH, kW) in memory either way (one input channel)
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t t = 0; t < g.kH * g.kW; ++t) {
        double s = 0;
        for (int64_t k = 0; k < chunks; ++k) s += chunk_sums[k * taps + t * g.C + c];
        out[c * g.kH * g.kW + t] = static_cast<scalar_t>(s);
      }
    }
  });
  return dw;
}

}  // namespace manualconv
