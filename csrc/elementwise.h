// Shared by the elementwise kernels (gelu.cpp, relu.cpp, activations.cpp): the layout they walk
// in storage order, their input check and their parallel loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_capability.h"

#include <algorithm>
#include <vector>

namespace manualconv {

constexpr int64_t kElementwiseGrain = 32768;  // entries per parallel task

// out[i] = f(i) for i in [0, n), in parallel tasks of kElementwiseGrain entries, each a loop
// built for the kernels' capability (run_for_cpu: the compiler vectorises it). Each loop calls its
// own copy of f: the values f captured (an activation's parameters) are then locals no store to
// out can reach, kept in registers; read through the caller's f they would be reloaded for every
// entry, and the loop not vectorised (measured: hardtanh forward + backward of (128, 64, 32, 32)
// float32 38 ms against torch's 21 ms; 23 ms with the copy, against 21; AMD EPYC Zen 4, 2 threads).
template <typename scalar_t, typename F>
void map_entries(int64_t n, scalar_t* out, const F& f) {
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    run_for_cpu([&] {
      const F entry = f;
      for (int64_t i = begin; i < end; ++i) out[i] = entry(i);
    });
  });
}

// δy of a backward: the size, dtype and device of `like` (the saved input or output, `name`d)
inline void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& like,
                              const char* name) {
  TORCH_CHECK(grad_output.sizes() == like.sizes(), op, ": grad_output must have the ", name, "'s size ",
              like.sizes(), ", but got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == like.scalar_type(), op, ": grad_output must have the ", name,
              "'s dtype ", like.scalar_type(), ", but got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == like.device(), op, ": grad_output must be on the ", name, "'s device");
}

// A CPU tensor of float32 or float64 (bfloat16 / float16 reach the kernels as float32: InFloat32)
inline void check_elementwise_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, but got device ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": input must be float32 or float64 (bfloat16/float16 are computed in float32), but "
              "got dtype ",
              input.scalar_type());
}

// The tensor an elementwise kernel walks: t as it is when dense (non-overlapping, no gaps: its
// storage order is an order of its entries), else a contiguous copy. The output is empty_like it.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// out[i] = f(i, δy at entry i) for every entry i of the dense tensor s, in s's storage order (out
// has s's strides): a backward's saved tensor s and its δy = grad_output, of s's size. Where δy has
// s's strides it is read at i too; otherwise (a residual δ arriving NCHW at a channels-last ReLU,
// an expanded δ of a sum) it is read in its own strides as the walk goes, never copied: a copy
// taken when the step's memory peaks (ResNet-20, batch 128: an 8 MiB NCHW δ at the first ReLU
// of a stage, in the backward) raised the step's held memory by as much, on torch's allocator or
// on the output cache (elementwise.h's earlier copy: 189 → 205 MB from the cache).
template <typename scalar_t, typename F>
void map_backward_entries(const at::Tensor& s, const at::Tensor& grad_output, scalar_t* out, const F& f) {
  const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
  if (grad_output.strides() == s.strides()) {
    map_entries(s.numel(), out, [f, dy](int64_t i) { return f(i, dy[i]); });
    return;
  }
  if (s.numel() == 0) return;
  // s's dimensions in storage order (strides decreasing; size-1 dimensions take no part)
  std::vector<int64_t> order;
  for (int64_t d = 0; d < s.dim(); ++d) {
    if (s.size(d) != 1) order.push_back(d);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s.stride(a) > s.stride(b); });
  std::vector<int64_t> sizes, dy_strides;
  for (int64_t d : order) {
    sizes.push_back(s.size(d));
    dy_strides.push_back(grad_output.stride(d));
  }
  const int64_t inner = sizes.empty() ? 1 : sizes.back();  // s's stride-1 dimension: a row
  const int64_t inner_stride = sizes.empty() ? 0 : dy_strides.back();
  const int64_t rows = s.numel() / inner, outer_dims = static_cast<int64_t>(sizes.size()) - 1;
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementwiseGrain / inner), [&](int64_t begin, int64_t end) {
    run_for_cpu([&] {
      const F entry = f;
      for (int64_t row = begin; row < end; ++row) {
        int64_t offset = 0;  // δy's offset of the row's first entry: row's mixed-radix digits · strides
        for (int64_t k = outer_dims - 1, r = row; k >= 0; --k) {
          offset += (r % sizes[k]) * dy_strides[k];
          r /= sizes[k];
        }
        const scalar_t* dy_row = dy + offset;
        const int64_t i0 = row * inner;
        for (int64_t j = 0; j < inner; ++j) out[i0 + j] = entry(i0 + j, dy_row[j * inner_stride]);
      }
    });
  });
}

}  // namespace manualconv
