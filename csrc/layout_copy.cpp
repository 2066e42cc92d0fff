// Copies between the NCHW and channels-last layouts (layout_copy.h): per sample, the (C × H·W)
// plane of one layout is the (H·W × C) matrix of the other, so either copy is one transpose per
// sample, done in 8 × 8 blocks held in AVX registers (8 loads, 24 shuffles, 8 stores per block).
//
// Why. The kernels that want the other layout (select_conv2d_kernel's NCHW convs via the
// channels-last kernels, Winograd on NCHW) copied through at::Tensor::copy_, whose strided loop
// ran at a fifth of a plain copy's speed. Measured (AMD EPYC Zen 5, family 26 model 2, 2 threads,
// batch 128, median of 31, µs, NCHW → channels-last / channels-last → NCHW, a plain copy of the
// same bytes): 32@16 (4 MiB) 181 / 157, plain 36; 64@8 (2 MiB) 71 / 71, plain 21; 16@32 (8 MiB)
// 586 / 413, plain 72. With these blocks (a fresh result from the output cache each time): 32@16
// 67 / 49, 64@8 29 / 29, 16@32 124 / 117, 256@8 (8 MiB) 124 / 127. The NCHW 3×3 32 → 32 @16 conv
// (Winograd on channels-last copies), forward + backward: 4.92 → 3.81 ms; the NCHW 1×1 64 → 128 @8
// (the direct kernel on copies), forward / input grad / weight grad: 0.54 / 0.57 / 0.60 → 0.38 /
// 0.40 / 0.43 ms. (Since then the direct kernels and Winograd transpose NCHW tensors themselves,
// a sample or a block of tile rows at a time, with transpose_matrix; this copy serves the
// channels-last GEMM on small NCHW maps and manualconv::contiguous.)
//
// Pure data movement: every bit (NaN payloads included) arrives unchanged.

#include "layout_copy.h"

#include "cpu_capability.h"

#include "output_cache.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MANUALCONV_HAVE_AVX_TRANSPOSE 1
#endif

namespace manualconv {
namespace {

// dst (cols × rows, row stride ld_dst) = srcᵀ, src (rows × cols, row stride ld_src): one element at
// a time (the blocks' edges, and CPUs without AVX2)
void transpose_scalar(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst, int64_t rows,
                      int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

#ifdef MANUALCONV_HAVE_AVX_TRANSPOSE
// One 8 × 8 block: dst[j][i] = src[i][j] (i, j < 8): interleave pairs of rows (unpack), then
// pairs of pairs (shuffle), then the 128-bit halves (permute2f128).
__attribute__((target("avx2"))) inline void transpose_8x8(const float* src, int64_t ld_src, float* dst,
                                                          int64_t ld_dst) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// The whole matrix in 8 × 8 blocks, the edges element by element. Blocks run along a band of 8
// destination rows, each written in order (writing in order measured faster than reading in order:
// 8 MiB planes 16@32 channels-last → NCHW 117 vs 305 µs, 256@8 NCHW → channels-last 124 vs 300).
__attribute__((target("avx2"))) void transpose_avx2(const uint32_t* src, int64_t ld_src, uint32_t* dst,
                                                    int64_t ld_dst, int64_t rows, int64_t cols) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  const float* s = reinterpret_cast<const float*>(src);
  float* d = reinterpret_cast<float*>(dst);
  for (int64_t j = 0; j < cols8; j += 8) {
    for (int64_t i = 0; i < rows8; i += 8) transpose_8x8(s + i * ld_src + j, ld_src, d + j * ld_dst + i, ld_dst);
  }
  transpose_scalar(src + cols8, ld_src, dst + cols8 * ld_dst, ld_dst, rows, cols - cols8);
  transpose_scalar(src + rows8 * ld_src, ld_src, dst + rows8, ld_dst, rows - rows8, cols8);
}
#endif

// Each of N planes: dst[n] (cols × rows) = src[n] (rows × cols)ᵀ, planes spread over threads.
void transpose_planes(const uint32_t* src, uint32_t* dst, int64_t N, int64_t rows, int64_t cols) {
  const int64_t plane = rows * cols;
#ifdef MANUALCONV_HAVE_AVX_TRANSPOSE
  const bool avx2 = cpu_capability() >= CpuCapability::Avx2;
#else
  const bool avx2 = false;
#endif
  // a grain of about 64 K elements a thread: below it, threads cost more than they save
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(plane, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
#ifdef MANUALCONV_HAVE_AVX_TRANSPOSE
      if (avx2) {
        transpose_avx2(src + n * plane, cols, dst + n * plane, rows, rows, cols);
        continue;
      }
#endif
      transpose_scalar(src + n * plane, cols, dst + n * plane, rows, rows, cols);
    }
  });
}

}  // namespace

void transpose_matrix(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  const auto* from = reinterpret_cast<const uint32_t*>(src);
  auto* to = reinterpret_cast<uint32_t*>(dst);
#ifdef MANUALCONV_HAVE_AVX_TRANSPOSE
  if (cpu_capability() >= CpuCapability::Avx2) return transpose_avx2(from, ld_src, to, ld_dst, rows, cols);
#endif
  transpose_scalar(from, ld_src, to, ld_dst, rows, cols);
}

void transpose_planes(const float* src, float* dst, int64_t N, int64_t rows, int64_t cols) {
  transpose_planes(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), N, rows, cols);
}

bool copy_between_layouts(const at::Tensor& src, at::Tensor& dst) {
  if (src.dim() != 4 || dst.dim() != 4 || src.sizes() != dst.sizes() || src.scalar_type() != dst.scalar_type() ||
      src.element_size() != 4 || !src.device().is_cpu() || !dst.device().is_cpu() || src.is_conj() ||
      src.is_neg()) {
    return false;
  }
  const int64_t N = src.size(0), C = src.size(1), P = src.size(2) * src.size(3);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const bool to_channels_last = src.is_contiguous() && dst.is_contiguous(cl);
  const bool to_nchw = src.is_contiguous(cl) && dst.is_contiguous();
  if (!to_channels_last && !to_nchw) return false;
  const auto* from = static_cast<const uint32_t*>(src.const_data_ptr());
  auto* to = static_cast<uint32_t*>(dst.mutable_data_ptr());
  if (to_channels_last) {
    transpose_planes(from, to, N, C, P);  // (C × H·W) → (H·W × C)
  } else {
    transpose_planes(from, to, N, P, C);  // (H·W × C) → (C × H·W)
  }
  return true;
}

}  // namespace manualconv

// torch.ops.manualconv.layout_copy(t, channels_last): a copy of t in the NCHW (channels_last
// false) or channels-last layout, through manualconv::contiguous (so through the transposes above
// where they apply): the path the kernels' layout copies take, for the tests.
TORCH_LIBRARY_FRAGMENT(manualconv, m) { m.def("layout_copy(Tensor input, bool channels_last) -> Tensor"); }

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("layout_copy", [](const at::Tensor& input, bool channels_last) {
    const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    TORCH_CHECK(!channels_last || input.dim() == 4, "layout_copy: channels_last needs a 4-d input, got ",
                input.dim(), " dimensions");
    if (input.is_contiguous(format)) return input.clone(format);  // a copy, never the input itself
    return manualconv::contiguous(input, format);
  });
}
