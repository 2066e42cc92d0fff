// The direct conv kernels (conv2d_direct_tiles.h) compiled for AVX-512 F/BW/DQ/VL (32 zmm registers): a full tile is 32 channels (two zmm, Vec16) × 12 pixels;
// the 8-channel remainder in ymm (Vec8). Called by conv2d_direct.cpp only when the CPU
// capability is avx512 or above (select_conv2d_kernel).
//
// Only <cstdint> and <immintrin.h> come before the target region; everything inside has internal
// linkage (anonymous namespace) except the two exported functions, whose names carry the ISA: no
// inline or template symbol compiled here can be picked by the linker for code of another unit.

#include "conv2d_direct_isa.h"

#ifdef MANUALCONV_HAVE_DIRECT_KERNELS
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif

namespace manualconv {
namespace {
#define MANUALCONV_VEC_AVX512 1
#include "vec.h"
#include "conv2d_direct_tiles.h"

struct Isa {
  using Wide = Vec16;
  using Half = Vec8;
  static constexpr int kWideVectors = 2;
  static constexpr DirectTiling kTiling = kDirectTilingAvx512;
  static_assert(kWideVectors * Wide::kLanes == kTiling.block_channels);
  static_assert(Half::kLanes == kDirectLanes);
};

}  // namespace

void direct_conv_sample_avx512(const DirectConv& s, const float* in, const float* wt,
                             const float* bias, float* out) {
  conv_sample<Isa>(s, in, wt, bias, out);
}

void direct_grad_weight_sample_avx512(const DirectConv& s, const float* in, const float* dy,
                                    const int64_t* col, float* dwt) {
  grad_weight_sample<Isa>(s, in, dy, col, dwt);
}

}  // namespace manualconv

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // MANUALCONV_HAVE_DIRECT_KERNELS
