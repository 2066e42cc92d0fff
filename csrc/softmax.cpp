// softmax and log-softmax along one dimension, forward and backward, on the CPU
// (docs/derivation.md, section 17; reference.py has the same formulas in tensor code):
//
//   softmax      y = e^(x − m) / Σ e^(x − m),   m = max x           δx = y ⊙ (δy − Σ δy ⊙ y)
//   log-softmax  y = (x − m) − log Σ e^(x − m)                      δx = δy − e^y · Σ δy
//
// along `dim` of a tensor seen as (outer, D, inner), D = size(dim): inner = 1 (the last dim, or
// trailing dims of size 1) walks each row of D contiguous entries, three passes in cache (max;
// e^(x − m) and its sum; the scaling), rows spread over threads; inner > 1 walks the D rows of an
// (outer) block with the `inner` columns side by side, each column's max and sum in scratch
// arrays, so that every loop runs along contiguous memory. The sums are added in double (float32
// input: the terms rounded once each, the sum exact to ~D·2⁻⁵³); the float32 exponential is
// exp.h's (its argument x − m ≤ 0), the float64 one the C library's. Output contiguous, as
// torch's. m subtracted changes nothing mathematically and keeps e^(x − m) ≤ 1; a row holding +inf
// or NaN, or only −inf, gives NaN (x − m = NaN), as torch; a −inf logit gets e^(−inf) = 0 (a
// masked logit: probability 0, log-probability −inf, no delta).
// Why C++ (AMD EPYC Zen 4, AVX-512, 2 threads, (4096, 1000) float32, forward + backward): the
// formulas as tensor code took 0.26 (softmax) and 0.32 (log-softmax) of torch's speed.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_capability.h"
#include "elementwise.h"
#include "exp.h"
#include "low_precision.h"
#include "output_cache.h"

namespace manualconv {
namespace {

inline float exp_of_nonpositive(float a) { return exp_nonpositive(a); }
inline double exp_of_nonpositive(double a) { return std::exp(a); }

// the running maximum's step: v where v > m or v is NaN (a NaN wins and stays)
template <typename T>
inline T max_step(T m, T v) { return v > m || v != v ? v : m; }

// (outer, D, inner) of `dim` in the contiguous tensor t
struct Rows {
  int64_t outer = 1, D = 1, inner = 1;
};

Rows rows_of(const at::Tensor& t, int64_t dim) {
  Rows r;
  for (int64_t k = 0; k < t.dim(); ++k) {
    if (k < dim) r.outer *= t.size(k);
    if (k > dim) r.inner *= t.size(k);
  }
  r.D = t.dim() == 0 ? 1 : t.size(dim);
  return r;
}

// ---------------------------------------------------------------------------------------------
// One row of D contiguous entries (inner = 1). Its max and sums are taken in kLanes interleaved
// partial results (loops over the lanes, which the compiler vectorises; a plain reduction loop
// stays scalar, its order being fixed), then combined.

constexpr int kLanes = 16;

// max over d < D of row[d] (a NaN wins)
template <typename T>
T row_max(const T* row, int64_t D) {
  T lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<T>::infinity();
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma GCC unroll 1  // a loop for the vectoriser
    for (int l = 0; l < kLanes; ++l) lanes[l] = max_step(lanes[l], row[d + l]);
  }
  T m = -std::numeric_limits<T>::infinity();
  for (; d < D; ++d) m = max_step(m, row[d]);
  for (int l = 0; l < kLanes; ++l) m = max_step(m, lanes[l]);
  return m;
}

// Σ over d < D of a[d]·b[d] (b = nullptr: of a[d]), in double
template <typename T>
double row_sum(const T* a, const T* b, int64_t D) {
  double lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    if (b) {
#pragma GCC unroll 1
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(a[d + l] * b[d + l]);
    } else {
#pragma GCC unroll 1
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(a[d + l]);
    }
  }
  double total = 0;
  for (; d < D; ++d) total += static_cast<double>(b ? a[d] * b[d] : a[d]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// y = e^(x − m)/Σ e^(x − m), or log-softmax y = (x − m) − log Σ e^(x − m)   (y first holds e^(x − m))
template <typename T>
void softmax_row(const T* __restrict x, int64_t D, bool log, T* __restrict y) {
  const T m = row_max(x, D);
  for (int64_t d = 0; d < D; ++d) y[d] = exp_of_nonpositive(x[d] - m);
  const double sum = row_sum<T>(y, nullptr, D);
  if (log) {
    const T log_sum = static_cast<T>(std::log(sum));
    for (int64_t d = 0; d < D; ++d) y[d] = (x[d] - m) - log_sum;
    return;
  }
  const T scale = static_cast<T>(1.0 / sum);
  for (int64_t d = 0; d < D; ++d) y[d] *= scale;
}

// softmax: δx = y ⊙ (δy − Σ δy ⊙ y); log-softmax: δx = δy − e^y · Σ δy
template <typename T>
void softmax_backward_row(const T* __restrict dy, const T* __restrict y, int64_t D, bool log, T* __restrict dx) {
  const T s = static_cast<T>(row_sum<T>(dy, log ? nullptr : y, D));
  if (log) {
    for (int64_t d = 0; d < D; ++d) dx[d] = dy[d] - exp_of_nonpositive(y[d]) * s;
    return;
  }
  for (int64_t d = 0; d < D; ++d) dx[d] = y[d] * (dy[d] - s);
}

// ---------------------------------------------------------------------------------------------
// D rows of `inner` contiguous columns (inner > 1): the same formulas per column

template <typename T>
void softmax_columns(const T* x, int64_t D, int64_t inner, bool log, T* y, std::vector<T>& m,
                     std::vector<double>& sum) {
  m.assign(inner, -std::numeric_limits<T>::infinity());
  sum.assign(inner, 0.0);
  T* __restrict mx = m.data();
  double* __restrict s = sum.data();
  for (int64_t d = 0; d < D; ++d) {
    const T* __restrict row = x + d * inner;
    for (int64_t i = 0; i < inner; ++i) mx[i] = max_step(mx[i], row[i]);
  }
  for (int64_t d = 0; d < D; ++d) {
    const T* __restrict row = x + d * inner;
    T* __restrict out = y + d * inner;
    for (int64_t i = 0; i < inner; ++i) {
      const T e = exp_of_nonpositive(row[i] - mx[i]);
      if (!log) out[i] = e;
      s[i] += static_cast<double>(e);
    }
  }
  if (log) {
    std::vector<T> log_sum(inner);
    for (int64_t i = 0; i < inner; ++i) log_sum[i] = static_cast<T>(std::log(s[i]));
    for (int64_t d = 0; d < D; ++d) {
      const T* __restrict row = x + d * inner;
      T* __restrict out = y + d * inner;
      for (int64_t i = 0; i < inner; ++i) out[i] = (row[i] - mx[i]) - log_sum[i];
    }
    return;
  }
  for (int64_t i = 0; i < inner; ++i) mx[i] = static_cast<T>(1.0 / s[i]);  // (m's array reused: the scales)
  for (int64_t d = 0; d < D; ++d) {
    T* __restrict out = y + d * inner;
    for (int64_t i = 0; i < inner; ++i) out[i] *= mx[i];
  }
}

template <typename T>
void softmax_backward_columns(const T* dy, const T* y, int64_t D, int64_t inner, bool log, T* dx,
                              std::vector<double>& sum, std::vector<T>& s_cast) {
  sum.assign(inner, 0.0);
  s_cast.resize(inner);
  double* __restrict s = sum.data();
  for (int64_t d = 0; d < D; ++d) {
    const T* __restrict g = dy + d * inner;
    const T* __restrict out = y + d * inner;
    for (int64_t i = 0; i < inner; ++i) s[i] += static_cast<double>(log ? g[i] : g[i] * out[i]);
  }
  T* __restrict sc = s_cast.data();
  for (int64_t i = 0; i < inner; ++i) sc[i] = static_cast<T>(s[i]);
  for (int64_t d = 0; d < D; ++d) {
    const T* __restrict g = dy + d * inner;
    const T* __restrict out = y + d * inner;
    T* __restrict res = dx + d * inner;
    if (log) {
      for (int64_t i = 0; i < inner; ++i) res[i] = g[i] - exp_of_nonpositive(out[i]) * sc[i];
    } else {
      for (int64_t i = 0; i < inner; ++i) res[i] = out[i] * (g[i] - sc[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Operators

// dim of t (a CPU float32 / float64 tensor), wrapped into [0, rank)
int64_t checked_dim(const char* op, const at::Tensor& t, int64_t dim) {
  check_elementwise_input(op, t);
  const int64_t rank = std::max<int64_t>(t.dim(), 1);
  TORCH_CHECK(dim >= -rank && dim < rank, op, ": dim out of range (expected to be in range of [", -rank, ", ",
              rank - 1, "], but got ", dim, ")");
  return dim < 0 ? dim + rank : dim;
}

// rows(begin, end) over the (outer, inner-block) tasks of r: rows when inner = 1, else blocks
template <typename RowF, typename BlockF>
void for_each_row_or_block(const Rows& r, const RowF& row, const BlockF& block) {
  if (r.inner == 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(r.D, 1));
    at::parallel_for(0, r.outer, grain, [&](int64_t begin, int64_t end) {
      run_for_cpu([&] {
        for (int64_t o = begin; o < end; ++o) row(o);
      });
    });
    return;
  }
  at::parallel_for(0, r.outer, 1, [&](int64_t begin, int64_t end) {
    run_for_cpu([&] {
      for (int64_t o = begin; o < end; ++o) block(o);
    });
  });
}

at::Tensor softmax_forward(const at::Tensor& input, int64_t dim, bool log) {
  const char* op = log ? "log_softmax_forward" : "softmax_forward";
  dim = checked_dim(op, input, dim);
  at::NoGradGuard no_grad;
  const at::Tensor x = manualconv::contiguous(input);
  at::Tensor y = manualconv::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const Rows r = rows_of(x, dim);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_softmax_forward", [&] {
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* yd = y.mutable_data_ptr<scalar_t>();
    const int64_t block = r.D * r.inner;
    for_each_row_or_block(
        r, [&](int64_t o) { softmax_row(xd + o * r.D, r.D, log, yd + o * r.D); },
        [&](int64_t o) {
          thread_local std::vector<scalar_t> m;
          thread_local std::vector<double> sum;
          softmax_columns(xd + o * block, r.D, r.inner, log, yd + o * block, m, sum);
        });
  });
  return y;
}

at::Tensor softmax_backward(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim, bool log) {
  const char* op = log ? "log_softmax_backward" : "softmax_backward";
  dim = checked_dim(op, output, dim);
  check_grad_output(op, grad_output, output, "output");
  at::NoGradGuard no_grad;
  const at::Tensor y = manualconv::contiguous(output), dy = manualconv::contiguous(grad_output);
  at::Tensor dx = manualconv::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return dx;
  const Rows r = rows_of(y, dim);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "manualconv_softmax_backward", [&] {
    const scalar_t* yd = y.const_data_ptr<scalar_t>();
    const scalar_t* gd = dy.const_data_ptr<scalar_t>();
    scalar_t* xd = dx.mutable_data_ptr<scalar_t>();
    const int64_t block = r.D * r.inner;
    for_each_row_or_block(
        r, [&](int64_t o) { softmax_backward_row(gd + o * r.D, yd + o * r.D, r.D, log, xd + o * r.D); },
        [&](int64_t o) {
          thread_local std::vector<double> sum;
          thread_local std::vector<scalar_t> s_cast;
          softmax_backward_columns(gd + o * block, yd + o * block, r.D, r.inner, log, xd + o * block, sum, s_cast);
        });
  });
  return dx;
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("softmax_forward(Tensor input, int dim, bool log) -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor output, int dim, bool log) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("softmax_forward", TORCH_FN(manualconv::InFloat32<&manualconv::softmax_forward>::call));
  m.impl("softmax_backward", TORCH_FN(manualconv::InFloat32<&manualconv::softmax_backward>::call));
}
