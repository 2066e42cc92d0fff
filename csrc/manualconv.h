// The loop helpers the CPU kernels share. Their declarations (conv2d_forward(Cpu, ...), ...) and
// entry points are in operators.h; the conventions, argument checks, geometry structs and
// output-layout rule of every device in geometry.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "operators.h"

namespace manualconv {

// ---------------------------------------------------------------------------
// Strided row loops, shared by im2col/col2im and the pooling kernels
// ---------------------------------------------------------------------------

// Calls body(stride) with the stride as a compile-time constant for the common strides 1 and 2
// (so that the compiler vectorises the loop inside) and as a plain int64_t otherwise.
template <typename F>
inline void dispatch_stride(int64_t stride, const F& body) {
  switch (stride) {
    case 1: body(std::integral_constant<int64_t, 1>{}); break;
    case 2: body(std::integral_constant<int64_t, 2>{}); break;
    default: body(stride);
  }
}

// out[j] = in[j·stride], j ∈ [0, n)
template <typename scalar_t>
inline void strided_copy(const scalar_t* in, int64_t stride, int64_t n, scalar_t* out) {
  dispatch_stride(stride, [&](auto s) {
    for (int64_t j = 0; j < n; ++j) out[j] = in[j * s];
  });
}

// out[j] += in[j·stride], j ∈ [0, n)
template <typename scalar_t>
inline void strided_accumulate(const scalar_t* in, int64_t stride, int64_t n, scalar_t* out) {
  dispatch_stride(stride, [&](auto s) {
    for (int64_t j = 0; j < n; ++j) out[j] += in[j * s];
  });
}

// out[j·stride] += in[j], j ∈ [0, n)   (the adjoint of strided_copy)
template <typename scalar_t>
inline void strided_add(const scalar_t* in, int64_t n, scalar_t* out, int64_t stride) {
  dispatch_stride(stride, [&](auto s) {
    for (int64_t j = 0; j < n; ++j) out[j * s] += in[j];
  });
}

// ---------------------------------------------------------------------------
// Per-thread partial sums (the weight gradients' sum over the batch)
// ---------------------------------------------------------------------------

// A sum computed in parallel: each thread adds its terms into its own zero-initialised slot of
// `shape`, and total() adds the slots in slot order (one fixed order, whatever the scheduling).
class PerThreadSum {
 public:
  PerThreadSum(int64_t slots, at::IntArrayRef shape, const at::TensorOptions& options)
      : slot_numel_(c10::multiply_integers(shape)),
        slots_(at::zeros(with_slots(slots, shape), options)) {}

  // The calling thread's slot (the clamp only matters if called nested in a parallel region).
  template <typename scalar_t>
  scalar_t* mine() const {
    const int64_t slot = std::min<int64_t>(at::get_thread_num(), slots_.size(0) - 1);
    return slots_.mutable_data_ptr<scalar_t>() + slot * slot_numel_;
  }

  // Σ over the slots, of `shape`.
  at::Tensor total() const { return slots_.size(0) > 1 ? slots_.sum(0) : slots_[0]; }

 private:
  static std::vector<int64_t> with_slots(int64_t slots, at::IntArrayRef shape) {
    std::vector<int64_t> size{slots};
    size.insert(size.end(), shape.begin(), shape.end());
    return size;
  }
  int64_t slot_numel_;
  at::Tensor slots_;
};

}  // namespace manualconv
