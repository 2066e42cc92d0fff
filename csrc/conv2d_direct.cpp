// Direct channels-last float32 convolution for layers with few output channels (AVX2 + FMA).
//
// With 8 or 16 output channels an im2col GEMM has only that many columns, which BLAS runs at about
// half its speed. Here each output pixel is computed straight from the (zero-padded) input,
//   y[n, i, j, o] = b[o] + Σ_{a, b, c} x_pad[n, i·sH + a·dH, j·sW + b·dW, c] · W[o, c, a, b],
// with 6 pixels × 16 output channels held in 12 AVX registers: for each tap (a, b, c) two
// vectors of weights are loaded and each pixel's input value is broadcast against them.
//
// The input gradient of a stride-1 conv is the same computation (the seeds' observation): the
// "full" correlation of δy, padded by d·(k−1) − p, with the 180°-rotated kernel whose input and
// output channels are swapped:
//   δx[n, h, w, c] = Σ_{a, b, o} δy_pad[n, h + a·dH, w + b·dW, o] · W[o, c, kH−1−a, kW−1−b].

#include "conv2d.h"

#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MANUALCONV_HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#endif

namespace manualconv {
namespace {

constexpr int64_t kMaxDirectChannels = 16;  // above this the GEMM path measured faster

// One direct convolution: `in` is one sample, already zero-padded, (Hp, Wp, C_in) with the
// padding of the conv folded in; wt is (kH, kW, C_in, C_out); out is (H_out, W_out, C_out).
struct DirectConv {
  int64_t Hp, Wp, C_in, C_out, kH, kW, sH, sW, dH, dW, H_out, W_out;
};

#ifdef MANUALCONV_HAVE_AVX2_KERNEL

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// The tiles below accumulate over every tap (a, b, c), then write the sum plus the bias. The
// 6-pixel tiles keep their accumulators in named registers (12 or 6 of the 16 AVX registers,
// plus the weights and one broadcast): written out by hand, as compilers keep an array of them
// in memory.
#define MANUALCONV_TAPS(...)                                                              \
  for (int64_t a = 0; a < s.kH; ++a) {                                                     \
    const float* in_row = in + (i * s.sH + a * s.dH) * s.Wp * s.C_in;                     \
    for (int64_t b = 0; b < s.kW; ++b) {                                                   \
      const float* x = in_row + (j0 * s.sW + b * s.dW) * s.C_in;                          \
      const float* w = wt + (a * s.kW + b) * s.C_in * s.C_out + o0;                       \
      for (int64_t c = 0; c < s.C_in; ++c, ++x, w += s.C_out) { __VA_ARGS__ }             \
    }                                                                                      \
  }

// 6 pixels (j0 … j0+5 of output row i) × 16 output channels (o0 …)
__attribute__((target("avx2,fma"))) void tile_6x16(const DirectConv& s, const float* in,
                                                   const float* wt, const float* bias, int64_t i,
                                                   int64_t j0, int64_t o0, float* out) {
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + o0 + 8) : _mm256_setzero_ps();
  __m256 y00 = b0, y01 = b1, y10 = b0, y11 = b1, y20 = b0, y21 = b1;
  __m256 y30 = b0, y31 = b1, y40 = b0, y41 = b1, y50 = b0, y51 = b1;
  const int64_t step = s.sW * s.C_in;  // from one pixel's input to the next's
  MANUALCONV_TAPS({
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    __m256 v = _mm256_broadcast_ss(x);
    y00 = _mm256_fmadd_ps(v, w0, y00), y01 = _mm256_fmadd_ps(v, w1, y01);
    v = _mm256_broadcast_ss(x + step);
    y10 = _mm256_fmadd_ps(v, w0, y10), y11 = _mm256_fmadd_ps(v, w1, y11);
    v = _mm256_broadcast_ss(x + 2 * step);
    y20 = _mm256_fmadd_ps(v, w0, y20), y21 = _mm256_fmadd_ps(v, w1, y21);
    v = _mm256_broadcast_ss(x + 3 * step);
    y30 = _mm256_fmadd_ps(v, w0, y30), y31 = _mm256_fmadd_ps(v, w1, y31);
    v = _mm256_broadcast_ss(x + 4 * step);
    y40 = _mm256_fmadd_ps(v, w0, y40), y41 = _mm256_fmadd_ps(v, w1, y41);
    v = _mm256_broadcast_ss(x + 5 * step);
    y50 = _mm256_fmadd_ps(v, w0, y50), y51 = _mm256_fmadd_ps(v, w1, y51);
  })
  float* y = out + (i * s.W_out + j0) * s.C_out + o0;
  const int64_t O = s.C_out;
  _mm256_storeu_ps(y, y00), _mm256_storeu_ps(y + 8, y01);
  _mm256_storeu_ps(y + O, y10), _mm256_storeu_ps(y + O + 8, y11);
  _mm256_storeu_ps(y + 2 * O, y20), _mm256_storeu_ps(y + 2 * O + 8, y21);
  _mm256_storeu_ps(y + 3 * O, y30), _mm256_storeu_ps(y + 3 * O + 8, y31);
  _mm256_storeu_ps(y + 4 * O, y40), _mm256_storeu_ps(y + 4 * O + 8, y41);
  _mm256_storeu_ps(y + 5 * O, y50), _mm256_storeu_ps(y + 5 * O + 8, y51);
}

// 6 pixels × 8 output channels (the last block when C_out is an odd multiple of 8)
__attribute__((target("avx2,fma"))) void tile_6x8(const DirectConv& s, const float* in,
                                                  const float* wt, const float* bias, int64_t i,
                                                  int64_t j0, int64_t o0, float* out) {
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
  __m256 y0 = b0, y1 = b0, y2 = b0, y3 = b0, y4 = b0, y5 = b0;
  const int64_t step = s.sW * s.C_in;
  MANUALCONV_TAPS({
    const __m256 w0 = _mm256_loadu_ps(w);
    y0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x), w0, y0);
    y1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + step), w0, y1);
    y2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * step), w0, y2);
    y3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 3 * step), w0, y3);
    y4 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 4 * step), w0, y4);
    y5 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 5 * step), w0, y5);
  })
  float* y = out + (i * s.W_out + j0) * s.C_out + o0;
  const int64_t O = s.C_out;
  _mm256_storeu_ps(y, y0), _mm256_storeu_ps(y + O, y1), _mm256_storeu_ps(y + 2 * O, y2);
  _mm256_storeu_ps(y + 3 * O, y3), _mm256_storeu_ps(y + 4 * O, y4), _mm256_storeu_ps(y + 5 * O, y5);
}

// 1 pixel × 8 output channels (rows narrower than 6 pixels)
__attribute__((target("avx2,fma"))) void tile_1x8(const DirectConv& s, const float* in,
                                                  const float* wt, const float* bias, int64_t i,
                                                  int64_t j0, int64_t o0, float* out) {
  __m256 y0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
  MANUALCONV_TAPS({ y0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x), _mm256_loadu_ps(w), y0); })
  _mm256_storeu_ps(out + (i * s.W_out + j0) * s.C_out + o0, y0);
}
#undef MANUALCONV_TAPS

// One output row in 6-pixel tiles; when 6 does not divide W_out the last tile is moved back to
// end at the row's end, recomputing (bit for bit the same) a few pixels of the one before.
__attribute__((target("avx2,fma"))) void direct_row(const DirectConv& s, const float* in,
                                                    const float* wt, const float* bias, int64_t i,
                                                    float* out) {
  if (s.W_out < 6) {
    for (int64_t j = 0; j < s.W_out; ++j) {
      for (int64_t o0 = 0; o0 < s.C_out; o0 += 8) tile_1x8(s, in, wt, bias, i, j, o0, out);
    }
    return;
  }
  for (int64_t j = 0; j < s.W_out; j += 6) {
    const int64_t j0 = std::min(j, s.W_out - 6);
    int64_t o0 = 0;
    for (; o0 + 16 <= s.C_out; o0 += 16) tile_6x16(s, in, wt, bias, i, j0, o0, out);
    if (o0 < s.C_out) tile_6x8(s, in, wt, bias, i, j0, o0, out);
  }
}

// One sample: every output row, in tiles of 6 pixels × 16 (or 8) output channels.
__attribute__((target("avx2,fma"))) void direct_sample(const DirectConv& s, const float* in,
                                                       const float* wt, const float* bias,
                                                       float* out) {
  for (int64_t i = 0; i < s.H_out; ++i) {
    direct_row(s, in, wt, bias, i, out);
  }
}

#else
bool cpu_has_avx2_fma() { return false; }
void direct_sample(const DirectConv&, const float*, const float*, const float*, float*) {}
#endif

// Runs s over the batch: in_nhwc (N, H, W, C_in) is copied sample by sample into a zero-padded
// per-thread buffer (pad_h, pad_w on each side), then direct_sample writes out (N, H_out, W_out,
// C_out). Samples are spread over threads.
void direct_conv_batch(const DirectConv& s, int64_t N, const float* in_nhwc, int64_t H,
                       int64_t W, int64_t pad_h, int64_t pad_w, const float* wt, const float* bias,
                       float* out) {
  at::parallel_for(0, N, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor buffer = at::zeros({s.Hp * s.Wp * s.C_in}, at::kFloat);  // borders stay zero
    float* padded = buffer.mutable_data_ptr<float>();
    for (int64_t n = begin; n < end; ++n) {
      const float* x = in_nhwc + n * H * W * s.C_in;
      for (int64_t h = 0; h < H; ++h) {
        std::copy_n(x + h * W * s.C_in, W * s.C_in,
                    padded + ((h + pad_h) * s.Wp + pad_w) * s.C_in);
      }
      direct_sample(s, padded, wt, bias, out + n * s.H_out * s.W_out * s.C_out);
    }
  });
}

}  // namespace

bool conv2d_direct_forward_applies(const Conv2dGeometry& g, at::ScalarType dtype) {
  return dtype == at::kFloat && g.groups == 1 && g.O % 8 == 0 && g.O <= kMaxDirectChannels &&
         cpu_has_avx2_fma();
}

bool conv2d_direct_grad_input_applies(const Conv2dGeometry& g, at::ScalarType dtype) {
  return dtype == at::kFloat && g.groups == 1 && g.C % 8 == 0 && g.C <= kMaxDirectChannels &&
         g.sH == 1 && g.sW == 1 && g.pH <= g.dH * (g.kH - 1) && g.pW <= g.dW * (g.kW - 1) &&
         cpu_has_avx2_fma();
}

// y = x ⋆ W + b, computed directly (x channels-last float32)
at::Tensor conv2d_forward_direct(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias, const Conv2dGeometry& g) {
  const at::Tensor wt = weight.permute({2, 3, 1, 0}).contiguous();  // (kH, kW, C, O)
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
  // rot180(W) with in/out swapped, laid out (kH, kW, O, C): wt[a, b, o, c] = W[o, c, kH−1−a, kW−1−b]
  const at::Tensor wt = weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous();
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W},
                            dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t pad_h = g.dH * (g.kH - 1) - g.pH, pad_w = g.dW * (g.kW - 1) - g.pW;
  const DirectConv s{g.H_out + 2 * pad_h, g.W_out + 2 * pad_w, g.O, g.C, g.kH, g.kW, 1, 1,
                     g.dH, g.dW, g.H, g.W};
  direct_conv_batch(s, g.N, dy.const_data_ptr<float>(), g.H_out, g.W_out, pad_h, pad_w,
                    wt.const_data_ptr<float>(), nullptr, dx.mutable_data_ptr<float>());
  return dx;
}

}  // namespace manualconv
