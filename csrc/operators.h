// The operators' entry points, written once for every device. Each one
//   1. skips autograd for its own ATen calls (the op has no autograd kernel: manualconv's autograd
//      Functions call it, and its inputs may require grad),
//   2. checks its arguments and computes the op's geometry (geometry.h), on the device its
//      kernels run on,
//   3. makes the tensors' device the current one (CUDA),
//   4. hands the checked tensors and geometry to the device's kernel.
// registration.cpp binds Operators<Cpu>::* to the schemas for the CPU, registration.cu binds
// Operators<Cuda>::* for CUDA.
//
// A device is a tag type (Cpu, Cuda). Its kernels are overloads taking the tag first, declared for
// each device by MANUALCONV_DECLARE_KERNELS: conv2d_forward(Cpu, ...) is the CPU kernel
// (conv2d.cpp), conv2d_forward(Cuda, ...) the CUDA one (cuda/conv2d.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "geometry.h"

// The operators, X(name) for each: registration.cpp defines their schemas, and every device binds
// Operators<Device>::name to each.
#define MANUALCONV_OPS(X)                                                                        \
  X(conv2d_forward) X(conv2d_grad_input) X(conv2d_grad_weight) X(max_pool2d_forward)             \
  X(max_pool2d_backward) X(avg_pool2d_forward) X(avg_pool2d_backward)                            \
  X(adaptive_max_pool2d_forward) X(adaptive_avg_pool2d_forward) X(adaptive_avg_pool2d_backward)

// The kernels of one device (Device: its tag type), each given checked arguments: the tensors
// as the op received them (any strides) and the op's geometry. bias may be undefined.
#define MANUALCONV_DECLARE_KERNELS(Device)                                                        \
  at::Tensor conv2d_forward(Device, const at::Tensor& input, const at::Tensor& weight,            \
                            const at::Tensor& bias, const Conv2dGeometry& g);                     \
  at::Tensor conv2d_grad_input(Device, const at::Tensor& grad_output, const at::Tensor& weight,   \
                               const Conv2dGeometry& g);                                          \
  at::Tensor conv2d_grad_weight(Device, const at::Tensor& input, const at::Tensor& grad_output,   \
                                const Conv2dGeometry& g);                                         \
  std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(Device, const at::Tensor& input,          \
                                                        const Pool2dGeometry& g);                 \
  at::Tensor max_pool2d_backward(Device, const at::Tensor& grad_output,                           \
                                 const at::Tensor& indices, at::IntArrayRef input_size);          \
  at::Tensor avg_pool2d_forward(Device, const at::Tensor& input, const Pool2dGeometry& g,         \
                                bool count_include_pad, std::optional<int64_t> divisor_override); \
  at::Tensor avg_pool2d_backward(Device, const at::Tensor& grad_output, const Pool2dGeometry& g,  \
                                 bool count_include_pad,                                          \
                                 std::optional<int64_t> divisor_override);                        \
  std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(Device, const at::Tensor& input, \
                                                                 const AdaptiveGeometry& g);      \
  at::Tensor adaptive_avg_pool2d_forward(Device, const at::Tensor& input,                         \
                                         const AdaptiveGeometry& g);                              \
  at::Tensor adaptive_avg_pool2d_backward(Device, const at::Tensor& grad_output,                  \
                                          const AdaptiveGeometry& g);

namespace manualconv {

// The CPU: its kernels run on CPU tensors, on the current thread pool; no device to select.
struct Cpu {
  static constexpr at::DeviceType type = at::kCPU;
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
};
MANUALCONV_DECLARE_KERNELS(Cpu)

// CUDA: defined in cuda/common.cuh, its kernels in cuda/*.cu (built with MANUALCONV_CUDA=1).
struct Cuda;
MANUALCONV_DECLARE_KERNELS(Cuda)

// The entry points (see the top of this file); the arguments are the schemas' (registration.cpp).
template <typename Device>
struct Operators {
  static at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Conv2dGeometry g = check_conv2d_forward(input, weight, bias, stride, padding, dilation,
                                                  groups, Device::type);
    const typename Device::Guard device(input.device());
    const at::Tensor no_bias;
    return manualconv::conv2d_forward(Device{}, input, weight,
                                      bias.has_value() ? *bias : no_bias, g);
  }

  static at::Tensor conv2d_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                      at::IntArrayRef input_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Conv2dGeometry g = check_conv2d_grad_input(grad_output, weight, input_size, stride,
                                                     padding, dilation, groups, Device::type);
    const typename Device::Guard device(grad_output.device());
    return manualconv::conv2d_grad_input(Device{}, grad_output, weight, g);
  }

  static at::Tensor conv2d_grad_weight(const at::Tensor& input, const at::Tensor& grad_output,
                                       at::IntArrayRef weight_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Conv2dGeometry g = check_conv2d_grad_weight(input, grad_output, weight_size, stride,
                                                      padding, dilation, groups, Device::type);
    const typename Device::Guard device(input.device());
    return manualconv::conv2d_grad_weight(Device{}, input, grad_output, g);
  }

  static std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(
      const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Pool2dGeometry g = check_max_pool2d(input, kernel_size, stride, padding, dilation,
                                              ceil_mode, Device::type);
    const typename Device::Guard device(input.device());
    return manualconv::max_pool2d_forward(Device{}, input, g);
  }

  static at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                        at::IntArrayRef input_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    check_max_pool2d_backward(grad_output, indices, input_size, Device::type);
    const typename Device::Guard device(grad_output.device());
    return manualconv::max_pool2d_backward(Device{}, grad_output, indices, input_size);
  }

  static at::Tensor avg_pool2d_forward(const at::Tensor& input, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       bool ceil_mode, bool count_include_pad,
                                       std::optional<int64_t> divisor_override) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Pool2dGeometry g = check_avg_pool2d_forward(input, kernel_size, stride, padding,
                                                      ceil_mode, divisor_override, Device::type);
    const typename Device::Guard device(input.device());
    return manualconv::avg_pool2d_forward(Device{}, input, g, count_include_pad, divisor_override);
  }

  static at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, at::IntArrayRef input_size,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, bool ceil_mode,
                                        bool count_include_pad,
                                        std::optional<int64_t> divisor_override) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Pool2dGeometry g =
        check_avg_pool2d_backward(grad_output, input_size, kernel_size, stride, padding,
                                  ceil_mode, divisor_override, Device::type);
    const typename Device::Guard device(grad_output.device());
    return manualconv::avg_pool2d_backward(Device{}, grad_output, g, count_include_pad,
                                           divisor_override);
  }

  static std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(
      const at::Tensor& input, at::IntArrayRef output_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const AdaptiveGeometry g = check_adaptive_pool2d_forward(
        "manualconv::adaptive_max_pool2d_forward", input, output_size, Device::type);
    const typename Device::Guard device(input.device());
    return manualconv::adaptive_max_pool2d_forward(Device{}, input, g);
  }

  static at::Tensor adaptive_avg_pool2d_forward(const at::Tensor& input,
                                                at::IntArrayRef output_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const AdaptiveGeometry g = check_adaptive_pool2d_forward(
        "manualconv::adaptive_avg_pool2d_forward", input, output_size, Device::type);
    const typename Device::Guard device(input.device());
    return manualconv::adaptive_avg_pool2d_forward(Device{}, input, g);
  }

  static at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& grad_output,
                                                 at::IntArrayRef input_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const AdaptiveGeometry g =
        check_adaptive_avg_pool2d_backward(grad_output, input_size, Device::type);
    const typename Device::Guard device(grad_output.device());
    return manualconv::adaptive_avg_pool2d_backward(Device{}, grad_output, g);
  }
};

}  // namespace manualconv
