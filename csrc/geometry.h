// What the CPU kernels (csrc/*.cpp) and the CUDA kernels (csrc/cuda/*.cu) share: each op's sizes
// (a geometry struct per op family), the checks that validate its arguments and compute those
// sizes (the device the kernels run on is a parameter), the output-layout rule every device
// follows, and small index helpers. One definition of each, so the devices cannot drift apart.
//
// Conventions (all kernels, every device):
//   * tensors are 4-D, (N, C, H, W) in shape, of float32, float64, float16 or bfloat16; float16
//     and bfloat16 are computed in float32 and rounded once at the end (CPU: registration.cpp's
//     in_float32; CUDA: at::acc_type accumulators). Inputs may have any strides;
//   * outputs follow output_layout() below;
//   * padding is symmetric zero padding (pH top and bottom, pW left and right);
//   * int[2] arguments are (height, width) pairs; a single value means both.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

// Helpers that run in CUDA kernels as well as on the host.
#if defined(__CUDACC__)
#define MANUALCONV_HOST_DEVICE __host__ __device__
#else
#define MANUALCONV_HOST_DEVICE
#endif

namespace manualconv {

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

// ⌈a / b⌉ for a ≥ 0, b > 0
template <typename T>
MANUALCONV_HOST_DEVICE inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// The first tap at or past 0 of a window starting at `start` (< 0 in the padding) whose taps are
// `dil` apart: the window's first position inside the image when it has one. The max pools
// report it as the argmax of a window where nothing beats −∞ (torch's index), on every device.
template <typename index_t>
MANUALCONV_HOST_DEVICE inline index_t first_inside(index_t start, index_t dil) {
  return start >= 0 ? start : start + ceil_div<index_t>(-start, dil) * dil;
}

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
inline std::array<int64_t, 4> as_size4(at::IntArrayRef v, const char* op, const char* name,
                                       const char* layout) {
  TORCH_CHECK(v.size() == 4, op, ": ", name, " must have 4 elements ", layout, ", got ", v);
  for (int64_t s : v) {
    TORCH_CHECK(s >= 0, op, ": ", name, " must not contain negative sizes, got ", v);
  }
  return {v[0], v[1], v[2], v[3]};
}

// Valid output positions j of a sliding read at column j·stride + offset of a row of `width`
// elements: those with 0 <= j·stride + offset < width, as the half-open range [lo, hi) clipped
// to [0, out_width). Used by im2col/col2im and the pooling loops to split each output row into
// "reads the zero padding" and "reads the image" parts.
struct Range {
  int64_t lo;
  int64_t hi;
};
inline Range valid_output_range(int64_t offset, int64_t stride, int64_t width, int64_t out_width) {
  int64_t lo = offset >= 0 ? 0 : ceil_div(-offset, stride);
  int64_t hi = offset >= width ? 0 : ceil_div(width - offset, stride);
  lo = std::min(lo, out_width);
  hi = std::max(std::min(hi, out_width), lo);
  return {lo, hi};
}

// ---------------------------------------------------------------------------
// Tensor checks. `device` is the device type the calling kernels run on (at::kCPU for
// csrc/*.cpp, at::kCUDA for csrc/cuda/*.cu).
// ---------------------------------------------------------------------------

// A tensor argument must be a defined 4-D floating-point tensor on the kernels' device.
inline void check_tensor_4d(const at::Tensor& t, const char* op, const char* name,
                            const char* layout, at::DeviceType device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ",
              c10::DeviceTypeName(device), " tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D ", layout, ", got ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// Every tensor of one call must live on one device (a CUDA call may see two GPUs).
inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  TORCH_CHECK(b.defined(), op, ": ", b_name, " must be a defined tensor");
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// A second tensor of a call (weight, grad_output, ...): on a's device, 4-D, of a's dtype.
inline void check_partner_4d(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* layout, const char* op,
                             at::DeviceType device) {
  check_same_device(a, a_name, b, b_name, op);
  check_tensor_4d(b, op, b_name, layout, device);
  check_same_dtype(a, a_name, b, b_name, op);
}

// A tensor's sizes must equal `expected` (e.g. grad_output vs the computed output size).
inline void check_sizes(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* op) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have size ", expected,
              " (the output size computed from the other arguments), got ", t.sizes());
}

// ---------------------------------------------------------------------------
// The output-layout rule (every device; manualconv/ops.py's fake kernels state the same)
// ---------------------------------------------------------------------------

// Whether a 4-D tensor is laid out channels-last (NHWC) rather than NCHW (a tensor that is both,
// e.g. with H = W = 1, counts as NCHW).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The layout of an output computed from `like`, as torch.nn's kernels choose it: channels-last
// for a channels-last tensor, else NCHW-contiguous. The conv kernels follow it (forward and
// input gradient: from input / grad_output; weight gradient: from input), and so do the pools
// (forwards: from input; avg and adaptive avg backward: from grad_output; max backward: from
// grad_output and indices, below).
inline at::MemoryFormat output_layout(const at::Tensor& like) {
  return is_channels_last(like) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The same for an output computed from two tensors (max_pool2d_backward's δy and indices):
// channels-last when both are.
inline at::MemoryFormat output_layout(const at::Tensor& a, const at::Tensor& b) {
  return is_channels_last(a) && is_channels_last(b) ? at::MemoryFormat::ChannelsLast
                                                    : at::MemoryFormat::Contiguous;
}

// ---------------------------------------------------------------------------
// conv2d
// ---------------------------------------------------------------------------

// Every size a conv2d kernel needs, validated once by check_conv2d.
struct Conv2dGeometry {
  int64_t N, C, H, W;  // input (N, C, H, W)
  int64_t O, kH, kW;   // weight (O, C/groups, kH, kW)
  int64_t sH, sW, pH, pW, dH, dW, groups;
  int64_t H_out, W_out;
  // valid_i[a] / valid_j[b]: the output rows i / columns j whose kernel row a / column b reads
  // inside the image (input row i·sH − pH + a·dH, column j·sW − pW + b·dW); the others read
  // the zero padding. Precomputed once: the CPU's im2col and col2im need them for every
  // (sample, c, a, b).
  std::vector<Range> valid_i, valid_j;

  int64_t C_g() const { return C / groups; }     // input channels per group
  int64_t O_g() const { return O / groups; }     // output channels per group
  int64_t K() const { return C_g() * kH * kW; }  // rows of im2col(x[g])
  int64_t L() const { return H_out * W_out; }    // columns of im2col(x[g])
  // A 1×1 kernel with stride 1 and no padding reads each pixel once, in order:
  // im2col(x[g]) is x[g] itself, viewed as a (C/G) × (H·W) matrix.
  bool is_pointwise() const {
    return kH == 1 && kW == 1 && sH == 1 && sW == 1 && pH == 0 && pW == 0;
  }
  std::vector<int64_t> output_size() const { return {N, O, H_out, W_out}; }
};

// The one shape check for conv2d, shared by the forward and both backward kernels of every
// device. input_name / weight_name say where the shapes came from (a tensor or a size list).
inline Conv2dGeometry check_conv2d(const char* op, at::IntArrayRef input_size,
                                   const char* input_name, at::IntArrayRef weight_size,
                                   const char* weight_name, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  const auto in = as_size4(input_size, op, input_name, "(N, C, H, W)");
  const auto wt = as_size4(weight_size, op, weight_name,
                           "(out_channels, in_channels/groups, kH, kW)");
  const HW s = as_hw(stride, op, "stride");
  const HW p = as_hw(padding, op, "padding");
  const HW d = as_hw(dilation, op, "dilation");

  Conv2dGeometry g{};
  g.N = in[0], g.C = in[1], g.H = in[2], g.W = in[3];
  g.O = wt[0], g.kH = wt[2], g.kW = wt[3];
  g.sH = s.h, g.sW = s.w, g.pH = p.h, g.pW = p.w, g.dH = d.h, g.dW = d.w;
  g.groups = groups;

  TORCH_CHECK(g.C > 0 && g.H > 0 && g.W > 0, op, ": ", input_name,
              " must have non-zero channels, height and width, got ", input_size);
  TORCH_CHECK(g.O > 0 && wt[1] > 0 && g.kH > 0 && g.kW > 0, op, ": ", weight_name,
              " must have non-zero sizes, got ", weight_size);
  TORCH_CHECK(s.h > 0 && s.w > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(d.h > 0 && d.w > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(p.h >= 0 && p.w >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(g.C % groups == 0, op, ": in_channels (", g.C,
              ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(g.O % groups == 0, op, ": out_channels (", g.O,
              ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(wt[1] == g.C / groups, op, ": ", weight_name, " must have in_channels/groups = ",
              g.C, "/", groups, " = ", g.C / groups, " channels in dim 1, got ", weight_size);

  // H_out = ⌊(H + 2p − d(k−1) − 1) / s⌋ + 1
  const int64_t span_h = g.H + 2 * g.pH - g.dH * (g.kH - 1) - 1;
  const int64_t span_w = g.W + 2 * g.pW - g.dW * (g.kW - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, op, ": the padded input (",
              g.H + 2 * g.pH, " x ", g.W + 2 * g.pW,
              ") is smaller than the dilated kernel (", g.dH * (g.kH - 1) + 1, " x ",
              g.dW * (g.kW - 1) + 1, "); output size would be < 1");
  g.H_out = span_h / g.sH + 1;
  g.W_out = span_w / g.sW + 1;
  for (int64_t a = 0; a < g.kH; ++a) {
    g.valid_i.push_back(valid_output_range(a * g.dH - g.pH, g.sH, g.H, g.H_out));
  }
  for (int64_t b = 0; b < g.kW; ++b) {
    g.valid_j.push_back(valid_output_range(b * g.dW - g.pW, g.sW, g.W, g.W_out));
  }
  return g;
}

// The argument checks of the three conv2d kernels (tensors and sizes), on `device`.
inline Conv2dGeometry check_conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups,
                                           at::DeviceType device) {
  constexpr const char* op = "manualconv::conv2d_forward";
  check_tensor_4d(input, op, "input", "(N, C, H, W)", device);
  check_partner_4d(input, "input", weight, "weight", "(out_channels, in_channels/groups, kH, kW)",
                   op, device);
  const Conv2dGeometry g = check_conv2d(op, input.sizes(), "input", weight.sizes(), "weight",
                                        stride, padding, dilation, groups);
  if (bias.has_value() && bias->defined()) {
    check_same_device(input, "input", *bias, "bias", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.O, op,
                ": bias must be 1-D of size out_channels = ", g.O, ", got ", bias->sizes());
    check_same_dtype(input, "input", *bias, "bias", op);
  }
  return g;
}

inline Conv2dGeometry check_conv2d_grad_input(const at::Tensor& grad_output,
                                              const at::Tensor& weight,
                                              at::IntArrayRef input_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                              int64_t groups, at::DeviceType device) {
  constexpr const char* op = "manualconv::conv2d_grad_input";
  check_tensor_4d(grad_output, op, "grad_output", "(N, out_channels, H_out, W_out)", device);
  check_partner_4d(grad_output, "grad_output", weight, "weight",
                   "(out_channels, in_channels/groups, kH, kW)", op, device);
  const Conv2dGeometry g = check_conv2d(op, input_size, "input_size", weight.sizes(), "weight",
                                        stride, padding, dilation, groups);
  check_sizes(grad_output, "grad_output", g.output_size(), op);
  return g;
}

inline Conv2dGeometry check_conv2d_grad_weight(const at::Tensor& input,
                                               const at::Tensor& grad_output,
                                               at::IntArrayRef weight_size,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, int64_t groups,
                                               at::DeviceType device) {
  constexpr const char* op = "manualconv::conv2d_grad_weight";
  check_tensor_4d(input, op, "input", "(N, C, H, W)", device);
  check_partner_4d(input, "input", grad_output, "grad_output", "(N, out_channels, H_out, W_out)",
                   op, device);
  const Conv2dGeometry g = check_conv2d(op, input.sizes(), "input", weight_size, "weight_size",
                                        stride, padding, dilation, groups);
  check_sizes(grad_output, "grad_output", g.output_size(), op);
  return g;
}

// ---------------------------------------------------------------------------
// Pooling windows: max_pool2d and avg_pool2d
// ---------------------------------------------------------------------------

// Every size a pooling kernel needs (one (n, c) plane at a time), filled in by
// pool2d_geometry. Avg pool has dH = dW = 1.
struct Pool2dGeometry {
  int64_t N, C, H, W;
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t H_out, W_out;
  // valid_j[b]: the output columns j whose window column b (input column j·sW − pW + b·dW)
  // lies inside the image. Precomputed: the CPU's loops over a row need it for every (plane, i, b).
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
  int64_t out = (span >= 0 ? span / s : -ceil_div(-span, s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Validates a pooling window against torch's rules and computes the output size.
// Shared by max pooling and check_avg_pool2d (avg pool: dilation = {1, 1}).
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

// max_pool2d_forward's check.
inline Pool2dGeometry check_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, bool ceil_mode,
                                       at::DeviceType device) {
  constexpr const char* op = "manualconv::max_pool2d_forward";
  check_tensor_4d(input, op, "input", "(N, C, H, W)", device);
  return pool2d_geometry(op, input.sizes(), kernel_size, stride, padding, dilation, ceil_mode);
}

// max_pool2d_backward's check (it also serves adaptive max pooling, so it takes no window: the
// indices encode the windows): grad_output and indices of one size (N, C, H_out, W_out), and
// input_size (N, C, H, W) with the same N and C. Returns input_size.
inline std::array<int64_t, 4> check_max_pool2d_backward(const at::Tensor& grad_output,
                                                        const at::Tensor& indices,
                                                        at::IntArrayRef input_size,
                                                        at::DeviceType device) {
  constexpr const char* op = "manualconv::max_pool2d_backward";
  check_tensor_4d(grad_output, op, "grad_output", "(N, C, H_out, W_out)", device);
  check_same_device(grad_output, "grad_output", indices, "indices", op);
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.sizes() == grad_output.sizes(), op,
              ": indices must have the same size as grad_output ", grad_output.sizes(), ", got ",
              indices.sizes());
  const auto in = as_size4(input_size, op, "input_size", "(N, C, H, W)");
  TORCH_CHECK(in[0] == grad_output.size(0) && in[1] == grad_output.size(1), op, ": input_size ",
              input_size, " must have the batch and channel sizes of grad_output ",
              grad_output.sizes());
  TORCH_CHECK(in[2] > 0 && in[3] > 0, op, ": input_size must have non-zero height and width, got ",
              input_size);
  return in;
}

// avg_pool2d's window check, shared by its forward and backward: a non-zero divisor_override,
// then the pooling geometry without dilation.
inline Pool2dGeometry check_avg_pool2d(const char* op, at::IntArrayRef input_size,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, bool ceil_mode,
                                       std::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": divisor must be not zero");
  const int64_t no_dilation[2] = {1, 1};
  return pool2d_geometry(op, input_size, kernel_size, stride, padding, no_dilation, ceil_mode);
}

inline Pool2dGeometry check_avg_pool2d_forward(const at::Tensor& input,
                                               at::IntArrayRef kernel_size,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               bool ceil_mode,
                                               std::optional<int64_t> divisor_override,
                                               at::DeviceType device) {
  constexpr const char* op = "manualconv::avg_pool2d_forward";
  check_tensor_4d(input, op, "input", "(N, C, H, W)", device);
  return check_avg_pool2d(op, input.sizes(), kernel_size, stride, padding, ceil_mode,
                          divisor_override);
}

inline Pool2dGeometry check_avg_pool2d_backward(const at::Tensor& grad_output,
                                                at::IntArrayRef input_size,
                                                at::IntArrayRef kernel_size,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                bool ceil_mode,
                                                std::optional<int64_t> divisor_override,
                                                at::DeviceType device) {
  constexpr const char* op = "manualconv::avg_pool2d_backward";
  check_tensor_4d(grad_output, op, "grad_output", "(N, C, H_out, W_out)", device);
  as_size4(input_size, op, "input_size", "(N, C, H, W)");
  const Pool2dGeometry g = check_avg_pool2d(op, input_size, kernel_size, stride, padding,
                                            ceil_mode, divisor_override);
  check_sizes(grad_output, "grad_output", g.output_size(), op);
  return g;
}

// ---------------------------------------------------------------------------
// Adaptive pooling: output (i, j) pools rows [⌊i·H/H_out⌋, ⌈(i+1)·H/H_out⌉) × the columns alike
// ---------------------------------------------------------------------------

struct AdaptiveGeometry {
  int64_t N, C, H, W, H_out, W_out;
  int64_t planes() const { return N * C; }
  std::vector<int64_t> output_size() const { return {N, C, H_out, W_out}; }
};

// The one shape check of the adaptive pools, shared by forward and backward.
inline AdaptiveGeometry check_adaptive_pool2d(const char* op, at::IntArrayRef input_size,
                                              at::IntArrayRef output_size) {
  const auto in = as_size4(input_size, op, "input size", "(N, C, H, W)");
  const HW out = as_hw(output_size, op, "output_size");
  // as torch (and manualconv/checks.py): the average pool accepts zero channels (an empty
  // result), the max pool, like both on an empty plane, does not
  const bool average = std::string_view(op).find("adaptive_avg") != std::string_view::npos;
  TORCH_CHECK((average || in[1] > 0) && in[2] > 0 && in[3] > 0, op,
              ": input must have non-zero channels, height and width, got ", input_size);
  TORCH_CHECK(out.h >= 0 && out.w >= 0, op,
              ": elements of output_size must be greater than or equal to 0, got ", output_size);
  return {in[0], in[1], in[2], in[3], out.h, out.w};
}

// The forward check of both adaptive pools (op names the kernel).
inline AdaptiveGeometry check_adaptive_pool2d_forward(const char* op, const at::Tensor& input,
                                                      at::IntArrayRef output_size,
                                                      at::DeviceType device) {
  check_tensor_4d(input, op, "input", "(N, C, H, W)", device);
  return check_adaptive_pool2d(op, input.sizes(), output_size);
}

inline AdaptiveGeometry check_adaptive_avg_pool2d_backward(const at::Tensor& grad_output,
                                                           at::IntArrayRef input_size,
                                                           at::DeviceType device) {
  constexpr const char* op = "manualconv::adaptive_avg_pool2d_backward";
  check_tensor_4d(grad_output, op, "grad_output", "(N, C, H_out, W_out)", device);
  const AdaptiveGeometry g = check_adaptive_pool2d(op, input_size, grad_output.sizes().slice(2));
  TORCH_CHECK(grad_output.size(0) == g.N && grad_output.size(1) == g.C, op,
              ": grad_output must have the input's batch and channels ", input_size, ", got ",
              grad_output.sizes());
  return g;
}

}  // namespace manualconv
