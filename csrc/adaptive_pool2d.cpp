// Adaptive 2-D pooling: the output size is given and each output (i, j) pools the window
//   rows [⌊i·H/H_out⌋, ⌈(i+1)·H/H_out⌉) × columns [⌊j·W/W_out⌋, ⌈(j+1)·W/W_out⌉)
// (torch's boundaries; neighbouring windows may overlap by one row or column).
//
//   adaptive_max_pool2d_forward:  y = max over the window, argmax recorded as h·W + w
//                                 (its backward is max_pool2d_backward: δ routed to the argmax)
//   adaptive_avg_pool2d_forward:  y = Σ_window x / area
//   adaptive_avg_pool2d_backward: δx[h,w] = Σ_{windows ∋ (h,w)} δy[i,j] / area(i,j)

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <limits>

#include "manualconv.h"

namespace manualconv {

namespace {

int64_t window_start(int64_t i, int64_t in, int64_t out) { return (i * in) / out; }
int64_t window_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

}  // namespace

// y[i,j] = max over the adaptive window; ties keep the first maximum, a NaN wins (torch's rule)
std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(Cpu, const at::Tensor& input,
                                                               const AdaptiveGeometry& g) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.H_out, g.W_out}, x.options());
  at::Tensor indices = at::empty({g.N, g.C, g.H_out, g.W_out}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_adaptive_max_pool2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    int64_t* index_data = indices.data_ptr<int64_t>();
    at::parallel_for(0, g.planes(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* xp = x_data + plane * g.H * g.W;
        scalar_t* yp = y_data + plane * g.H_out * g.W_out;
        int64_t* ip = index_data + plane * g.H_out * g.W_out;
        for (int64_t i = 0; i < g.H_out; ++i) {
          const int64_t h0 = window_start(i, g.H, g.H_out), h1 = window_end(i, g.H, g.H_out);
          for (int64_t j = 0; j < g.W_out; ++j) {
            const int64_t w0 = window_start(j, g.W, g.W_out), w1 = window_end(j, g.W, g.W_out);
            scalar_t best = -std::numeric_limits<scalar_t>::infinity();
            int64_t best_index = h0 * g.W + w0;
            for (int64_t h = h0; h < h1; ++h) {
              for (int64_t w = w0; w < w1; ++w) {
                const scalar_t v = xp[h * g.W + w];
                if (v > best || std::isnan(v)) {
                  best = v;
                  best_index = h * g.W + w;
                }
              }
            }
            yp[i * g.W_out + j] = best;
            ip[i * g.W_out + j] = best_index;
          }
        }
      }
    });
  });
  return {y, indices};
}

// y[i,j] = (Σ_window x) / area(i,j)
at::Tensor adaptive_avg_pool2d_forward(Cpu, const at::Tensor& input, const AdaptiveGeometry& g) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.H_out, g.W_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_adaptive_avg_pool2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* xp = x_data + plane * g.H * g.W;
        scalar_t* yp = y_data + plane * g.H_out * g.W_out;
        for (int64_t i = 0; i < g.H_out; ++i) {
          const int64_t h0 = window_start(i, g.H, g.H_out), h1 = window_end(i, g.H, g.H_out);
          for (int64_t j = 0; j < g.W_out; ++j) {
            const int64_t w0 = window_start(j, g.W, g.W_out), w1 = window_end(j, g.W, g.W_out);
            scalar_t sum = 0;
            for (int64_t h = h0; h < h1; ++h) {
              for (int64_t w = w0; w < w1; ++w) sum += xp[h * g.W + w];
            }
            yp[i * g.W_out + j] = sum / static_cast<scalar_t>((h1 - h0) * (w1 - w0));
          }
        }
      }
    });
  });
  return y;
}

// δx[h,w] = Σ_{windows (i,j) ∋ (h,w)} δy[i,j] / area(i,j): each delta spread evenly over its window
at::Tensor adaptive_avg_pool2d_backward(Cpu, const at::Tensor& grad_output,
                                        const AdaptiveGeometry& g) {
  const at::Tensor dy = grad_output.contiguous();
  at::Tensor dx = at::zeros({g.N, g.C, g.H, g.W}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_adaptive_avg_pool2d_backward", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* dyp = dy_data + plane * g.H_out * g.W_out;
        scalar_t* dxp = dx_data + plane * g.H * g.W;
        for (int64_t i = 0; i < g.H_out; ++i) {
          const int64_t h0 = window_start(i, g.H, g.H_out), h1 = window_end(i, g.H, g.H_out);
          for (int64_t j = 0; j < g.W_out; ++j) {
            const int64_t w0 = window_start(j, g.W, g.W_out), w1 = window_end(j, g.W, g.W_out);
            const scalar_t share = dyp[i * g.W_out + j] / static_cast<scalar_t>((h1 - h0) * (w1 - w0));
            for (int64_t h = h0; h < h1; ++h) {
              for (int64_t w = w0; w < w1; ++w) dxp[h * g.W + w] += share;
            }
          }
        }
      }
    });
  });
  return dx;
}

}  // namespace manualconv
