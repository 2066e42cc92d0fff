// The direct kernels, written once over a vector type (vec.h) and a register tile; instantiated
// per instruction set by conv2d_direct_avx2.cpp and conv2d_direct_avx512.cpp, which include this
// inside their `#pragma GCC target` region and an anonymous namespace (see vec.h), after vec.h
// and conv2d_direct_isa.h. A unit defines `struct Isa` first:
//   Isa::Wide, Isa::kWideVectors  a full tile's channels: kWideVectors vectors of Wide
//   Isa::Half                     the 8-channel remainder vector
//   Isa::kTiling                  conv2d_direct_isa.h's DirectTiling (block, pixels, columns)
// The tiles keep their accumulators in an array indexed only by unrolled constants, which the
// compiler keeps in registers; each tile is a function of its own (noinline), so that the
// registers of its inner loop are not shared with the loops around it.
//
// Forward (and the stride-1 input gradient, the same computation on δy and the rotated kernel):
//   y[n, i, j, o] = b[o] + Σ_{a, b, c} x_pad[n, i·sH + a·dH, j·sW + b·dW, c] · W[o, c, a, b]
// Weight gradient:
//   ∂J/∂W[o, c, a, b] = Σ_{n, i, j} δy[n, i, j, o] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c]

inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

// Pixels computed by tiles of P over `pixels` (the last tile moved back recomputes some).
inline int64_t pixels_computed(int64_t pixels, int64_t P) { return (pixels + P - 1) / P * P; }

// P pixels × NV vectors of output channels o0…: px[k] points at pixel k's top-left input tap, tap
// (a, b, c) of every pixel is (a·dH·Wp + b·dW)·C_in + c further on; w points at channel o0 of a
// weight block `width` channels wide. Sums every tap, then writes the sum plus the bias into
// y (pixel k at y + k·C_out).
// A row tile (kStride > 0): the P pixels lie along one output row, pixel k's taps kStride =
// sW·C_in floats after pixel k − 1's, and only px[0] is read, so every pixel's input value is an
// immediate offset from one pointer. Pixels anywhere (kStride = 0) keep a pointer each, more than
// x86-64's 16 general registers: the compiler keeps some in vector registers and on the stack and
// moves them back for every tap (3 extra instructions per 12 FMAs, seen in the AVX-512 code).
template <class Vec, int P, int NV, int kStride = 0>
__attribute__((noinline)) void conv_tile(const DirectConv& s, const float* const* px, const float* w_block, int64_t width,
               const float* bias, int64_t o0, float* y) {
  constexpr int L = Vec::kLanes;
  Vec acc[P][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const Vec b = bias ? Vec::load(bias + o0 + v * L) : Vec::zero();
#pragma GCC unroll 32
    for (int k = 0; k < P; ++k) acc[k][v] = b;
  }
  const float* p[P];
#pragma GCC unroll 32
  for (int k = 0; k < P; ++k) p[k] = kStride > 0 ? px[0] + k * kStride : px[k];
  for (int64_t a = 0; a < s.kH; ++a) {
    for (int64_t b = 0; b < s.kW; ++b) {
      const int64_t off = (a * s.dH * s.Wp + b * s.dW) * s.C_in;
      const float* w = w_block + (a * s.kW + b) * s.C_in * width;
      for (int64_t c = off; c < off + s.C_in; ++c, w += width) {
        Vec wv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) wv[v] = Vec::load(w + v * L);
#pragma GCC unroll 32
        for (int k = 0; k < P; ++k) {
          const typename Vec::Splat x = Vec::splat(p[k] + c);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[k][v] = fma(x, wv[v], acc[k][v]);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int k = 0; k < P; ++k) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[k][v].store(y + k * s.C_out + o0 + v * L);
  }
}

// P pixels × one weight block (channels o0 … o0 + width): tiles of kWideVectors Wide vectors,
// then single Wide vectors, then Half vectors for what remains.
template <class Isa, int P>
void conv_block(const DirectConv& s, const float* const* px, const float* w, int64_t width,
                const float* bias, int64_t o0, float* y) {
  using Wide = typename Isa::Wide;
  using Half = typename Isa::Half;
  constexpr int64_t full = Isa::kWideVectors * Wide::kLanes;
  int64_t q = 0;
  for (; q + full <= width; q += full) conv_tile<Wide, P, Isa::kWideVectors>(s, px, w + q, width, bias, o0 + q, y);
  if constexpr (Isa::kWideVectors > 1) {
    for (; q + Wide::kLanes <= width; q += Wide::kLanes) conv_tile<Wide, P, 1>(s, px, w + q, width, bias, o0 + q, y);
  }
  for (; q + Half::kLanes <= width; q += Half::kLanes) conv_tile<Half, P, 1>(s, px, w + q, width, bias, o0 + q, y);
}

// Every output row of one sample for a weight block NV Wide vectors wide, in row tiles of P
// pixels (the last moved back to end at the row's end, recomputing a few pixels bit for bit).
template <class Isa, int P, int NV, int kStride>
void conv_rows(const DirectConv& s, const float* in, const float* w, int64_t width, const float* bias,
               int64_t o0, float* out) {
  for (int64_t i = 0; i < s.H_out; ++i) {
    const float* row = in + i * s.sH * s.Wp * s.C_in;
    for (int64_t j = 0; j < s.W_out; j += P) {
      const int64_t j0 = lesser(j, s.W_out - P);
      const float* p0 = row + j0 * kStride;
      conv_tile<typename Isa::Wide, P, NV, kStride>(s, &p0, w, width, bias, o0, out + (i * s.W_out + j0) * s.C_out);
    }
  }
}

// The row tiles of P pixels for the pixel strides sW·C_in they are compiled for; false where none
// is (the caller then uses the wrapping tiles). Measured (AMD EPYC Zen 4, avx512, 2 threads, batch
// 128, NHWC, padding 1, best of 15, ms, forward, row tiles vs wrapping tiles): 16 → 16 @32 2.76–2.90
// vs 2.97–3.10 (torch 2.73–2.87; the input gradient likewise), 8 → 16 @32 1.39 vs 1.63, 32 → 16 @16
// 1.36 vs 1.44, 16 → 16 stride 2 @16 (stride 32) 0.21 vs 0.21; but the stem's 3 input channels
// (an inner loop of 3) 0.82 vs 0.76: not compiled for 3.
template <class Isa, int P, int NV>
bool conv_rows_for_stride(const DirectConv& s, const float* in, const float* w, int64_t width,
                          const float* bias, int64_t o0, float* out) {
  switch (s.sW * s.C_in) {
    case 8: conv_rows<Isa, P, NV, 8>(s, in, w, width, bias, o0, out); return true;
    case 16: conv_rows<Isa, P, NV, 16>(s, in, w, width, bias, o0, out); return true;
    case 32: conv_rows<Isa, P, NV, 32>(s, in, w, width, bias, o0, out); return true;
    case 64: conv_rows<Isa, P, NV, 64>(s, in, w, width, bias, o0, out); return true;
    case 128: conv_rows<Isa, P, NV, 128>(s, in, w, width, bias, o0, out); return true;
    case 256: conv_rows<Isa, P, NV, 256>(s, in, w, width, bias, o0, out); return true;
    default: return false;
  }
}

// One sample in tiles of P pixels: for each weight block, its H_out·W_out output pixels in tiles
// of P consecutive pixels in row-major order (a tile may wrap from one output row to the next);
// when P does not divide the pixel count the last tile is moved back to end at the last pixel,
// recomputing (bit for bit the same) a few pixels of the one before. Fewer than P pixels: 1-pixel
// tiles.
template <class Isa, int P>
void conv_sample_tiled(const DirectConv& s, const float* in, const float* wt, const float* bias, float* out) {
  constexpr int64_t B = Isa::kTiling.block_channels;
  const int64_t pixels = s.H_out * s.W_out, K = s.kH * s.kW * s.C_in;
  const int64_t tile = pixels < P ? 1 : P;
  const float* px[P];
  constexpr int R = Isa::kTiling.row_tile_pixels;
  for (int64_t o0 = 0; o0 < s.C_out; o0 += B) {
    const int64_t width = lesser(B, s.C_out - o0);
    const float* w = wt + o0 * K;
    if constexpr (R > 0) {
      // one vector: rows of at least R pixels; a full block: row tiles of P where they compute no
      // more pixels than the wrapping ones (a 1×1 conv's one row: Winograd's products). Measured
      // (as conv_rows_for_stride, forward / weight gradient, the latter with ColumnRun tiles):
      // 16 → 32 stride 2 @32 1.45 / 1.53–1.57 vs 1.53 / 1.66–1.69 ms, 32 → 64 stride 2 @16 1.37–1.39
      // / 1.71–1.72 vs 1.42–1.43 / 1.73–2.02; Winograd 32 → 32 @16 2.44–2.48 / 2.05–2.20 vs
      // 2.45–2.47 / 2.24–2.53, 64 → 64 @8 1.82–1.87 / 2.07–2.16 vs 1.90–1.93 / 2.07–2.20
      if (width == Isa::Wide::kLanes && s.W_out >= R && conv_rows_for_stride<Isa, R, 1>(s, in, w, width, bias, o0, out)) {
        continue;
      }
      if (width == B && tile == P && s.W_out >= P && s.H_out * pixels_computed(s.W_out, P) <= pixels_computed(pixels, P) &&
          conv_rows_for_stride<Isa, P, Isa::kWideVectors>(s, in, w, width, bias, o0, out)) {
        continue;
      }
    }
    for (int64_t q = 0; q < pixels; q += tile) {
      const int64_t q0 = lesser(q, pixels - tile);
      for (int64_t k = 0; k < tile; ++k) {
        const int64_t i = (q0 + k) / s.W_out, j = (q0 + k) % s.W_out;
        px[k] = in + (i * s.sH * s.Wp + j * s.sW) * s.C_in;
      }
      float* y = out + q0 * s.C_out;
      if (tile == 1) {
        conv_block<Isa, 1>(s, px, w, width, bias, o0, y);
      } else {
        conv_block<Isa, P>(s, px, w, width, bias, o0, y);
      }
    }
  }
}

// One sample, in tiles of tile_pixels, or of tile_pixels_alt where those recompute fewer pixels
// (an 8×8 map: 64 pixels are 8 tiles of 8, but 6 tiles of 12 compute 72).
template <class Isa>
void conv_sample(const DirectConv& s, const float* in, const float* wt, const float* bias, float* out) {
  constexpr int P = Isa::kTiling.tile_pixels, P_alt = Isa::kTiling.tile_pixels_alt;
  const int64_t pixels = s.H_out * s.W_out;
  if constexpr (P_alt > 0) {
    if (pixels >= P_alt && (pixels < P || pixels_computed(pixels, P_alt) < pixels_computed(pixels, P))) {
      return conv_sample_tiled<Isa, P_alt>(s, in, wt, bias, out);
    }
  }
  conv_sample_tiled<Isa, P>(s, in, wt, bias, out);
}

// Where a weight-gradient tile's NC columns read their input, as offsets from a pixel's top-left
// tap: any columns (col[k], held in registers: NC of them do not all fit in x86-64's 16 general
// registers beside the loop's own, and the compiler moves some back for every pixel), or a run of
// consecutive inputs (x0 + k: the channels of a tap, running on into the next tap along a row when
// dW = 1), each an immediate offset from one pointer.
struct ColumnOffsets {
  static constexpr bool kRun = false;
  const int64_t* col;
};
struct ColumnRun {
  static constexpr bool kRun = true;
  int64_t x0;
};

// Weight gradient, one sample: NV vectors of output channels o0… × NC consecutive weight columns
// (their inputs where `columns` says), summed over every output pixel: per pixel NV vectors of δy
// and NC broadcast input values. The sums are added to dwᵀ (the tile's columns × C_out: column k
// of the tile at dwt + k·C_out), a vector each; the first `skip` columns are left out (a tile
// moved back to end at column K overlaps the one before).
template <class Vec, int NC, int NV, class Columns>
__attribute__((noinline)) void grad_weight_tile(const DirectConv& s, const float* in, const float* dy, Columns columns,
                                                int64_t o0, int64_t skip, float* dwt) {
  constexpr int L = Vec::kLanes;
  constexpr bool run = Columns::kRun;
  Vec acc[NC][NV];
  int64_t c[NC];
#pragma GCC unroll 32
  for (int k = 0; k < NC; ++k) {
    if constexpr (run) {
      c[k] = k;  // (constants: immediate offsets)
    } else {
      c[k] = columns.col[k];
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[k][v] = Vec::zero();
  }
  int64_t x0 = 0;
  if constexpr (run) x0 = columns.x0;
  const int64_t O = s.C_out, step = s.sW * s.C_in;
  for (int64_t i = 0; i < s.H_out; ++i) {
    const float* x = in + i * s.sH * s.Wp * s.C_in + x0;
    const float* d = dy + i * s.W_out * O + o0;
    for (int64_t j = 0; j < s.W_out; ++j, x += step, d += O) {
      Vec dv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) dv[v] = Vec::load(d + v * L);
#pragma GCC unroll 32
      for (int k = 0; k < NC; ++k) {
        const typename Vec::Splat xv = Vec::splat(x + c[k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[k][v] = fma(xv, dv[v], acc[k][v]);
      }
    }
  }
  // (dwᵀ, not dw: the sums of column k are consecutive output channels, one vector add each where
  // C_out × K would take NV·L scalar adds a column; 8×8 maps' tiles sum only 64 pixels, and those
  // adds cost a third as much again as the FMAs)
#pragma GCC unroll 32
  for (int k = 0; k < NC; ++k) {
    if (k < skip) continue;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[k][v].add_to(dwt + k * O + o0 + v * L);
  }
}

// NC columns × every output channel: tiles of kWideVectors Wide vectors, then single Wide
// vectors, then Half vectors.
template <class Isa, int NC, class Columns>
void grad_weight_columns(const DirectConv& s, const float* in, const float* dy, Columns columns,
                         int64_t skip, float* dwt) {
  using Wide = typename Isa::Wide;
  using Half = typename Isa::Half;
  constexpr int64_t full = Isa::kWideVectors * Wide::kLanes;
  int64_t o0 = 0;
  for (; o0 + full <= s.C_out; o0 += full) grad_weight_tile<Wide, NC, Isa::kWideVectors>(s, in, dy, columns, o0, skip, dwt);
  if constexpr (Isa::kWideVectors > 1) {
    for (; o0 + Wide::kLanes <= s.C_out; o0 += Wide::kLanes) grad_weight_tile<Wide, NC, 1>(s, in, dy, columns, o0, skip, dwt);
  }
  for (; o0 + Half::kLanes <= s.C_out; o0 += Half::kLanes) grad_weight_tile<Half, NC, 1>(s, in, dy, columns, o0, skip, dwt);
}

// One sample's contribution to dwᵀ (K × C_out), in tiles of NC weight columns.
template <class Isa>
void grad_weight_sample(const DirectConv& s, const float* in, const float* dy, const int64_t* col, float* dwt) {
  constexpr int64_t NC = Isa::kTiling.tile_columns;
  const int64_t K = s.kH * s.kW * s.C_in;
  constexpr int R = Isa::kTiling.row_tile_pixels;  // also the 16-column runs' width
  if constexpr (R > 0) {
    // one vector of output channels, every tap's channels in whole runs of R. Measured (as
    // conv_rows_for_stride): 16 → 16 @32 2.81–2.93 vs 3.16–3.22 ms (torch 2.63–2.66)
    if (s.C_out == Isa::Wide::kLanes && s.C_in % R == 0) {
      for (int64_t k = 0; k < K; k += R) {
        grad_weight_tile<typename Isa::Wide, R, 1>(s, in, dy, ColumnRun{col[k]}, 0, 0, dwt + k * s.C_out);
      }
      return;
    }
  }
  for (int64_t k = 0; k < K; k += NC) {
    const int64_t k0 = lesser(k, K - NC);
    if constexpr (R > 0) {
      if (col[k0 + NC - 1] - col[k0] == NC - 1) {  // the NC inputs consecutive
        grad_weight_columns<Isa, NC>(s, in, dy, ColumnRun{col[k0]}, k - k0, dwt + k0 * s.C_out);
        continue;
      }
    }
    grad_weight_columns<Isa, NC>(s, in, dy, ColumnOffsets{col + k0}, k - k0, dwt + k0 * s.C_out);
  }
}
