// float16 / bfloat16 on the CPU: a kernel written for float32 / float64 computes such inputs in
// float32 and rounds its result once to the input dtype. InFloat32<kernel>::call does it for any
// kernel (registration.cpp binds every op's CPU kernel through it), so no kernel has its own copy.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace manualconv {

inline bool is_low_precision(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

// The floating dtypes of a call's tensor arguments, collected one argument at a time.
struct CallDtypes {
  std::optional<at::ScalarType> first;
  bool all_equal = true;

  void see(const at::Tensor& t) {
    if (!t.defined() || !t.is_floating_point()) return;
    if (!first) first = t.scalar_type();
    all_equal = all_equal && t.scalar_type() == *first;
  }
  void see(const std::optional<at::Tensor>& t) {
    if (t.has_value()) see(*t);
  }
  template <typename T>
  void see(const T&) {}  // sizes, flags: no dtype

  // The low-precision dtype every floating tensor has, if that is what the call has. Mixed
  // dtypes pass through unchanged: the kernel's dtype check then reports them.
  std::optional<at::ScalarType> common_low_precision() const {
    if (first && all_equal && is_low_precision(*first)) return first;
    return std::nullopt;
  }
};

// An argument as the float32 kernel takes it: low-precision tensors widened, the rest as is.
inline at::Tensor widened(const at::Tensor& t) {
  return t.defined() && is_low_precision(t.scalar_type()) ? t.to(at::kFloat) : t;
}
inline std::optional<at::Tensor> widened(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(widened(*t)) : t;
}
template <typename T>
const T& widened(const T& arg) {
  return arg;
}

// A kernel's result rounded to `dtype`: its floating tensors (indices stay int64). The layout
// is kept (to() preserves the memory format).
inline at::Tensor rounded(const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() && t.is_floating_point() ? t.to(dtype) : t;
}
template <typename... Tensors>
std::tuple<Tensors...> rounded(const std::tuple<Tensors...>& t, at::ScalarType dtype) {
  return std::apply([&](const auto&... e) { return std::tuple<Tensors...>(rounded(e, dtype)...); },
                    t);
}

template <auto kernel>
struct InFloat32;

// kernel(args) for float32 / float64 tensors; for float16 / bfloat16 ones
// rounded(kernel(widened(args)), dtype).
template <typename Result, typename... Args, Result (*kernel)(Args...)>
struct InFloat32<kernel> {
  static Result call(Args... args) {
    CallDtypes dtypes;
    (dtypes.see(args), ...);
    const std::optional<at::ScalarType> low = dtypes.common_low_precision();
    if (!low) return kernel(args...);
    at::AutoDispatchBelowADInplaceOrView guard;  // the conversions skip autograd, as the kernels do
    return rounded(kernel(widened(args)...), *low);
  }
};

}  // namespace manualconv
