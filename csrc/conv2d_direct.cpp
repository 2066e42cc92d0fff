// Direct channels-last float32 convolution (AVX2 + FMA), for the layers select_conv2d_kernel
// (conv2d.cpp) gives it: up to 64 channels (8 or 16 output channels for the weight gradient).
//
// CIFAR-size layers (8 to 64 output channels, 8² to 32² maps) give an im2col GEMM few columns,
// which BLAS runs well below its peak, and im2col itself costs a pass over memory. Here each
// output pixel is computed straight from the (zero-padded) input,
//   y[n, i, j, o] = b[o] + Σ_{a, b, c} x_pad[n, i·sH + a·dH, j·sW + b·dW, c] · W[o, c, a, b],
// with 6 pixels × 16 output channels held in 12 AVX registers: for each tap (a, b, c) two
// vectors of weights are loaded and each pixel's input value is broadcast against them.
//
// The input gradient of a stride-1 conv is the same computation (the seeds' observation): the
// "full" correlation of δy, padded by d·(k−1) − p, with the 180°-rotated kernel whose input and
// output channels are swapped:
//   δx[n, h, w, c] = Σ_{a, b, o} δy_pad[n, h + a·dH, w + b·dW, o] · W[o, c, kH−1−a, kW−1−b].
//
// The weight gradient (8 or 16 output channels) is the correlation of the input with δy,
//   ∂J/∂W[o, c, a, b] = Σ_{n, i, j} δy[n, i, j, o] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c],
// with 16 output channels × 6 weight columns (a, b, c) held in 12 AVX registers while the
// sum runs over a sample's pixels: per pixel two vectors of δy, six broadcast input values.

#include "conv2d.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MANUALCONV_HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#endif

namespace manualconv {
namespace {

// The tiles below keep their accumulators in registers named for the tile sizes of conv2d.h.
static_assert(kDirectLanes == 8, "the tiles hold __m256 vectors of 8 floats");
static_assert(kDirectBlockChannels == 2 * kDirectLanes, "tile_6x16 holds two vectors per pixel");
static_assert(kDirectTilePixels == 6, "tile_6x16 / tile_6x8 name 6 pixels' accumulators");
static_assert(kDirectTileColumns == 6, "grad_weight_tile names 6 columns' accumulators");

// One direct convolution: `in` is one sample, already zero-padded, (Hp, Wp, C_in) with the
// padding of the conv folded in; the weights are (kH, kW, C_in, C_out), packed in blocks of
// kDirectBlockChannels output channels (pack_weight_blocks); out is (H_out, W_out, C_out).
struct DirectConv {
  int64_t Hp, Wp, C_in, C_out, kH, kW, sH, sW, dH, dW, H_out, W_out;
};

#ifdef MANUALCONV_HAVE_AVX2_KERNEL

// A tile is 6 consecutive output pixels of one sample, in row-major order (so a tile may wrap
// from one output row to the next: rows whose width 6 does not divide waste nothing), × 16 or
// 8 output channels. px[k] points at the top-left input tap of the tile's pixel k; tap (a, b)
// of every pixel is `off` further on. The tiles accumulate over every tap (a, b, c), then
// write the sum plus the bias. The 6-pixel tiles keep their accumulators in named registers
// (12 or 6 of the 16 AVX registers, plus the weights and one broadcast): written out by hand,
// as compilers keep an array of them in memory.
#define MANUALCONV_TAPS(width, ...)                                                       \
  for (int64_t a = 0; a < s.kH; ++a) {                                                     \
    for (int64_t b = 0; b < s.kW; ++b) {                                                   \
      const int64_t off = (a * s.dH * s.Wp + b * s.dW) * s.C_in;                          \
      const float* w = wt + (a * s.kW + b) * s.C_in * (width);                            \
      for (int64_t c = off; c < off + s.C_in; ++c, w += (width)) { __VA_ARGS__ }          \
    }                                                                                      \
  }

// 6 pixels × 16 output channels (o0 …)
__attribute__((target("avx2,fma"))) void tile_6x16(const DirectConv& s, const float* const* px,
                                                   const float* wt, const float* bias,
                                                   int64_t o0, float* y) {
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + o0 + kDirectLanes) : _mm256_setzero_ps();
  __m256 y00 = b0, y01 = b1, y10 = b0, y11 = b1, y20 = b0, y21 = b1;
  __m256 y30 = b0, y31 = b1, y40 = b0, y41 = b1, y50 = b0, y51 = b1;
  const float *p0 = px[0], *p1 = px[1], *p2 = px[2], *p3 = px[3], *p4 = px[4], *p5 = px[5];
  MANUALCONV_TAPS(kDirectBlockChannels, {
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + kDirectLanes);
    __m256 v = _mm256_broadcast_ss(p0 + c);
    y00 = _mm256_fmadd_ps(v, w0, y00), y01 = _mm256_fmadd_ps(v, w1, y01);
    v = _mm256_broadcast_ss(p1 + c);
    y10 = _mm256_fmadd_ps(v, w0, y10), y11 = _mm256_fmadd_ps(v, w1, y11);
    v = _mm256_broadcast_ss(p2 + c);
    y20 = _mm256_fmadd_ps(v, w0, y20), y21 = _mm256_fmadd_ps(v, w1, y21);
    v = _mm256_broadcast_ss(p3 + c);
    y30 = _mm256_fmadd_ps(v, w0, y30), y31 = _mm256_fmadd_ps(v, w1, y31);
    v = _mm256_broadcast_ss(p4 + c);
    y40 = _mm256_fmadd_ps(v, w0, y40), y41 = _mm256_fmadd_ps(v, w1, y41);
    v = _mm256_broadcast_ss(p5 + c);
    y50 = _mm256_fmadd_ps(v, w0, y50), y51 = _mm256_fmadd_ps(v, w1, y51);
  })
  const int64_t O = s.C_out;
  y += o0;
  constexpr int64_t V = kDirectLanes;  // the second vector of a pixel
  _mm256_storeu_ps(y, y00), _mm256_storeu_ps(y + V, y01);
  _mm256_storeu_ps(y + O, y10), _mm256_storeu_ps(y + O + V, y11);
  _mm256_storeu_ps(y + 2 * O, y20), _mm256_storeu_ps(y + 2 * O + V, y21);
  _mm256_storeu_ps(y + 3 * O, y30), _mm256_storeu_ps(y + 3 * O + V, y31);
  _mm256_storeu_ps(y + 4 * O, y40), _mm256_storeu_ps(y + 4 * O + V, y41);
  _mm256_storeu_ps(y + 5 * O, y50), _mm256_storeu_ps(y + 5 * O + V, y51);
}

// 6 pixels × 8 output channels (the last block when C_out is an odd multiple of 8)
__attribute__((target("avx2,fma"))) void tile_6x8(const DirectConv& s, const float* const* px,
                                                  const float* wt, const float* bias,
                                                  int64_t o0, float* y) {
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
  __m256 y0 = b0, y1 = b0, y2 = b0, y3 = b0, y4 = b0, y5 = b0;
  const float *p0 = px[0], *p1 = px[1], *p2 = px[2], *p3 = px[3], *p4 = px[4], *p5 = px[5];
  MANUALCONV_TAPS(kDirectLanes, {
    const __m256 w0 = _mm256_loadu_ps(w);
    y0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + c), w0, y0);
    y1 = _mm256_fmadd_ps(_mm256_broadcast_ss(p1 + c), w0, y1);
    y2 = _mm256_fmadd_ps(_mm256_broadcast_ss(p2 + c), w0, y2);
    y3 = _mm256_fmadd_ps(_mm256_broadcast_ss(p3 + c), w0, y3);
    y4 = _mm256_fmadd_ps(_mm256_broadcast_ss(p4 + c), w0, y4);
    y5 = _mm256_fmadd_ps(_mm256_broadcast_ss(p5 + c), w0, y5);
  })
  const int64_t O = s.C_out;
  y += o0;
  _mm256_storeu_ps(y, y0), _mm256_storeu_ps(y + O, y1), _mm256_storeu_ps(y + 2 * O, y2);
  _mm256_storeu_ps(y + 3 * O, y3), _mm256_storeu_ps(y + 4 * O, y4), _mm256_storeu_ps(y + 5 * O, y5);
}

// 1 pixel × 8 output channels (a sample with fewer than 6 output pixels); kWidth is the width
// of the weight block wt points into
template <int kWidth>
__attribute__((target("avx2,fma"))) void tile_1x8(const DirectConv& s, const float* const* px,
                                                  const float* wt, const float* bias,
                                                  int64_t o0, float* y) {
  __m256 y0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
  const float* p0 = px[0];
  MANUALCONV_TAPS(kWidth, { y0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + c), _mm256_loadu_ps(w), y0); })
  _mm256_storeu_ps(y + o0, y0);
}
#undef MANUALCONV_TAPS

// One sample: for each block of 16 (or 8) output channels, its H_out·W_out output pixels in
// tiles of 6; when 6 does not divide the pixel count the last tile is moved back to end at the
// last pixel, recomputing (bit for bit the same) a few pixels of the one before. wt holds the
// blocks one after the other (see pack_weight_blocks), so a block's weights are contiguous.
__attribute__((target("avx2,fma"))) void direct_sample(const DirectConv& s, const float* in,
                                                       const float* wt, const float* bias,
                                                       float* out) {
  const int64_t pixels = s.H_out * s.W_out, K = s.kH * s.kW * s.C_in;
  const int64_t tile = pixels < kDirectTilePixels ? 1 : kDirectTilePixels;
  const float* px[kDirectTilePixels];
  for (int64_t o0 = 0; o0 < s.C_out; o0 += kDirectBlockChannels) {
    const bool wide = o0 + kDirectBlockChannels <= s.C_out;
    const float* w = wt + o0 * K;
    for (int64_t q = 0; q < pixels; q += tile) {
      const int64_t q0 = std::min(q, pixels - tile);
      for (int64_t k = 0; k < tile; ++k) {
        const int64_t i = (q0 + k) / s.W_out, j = (q0 + k) % s.W_out;
        px[k] = in + (i * s.sH * s.Wp + j * s.sW) * s.C_in;
      }
      float* y = out + q0 * s.C_out;
      if (tile == 1) {
        if (wide) {  // the two halves of a full block
          tile_1x8<kDirectBlockChannels>(s, px, w, bias, o0, y);
          tile_1x8<kDirectBlockChannels>(s, px, w + kDirectLanes, bias, o0 + kDirectLanes, y);
        } else {
          tile_1x8<kDirectLanes>(s, px, w, bias, o0, y);
        }
      } else if (wide) {
        tile_6x16(s, px, w, bias, o0, y);
      } else {
        tile_6x8(s, px, w, bias, o0, y);
      }
    }
  }
}

// Weight gradient, one sample: a tile is 16 (or 8) output channels o0… × 6 consecutive
// columns k0… of the channels-last weight (column k = (a·kW + b)·C + c, at offset col[k] from
// a pixel's top-left input tap), summed over every output pixel: per pixel two (or one)
// vectors of δy and six broadcast input values, 12 (or 6) FMAs into register accumulators.
// The sums are added to dw (O × K); the first `skip` columns are left out (a tile moved back
// to end at column K overlaps the one before).
template <int kVectors>
__attribute__((target("avx2,fma"))) void grad_weight_tile(const DirectConv& s, const float* in,
                                                          const float* dy, const int64_t* col,
                                                          int64_t o0, int64_t skip, float* dw,
                                                          int64_t K) {
  static_assert(kVectors == 1 || kVectors == 2);
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const int64_t c0 = col[0], c1 = col[1], c2 = col[2], c3 = col[3], c4 = col[4], c5 = col[5];
  const int64_t O = s.C_out, step = s.sW * s.C_in;
  for (int64_t i = 0; i < s.H_out; ++i) {
    const float* x = in + i * s.sH * s.Wp * s.C_in;
    const float* d = dy + i * s.W_out * O + o0;
    for (int64_t j = 0; j < s.W_out; ++j, x += step, d += O) {
      const __m256 d0 = _mm256_loadu_ps(d);
      const __m256 d1 = kVectors == 2 ? _mm256_loadu_ps(d + kDirectLanes) : d0;
      // column k: its input value at this pixel times the pixel's δy vectors
#define MANUALCONV_COLUMN(k)                                        \
  {                                                                 \
    const __m256 v = _mm256_broadcast_ss(x + c##k);                 \
    a##k##0 = _mm256_fmadd_ps(v, d0, a##k##0);                      \
    if (kVectors == 2) a##k##1 = _mm256_fmadd_ps(v, d1, a##k##1);   \
  }
      MANUALCONV_COLUMN(0) MANUALCONV_COLUMN(1) MANUALCONV_COLUMN(2)
      MANUALCONV_COLUMN(3) MANUALCONV_COLUMN(4) MANUALCONV_COLUMN(5)
#undef MANUALCONV_COLUMN
    }
  }
  constexpr int64_t V = kDirectLanes;  // the second vector of a column
  alignas(32) float sums[kDirectTileColumns][kDirectBlockChannels];
  _mm256_store_ps(sums[0], a00), _mm256_store_ps(sums[0] + V, a01);
  _mm256_store_ps(sums[1], a10), _mm256_store_ps(sums[1] + V, a11);
  _mm256_store_ps(sums[2], a20), _mm256_store_ps(sums[2] + V, a21);
  _mm256_store_ps(sums[3], a30), _mm256_store_ps(sums[3] + V, a31);
  _mm256_store_ps(sums[4], a40), _mm256_store_ps(sums[4] + V, a41);
  _mm256_store_ps(sums[5], a50), _mm256_store_ps(sums[5] + V, a51);
  for (int64_t k = skip; k < kDirectTileColumns; ++k) {
    for (int64_t v = 0; v < V * kVectors; ++v) dw[(o0 + v) * K + k] += sums[k][v];
  }
}

// One sample's contribution to dw (O × K, K = kH·kW·C), in tiles of 16 (or 8) output channels
// × 6 weight columns.
__attribute__((target("avx2,fma"))) void grad_weight_sample(const DirectConv& s, const float* in,
                                                            const float* dy, const int64_t* col,
                                                            float* dw) {
  const int64_t K = s.kH * s.kW * s.C_in;
  for (int64_t k = 0; k < K; k += kDirectTileColumns) {
    const int64_t k0 = std::min(k, K - kDirectTileColumns);
    int64_t o0 = 0;
    for (; o0 + kDirectBlockChannels <= s.C_out; o0 += kDirectBlockChannels) {
      grad_weight_tile<2>(s, in, dy, col + k0, o0, k - k0, dw + k0, K);
    }
    if (o0 < s.C_out) grad_weight_tile<1>(s, in, dy, col + k0, o0, k - k0, dw + k0, K);
  }
}

#else
void direct_sample(const DirectConv&, const float*, const float*, const float*, float*) {}
void grad_weight_sample(const DirectConv&, const float*, const float*, const int64_t*, float*) {}
#endif

// The (kH, kW, C_in, C_out) weights regrouped into blocks of 16 output channels (the last one
// 8 wide when 16 does not divide C_out), block o0 at o0·K, each (kH, kW, C_in, width) contiguous.
at::Tensor pack_weight_blocks(const at::Tensor& wt, int64_t C_out) {
  const int64_t K = wt.numel() / C_out;
  at::Tensor packed = at::empty_like(wt);
  const float* src = wt.const_data_ptr<float>();
  float* dst = packed.mutable_data_ptr<float>();
  for (int64_t o0 = 0; o0 < C_out; o0 += kDirectBlockChannels) {
    const int64_t width = std::min<int64_t>(kDirectBlockChannels, C_out - o0);
    for (int64_t t = 0; t < K; ++t) std::copy_n(src + t * C_out + o0, width, dst + o0 * K + t * width);
  }
  return packed;
}

// Copies sample x (H, W, C) into the interior of padded (Hp, Wp, C), pad_h / pad_w from the
// top / left; the border is never written, so it stays zero.
void copy_into_padded(const float* x, int64_t H, int64_t W, int64_t C, int64_t pad_h,
                      int64_t pad_w, int64_t Wp, float* padded) {
  for (int64_t h = 0; h < H; ++h) {
    std::copy_n(x + h * W * C, W * C, padded + ((h + pad_h) * Wp + pad_w) * C);
  }
}

// Calls body(n, padded) for every sample n, samples spread over threads: in_nhwc (N, H, W,
// C_in) is copied sample by sample into the calling thread's zero-padded buffer (Hp, Wp, C_in).
template <typename F>
void for_each_padded_sample(const DirectConv& s, int64_t N, const float* in_nhwc, int64_t H,
                            int64_t W, int64_t pad_h, int64_t pad_w, const F& body) {
  at::parallel_for(0, N, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor buffer = at::zeros({s.Hp * s.Wp * s.C_in}, at::kFloat);  // borders stay zero
    float* padded = buffer.mutable_data_ptr<float>();
    for (int64_t n = begin; n < end; ++n) {
      copy_into_padded(in_nhwc + n * H * W * s.C_in, H, W, s.C_in, pad_h, pad_w, s.Wp, padded);
      body(n, padded);
    }
  });
}

// Runs s over the batch, writing out (N, H_out, W_out, C_out).
void direct_conv_batch(const DirectConv& s, int64_t N, const float* in_nhwc, int64_t H,
                       int64_t W, int64_t pad_h, int64_t pad_w, const float* wt, const float* bias,
                       float* out) {
  for_each_padded_sample(s, N, in_nhwc, H, W, pad_h, pad_w, [&](int64_t n, const float* padded) {
    direct_sample(s, padded, wt, bias, out + n * s.H_out * s.W_out * s.C_out);
  });
}

}  // namespace

CpuCapability cpu_capability() {
#ifdef MANUALCONV_HAVE_AVX2_KERNEL
  static const CpuCapability capability =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? CpuCapability::Avx2
                                                                       : CpuCapability::Default;
  return capability;
#else
  return CpuCapability::Default;
#endif
}

// y = x ⋆ W + b, computed directly (x channels-last float32)
at::Tensor conv2d_forward_direct(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias, const Conv2dGeometry& g) {
  const at::Tensor wt = pack_weight_blocks(weight.permute({2, 3, 1, 0}).contiguous(), g.O);  // (kH, kW, C, O), in blocks
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = at::empty(g.output_size(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const DirectConv s{g.H + 2 * g.pH, g.W + 2 * g.pW, g.C, g.O, g.kH, g.kW, g.sH, g.sW,
                     g.dH, g.dW, g.H_out, g.W_out};
  direct_conv_batch(s, g.N, x.const_data_ptr<float>(), g.H, g.W, g.pH, g.pW,
                    wt.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                    y.mutable_data_ptr<float>());
  return y;
}

// δx = full-correlation(δy, rot180(W)) with W's channels swapped (stride 1), computed directly
at::Tensor conv2d_grad_input_direct(const at::Tensor& dy, const at::Tensor& weight,
                                    const Conv2dGeometry& g) {
  // rot180(W) with in/out swapped, (kH, kW, O, C) in blocks of C: wt[a, b, o, c] = W[o, c, kH−1−a, kW−1−b]
  const at::Tensor wt = pack_weight_blocks(weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous(), g.C);
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W},
                            dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t pad_h = g.dH * (g.kH - 1) - g.pH, pad_w = g.dW * (g.kW - 1) - g.pW;
  const DirectConv s{g.H_out + 2 * pad_h, g.W_out + 2 * pad_w, g.O, g.C, g.kH, g.kW, 1, 1,
                     g.dH, g.dW, g.H, g.W};
  direct_conv_batch(s, g.N, dy.const_data_ptr<float>(), g.H_out, g.W_out, pad_h, pad_w,
                    wt.const_data_ptr<float>(), nullptr, dx.mutable_data_ptr<float>());
  return dx;
}

// ∂J/∂W[o, c, a, b] = Σ_{n, i, j} δy[n, i, j, o] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c], computed
// directly (one accumulator per thread, summed at the end; returned channels-last)
at::Tensor conv2d_grad_weight_direct(const at::Tensor& x, const at::Tensor& dy,
                                     const Conv2dGeometry& g) {
  const DirectConv s{g.H + 2 * g.pH, g.W + 2 * g.pW, g.C, g.O, g.kH, g.kW, g.sH, g.sW,
                     g.dH, g.dW, g.H_out, g.W_out};
  const int64_t K = g.K();
  std::vector<int64_t> col(K);  // weight column (a, b, c) → offset from a pixel's top-left tap
  for (int64_t a = 0; a < g.kH; ++a) {
    for (int64_t b = 0; b < g.kW; ++b) {
      for (int64_t c = 0; c < g.C; ++c) col[(a * g.kW + b) * g.C + c] = (a * g.dH * s.Wp + b * g.dW) * g.C + c;
    }
  }
  const PerThreadSum dw_sum(at::get_num_threads(), {g.O, K}, x.options());
  const float* dy_data = dy.const_data_ptr<float>();
  for_each_padded_sample(s, g.N, x.const_data_ptr<float>(), g.H, g.W, g.pH, g.pW,
                         [&](int64_t n, const float* padded) {
    grad_weight_sample(s, padded, dy_data + n * g.L() * g.O, col.data(), dw_sum.mine<float>());
  });
  return dw_sum.total().view({g.O, g.kH, g.kW, g.C}).permute({0, 3, 1, 2});  // (O, C, kH, kW), channels-last
}

}  // namespace manualconv
