// Winograd F(2×2, 3×3) for 3×3, stride-1, dilation-1, one-group float32 convs (docs/derivation.md,
// section 18), for the geometries select_conv2d_kernel (conv2d.cpp) gives it.
//
// The output is cut into 2×2 tiles; tile (ti, tj) reads the 4×4 input tile d at rows 2·ti − p…,
// columns 2·tj − p… (tiles overlap by 2; zero where d lies in the padding or past the image).
// With the transforms
//   Bᵀ = [1  0 −1  0]      G = [ 1    0    0 ]      Aᵀ = [1  1  1  0]
//        [0  1  1  0]          [1/2  1/2  1/2]           [0  1 −1 −1]
//        [0 −1  1  0]          [1/2 −1/2  1/2]
//        [0  1  0 −1]          [ 0    0    1 ]
// each 2×2 output tile is
//   y = Aᵀ [ Σ_c (G g[o, c] Gᵀ) ⊙ (Bᵀ d[c] B) ] A,
// and for each of the 16 elements ξ of the 4×4 transformed tile the sum over input channels is
// one GEMM over a block of T tiles:
//   M_ξ (T × C_out) = V_ξ (T × C_in) · U_ξ (C_in × C_out),  V_ξ[t, c] = (Bᵀ d_t[c] B)_ξ,
//                                                         U_ξ[c, o] = (G g[o, c] Gᵀ)_ξ.
// The transforms read and write channels-last pixels (a pixel's channels contiguous), so they are
// loops over channels that the compiler vectorizes (built for the capability the kernels use,
// cpu_capability.h's run_for_cpu); NCHW tensors are staged that way a block of rows at a time
// (split_block).
//
// The input gradient of a stride-1 conv is a stride-1 conv (the seeds' observation, section 2):
// δx = δy padded by 2 − p, correlated with the 180°-rotated kernel whose input and output channels
// are swapped; the same routine computes it.
//
// The weight gradient is the forward's adjoint in g: with y_t = Aᵀ(U ⊙ V_t)A and U = G g Gᵀ,
// ⟨δy_t, Aᵀ(dU ⊙ V_t)A⟩ = ⟨(A δy_t Aᵀ) ⊙ V_t, G dg Gᵀ⟩ = ⟨Gᵀ[(A δy_t Aᵀ) ⊙ V_t]G, dg⟩, so
//   ∂J/∂g[o, c] = Gᵀ [ Σ_t (A δy_t[o] Aᵀ) ⊙ (Bᵀ d_t[c] B) ] G,
// for each ξ one product over the tiles: W_ξ (C_out × C_in) += D_ξᵀ · V_ξ, D_ξ[t, o] = (A δy_t[o] Aᵀ)_ξ.
//
// The 16 products of a block run as BLAS GEMMs (kernel Winograd), or on the direct kernels'
// register tiles (WinogradAvx2/Avx512): M_ξ = V_ξ·U_ξ is a 1×1 conv of the block's T tiles as
// pixels, W_ξ += D_ξᵀ·V_ξ that conv's weight gradient (conv2d_direct_tiles.h). MKL's sgemm on
// these small products (64×64×64 at 64 channels) ran well below its peak; the tiles need no
// packing of V and no call overhead (forward, AMD EPYC Zen 4, AVX-512, 2 threads, batch 128,
// NHWC, ms: 64→64 @8 2.25 → 1.88, 128→128 @8 8.00 → 6.55, 32→32 @16 2.65 → 2.35).
//
// Non-finite values: the transforms add and subtract inputs, so an inf input becomes inf − inf =
// NaN where the direct sum gives ±inf (torch's result). The output transform notes any NaN or
// ±inf it writes (the weight gradient checks its sums), and the kernel then returns nothing: its
// caller recomputes with the direct / GEMM kernel (conv2d.h). Finite data costs one compare per
// output value.
//
// Parallelism: blocks of tiles (over all samples) are spread over threads, each thread owning
// its V and M buffers and calling single-threaded products (BLAS inside a parallel region).

#include "blas.h"
#include "conv2d.h"
#include "cpu_capability.h"
#include "layout_copy.h"
#include "output_cache.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace manualconv {
namespace {

constexpr int64_t kPoints = 16;  // elements ξ of F(2×2)'s 4×4 transformed tile (the weight gradient's)

// One stride-1 3×3 correlation: in (N, Hi, Wi, Ci) channels-last, zero-padded by (ph, pw), to
// out (N, Ho, Wo, Co) channels-last, Ho = Hi + 2·ph − 2, Wo = Wi + 2·pw − 2.
// Output tiles of m×m (F(m×m, 3×3): m = 2 or 4), each reading an α×α input tile, α = m + 2.
struct WinogradConv {
  int64_t N, Hi, Wi, Ci, Co, ph, pw, Ho, Wo;
  int64_t m = 2;
  int64_t alpha() const { return m + 2; }
  int64_t points() const { return alpha() * alpha(); }  // elements ξ of a transformed tile
  int64_t tiles_h() const { return ceil_div<int64_t>(Ho, m); }
  int64_t tiles_w() const { return ceil_div<int64_t>(Wo, m); }
  int64_t tiles() const { return N * tiles_h() * tiles_w(); }
};

// G of F(2×2, 3×3) (4 × 3) and of F(4×4, 3×3) (6 × 3; interpolation points 0, ±1, ±2, ∞)
constexpr double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr double kG4[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                              {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6},  {0, 0, 1}};

// U[ξ, c, o] = (G g[o, c] Gᵀ)_ξ for F(m×m, 3×3): computed in float64 and rounded to float32 once
// (one rounding per entry instead of four). For the forward g is the (O, C, 3, 3) weight; for the
// input gradient (rotated = true) the rotated kernel with its channels swapped, g[c, o] =
// rot180(W[o, c]). Each plane U_ξ (Ci × Co) is written as the products read it: in blocks of
// `block` output channels (the direct tiles' layout, pack_weight_blocks'; block = Co for BLAS).
// The kernel is first laid out (Ci, 3·3, Co) by transposes, so that for each input channel the
// loop over output channels reads and writes consecutive floats (the compiler vectorizes it),
// input channels spread over threads. Measured (AMD EPYC Zen 5, 2 threads, a batch of one, where
// the transform dominates, NHWC, forward / input gradient, ms): 256 → 256 @4 8.27 / 9.57 → 0.5 /
// 0.5; 64 → 64 @8 0.26 / 0.31 → 0.06 / 0.07. The loop it replaces walked output channels outermost
// and wrote each plane Co floats apart, then packed and stacked the planes.
template <int kM, bool kRotated>
void transform_weights_of_channel(const float* g, int64_t c, int64_t Ci, int64_t Co, int64_t block, float* u) {
  constexpr int alpha = kM + 2;
  const auto& G = kM == 2 ? kG2 : kG4;
  const int64_t plane = Ci * Co;
  for (int64_t o0 = 0; o0 < Co; o0 += block) {
    const int64_t width = std::min(block, Co - o0);
    float* out = u + o0 * Ci + c * width;  // (c, o0) of the block of channels o0 … o0 + width
#pragma GCC ivdep  // out never overlaps g (so the loop vectorizes without alias checks)
    for (int64_t o = 0; o < width; ++o) {
      double k[9];  // g[o0 + o, c], row by row (the rotated kernel's taps read back to front)
      for (int t = 0; t < 9; ++t) k[t] = g[(kRotated ? 8 - t : t) * Co + o0 + o];
      double Gg[alpha][3];  // G g
      for (int r = 0; r < alpha; ++r) {
        for (int b = 0; b < 3; ++b) Gg[r][b] = G[r][0] * k[b] + G[r][1] * k[3 + b] + G[r][2] * k[6 + b];
      }
      for (int r = 0; r < alpha; ++r) {
        for (int s = 0; s < alpha; ++s) {
          const double value = Gg[r][0] * G[s][0] + Gg[r][1] * G[s][1] + Gg[r][2] * G[s][2];
          out[(r * alpha + s) * plane + o] = static_cast<float>(value);
        }
      }
    }
  }
}

at::Tensor transform_weights(const at::Tensor& weight, int64_t m, bool rotated, int64_t block) {
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // (O, C, 3, 3)
  const int64_t O = w.size(0), C = w.size(1);
  const int64_t Ci = rotated ? O : C, Co = rotated ? C : O, alpha = m + 2;
  // gt (Ci, 3·3, Co): the forward's (C·9 × O) = Wᵀ; the input gradient's [o][t][c] = W[o, c, t]
  // (its taps reversed as they are read)
  at::Tensor gt = at::empty({Ci, 9, Co}, w.options());
  if (rotated) {
    transpose_planes(w.const_data_ptr<float>(), gt.mutable_data_ptr<float>(), O, C, 9);
  } else {
    transpose_planes(w.const_data_ptr<float>(), gt.mutable_data_ptr<float>(), 1, O, C * 9);
  }
  at::Tensor U = manualconv::empty({alpha * alpha, Ci, Co}, w.options());
  const float* g = gt.const_data_ptr<float>();
  float* u = U.mutable_data_ptr<float>();
  at::parallel_for(0, Ci, std::max<int64_t>(1, 4096 / std::max<int64_t>(Co, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      run_for_cpu([&] {
        const float* gc = g + c * 9 * Co;
        if (m == 2) {
          rotated ? transform_weights_of_channel<2, true>(gc, c, Ci, Co, block, u)
                  : transform_weights_of_channel<2, false>(gc, c, Ci, Co, block, u);
        } else {
          rotated ? transform_weights_of_channel<4, true>(gc, c, Ci, Co, block, u)
                  : transform_weights_of_channel<4, false>(gc, c, Ci, Co, block, u);
        }
      });
    }
  });
  return U;
}

// V[ξ, c] = (Bᵀ d[c] B)_ξ for every channel of one tile: d[r][s] points at the Ci channels of the
// tile's input pixel (r, s) (a zero row where it lies in the padding); V_ξ is ld floats apart.
void transform_input_tile(const float* const* d, int64_t Ci, int64_t ld, float* v) {
  const float *d00 = d[0], *d01 = d[1], *d02 = d[2], *d03 = d[3];
  const float *d10 = d[4], *d11 = d[5], *d12 = d[6], *d13 = d[7];
  const float *d20 = d[8], *d21 = d[9], *d22 = d[10], *d23 = d[11];
  const float *d30 = d[12], *d31 = d[13], *d32 = d[14], *d33 = d[15];
#pragma GCC ivdep  // v never overlaps the input (so the loop vectorizes without alias checks)
  for (int64_t c = 0; c < Ci; ++c) {
    // Bᵀ d: rows 0 − 2, 1 + 2, 2 − 1, 1 − 3 (for each column s)
    const float t00 = d00[c] - d20[c], t01 = d01[c] - d21[c], t02 = d02[c] - d22[c], t03 = d03[c] - d23[c];
    const float t10 = d10[c] + d20[c], t11 = d11[c] + d21[c], t12 = d12[c] + d22[c], t13 = d13[c] + d23[c];
    const float t20 = d20[c] - d10[c], t21 = d21[c] - d11[c], t22 = d22[c] - d12[c], t23 = d23[c] - d13[c];
    const float t30 = d10[c] - d30[c], t31 = d11[c] - d31[c], t32 = d12[c] - d32[c], t33 = d13[c] - d33[c];
    // (Bᵀ d) B: the same on the columns of each row r
    v[0 * ld + c] = t00 - t02, v[1 * ld + c] = t01 + t02, v[2 * ld + c] = t02 - t01, v[3 * ld + c] = t01 - t03;
    v[4 * ld + c] = t10 - t12, v[5 * ld + c] = t11 + t12, v[6 * ld + c] = t12 - t11, v[7 * ld + c] = t11 - t13;
    v[8 * ld + c] = t20 - t22, v[9 * ld + c] = t21 + t22, v[10 * ld + c] = t22 - t21, v[11 * ld + c] = t21 - t23;
    v[12 * ld + c] = t30 - t32, v[13 * ld + c] = t31 + t32, v[14 * ld + c] = t32 - t31, v[15 * ld + c] = t31 - t33;
  }
}

// y[i][j] = (Aᵀ M A)[i][j] + b for every output channel of one tile: M_ξ = m + ξ·ld (Co floats
// each); y[2·i + j] points at the Co channels of output pixel (i, j) (a scratch row where the
// pixel lies past the output). Returns whether every value written is finite.
bool transform_output_tile(const float* m, int64_t ld, int64_t Co, const float* bias,
                           float* const* y) {
  float *y00 = y[0], *y01 = y[1], *y10 = y[2], *y11 = y[3];
  int nonfinite = 0;  // v − v is 0 for a finite v, NaN for ±inf and NaN
#pragma GCC ivdep  // y never overlaps m (y rows are distinct pixels, or the scratch row nobody reads)
  for (int64_t o = 0; o < Co; ++o) {
    const float b = bias[o];
    // Aᵀ M: rows 0 + 1 + 2 and 1 − 2 − 3 (for each column s)
    const float r00 = m[0 * ld + o] + m[4 * ld + o] + m[8 * ld + o];
    const float r01 = m[1 * ld + o] + m[5 * ld + o] + m[9 * ld + o];
    const float r02 = m[2 * ld + o] + m[6 * ld + o] + m[10 * ld + o];
    const float r03 = m[3 * ld + o] + m[7 * ld + o] + m[11 * ld + o];
    const float r10 = m[4 * ld + o] - m[8 * ld + o] - m[12 * ld + o];
    const float r11 = m[5 * ld + o] - m[9 * ld + o] - m[13 * ld + o];
    const float r12 = m[6 * ld + o] - m[10 * ld + o] - m[14 * ld + o];
    const float r13 = m[7 * ld + o] - m[11 * ld + o] - m[15 * ld + o];
    // (Aᵀ M) A: the same on the columns of each row
    const float v00 = r00 + r01 + r02 + b, v01 = r01 - r02 - r03 + b;
    const float v10 = r10 + r11 + r12 + b, v11 = r11 - r12 - r13 + b;
    y00[o] = v00, y01[o] = v01, y10[o] = v10, y11[o] = v11;
    nonfinite |= ((v00 - v00) + (v01 - v01) + (v10 - v10) + (v11 - v11)) != 0.0f;
  }
  return nonfinite == 0;
}

// F(4×4, 3×3): Bᵀ (6 × 6) and Aᵀ (4 × 6) (docs/derivation.md, section 18)
//   Bᵀ = [4  0 −5  0  1  0]      Aᵀ = [1  1  1  1  1  0]
//        [0 −4 −4  1  1  0]           [0  1 −1  2 −2  0]
//        [0  4 −4 −1  1  0]           [0  1  1  4  4  0]
//        [0 −2 −1  2  1  0]           [0  1 −1  8 −8  1]
//        [0  2 −1 −2  1  0]
//        [0  4  0 −5  0  1]
// Bᵀ applied to one column (d0 … d5) of a 6×6 tile
inline void input_transform6(float d0, float d1, float d2, float d3, float d4, float d5, float& t0,
                             float& t1, float& t2, float& t3, float& t4, float& t5) {
  t0 = 4.0f * d0 - 5.0f * d2 + d4;
  t1 = (d3 + d4) - 4.0f * (d1 + d2);
  t2 = 4.0f * (d1 - d2) + (d4 - d3);
  t3 = 2.0f * (d3 - d1) + (d4 - d2);
  t4 = 2.0f * (d1 - d3) + (d4 - d2);
  t5 = 4.0f * d1 - 5.0f * d3 + d5;
}

// Aᵀ applied to one column (m0 … m5) of a 6×6 product tile
inline void output_transform6(float m0, float m1, float m2, float m3, float m4, float m5, float& y0,
                              float& y1, float& y2, float& y3) {
  const float p = m1 + m2, q = m1 - m2, r = m3 + m4, t = m3 - m4;
  y0 = m0 + p + r;
  y1 = q + 2.0f * t;
  y2 = p + 4.0f * r;
  y3 = q + 8.0f * t + m5;
}

// F(4×4): V[ξ, c] = (Bᵀ d[c] B)_ξ for every channel of one tile (d: its 36 input pixels)
void transform_input_tile6(const float* const* d, int64_t Ci, int64_t ld, float* v) {
#pragma GCC ivdep  // v never overlaps the input
  for (int64_t c = 0; c < Ci; ++c) {
    float t[6][6];  // Bᵀ d: t[r][s] (fully unrolled: registers)
#pragma GCC unroll 6
    for (int s = 0; s < 6; ++s) {
      input_transform6(d[s][c], d[6 + s][c], d[12 + s][c], d[18 + s][c], d[24 + s][c], d[30 + s][c],
                       t[0][s], t[1][s], t[2][s], t[3][s], t[4][s], t[5][s]);
    }
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {  // (Bᵀ d) B: the same on the columns of each row
      float* row = v + r * 6 * ld + c;
      input_transform6(t[r][0], t[r][1], t[r][2], t[r][3], t[r][4], t[r][5], row[0], row[ld],
                       row[2 * ld], row[3 * ld], row[4 * ld], row[5 * ld]);
    }
  }
}

// F(4×4): y[i][j] = (Aᵀ M A)[i][j] + b for every output channel of one tile (y: its 16 output
// pixels, row-major). Returns whether every value written is finite.
bool transform_output_tile6(const float* m, int64_t ld, int64_t Co, const float* bias, float* const* y) {
  int nonfinite = 0;
#pragma GCC ivdep  // y never overlaps m
  for (int64_t o = 0; o < Co; ++o) {
    const float b = bias[o];
    float a[4][6];  // Aᵀ M: a[i][s]
#pragma GCC unroll 6
    for (int s = 0; s < 6; ++s) {
      output_transform6(m[s * ld + o], m[(6 + s) * ld + o], m[(12 + s) * ld + o], m[(18 + s) * ld + o],
                        m[(24 + s) * ld + o], m[(30 + s) * ld + o], a[0][s], a[1][s], a[2][s], a[3][s]);
    }
    float check = 0.0f;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // (Aᵀ M) A: the same on the columns of each row
      float v[4];
      output_transform6(a[i][0], a[i][1], a[i][2], a[i][3], a[i][4], a[i][5], v[0], v[1], v[2], v[3]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        y[i * 4 + j][o] = v[j] + b;
        check += (v[j] + b) - (v[j] + b);  // v − v: 0 for a finite v, NaN for ±inf and NaN
      }
    }
    nonfinite |= check != 0.0f;
  }
  return nonfinite == 0;
}

// Where a block's tiles read and write (NHWC: the tensors themselves; NCHW: staging rows, below):
// the tiles of one sample n, the block's [first, last), the first being the sample's tile tile0;
// the sample's input pixels channels-last from row in_h0 (pixel (h, w) at in + ((h − in_h0)·Wi + w)·Ci;
// NCHW: rows [in_h0, in_h1) staged), and its output's (out, written) or its output gradient's (dy,
// read) from row out_h0 to out_h1.
struct BlockPart {
  int64_t n, first, last, tile0;
  const float* in;
  int64_t in_h0, in_h1;
  float* out;
  const float* dy;
  int64_t out_h0, out_h1;
};

// The input pointers of tile (ti, tj)'s α×α input pixels, row-major, in part p's input rows
// (zeros where in the padding or past the image)
void input_tile_pixels(const WinogradConv& s, const BlockPart& p, int64_t ti, int64_t tj,
                       const float* zeros, const float** d) {
  const int64_t alpha = s.alpha();
  for (int64_t r = 0; r < alpha; ++r) {
    const int64_t h = s.m * ti - s.ph + r;
    for (int64_t c = 0; c < alpha; ++c) {
      const int64_t w = s.m * tj - s.pw + c;
      const bool inside = 0 <= h && h < s.Hi && 0 <= w && w < s.Wi;
      d[r * alpha + c] = inside ? p.in + ((h - p.in_h0) * s.Wi + w) * s.Ci : zeros;
    }
  }
}

// Tiles per GEMM block: V and M of a block (α²·T·(Ci + Co) floats) fit in about 512 KiB of the
// cache, and every thread gets a block. For NCHW tensors, whole rows of tiles (a multiple of
// tiles_w), so that a block's output rows are whole rows of the image.
int64_t tile_block(const WinogradConv& s, bool nchw) {
  int64_t T = std::clamp<int64_t>(131072 / s.points() / (s.Ci + s.Co), 16, 512);
  T = std::max<int64_t>(1, std::min(T, ceil_div<int64_t>(s.tiles(), at::get_num_threads())));
  return nchw ? ceil_div(T, s.tiles_w()) * s.tiles_w() : T;
}

// NCHW tensors are read and written a block at a time, through rows laid out channels-last:
// before the block's transforms, the rows of x its tiles read (and of δy, for the weight
// gradient) are transposed into per-thread staging rows; after, the output rows its tiles wrote
// are transposed back. No copy of a whole tensor between layouts is made; a block's rows are
// those of its tiles, plus the α − m rows that tiles of neighbouring rows share (read twice).
// (Before, the tensors were copied to channels-last and the result back: NCHW 32 → 32 @16,
// batch 128, AMD EPYC Zen 5: see select_conv2d_kernel.)
//
// rows (h1 − h0)·W pixels of C channels = rows [h0, h1) of the NCHW sample `planes` (C × H × W)
void stage_rows(const float* planes, int64_t C, int64_t H, int64_t W, int64_t h0, int64_t h1, float* rows) {
  if (h1 > h0) transpose_matrix(planes + h0 * W, H * W, rows, C, C, (h1 - h0) * W);
}

// rows [h0, h1) of the NCHW sample `planes` = the channels-last rows `rows`
void unstage_rows(const float* rows, int64_t C, int64_t H, int64_t W, int64_t h0, int64_t h1, float* planes) {
  if (h1 > h0) transpose_matrix(rows, C, planes + h0 * W, H * W, (h1 - h0) * W, C);
}

// The block's tiles [t0, t0 + T) sample by sample, with where they read and write: in the
// tensors (NHWC: `in`, and `out` or `dy`, channels-last) or, for NCHW tensors (T whole rows of
// tiles), in the staging rows in_rows and out_rows, resized here and filled with the rows of `in`
// (and `dy`) the tiles read.
void split_block(const WinogradConv& s, int64_t t0, int64_t T, bool nchw, const float* in, float* out,
                 const float* dy, std::vector<float>& in_rows, std::vector<float>& out_rows,
                 std::vector<BlockPart>& parts) {
  parts.clear();
  const int64_t tw = s.tiles_w(), per_sample = s.tiles_h() * tw, m = s.m;
  const int64_t in_sample = s.Hi * s.Wi * s.Ci, out_sample = s.Ho * s.Wo * s.Co;
  size_t in_floats = 0, out_floats = 0;
  for (int64_t t = t0; t < t0 + T;) {
    const int64_t n = t / per_sample, local = t % per_sample;
    const int64_t count = std::min(t0 + T - t, per_sample - local);
    BlockPart p{n, t - t0, t - t0 + count, local, in + n * in_sample, 0, s.Hi, nullptr, nullptr, 0, s.Ho};
    if (out != nullptr) p.out = out + n * out_sample;
    if (dy != nullptr) p.dy = dy + n * out_sample;
    if (nchw) {  // tile rows [ti0, ti1): input rows m·ti0 − p … m·(ti1 − 1) + α − 1 − p, output rows m·ti0 …
      const int64_t ti0 = local / tw, ti1 = (local + count) / tw;
      p.in_h0 = std::clamp<int64_t>(m * ti0 - s.ph, 0, s.Hi);
      p.in_h1 = std::clamp<int64_t>(m * (ti1 - 1) + s.alpha() - s.ph, p.in_h0, s.Hi);
      p.out_h0 = m * ti0, p.out_h1 = std::min(s.Ho, m * ti1);
      in_floats += (p.in_h1 - p.in_h0) * s.Wi * s.Ci;
      out_floats += (p.out_h1 - p.out_h0) * s.Wo * s.Co;
    }
    parts.push_back(p);
    t += count;
  }
  if (!nchw) return;
  in_rows.resize(std::max(in_rows.size(), in_floats));
  out_rows.resize(std::max(out_rows.size(), out_floats));
  float* next_in = in_rows.data();
  float* next_out = out_rows.data();
  for (BlockPart& p : parts) {
    stage_rows(in + p.n * in_sample, s.Ci, s.Hi, s.Wi, p.in_h0, p.in_h1, next_in);
    p.in = next_in;
    next_in += (p.in_h1 - p.in_h0) * s.Wi * s.Ci;
    if (out != nullptr) p.out = next_out;
    if (dy != nullptr) {
      stage_rows(dy + p.n * out_sample, s.Co, s.Ho, s.Wo, p.out_h0, p.out_h1, next_out);
      p.dy = next_out;
    }
    next_out += (p.out_h1 - p.out_h0) * s.Wo * s.Co;
  }
}

// The output pointer of pixel (h, w) of part p (nullptr past the output)
float* output_pixel(const WinogradConv& s, const BlockPart& p, int64_t h, int64_t w) {
  return h < s.Ho && w < s.Wo ? p.out + ((h - p.out_h0) * s.Wo + w) * s.Co : nullptr;
}

// Floats from one ξ plane of a block's buffer (T rows of `width` floats) to the next: one cache
// line more than the plane. A tile's 16 values of a channel lie one plane apart, and planes of a
// power-of-two size (T·width = 4096 floats at 32 channels) put all 16 in one L1 set, which then
// thrashes (forward, AMD EPYC Zen 4, 2 threads, batch 128, NHWC 32→32 @16: 4.17 → 2.65 ms).
int64_t plane_stride(int64_t T, int64_t width) { return T * width + 16; }

// The block's 16 products, by BLAS or by the direct tiles (see the top of this file).
struct WinogradProducts {
  bool tiles;       // the direct kernels' register tiles, else BLAS
  DirectKernels k;  // (tiles only)

  explicit WinogradProducts(Conv2dKernel kernel)
      : tiles(kernel != Conv2dKernel::Winograd && kernel != Conv2dKernel::Winograd4x4),
        k(tiles ? direct_kernels(kernel) : DirectKernels{}) {}

  // The blocks of output channels multiply() reads U_ξ in (transform_weights): the tiles', or all
  // Co channels as one (BLAS)
  int64_t weight_block(int64_t Co) const { return tiles ? k.tiling.block_channels : Co; }

  // M_ξ (T × Co) = V_ξ (T × Ci) · U_ξ (Ci × Co)   (rows of M Co floats apart)
  void multiply(int64_t T, int64_t Ci, int64_t Co, const float* V, const float* U, float* M) const {
    if (tiles) {
      const DirectConv pixels{1, T, Ci, Co, 1, 1, 1, 1, 1, 1, 1, T};  // a 1×1 conv of T pixels
      k.conv_sample(pixels, V, U, nullptr, M);
    } else {
      gemm(false, false, T, Co, Ci, 1.0f, V, Ci, U, Co, 0.0f, M, Co);
    }
  }

  // W_ξᵀ (Ci × Co) += V_ξᵀ (Ci × T) · D_ξ (T × Co); column[c] = c (c < Ci) for the tiles
  void accumulate(int64_t T, int64_t Ci, int64_t Co, const float* V, const float* D,
                  const int64_t* column, float* Wt) const {
    if (tiles) {
      const DirectConv pixels{1, T, Ci, Co, 1, 1, 1, 1, 1, 1, 1, T};  // that conv's weight gradient
      k.grad_weight_sample(pixels, V, D, column, Wt);
    } else {
      gemm(true, false, Ci, Co, T, 1.0f, V, Ci, D, Co, 1.0f, Wt, Co);
    }
  }
};

// out = in ⋆ g + b for the correlation s, with U = transform_weights(g, s.m, …, products.weight_block(s.Co)),
// in and out both channels-last or both NCHW. Returns whether every output is finite.
bool winograd_correlate(const WinogradConv& s, const WinogradProducts& products, const float* in,
                        const float* U, const float* bias, float* out, bool nchw) {
  std::atomic<bool> finite{true};
  const int64_t tw = s.tiles_w(), tiles = s.tiles(), m = s.m, points = s.points();
  const int64_t block = tile_block(s, nchw);
  const int64_t ldv = plane_stride(block, s.Ci), ldm = plane_stride(block, s.Co);
  at::parallel_for(0, ceil_div<int64_t>(tiles, block), /*grain_size=*/1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<float> V(points * ldv), M(points * ldm);
    const std::vector<float> zeros(s.Ci, 0.0f);  // an input pixel in the padding
    std::vector<float> discard(s.Co);              // an output pixel past the image
    // No bias: a zero one. The output transform's loop then reads bias[o] unconditionally and
    // vectorizes (`bias ? bias[o] : 0` kept it scalar: the input gradient, which has no bias,
    // took 1.8 ms where the forward with a bias took 1.0; AMD EPYC Zen 5, NHWC 32→32 @16, b128).
    const std::vector<float> zero_bias(bias == nullptr ? s.Co : 0, 0.0f);
    const float* b = bias != nullptr ? bias : zero_bias.data();
    const float* d[36];
    float* y[16];
    std::vector<float> in_rows, out_rows;  // (NCHW) the block's rows, channels-last
    std::vector<BlockPart> parts;
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = blk * block, T = std::min(block, tiles - t0);
      split_block(s, t0, T, nchw, in, out, nullptr, in_rows, out_rows, parts);
      // V_ξ[t, c] = (Bᵀ d_t[c] B)_ξ
      for (const BlockPart& p : parts) {
        for (int64_t t = p.first; t < p.last; ++t) {
          const int64_t tile = p.tile0 + t - p.first;
          input_tile_pixels(s, p, tile / tw, tile % tw, zeros.data(), d);
          float* v = V.data() + t * s.Ci;
          if (m == 2) {
            run_for_cpu([&] { transform_input_tile(d, s.Ci, ldv, v); });
          } else {
            run_for_cpu([&] { transform_input_tile6(d, s.Ci, ldv, v); });
          }
        }
      }
      // M_ξ = V_ξ · U_ξ   (T × Co)
      for (int64_t xi = 0; xi < points; ++xi) {
        products.multiply(T, s.Ci, s.Co, V.data() + xi * ldv, U + xi * s.Ci * s.Co, M.data() + xi * ldm);
      }
      // y_t = Aᵀ M_t A + b
      for (const BlockPart& p : parts) {
        for (int64_t t = p.first; t < p.last; ++t) {
          const int64_t tile = p.tile0 + t - p.first, ti = tile / tw, tj = tile % tw;
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < m; ++j) {
              float* pixel = output_pixel(s, p, m * ti + i, m * tj + j);
              y[i * m + j] = pixel != nullptr ? pixel : discard.data();
            }
          }
          const float* mt = M.data() + t * s.Co;
          const bool ok = m == 2 ? run_for_cpu([&] { return transform_output_tile(mt, ldm, s.Co, b, y); })
                                 : run_for_cpu([&] { return transform_output_tile6(mt, ldm, s.Co, b, y); });
          if (!ok) finite = false;
        }
        if (nchw) unstage_rows(p.out, s.Co, s.Ho, s.Wo, p.out_h0, p.out_h1, out + p.n * s.Ho * s.Wo * s.Co);
      }
    }
  });
  return finite;
}

// Dξ[t, o] = (A δy_t[o] Aᵀ)_ξ for every output channel of one tile: δy[2·i + j] points at the Co
// channels of the tile's output pixel (i, j) (a zero row where it lies past the output); Dξ is ld
// floats apart. A = [1 0; 1 1; 1 −1; 0 −1] (4 × 2), so rows (and then columns) of the 4×4 result
// are δ0, δ0 + δ1, δ0 − δ1, −δ1.
void transform_grad_output_tile(const float* const* dy, int64_t Co, int64_t ld, float* D) {
  const float *e00 = dy[0], *e01 = dy[1], *e10 = dy[2], *e11 = dy[3];
#pragma GCC ivdep  // D never overlaps δy
  for (int64_t o = 0; o < Co; ++o) {
    // A δ: the four rows of each column j
    const float t00 = e00[o], t01 = e01[o];
    const float t10 = e00[o] + e10[o], t11 = e01[o] + e11[o];
    const float t20 = e00[o] - e10[o], t21 = e01[o] - e11[o];
    const float t30 = -e10[o], t31 = -e11[o];
    // (A δ) Aᵀ: the same on the two columns of each row r
    D[0 * ld + o] = t00, D[1 * ld + o] = t00 + t01, D[2 * ld + o] = t00 - t01, D[3 * ld + o] = -t01;
    D[4 * ld + o] = t10, D[5 * ld + o] = t10 + t11, D[6 * ld + o] = t10 - t11, D[7 * ld + o] = -t11;
    D[8 * ld + o] = t20, D[9 * ld + o] = t20 + t21, D[10 * ld + o] = t20 - t21, D[11 * ld + o] = -t21;
    D[12 * ld + o] = t30, D[13 * ld + o] = t30 + t31, D[14 * ld + o] = t30 - t31, D[15 * ld + o] = -t31;
  }
}

// ∂J/∂g[o, c] = Gᵀ Wξ[o, c] G for Wξ = Σ_t Dξ[t, o]·Vξ[t, c], given transposed (Wt: 16, Ci, Co):
// computed in float64 and rounded to float32 once; returned (Co, Ci, 3, 3), laid out channels-last
// (Co, 3, 3, Ci). As transform_weights: for each input channel a vectorized loop over output
// channels, into (3·3·Ci, Co), then one transpose (the loop it replaces wrote 9·Ci floats apart).
void inverse_transform_weights_of_channel(const float* w, int64_t c, int64_t Ci, int64_t Co, float* dgt) {
  const auto& G = kG2;
  const int64_t plane = Ci * Co;
#pragma GCC ivdep  // dgt never overlaps w
  for (int64_t o = 0; o < Co; ++o) {
    double m[4][4];
    for (int r = 0; r < 16; ++r) m[r / 4][r % 4] = w[r * plane + c * Co + o];
    double mG[4][3];  // Wξ G
    for (int r = 0; r < 4; ++r) {
      for (int b = 0; b < 3; ++b) mG[r][b] = m[r][0] * G[0][b] + m[r][1] * G[1][b] + m[r][2] * G[2][b] + m[r][3] * G[3][b];
    }
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) {
        const double value = G[0][a] * mG[0][b] + G[1][a] * mG[1][b] + G[2][a] * mG[2][b] + G[3][a] * mG[3][b];
        dgt[((a * 3 + b) * Ci + c) * Co + o] = static_cast<float>(value);
      }
    }
  }
}

at::Tensor inverse_transform_weights(const at::Tensor& Wt, int64_t Ci, int64_t Co) {
  const float* w = Wt.const_data_ptr<float>();
  at::Tensor dgt = at::empty({9 * Ci, Co}, Wt.options());  // [(a, b, c), o]
  float* t = dgt.mutable_data_ptr<float>();
  at::parallel_for(0, Ci, std::max<int64_t>(1, 4096 / std::max<int64_t>(Co, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) run_for_cpu([&] { inverse_transform_weights_of_channel(w, c, Ci, Co, t); });
  });
  at::Tensor dg = manualconv::empty({Co, 3, 3, Ci}, Wt.options());
  transpose_planes(t, dg.mutable_data_ptr<float>(), 1, 9 * Ci, Co);
  return dg.permute({0, 3, 1, 2});
}

// Wᵀ = Σ_t Vξ[t, ·]ᵀ Dξ[t, ·] (16, Ci, Co) of the correlation s (in: its input, dy: the gradient of
// its output, both channels-last or both NCHW): per block of tiles, 16 products of depth T into
// each thread's own accumulator.
at::Tensor winograd_grad_weight_sums(const WinogradConv& s, const WinogradProducts& products,
                                     const float* in, const float* dy, bool nchw, const at::TensorOptions& options) {
  const int64_t tw = s.tiles_w(), tiles = s.tiles();
  const int64_t block = tile_block(s, nchw);
  const int64_t ldv = plane_stride(block, s.Ci), ldd = plane_stride(block, s.Co);
  std::vector<int64_t> column(s.Ci);  // the tiles' weight columns: channel c of a tile's row
  for (int64_t c = 0; c < s.Ci; ++c) column[c] = c;
  const PerThreadSum W(at::get_num_threads(), {kPoints, s.Ci, s.Co}, options);
  at::parallel_for(0, ceil_div<int64_t>(tiles, block), /*grain_size=*/1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<float> V(kPoints * ldv), D(kPoints * ldd);
    const std::vector<float> zeros(std::max(s.Ci, s.Co), 0.0f);  // a pixel in the padding / past the output
    float* w = W.mine<float>();
    const float* d[16];
    const float* e[4];
    std::vector<float> in_rows, dy_rows;  // (NCHW) the block's rows, channels-last
    std::vector<BlockPart> parts;
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = blk * block, T = std::min(block, tiles - t0);
      split_block(s, t0, T, nchw, in, nullptr, dy, in_rows, dy_rows, parts);
      for (const BlockPart& p : parts) {
        for (int64_t t = p.first; t < p.last; ++t) {
          const int64_t tile = p.tile0 + t - p.first, ti = tile / tw, tj = tile % tw;
          // Vξ[t, c] = (Bᵀ d_t[c] B)_ξ
          input_tile_pixels(s, p, ti, tj, zeros.data(), d);
          run_for_cpu([&] { transform_input_tile(d, s.Ci, ldv, V.data() + t * s.Ci); });
          // Dξ[t, o] = (A δy_t[o] Aᵀ)_ξ
          for (int64_t i = 0; i < 2; ++i) {
            for (int64_t j = 0; j < 2; ++j) {
              const int64_t h = 2 * ti + i, c = 2 * tj + j;
              e[i * 2 + j] = h < s.Ho && c < s.Wo ? p.dy + ((h - p.out_h0) * s.Wo + c) * s.Co : zeros.data();
            }
          }
          run_for_cpu([&] { transform_grad_output_tile(e, s.Co, ldd, D.data() + t * s.Co); });
        }
      }
      // Wξᵀ += Vξᵀ · Dξ   (Ci × Co, a sum over the block's T tiles)
      for (int64_t xi = 0; xi < kPoints; ++xi) {
        products.accumulate(T, s.Ci, s.Co, V.data() + xi * ldv, D.data() + xi * ldd, column.data(),
                            w + xi * s.Co * s.Ci);
      }
    }
  });
  return W.total();
}

}  // namespace

WinogradChoice winograd_choice() {
  const char* env = std::getenv("MANUALCONV_WINOGRAD");
  if (env == nullptr || *env == '\0') return WinogradChoice::Measured;
  if (std::strcmp(env, "always") == 0) return WinogradChoice::Always;
  if (std::strcmp(env, "always4x4") == 0) return WinogradChoice::Always4x4;
  if (std::strcmp(env, "never") == 0) return WinogradChoice::Never;
  TORCH_CHECK(false, "MANUALCONV_WINOGRAD must be 'always', 'always4x4', 'never' or unset, got '", env, "'");
}

// y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A + b per 2×2 output tile
at::Tensor conv2d_forward_winograd(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias, const Conv2dGeometry& g,
                                   Conv2dKernel kernel) {
  const WinogradProducts products(kernel);
  const at::MemoryFormat layout = output_layout(x);  // y's, as x's: NCHW staged a block at a time
  const at::Tensor in = manualconv::contiguous(x, layout);
  const WinogradConv s{g.N, g.H, g.W, g.C, g.O, g.pH, g.pW, g.H_out, g.W_out, winograd_tile(kernel)};
  const at::Tensor U = transform_weights(weight, s.m, /*rotated=*/false, products.weight_block(s.Co));
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = manualconv::empty(g.output_size(), x.options().memory_format(layout));
  if (!winograd_correlate(s, products, in.const_data_ptr<float>(), U.const_data_ptr<float>(),
                          b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
                          layout == at::MemoryFormat::Contiguous)) {
    return at::Tensor();  // a NaN or ±inf: the caller's direct / GEMM kernel gives torch's
  }
  return y;
}

// δx = (δy padded by 2 − p) ⋆ rot180(W) with W's channels swapped, per 2×2 tile of δx
at::Tensor conv2d_grad_input_winograd(const at::Tensor& dy, const at::Tensor& weight,
                                      const Conv2dGeometry& g, Conv2dKernel kernel) {
  const WinogradProducts products(kernel);
  const at::MemoryFormat layout = output_layout(dy);  // δx's, as δy's: NCHW staged a block at a time
  const at::Tensor in = manualconv::contiguous(dy, layout);
  const WinogradConv s{g.N, g.H_out, g.W_out, g.O, g.C, 2 - g.pH, 2 - g.pW, g.H, g.W, winograd_tile(kernel)};
  const at::Tensor U = transform_weights(weight, s.m, /*rotated=*/true, products.weight_block(s.Co));
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W}, dy.options().memory_format(layout));
  if (!winograd_correlate(s, products, in.const_data_ptr<float>(), U.const_data_ptr<float>(), nullptr,
                          dx.mutable_data_ptr<float>(), layout == at::MemoryFormat::Contiguous)) {
    return at::Tensor();  // a NaN or ±inf: the caller's direct / GEMM kernel gives torch's
  }
  return dx;
}

// ∂J/∂g[o, c] = Gᵀ [ Σ_t (A δy_t[o] Aᵀ) ⊙ (Bᵀ d_t[c] B) ] G  (section 18: the adjoint of the forward's
// y_t = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d_t B)]A in g)
at::Tensor conv2d_grad_weight_winograd(const at::Tensor& x, const at::Tensor& dy,
                                       const Conv2dGeometry& g, Conv2dKernel kernel) {
  const at::MemoryFormat layout = output_layout(x, dy);  // NCHW (staged) unless both are channels-last
  const at::Tensor in = manualconv::contiguous(x, layout);
  const at::Tensor delta = manualconv::contiguous(dy, layout);
  const WinogradConv s{g.N, g.H, g.W, g.C, g.O, g.pH, g.pW, g.H_out, g.W_out};
  const at::Tensor W = winograd_grad_weight_sums(s, WinogradProducts(kernel), in.const_data_ptr<float>(),
                                                 delta.const_data_ptr<float>(), layout == at::MemoryFormat::Contiguous,
                                                 x.options());
  const at::Tensor dg = inverse_transform_weights(W, g.C, g.O);
  if (!all_finite(dg)) return at::Tensor();  // as the forward (conv2d.h)
  return dg;
}

}  // namespace manualconv
