// avg_pool2d: forward and backward.
//
//   forward   y[i, j]  = (1 / D(i, j)) · Σ_{(h, w) ∈ window(i, j)} x[h, w]
//   backward  δx[h, w] = Σ_{(i, j) : (h, w) ∈ window(i, j)} δy[i, j] / D(i, j)
//
// window(i, j) = rows [i·sH − pH, i·sH − pH + kH) × columns [j·sW − pW, j·sW − pW + kW), clipped
// to the image (the padding contributes zeros). The divisor D(i, j) is divisor_override if given,
// else the window size clipped to the padded image (count_include_pad) or to the image itself.
// Windows with no pixel inside the image give y = 0. NCHW: planes are spread over threads;
// channels-last (the output keeps the input's layout, geometry.h's output_layout): the forward
// spreads output rows (n, i), the backward input rows (n, h), each a whole row of pixels of C
// contiguous channels, computed channel-vector at a time.

#include "manualconv.h"
#include "pool_channels_last.h"
#include "output_cache.h"

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


// Channels-last kernels work on blocks of kChannelBlock channels: a block's running sums stay in
// registers through a whole window (one load per input, one store per output), where a loop over
// all C channels per window position would load and store the sums at every position. Measured
// (AMD EPYC Zen 4, AVX-512 build, 128×64×16×16, 3×3 s1 p1, 2 threads, best of 21, forward /
// backward): 1.37 / 1.11 ms with the all-channel loops, 0.47 / 0.82 ms in blocks (torch 0.89 /
// 1.09); the backward also divides each δy once (a ring of output rows), not once per input row.
constexpr int64_t kChannelBlock = 16;

// out[c] = finish(Σ_k in_k[c]) for the nk pixels in_k (summed in order), c ∈ [0, C): blocks of
// kChannelBlock channels summed in registers, then the tail. finish: the mean's division, or none.
template <typename scalar_t, typename Finish>
inline void channels_window_sum(const scalar_t* const* in, int64_t nk, int64_t C, const Finish& finish,
                                scalar_t* __restrict out) {
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
    scalar_t acc[kChannelBlock] = {};
    for (int64_t k = 0; k < nk; ++k) {
      const scalar_t* __restrict x = in[k] + c0;
      for (int64_t c = 0; c < kChannelBlock; ++c) acc[c] += x[c];
    }
    for (int64_t c = 0; c < kChannelBlock; ++c) out[c0 + c] = finish(acc[c]);
  }
  for (int64_t c = c0; c < C; ++c) {
    scalar_t acc = 0;
    for (int64_t k = 0; k < nk; ++k) acc += in[k][c];
    out[c] = finish(acc);
  }
}

// Channels-last forward, one output pixel (i, j) of one sample, all channels:
// y[i, j, :] = Σ_{(h, w) ∈ window(i, j)} x[h, w, :] / D(i, j), the positions summed in row-major
// window order as the plane loop sums them. taps is a kH·kW scratch of pixel pointers.
template <typename scalar_t>
void avg_pool2d_forward_pixel_channels_last(const scalar_t* x, const Pool2dGeometry& g,
                                            const Window& wh, const Window& ww, int64_t divisor,
                                            const scalar_t** taps, scalar_t* y_px) {
  const int64_t C = g.C;
  if (divisor == 0) {  // the window misses the image
    std::fill_n(y_px, C, scalar_t(0));
    return;
  }
  int64_t nk = 0;
  for (int64_t h = wh.lo; h < wh.hi; ++h) {
    for (int64_t w = ww.lo; w < ww.hi; ++w) taps[nk++] = x + (h * g.W + w) * C;
  }
  const scalar_t d = static_cast<scalar_t>(divisor);
  channels_window_sum(taps, nk, C, [d](scalar_t sum) { return sum / d; }, y_px);
}

// Channels-last forward: samples' output rows (n, i) are spread over threads.
template <typename scalar_t>
void avg_pool2d_forward_channels_last(const scalar_t* x, const Pool2dGeometry& g,
                                      bool count_include_pad,
                                      std::optional<int64_t> divisor_override, scalar_t* y) {
  const int64_t in_sample = g.H * g.W * g.C, out_row = g.W_out * g.C;
  at::parallel_for(0, g.N * g.H_out, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
      std::vector<const scalar_t*> taps(g.kH * g.kW);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / g.H_out, i = r % g.H_out;
        const Window wh = window_1d(i * g.sH - g.pH, g.kH, g.H, g.pH);
        for (int64_t j = 0; j < g.W_out; ++j) {
          const Window ww = window_1d(j * g.sW - g.pW, g.kW, g.W, g.pW);
          avg_pool2d_forward_pixel_channels_last(
              x + n * in_sample, g, wh, ww, avg_divisor(wh, ww, count_include_pad, divisor_override),
              taps.data(), y + r * out_row + j * g.C);
        }
      }
    });
  });
}

// The output indices [lo, hi) whose windows (start o·s − p, length k) hold input index h.
inline Range windows_holding(int64_t h, int64_t k, int64_t s, int64_t p, int64_t out) {
  return {std::max<int64_t>(0, ceil_div<int64_t>(std::max<int64_t>(h + p - k + 1, 0), s)),
          std::min(out, (h + p) / s + 1)};
}

// One output row's shares δy[i, j, :] / D(i, j), j ∈ [0, W_out) (0 where the window misses the
// image: it reaches no δx), computed once per row and reused by every input row its windows hold.
template <typename scalar_t>
void avg_pool2d_row_shares(const scalar_t* dy_row, const Pool2dGeometry& g, bool count_include_pad,
                           std::optional<int64_t> divisor_override, int64_t i, scalar_t* share) {
  const int64_t C = g.C;
  const Window wh = window_1d(i * g.sH - g.pH, g.kH, g.H, g.pH);
  for (int64_t j = 0; j < g.W_out; ++j) {
    const Window ww = window_1d(j * g.sW - g.pW, g.kW, g.W, g.pW);
    const int64_t divisor = avg_divisor(wh, ww, count_include_pad, divisor_override);
    if (divisor == 0) {
      std::fill_n(share + j * C, C, scalar_t(0));
    } else {
      channels_divide(dy_row + j * C, static_cast<scalar_t>(divisor), C, share + j * C);
    }
  }
}

// Channels-last backward, one input row h of one sample, gathered from the outputs whose windows
// hold it: δx[h, w, :] = Σ_{(i, j) : (h, w) ∈ window(i, j)} δy[i, j, :] / D(i, j), the terms
// added in output order (i, then j), as the scatter δx[window] += δy / D adds them.
// share_of(i) gives output row i's shares (avg_pool2d_row_shares); taps is a scratch of pointers.
template <typename scalar_t, typename Shares>
void avg_pool2d_backward_row_channels_last(const Pool2dGeometry& g, int64_t h, const Shares& share_of,
                                           const scalar_t** taps, scalar_t* dx_row) {
  const int64_t C = g.C;
  const Range ir = windows_holding(h, g.kH, g.sH, g.pH, g.H_out);
  for (int64_t w = 0; w < g.W; ++w) {
    const Range jr = windows_holding(w, g.kW, g.sW, g.pW, g.W_out);
    int64_t nk = 0;
    for (int64_t i = ir.lo; i < ir.hi; ++i) {
      const scalar_t* share = share_of(i);
      for (int64_t j = jr.lo; j < jr.hi; ++j) taps[nk++] = share + j * C;
    }
    channels_window_sum(taps, nk, C, [](scalar_t sum) { return sum; }, dx_row + w * C);
  }
}

// Channels-last backward: samples' input rows (n, h) are spread over threads (each row is
// written by one thread only). Each thread keeps the shares of the output rows its current input
// row needs in a ring of ⌈kH/sH⌉ + 1 rows (consecutive input rows need overlapping runs of at most
// ⌈kH/sH⌉ output rows, so a row is divided once, not once per input row it reaches).
template <typename scalar_t>
void avg_pool2d_backward_channels_last(const scalar_t* dy, const Pool2dGeometry& g,
                                       bool count_include_pad,
                                       std::optional<int64_t> divisor_override, scalar_t* dx) {
  const int64_t out_sample = g.H_out * g.W_out * g.C, out_row = g.W_out * g.C, in_row = g.W * g.C;
  const int64_t ring = ceil_div<int64_t>(g.kH, g.sH) + 1;
  at::parallel_for(0, g.N * g.H, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
      std::vector<scalar_t> shares(ring * out_row);
      std::vector<int64_t> held(ring, -1);  // which output row (n·H_out + i) each slot holds
      std::vector<const scalar_t*> taps(ceil_div<int64_t>(g.kH, g.sH) * ceil_div<int64_t>(g.kW, g.sW));
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / g.H, h = r % g.H;
        auto share_of = [&](int64_t i) -> const scalar_t* {
          const int64_t slot = i % ring, key = n * g.H_out + i;
          scalar_t* share = shares.data() + slot * out_row;
          if (held[slot] != key) {
            avg_pool2d_row_shares(dy + n * out_sample + i * out_row, g, count_include_pad, divisor_override, i,
                                  share);
            held[slot] = key;
          }
          return share;
        };
        avg_pool2d_backward_row_channels_last(g, h, share_of, taps.data(), dx + r * in_row);
      }
    });
  });
}

}  // namespace

// y = Σ window x / D
at::Tensor avg_pool2d_forward(Cpu, const at::Tensor& input, const Pool2dGeometry& g,
                              bool count_include_pad, std::optional<int64_t> divisor_override) {
  if (is_channels_last(input)) {
    at::Tensor y = manualconv::empty(g.output_size(),
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_avg_pool2d_forward_cl", [&] {
      avg_pool2d_forward_channels_last(input.const_data_ptr<scalar_t>(), g, count_include_pad,
                                       divisor_override, y.mutable_data_ptr<scalar_t>());
    });
    return y;
  }

  const at::Tensor x = manualconv::contiguous(input);
  at::Tensor y = manualconv::empty(g.output_size(), x.options());
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
  if (is_channels_last(grad_output)) {
    at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W},
                              grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "manualconv_avg_pool2d_backward_cl", [&] {
      avg_pool2d_backward_channels_last(grad_output.const_data_ptr<scalar_t>(), g,
                                        count_include_pad, divisor_override,
                                        dx.mutable_data_ptr<scalar_t>());
    });
    return dx;
  }
  const at::Tensor dy = manualconv::contiguous(grad_output);
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W}, dy.options());  // zeroed plane by plane below
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
