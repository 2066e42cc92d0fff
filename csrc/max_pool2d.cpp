// max_pool2d: forward (values and argmax indices) and backward.
//
//   forward   y[i, j] = max_{(h, w) ∈ window(i, j)} x[h, w],   idx[i, j] = h·W + w of that max
//   backward  δx[h, w] = Σ_{(i, j) : idx[i, j] = h·W + w} δy[i, j]
//
// window(i, j) = {(i·sH − pH + a·dH, j·sW − pW + b·dW) : 0 ≤ a < kH, 0 ≤ b < kW}, restricted to
// the image (padding never wins). Ties keep the first maximum in row-major window order; a NaN
// beats every number and the last NaN in the window wins (torch's CPU semantics).
// Each (n, c) plane is independent: planes are spread over threads, each plane is one thread.

#include "manualconv.h"
#include "pool_channels_last.h"
#include "output_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace manualconv {
namespace {

// Running maximum over one window offset for a run of outputs: output j (lo ≤ j < hi) reads
// position p = start + j·stride; it takes the value if it is larger than the best so far or NaN.
// (__restrict: the three arrays never overlap, which lets the compiler vectorise the loop.)
template <typename scalar_t, typename index_t, typename stride_t>
inline void update_running_max(const scalar_t* __restrict x, index_t start, stride_t stride,
                               Range jr, scalar_t* __restrict best,
                               index_t* __restrict best_pos) {
  for (int64_t j = jr.lo; j < jr.hi; ++j) {
    const index_t p = start + index_t(j * stride);
    const scalar_t v = x[p];
    const bool take = v > best[j] || std::isnan(v);
    best[j] = take ? v : best[j];
    best_pos[j] = take ? p : best_pos[j];
  }
}

// One plane: y[i, j] = max over window(i, j) of x, idx[i, j] = argmax as h·W + w.
// Computed one output row at a time: the row is initialised to (−∞, first position inside the
// window), then every window offset (a, b) updates the whole row; for each output the offsets
// arrive in row-major order, so the result is exactly the sequential scan's. Positions are
// tracked as index_t (int32 when the plane is small enough: all-32-bit loops vectorise) in the
// scratch row best_pos and widened to int64 at the end of each row.
template <typename scalar_t, typename index_t>
void max_pool2d_forward_plane(const scalar_t* x, const Pool2dGeometry& g, scalar_t* y,
                              int64_t* idx, index_t* best_pos) {
  const int64_t H = g.H, W = g.W, W_out = g.W_out;
  for (int64_t i = 0; i < g.H_out; ++i) {
    scalar_t* y_row = y + i * W_out;
    const int64_t h_start = i * g.sH - g.pH;
    const int64_t h_first = first_inside(h_start, g.dH);
    for (int64_t j = 0; j < W_out; ++j) {
      y_row[j] = -std::numeric_limits<scalar_t>::infinity();
      best_pos[j] = index_t(h_first * W + first_inside(j * g.sW - g.pW, g.dW));
    }
    for (int64_t a = 0; a < g.kH; ++a) {
      const int64_t h = h_start + a * g.dH;
      if (h < 0 || h >= H) continue;
      for (int64_t b = 0; b < g.kW; ++b) {
        const int64_t w_off = b * g.dW - g.pW;  // input column = j·sW + w_off
        const Range jr = g.valid_j[b];
        // position read by output j = 0 (h·W + w_off; may be < 0, but then j = 0 is not in jr)
        const index_t start = index_t(h * W + w_off);
        dispatch_stride(g.sW, [&](auto sW) {
          update_running_max(x, start, sW, jr, y_row, best_pos);
        });
      }
    }
    std::copy(best_pos, best_pos + W_out, idx + i * W_out);
  }
}

// One plane: δx = 0, then δx[idx[k]] += δy[k] for every output k (in output order).
// Returns false if an index is outside [0, H·W) (it is skipped, never written).
template <typename scalar_t>
bool max_pool2d_backward_plane(const scalar_t* dy, const int64_t* idx, int64_t out_numel,
                               int64_t in_numel, scalar_t* dx) {
  std::fill(dx, dx + in_numel, scalar_t(0));
  bool ok = true;
  for (int64_t k = 0; k < out_numel; ++k) {
    const int64_t pos = idx[k];
    if (pos < 0 || pos >= in_numel) {
      ok = false;
      continue;
    }
    dx[pos] += dy[k];
  }
  return ok;
}

// Channels-last: one output pixel of one sample, all channels at once. y_px and best_pos hold C
// entries; every window position (h, w) updates them with the C contiguous values x[h, w, :],
// in row-major window order, so each channel gets exactly the plane scan's result. A window
// with no position inside the image gives the plane scan's (−∞, first tap at or past the corner).
template <typename scalar_t, typename index_t>
void max_pool2d_forward_pixel_channels_last(const scalar_t* x, const Pool2dGeometry& g,
                                            int64_t i, int64_t j, scalar_t* __restrict y_px,
                                            int64_t* idx_px, index_t* __restrict best_pos) {
  const int64_t C = g.C;
  bool first = true;
  for (int64_t a = 0; a < g.kH; ++a) {
    const int64_t h = i * g.sH - g.pH + a * g.dH;
    if (h < 0 || h >= g.H) continue;
    for (int64_t b = 0; b < g.kW; ++b) {
      const int64_t w = j * g.sW - g.pW + b * g.dW;
      if (w < 0 || w >= g.W) continue;
      const index_t p = index_t(h * g.W + w);
      const scalar_t* __restrict x_px = x + (h * g.W + w) * C;
      if (first) {  // the first position inside the window: (−∞, p) updated by it is (x, p)
        for (int64_t c = 0; c < C; ++c) y_px[c] = x_px[c], best_pos[c] = p;
        first = false;
        continue;
      }
      channels_running_max(x_px, p, C, y_px, best_pos);
    }
  }
  if (first) {  // the window lies entirely in the padding
    const int64_t p = first_inside(i * g.sH - g.pH, g.dH) * g.W + first_inside(j * g.sW - g.pW, g.dW);
    std::fill_n(y_px, C, -std::numeric_limits<scalar_t>::infinity());
    std::fill_n(idx_px, C, p);
    return;
  }
  std::copy(best_pos, best_pos + C, idx_px);
}

// Channels-last forward: samples' output rows (n, i) are spread over threads.
template <typename scalar_t>
void max_pool2d_forward_channels_last(const scalar_t* x, const Pool2dGeometry& g, scalar_t* y,
                                      int64_t* idx) {
  const int64_t in_sample = g.H * g.W * g.C, out_row = g.W_out * g.C;
  at::parallel_for(0, g.N * g.H_out, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
      std::vector<int32_t> best_pos(g.C);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / g.H_out, i = r % g.H_out;
        for (int64_t j = 0; j < g.W_out; ++j) {
          const int64_t out = r * out_row + j * g.C;
          max_pool2d_forward_pixel_channels_last(x + n * in_sample, g, i, j, y + out, idx + out,
                                                 best_pos.data());
        }
      }
    });
  });
}

// Channels-last backward, per sample: δx[idx[k, c], c] += δy[k, c] for every output pixel k.
// Returns false if an index is outside [0, H·W) (it is skipped, never written).
template <typename scalar_t>
bool max_pool2d_backward_sample_channels_last(const scalar_t* dy, const int64_t* idx,
                                              int64_t out_pixels, int64_t in_pixels, int64_t C,
                                              scalar_t* dx) {
  std::fill(dx, dx + in_pixels * C, scalar_t(0));
  bool ok = true;
  for (int64_t k = 0; k < out_pixels; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t pos = idx[k * C + c];
      if (pos < 0 || pos >= in_pixels) {
        ok = false;
        continue;
      }
      dx[pos * C + c] += dy[k * C + c];
    }
  }
  return ok;
}

}  // namespace

// y = max over each window of x;  indices = argmax (flattened h·W + w in its plane)
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(Cpu, const at::Tensor& input,
                                                      const Pool2dGeometry& g) {
  if (is_channels_last(input) && g.H * g.W <= std::numeric_limits<int32_t>::max()) {
    const auto layout = input.options().memory_format(at::MemoryFormat::ChannelsLast);
    at::Tensor y = manualconv::empty(g.output_size(), layout);
    at::Tensor indices = manualconv::empty(g.output_size(), layout.dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "manualconv_max_pool2d_forward_cl", [&] {
      max_pool2d_forward_channels_last(input.const_data_ptr<scalar_t>(), g,
                                       y.mutable_data_ptr<scalar_t>(),
                                       indices.mutable_data_ptr<int64_t>());
    });
    return {y, indices};
  }
  const at::Tensor x = manualconv::contiguous(input);
  at::Tensor y = manualconv::empty(g.output_size(), x.options());
  at::Tensor indices = manualconv::empty(g.output_size(), x.options().dtype(at::kLong));
  const int64_t in_plane = g.H * g.W, out_plane = g.H_out * g.W_out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_max_pool2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    int64_t* idx_data = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, g.planes(), /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      auto run = [&](auto* best_pos) {
        for (int64_t p = begin; p < end; ++p) {
          max_pool2d_forward_plane(x_data + p * in_plane, g, y_data + p * out_plane,
                                   idx_data + p * out_plane, best_pos);
        }
      };
      if (in_plane <= std::numeric_limits<int32_t>::max()) {
        std::vector<int32_t> best_pos(g.W_out);
        run(best_pos.data());
      } else {
        std::vector<int64_t> best_pos(g.W_out);
        run(best_pos.data());
      }
    });
  });
  // (a channels-last input lands here only with planes of over 2³¹ pixels: the layout rule holds)
  const at::MemoryFormat layout = output_layout(input);
  return {manualconv::contiguous(y, layout), manualconv::contiguous(indices, layout)};
}

// δx[idx] += δy   (scatter of each output gradient to the position of its maximum)
at::Tensor max_pool2d_backward(Cpu, const at::Tensor& grad_output, const at::Tensor& indices,
                               at::IntArrayRef input_size) {
  constexpr const char* op = "manualconv::max_pool2d_backward";

  const int64_t planes = input_size[0] * input_size[1];
  const int64_t in_plane = input_size[2] * input_size[3];
  const int64_t out_plane = grad_output.size(2) * grad_output.size(3);
  std::atomic<bool> all_in_range{true};

  if (output_layout(grad_output, indices) == at::MemoryFormat::ChannelsLast) {
    at::Tensor dx =
        manualconv::empty(input_size, grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
    const int64_t C = input_size[1];
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "manualconv_max_pool2d_backward_cl", [&] {
      const scalar_t* dy_data = grad_output.const_data_ptr<scalar_t>();
      const int64_t* idx_data = indices.const_data_ptr<int64_t>();
      scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, input_size[0], /*grain_size=*/1, [&](int64_t begin, int64_t end) {
        run_for_cpu([&] {  // the AVX-512 or the baseline build (pool_channels_last.h)
          for (int64_t n = begin; n < end; ++n) {
            if (!max_pool2d_backward_sample_channels_last(
                    dy_data + n * out_plane * C, idx_data + n * out_plane * C, out_plane, in_plane,
                    C, dx_data + n * in_plane * C)) {
              all_in_range = false;
            }
          }
        });
      });
    });
    TORCH_CHECK(all_in_range, op, ": indices must lie in [0, H*W) = [0, ", in_plane,
                ") of input_size ", input_size, " (found an out-of-range index)");
    return dx;
  }

  const at::Tensor dy = manualconv::contiguous(grad_output);
  const at::Tensor idx = manualconv::contiguous(indices);
  at::Tensor dx = manualconv::empty(input_size, dy.options());  // zeroed plane by plane below
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_max_pool2d_backward", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const int64_t* idx_data = idx.const_data_ptr<int64_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (!max_pool2d_backward_plane(dy_data + p * out_plane, idx_data + p * out_plane,
                                       out_plane, in_plane, dx_data + p * in_plane)) {
          all_in_range = false;
        }
      }
    });
  });
  TORCH_CHECK(all_in_range, op, ": indices must lie in [0, H*W) = [0, ", in_plane,
              ") of input_size ", input_size, " (found an out-of-range index)");
  return dx;
}

}  // namespace manualconv
