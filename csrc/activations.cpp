// The pointwise activations besides ReLU and GELU, forward and backward, on the CPU
// (docs/derivation.md, "Activations"; reference.py has the same formulas in tensor code):
//
//   silu         y = x·σ(x)                            δx = δy·σ(x)·(1 + x·(1 − σ(x)))
//   hardtanh     y = clamp(x, lo, hi)                  δx = δy on lo < x < hi, else 0
//   hardswish    y = x·min(max(x + 3, 0), 6)/6         δx = 0 | δy·(x/3 + ½) | δy  on x ≤ −3 | −3 < x < 3 | x ≥ 3
//   hardsigmoid  y = min(max(x + 3, 0), 6)/6           δx = δy/6 on −3 < x < 3, else 0
//   leaky_relu   y = x | a·x  on x > 0 | x ≤ 0         δx = δy | a·δy
//   elu          y = α(eˣ − 1) | x  on x ≤ 0 | x > 0   δx = δy·αeˣ | δy
//
// and the backward of the two squashing functions from their output y (the forward is torch's
// sigmoid / tanh: autograd.py), which is what their derivatives are written in:
//
//   sigmoid      y = σ(x)                              δx = δy·(1 − y)·y
//   tanh         y = A·tanh(S·x)                       δx = δy·S·(A − y²/A)   (torch.tanh: A = S = 1)
//
// (ReLU6 is hardtanh(0, 6).) Each entry's y or δx is computed from x alone, in one pass over x
// (and δy), a plain loop built for the kernels' capability (elementwise.h's map_entries), which the
// compiler vectorises: both sides of a piecewise formula are computed and one selected. The
// selections are torch's at the breakpoints and at NaN (a NaN x gives a NaN y; in the backward it
// takes the branch torch's kernels give it: 0 for hardtanh / hardsigmoid, the middle one for
// hardswish, the slope for leaky_relu, αeˣ = NaN for elu). σ(x) and eˣ in float32 by exp.h's
// polynomial (σ(x) = 1/(1 + e) or e/(1 + e), e = e^(−|x|), and 1 − σ(x) = σ(−x) the other one:
// no cancellation), in float64 by the C library's exp and expm1.
// Why C++ (AMD EPYC Zen 4, AVX-512, 2 threads, (128, 64, 32, 32) channels-last float32, forward +
// backward, torch.nn.functional = 1): the same formulas as tensor code took 0.20 (hardswish) to
// 0.46 (hardtanh) of torch's speed, each a few passes over memory.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>

#include "elementwise.h"
#include "exp.h"
#include "low_precision.h"
#include "output_cache.h"

namespace manualconv {
namespace {

// ---------------------------------------------------------------------------------------------
// The exponentials, in float32 by exp.h, in float64 by the C library

inline float exp_of_nonpositive(float a) { return exp_nonpositive(a); }
inline double exp_of_nonpositive(double a) { return std::exp(a); }
inline float expm1_of_nonpositive(float a) { return expm1_nonpositive(a); }
inline double expm1_of_nonpositive(double a) { return std::expm1(a); }

// σ(x) = 1/(1 + e^(−x)) and 1 − σ(x) = σ(−x), from e = e^(−|x|) ≤ 1
template <typename scalar_t>
struct Logistic {
  scalar_t s, one_minus_s;
  explicit Logistic(scalar_t x) {
    const scalar_t e = exp_of_nonpositive(-std::fabs(x)), d = scalar_t(1) / (scalar_t(1) + e);
    s = x >= scalar_t(0) ? d : e * d;  // (NaN: e·d, NaN)
    one_minus_s = x >= scalar_t(0) ? e * d : d;
  }
};

// ---------------------------------------------------------------------------------------------
// The activations: y = forward(x), δx = backward(δy, x); p their parameters

struct Silu {  // y = x·σ(x); δx = δy·σ(x)·(1 + x·(1 − σ(x)))
  static constexpr int kParams = 0;
  template <typename T> static T forward(T x, const T*) { return x * Logistic<T>(x).s; }
  template <typename T> static T backward(T dy, T x, const T*) {
    const Logistic<T> l(x);
    return dy * (l.s * (T(1) + x * l.one_minus_s));
  }
};

struct Hardtanh {  // y = clamp(x, lo, hi); δx = δy on lo < x < hi, else 0   (p = lo, hi)
  static constexpr int kParams = 2;
  template <typename T> static T forward(T x, const T* p) { return x < p[0] ? p[0] : (x > p[1] ? p[1] : x); }
  template <typename T> static T backward(T dy, T x, const T* p) { return x > p[0] && x < p[1] ? dy : T(0); }
};

// min(max(v, 0), 6), a NaN v kept
template <typename T>
inline T relu6(T v) { return v < T(0) ? T(0) : (v > T(6) ? T(6) : v); }

struct Hardswish {  // y = x·relu6(x + 3)/6; δx = 0 | δy·(x/3 + ½) | δy on x ≤ −3 | −3 < x < 3 | x ≥ 3
  static constexpr int kParams = 0;
  template <typename T> static T forward(T x, const T*) { return x * relu6(x + T(3)) / T(6); }
  template <typename T> static T backward(T dy, T x, const T*) {
    return x <= T(-3) ? T(0) : (x >= T(3) ? dy : dy * (x / T(3) + T(0.5)));
  }
};

struct Hardsigmoid {  // y = relu6(x + 3)/6; δx = δy/6 on −3 < x < 3, else 0
  static constexpr int kParams = 0;
  // torch multiplies by 1/6 rounded to float32, for float64 too (reference.py: HARDSIGMOID_SLOPE)
  template <typename T> static T forward(T x, const T*) { return relu6(x + T(3)) / T(6); }
  template <typename T> static T backward(T dy, T x, const T*) {
    return x > T(-3) && x < T(3) ? dy * T(1.0f / 6.0f) : T(0);
  }
};

struct LeakyRelu {  // y = x | a·x on x > 0 | x ≤ 0; δx = δy | a·δy   (p = a)
  static constexpr int kParams = 1;
  template <typename T> static T forward(T x, const T* p) { return x > T(0) ? x : x * p[0]; }
  template <typename T> static T backward(T dy, T x, const T* p) { return x > T(0) ? dy : dy * p[0]; }
};

// x where x ≤ 0 (or NaN), else 0: where every lane's exponential is taken (a positive x selects
// the other side of the formula)
template <typename T>
inline T nonpositive_part(T x) { return x > T(0) ? T(0) : x; }

struct Elu {  // y = α(eˣ − 1) | x on x ≤ 0 | x > 0; δx = δy·αeˣ | δy   (p = α)
  static constexpr int kParams = 1;
  template <typename T> static T forward(T x, const T* p) {
    return x <= T(0) ? p[0] * expm1_of_nonpositive(nonpositive_part(x)) : x;
  }
  template <typename T> static T backward(T dy, T x, const T* p) {
    return x > T(0) ? dy : dy * (p[0] * exp_of_nonpositive(nonpositive_part(x)));
  }
};

// ---------------------------------------------------------------------------------------------
// The squashing functions' derivatives in terms of their output: δx = backward(δy, y)

struct Sigmoid {  // δx = δy·(1 − y)·y   (torch's order of the products: equal to its sigmoid_backward)
  static constexpr int kParams = 0;
  template <typename T> static T backward(T dy, T y, const T*) { return dy * (T(1) - y) * y; }
};

struct Tanh {  // δx = δy·S·(A − y²/A)   (p = A, S); A − y²/A as one fused multiply-add, as torch's
               // tanh_backward computes 1 − y² (A = S = 1: equal to it)
  static constexpr int kParams = 2;
  template <typename T> static T backward(T dy, T y, const T* p) {
    return dy * (p[1] * std::fma(-y / p[0], y, p[0]));
  }
};

// f(Activation{}), the activation `kind` names, once its parameter count is checked
template <typename Activation, typename F>
auto with_checked_params(const char* op, std::string_view kind, size_t params, const F& f) {
  constexpr size_t expected = Activation::kParams;
  TORCH_CHECK(params == expected, op, ": ", kind, " takes ", expected, " params, but got ", params);
  return f(Activation{});
}

// f(Activation{}) for the activation `kind` names, with its parameter count checked
template <typename F>
auto with_activation(const char* op, std::string_view kind, size_t params, const F& f) {
  if (kind == "silu") return with_checked_params<Silu>(op, kind, params, f);
  if (kind == "hardtanh") return with_checked_params<Hardtanh>(op, kind, params, f);
  if (kind == "hardswish") return with_checked_params<Hardswish>(op, kind, params, f);
  if (kind == "hardsigmoid") return with_checked_params<Hardsigmoid>(op, kind, params, f);
  if (kind == "leaky_relu") return with_checked_params<LeakyRelu>(op, kind, params, f);
  TORCH_CHECK(kind == "elu", op, ": kind must be one of silu, hardtanh, hardswish, hardsigmoid, "
              "leaky_relu, elu, but got kind=", kind);
  return with_checked_params<Elu>(op, kind, params, f);
}

// f(Activation{}) for the squashing function `kind` names (backward from the output)
template <typename F>
auto with_squashing(const char* op, std::string_view kind, size_t params, const F& f) {
  if (kind == "sigmoid") return with_checked_params<Sigmoid>(op, kind, params, f);
  TORCH_CHECK(kind == "tanh", op, ": kind must be one of sigmoid, tanh, but got kind=", kind);
  return with_checked_params<Tanh>(op, kind, params, f);
}

// The parameters in the tensor's dtype (at most two; captured by value: see map_entries)
template <typename scalar_t>
struct Params {
  scalar_t p[2] = {};
  explicit Params(at::ArrayRef<double> params) {
    for (size_t k = 0; k < params.size() && k < 2; ++k) p[k] = static_cast<scalar_t>(params[k]);
  }
};

at::Tensor activation_forward(const at::Tensor& input, c10::string_view kind_name, at::ArrayRef<double> params) {
  constexpr const char* op = "activation_forward";
  const std::string_view kind(kind_name.data(), kind_name.size());
  return with_activation(op, kind, params.size(), [&](auto activation) {
    using Activation = decltype(activation);
    check_elementwise_input(op, input);
    at::NoGradGuard no_grad;
    const at::Tensor x = dense(input);
    at::Tensor y = manualconv::empty_like(x);  // x's strides (preserve_format on a dense tensor)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_activation_forward", [&] {
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      const Params<scalar_t> p(params);
      map_entries(x.numel(), y.mutable_data_ptr<scalar_t>(),
                  [x_data, p](int64_t i) { return Activation::forward(x_data[i], p.p); });
    });
    return y;
  });
}

// δx[i] = Activation::backward(δy[i], s[i], params) for the saved tensor s (`name`d: the input x,
// or the output y of the squashing functions), walked in s's storage order
template <typename Activation>
at::Tensor backward_entries(const char* op, const at::Tensor& grad_output, const at::Tensor& saved,
                            const char* name, at::ArrayRef<double> params) {
  check_elementwise_input(op, saved);
  check_grad_output(op, grad_output, saved, name);
  at::NoGradGuard no_grad;
  const at::Tensor s = dense(saved);
  at::Tensor dx = manualconv::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "manualconv_activation_backward", [&] {
    const scalar_t* s_data = s.const_data_ptr<scalar_t>();
    const Params<scalar_t> p(params);
    map_backward_entries(s, grad_output, dx.mutable_data_ptr<scalar_t>(), [s_data, p](int64_t i, scalar_t d) {
      return Activation::backward(d, s_data[i], p.p);
    });
  });
  return dx;
}

at::Tensor activation_backward(const at::Tensor& grad_output, const at::Tensor& input, c10::string_view kind_name,
                               at::ArrayRef<double> params) {
  constexpr const char* op = "activation_backward";
  const std::string_view kind(kind_name.data(), kind_name.size());
  return with_activation(op, kind, params.size(), [&](auto activation) {
    return backward_entries<decltype(activation)>(op, grad_output, input, "input", params);
  });
}

// δx = δy ⊙ f′(x) written in y = f(x): the sigmoid's and tanh's backward
at::Tensor activation_backward_from_output(const at::Tensor& grad_output, const at::Tensor& output,
                                           c10::string_view kind_name, at::ArrayRef<double> params) {
  constexpr const char* op = "activation_backward_from_output";
  const std::string_view kind(kind_name.data(), kind_name.size());
  return with_squashing(op, kind, params.size(), [&](auto activation) {
    return backward_entries<decltype(activation)>(op, grad_output, output, "output", params);
  });
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("activation_forward(Tensor input, str kind, float[] params) -> Tensor");
  m.def("activation_backward(Tensor grad_output, Tensor input, str kind, float[] params) -> Tensor");
  m.def("activation_backward_from_output(Tensor grad_output, Tensor output, str kind, float[] params) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("activation_forward", TORCH_FN(manualconv::InFloat32<&manualconv::activation_forward>::call));
  m.impl("activation_backward", TORCH_FN(manualconv::InFloat32<&manualconv::activation_backward>::call));
  m.impl("activation_backward_from_output",
         TORCH_FN(manualconv::InFloat32<&manualconv::activation_backward_from_output>::call));
}
