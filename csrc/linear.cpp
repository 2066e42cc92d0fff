// The fully connected layer's backward on the CPU (docs/derivation.md, section 11):
//
//   z = x Wᵀ + b   (rows of x are samples)      δx = δ W        ∂J/∂W = δᵀ x
//
// two GEMMs that do not depend on each other. torch's BLAS runs each on every thread in turn; a
// GEMM of a layer this size scales badly over threads, so on two threads the two run side by side,
// one on each (inside at::parallel_for the BLAS runs on one thread), where that was measured to win
// (linear_backward_side_by_side). The results are the same GEMMs' (the tests compare both
// schedules with torch).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "output_cache.h"

namespace manualconv {
namespace {

// Whether δx = δW and ∂W = δᵀx run side by side, one thread each, rather than one after the other
// on all threads. Measured (AMD EPYC Zen 4, 2 threads, float32, torch's MKL; n rows, in → out
// features, one GEMM = 2·n·in·out FLOP; time of both GEMMs, one after the other / side by side):
//   128 × 84 → 10 (LeNet-5's last layer, 0.2 MFLOP)         13.8 / 8.4 µs    1.63
//   512 × 128 → 10 (1.3 MFLOP)                              33.9 / 25.0 µs   1.36
//   128 × 512 → 256 (the benchmark's row, 34 MFLOP)         388 / 347 µs     1.12
//   64 × 2048 → 1000 (ResNet-50's classifier, 262 MFLOP)    3.77 / 3.44 ms   1.10
//   1024 × 1024 → 1024 (2.1 GFLOP)                          23.2 / 22.6 ms   1.03
//   4096 × 1024 → 1024 (8.6 GFLOP)                          92.1 / 93.6 ms   0.98
//   128 × 4096 → 4096 (VGG's classifier, 4.3 GFLOP)         69.2 / 77.2 ms   0.90
//   16 × 25088 → 4096 (VGG's first, 3.3 GFLOP)              197 / 242 ms     0.81
// Large GEMMs already use both threads well, and two reading a large W at once share the memory
// bandwidth (VGG's): side by side up to 512 MFLOP a GEMM. More threads than two were not measured:
// there the GEMMs run one after the other, as torch's.
constexpr double kSideBySideMaxFlops = 512e6;

bool linear_backward_side_by_side(int64_t rows, int64_t in_features, int64_t out_features, at::ScalarType dtype) {
  const double flops = 2.0 * double(rows) * double(in_features) * double(out_features);
  return at::get_num_threads() == 2 && (dtype == at::kFloat || dtype == at::kDouble) && flops <= kSideBySideMaxFlops;
}

// (δx, ∂J/∂W) of z = x Wᵀ: δ (n × out), x (n × in), W (out × in)
std::tuple<at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& weight) {
  // (the checks of manualconv/checks.py's check_linear_backward, with its messages)
  TORCH_CHECK(grad_output.dim() == 2 && input.dim() == 2 && weight.dim() == 2,
              "linear_backward: grad_output, input and weight must be matrices, but got sizes ", grad_output.sizes(),
              ", ", input.sizes(), " and ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), "linear_backward: input of size ", input.sizes(),
              " does not fit weight of size ", weight.sizes());
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(1) == weight.size(0),
              "linear_backward: grad_output must have the forward output's size [", input.size(0), ", ",
              weight.size(0), "], but got ", grad_output.sizes());
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu() && grad_output.device().is_cpu(),
              "linear_backward: expected CPU tensors");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()) && input.scalar_type() == weight.scalar_type() &&
                  input.scalar_type() == grad_output.scalar_type(),
              "linear_backward: grad_output, input and weight must have one floating-point dtype, but got ",
              grad_output.scalar_type(), ", ", input.scalar_type(), " and ", weight.scalar_type());
  const auto options = input.options();
  at::Tensor grad_input = manualconv::empty({input.size(0), input.size(1)}, options);
  at::Tensor grad_weight = manualconv::empty({weight.size(0), weight.size(1)}, options);
  const auto gemm = [&](int64_t which) {
    // (the guard is thread-local, so each worker sets it: products of tensors that require grad
    // must not go through autograd)
    at::AutoDispatchBelowADInplaceOrView guard;
    if (which == 0) {
      at::mm_out(grad_input, grad_output, weight);  // δx = δ W
    } else {
      at::mm_out(grad_weight, grad_output.t(), input);  // ∂J/∂W = δᵀ x
    }
  };
  if (linear_backward_side_by_side(input.size(0), input.size(1), weight.size(0), input.scalar_type())) {
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t which = begin; which < end; ++which) gemm(which);
    });
  } else {
    gemm(0);
    gemm(1);
  }
  return {grad_input, grad_weight};
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("linear_backward(Tensor grad_output, Tensor input, Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("linear_backward", TORCH_FN(manualconv::linear_backward));
}
