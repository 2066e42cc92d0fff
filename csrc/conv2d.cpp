// conv2d: forward, input gradient and weight gradient, as named GEMM steps
// (the Caffe base_conv_layer.cpp formulation).
//
// Notation, per sample n and group g:
//   x   input  (C, H, W)              W   weight (O, C/G, kH, kW), group g: rows g·O/G…
//   y   output (O, H_out, W_out)      δy  ∂J/∂y,  δx  ∂J/∂x
//   im2col(x): the (C/G·kH·kW) × (H_out·W_out) matrix whose column (i, j) is the
//              receptive field of output pixel (i, j), zero where it reads padding.
//
//   forward        y[g]    = W[g] · im2col(x[g]) + b[g]
//   input grad     δx[g]   = col2im(W[g]ᵀ · δy[g])
//   weight grad    ∂J/∂W[g] = Σ_n δy[g] · im2col(x[g])ᵀ
//
// The CPU kernels below get checked arguments (operators.h, geometry.h), ask
// select_conv2d_kernel (below) which kernel runs, and run the NCHW GEMM kernel themselves;
// channels-last tensors go to conv2d_channels_last.cpp or conv2d_direct.cpp.
//
// Parallelism: samples are spread over threads with at::parallel_for, each thread
// owning a column buffer and calling single-threaded GEMMs (BLAS runs one thread
// inside a parallel region). With fewer samples than threads the batch is walked
// sequentially so that each GEMM can use all threads instead.

#include "blas.h"
#include "conv2d.h"
#include "output_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace manualconv {

// Which kernel runs (conv2d.h). Each threshold cites its measurement: AMD EPYC Zen 3 (AVX2),
// 2 threads, float32, batch 128, against torch.nn in one process (manualconv/bench.py), from the
// closing notes of issue 5 (`issues stops`: stops 9 and 10) and docs/benchmark-cpu.md. Later
// paths (per-ISA direct kernels, Winograd for 3×3 stride 1) are further cases here.
Conv2dKernel select_conv2d_kernel(Conv2dPass pass, const Conv2dGeometry& g, at::ScalarType dtype,
                                  bool channels_last, CpuCapability capability, bool winograd_allowed,
                                  bool finite_weight) {
  // The input gradient of a NaN or ±inf weight: the GEMM kernels (col2im, as torch's; conv2d.h)
  const bool padding_products_ok = pass != Conv2dPass::GradInput || finite_weight;
  // Winograd F(2×2, 3×3) and F(4×4, 3×3) (conv2d_winograd.cpp): all three passes of float32, 3×3,
  // stride-1, dilation-1, one-group convs with padding ≤ 2, either layout. float64 stays on the
  // GEMM paths (gradcheck's exact sums). MANUALCONV_WINOGRAD=always|always4x4|never overrides the
  // measured choice below.
  const bool avx512 = capability >= CpuCapability::Avx512;
  const DirectTiling& tiling = avx512 ? kDirectTilingAvx512 : kDirectTilingAvx2;
  // Where the tiles outrun the BLAS (cpu_capability.h: MKL's AVX2 code on an AMD Zen 5), they take
  // wider layers and NCHW convs; each such limit below cites its measurement, made on an AMD EPYC
  // Zen 5 (family 26 model 2, avx512), 2 threads, batch 128, forward / input grad / weight grad, ms.
  const bool fast_tiles = capability >= CpuCapability::Avx2 && tiles_outrun_blas();
  // The direct weight-gradient tiles (also Winograd's weight-gradient products), up to:
  // AVX2 (Zen 3): 8 or 16 output channels; at 32 the GEMM path took 4.5 ms, the direct kernel
  // 4.8 ms; at 64, 4.0 vs 5.2 ms (stop 10). AVX-512 (Zen 4, one thread, batch 32, ms): up to 32
  // output channels: 32 → 32 @16 direct 1.52 vs GEMM 1.93; 64 → 64 @8 1.80–1.96 vs 1.67–1.78.
  // Winograd's products (Zen 4, 2 threads, batch 128, NHWC, ms, tiles vs BLAS): 32 → 32 @16
  // 2.19 vs 2.93, 64 → 64 @8 2.38 vs 2.09, 128 → 128 @16 38.8 vs 26.8.
  // Zen 5 (fast tiles), direct vs NHWC GEMM: 128 → 256 @8 1×1 1.75 vs 2.59; 128 → 256 @16 3×3
  // stride 2 15.8 vs 21.8; 256 → 256 @8 1×1 3.7 vs 5.0; but 256 → 512 @8 3×3 stride 2 34.7 vs 21.7:
  // up to 256. Winograd's products, tiles vs BLAS: NHWC 64 → 64 @8 1.26–1.48 vs 1.9–2.1; 64 → 128
  // @16 14.0 vs 16.5; 128 → 256 @8 16.9 vs 14.4: up to 128.
  const int64_t max_direct_grad_weight_channels = fast_tiles ? 256 : avx512 ? 32 : 16;
  const int64_t max_winograd_grad_weight_tile_channels = fast_tiles ? 128 : max_direct_grad_weight_channels;
  if (winograd_allowed && padding_products_ok && dtype == at::kFloat && g.groups == 1 &&
      g.kH == 3 && g.kW == 3 && g.sH == 1 && g.sW == 1 && g.dH == 1 && g.dW == 1 && g.pH <= 2 &&
      g.pW <= 2) {
    // Its 16 products per block of tiles on the direct kernels' register tiles where the CPU has
    // them and the product's output channels fill whole vectors (the weight gradient's tiles also
    // span tile_columns input channels, and as the direct weight gradient only up to
    // max_direct_grad_weight_channels), else on BLAS; measured in conv2d_winograd.cpp.
    const int64_t product_channels = pass == Conv2dPass::GradInput ? g.C : g.O;
    const bool tiles = capability >= CpuCapability::Avx2 && product_channels % kDirectLanes == 0 &&
                       (pass != Conv2dPass::GradWeight ||
                        (g.C >= tiling.tile_columns && g.O <= max_winograd_grad_weight_tile_channels));
    const Conv2dKernel winograd = !tiles ? Conv2dKernel::Winograd
                                  : avx512 ? Conv2dKernel::WinogradAvx512
                                           : Conv2dKernel::WinogradAvx2;
    const Conv2dKernel winograd4x4 = !tiles ? Conv2dKernel::Winograd4x4
                                     : avx512 ? Conv2dKernel::Winograd4x4Avx512
                                              : Conv2dKernel::Winograd4x4Avx2;
    const WinogradChoice choice = winograd_choice();
    if (choice == WinogradChoice::Always) return winograd;
    if (choice == WinogradChoice::Always4x4) return pass == Conv2dPass::GradWeight ? winograd : winograd4x4;
    // Measured 2026-11-29 (night) on an AMD EPYC Zen 4 (family 25 model 17, AVX-512: the
    // products on the AVX-512 tiles, the weight gradient's on MKL from 64 output channels), 2
    // threads, batch 128, padding 1, median of 9, ms, Winograd against the path below (NHWC:
    // direct ≤ 64 channels, else NHWC GEMM; NCHW: NCHW GEMM), forward / input grad / weight grad:
    //   NHWC 32→32 @8   0.66 / 0.66 / 0.56 vs 0.73 / 0.73 / 0.94
    //   NHWC 32→32 @16  2.64 / 2.73 / 2.10 vs 2.81 / 2.83 / 3.16
    //   NHWC 32→32 @32  10.9 / 11.1 / 9.85 vs 11.7 / 11.6 / 11.9
    //   NHWC 32→64 @16  4.79 / 4.19 / 4.22 vs 5.63 / 5.50 / 6.87
    //   NHWC 64→64 @8   1.91 / 1.94 / 1.89 vs 2.77 / 2.79 / 3.33
    //   NHWC 64→64 @32  41.5 / 41.9 / 30.6 vs 55.9 / 55.8 / 58.4
    //   NHWC 128→128 @4 2.12 / 2.19 / 2.32 vs 3.26 / 3.23 / 3.20
    //   NCHW 32→32 @16  3.18 / 3.07 / 2.81 vs 3.90 / 3.96 / 3.92
    //   NCHW 64→64 @16  10.4 / 10.6 / 10.9 vs 14.1 / 14.2 / 14.2
    //   NCHW 128→128 @4 2.17 / 2.30 / 2.36 vs 4.59 / 5.52 / 4.02
    // but with 16 channels on a side the transforms cost more than the products save:
    //   NHWC 16→16 @32  4.63 / 4.68 / 4.10 vs 3.28 / 3.12 / 3.24
    //   NHWC 16→32 @32  7.83 / 6.68 / 6.86 vs 6.33 / 6.31 / 6.21
    //   NHWC 32→16 @16  1.45 / 1.76 / 1.27 vs 1.48 / 1.47 / 1.65
    // NCHW tensors were then copied whole to channels-last and the result back, which on maps of
    // 32×32 cost more than Winograd saved (NCHW 32→32 @32 24.1 / 34.3 / 23.0 vs 16.6 / 16.9 /
    // 16.0); since they are staged a block of rows at a time (conv2d_winograd.cpp, split_block),
    // measured on an AMD EPYC Zen 5 (family 26 model 2), 2 threads, batch 128 (b32: batch 32),
    // Winograd vs the path below, forward / input grad / weight grad, ms:
    //   with MANUALCONV_TILES_OUTRUN_BLAS=0 (the choices of CPUs other than a Zen 5; NCHW GEMM):
    //     NCHW 32→32 @32       4.85 / 4.93 / 5.16 vs 14.6 / 14.3 / 14.3
    //     NCHW 64→64 @32       14.2 / 14.2 / 30.1 vs 50.4 / 50.0 / 49.9
    //     NCHW 32→64 @32       7.98 / 8.92 / 18.0 vs 26.1 / 26.4 / 26.3
    //     NCHW 64→64 @56 b32   10.7 / 10.9 / 21.9 vs 42.7 / 42.5 / 40.8
    //     NCHW 128→128 @28 b32 9.57 / 9.66 / 18.6 vs 36.9 / 36.1 / 36.7
    //   restricted to AVX2 (MANUALCONV_CPU_CAPABILITY=avx2; MKL runs AVX2 there anyway):
    //     NCHW 32→32 @32       7.29 / 7.27 / 9.78 vs 15.1 / 14.5 / 14.0
    //     NCHW 64→64 @32       22.9 / 22.9 / 29.3 vs 49.8 / 50.1 / 49.1
    //   where the tiles outrun the BLAS (the direct kernel):
    //     NCHW 32→32 @32       5.16 / 5.09 / 5.16 vs 5.99 / 5.97 / 6.21
    //     NCHW 64→64 @32       14.1 / 14.0 / 16.4 vs 21.2 / 21.2 / 21.8
    //     NCHW 64→64 @56 b32   10.5 / 10.4 / 11.7 vs 16.2 / 15.9 / 17.6
    //     NCHW 128→128 @28 b32 9.33 / 9.31 / 9.07 vs 15.2 / 15.2 / 15.2
    // (and on 16×16 maps, staged against copied whole: NCHW 32→32 @16 1.02 / 1.04 / 1.01 vs
    // 1.23 / 1.09 / 1.16).
    // The same machine with manualconv restricted to AVX2 (AVX2 tiles) and to the baseline
    // (BLAS products), NHWC: 32→32 @8 0.77 / 0.74 / 0.60 vs 0.99 / 0.75 / 0.97 and
    // 0.73 / 0.74 / 0.64 vs 1.38 / 1.17 / 0.97; 32→32 @16 2.93 / 2.92 / 2.33 vs 2.90 / 2.90 / 4.01
    // and 3.04 / 2.96 / 2.45 vs 3.94 / 5.48 / 3.95; 64→64 @8 2.96 / 2.91 / 2.41 vs 3.01 / 3.60 /
    // 4.01 and 2.11 / 2.13 / 1.96 vs 3.32 / 3.44 / 3.31: the same rule holds.
    // So: at least 32 channels each side, either layout; maps of at least 4×4 (the smallest
    // measured).
    // Accuracy: 3 summed channels exceeded tests/oracle.py's bound on mixed-magnitude data
    // (tests/test_winograd.py); 16 and more stayed within it. The weight gradient sums
    // n = N·H_out·W_out terms, and a tile's transforms also multiply inputs and deltas the direct
    // sum never pairs: on mixed-magnitude data the worst error was 0.4–2.6× the bound at
    // n = 243, 0.13–0.42× at 512, 0.013–0.018× at 2048 (16–64 channels). So: n ≥ 2048.
    constexpr int64_t kMinWinogradChannels = 32;
    constexpr int64_t kMinWinogradMap = 4;
    constexpr int64_t kMinWinogradGradWeightTerms = 2048;  // N·H_out·W_out
    const bool wide = std::min(g.C, g.O) >= kMinWinogradChannels;
    const bool long_sums = pass != Conv2dPass::GradWeight || g.N * g.L() >= kMinWinogradGradWeightTerms;
    // F(4×4, 3×3) for the forward and the input gradient (36 products per 4×4 outputs instead of
    // 16 per 2×2), measured 2026-11-30 on the same AMD EPYC Zen 4 (avx512 tiles), 2 threads,
    // batch 128, padding 1, median of 11, ms, forward / input gradient, F(4×4) vs F(2×2):
    //   NHWC 32→32 @16   1.66 / 1.67 vs 2.92 / 2.87     NCHW 32→32 @16   2.64 / 2.22 vs 3.21 / 3.32
    //   NHWC 64→64 @16   5.77 / 5.73 vs 7.79 / 7.65     NCHW 64→64 @16   8.50 / 8.79 vs 10.5 / 10.9
    //   NHWC 64→128 @16  12.4 / 12.3 vs 16.0 / 15.5     NCHW 128→256 @8  15.8 / 16.0 vs 17.5 / 18.3
    //   NHWC 64→64 @8    1.83 / 1.84 vs 2.01 / 2.05     NHWC 128→128 @8  6.66 / 7.01 vs 6.82 / 7.09
    // but on 4×4 maps (one tile a sample; blocks of few tiles) it lost: NHWC 128→128 @4 3.81 /
    // 4.18 vs 2.49 / 2.60. So: output maps of at least 8×8. (The widest layers gain the least per
    // product, but the accuracy rule below leaves F(4×4) only to them.)
    // Accuracy: its transforms hold larger entries (Bᵀ up to 5, Aᵀ up to 8, G's 1/6 and 1/24), and
    // on mixed-magnitude data (each entry ×10^U(−3, 3)) the worst error over 90 draws (paddings
    // 0–2, maps 4×4 to 16×16) was 8–14× tests/oracle.py's bound at 16 summed channels, up to 20×
    // at 32, 3.7× at 64, 0.87× at 128, 0.27× at 256 (F(2×2): 0.15× at 32; other interpolation
    // points, and F(3×3, 3×3), also exceeded it at 32). So: at least 128 summed channels (C for
    // the forward, O for the input gradient; tests/test_winograd.py); the weight gradient stays
    // F(2×2).
    // Where the tiles outrun the BLAS (Zen 5, NHWC, F(4×4) vs F(2×2)): 128 → 128 @8 6.09 / 6.26 vs
    // 4.13 / 4.20; 128 → 256 @8 12.0 / 12.5 vs 10.1 / 8.8; 256 → 256 @8 23.4 / 23.8 vs 18.9 / 19.3;
    // but 128 → 128 @16 11.2 / 11.3 vs 12.4 / 12.6. So there: output maps of at least 16×16.
    constexpr int64_t kMinWinograd4x4SummedChannels = 128;
    const int64_t min_winograd4x4_map = fast_tiles ? 16 : 8;
    const int64_t summed_channels = pass == Conv2dPass::GradInput ? g.O : g.C;
    const bool large_tiles = pass != Conv2dPass::GradWeight && summed_channels >= kMinWinograd4x4SummedChannels &&
                             std::min(g.H_out, g.W_out) >= min_winograd4x4_map;
    // Where the tiles outrun the BLAS, a weight gradient whose products would run on BLAS (more
    // than max_winograd_grad_weight_tile_channels output channels) takes the direct kernel where
    // that can (Zen 5, weight gradient, ms, Winograd on BLAS vs direct): NCHW 128 → 256 @8 (batch
    // 128) 13.8 vs 11.1–11.7; batch 64, NHWC: 128 → 256 @8 6.65 vs 5.68, 256 → 256 @8 12.2 vs 11.1,
    // 128 → 256 @16 24.9 vs 21.1; but NCHW 256 → 512 @8 24.8 vs 48.9 on the NCHW GEMM (the direct
    // kernel stops at max_direct_grad_weight_channels).
    const bool direct_grad_weight_wins = fast_tiles && pass == Conv2dPass::GradWeight && !tiles &&
                                         g.O <= max_direct_grad_weight_channels && g.O % kDirectLanes == 0;
    if (choice == WinogradChoice::Measured && wide && long_sums && !direct_grad_weight_wins &&
        std::min({g.H, g.W, g.H_out, g.W_out}) >= kMinWinogradMap) {
      return large_tiles ? winograd4x4 : winograd;
    }
  }
  // Depthwise (one filter per channel): the GEMM paths run C GEMMs of one output row each, which
  // measured 50–100× slower than torch's (AMD EPYC Zen 4, 2 threads, batch 32, channels-last,
  // 144 channels @16 3×3: forward 20.6 ms against torch's 0.17 ms); the channel loops of
  // conv2d_depthwise.cpp, in either layout and dtype, any kernel size, stride, padding, dilation.
  if (g.groups > 1 && g.groups == g.C && g.O == g.C) return Conv2dKernel::Depthwise;
  // NCHW stays NCHW: routing small-map NCHW convs through the channels-last kernels measured
  // slower (0.76–0.89× native vs 0.82–0.93× on the NCHW GEMM path), as did the direct kernel at
  // 32 channels (stop 9). Except on maps of fewer than 16 output pixels: there the per-sample
  // GEMMs have 2 to 15 columns, which BLAS runs far below its peak, and one channels-last GEMM
  // over all the batch's pixels (x and δy copied between layouts) wins. Measured (AMD EPYC Zen 4,
  // avx512, 2 threads, batch 32, 1×1 convs of mobilenet_v2's last blocks, forward / input grad /
  // weight grad, ms, NCHW GEMM vs via channels-last): 960→160 @2×2 2.89 / 2.82 / 1.04 vs
  // 0.26 / 0.28 / 0.85; 960→160 @3×3 3.83 / 4.54 / 0.61 vs 0.53 / 0.54 / 0.57; 384→64 @4×4
  // 0.18 / 0.20 / 0.19 vs 0.23 / 0.21 / 0.21; @1×1 a tie.
  constexpr int64_t kMinNchwGemmPixels = 16;
  // Where the tiles outrun the BLAS, an NCHW conv whose pass the direct kernel takes (below) runs
  // it, each sample transposed in the cache (conv2d_direct.cpp). Zen 5, batch 128, NCHW GEMM vs
  // direct, forward / input grad / weight grad, ms: 64 → 128 @8 1×1 0.72 / 0.75 / 0.85 vs 0.35 /
  // 0.35 / 0.40; the 3 → 16 stem 0.94–0.97 / – / 0.98–1.00 vs 0.74–0.76 / – / 0.53; 16 → 32 1×1
  // stride 2 0.39–0.41 / – / 0.46–0.52 vs 0.24–0.31 / – / 0.24–0.25; 8 → 16 @32 2.41–2.43 /
  // 2.31–2.37 / 2.34–2.39 vs 0.91–0.95 / 2.09 / 0.89–1.03. (With copies of the whole tensors
  // between layouts, before: 16 → 16 @32 4.95 / 4.58 / 4.21 vs 2.55 / 2.68 / 2.76; 32 → 32 @32
  // 15.8 / 18.0 / 14.6 vs 8.5 / 8.6 / 10.3; 64 → 64 @32 50.7 / 51.4 / 49.1 vs 29.2 / 29.6 / 35.2.)
  // The direct kernels are float32 code for one group, compiled for AVX2 + FMA and AVX-512.
  const bool direct_possible = dtype == at::kFloat && g.groups == 1 && capability >= CpuCapability::Avx2;
  // The NHWC GEMM's input gradient with its product δY · W on the tiles, where they outrun the BLAS,
  // on output maps of at least 16 pixels (K padded to whole vectors, but for a pointwise conv,
  // whose product is δx itself: there K must fill them). (The forward and the weight
  // gradient under the same conditions take the direct kernel itself.) Zen 5, NHWC, tiles vs BLAS,
  // the input gradient of stride-2 3×3 convs (batch 64): 16 → 32 @32 0.48 vs 0.93; 64 → 128 @16
  // 1.32 vs 2.90; 128 → 256 @16 6.73 vs 11.7; 256 → 512 @8 5.55 vs 11.8. On mobilenet_v2's 1×1
  // convs of 1 and 2×2 pixels a sample, a block has only 32 or 128 rows and the tiles re-read the
  // weights per block: mixed, e.g. 160 → 960 @1 0.06–0.14 vs 0.12 and 320 → 1280 @1 0.16–0.35 vs
  // 0.30 (noisy rows of 0.05–0.5 ms): BLAS there. The stem's input gradient (3 → 16 @32, K = 27
  // padded to 32, batch 128, NHWC): 2.29–2.36 ms on BLAS vs 0.98–1.00 on the tiles (torch 1.46–1.48).
  const bool gemm_on_tiles = fast_tiles && direct_possible && pass == Conv2dPass::GradInput &&
                             g.H_out * g.W_out >= 16 && (g.K() % kDirectLanes == 0 || !g.is_pointwise());
  const Conv2dKernel nhwc_gemm = !gemm_on_tiles ? Conv2dKernel::NhwcGemm
                                 : avx512       ? Conv2dKernel::NhwcGemmAvx512
                                                : Conv2dKernel::NhwcGemmAvx2;
  const bool nchw_via_direct = fast_tiles;
  if (!channels_last && !(direct_possible && nchw_via_direct)) {
    return g.H_out * g.W_out < kMinNchwGemmPixels ? nhwc_gemm : Conv2dKernel::NchwGemm;
  }
  if (!direct_possible) return Conv2dKernel::NhwcGemm;
  const Conv2dKernel direct_kernel = avx512 ? Conv2dKernel::DirectAvx512 : Conv2dKernel::DirectAvx2;
  // Forward and input gradient: up to 64 channels (the channels the tiles run over, in whole
  // vectors). AVX2 (AMD EPYC Zen 3): at 128 channels the direct kernel measured 0.69–0.83×
  // native, the GEMM path 0.79–0.90× (stop 10). AVX-512 (AMD EPYC Zen 4, family 25 model 17,
  // 2026-11-29, one thread, batch 32, best of 7, forward / input gradient ms, a loaded machine):
  // 64 → 64 @8 direct 1.60 / 1.60 vs GEMM 1.68 / 1.73; 128 → 128 @8 10.5 / 10.8 vs 10.8 / 10.8
  // (a tie, within the noise); 128 → 256 @8 25.3 / 24.1 vs 26.6 / 20.8: the same limit.
  // Zen 5 (fast tiles), direct vs NHWC GEMM: 128 → 128 @16 3×3 stride 2 4.99 / (GEMM) vs 12.1;
  // 128 → 256 @8 1×1 1.16 / 1.13 vs 2.60 / 2.55; 256 → 512 @8 3×3 stride 2 10.4 vs 21.4 (forward):
  // no limit (the widest measured: 512).
  // But without a limit the tiles meet mobilenet_v2's wide 1×1 convs on maps of 1 or 4 pixels a
  // sample, where a 12-pixel tile computes mostly waste (Zen 5, batch 64, direct vs NHWC GEMM):
  // 160 → 960 @1 0.56 / 0.98 / 0.60 vs 0.12 / 0.12 / 0.22; 96 → 576 @2 0.24 / 0.30 / 0.55 vs
  // 0.16 / 0.15 / 0.22; while at 4×4, 32 → 192 0.05 / 0.05 vs 0.08 / 0.08. So there the map the
  // tiles run over (the output's; δx's for the input gradient) must have at least 16 pixels.
  const int64_t max_direct_channels = fast_tiles ? INT64_MAX : 64;
  const int64_t min_direct_pixels = fast_tiles ? 16 : 1;
  auto direct_for = [&](int64_t channels, int64_t limit, int64_t pixels) {
    return channels % kDirectLanes == 0 && channels <= limit && pixels >= min_direct_pixels;
  };
  bool direct = false;
  switch (pass) {
    case Conv2dPass::Forward:
      direct = direct_for(g.O, max_direct_channels, g.H_out * g.W_out);
      break;
    case Conv2dPass::GradInput:
      // δx is the stride-1 "full" correlation of δy, padded by d·(k − 1) − p ≥ 0, with the
      // rotated kernel: a direct conv over the input channels, for stride 1 only
      direct = direct_for(g.C, max_direct_channels, g.H * g.W) && g.sH == 1 && g.sW == 1 &&
               g.pH <= g.dH * (g.kH - 1) && g.pW <= g.dW * (g.kW - 1) && padding_products_ok;
      break;
    case Conv2dPass::GradWeight:
      // a tile spans tile_columns weight columns (a, b, c): K must have that many
      direct = direct_for(g.O, max_direct_grad_weight_channels, g.H_out * g.W_out) &&
               g.K() >= tiling.tile_columns;
      break;
  }
  if (direct) return direct_kernel;
  // An NCHW conv the direct kernel does not take: as above, or via channels-last copies (of the
  // whole tensors) to the tiles' GEMM, if the conv reads every input pixel (a strided 1×1 reads a
  // quarter of them; the copy moves all) and has at least 16 input channels (Zen 5, batch 128, the
  // input gradient, NCHW GEMM vs tiles: stride-2 3×3 16 → 32 @32 2.31 vs 1.98; 32 → 64 @16 2.04 vs
  // 1.02; 64 → 128 @16 7.09 vs 3.81; but the 3 → 16 stem 1.00–1.06 vs 1.28–1.34, 16 → 32 1×1
  // stride 2 0.42 vs 0.59–0.66).
  if (!channels_last) {
    const bool copies_pay = g.C >= 16 && g.sH <= g.kH && g.sW <= g.kW;
    return g.H_out * g.W_out < kMinNchwGemmPixels || (gemm_on_tiles && copies_pay) ? nhwc_gemm : Conv2dKernel::NchwGemm;
  }
  return nhwc_gemm;
}

namespace {

// In rows ir of a row-major image of width W, zero the columns outside jr (the few columns
// of the padding; a column-wise loop, as each is only one or two elements wide).
template <typename scalar_t>
void zero_columns(scalar_t* image, int64_t W, Range ir, Range jr) {
  for (int64_t j = 0; j < jr.lo; ++j) {
    for (int64_t i = ir.lo; i < ir.hi; ++i) image[i * W + j] = scalar_t(0);
  }
  for (int64_t j = jr.hi; j < W; ++j) {
    for (int64_t i = ir.lo; i < ir.hi; ++i) image[i * W + j] = scalar_t(0);
  }
}

// im2col: cols[(c·kH + a)·kW + b, i·W_out + j] = x_pad[c, i·sH + a·dH, j·sW + b·dW]
// x points at the C/G channels of one group of one sample; cols is K × L.
// Row (c, a, b) of cols is an H_out × W_out image: the output rows i and columns j whose
// input lies in the padding are zero-filled, the rest is copied (runs of contiguous
// elements when sW = 1). Every element of cols is written exactly once.
template <typename scalar_t>
void im2col(const scalar_t* x, const Conv2dGeometry& g, scalar_t* cols) {
  const int64_t H = g.H, W = g.W, H_out = g.H_out, W_out = g.W_out, sW = g.sW;
  for (int64_t c = 0; c < g.C_g(); ++c) {
    const scalar_t* x_c = x + c * H * W;
    for (int64_t a = 0; a < g.kH; ++a) {
      const int64_t h_off = a * g.dH - g.pH;  // input row = i·sH + h_off
      const Range ir = g.valid_i[a];
      for (int64_t b = 0; b < g.kW; ++b) {
        const int64_t w_off = b * g.dW - g.pW;  // input column = j·sW + w_off
        const Range jr = g.valid_j[b];
        scalar_t* out = cols + ((c * g.kH + a) * g.kW + b) * g.L();
        std::fill(out, out + ir.lo * W_out, scalar_t(0));  // rows in the top padding
        if (g.sH == 1 && sW == 1 && W_out == W) {
          // Stride 1, "same" width: output pixel i·W + j reads input pixel i·W + j + shift, so
          // all valid rows are one contiguous copy of the shifted image; the columns that
          // wrapped around to the neighbouring row read the padding and are zeroed after.
          const int64_t shift = h_off * W + w_off;
          if (ir.hi > ir.lo && jr.hi > jr.lo) {
            const int64_t first = ir.lo * W + jr.lo, last = (ir.hi - 1) * W + jr.hi;
            std::copy(x_c + first + shift, x_c + last + shift, out + first);
          }
          zero_columns(out, W, ir, jr);
        } else {
          for (int64_t i = ir.lo; i < ir.hi; ++i) {
            scalar_t* out_row = out + i * W_out;
            const scalar_t* in_row = x_c + (i * g.sH + h_off) * W;
            for (int64_t j = 0; j < jr.lo; ++j) out_row[j] = scalar_t(0);     // left padding
            strided_copy(in_row + jr.lo * sW + w_off, sW, jr.hi - jr.lo, out_row + jr.lo);
            for (int64_t j = jr.hi; j < W_out; ++j) out_row[j] = scalar_t(0);  // right padding
          }
        }
        std::fill(out + ir.hi * W_out, out + H_out * W_out, scalar_t(0));  // bottom padding
      }
    }
  }
}

// col2im, the adjoint of im2col: x[c, h, w] += every cols entry that im2col read from
// x_pad[c, h, w] (entries that read the padding are dropped).
// Together with cols = Wᵀ · δy this is the "full" correlation of the stride-dilated δy
// with the 180°-rotated kernel. x must be zero-initialised; single-threaded scatter-add,
// so the summation order (and the result) is deterministic. cols is scratch: in the
// stride-1 "same" case its padding entries are zeroed so that whole blocks can be added.
template <typename scalar_t>
void col2im(scalar_t* cols, const Conv2dGeometry& g, scalar_t* x) {
  const int64_t H = g.H, W = g.W, W_out = g.W_out, sW = g.sW;
  for (int64_t c = 0; c < g.C_g(); ++c) {
    scalar_t* x_c = x + c * H * W;
    for (int64_t a = 0; a < g.kH; ++a) {
      const int64_t h_off = a * g.dH - g.pH;  // input row = i·sH + h_off
      const Range ir = g.valid_i[a];
      for (int64_t b = 0; b < g.kW; ++b) {
        const int64_t w_off = b * g.dW - g.pW;  // input column = j·sW + w_off
        const Range jr = g.valid_j[b];
        scalar_t* in = cols + ((c * g.kH + a) * g.kW + b) * g.L();
        if (ir.hi <= ir.lo || jr.hi <= jr.lo) continue;  // reads only padding
        if (g.sH == 1 && sW == 1 && W_out == W) {
          // Stride 1, "same" width (see im2col): drop the padding columns, then add the
          // valid rows as one contiguous block shifted by h_off·W + w_off.
          zero_columns(in, W, ir, jr);
          const int64_t first = ir.lo * W + jr.lo, last = (ir.hi - 1) * W + jr.hi;
          const int64_t shift = h_off * W + w_off;
          for (int64_t l = first; l < last; ++l) x_c[l + shift] += in[l];
          continue;
        }
        for (int64_t i = ir.lo; i < ir.hi; ++i) {
          const scalar_t* in_row = in + i * W_out;
          scalar_t* x_row = x_c + (i * g.sH + h_off) * W;
          strided_add(in_row + jr.lo, jr.hi - jr.lo, x_row + jr.lo * sW + w_off, sW);
        }
      }
    }
  }
}

// Calls body(n_begin, n_end) over the batch: split across threads when there are at
// least as many samples as threads, otherwise one sequential call (so the GEMMs inside
// get the threads). Each call of body is one thread's contiguous share of samples.
// The dispatch-key guard of the calling thread is thread-local, so each worker sets its own:
// the GEMMs on slices of tensors that require grad must not go through autograd.
template <typename F>
void for_each_sample(int64_t N, const F& body) {
  if (N >= at::get_num_threads()) {
    at::parallel_for(0, N, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView guard;
      body(begin, end);
    });
  } else if (N > 0) {
    body(0, N);
  }
}

// Element offset of channel block g (of `channels_per_group` channels) of sample n.
inline int64_t plane_offset(int64_t n, int64_t channels, int64_t g, int64_t channels_per_group,
                            int64_t plane) {
  return (n * channels + g * channels_per_group) * plane;
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  const at::Tensor dense = manualconv::contiguous(t);
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "manualconv_all_finite", [&] {
    const scalar_t* data = dense.const_data_ptr<scalar_t>();
    int bad = 0;  // v − v is 0 for a finite v, NaN for ±inf and NaN
    for (int64_t i = 0; i < dense.numel(); ++i) bad |= (data[i] - data[i]) != scalar_t(0);
    finite = bad == 0;
  });
  return finite;
}

namespace {

at::Tensor as_channels_last(const at::Tensor& t) { return manualconv::contiguous(t, at::MemoryFormat::ChannelsLast); }

// A channels-last kernel's result in the layout of the op's input (channels-last, or NCHW:
// select_conv2d_kernel gives tiny NCHW maps the channels-last GEMM)
at::Tensor in_layout_of(const at::Tensor& result, const at::Tensor& like) {
  return is_channels_last(like) ? result : manualconv::contiguous(result);
}

}  // namespace

// y = W · im2col(x) + b   (per sample and group)
at::Tensor conv2d_forward(Cpu, const at::Tensor& input, const at::Tensor& weight,
                          const at::Tensor& bias, const Conv2dGeometry& g) {
  Conv2dKernel kernel = select_conv2d_kernel(Conv2dPass::Forward, g, input.scalar_type(),
                                             is_channels_last(input), cpu_capability());
  if (is_winograd(kernel)) {
    at::Tensor y = conv2d_forward_winograd(input, weight, bias, g, kernel);
    if (y.defined()) return y;
    kernel = select_conv2d_kernel(Conv2dPass::Forward, g, input.scalar_type(), is_channels_last(input),
                                  cpu_capability(), /*winograd=*/false);  // a NaN or ±inf (conv2d.h)
  }
  switch (kernel) {
    case Conv2dKernel::Depthwise:
      return conv2d_forward_depthwise(input, weight, bias, g);
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::DirectAvx512:
      return conv2d_forward_direct(input, weight, bias, g, kernel);  // (either layout)
    default:
      break;  // the Winograd kernels (not selected without Winograd: handled above)
    case Conv2dKernel::NhwcGemm:  // (an NCHW input: laid out channels-last, the result back)
      return in_layout_of(conv2d_forward_channels_last(as_channels_last(input), weight, bias, g), input);
    case Conv2dKernel::NchwGemm:
      break;  // below
  }
  const bool has_bias = bias.defined();

  const at::Tensor x = manualconv::contiguous(input);
  const at::Tensor w = weight.contiguous().view({g.groups, g.O_g(), g.K()});
  const at::Tensor b =
      has_bias ? bias.contiguous().view({g.groups, g.O_g(), 1}) : at::Tensor();
  at::Tensor y = manualconv::empty(g.output_size(), x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    const scalar_t* b_data = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    const int64_t K = g.K(), L = g.L(), Og = g.O_g();
    for_each_sample(g.N, [&](int64_t n_begin, int64_t n_end) {
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : manualconv::empty({K, L}, x.options());
      for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const scalar_t* x_ng = x_data + plane_offset(n, g.C, grp, g.C_g(), g.H * g.W);
          const scalar_t* cols = x_ng;  // pointwise: im2col(x) is x
          if (!g.is_pointwise()) {
            im2col(x_ng, g, buffer.mutable_data_ptr<scalar_t>());
            cols = buffer.const_data_ptr<scalar_t>();
          }
          scalar_t* y_ng = y_data + plane_offset(n, g.O, grp, Og, L);
          if (b_data != nullptr) {  // y = b, then y += W · cols
            for (int64_t o = 0; o < Og; ++o) std::fill_n(y_ng + o * L, L, b_data[grp * Og + o]);
          }
          gemm(false, false, Og, L, K, scalar_t(1), w_data + grp * Og * K, K, cols, L,
               scalar_t(b_data != nullptr ? 1 : 0), y_ng, L);
        }
      }
    });
  });
  return y;
}

// δx = col2im(Wᵀ · δy)   (the "full" correlation of the stride-dilated δy with the
// 180°-rotated kernel, per sample and group)
at::Tensor conv2d_grad_input(Cpu, const at::Tensor& grad_output, const at::Tensor& weight,
                             const Conv2dGeometry& g) {
  const bool channels_last = is_channels_last(grad_output);
  Conv2dKernel kernel = select_conv2d_kernel(Conv2dPass::GradInput, g, grad_output.scalar_type(),
                                             channels_last, cpu_capability());
  if (kernel != Conv2dKernel::NchwGemm && !is_nhwc_gemm(kernel) && !all_finite(weight)) {
    kernel = select_conv2d_kernel(Conv2dPass::GradInput, g, grad_output.scalar_type(), channels_last,
                                  cpu_capability(), /*winograd=*/true, /*finite_weight=*/false);
  }
  if (is_winograd(kernel)) {
    at::Tensor dx = conv2d_grad_input_winograd(grad_output, weight, g, kernel);
    if (dx.defined()) return dx;
    kernel = select_conv2d_kernel(Conv2dPass::GradInput, g, grad_output.scalar_type(), channels_last,
                                  cpu_capability(), /*winograd=*/false);
  }
  switch (kernel) {
    case Conv2dKernel::Depthwise:
      return conv2d_grad_input_depthwise(grad_output, weight, g);
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::DirectAvx512:
      return conv2d_grad_input_direct(grad_output, weight, g, kernel);  // (either layout)
    default:
      break;  // the Winograd kernels (not selected without Winograd: handled above)
    case Conv2dKernel::NhwcGemm:  // (an NCHW δy: laid out channels-last, the result back)
    case Conv2dKernel::NhwcGemmAvx2:
    case Conv2dKernel::NhwcGemmAvx512:
      return in_layout_of(conv2d_grad_input_channels_last(as_channels_last(grad_output), weight, g, kernel),
                          grad_output);
    case Conv2dKernel::NchwGemm:
      break;  // below
  }

  const at::Tensor dy = manualconv::contiguous(grad_output).view({g.N, g.groups, g.O_g(), g.L()});
  const at::Tensor w = weight.contiguous().view({g.groups, g.O_g(), g.K()});
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W}, dy.options());

  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_conv2d_grad_input", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    const int64_t K = g.K(), L = g.L(), Og = g.O_g();
    for_each_sample(g.N, [&](int64_t n_begin, int64_t n_end) {
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : manualconv::empty({K, L}, dy.options());
      for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const scalar_t* w_g = w_data + grp * Og * K;  // W[g]: O/G × K, used transposed
          const scalar_t* dy_ng = dy_data + plane_offset(n, g.O, grp, Og, L);
          scalar_t* dx_ng = dx_data + plane_offset(n, g.C, grp, g.C_g(), g.H * g.W);
          if (g.is_pointwise()) {  // δx = Wᵀ · δy, written in place
            gemm(true, false, K, L, Og, scalar_t(1), w_g, K, dy_ng, L, scalar_t(0), dx_ng, L);
          } else {
            // col2im accumulates: zero this group's δx here, while it is about to be used.
            std::fill(dx_ng, dx_ng + g.C_g() * g.H * g.W, scalar_t(0));
            scalar_t* cols = buffer.mutable_data_ptr<scalar_t>();
            gemm(true, false, K, L, Og, scalar_t(1), w_g, K, dy_ng, L, scalar_t(0), cols, L);
            col2im(cols, g, dx_ng);
          }
        }
      }
    });
  });
  return dx;
}

// ∂J/∂W = Σ_n δy · im2col(x)ᵀ   (per group; one accumulator per thread, summed at the end)
// BLAS is much faster at the transposed product for the short-and-wide δy of early layers
// (a long reduction into a small output), so each thread accumulates
//   ∂J/∂Wᵀ += im2col(x) · δyᵀ      (K × O/G per group)
// and the sum is transposed back to (O, C/G, kH, kW) once at the end.
at::Tensor conv2d_grad_weight(Cpu, const at::Tensor& input, const at::Tensor& grad_output,
                              const Conv2dGeometry& g) {
  Conv2dKernel kernel = select_conv2d_kernel(Conv2dPass::GradWeight, g, input.scalar_type(),
                                             is_channels_last(input), cpu_capability());
  if (is_winograd(kernel)) {
    at::Tensor dw = conv2d_grad_weight_winograd(input, grad_output, g, kernel);
    if (dw.defined()) return dw;
    kernel = select_conv2d_kernel(Conv2dPass::GradWeight, g, input.scalar_type(),
                                  is_channels_last(input), cpu_capability(), /*winograd=*/false);
  }
  switch (kernel) {
    case Conv2dKernel::Depthwise:
      return conv2d_grad_weight_depthwise(input, grad_output, g);
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::DirectAvx512:
      return conv2d_grad_weight_direct(input, grad_output, g, kernel);  // (either layout)
    case Conv2dKernel::NhwcGemm:  // (NCHW x, δy: laid out channels-last, the result contiguous)
      return in_layout_of(conv2d_grad_weight_channels_last(as_channels_last(input), as_channels_last(grad_output), g),
                          input);
    default:
      break;  // the Winograd kernels (not selected without Winograd: handled above)
    case Conv2dKernel::NchwGemm:
      break;  // below
  }

  const at::Tensor x = manualconv::contiguous(input);
  const at::Tensor dy = manualconv::contiguous(grad_output).view({g.N, g.groups, g.O_g(), g.L()});
  // one slot per thread when the samples are spread over threads (see for_each_sample)
  const PerThreadSum dw_t_sum(g.N >= at::get_num_threads() ? at::get_num_threads() : 1,
                              {g.groups, g.K(), g.O_g()}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_grad_weight", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const int64_t K = g.K(), L = g.L(), Og = g.O_g();
    for_each_sample(g.N, [&](int64_t n_begin, int64_t n_end) {
      scalar_t* dw_t = dw_t_sum.mine<scalar_t>();
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : manualconv::empty({K, L}, x.options());
      for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const scalar_t* cols = x_data + plane_offset(n, g.C, grp, g.C_g(), g.H * g.W);
          if (!g.is_pointwise()) {
            im2col(cols, g, buffer.mutable_data_ptr<scalar_t>());
            cols = buffer.const_data_ptr<scalar_t>();
          }
          // ∂J/∂W[g]ᵀ += im2col(x) · δyᵀ   (K × O/G)
          gemm(false, true, K, Og, L, scalar_t(1), cols, L, dy_data + plane_offset(n, g.O, grp, Og, L),
               L, scalar_t(1), dw_t + grp * K * Og, Og);
        }
      }
    });
  });
  return dw_t_sum.total().transpose(1, 2).contiguous().view({g.O, g.C_g(), g.kH, g.kW});
}

}  // namespace manualconv
