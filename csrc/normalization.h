// Shared by batch_norm.cpp, layer_norm.cpp and group_norm.cpp: the one-pass statistics of a set of entries.
//
//   μ = Σx / N,   var = Σ(x − K)²/N − (Σ(x − K)/N)²,   K = the set's first entry
//
// Σx gives the mean as torch's sum does (±inf stays ±inf); the sums shifted by K give the
// variance without the cancellation of Σx²/N − μ² when |μ| ≫ σ. Accumulated in double.
#pragma once

#include <cstdint>
#include <utility>

namespace manualconv {

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
