// GELU, forward and backward, on the CPU (docs/derivation.md, "Activations"):
//
//   'none'   y = x·Φ(x),                 Φ(x) = ½(1 + erf(x/√2))
//            δx = δy·(Φ(x) + x·φ(x)),    φ(x) = e^(−x²/2)/√(2π)
//   'tanh'   y = ½x(1 + t),              t = tanh u,  u = √(2/π)(x + κx³),  κ = 0.044715
//            δx = δy·(½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3κx²))
//
// The tensors are walked in chunks of kChunk entries, a chunk per step of at::parallel_for. In a
// chunk the transcendental function (erf, exp, tanh) runs once, in place over a small buffer,
// by ATen's vectorised elementwise function (general math, as torch.erf in the reference
// kernels; chosen by ATen for this CPU); the products around it are plain loops over the chunk,
// still in cache, built for the kernels' capability (cpu_capability.h's run_for_cpu). So x and δy are read from memory once and y / δx written once, where the same
// formula in tensor code makes a full pass (and a full temporary) per operation.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "cpu_capability.h"
#include "elementwise.h"
#include "low_precision.h"

namespace manualconv {
namespace {

// Entries per chunk: 2 buffers of 32768 floats (256 KiB) stay in L2, and the per-chunk cost of the
// ATen calls (a few µs each: dispatch and TensorIterator set-up) is ~3 % of the chunk's time
// (measured at 8192 entries: 4.5 ns per entry for erf against 3.6 at 32768; AMD EPYC Zen 4, one
// thread, ATen's AVX512 kernels).
constexpr int64_t kChunk = 32768;

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

// buffer ← f(buffer) by ATen's vectorised elementwise function, in place (single-threaded inside
// the parallel region).
template <typename scalar_t, typename F>
void in_place(scalar_t* buffer, int64_t count, const at::TensorOptions& options, F f) {
  at::Tensor t = at::from_blob(buffer, {count}, options);
  f(t);
}

// The input of the chunk's transcendental function: x/√2 (erf) or u(x) (tanh).
template <typename scalar_t>
void inner_argument(const scalar_t* x, int64_t count, Approximate a, scalar_t* u) {
  if (a == Approximate::Tanh) {
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t v = x[i];
      u[i] = scalar_t(kSqrt2OverPi) * (v + scalar_t(kKappa) * v * v * v);  // u = √(2/π)(x + κx³)
    }
  } else {
    for (int64_t i = 0; i < count; ++i) u[i] = x[i] * scalar_t(kSqrt1_2);  // x/√2
  }
}

// y = x·½(1 + erf(x/√2)) or ½x(1 + tanh u): e holds erf(x/√2) or tanh u
template <typename scalar_t>
void gelu_chunk(const scalar_t* x, int64_t count, Approximate a, const at::TensorOptions& options,
                scalar_t* e, scalar_t* y) {
  run_for_cpu([&] { inner_argument(x, count, a, e); });
  in_place(e, count, options, [&](at::Tensor& t) { a == Approximate::Tanh ? t.tanh_() : t.erf_(); });
  run_for_cpu([&] {
    for (int64_t i = 0; i < count; ++i) y[i] = x[i] * (scalar_t(0.5) * (scalar_t(1) + e[i]));
  });
}

// δx = δy·GELU′(x): 'none' GELU′ = Φ(x) + x·φ(x) (e = erf(x/√2), p = e^(−x²/2));
// 'tanh' GELU′ = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3κx²) (e = t)
template <typename scalar_t>
void gelu_backward_chunk(const scalar_t* dy, const scalar_t* x, int64_t count, Approximate a,
                         const at::TensorOptions& options, scalar_t* e, scalar_t* p,
                         scalar_t* dx) {
  run_for_cpu([&] { inner_argument(x, count, a, e); });
  if (a == Approximate::Tanh) {
    in_place(e, count, options, [](at::Tensor& t) { t.tanh_(); });
    run_for_cpu([&] {
      for (int64_t i = 0; i < count; ++i) {
        const scalar_t v = x[i], t = e[i];
        const scalar_t du = scalar_t(kSqrt2OverPi) * (scalar_t(1) + scalar_t(3 * kKappa) * v * v);
        dx[i] = dy[i] * (scalar_t(0.5) * (scalar_t(1) + t) +
                         scalar_t(0.5) * v * (scalar_t(1) - t * t) * du);
      }
    });
    return;
  }
  run_for_cpu([&] {
    for (int64_t i = 0; i < count; ++i) p[i] = scalar_t(-0.5) * x[i] * x[i];  // −x²/2
  });
  in_place(e, count, options, [](at::Tensor& t) { t.erf_(); });
  in_place(p, count, options, [](at::Tensor& t) { t.exp_(); });
  run_for_cpu([&] {
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t cdf = scalar_t(0.5) * (scalar_t(1) + e[i]);  // Φ(x)
      const scalar_t pdf = p[i] * scalar_t(kInvSqrt2Pi);          // φ(x)
      dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
  });
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, but got device ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": input must be float32 or float64 (bfloat16/float16 are computed in float32), but "
              "got dtype ",
              input.scalar_type());
}

at::Tensor gelu_forward(const at::Tensor& input, c10::string_view approximate) {
  check_input("gelu_forward", input);
  const Approximate a = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  at::NoGradGuard no_grad;
  const at::Tensor x = dense(input);
  at::Tensor y = at::empty_like(x);  // x's strides (preserve_format on a dense tensor)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_gelu_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> e(static_cast<size_t>(std::min(kChunk, end - begin)));
      for (int64_t lo = begin; lo < end; lo += kChunk) {
        const int64_t count = std::min(kChunk, end - lo);
        gelu_chunk(x_data + lo, count, a, x.options(), e.data(), y_data + lo);
      }
    });
  });
  return y;
}

at::Tensor gelu_backward(const at::Tensor& grad_output, const at::Tensor& input,
                         c10::string_view approximate) {
  check_input("gelu_backward", input);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "gelu_backward: grad_output must have the "
              "input's size ", input.sizes(), ", but got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "gelu_backward: grad_output must "
              "have the input's dtype ", input.scalar_type(), ", but got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "gelu_backward: grad_output must be on the "
              "input's device");
  const Approximate a = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  at::NoGradGuard no_grad;
  const at::Tensor x = dense(input);
  const at::Tensor dy = in_strides_of(grad_output, x);
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_gelu_backward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      const size_t size = static_cast<size_t>(std::min(kChunk, end - begin));
      std::vector<scalar_t> e(size), p(size);
      for (int64_t lo = begin; lo < end; lo += kChunk) {
        const int64_t count = std::min(kChunk, end - lo);
        gelu_backward_chunk(dy_data + lo, x_data + lo, count, a, x.options(), e.data(), p.data(),
                            dx_data + lo);
      }
    });
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
