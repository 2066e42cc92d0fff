// GELU, forward and backward, on the CPU (docs/derivation.md, "Activations"):
//
//   'none'   y = x·Φ(x),                 Φ(x) = ½(1 + erf(x/√2))
//            δx = δy·(Φ(x) + x·φ(x)),    φ(x) = e^(−x²/2)/√(2π)
//   'tanh'   y = ½x(1 + t),              t = tanh u,  u = √(2/π)(x + κx³),  κ = 0.044715
//            δx = δy·(½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3κx²))
//
// One pass over the tensors (x, and δy in the backward): each entry's y or δx is computed from x
// alone, in a plain loop built for the kernels' capability (cpu_capability.h's run_for_cpu), which
// the compiler vectorises: the transcendental functions are written out below as polynomials the
// loop evaluates lane by lane (no call into libm but the baseline build's fmaf), both branches of a
// piecewise formula computed and one selected. float64 takes the C library's erf, exp and tanh (correctly rounded to ~1 ulp:
// the float64 tests compare with torch to 1e-14), a scalar loop.
//
// float32 erf, exp and tanh — the method:
//   e^a (a ≤ 0): exp.h (Cody–Waite reduction, a degree-6 polynomial; shared with activations.cpp).
//   erf(z) = 1 − erfc(z), erfc through the scaled complement erfcx(z) = e^(z²)·erfc(z) (smooth,
//     1 at 0, of order 1/z), a polynomial T(t) of degree 10 in t = 1/(1 + 0.4|z|) over all z ≥ 0
//     (t ∈ (0, 1]; the form of Numerical Recipes' erfcc, W. H. Press et al., 3rd ed., §6.2.2,
//     there with e^(poly) and a Chebyshev fit): erfc(|z|) = e^(−z²)·T(t). Φ(x) = ½erfc(−x/√2) is
//     then ½erfc(|z|) for x < 0 (no cancellation in 1 + erf) or 1 − ½erfc(|z|) (≥ ½).
//   T is a minimax fit in relative error (Lawson's iteratively reweighted least squares on 4000
//   Chebyshev nodes of z ∈ [0, 9.3] (Φ underflows beyond), numpy float64, against scipy's erfcx;
//   coefficients rounded to float32; as exp.h's polynomial). Fit error: T 1.2e-9.
//   e^(−x²/2) takes x² exactly (its rounding error by an FMA) so that its error does not grow
//   with x².
//   'tanh': 1 + t = 2/(1 + e^(−2u)) and 1 − t² = 4e^(−2|u|)/(1 + e^(−2|u|))² (identities of tanh,
//   free of the cancellation of 1 + t and 1 − t² where t ≈ ±1).
//   Max error measured against float64 (scipy's erfc and exp; every float32 x in [−16, 16] step
//   2⁻¹⁴ and ±[16, 10⁴] geometrically; δy = 1; results above 1e-30; baseline, AVX2, AVX-512 builds):
//     'none'  y 6.1 ulp;  δx 5.7 ulp of the larger of Φ(x), |x·φ(x)| (δx has a root at x ≈ −0.75)
//     'tanh'  y 18 ulp, δx 19 ulp on x ≥ −4 (160, 145 down to x = −10): the rounding of u in
//             float32 (a few ulp) is multiplied by 2|u| in e^(−2|u|), as in any float32 evaluation
//   (torch's float32 kernels on the same grid: 'none' y off by up to 1.2e-6 absolute, ours 3.8e-7).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "cpu_capability.h"
#include "elementwise.h"
#include "exp.h"
#include "low_precision.h"
#include "output_cache.h"

namespace manualconv {
namespace {

constexpr double kSqrt1_2 = 0.70710678118654752440;      // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/√(2π)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // √(2/π)
constexpr double kKappa = 0.044715;

enum class Approximate { None, Tanh };

Approximate parse_approximate(std::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu: approximate argument must be either none or tanh, but got approximate=",
              approximate);
  return approximate == "tanh" ? Approximate::Tanh : Approximate::None;
}

// l = x² − h exactly, h = fl(x·x): the product's rounding error, which one fused multiply-add
// computes exactly (an instruction in the AVX2 / AVX-512 builds, libm's fmaf in the baseline one)
inline float square_error(float x, float h) { return std::fma(x, x, -h); }

// erfcx(|z|) = e^(z²)·erfc(|z|) = T(t), t = 1/(1 + 0.4|z|) ∈ (0, 1] (finite for every |z|)
inline float erfcx(float abs_z) {
  constexpr float kT[] = {-1.033373701e-05f, 2.259469926e-01f, 2.225307375e-01f, 2.288774848e-01f,
                          7.872098684e-02f,  3.952785432e-01f, -4.844394922e-01f, 7.632052302e-01f,
                          -6.469694376e-01f, 2.566066086e-01f, -3.974730894e-02f};
  return polynomial(kT, 1.0f / (1.0f + 0.4f * abs_z));
}

// Φ(x) = ½(1 + erf(z)) = ½erfc(−z), z = x/√2: ½erfc(|z|) for x < 0, 1 − ½erfc(|z|) for x ≥ 0,
// erfc(|z|) = e·erfcx(|z|) given e = e^(−z²) = e^(−x²/2)
inline float normal_cdf(float x, float e) {
  const float half_erfc = 0.5f * (e * erfcx(std::fabs(x * float(kSqrt1_2))));
  return x < 0.0f ? half_erfc : 1.0f - half_erfc;
}
inline double normal_cdf(double x, double) { return 0.5 * (1.0 + std::erf(x * kSqrt1_2)); }

// e^(−x²/2), φ(x)'s exponential (and, as e^(−z²), erfc's): x² rounded to float32 would be off by
// up to x²·2⁻²⁴, and e^(−x²/2) by as many ulps; its rounding error l is passed on as a correction
inline float gaussian(float x) {
  const float h = x * x;
  return exp_nonpositive(-0.5f * h, -0.5f * square_error(x, h));
}
inline double gaussian(double x) { return std::exp(-0.5 * (x * x)); }

// 1 + tanh u = 2/(1 + e^(−2u)): with e = e^(−2|u|), 2/(1 + e) for u ≥ 0 and 2e/(1 + e) for u < 0
// (no cancellation where tanh u ≈ −1)
inline float one_plus_tanh(float u, float e) { return 2.0f * (u < 0.0f ? e : 1.0f) / (1.0f + e); }
inline double one_plus_tanh(double u, double) { return 1.0 + std::tanh(u); }

// 1 − tanh² u = 4e/(1 + e)², e = e^(−2|u|) (no cancellation where tanh u ≈ ±1)
inline float one_minus_tanh_squared(float, float e) { return 4.0f * e / ((1.0f + e) * (1.0f + e)); }
inline double one_minus_tanh_squared(double u, double) {
  const double t = std::tanh(u);
  return 1.0 - t * t;
}

// e^(−2|u|), the exponential both are written with
inline float tanh_exponential(float u) { return exp_nonpositive(-2.0f * std::fabs(u)); }
inline double tanh_exponential(double) { return 0.0; }  // (float64 takes std::tanh)

// u = √(2/π)(x + κx³)
template <typename scalar_t>
inline scalar_t tanh_argument(scalar_t x) {
  return scalar_t(kSqrt2OverPi) * (x + scalar_t(kKappa) * x * x * x);
}

// y = x·Φ(x)
template <typename scalar_t>
inline scalar_t gelu(scalar_t x) {
  return x * normal_cdf(x, gaussian(x));
}

// y = ½x(1 + t), t = tanh u
template <typename scalar_t>
inline scalar_t gelu_tanh(scalar_t x) {
  const scalar_t u = tanh_argument(x);
  return scalar_t(0.5) * x * one_plus_tanh(u, tanh_exponential(u));
}

// δx = δy·(Φ(x) + x·φ(x)), φ(x) = e^(−x²/2)/√(2π): one exponential for both
template <typename scalar_t>
inline scalar_t gelu_grad(scalar_t dy, scalar_t x) {
  const scalar_t e = gaussian(x);
  const scalar_t pdf = e * scalar_t(kInvSqrt2Pi);  // φ(x)
  return dy * (normal_cdf(x, e) + x * pdf);
}

// δx = δy·(½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3κx²))
template <typename scalar_t>
inline scalar_t gelu_tanh_grad(scalar_t dy, scalar_t x) {
  const scalar_t u = tanh_argument(x), e = tanh_exponential(u);
  const scalar_t du = scalar_t(kSqrt2OverPi) * (scalar_t(1) + scalar_t(3 * kKappa) * x * x);
  return dy * (scalar_t(0.5) * one_plus_tanh(u, e) +
               scalar_t(0.5) * x * one_minus_tanh_squared(u, e) * du);
}

at::Tensor gelu_forward(const at::Tensor& input, c10::string_view approximate) {
  check_elementwise_input("gelu_forward", input);
  const Approximate a = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  at::NoGradGuard no_grad;
  const at::Tensor x = dense(input);
  at::Tensor y = manualconv::empty_like(x);  // x's strides (preserve_format on a dense tensor)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_gelu_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    if (a == Approximate::Tanh) {
      map_entries(x.numel(), y_data, [&](int64_t i) { return gelu_tanh(x_data[i]); });
    } else {
      map_entries(x.numel(), y_data, [&](int64_t i) { return gelu(x_data[i]); });
    }
  });
  return y;
}

at::Tensor gelu_backward(const at::Tensor& grad_output, const at::Tensor& input,
                         c10::string_view approximate) {
  check_elementwise_input("gelu_backward", input);
  check_grad_output("gelu_backward", grad_output, input, "input");
  const Approximate a = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  at::NoGradGuard no_grad;
  const at::Tensor x = dense(input);
  at::Tensor dx = manualconv::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_gelu_backward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    if (a == Approximate::Tanh) {
      map_backward_entries(x, grad_output, dx_data,
                           [x_data](int64_t i, scalar_t d) { return gelu_tanh_grad(d, x_data[i]); });
    } else {
      map_backward_entries(x, grad_output, dx_data, [x_data](int64_t i, scalar_t d) { return gelu_grad(d, x_data[i]); });
    }
  });
  return dx;
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("gelu_forward(Tensor input, str approximate) -> Tensor");
  m.def("gelu_backward(Tensor grad_output, Tensor input, str approximate) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("gelu_forward", TORCH_FN(manualconv::InFloat32<&manualconv::gelu_forward>::call));
  m.impl("gelu_backward", TORCH_FN(manualconv::InFloat32<&manualconv::gelu_backward>::call));
}
