// Shared by batch_norm.cpp, layer_norm.cpp and group_norm.cpp: the one-pass statistics of a set of entries.
//
//   μ = Σx / N,   var = Σ(x − K)²/N − (Σ(x − K)/N)²,   K = the set's first entry
//
// Σx gives the mean as torch's sum does (±inf stays ±inf); the sums shifted by K give the
// variance without the cancellation of Σx²/N − μ² when |μ| ≫ σ. Accumulated in double
// (ShiftedSums, add_contiguous), or in lanes of the input's precision (lane_sums).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "geometry.h"  // is_channels_last: a 4-D map laid out NHWC (and not also NCHW-contiguous)

namespace manualconv {

// ---------------------------------------------------------------------------------------------
// The norms' argument checks

// A 4-D (n, C, H, W) map of float32 / float64 on the CPU (batch and group norm).
inline void check_map(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (n, C, H, W), got size ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// An optional vector of `size` entries of the input's dtype (made contiguous); nullopt when absent.
inline std::optional<at::Tensor> vector_arg(const std::optional<at::Tensor>& v, int64_t size,
                                            const at::Tensor& input, const char* op, const char* name) {
  if (!v || !v->defined()) return std::nullopt;
  TORCH_CHECK(v->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(v->dim() == 1 && v->size(0) == size, op, ": ", name, " must have size [", size,
              "], got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the input's dtype ", input.scalar_type(), ", got ", v->scalar_type());
  return v->contiguous();
}

// ---------------------------------------------------------------------------------------------
// The statistics

// Σx, Σ(x − K), Σ(x − K)² of a set (or of part of it: partial sums merge by adding).
struct ShiftedSums {
  double sum = 0, shifted = 0, shifted_sq = 0;

  void add(double x, double K) {
    const double d = x - K;
    sum += x;
    shifted += d;
    shifted_sq += d * d;
  }
  void merge(const ShiftedSums& other) {
    sum += other.sum, shifted += other.shifted, shifted_sq += other.shifted_sq;
  }
};

// Adds n contiguous entries, in four independent lanes (so the adds do not wait on each other).
template <typename scalar_t>
void add_contiguous(ShiftedSums& s, const scalar_t* x, int64_t n, double K) {
  ShiftedSums lane[4];
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) lane[l].add(x[i + l], K);
  }
  for (; i < n; ++i) lane[0].add(x[i], K);
  for (int l = 0; l < 4; ++l) s.merge(lane[l]);
}

// The same three sums of n contiguous entries in kLaneCount lanes of the input's own precision
// (float32 for float32: torch's layer and group norms accumulate float32 input in float32 too), the
// lanes then folded pairwise. Lanes make each add independent of the last, so the loop vectorises
// (16 float32 lanes per AVX-512 register, 2 registers per sum) when built for the CPU
// (cpu_capability.h's run_for_cpu); the order of the adds is fixed by the lane count, the same on
// every build (the FMA builds fuse d·d into its add: last-bit differences, cpu_capability.h).
// Error: each lane is a sum of about n/kLaneCount terms and the fold adds log2(kLaneCount) more
// roundings, within the recursive-summation bound n·ε·Σ|terms| that a sum of n terms in any order
// meets (tests/oracle.py); the shift by K keeps Σ(x − K)² free of the cancellation that μ ≫ σ
// would bring. Used where the sums are the kernel's hot loop (layer_norm.cpp, group_norm.cpp's
// NCHW sets).
constexpr int kLaneCount = 32;

// Σ a[l] over the kLaneCount lanes, added pairwise: a[l] += a[l + width] for width = kLaneCount/2,
// …, 2, 1 (each step a constant-width loop, so the fold itself vectorises).
template <int width = kLaneCount / 2, typename acc_t>
__attribute__((always_inline)) inline acc_t fold_lanes(acc_t* a) {
  for (int l = 0; l < width; ++l) a[l] += a[l + width];
  if constexpr (width > 1) {
    return fold_lanes<width / 2>(a);
  } else {
    return a[0];
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline ShiftedSums lane_sums(const scalar_t* x, int64_t n, scalar_t K) {
  scalar_t sum[kLaneCount] = {}, shifted[kLaneCount] = {}, shifted_sq[kLaneCount] = {};
  int64_t i = 0;
  for (; i + kLaneCount <= n; i += kLaneCount) {
    for (int l = 0; l < kLaneCount; ++l) {
      const scalar_t v = x[i + l], d = v - K;
      sum[l] += v, shifted[l] += d, shifted_sq[l] += d * d;
    }
  }
  for (int l = 0; i + l < n; ++l) {  // the tail, one entry per lane
    const scalar_t v = x[i + l], d = v - K;
    sum[l] += v, shifted[l] += d, shifted_sq[l] += d * d;
  }
  return {static_cast<double>(fold_lanes(sum)), static_cast<double>(fold_lanes(shifted)),
          static_cast<double>(fold_lanes(shifted_sq))};
}

// (μ, var) of `count` entries; var is clamped at 0 against rounding (NaN stays NaN).
inline std::pair<double, double> mean_and_var(const ShiftedSums& s, int64_t count) {
  const double mean = s.sum / count;
  const double shifted_mean = s.shifted / count;
  const double var = s.shifted_sq / count - shifted_mean * shifted_mean;
  return {mean, var < 0 ? 0.0 : var};
}

// The norms' elementwise passes (batch norm and group norm), built for the kernels' capability by
// their callers (run_for_cpu): the affine map y = x·a + b and the backward's
// δx = (x − μ)·u + δy·v + w, on contiguous runs (NCHW) or rows of C channels (NHWC).

// y = x·a + b over n contiguous entries.
template <typename scalar_t>
__attribute__((always_inline)) inline void run_affine(const scalar_t* x, int64_t n, scalar_t a, scalar_t b, scalar_t* y) {
  for (int64_t p = 0; p < n; ++p) y[p] = x[p] * a + b;
}

// NHWC: y = x·a_c + b_c over `rows` rows of C channels.
template <typename scalar_t>
__attribute__((always_inline)) inline void rows_affine(const scalar_t* x, int64_t rows, int64_t C, const scalar_t* a,
                                                       const scalar_t* b, scalar_t* y) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) y[r * C + c] = x[r * C + c] * a[c] + b[c];
  }
}

// δx = (x − μ)·u + δy·v + w over n contiguous entries.
template <typename scalar_t>
__attribute__((always_inline)) inline void run_grad_input(const scalar_t* dy, const scalar_t* x, int64_t n, scalar_t mu,
                                                          scalar_t u, scalar_t v, scalar_t w, scalar_t* dx) {
  for (int64_t p = 0; p < n; ++p) dx[p] = (x[p] - mu) * u + dy[p] * v + w;
}

// NHWC: δx = (x − μ_c)·u_c + δy·v_c + w_c over `rows` rows of C channels.
template <typename scalar_t>
__attribute__((always_inline)) inline void rows_grad_input(const scalar_t* dy, const scalar_t* x, int64_t rows, int64_t C,
                                                           const scalar_t* mu, const scalar_t* u, const scalar_t* v,
                                                           const scalar_t* w, scalar_t* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) dx[r * C + c] = (x[r * C + c] - mu[c]) * u[c] + dy[r * C + c] * v[c] + w[c];
  }
}

}  // namespace manualconv
