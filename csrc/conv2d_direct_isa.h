// The interface between conv2d_direct.cpp (ATen side: packing, padding, threads) and the direct
// kernels compiled once per instruction set (conv2d_direct_avx2.cpp, conv2d_direct_avx512.cpp).
// Plain C++ only (raw pointers and a POD of sizes): the per-ISA units include nothing from ATen or
// the standard library, so no inline or template function of a shared header is ever compiled with
// a wider instruction set than the CPU that calls it has (the linker keeps one copy of each).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MANUALCONV_HAVE_DIRECT_KERNELS 1
#endif

namespace manualconv {

// One direct convolution: `in` is one sample, already zero-padded, (Hp, Wp, C_in) with the
// padding of the conv folded in; the weights are (kH, kW, C_in, C_out), packed in blocks of
// DirectTiling::block_channels output channels (the last block narrower), block o0 at o0·K, each
// (kH, kW, C_in, width) contiguous; out is (H_out, W_out, C_out).
struct DirectConv {
  int64_t Hp, Wp, C_in, C_out, kH, kW, sH, sW, dH, dW, H_out, W_out;
};

// The register tiles of one instruction set. Forward / input gradient: tile_pixels output pixels
// (or tile_pixels_alt, when that recomputes fewer pixels of a map; 0: none) × up to
// block_channels output channels; weight gradient: up to block_channels output channels ×
// tile_columns weight columns (a, b, c). Channels come in multiples of kDirectLanes (the narrowest
// vector, 8 floats, on every instruction set).
struct DirectTiling {
  int64_t block_channels, tile_pixels, tile_columns, tile_pixels_alt;
  int64_t row_tile_pixels = 0;  // forward / input gradient, one vector of channels: row tiles (0: none)
};
constexpr int64_t kDirectLanes = 8;
// AVX2 (16 ymm): 6 pixels × 16 channels (two ymm) = 12 accumulators; 16 channels × 6 columns.
constexpr DirectTiling kDirectTilingAvx2{16, 6, 6, 0};
// AVX-512 (32 zmm): 12 pixels × 32 channels (two zmm) = 24 accumulators, plus 2 weight vectors
// (the pixel's value is an embedded broadcast operand); 32 channels × 12 columns likewise. 8-pixel
// tiles where 12 would recompute more: on an 8×8 map the 12-pixel tiles measured 12 % slower than
// AVX2's 6-pixel ones (1.60 vs 1.42 ms, 64 → 64 channels, batch 32, one thread, AMD EPYC Zen 4).
// Row tiles (conv2d_direct_tiles.h's conv_tile with kStride > 0: pixels along one output row, one pointer):
// 16 pixels for a block of one zmm (16 output channels: ResNet-20's first stage), tile_pixels (12)
// for a full block where rows waste no more than the wrapping tiles; the weight gradient's runs of
// consecutive columns: 16 for a one-zmm block of output channels, else tile_columns (12).
constexpr DirectTiling kDirectTilingAvx512{32, 12, 12, 8, 16};

// One sample of the forward / input-gradient direct conv: out = in ⋆ wt (+ bias, may be null).
using DirectConvSample = void (*)(const DirectConv& s, const float* in, const float* wt,
                                  const float* bias, float* out);
// One sample's weight gradient added to dwᵀ (K × C_out, K = kH·kW·C_in, channels-last columns):
// dwt[k, o] += Σ_pixels dy[pixel, o] · in[pixel's top-left tap + col[k]].
using DirectGradWeightSample = void (*)(const DirectConv& s, const float* in, const float* dy,
                                        const int64_t* col, float* dwt);

#ifdef MANUALCONV_HAVE_DIRECT_KERNELS
void direct_conv_sample_avx2(const DirectConv&, const float*, const float*, const float*, float*);
void direct_grad_weight_sample_avx2(const DirectConv&, const float*, const float*, const int64_t*,
                                    float*);
void direct_conv_sample_avx512(const DirectConv&, const float*, const float*, const float*, float*);
void direct_grad_weight_sample_avx512(const DirectConv&, const float*, const float*, const int64_t*,
                                      float*);
#endif

}  // namespace manualconv
