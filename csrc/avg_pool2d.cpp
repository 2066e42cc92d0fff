// avg_pool2d: forward and backward.
//
//   forward   y[i, j]  = (1 / D(i, j)) · Σ_{(h, w) ∈ window(i, j)} x[h, w]
//   backward  δx[h, w] = Σ_{(i, j) : (h, w) ∈ window(i, j)} δy[i, j] / D(i, j)
//
// window(i, j) = rows [i·sH − pH, i·sH − pH + kH) × columns [j·sW − pW, j·sW − pW + kW), clipped
// to the image (the padding contributes zeros). The divisor D(i, j) is divisor_override if given,
// else the window size clipped to the padded image (count_include_pad) or to the image itself.
// Windows with no pixel inside the image give y = 0. Planes are spread over threads.

#include "manualconv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace manualconv {
namespace {

// The clipped extent [lo, hi) of the window starting at `start` along one dimension and the
// length it has in the padded image (used as the count_include_pad divisor).
struct Window {
  int64_t lo, hi, padded_len;
};
inline Window window_1d(int64_t start, int64_t k, int64_t in, int64_t pad) {
  const int64_t end = std::min(start + k, in + pad);
  return {std::max<int64_t>(start, 0), std::min(end, in), end - start};
}

// D(i, j): divisor_override, or the window size in the padded image / in the image.
// Returns 0 for a window that misses the image (its output is defined as 0).
inline int64_t avg_divisor(const Window& wh, const Window& ww, bool count_include_pad,
                           std::optional<int64_t> divisor_override) {
  if (wh.lo >= wh.hi || ww.lo >= ww.hi) return 0;
  if (divisor_override.has_value()) return *divisor_override;
  return count_include_pad ? wh.padded_len * ww.padded_len : (wh.hi - wh.lo) * (ww.hi - ww.lo);
}

// One plane: y[i, j] = Σ window(i, j) x / D(i, j).
// One output row at a time: the row accumulates x over every kernel offset (a, b) (the
// offsets reach each output in row-major order, as in the sequential sum), then is divided.
template <typename scalar_t>
void avg_pool2d_forward_plane(const scalar_t* x, const Pool2dGeometry& g, bool count_include_pad,
                              std::optional<int64_t> divisor_override, scalar_t* y) {
  const int64_t H = g.H, W = g.W, W_out = g.W_out;
  for (int64_t i = 0; i < g.H_out; ++i) {
    scalar_t* y_row = y + i * W_out;
    std::fill(y_row, y_row + W_out, scalar_t(0));
    const Window wh = window_1d(i * g.sH - g.pH, g.kH, H, g.pH);
    for (int64_t h = wh.lo; h < wh.hi; ++h) {
      for (int64_t b = 0; b < g.kW; ++b) {
        const int64_t w_off = b - g.pW;  // input column = j·sW + w_off
        const Range jr = g.valid_j[b];
        const scalar_t* in = x + h * W;
        strided_accumulate(in + jr.lo * g.sW + w_off, g.sW, jr.hi - jr.lo, y_row + jr.lo);
      }
    }
    for (int64_t j = 0; j < W_out; ++j) {
      const Window ww = window_1d(j * g.sW - g.pW, g.kW, W, g.pW);
      const int64_t divisor = avg_divisor(wh, ww, count_include_pad, divisor_override);
      y_row[j] = divisor == 0 ? scalar_t(0) : y_row[j] / static_cast<scalar_t>(divisor);
    }
  }
}

// One plane: δx = 0, then δx[h, w] += δy[i, j] / D(i, j) over each window.
// row_grad is a W_out scratch row holding δy[i, :] / D(i, :).
template <typename scalar_t>
void avg_pool2d_backward_plane(const scalar_t* dy, const Pool2dGeometry& g, bool count_include_pad,
                               std::optional<int64_t> divisor_override, scalar_t* row_grad,
                               scalar_t* dx) {
  const int64_t H = g.H, W = g.W, W_out = g.W_out;
  std::fill(dx, dx + H * W, scalar_t(0));
  for (int64_t i = 0; i < g.H_out; ++i) {
    const Window wh = window_1d(i * g.sH - g.pH, g.kH, H, g.pH);
    for (int64_t j = 0; j < W_out; ++j) {
      const Window ww = window_1d(j * g.sW - g.pW, g.kW, W, g.pW);
      const int64_t divisor = avg_divisor(wh, ww, count_include_pad, divisor_override);
      row_grad[j] = divisor == 0 ? scalar_t(0) : dy[i * W_out + j] / static_cast<scalar_t>(divisor);
    }
    for (int64_t h = wh.lo; h < wh.hi; ++h) {
      scalar_t* out = dx + h * W;
      for (int64_t b = 0; b < g.kW; ++b) {
        const int64_t w_off = b - g.pW;
        const Range jr = g.valid_j[b];
        strided_add(row_grad + jr.lo, jr.hi - jr.lo, out + jr.lo * g.sW + w_off, g.sW);
      }
    }
  }
}

}  // namespace

// y = Σ window x / D
at::Tensor avg_pool2d_forward(Cpu, const at::Tensor& input, const Pool2dGeometry& g,
                              bool count_include_pad, std::optional<int64_t> divisor_override) {

  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(g.output_size(), x.options());
  const int64_t in_plane = g.H * g.W, out_plane = g.H_out * g.W_out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_avg_pool2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        avg_pool2d_forward_plane(x_data + p * in_plane, g, count_include_pad, divisor_override,
                                 y_data + p * out_plane);
      }
    });
  });
  return y;
}

// δx[h, w] = Σ over the windows containing (h, w) of δy / D
at::Tensor avg_pool2d_backward(Cpu, const at::Tensor& grad_output, const Pool2dGeometry& g,
                               bool count_include_pad, std::optional<int64_t> divisor_override) {
  const at::Tensor dy = grad_output.contiguous();
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W}, dy.options());  // zeroed plane by plane below
  const int64_t in_plane = g.H * g.W, out_plane = g.H_out * g.W_out;

  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_avg_pool2d_backward", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row_grad(g.W_out);
      for (int64_t p = begin; p < end; ++p) {
        avg_pool2d_backward_plane(dy_data + p * out_plane, g, count_include_pad, divisor_override,
                                  row_grad.data(), dx_data + p * in_plane);
      }
    });
  });
  return dx;
}

}  // namespace manualconv
