// 2-D pooling on CUDA: max, average and adaptive pooling, with the window rules of the CPU
// kernels (max_pool2d.cpp, avg_pool2d.cpp, adaptive_pool2d.cpp) and their checks (geometry.h):
//
//   max_pool2d          y[i, j] = max_{window(i, j)} x,  idx[i, j] = argmax as h·W + w
//   max_pool2d backward δx[h, w] = Σ_{(i, j) : idx[i, j] = h·W + w} δy[i, j]
//   avg_pool2d          y[i, j] = Σ_{window(i, j)} x / D(i, j)
//   avg_pool2d backward δx[h, w] = Σ_{(i, j) : (h, w) ∈ window(i, j)} δy[i, j] / D(i, j)
//   adaptive pools      the same over rows [⌊i·H/H_out⌋, ⌈(i+1)·H/H_out⌉) (columns alike)
//
// Forward kernels: one thread per output, walking its window in row-major order (so ties keep
// the first maximum and the last NaN wins, as on the CPU). Average-pool backward kernels are
// gathers: one thread per input element, summing over the windows that contain it in a fixed
// order (no atomics, deterministic). Sums and comparisons are done in at::acc_type (float for
// half/bfloat16) and rounded once.
//
// max_pool2d_backward(δy, indices, input_size) receives no window geometry (it also serves
// adaptive max pooling, whose windows are not strided ones), so it cannot gather: it scatters
// δy to the recorded argmax. Two variants:
//   * default: one thread per output, atomicAdd into δx (as torch's own adaptive_max_pool2d
//     backward). A position that is the argmax of at most two windows gets an exact,
//     order-independent result (0 + a + b = 0 + b + a in IEEE arithmetic); only positions that
//     win three or more overlapping windows (e.g. 3×3 windows with stride 2) may differ in the
//     last bits between runs;
//   * under torch.use_deterministic_algorithms(True): a sort-based scatter (ATen's index_put_
//     with accumulate=True, which sorts the target positions stably and adds duplicates in
//     output order), bitwise reproducible, at the cost of a sort of all the indices.
// Indices outside [0, H·W) are skipped (never written). The CPU kernel raises an error for them;
// checking on the GPU would need a device-to-host synchronisation on every backward.

#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#ifndef MANUALCONV_EMULATE_ON_HOST
#include <ATen/cuda/Atomic.cuh>
#endif

#include <algorithm>

namespace manualconv {
namespace gpu {
namespace {

// Sizes of a (max or average) pooling window, in the kernels' index type.
template <typename index_t>
struct PoolArgs {
  index_t H, W, H_out, W_out, kH, kW, sH, sW, pH, pW, dH, dW;

  explicit PoolArgs(const Pool2dGeometry& g)
      : H(g.H), W(g.W), H_out(g.H_out), W_out(g.W_out), kH(g.kH), kW(g.kW), sH(g.sH), sW(g.sW),
        pH(g.pH), pW(g.pW), dH(g.dH), dW(g.dW) {}
};

template <typename index_t>
struct AdaptiveArgs {
  index_t H, W, H_out, W_out;

  explicit AdaptiveArgs(const AdaptiveGeometry& g)
      : H(g.H), W(g.W), H_out(g.H_out), W_out(g.W_out) {}
};

// Adaptive window [start, end) of output i along a dimension of `in` inputs and `out` outputs.
template <typename index_t>
__host__ __device__ __forceinline__ index_t adaptive_start(index_t i, index_t in, index_t out) {
  return (i * in) / out;
}
template <typename index_t>
__host__ __device__ __forceinline__ index_t adaptive_end(index_t i, index_t in, index_t out) {
  return ((i + 1) * in + out - 1) / out;
}

// Output element t of a (planes, H_out, W_out) tensor as (plane p, row i, column j).
template <typename index_t>
struct PlaneIJ {
  index_t p, i, j;
};
template <typename index_t>
__host__ __device__ __forceinline__ PlaneIJ<index_t> split_index(int64_t t, index_t rows,
                                                                  index_t cols) {
  index_t e = static_cast<index_t>(t);
  const index_t j = e % cols;
  e /= cols;
  return {e / rows, e % rows, j};
}

// ---------------------------------------------------------------------------
// Kernels: one functor per op, called on every element index t by a grid-stride kernel
// ---------------------------------------------------------------------------

template <typename Op>
__global__ void pool2d_kernel(int64_t total, Op op) {
  MANUALCONV_FOR_EACH_ELEMENT(total, op)
}

// y[p, i, j] = max over window(i, j) of plane p, idx = the argmax (h·W + w). t < planes·H_out·W_out.
template <typename scalar_t, typename index_t>
struct MaxPoolForward {
  const scalar_t* __restrict__ x;
  PoolArgs<index_t> s;
  scalar_t* __restrict__ y;
  int64_t* __restrict__ indices;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto o = split_index(t, s.H_out, s.W_out);
    const scalar_t* plane = x + o.p * s.H * s.W;
    const index_t h_start = o.i * s.sH - s.pH, w_start = o.j * s.sW - s.pW;
    acc_t best = static_cast<acc_t>(-INFINITY);
    index_t best_pos = first_inside(h_start, s.dH) * s.W + first_inside(w_start, s.dW);
    for (index_t a = 0; a < s.kH; ++a) {
      const index_t h = h_start + a * s.dH;
      if (h < 0 || h >= s.H) continue;
      for (index_t b = 0; b < s.kW; ++b) {
        const index_t w = w_start + b * s.dW;
        if (w < 0 || w >= s.W) continue;
        const acc_t v = static_cast<acc_t>(plane[h * s.W + w]);
        if (v > best || at::_isnan(v)) {  // ties keep the first maximum; a NaN wins
          best = v;
          best_pos = h * s.W + w;
        }
      }
    }
    y[t] = static_cast<scalar_t>(best);
    indices[t] = static_cast<int64_t>(best_pos);
  }
};

// δx[p, idx[t]] += δy[t] with atomicAdd (δx zero-filled). t < planes·out_plane.
template <typename scalar_t, typename index_t>
struct MaxPoolBackwardScatter {
  const scalar_t* __restrict__ dy;
  const int64_t* __restrict__ indices;
  index_t out_plane, in_plane;
  scalar_t* __restrict__ dx;

  __host__ __device__ void operator()(int64_t t) const {
    const int64_t pos = indices[t];
    if (pos < 0 || pos >= in_plane) return;  // out of range: skipped
    scalar_t* target = dx + (static_cast<index_t>(t) / out_plane) * in_plane +
                       static_cast<index_t>(pos);
#ifdef __CUDA_ARCH__
    gpuAtomicAdd(target, dy[t]);
#else
    *target += dy[t];  // host emulation: sequential
#endif
  }
};

// The flat δx position of each output's argmax, p·H·W + idx (numel of δx, a dump slot past the
// end, for an index out of range). t < planes·out_plane.
struct MaxPoolFlatIndices {
  const int64_t* __restrict__ indices;
  int64_t out_plane, in_plane, dump;
  int64_t* __restrict__ flat;

  __host__ __device__ void operator()(int64_t t) const {
    const int64_t pos = indices[t];
    flat[t] = (pos < 0 || pos >= in_plane) ? dump : (t / out_plane) * in_plane + pos;
  }
};

// The window of avg pooling output (i, j) (avg_pool2d.cpp's window_1d + avg_divisor): clipped
// to the image, [h0, h1) × [w0, w1), and its divisor D(i, j), 0 when it misses the image.
template <typename index_t>
struct AvgWindow {
  index_t h0, h1, w0, w1, divisor;
};
template <typename index_t>
struct AvgPoolArgs {
  PoolArgs<index_t> s;
  bool count_include_pad;
  bool has_divisor_override;
  index_t divisor_override;

  __host__ __device__ AvgWindow<index_t> window(index_t i, index_t j) const {
    const index_t h_start = i * s.sH - s.pH, w_start = j * s.sW - s.pW;
    const index_t h_end = min_of(h_start + s.kH, s.H + s.pH);  // inside the padded image
    const index_t w_end = min_of(w_start + s.kW, s.W + s.pW);
    AvgWindow<index_t> win;
    win.h0 = max_of(h_start, index_t(0));
    win.h1 = min_of(h_end, s.H);
    win.w0 = max_of(w_start, index_t(0));
    win.w1 = min_of(w_end, s.W);
    if (win.h0 >= win.h1 || win.w0 >= win.w1) {
      win.divisor = 0;
    } else if (has_divisor_override) {
      win.divisor = divisor_override;
    } else if (count_include_pad) {
      win.divisor = (h_end - h_start) * (w_end - w_start);
    } else {
      win.divisor = (win.h1 - win.h0) * (win.w1 - win.w0);
    }
    return win;
  }
};

// y[p, i, j] = Σ window(i, j) x / D(i, j)  (0 for a window that misses the image).
// t < planes·H_out·W_out.
template <typename scalar_t, typename index_t>
struct AvgPoolForward {
  const scalar_t* __restrict__ x;
  AvgPoolArgs<index_t> args;
  scalar_t* __restrict__ y;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const PoolArgs<index_t>& s = args.s;
    const auto o = split_index(t, s.H_out, s.W_out);
    const AvgWindow<index_t> win = args.window(o.i, o.j);
    if (win.divisor == 0) {
      y[t] = scalar_t(0);
      return;
    }
    const scalar_t* plane = x + o.p * s.H * s.W;
    acc_t sum = acc_t(0);
    for (index_t h = win.h0; h < win.h1; ++h) {
      for (index_t w = win.w0; w < win.w1; ++w) sum += static_cast<acc_t>(plane[h * s.W + w]);
    }
    y[t] = static_cast<scalar_t>(sum / static_cast<acc_t>(win.divisor));
  }
};

// δx[p, h, w] = Σ over the windows (i, j) containing (h, w) of δy[p, i, j] / D(i, j), in
// row-major (i, j) order. Window i covers rows [i·sH − pH, i·sH − pH + kH), so it contains h
// for i ∈ [⌊(h + pH − kH)/sH⌋ + 1, ⌊(h + pH)/sH⌋] ∩ [0, H_out) (columns alike).
// t < planes·H·W.
template <typename scalar_t, typename index_t>
struct AvgPoolBackward {
  const scalar_t* __restrict__ dy;
  AvgPoolArgs<index_t> args;
  scalar_t* __restrict__ dx;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const PoolArgs<index_t>& s = args.s;
    const auto o = split_index(t, s.H, s.W);  // (plane, h, w)
    const index_t hp = o.i + s.pH, wp = o.j + s.pW;  // position in the padded image
    const index_t i0 = hp < s.kH ? 0 : (hp - s.kH) / s.sH + 1;
    const index_t i1 = min_of(hp / s.sH + 1, s.H_out);
    const index_t j0 = wp < s.kW ? 0 : (wp - s.kW) / s.sW + 1;
    const index_t j1 = min_of(wp / s.sW + 1, s.W_out);
    const scalar_t* grad = dy + o.p * s.H_out * s.W_out;
    acc_t sum = acc_t(0);
    for (index_t i = i0; i < i1; ++i) {
      for (index_t j = j0; j < j1; ++j) {
        // the window contains (h, w), so its divisor is not 0
        sum += static_cast<acc_t>(grad[i * s.W_out + j]) /
               static_cast<acc_t>(args.window(i, j).divisor);
      }
    }
    dx[t] = static_cast<scalar_t>(sum);
  }
};

// y[p, i, j] = max over the adaptive window, idx = argmax (h·W + w); ties keep the first
// maximum, a NaN wins. t < planes·H_out·W_out.
template <typename scalar_t, typename index_t>
struct AdaptiveMaxPoolForward {
  const scalar_t* __restrict__ x;
  AdaptiveArgs<index_t> s;
  scalar_t* __restrict__ y;
  int64_t* __restrict__ indices;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto o = split_index(t, s.H_out, s.W_out);
    const index_t h0 = adaptive_start(o.i, s.H, s.H_out), h1 = adaptive_end(o.i, s.H, s.H_out);
    const index_t w0 = adaptive_start(o.j, s.W, s.W_out), w1 = adaptive_end(o.j, s.W, s.W_out);
    const scalar_t* plane = x + o.p * s.H * s.W;
    acc_t best = static_cast<acc_t>(-INFINITY);
    index_t best_pos = h0 * s.W + w0;
    for (index_t h = h0; h < h1; ++h) {
      for (index_t w = w0; w < w1; ++w) {
        const acc_t v = static_cast<acc_t>(plane[h * s.W + w]);
        if (v > best || at::_isnan(v)) {
          best = v;
          best_pos = h * s.W + w;
        }
      }
    }
    y[t] = static_cast<scalar_t>(best);
    indices[t] = static_cast<int64_t>(best_pos);
  }
};

// y[p, i, j] = Σ_window x / area. t < planes·H_out·W_out.
template <typename scalar_t, typename index_t>
struct AdaptiveAvgPoolForward {
  const scalar_t* __restrict__ x;
  AdaptiveArgs<index_t> s;
  scalar_t* __restrict__ y;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto o = split_index(t, s.H_out, s.W_out);
    const index_t h0 = adaptive_start(o.i, s.H, s.H_out), h1 = adaptive_end(o.i, s.H, s.H_out);
    const index_t w0 = adaptive_start(o.j, s.W, s.W_out), w1 = adaptive_end(o.j, s.W, s.W_out);
    const scalar_t* plane = x + o.p * s.H * s.W;
    acc_t sum = acc_t(0);
    for (index_t h = h0; h < h1; ++h) {
      for (index_t w = w0; w < w1; ++w) sum += static_cast<acc_t>(plane[h * s.W + w]);
    }
    y[t] = static_cast<scalar_t>(sum / static_cast<acc_t>((h1 - h0) * (w1 - w0)));
  }
};

// δx[p, h, w] = Σ over the adaptive windows (i, j) containing (h, w) of δy[p, i, j] / area(i, j).
// Window i contains row h exactly for i ∈ [⌊h·H_out/H⌋, ⌈(h+1)·H_out/H⌉) (the adaptive formula
// with the roles of H and H_out swapped). t < planes·H·W.
template <typename scalar_t, typename index_t>
struct AdaptiveAvgPoolBackward {
  const scalar_t* __restrict__ dy;
  AdaptiveArgs<index_t> s;
  scalar_t* __restrict__ dx;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto o = split_index(t, s.H, s.W);  // (plane, h, w)
    const index_t i0 = adaptive_start(o.i, s.H_out, s.H), i1 = adaptive_end(o.i, s.H_out, s.H);
    const index_t j0 = adaptive_start(o.j, s.W_out, s.W), j1 = adaptive_end(o.j, s.W_out, s.W);
    const scalar_t* grad = dy + o.p * s.H_out * s.W_out;
    acc_t sum = acc_t(0);
    for (index_t i = i0; i < i1; ++i) {
      const index_t rows = adaptive_end(i, s.H, s.H_out) - adaptive_start(i, s.H, s.H_out);
      for (index_t j = j0; j < j1; ++j) {
        const index_t cols = adaptive_end(j, s.W, s.W_out) - adaptive_start(j, s.W, s.W_out);
        sum += static_cast<acc_t>(grad[i * s.W_out + j]) / static_cast<acc_t>(rows * cols);
      }
    }
    dx[t] = static_cast<scalar_t>(sum);
  }
};

// int32 indexing for a pooling op: planes of the input and output fit, and so do the products
// the kernels form (i·sH, i·H of the adaptive windows, ...).
bool pool_fits_int32(int64_t planes, int64_t H, int64_t W, int64_t H_out, int64_t W_out,
                     int64_t extra = 0) {
  return fits_int32({planes * H * W, planes * H_out * W_out, (H_out + 1) * H, (W_out + 1) * W,
                     (H + 1) * H_out, (W + 1) * W_out, extra});
}

}  // namespace
}  // namespace gpu

// y = max over each window of x;  indices = argmax (flattened h·W + w in its plane)
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(Cuda, const at::Tensor& input,
                                                      const Pool2dGeometry& g) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(g.output_size(), x.options());
  at::Tensor indices = at::empty(g.output_size(), x.options().dtype(at::kLong));
  // (extra: the positions h·W + w a window can name, padding and dilation included)
  const bool use_int32 = gpu::pool_fits_int32(
      g.planes(), g.H, g.W, g.H_out, g.W_out,
      ((g.H_out + 1) * g.sH + g.kH * g.dH) * ((g.W_out + 1) * g.sW + g.kW * g.dW + g.W));
  MANUALCONV_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_max_pool2d_forward_cuda", [&] {
    gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      using Op = gpu::MaxPoolForward<scalar_t, index_t>;
      gpu::launch_elements(&gpu::pool2d_kernel<Op>, y.numel(),
                           Op{x.const_data_ptr<scalar_t>(), gpu::PoolArgs<index_t>(g),
                              y.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>()});
    });
  });
  const at::MemoryFormat layout = output_layout(input);
  return {y.contiguous(layout), indices.contiguous(layout)};
}

// δx[idx] += δy   (scatter of each output gradient to the position of its maximum)
at::Tensor max_pool2d_backward(Cuda, const at::Tensor& grad_output, const at::Tensor& indices,
                               at::IntArrayRef input_size) {
  const at::Tensor dy = grad_output.contiguous();
  const at::Tensor idx = indices.contiguous();
  const int64_t in_plane = input_size[2] * input_size[3];
  const int64_t out_plane = dy.size(2) * dy.size(3);
  const int64_t total = dy.numel();
  const int64_t numel = input_size[0] * input_size[1] * in_plane;
  const at::MemoryFormat layout = output_layout(grad_output, indices);

  if (at::globalContext().deterministicAlgorithms()) {
    // Deterministic: δx.flatten()[p·H·W + idx] += δy, a sorted scatter (index_put_, accumulate)
    at::Tensor dx_flat = at::zeros({numel + 1}, dy.options());  // + 1: the dump slot
    if (total > 0) {
      at::Tensor flat = at::empty({total}, idx.options());
      gpu::launch_elements(&gpu::pool2d_kernel<gpu::MaxPoolFlatIndices>, total,
                           gpu::MaxPoolFlatIndices{idx.const_data_ptr<int64_t>(), out_plane,
                                                   in_plane, numel,
                                                   flat.mutable_data_ptr<int64_t>()});
      c10::List<std::optional<at::Tensor>> positions;
      positions.push_back(flat);
      dx_flat.index_put_(positions, dy.view({total}), /*accumulate=*/true);
    }
    return dx_flat.narrow(0, 0, numel).view(input_size).contiguous(layout);
  }

  // Default: δx = 0, then δx[p, idx] += δy with atomicAdd
  at::Tensor dx = at::zeros(input_size, dy.options());
  const bool use_int32 = gpu::fits_int32({numel, total});
  MANUALCONV_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_max_pool2d_backward_cuda", [&] {
    gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      using Op = gpu::MaxPoolBackwardScatter<scalar_t, index_t>;
      gpu::launch_elements(&gpu::pool2d_kernel<Op>, total,
                           Op{dy.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                              static_cast<index_t>(out_plane), static_cast<index_t>(in_plane),
                              dx.mutable_data_ptr<scalar_t>()});
    });
  });
  return dx.contiguous(layout);
}

namespace gpu {
namespace {

// avg pooling's arguments and whether int32 indexing suffices for them.
template <typename index_t>
AvgPoolArgs<index_t> avg_pool_args(const Pool2dGeometry& g, bool count_include_pad,
                                   std::optional<int64_t> divisor_override) {
  return {PoolArgs<index_t>(g), count_include_pad, divisor_override.has_value(),
          static_cast<index_t>(divisor_override.value_or(1))};
}
bool avg_pool_fits_int32(const Pool2dGeometry& g, std::optional<int64_t> divisor_override) {
  const int64_t divisor = divisor_override.value_or(1);
  return pool_fits_int32(
      g.planes(), g.H, g.W, g.H_out, g.W_out,
      std::max({(g.H_out + 1) * g.sH + g.kH + g.H, (g.W_out + 1) * g.sW + g.kW + g.W,
                (g.H + 2 * g.pH) * (g.W + 2 * g.pW), divisor < 0 ? -divisor : divisor}));
}

}  // namespace
}  // namespace gpu

// y = Σ window x / D
at::Tensor avg_pool2d_forward(Cuda, const at::Tensor& input, const Pool2dGeometry& g,
                              bool count_include_pad, std::optional<int64_t> divisor_override) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(g.output_size(), x.options());
  const bool use_int32 = gpu::avg_pool_fits_int32(g, divisor_override);
  MANUALCONV_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_avg_pool2d_forward_cuda", [&] {
    gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      using Op = gpu::AvgPoolForward<scalar_t, index_t>;
      gpu::launch_elements(
          &gpu::pool2d_kernel<Op>, y.numel(),
          Op{x.const_data_ptr<scalar_t>(),
             gpu::avg_pool_args<index_t>(g, count_include_pad, divisor_override),
             y.mutable_data_ptr<scalar_t>()});
    });
  });
  return y.contiguous(output_layout(input));
}

// δx[h, w] = Σ over the windows containing (h, w) of δy / D
at::Tensor avg_pool2d_backward(Cuda, const at::Tensor& grad_output, const Pool2dGeometry& g,
                               bool count_include_pad, std::optional<int64_t> divisor_override) {
  const at::Tensor dy = grad_output.contiguous();
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W}, dy.options());
  const bool use_int32 = gpu::avg_pool_fits_int32(g, divisor_override);
  MANUALCONV_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_avg_pool2d_backward_cuda", [&] {
    gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      using Op = gpu::AvgPoolBackward<scalar_t, index_t>;
      gpu::launch_elements(
          &gpu::pool2d_kernel<Op>, dx.numel(),
          Op{dy.const_data_ptr<scalar_t>(),
             gpu::avg_pool_args<index_t>(g, count_include_pad, divisor_override),
             dx.mutable_data_ptr<scalar_t>()});
    });
  });
  return dx.contiguous(output_layout(grad_output));
}

// y[i,j] = max over the adaptive window; ties keep the first maximum, a NaN wins
std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(Cuda, const at::Tensor& input,
                                                               const AdaptiveGeometry& g) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.H_out, g.W_out}, x.options());
  at::Tensor indices = at::empty({g.N, g.C, g.H_out, g.W_out}, x.options().dtype(at::kLong));
  const bool use_int32 = gpu::pool_fits_int32(g.planes(), g.H, g.W, g.H_out, g.W_out);
  MANUALCONV_DISPATCH_FLOATING_TYPES(
      x.scalar_type(), "manualconv_adaptive_max_pool2d_forward_cuda", [&] {
        gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
          using index_t = decltype(index_tag);
          using Op = gpu::AdaptiveMaxPoolForward<scalar_t, index_t>;
          gpu::launch_elements(&gpu::pool2d_kernel<Op>, y.numel(),
                               Op{x.const_data_ptr<scalar_t>(), gpu::AdaptiveArgs<index_t>(g),
                                  y.mutable_data_ptr<scalar_t>(),
                                  indices.mutable_data_ptr<int64_t>()});
        });
      });
  const at::MemoryFormat layout = output_layout(input);
  return {y.contiguous(layout), indices.contiguous(layout)};
}

// y[i,j] = (Σ_window x) / area(i,j)
at::Tensor adaptive_avg_pool2d_forward(Cuda, const at::Tensor& input, const AdaptiveGeometry& g) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.H_out, g.W_out}, x.options());
  const bool use_int32 = gpu::pool_fits_int32(g.planes(), g.H, g.W, g.H_out, g.W_out);
  MANUALCONV_DISPATCH_FLOATING_TYPES(
      x.scalar_type(), "manualconv_adaptive_avg_pool2d_forward_cuda", [&] {
        gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
          using index_t = decltype(index_tag);
          using Op = gpu::AdaptiveAvgPoolForward<scalar_t, index_t>;
          gpu::launch_elements(&gpu::pool2d_kernel<Op>, y.numel(),
                               Op{x.const_data_ptr<scalar_t>(), gpu::AdaptiveArgs<index_t>(g),
                                  y.mutable_data_ptr<scalar_t>()});
        });
      });
  return y.contiguous(output_layout(input));
}

// δx[h,w] = Σ_{windows (i,j) ∋ (h,w)} δy[i,j] / area(i,j)
at::Tensor adaptive_avg_pool2d_backward(Cuda, const at::Tensor& grad_output,
                                        const AdaptiveGeometry& g) {
  const at::Tensor dy = grad_output.contiguous();
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W}, dy.options());
  const at::MemoryFormat layout = output_layout(grad_output);
  if (g.H_out == 0 || g.W_out == 0) return dx.zero_().contiguous(layout);  // no window: no gradient
  const bool use_int32 = gpu::pool_fits_int32(g.planes(), g.H, g.W, g.H_out, g.W_out);
  MANUALCONV_DISPATCH_FLOATING_TYPES(
      dy.scalar_type(), "manualconv_adaptive_avg_pool2d_backward_cuda", [&] {
        gpu::dispatch_index_type(use_int32, [&](auto index_tag) {
          using index_t = decltype(index_tag);
          using Op = gpu::AdaptiveAvgPoolBackward<scalar_t, index_t>;
          gpu::launch_elements(&gpu::pool2d_kernel<Op>, dx.numel(),
                               Op{dy.const_data_ptr<scalar_t>(), gpu::AdaptiveArgs<index_t>(g),
                                  dx.mutable_data_ptr<scalar_t>()});
        });
      });
  return dx.contiguous(layout);
}

}  // namespace manualconv
