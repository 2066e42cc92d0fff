// manualconv: conv2d and 2-D pooling with hand-derived backward passes.
//
// Shared declarations: argument-checking helpers used by every op, and the
// CPU kernels that registration.cpp binds to the torch.ops.manualconv.* schemas.
//
// Conventions (all kernels):
//   * tensors are 4-D NCHW, float or double, on the CPU; inputs may have any
//     strides (they are made NCHW-contiguous first), outputs are NCHW-contiguous;
//   * padding is symmetric zero padding (pH top and bottom, pW left and right);
//   * int[2] arguments are (height, width) pairs; a single value means both.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace manualconv {

// ---------------------------------------------------------------------------
// Argument checking
// ---------------------------------------------------------------------------

// (height, width) pair read from an int[2] schema argument.
struct HW {
  int64_t h;
  int64_t w;
};

// Reads an int[2] argument; a single value is used for both dimensions.
inline HW as_hw(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, op, ": ", name,
              " must have 2 elements (height, width), got ", v);
  return v.size() == 1 ? HW{v[0], v[0]} : HW{v[0], v[1]};
}

// Reads an int[4] size argument (an NCHW shape).
inline std::array<int64_t, 4> as_size4(at::IntArrayRef v, const char* op,
                                       const char* name, const char* layout) {
  TORCH_CHECK(v.size() == 4, op, ": ", name, " must have 4 elements ", layout,
              ", got ", v);
  for (int64_t s : v) {
    TORCH_CHECK(s >= 0, op, ": ", name, " must not contain negative sizes, got ", v);
  }
  return {v[0], v[1], v[2], v[3]};
}

// A tensor argument must be a 4-D float/double CPU tensor.
inline void check_tensor_4d(const at::Tensor& t, const char* op, const char* name,
                            const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor (this build of manualconv is CPU-only), got device ",
              t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D ", layout, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
              name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// A tensor's sizes must equal `expected` (e.g. grad_output vs the computed output size).
inline void check_sizes(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* op) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have size ", expected,
              " (the output size computed from the other arguments), got ", t.sizes());
}

// Whether a 4-D tensor is laid out channels-last (NHWC) rather than NCHW: the channels-last
// kernels (conv, max pool) run, and return channels-last tensors, for such inputs, as
// torch.nn's do.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Valid output positions j of a sliding read at column j·stride + offset of a row of
// `width` elements: those with 0 <= j·stride + offset < width, as the half-open range
// [lo, hi) clipped to [0, out_width). Used by im2col/col2im and the pooling loops to
// split each output row into "reads the zero padding" and "reads the image" parts.
struct Range {
  int64_t lo;
  int64_t hi;
};
inline Range valid_output_range(int64_t offset, int64_t stride, int64_t width,
                                int64_t out_width) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };  // a >= 0, b > 0
  int64_t lo = offset >= 0 ? 0 : ceil_div(-offset, stride);
  int64_t hi = offset >= width ? 0 : ceil_div(width - offset, stride);
  lo = std::min(lo, out_width);
  hi = std::max(std::min(hi, out_width), lo);
  return {lo, hi};
}

// ---------------------------------------------------------------------------
// Strided row loops, shared by im2col/col2im and the pooling kernels
// ---------------------------------------------------------------------------

// Calls body(stride) with the stride as a compile-time constant for the common strides 1 and 2
// (so that the compiler vectorises the loop inside) and as a plain int64_t otherwise.
template <typename F>
inline void dispatch_stride(int64_t stride, const F& body) {
  switch (stride) {
    case 1: body(std::integral_constant<int64_t, 1>{}); break;
    case 2: body(std::integral_constant<int64_t, 2>{}); break;
    default: body(stride);
  }
}

// out[j] = in[j·stride], j ∈ [0, n)
template <typename scalar_t>
inline void strided_copy(const scalar_t* in, int64_t stride, int64_t n, scalar_t* out) {
  dispatch_stride(stride, [&](auto s) {
    for (int64_t j = 0; j < n; ++j) out[j] = in[j * s];
  });
}

// out[j] += in[j·stride], j ∈ [0, n)
template <typename scalar_t>
inline void strided_accumulate(const scalar_t* in, int64_t stride, int64_t n, scalar_t* out) {
  dispatch_stride(stride, [&](auto s) {
    for (int64_t j = 0; j < n; ++j) out[j] += in[j * s];
  });
}

// out[j·stride] += in[j], j ∈ [0, n)   (the adjoint of strided_copy)
template <typename scalar_t>
inline void strided_add(const scalar_t* in, int64_t n, scalar_t* out, int64_t stride) {
  dispatch_stride(stride, [&](auto s) {
    for (int64_t j = 0; j < n; ++j) out[j * s] += in[j];
  });
}

// ---------------------------------------------------------------------------
// Pooling windows (shared by max_pool2d.cpp and avg_pool2d.cpp)
// ---------------------------------------------------------------------------

// adaptive_pool2d.cpp (adaptive max pool's backward is max_pool2d_backward)
std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(const at::Tensor& input,
                                                               at::IntArrayRef output_size);
at::Tensor adaptive_avg_pool2d_forward(const at::Tensor& input, at::IntArrayRef output_size);
at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& grad_output, at::IntArrayRef input_size);

// Every size a pooling kernel needs (one (n, c) plane at a time), filled in by the
// op's check function (check_max_pool2d / check_avg_pool2d). Avg pool has dH = dW = 1.
struct Pool2dGeometry {
  int64_t N, C, H, W;
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t H_out, W_out;
  // valid_j[b]: the output columns j whose window column b (input column j·sW − pW + b·dW)
  // lies inside the image. Precomputed: the loops over a row need it for every (plane, i, b).
  std::vector<Range> valid_j;

  int64_t planes() const { return N * C; }
  std::vector<int64_t> output_size() const { return {N, C, H_out, W_out}; }
};

// Pooling output size along one dimension, as torch computes it:
//   out = ⌊ or ⌈ (in + 2p − d(k−1) − 1) / s ⌉ + 1   (⌈⌉ in ceil mode),
// and in ceil mode the last window must start inside the image or the left padding.
// Arguments are already validated (k, s, d > 0, p >= 0).
inline int64_t pooling_output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                                   bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // floor division (span may be negative when the window does not fit)
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Validates a pooling window against torch's rules and computes the output size.
// Shared by check_max_pool2d and check_avg_pool2d (avg pool: dilation = {1, 1}).
inline Pool2dGeometry pool2d_geometry(const char* op, at::IntArrayRef input_size,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      bool ceil_mode) {
  const HW k = as_hw(kernel_size, op, "kernel_size");
  const HW s = as_hw(stride, op, "stride");
  const HW p = as_hw(padding, op, "padding");
  const HW d = as_hw(dilation, op, "dilation");
  TORCH_CHECK(input_size.size() == 4, op, ": input must be 4-D (N, C, H, W), got ", input_size);
  TORCH_CHECK(input_size[0] >= 0 && input_size[1] > 0 && input_size[2] > 0 && input_size[3] > 0,
              op, ": input must have non-zero channels, height and width, got ", input_size);
  TORCH_CHECK(k.h > 0 && k.w > 0, op, ": kernel size should be greater than zero, but got kH: ",
              k.h, " kW: ", k.w);
  TORCH_CHECK(s.h > 0 && s.w > 0, op, ": stride should be greater than zero, but got dH: ", s.h,
              " dW: ", s.w);
  TORCH_CHECK(d.h > 0 && d.w > 0, op, ": dilation should be greater than zero, but got dilationH: ",
              d.h, " dilationW: ", d.w);
  TORCH_CHECK(p.h >= 0 && p.w >= 0, op, ": pad must be non-negative, but got padH: ", p.h,
              " padW: ", p.w);
  for (auto [pad, ks, dil] : {std::array<int64_t, 3>{p.h, k.h, d.h}, {p.w, k.w, d.w}}) {
    TORCH_CHECK(pad <= ((ks - 1) * dil + 1) / 2, op,
                ": pad should be at most half of effective kernel size, but got pad=", pad,
                ", kernel_size=", ks, " and dilation=", dil);
  }
  TORCH_CHECK(k.w / 2 >= p.w && k.h / 2 >= p.h, op,
              ": pad should be smaller than or equal to half of kernel size, but got padW = ", p.w,
              ", padH = ", p.h, ", kW = ", k.w, ", kH = ", k.h);

  Pool2dGeometry g{};
  g.N = input_size[0], g.C = input_size[1], g.H = input_size[2], g.W = input_size[3];
  g.kH = k.h, g.kW = k.w, g.sH = s.h, g.sW = s.w, g.pH = p.h, g.pW = p.w, g.dH = d.h, g.dW = d.w;
  g.H_out = pooling_output_size(g.H, g.kH, g.sH, g.pH, g.dH, ceil_mode);
  g.W_out = pooling_output_size(g.W, g.kW, g.sW, g.pW, g.dW, ceil_mode);
  TORCH_CHECK(g.H_out >= 1 && g.W_out >= 1, op, ": Given input size: (", g.C, "x", g.H, "x", g.W,
              "). Calculated output size: (", g.C, "x", g.H_out, "x", g.W_out,
              "). Output size is too small");
  for (int64_t b = 0; b < g.kW; ++b) {
    g.valid_j.push_back(valid_output_range(b * g.dW - g.pW, g.sW, g.W, g.W_out));
  }
  return g;
}

// ---------------------------------------------------------------------------
// Kernels (CPU). Schemas are in registration.cpp.
// ---------------------------------------------------------------------------

// conv2d.cpp
at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
at::Tensor conv2d_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                             at::IntArrayRef input_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups);
at::Tensor conv2d_grad_weight(const at::Tensor& input, const at::Tensor& grad_output,
                              at::IntArrayRef weight_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups);

// max_pool2d.cpp
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input,
                                                      at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation,
                                                      bool ceil_mode);
at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                               at::IntArrayRef input_size);

// avg_pool2d.cpp
at::Tensor avg_pool2d_forward(const at::Tensor& input, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                              bool count_include_pad, std::optional<int64_t> divisor_override);
at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override);

}  // namespace manualconv
