// Adaptive 2-D pooling: the output size is given and each output (i, j) pools the window
//   rows [⌊i·H/H_out⌋, ⌈(i+1)·H/H_out⌉) × columns [⌊j·W/W_out⌋, ⌈(j+1)·W/W_out⌉)
// (torch's boundaries; neighbouring windows may overlap by one row or column).
//
//   adaptive_max_pool2d_forward:  y = max over the window, argmax recorded as h·W + w
//                                 (its backward is max_pool2d_backward: δ routed to the argmax)
//   adaptive_avg_pool2d_forward:  y = Σ_window x / area
//   adaptive_avg_pool2d_backward: δx[h,w] = Σ_{windows ∋ (h,w)} δy[i,j] / area(i,j)
//
// NCHW: planes are spread over threads. Channels-last (the output keeps the input's layout,
// geometry.h's output_layout): the forwards spread output rows (n, i), the backward input rows
// (n, h), each a row of pixels of C contiguous channels, computed channel-vector at a time.

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "manualconv.h"
#include "pool_channels_last.h"
#include "output_cache.h"

namespace manualconv {

namespace {

int64_t window_start(int64_t i, int64_t in, int64_t out) { return (i * in) / out; }
int64_t window_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

// [window_start, window_end) of every output index along one dimension, computed once per call
// for the NCHW loops (their two divisions per output and plane cost more than a 1×1 pool's sum).
std::vector<Range> windows_1d(int64_t in, int64_t out) {
  std::vector<Range> w(out);
  for (int64_t i = 0; i < out; ++i) w[i] = {window_start(i, in, out), window_end(i, in, out)};
  return w;
}

// Σ_{k<n} x[k] in vector lanes (partial sums lane by lane, added at the end): still a sum of n
// terms (the same n·ε·Σ|x| error bound), but without a sequential sum's wait of one addition's
// latency per term. Measured (AMD EPYC Zen 4, one thread, CPU time, 128×256×8×8 → 1, forward):
// 1.22 ms with the sequential sum, 0.43-0.50 ms with 16 partial sums kept in an array, 0.47 ms
// with this (0.40 ms once the window bounds were computed once per call), torch's mean 0.19 ms.
template <typename scalar_t>
scalar_t lanes_sum(const scalar_t* __restrict x, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += x[k];
  return sum;
}

// Σ_{(h, w) ∈ [h0, h1) × [w0, w1)} x[h, w] of one plane; a window spanning whole rows is one
// contiguous run of (h1 − h0)·W values, summed at once.
template <typename scalar_t>
scalar_t window_sum(const scalar_t* x, int64_t W, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
  if (w0 == 0 && w1 == W) return lanes_sum(x + h0 * W, (h1 - h0) * W);
  scalar_t sum = 0;
  for (int64_t h = h0; h < h1; ++h) sum += lanes_sum(x + h * W + w0, w1 - w0);
  return sum;
}

// One plane's output (i, j): y = max over the window [h0, h1) × [w0, w1), idx = its argmax
// h·W + w, scanned in row-major order (ties keep the first; a NaN wins, the last one).
template <typename scalar_t>
void adaptive_max_pool2d_forward_window(const scalar_t* x, int64_t W, int64_t h0, int64_t h1,
                                        int64_t w0, int64_t w1, scalar_t& y, int64_t& idx) {
  scalar_t best = -std::numeric_limits<scalar_t>::infinity();
  int64_t best_index = h0 * W + w0;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const scalar_t v = x[h * W + w];
      const bool take = v > best || std::isnan(v);  // branch-free: selects, not jumps
      best = take ? v : best;
      best_index = take ? h * W + w : best_index;
    }
  }
  y = best;
  idx = best_index;
}

// Channels-last, one output pixel of one sample, all channels: y_px = max over the window
// [h0, h1) × [w0, w1), idx_px = its argmax h·W + w. The positions come in row-major order, so
// each channel gets the plane scan's result; the first one simply takes its values (what the
// scan's start (−∞, first position) updated by it gives). best_pos is a C-entry scratch.
template <typename scalar_t, typename index_t>
void adaptive_max_pool2d_forward_pixel_channels_last(const scalar_t* x, const AdaptiveGeometry& g,
                                                     int64_t h0, int64_t h1, int64_t w0,
                                                     int64_t w1, scalar_t* __restrict y_px,
                                                     int64_t* idx_px,
                                                     index_t* __restrict best_pos) {
  const int64_t C = g.C;
  std::copy(x + (h0 * g.W + w0) * C, x + (h0 * g.W + w0 + 1) * C, y_px);
  std::fill_n(best_pos, C, index_t(h0 * g.W + w0));
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = (h == h0 ? w0 + 1 : w0); w < w1; ++w) {
      channels_running_max(x + (h * g.W + w) * C, index_t(h * g.W + w), C, y_px, best_pos);
    }
  }
  std::copy(best_pos, best_pos + C, idx_px);
}

// Channels-last, one output pixel of one sample: y_px = Σ_window x / area (row-major order, as
// the plane loop sums). sum is a C-entry scratch.
template <typename scalar_t>
void adaptive_avg_pool2d_forward_pixel_channels_last(const scalar_t* x, const AdaptiveGeometry& g,
                                                     int64_t h0, int64_t h1, int64_t w0,
                                                     int64_t w1, scalar_t* sum, scalar_t* y_px) {
  const int64_t C = g.C;
  std::fill_n(sum, C, scalar_t(0));
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) channels_accumulate(x + (h * g.W + w) * C, C, sum);
  }
  channels_divide(sum, static_cast<scalar_t>((h1 - h0) * (w1 - w0)), C, y_px);
}

// Channels-last, one input row h of one sample, gathered from the windows that hold it:
// δx[h, w, :] = Σ_{(i, j) : (h, w) ∈ window(i, j)} δy[i, j, :] / area(i, j).
// share is a C-entry scratch holding δy[i, j, :] / area(i, j).
template <typename scalar_t>
void adaptive_avg_pool2d_backward_row_channels_last(const scalar_t* dy, const AdaptiveGeometry& g,
                                                    int64_t h, scalar_t* share,
                                                    scalar_t* dx_row) {
  const int64_t C = g.C;
  std::fill_n(dx_row, g.W * C, scalar_t(0));
  for (int64_t i = 0; i < g.H_out; ++i) {  // window rows start and end in increasing order
    const int64_t h0 = window_start(i, g.H, g.H_out), h1 = window_end(i, g.H, g.H_out);
    if (h0 > h) break;
    if (h >= h1) continue;
    for (int64_t j = 0; j < g.W_out; ++j) {
      const int64_t w0 = window_start(j, g.W, g.W_out), w1 = window_end(j, g.W, g.W_out);
      channels_divide(dy + (i * g.W_out + j) * C, static_cast<scalar_t>((h1 - h0) * (w1 - w0)),
                      C, share);
      for (int64_t w = w0; w < w1; ++w) channels_accumulate(share, C, dx_row + w * C);
    }
  }
}

}  // namespace

// y[i,j] = max over the adaptive window; ties keep the first maximum, a NaN wins (torch's rule)
std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(Cpu, const at::Tensor& input,
                                                               const AdaptiveGeometry& g) {
  if (is_channels_last(input) && g.H * g.W <= std::numeric_limits<int32_t>::max()) {
    const auto layout = input.options().memory_format(at::MemoryFormat::ChannelsLast);
    at::Tensor y = manualconv::empty(g.output_size(), layout);
    at::Tensor indices = manualconv::empty(g.output_size(), layout.dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_adaptive_max_pool2d_forward_cl", [&] {
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
      int64_t* idx_data = indices.mutable_data_ptr<int64_t>();
      // samples' output rows (n, i) are spread over threads
      at::parallel_for(0, g.N * g.H_out, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
        run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
          std::vector<int32_t> best_pos(g.C);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t n = r / g.H_out, i = r % g.H_out;
            const int64_t h0 = window_start(i, g.H, g.H_out), h1 = window_end(i, g.H, g.H_out);
            for (int64_t j = 0; j < g.W_out; ++j) {
              const int64_t w0 = window_start(j, g.W, g.W_out), w1 = window_end(j, g.W, g.W_out);
              const int64_t out = (r * g.W_out + j) * g.C;
              adaptive_max_pool2d_forward_pixel_channels_last(x + n * g.H * g.W * g.C, g, h0, h1, w0,
                                                              w1, y_data + out, idx_data + out,
                                                              best_pos.data());
            }
          }
        });
      });
    });
    return {y, indices};
  }
  const at::Tensor x = manualconv::contiguous(input);
  at::Tensor y = manualconv::empty({g.N, g.C, g.H_out, g.W_out}, x.options());
  at::Tensor indices = manualconv::empty({g.N, g.C, g.H_out, g.W_out}, x.options().dtype(at::kLong));
  const std::vector<Range> rows = windows_1d(g.H, g.H_out), cols = windows_1d(g.W, g.W_out);
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
          const auto [h0, h1] = rows[i];
          for (int64_t j = 0; j < g.W_out; ++j) {
            const auto [w0, w1] = cols[j];
            adaptive_max_pool2d_forward_window(xp, g.W, h0, h1, w0, w1, yp[i * g.W_out + j],
                                               ip[i * g.W_out + j]);
          }
        }
      }
    });
  });
  // (a channels-last input lands here only with planes of over 2³¹ pixels: the layout rule holds)
  const at::MemoryFormat layout = output_layout(input);
  return {manualconv::contiguous(y, layout), manualconv::contiguous(indices, layout)};
}

// y[i,j] = (Σ_window x) / area(i,j)
at::Tensor adaptive_avg_pool2d_forward(Cpu, const at::Tensor& input, const AdaptiveGeometry& g) {
  if (is_channels_last(input)) {
    at::Tensor y = manualconv::empty(g.output_size(),
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_adaptive_avg_pool2d_forward_cl", [&] {
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
      // samples' output rows (n, i) are spread over threads
      at::parallel_for(0, g.N * g.H_out, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
        run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
          std::vector<scalar_t> sum(g.C);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t n = r / g.H_out, i = r % g.H_out;
            const int64_t h0 = window_start(i, g.H, g.H_out), h1 = window_end(i, g.H, g.H_out);
            for (int64_t j = 0; j < g.W_out; ++j) {
              const int64_t w0 = window_start(j, g.W, g.W_out), w1 = window_end(j, g.W, g.W_out);
              adaptive_avg_pool2d_forward_pixel_channels_last(x + n * g.H * g.W * g.C, g, h0, h1,
                                                              w0, w1, sum.data(),
                                                              y_data + (r * g.W_out + j) * g.C);
            }
          }
        });
      });
    });
    return y;
  }
  const at::Tensor x = manualconv::contiguous(input);
  at::Tensor y = manualconv::empty({g.N, g.C, g.H_out, g.W_out}, x.options());
  const std::vector<Range> rows = windows_1d(g.H, g.H_out), cols = windows_1d(g.W, g.W_out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_adaptive_avg_pool2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), 1, [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {  // lanes_sum vectorised for the CPU's instruction set
        for (int64_t plane = begin; plane < end; ++plane) {
          const scalar_t* xp = x_data + plane * g.H * g.W;
          scalar_t* yp = y_data + plane * g.H_out * g.W_out;
          for (int64_t i = 0; i < g.H_out; ++i) {
            const auto [h0, h1] = rows[i];
            for (int64_t j = 0; j < g.W_out; ++j) {
              const auto [w0, w1] = cols[j];
              yp[i * g.W_out + j] = window_sum(xp, g.W, h0, h1, w0, w1) /
                                    static_cast<scalar_t>((h1 - h0) * (w1 - w0));
            }
          }
        }
      });
    });
  });
  return y;
}

// δx[h,w] = Σ_{windows (i,j) ∋ (h,w)} δy[i,j] / area(i,j): each delta spread evenly over its window
at::Tensor adaptive_avg_pool2d_backward(Cpu, const at::Tensor& grad_output,
                                        const AdaptiveGeometry& g) {
  if (is_channels_last(grad_output)) {
    at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W},
                              grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "manualconv_adaptive_avg_pool2d_backward_cl", [&] {
      const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
      scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
      // samples' input rows (n, h) are spread over threads (each row written by one thread only)
      at::parallel_for(0, g.N * g.H, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
        run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
          std::vector<scalar_t> share(g.C);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t n = r / g.H, h = r % g.H;
            adaptive_avg_pool2d_backward_row_channels_last(dy + n * g.H_out * g.W_out * g.C, g, h,
                                                           share.data(), dx_data + r * g.W * g.C);
          }
        });
      });
    });
    return dx;
  }
  const at::Tensor dy = manualconv::contiguous(grad_output);
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W}, dy.options());
  // windows that tile the image (H_out | H and W_out | W) hold each δx once: it is written, not
  // accumulated, and needs no zeroing first
  const bool tiles = g.H_out > 0 && g.W_out > 0 && g.H % g.H_out == 0 && g.W % g.W_out == 0;
  const std::vector<Range> rows = windows_1d(g.H, g.H_out), cols = windows_1d(g.W, g.W_out);
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_adaptive_avg_pool2d_backward", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), 1, [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {  // the spreading loops vectorised for the CPU's instruction set
        for (int64_t plane = begin; plane < end; ++plane) {
          const scalar_t* dyp = dy_data + plane * g.H_out * g.W_out;
          scalar_t* dxp = dx_data + plane * g.H * g.W;
          if (!tiles) std::fill_n(dxp, g.H * g.W, scalar_t(0));
          for (int64_t i = 0; i < g.H_out; ++i) {
            const auto [h0, h1] = rows[i];
            for (int64_t j = 0; j < g.W_out; ++j) {
              const auto [w0, w1] = cols[j];
              const scalar_t share =
                  dyp[i * g.W_out + j] / static_cast<scalar_t>((h1 - h0) * (w1 - w0));
              if (tiles && w0 == 0 && w1 == g.W) {  // whole rows: one contiguous run
                std::fill(dxp + h0 * g.W, dxp + h1 * g.W, share);
                continue;
              }
              for (int64_t h = h0; h < h1; ++h) {
                scalar_t* row = dxp + h * g.W;
                if (tiles) {
                  std::fill(row + w0, row + w1, share);
                } else {
                  for (int64_t w = w0; w < w1; ++w) row[w] += share;
                }
              }
            }
          }
        }
      });
    });
  });
  return dx;
}

}  // namespace manualconv
