// Shared by the elementwise kernels (gelu.cpp, relu.cpp, activations.cpp): the layout they walk
// in storage order, their input check and their parallel loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_capability.h"

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

// t laid out in the strides of the dense tensor `like` (t itself when it already is: one copy at
// most), so a second operand (δy) is walked in the same order as the first (x or y). The copy is
// short-lived and stays on torch's allocator: from the output cache (output_cache.h) it raised a
// ResNet-20 step's held memory from 189 to 205 MB (the cache keeps its block for the next step;
// AMD EPYC Zen 4, batch 128, where a residual δ arrives NCHW at two ReLUs) for no measurable time.
inline at::Tensor in_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  at::Tensor out = at::empty_like(like);
  out.copy_(t);
  return out;
}

}  // namespace manualconv
