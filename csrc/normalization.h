// Shared by batch_norm.cpp, layer_norm.cpp and group_norm.cpp: the one-pass statistics of a set of entries.
//
//   μ = Σx / N,   var = Σ(x − K)²/N − (Σ(x − K)/N)²,   K = the set's first entry
//
// Σx gives the mean as torch's sum does (±inf stays ±inf); the sums shifted by K give the
// variance without the cancellation of Σx²/N − μ² when |μ| ≫ σ. Accumulated in double.
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

// (μ, var) of `count` entries; var is clamped at 0 against rounding (NaN stays NaN).
inline std::pair<double, double> mean_and_var(const ShiftedSums& s, int64_t count) {
  const double mean = s.sum / count;
  const double shifted_mean = s.shifted / count;
  const double var = s.shifted_sq / count - shifted_mean * shifted_mean;
  return {mean, var < 0 ? 0.0 : var};
}

}  // namespace manualconv
