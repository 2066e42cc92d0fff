// The channel loops the channels-last pooling kernels share (max_pool2d.cpp, avg_pool2d.cpp,
// adaptive_pool2d.cpp): one pixel's C contiguous channels at a time. __restrict: the arrays
// never overlap, which lets the compiler vectorise each loop over the channels.
#pragma once

#include <cmath>
#include <cstdint>

namespace manualconv {

// out[c] += in[c], c ∈ [0, C)
template <typename scalar_t>
inline void channels_accumulate(const scalar_t* __restrict in, int64_t C, scalar_t* __restrict out) {
  for (int64_t c = 0; c < C; ++c) out[c] += in[c];
}

// out[c] = in[c] / divisor, c ∈ [0, C)   (the average's one division per channel)
template <typename scalar_t>
inline void channels_divide(const scalar_t* __restrict in, scalar_t divisor, int64_t C,
                            scalar_t* __restrict out) {
  for (int64_t c = 0; c < C; ++c) out[c] = in[c] / divisor;
}

// The running maximum's step at window position p, every channel at once: (best, best_pos)
// takes (x[c], p) where x[c] > best[c] or x[c] is NaN (ties keep the earlier position; the last
// NaN wins: torch's CPU rule). Positions are index_t: int32 where the plane allows, so that the
// loop runs in 32-bit lanes throughout and vectorises.
template <typename scalar_t, typename index_t>
inline void channels_running_max(const scalar_t* __restrict x, index_t p, int64_t C,
                                 scalar_t* __restrict best, index_t* __restrict best_pos) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t v = x[c];
    const bool take = v > best[c] || std::isnan(v);
    best[c] = take ? v : best[c];
    best_pos[c] = take ? p : best_pos[c];
  }
}

}  // namespace manualconv
