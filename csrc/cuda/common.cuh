// manualconv CUDA backend: shared declarations, argument checks and launch helpers.
//
// Same ops, schemas and semantics as the CPU kernels (csrc/*.cpp, declared in manualconv.h);
// registration.cu binds the functions declared at the end of this file to the CUDA dispatch key.
//
// Conventions (all CUDA kernels):
//   * tensors are 4-D NCHW on one CUDA device, float, double, half or bfloat16; inputs may have
//     any strides (they are made NCHW-contiguous first), outputs are NCHW-contiguous;
//   * reductions (window sums, col2im sums) accumulate in at::acc_type (float for half/bf16)
//     and round once; GEMMs go through ATen to cuBLAS;
//   * every output element is written by exactly one thread that sums its contributions in a
//     fixed order (gather, no atomics), so results are bitwise reproducible, except
//     max_pool2d_backward, whose default scatter uses atomicAdd (see pool2d.cu);
//   * index arithmetic is done in int32 when every offset a kernel forms fits, else int64;
//   * each kernel is a grid-stride loop calling a __host__ __device__ functor on every element
//     index t (the functor holds the kernel's arguments), launched by launch_elements below.
//
// Host emulation (tests only): compiled with -DMANUALCONV_EMULATE_ON_HOST, launch_elements runs
// the functors in a host loop instead, the ops take CPU tensors, and the device guard is a no-op.
// A scratch build of that kind runs every kernel's index arithmetic on a machine without a GPU;
// the normal build never defines the macro.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../manualconv.h"

namespace manualconv {
namespace gpu {

// ---------------------------------------------------------------------------
// Argument checks (the CPU ones in manualconv.h insist on CPU tensors of float/double)
// ---------------------------------------------------------------------------

#ifdef MANUALCONV_EMULATE_ON_HOST
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
using DeviceGuard = at::OptionalDeviceGuard;
#else
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;  // makes the tensors' device the current one
#endif

// A tensor argument must be a 4-D floating-point CUDA tensor (float, double, half, bfloat16).
inline void check_cuda_tensor_4d(const at::Tensor& t, const char* op, const char* name,
                                 const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(on_kernel_device(t), op, ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D ", layout, ", got ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// Every tensor of one call must live on the same CUDA device.
inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// Every size a conv2d kernel needs: the CUDA twin of csrc/conv2d.h's Conv2dGeometry (without its
// CPU-only im2col ranges), with the same validation and messages.
struct Conv2dGeometry {
  int64_t N, C, H, W;  // input (N, C, H, W)
  int64_t O, kH, kW;   // weight (O, C/groups, kH, kW)
  int64_t sH, sW, pH, pW, dH, dW, groups;
  int64_t H_out, W_out;

  int64_t C_g() const { return C / groups; }     // input channels per group
  int64_t O_g() const { return O / groups; }     // output channels per group
  int64_t K() const { return C_g() * kH * kW; }  // rows of im2col(x[g])
  int64_t L() const { return H_out * W_out; }    // columns of im2col(x[g])
  // 1×1 kernel, stride 1, no padding: im2col(x[g]) is x[g] itself viewed as (C/G) × (H·W).
  bool is_pointwise() const {
    return kH == 1 && kW == 1 && sH == 1 && sW == 1 && pH == 0 && pW == 0;
  }
  std::vector<int64_t> output_size() const { return {N, O, H_out, W_out}; }
};

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
  TORCH_CHECK(span_h >= 0 && span_w >= 0, op, ": the padded input (", g.H + 2 * g.pH, " x ",
              g.W + 2 * g.pW, ") is smaller than the dilated kernel (", g.dH * (g.kH - 1) + 1,
              " x ", g.dW * (g.kW - 1) + 1, "); output size would be < 1");
  g.H_out = span_h / g.sH + 1;
  g.W_out = span_w / g.sW + 1;
  return g;
}

// avg_pool2d's check (avg_pool2d.cpp's check_avg_pool2d): a non-zero divisor_override, then the
// shared pooling geometry of manualconv.h without dilation.
inline Pool2dGeometry check_avg_pool2d(const char* op, at::IntArrayRef input_size,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, bool ceil_mode,
                                       std::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": divisor must be not zero");
  const int64_t no_dilation[2] = {1, 1};
  return pool2d_geometry(op, input_size, kernel_size, stride, padding, no_dilation, ceil_mode);
}

// Adaptive pooling sizes (adaptive_pool2d.cpp's check_adaptive_pool2d).
struct AdaptiveGeometry {
  int64_t N, C, H, W, H_out, W_out;
  int64_t planes() const { return N * C; }
};

inline AdaptiveGeometry check_adaptive_pool2d(const char* op, at::IntArrayRef input_size,
                                              at::IntArrayRef output_size) {
  const auto in = as_size4(input_size, op, "input size", "(N, C, H, W)");
  const HW out = as_hw(output_size, op, "output_size");
  TORCH_CHECK(in[1] > 0 && in[2] > 0 && in[3] > 0, op,
              ": input must have non-zero channels, height and width, got ", input_size);
  TORCH_CHECK(out.h >= 0 && out.w >= 0, op,
              ": elements of output_size must be greater than or equal to 0, got ", output_size);
  return {in[0], in[1], in[2], in[3], out.h, out.w};
}

// ---------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements (n > 0).
inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

// Whether every offset a kernel forms fits in int32: the kernels divide by sizes in their
// index type, and 32-bit division is several times cheaper than 64-bit on the GPU.
inline bool fits_int32(std::initializer_list<int64_t> extents) {
  for (int64_t e : extents) {
    if (e > std::numeric_limits<int32_t>::max()) return false;
  }
  return true;
}

// Runs op(t) for every t in [0, total): kernel<<<...>>>(total, op) on the current stream (a
// grid-stride loop over t), or a host loop in the emulation build.
template <typename Op>
inline void launch_elements(void (*kernel)(int64_t, Op), int64_t total, const Op& op) {
  if (total <= 0) return;
#ifdef MANUALCONV_EMULATE_ON_HOST
  (void)kernel;
  for (int64_t t = 0; t < total; ++t) op(t);
#else
  kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(total, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The body of every kernel: op(t) for each element index t, in a grid-stride loop.
#define MANUALCONV_FOR_EACH_ELEMENT(total, op)                                    \
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < (total); \
       t += int64_t(blockDim.x) * gridDim.x) {                                    \
    op(t);                                                                        \
  }

template <typename T>
__host__ __device__ __forceinline__ T min_of(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
__host__ __device__ __forceinline__ T max_of(T a, T b) {
  return a < b ? b : a;
}

// Calls body(index_t{}) with index_t = int32_t when use_int32, else int64_t.
template <typename F>
inline void dispatch_index_type(bool use_int32, const F& body) {
  if (use_int32) {
    body(int32_t{});
  } else {
    body(int64_t{});
  }
}

// The floating types of the CUDA kernels.
#define MANUALCONV_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace gpu

// ---------------------------------------------------------------------------
// CUDA kernels (host entry points), bound to the schemas of registration.cpp by
// registration.cu. Same signatures as the CPU kernels in manualconv.h.
// ---------------------------------------------------------------------------

// conv2d.cu
at::Tensor conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
at::Tensor conv2d_grad_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                                  at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups);
at::Tensor conv2d_grad_weight_cuda(const at::Tensor& input, const at::Tensor& grad_output,
                                   at::IntArrayRef weight_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups);

// pool2d.cu
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cuda(const at::Tensor& input,
                                                           at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride,
                                                           at::IntArrayRef padding,
                                                           at::IntArrayRef dilation,
                                                           bool ceil_mode);
at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                    at::IntArrayRef input_size);
at::Tensor avg_pool2d_forward_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   bool ceil_mode, bool count_include_pad,
                                   std::optional<int64_t> divisor_override);
at::Tensor avg_pool2d_backward_cuda(const at::Tensor& grad_output, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, bool ceil_mode,
                                    bool count_include_pad,
                                    std::optional<int64_t> divisor_override);
std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward_cuda(const at::Tensor& input,
                                                                    at::IntArrayRef output_size);
at::Tensor adaptive_avg_pool2d_forward_cuda(const at::Tensor& input,
                                            at::IntArrayRef output_size);
at::Tensor adaptive_avg_pool2d_backward_cuda(const at::Tensor& grad_output,
                                             at::IntArrayRef input_size);

}  // namespace manualconv
