// The bias gradient of a conv layer on the CPU (docs/derivation.md, section 7):
//
//   ∂J/∂b[o] = Σ_{n,i,j} δ[n, o, i, j]
//
// summed in float64 (each float32 δ exact in it) and rounded once, each thread into its own row of
// C sums (added in thread order at the end). Channels-last δ is a matrix of N·H·W rows of C
// contiguous channels: a thread adds its block of rows, a loop over the channels the compiler
// vectorises. NCHW δ: a thread takes whole samples, each (n, o) plane one contiguous run. Any
// other layout is summed as its NCHW-contiguous copy.
// Why C++ (AMD EPYC Zen 4, avx512, 2 threads, float32): torch's sum over dims (0, 2, 3) of a
// channels-last (512, 24, 31, 31) δ (airbench's first conv) took 4.96 ms, 10 GB/s, for channel
// counts that are not a multiple of its vector width; (512, 32, 32, 32) took 2.99 ms.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_capability.h"
#include "geometry.h"
#include "low_precision.h"
#include "manualconv.h"
#include "output_cache.h"

namespace manualconv {
namespace {

// sums[c] += Σ_r rows[r·C + c] over rows [begin, end)   (one thread's block)
// Four rows at a time: the row of sums is read and written once per four rows.
template <typename scalar_t>
void add_rows(const scalar_t* __restrict rows, int64_t begin, int64_t end, int64_t C,
              double* __restrict sums) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const scalar_t* __restrict row = rows + r * C;
    for (int64_t c = 0; c < C; ++c) {
      sums[c] += (static_cast<double>(row[c]) + static_cast<double>(row[C + c])) +
                 (static_cast<double>(row[2 * C + c]) + static_cast<double>(row[3 * C + c]));
    }
  }
  for (; r < end; ++r) {
    const scalar_t* __restrict row = rows + r * C;
    for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<double>(row[c]);
  }
}

// Σ of a contiguous run of n values
template <typename scalar_t>
double sum_run(const scalar_t* __restrict run, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<double>(run[k]);
  return s;
}

// ∂J/∂b = Σ δ over (n, i, j), per channel
at::Tensor conv2d_grad_bias(const at::Tensor& grad_output) {
  constexpr const char* op = "conv2d_grad_bias";
  TORCH_CHECK(grad_output.dim() == 4, op, ": grad_output must be 4-D (N, C, H, W), but got size ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.device().is_cpu(), op, ": grad_output must be a CPU tensor, but got device ",
              grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat || grad_output.scalar_type() == at::kDouble, op,
              ": grad_output must be float32 or float64 (bfloat16/float16 are computed in float32), but "
              "got dtype ", grad_output.scalar_type());
  at::NoGradGuard no_grad;
  const int64_t N = grad_output.size(0), C = grad_output.size(1);
  const int64_t pixels = grad_output.size(2) * grad_output.size(3);
  const PerThreadSum sums(at::get_num_threads(), {C}, grad_output.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "manualconv_conv2d_grad_bias", [&] {
    if (is_channels_last(grad_output)) {
      const scalar_t* rows = grad_output.const_data_ptr<scalar_t>();
      at::parallel_for(0, N * pixels, /*grain_size=*/2048, [&](int64_t begin, int64_t end) {
        double* mine = sums.mine<double>();
        run_for_cpu([&] { add_rows(rows, begin, end, C, mine); });
      });
      return;
    }
    const at::Tensor d = manualconv::contiguous(grad_output);
    const scalar_t* planes = d.const_data_ptr<scalar_t>();
    // samples spread over threads: each reads its samples' planes in memory order
    at::parallel_for(0, N, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      double* mine = sums.mine<double>();
      run_for_cpu([&] {
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t c = 0; c < C; ++c) mine[c] += sum_run(planes + (n * C + c) * pixels, pixels);
        }
      });
    });
  });
  return sums.total().to(grad_output.scalar_type());
}

}  // namespace
}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def("conv2d_grad_bias(Tensor grad_output) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("conv2d_grad_bias", TORCH_FN(manualconv::InFloat32<&manualconv::conv2d_grad_bias>::call));
}
