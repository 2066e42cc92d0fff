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

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace manualconv {

// Which kernel runs (conv2d.h). Each threshold cites its measurement: AMD EPYC Zen 3 (AVX2),
// 2 threads, float32, batch 128, against torch.nn in one process (manualconv/bench.py), from the
// closing notes of issue 5 (`issues stops`: stops 9 and 10) and docs/benchmark-cpu.md. Later
// paths (per-ISA direct kernels, Winograd for 3×3 stride 1) are further cases here.
Conv2dKernel select_conv2d_kernel(Conv2dPass pass, const Conv2dGeometry& g, at::ScalarType dtype,
                                  bool channels_last, CpuCapability capability) {
  // Winograd F(2×2, 3×3) (conv2d_winograd.cpp): all three passes of float32, 3×3, stride-1,
  // dilation-1, one-group convs with padding ≤ 2, either layout. float64 stays on the GEMM paths
  // (gradcheck's exact sums). MANUALCONV_WINOGRAD=always|never overrides the measured choice below.
  if (dtype == at::kFloat && g.groups == 1 && g.kH == 3 && g.kW == 3 && g.sH == 1 && g.sW == 1 &&
      g.dH == 1 && g.dW == 1 && g.pH <= 2 && g.pW <= 2) {
    const WinogradChoice choice = winograd_choice();
    if (choice == WinogradChoice::Always) return Conv2dKernel::Winograd;
    // Measured 2026-11-29 on an AMD EPYC Zen 4 (family 25 model 17, AVX-512; MKL's sgemm, the
    // transforms compiled for AVX-512), 1 thread, batch 64 (one thread's share of batch 128),
    // padding 1, min of 7 × 3 interleaved rounds, forward / input gradient in ms, Winograd
    // against the path below (NHWC: direct ≤ 64 channels, else NHWC GEMM; NCHW: NCHW GEMM):
    //   NHWC 64→64 @8  2.03 / 2.44 vs 2.85 / 2.94     NCHW 64→64 @8  2.35 / 2.70 vs 3.75 / 7.96
    //   NHWC 128→128 @8 16.1 / 15.8 vs 29.3 / 29.2    NCHW 128→128 @8 16.8 / 18.0 vs 24.9 / 26.9
    //   NHWC 64→128 @16 37.0 / 36.9 vs 63.0 / 46.2    NCHW 64→128 @16 35.4 / 35.2 vs 60.1 / 58.2
    //   NHWC 256→256 @4 25.7 / 25.7 vs 30.1 / 29.6    NCHW 256→256 @4 20.4 / 20.7 vs 31.3 / 40.4
    // but NHWC 32→32 @16 2.90 / 3.34 vs 2.87 / 2.93, NHWC 16→16 @32 8.07 / 10.4 vs 3.19 / 4.18
    // (with few channels the transforms and the shallow GEMMs, K = N = 16, cost more than the
    // products saved). Later (same machine and method, min of 5, a loaded machine), the
    // products at 32 and 64 channels:
    //   NHWC 32→64 @16 5.27 / 5.27 vs 5.94 / 8.36     NCHW 32→64 @16 8.20 / 10.6 vs 7.64 / 11.3
    //   NHWC 32→32 @32 13.6 / 12.4 vs 12.0 / 12.2     NCHW 32→32 @16 5.57 / 10.2 vs 4.61 / 4.30
    //   NHWC 16→32 @16 2.18 / 2.54 vs 1.69 / 1.65
    // So: C·O ≥ 2048 (32 → 64 and up), at least 32 channels each side.
    // The weight gradient (section 18's adjoint: 16 GEMMs of depth T tiles), ms, Winograd vs the
    // path below:
    //   NHWC 32→32 @16 2.78 vs 3.29    NHWC 32→32 @32 10.9 vs 12.2    NHWC 16→32 @16 1.61 vs 1.72
    //   NHWC 64→64 @8  1.92 vs 3.25    NHWC 128→128 @8 7.22 vs 12.9   NHWC 64→128 @16 14.2 vs 25.9
    //   NCHW 32→32 @32 18.9 vs 16.0    NCHW 32→32 @16 4.77 vs 4.98    NCHW 32→64 @16 5.96 vs 7.39
    //   NCHW 64→64 @8  2.25 vs 3.57    NCHW 128→256 @8 19.4 vs 29.8   NHWC 16→16 @32 5.94 vs 3.60
    // (NCHW pays for copying x and δy to channels-last). So: channels-last from 32 channels each
    // side; NCHW as the forward. All on maps of at least 4×4 (the smallest measured).
    // Accuracy: 3 summed channels exceeded tests/oracle.py's bound on mixed-magnitude data
    // (tests/test_winograd.py); 16 and more stayed within it. The weight gradient sums
    // n = N·H_out·W_out terms, and a tile's transforms also multiply inputs and deltas the direct
    // sum never pairs: on mixed-magnitude data the worst error was 0.4–2.6× the bound at
    // n = 243, 0.13–0.42× at 512, 0.013–0.018× at 2048 (16–64 channels). So: n ≥ 2048.
    constexpr int64_t kMinWinogradChannels = 32;
    constexpr int64_t kMinWinogradProducts = 2048;  // C·O
    constexpr int64_t kMinWinogradMap = 4;
    constexpr int64_t kMinWinogradGradWeightTerms = 2048;  // N·H_out·W_out
    const bool wide = std::min(g.C, g.O) >= kMinWinogradChannels &&
                      (g.C * g.O >= kMinWinogradProducts || (pass == Conv2dPass::GradWeight && channels_last));
    const bool long_sums = pass != Conv2dPass::GradWeight || g.N * g.L() >= kMinWinogradGradWeightTerms;
    if (choice == WinogradChoice::Measured && wide && long_sums &&
        std::min({g.H, g.W, g.H_out, g.W_out}) >= kMinWinogradMap) {
      return Conv2dKernel::Winograd;
    }
  }
  // NCHW stays NCHW: routing small-map NCHW convs through the channels-last kernels measured
  // slower (0.76–0.89× native vs 0.82–0.93× on the NCHW GEMM path), as did the direct kernel at
  // 32 channels (stop 9).
  if (!channels_last) return Conv2dKernel::NchwGemm;
  // The direct kernels are float32 code for one group, compiled for AVX2 + FMA and AVX-512.
  if (dtype != at::kFloat || g.groups != 1 || capability < CpuCapability::Avx2) {
    return Conv2dKernel::NhwcGemm;
  }
  const bool avx512 = capability >= CpuCapability::Avx512;
  const Conv2dKernel direct_kernel = avx512 ? Conv2dKernel::DirectAvx512 : Conv2dKernel::DirectAvx2;
  const DirectTiling& tiling = avx512 ? kDirectTilingAvx512 : kDirectTilingAvx2;
  // Forward and input gradient: up to 64 channels (the channels the tiles run over, in whole
  // vectors). AVX2 (AMD EPYC Zen 3): at 128 channels the direct kernel measured 0.69–0.83×
  // native, the GEMM path 0.79–0.90× (stop 10). AVX-512 (AMD EPYC Zen 4, family 25 model 17,
  // 2026-11-29, one thread, batch 32, best of 7, forward / input gradient ms, a loaded machine):
  // 64 → 64 @8 direct 1.60 / 1.60 vs GEMM 1.68 / 1.73; 128 → 128 @8 10.5 / 10.8 vs 10.8 / 10.8
  // (a tie, within the noise); 128 → 256 @8 25.3 / 24.1 vs 26.6 / 20.8: the same limit.
  const int64_t max_direct_channels = 64;
  // Weight gradient. AVX2 (Zen 3): 8 or 16 output channels; at 32 the GEMM path took 4.5 ms, the
  // direct kernel 4.8 ms; at 64, 4.0 vs 5.2 ms (stop 10). AVX-512 (Zen 4, as above, ms): up to 32
  // output channels: 32 → 32 @16 direct 1.52 vs GEMM 1.93; 64 → 64 @8 1.80–1.96 vs 1.67–1.78.
  const int64_t max_direct_grad_weight_channels = avx512 ? 32 : 16;
  auto direct_for = [](int64_t channels, int64_t limit) {
    return channels % kDirectLanes == 0 && channels <= limit;
  };
  bool direct = false;
  switch (pass) {
    case Conv2dPass::Forward:
      direct = direct_for(g.O, max_direct_channels);
      break;
    case Conv2dPass::GradInput:
      // δx is the stride-1 "full" correlation of δy, padded by d·(k − 1) − p ≥ 0, with the
      // rotated kernel: a direct conv over the input channels, for stride 1 only
      direct = direct_for(g.C, max_direct_channels) && g.sH == 1 && g.sW == 1 &&
               g.pH <= g.dH * (g.kH - 1) && g.pW <= g.dW * (g.kW - 1);
      break;
    case Conv2dPass::GradWeight:
      // a tile spans tile_columns weight columns (a, b, c): K must have that many
      direct = direct_for(g.O, max_direct_grad_weight_channels) && g.K() >= tiling.tile_columns;
      break;
  }
  return direct ? direct_kernel : Conv2dKernel::NhwcGemm;
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

// y = W · im2col(x) + b   (per sample and group)
at::Tensor conv2d_forward(Cpu, const at::Tensor& input, const at::Tensor& weight,
                          const at::Tensor& bias, const Conv2dGeometry& g) {
  const Conv2dKernel kernel = select_conv2d_kernel(Conv2dPass::Forward, g, input.scalar_type(),
                                                   is_channels_last(input), cpu_capability());
  switch (kernel) {
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::DirectAvx512:
      return conv2d_forward_direct(input, weight, bias, g, kernel);
    case Conv2dKernel::Winograd:
      return conv2d_forward_winograd(input, weight, bias, g);
    case Conv2dKernel::NhwcGemm:
      return conv2d_forward_channels_last(input, weight, bias, g);
    case Conv2dKernel::NchwGemm:
      break;  // below
  }
  const bool has_bias = bias.defined();

  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous().view({g.groups, g.O_g(), g.K()});
  const at::Tensor b =
      has_bias ? bias.contiguous().view({g.groups, g.O_g(), 1}) : at::Tensor();
  at::Tensor y = at::empty(g.output_size(), x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_forward", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    const scalar_t* b_data = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    const int64_t K = g.K(), L = g.L(), Og = g.O_g();
    for_each_sample(g.N, [&](int64_t n_begin, int64_t n_end) {
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : at::empty({K, L}, x.options());
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
  const Conv2dKernel kernel = select_conv2d_kernel(Conv2dPass::GradInput, g, grad_output.scalar_type(),
                                                   is_channels_last(grad_output), cpu_capability());
  switch (kernel) {
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::DirectAvx512:
      return conv2d_grad_input_direct(grad_output, weight, g, kernel);
    case Conv2dKernel::Winograd:
      return conv2d_grad_input_winograd(grad_output, weight, g);
    case Conv2dKernel::NhwcGemm:
      return conv2d_grad_input_channels_last(grad_output, weight, g);
    case Conv2dKernel::NchwGemm:
      break;  // below
  }

  const at::Tensor dy = grad_output.contiguous().view({g.N, g.groups, g.O_g(), g.L()});
  const at::Tensor w = weight.contiguous().view({g.groups, g.O_g(), g.K()});
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W}, dy.options());

  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_conv2d_grad_input", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    const int64_t K = g.K(), L = g.L(), Og = g.O_g();
    for_each_sample(g.N, [&](int64_t n_begin, int64_t n_end) {
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : at::empty({K, L}, dy.options());
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
  const Conv2dKernel kernel = select_conv2d_kernel(Conv2dPass::GradWeight, g, input.scalar_type(),
                                                   is_channels_last(input), cpu_capability());
  switch (kernel) {
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::DirectAvx512:
      return conv2d_grad_weight_direct(
          input, grad_output.contiguous(at::MemoryFormat::ChannelsLast), g, kernel);
    case Conv2dKernel::NhwcGemm:
      return conv2d_grad_weight_channels_last(
          input, grad_output.contiguous(at::MemoryFormat::ChannelsLast), g);
    case Conv2dKernel::Winograd:
      return conv2d_grad_weight_winograd(input, grad_output, g);
    case Conv2dKernel::NchwGemm:
      break;  // below
  }

  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous().view({g.N, g.groups, g.O_g(), g.L()});
  // one slot per thread when the samples are spread over threads (see for_each_sample)
  const PerThreadSum dw_t_sum(g.N >= at::get_num_threads() ? at::get_num_threads() : 1,
                              {g.groups, g.K(), g.O_g()}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_grad_weight", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const int64_t K = g.K(), L = g.L(), Og = g.O_g();
    for_each_sample(g.N, [&](int64_t n_begin, int64_t n_end) {
      scalar_t* dw_t = dw_t_sum.mine<scalar_t>();
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : at::empty({K, L}, x.options());
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
