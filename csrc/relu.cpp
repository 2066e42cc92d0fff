// ReLU's backward on the CPU (docs/derivation.md, section 12), and the selection an in-place
// hardtanh's backward makes (hardtanh_backward_mask, select_backward, below):
//
//   δz = δy where y > 0 (or y is NaN, as torch), else 0      (y = max(z, 0), the saved output)
//
// a selection, never δy·1[y > 0] (0·inf and 0·NaN would give NaN where torch gives 0). One pass
// over y and δy, built for the kernels' capability (the compiler turns the select into a blend);
// torch.where on a bool mask takes several passes (measured: 4.3 ms against 0.5 ms here for
// (128, 16, 32, 32) channels-last float32, AMD EPYC Zen 4, 2 threads).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "elementwise.h"
#include "low_precision.h"
#include "output_cache.h"

namespace manualconv {
namespace {

at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  TORCH_CHECK(output.device().is_cpu(), "relu_backward: output must be a CPU tensor, but got device ",
              output.device());
  TORCH_CHECK(output.scalar_type() == at::kFloat || output.scalar_type() == at::kDouble,
              "relu_backward: output must be float32 or float64 (bfloat16/float16 are computed in "
              "float32), but got dtype ", output.scalar_type());
  check_grad_output("relu_backward", grad_output, output, "output");
  at::NoGradGuard no_grad;
  // walked in storage order: y as it is when dense (else a contiguous copy), δy in its own strides
  const at::Tensor y = dense(output);
  at::Tensor dz = manualconv::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "manualconv_relu_backward", [&] {
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    // δy loaded whatever y is: the select becomes a blend
    map_backward_entries(y, grad_output, dz.mutable_data_ptr<scalar_t>(), [y_data](int64_t i, scalar_t d) {
      return y_data[i] <= scalar_t(0) ? scalar_t(0) : d;  // f′ = 0 on y ≤ 0 selects 0
    });
  });
  return dz;
}

// Where hardtanh's derivative is 1, read from its output y = clamp(x, min_val, max_val): min_val <
// y < max_val, exactly where min_val < x < max_val (NaN: neither). One byte an entry: what an
// in-place hardtanh keeps for its backward instead of a copy of x (autograd.py,
// InplaceActivationFromOutputFunction).
at::Tensor hardtanh_backward_mask(const at::Tensor& output, double min_val, double max_val) {
  TORCH_CHECK(output.device().is_cpu(), "hardtanh_backward_mask: output must be a CPU tensor, but got device ", output.device());
  TORCH_CHECK(at::isFloatingType(output.scalar_type()), "hardtanh_backward_mask: output must be a floating-point tensor, but got dtype ",
              output.scalar_type());
  at::NoGradGuard no_grad;
  const at::Tensor y = dense(output);
  at::Tensor support = manualconv::empty_like(y, std::nullopt, at::kBool);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "manualconv_hardtanh_backward_mask", [&] {
    using compare_t = at::opmath_type<scalar_t>;  // float64 in float64, the others in float32
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const compare_t lo = static_cast<compare_t>(min_val), hi = static_cast<compare_t>(max_val);
    map_entries(y.numel(), support.mutable_data_ptr<bool>(), [y_data, lo, hi](int64_t i) {
      const compare_t v = static_cast<compare_t>(y_data[i]);
      return v > lo && v < hi;
    });
  });
  return support;
}

// δx = δy where the support holds, else 0: a selection (never δy·0, NaN for δy = ±inf or NaN), δy
// read in its own strides, δx in the support's
at::Tensor select_backward(const at::Tensor& grad_output, const at::Tensor& support) {
  TORCH_CHECK(support.device().is_cpu() && grad_output.device().is_cpu(),
              "select_backward: grad_output and support must be CPU tensors");
  TORCH_CHECK(support.scalar_type() == at::kBool, "select_backward: support must be a bool tensor, but got dtype ",
              support.scalar_type());
  TORCH_CHECK(at::isFloatingType(grad_output.scalar_type()),
              "select_backward: grad_output must be a floating-point tensor, but got dtype ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.sizes() == support.sizes(), "select_backward: grad_output must have the support's size ",
              support.sizes(), ", but got ", grad_output.sizes());
  at::NoGradGuard no_grad;
  const at::Tensor m = dense(support);
  at::Tensor dx = manualconv::empty_like(m, std::nullopt, grad_output.scalar_type());  // the support's strides
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_output.scalar_type(), "manualconv_select_backward", [&] {
    // the flags as bytes (not bools, whose 0/1 range lets the compiler turn the select into a
    // branch, mispredicted on half the entries: 3.2 ms against relu_backward's 0.13 ms for
    // (64, 96, 16, 16) float32, AMD EPYC Zen 4, 2 threads), compared as numbers like relu_backward's
    // y, so that the select becomes a blend
    const uint8_t* m_data = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    map_backward_entries(m, grad_output, dx.mutable_data_ptr<scalar_t>(), [m_data](int64_t i, scalar_t d) {
      const float flag = static_cast<float>(m_data[i]);
      return flag <= 0.0f ? scalar_t(0) : d;
    });
  });
  return dx;
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("relu_backward(Tensor grad_output, Tensor output) -> Tensor");
  m.def("hardtanh_backward_mask(Tensor output, float min_val, float max_val) -> Tensor");
  m.def("select_backward(Tensor grad_output, Tensor support) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("relu_backward", TORCH_FN(manualconv::InFloat32<&manualconv::relu_backward>::call));
  m.impl("hardtanh_backward_mask", TORCH_FN(manualconv::hardtanh_backward_mask));
  m.impl("select_backward", TORCH_FN(manualconv::select_backward));
}
