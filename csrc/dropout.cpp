// Dropout's product on the CPU (docs/derivation.md, section 16): y = x ⊙ m, δx = δy ⊙ m, with the
// scaled keep mask m = s where the drawn bool mask holds, else 0 (s = 1/(1 − p), rounded as torch's
// noise.div_(1 − p) rounds it). The function is linear in x, so one kernel serves both directions.
//
// Why: torch's CPU dropout draws a float mask (4 bytes an entry), scales it in a second pass, and
// multiplies in a third; the mask drawn as bool (bernoulli_ draws the same values for any dtype:
// tests/test_norm.py checks the seeded equality) is 1 byte an entry, saved for the backward, and
// the product x·(m ? s : 0) is one pass. It stays a product, never a selection: inf·0 and NaN·0
// give NaN as torch's x·0 does.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "elementwise.h"
#include "output_cache.h"

namespace manualconv {
namespace {

// values ⊙ (mask ? scale : 0): the mask walked in storage order, the values read in their own
// strides, the result in the mask's strides
at::Tensor dropout_masked_scale(const at::Tensor& values, const at::Tensor& mask, double scale) {
  check_elementwise_input("dropout_masked_scale", values);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "dropout_masked_scale: mask must be a bool tensor, but got dtype ",
              mask.scalar_type());
  TORCH_CHECK(mask.device().is_cpu(), "dropout_masked_scale: mask must be a CPU tensor");
  TORCH_CHECK(values.sizes() == mask.sizes(), "dropout_masked_scale: values must have the mask's size ",
              mask.sizes(), ", but got ", values.sizes());
  at::NoGradGuard no_grad;
  const at::Tensor m = dense(mask);
  at::Tensor out = manualconv::empty_like(m, std::nullopt, values.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "manualconv_dropout_masked_scale", [&] {
    // the bool read as a byte (0 or 1) and multiplied in: no branch (a branch on a random mask is
    // mispredicted half the time)
    const uint8_t* keep = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    const scalar_t s = static_cast<scalar_t>(scale);
    map_backward_entries(m, values, out.mutable_data_ptr<scalar_t>(), [keep, s](int64_t i, scalar_t v) {
      return v * (s * static_cast<scalar_t>(keep[i]));  // s·1 = s, s·0 = 0; a product: inf·0 = NaN, as torch's
    });
  });
  return out;
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("dropout_masked_scale(Tensor values, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("dropout_masked_scale", TORCH_FN(manualconv::dropout_masked_scale));
}
