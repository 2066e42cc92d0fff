// Direct float32 convolution, for the layers select_conv2d_kernel (conv2d.cpp) gives it (up to 64
// channels, 16 or 32 output channels for the weight gradient; wider where the tiles outrun the
// BLAS). The tiles compute channels-last; an NCHW sample is transposed into the padded buffer the
// kernels read anyway, and its result transposed back, one sample at a time in the cache. This
// file is the ATen side (weight packing, padding, layouts, threads); the register tiles are
// written once over a vector type (conv2d_direct_tiles.h, vec.h) and compiled per instruction set
// (conv2d_direct_avx2.cpp, conv2d_direct_avx512.cpp), called here through the kernel
// select_conv2d_kernel chose.
//
// CIFAR-size layers (8 to 64 output channels, 8² to 32² maps) give an im2col GEMM few columns,
// which BLAS runs well below its peak, and im2col itself costs a pass over memory. Here each
// output pixel is computed straight from the (zero-padded) input,
//   y[n, i, j, o] = b[o] + Σ_{a, b, c} x_pad[n, i·sH + a·dH, j·sW + b·dW, c] · W[o, c, a, b],
// with a tile of output pixels × output channels held in vector registers: for each tap (a, b, c)
// the vectors of weights are loaded and each pixel's input value is broadcast against them
// (AVX2: 6 pixels × 16 channels; AVX-512: 12 pixels × 32 channels, and 16 pixels along a row ×
// 16 channels where a block is 16 channels wide; conv2d_direct_isa.h).
//
// The input gradient of a stride-1 conv is the same computation (the seeds' observation): the
// "full" correlation of δy, padded by d·(k−1) − p, with the 180°-rotated kernel whose input and
// output channels are swapped:
//   δx[n, h, w, c] = Σ_{a, b, o} δy_pad[n, h + a·dH, w + b·dW, o] · W[o, c, kH−1−a, kW−1−b].
//
// The weight gradient is the correlation of the input with δy,
//   ∂J/∂W[o, c, a, b] = Σ_{n, i, j} δy[n, i, j, o] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c],
// with a tile of output channels × weight columns (a, b, c) held in registers while the sum runs
// over a sample's pixels: per pixel the vectors of δy, one broadcast input value per column.

#include "conv2d.h"
#include "layout_copy.h"
#include "output_cache.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace manualconv {

// The per-ISA kernels of a kernel choice: a Direct* kernel's own, a Winograd{Avx2,Avx512} kernel's
// products (conv2d_winograd.cpp).
DirectKernels direct_kernels(Conv2dKernel kernel) {
#ifdef MANUALCONV_HAVE_DIRECT_KERNELS
  switch (kernel) {
    case Conv2dKernel::DirectAvx2:
    case Conv2dKernel::WinogradAvx2:
    case Conv2dKernel::Winograd4x4Avx2:
    case Conv2dKernel::NhwcGemmAvx2:
      return {kDirectTilingAvx2, direct_conv_sample_avx2, direct_grad_weight_sample_avx2};
    case Conv2dKernel::DirectAvx512:
    case Conv2dKernel::WinogradAvx512:
    case Conv2dKernel::Winograd4x4Avx512:
    case Conv2dKernel::NhwcGemmAvx512:
      return {kDirectTilingAvx512, direct_conv_sample_avx512, direct_grad_weight_sample_avx512};
    default:
      break;
  }
#endif
  TORCH_CHECK(false, "conv2d: no direct kernel for this kernel choice (internal error)");
  return {};
}

// wt (K, C_out) → blocks of `block` output channels, each (K, width) contiguous (conv2d.h)
at::Tensor pack_weight_blocks(const at::Tensor& wt, int64_t C_out, int64_t block) {
  const int64_t K = wt.numel() / C_out;
  at::Tensor packed = manualconv::empty_like(wt);
  const float* src = wt.const_data_ptr<float>();
  float* dst = packed.mutable_data_ptr<float>();
  for (int64_t o0 = 0; o0 < C_out; o0 += block) {
    const int64_t width = std::min<int64_t>(block, C_out - o0);
    for (int64_t t = 0; t < K; ++t) std::copy_n(src + t * C_out + o0, width, dst + o0 * K + t * width);
  }
  return packed;
}

namespace {

// Copies sample x (H, W, C), or (C, H, W) when nchw, into the interior of padded (Hp, Wp, C),
// pad_h / pad_w from the top / left; the border is never written, so it stays zero. An NCHW
// sample is transposed here, in the cache, row by row (or whole, without padding): the kernels
// read NCHW tensors with no copy of the whole tensor between layouts.
void copy_into_padded(const float* x, bool nchw, int64_t H, int64_t W, int64_t C, int64_t pad_h,
                      int64_t pad_w, int64_t Wp, float* padded) {
  if (nchw && pad_h == 0 && pad_w == 0 && Wp == W) return transpose_matrix(x, H * W, padded, C, C, H * W);
  for (int64_t h = 0; h < H; ++h) {
    float* row = padded + ((h + pad_h) * Wp + pad_w) * C;
    if (nchw) {
      transpose_matrix(x + h * W, H * W, row, C, C, W);  // (C × W), rows H·W apart → (W × C)
    } else {
      std::copy_n(x + h * W * C, W * C, row);
    }
  }
}

// Calls body(n, padded, scratch) for every sample n, samples spread over threads: in (N, H, W,
// C_in), or (N, C_in, H, W) when in_nchw, is copied sample by sample into the calling thread's
// zero-padded buffer (Hp, Wp, C_in); scratch: the thread's own scratch_floats floats.
template <typename F>
void for_each_padded_sample(const DirectConv& s, int64_t N, const float* in, bool in_nchw, int64_t H,
                            int64_t W, int64_t pad_h, int64_t pad_w, int64_t scratch_floats, const F& body) {
  at::parallel_for(0, N, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor buffer = at::zeros({s.Hp * s.Wp * s.C_in}, at::kFloat);  // borders stay zero
    at::Tensor scratch = at::empty({scratch_floats}, at::kFloat);
    float* padded = buffer.mutable_data_ptr<float>();
    for (int64_t n = begin; n < end; ++n) {
      copy_into_padded(in + n * H * W * s.C_in, in_nchw, H, W, s.C_in, pad_h, pad_w, s.Wp, padded);
      body(n, padded, scratch.mutable_data_ptr<float>());
    }
  });
}

// Runs s over the batch, writing out (N, H_out, W_out, C_out), or (N, C_out, H_out, W_out) when
// nchw (each sample computed into the thread's scratch, then transposed into place).
void direct_conv_batch(DirectConvSample conv_sample, const DirectConv& s, int64_t N, const float* in,
                       int64_t H, int64_t W, int64_t pad_h, int64_t pad_w, const float* wt,
                       const float* bias, float* out, bool nchw) {
  const int64_t L = s.H_out * s.W_out;
  for_each_padded_sample(s, N, in, nchw, H, W, pad_h, pad_w, nchw ? L * s.C_out : 0,
                         [&](int64_t n, const float* padded, float* scratch) {
    float* y = out + n * L * s.C_out;
    if (!nchw) return conv_sample(s, padded, wt, bias, y);
    conv_sample(s, padded, wt, bias, scratch);
    transpose_matrix(scratch, s.C_out, y, L, L, s.C_out);  // (L × C_out) → (C_out × L)
  });
}

// A memory format's name for manualconv::empty: channels-last or NCHW
at::MemoryFormat format_of(bool nchw) { return nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast; }

}  // namespace

// y = x ⋆ W + b, computed directly (x float32, channels-last, or NCHW: y in x's layout)
at::Tensor conv2d_forward_direct(const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias, const Conv2dGeometry& g, Conv2dKernel kernel) {
  const DirectKernels k = direct_kernels(kernel);
  const bool nchw = !is_channels_last(input);
  const at::Tensor x = manualconv::contiguous(input, format_of(nchw));
  const at::Tensor wt = pack_weight_blocks(weight.permute({2, 3, 1, 0}).contiguous(), g.O,
                                           k.tiling.block_channels);  // (kH, kW, C, O), in blocks
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = manualconv::empty(g.output_size(), x.options().memory_format(format_of(nchw)));
  const DirectConv s{g.H + 2 * g.pH, g.W + 2 * g.pW, g.C, g.O, g.kH, g.kW, g.sH, g.sW,
                     g.dH, g.dW, g.H_out, g.W_out};
  direct_conv_batch(k.conv_sample, s, g.N, x.const_data_ptr<float>(), g.H, g.W, g.pH, g.pW,
                    wt.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                    y.mutable_data_ptr<float>(), nchw);
  return y;
}

// δx = full-correlation(δy, rot180(W)) with W's channels swapped (stride 1), computed directly
// (δy channels-last or NCHW: δx in δy's layout)
at::Tensor conv2d_grad_input_direct(const at::Tensor& grad_output, const at::Tensor& weight,
                                    const Conv2dGeometry& g, Conv2dKernel kernel) {
  const DirectKernels k = direct_kernels(kernel);
  const bool nchw = !is_channels_last(grad_output);
  const at::Tensor dy = manualconv::contiguous(grad_output, format_of(nchw));
  // rot180(W) with in/out swapped, (kH, kW, O, C) in blocks of C: wt[a, b, o, c] = W[o, c, kH−1−a, kW−1−b]
  const at::Tensor wt = pack_weight_blocks(weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous(), g.C,
                                           k.tiling.block_channels);
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W}, dy.options().memory_format(format_of(nchw)));
  const int64_t pad_h = g.dH * (g.kH - 1) - g.pH, pad_w = g.dW * (g.kW - 1) - g.pW;
  const DirectConv s{g.H_out + 2 * pad_h, g.W_out + 2 * pad_w, g.O, g.C, g.kH, g.kW, 1, 1,
                     g.dH, g.dW, g.H, g.W};
  direct_conv_batch(k.conv_sample, s, g.N, dy.const_data_ptr<float>(), g.H_out, g.W_out, pad_h, pad_w,
                    wt.const_data_ptr<float>(), nullptr, dx.mutable_data_ptr<float>(), nchw);
  return dx;
}

// ∂J/∂W[o, c, a, b] = Σ_{n, i, j} δy[n, i, j, o] · x_pad[n, i·sH + a·dH, j·sW + b·dW, c], computed
// directly (one accumulator per thread, summed at the end; returned channels-last, or NCHW-
// contiguous for an NCHW x, whose samples, and δy's, are transposed one at a time)
at::Tensor conv2d_grad_weight_direct(const at::Tensor& input, const at::Tensor& grad_output,
                                     const Conv2dGeometry& g, Conv2dKernel kernel) {
  const DirectKernels k = direct_kernels(kernel);
  const bool nchw = !is_channels_last(input);
  const at::Tensor x = manualconv::contiguous(input, format_of(nchw));
  const bool dy_nchw = !is_channels_last(grad_output);
  const at::Tensor dy = manualconv::contiguous(grad_output, format_of(dy_nchw));
  const DirectConv s{g.H + 2 * g.pH, g.W + 2 * g.pW, g.C, g.O, g.kH, g.kW, g.sH, g.sW,
                     g.dH, g.dW, g.H_out, g.W_out};
  const int64_t K = g.K();
  std::vector<int64_t> col(K);  // weight column (a, b, c) → offset from a pixel's top-left tap
  for (int64_t a = 0; a < g.kH; ++a) {
    for (int64_t b = 0; b < g.kW; ++b) {
      for (int64_t c = 0; c < g.C; ++c) col[(a * g.kW + b) * g.C + c] = (a * g.dH * s.Wp + b * g.dW) * g.C + c;
    }
  }
  const PerThreadSum dwt_sum(at::get_num_threads(), {K, g.O}, x.options());  // ∂J/∂Wᵀ, as the tiles add it
  const float* dy_data = dy.const_data_ptr<float>();
  const int64_t L = g.L();
  for_each_padded_sample(s, g.N, x.const_data_ptr<float>(), nchw, g.H, g.W, g.pH, g.pW, dy_nchw ? L * g.O : 0,
                         [&](int64_t n, const float* padded, float* scratch) {
    const float* d = dy_data + n * L * g.O;
    if (dy_nchw) {
      transpose_matrix(d, L, scratch, g.O, g.O, L);  // (O × L) → (L × O)
      d = scratch;
    }
    k.grad_weight_sample(s, padded, d, col.data(), dwt_sum.mine<float>());
  });
  // (kH, kW, C, O) → (O, C, kH, kW), in x's layout
  return manualconv::contiguous(dwt_sum.total().view({g.kH, g.kW, g.C, g.O}).permute({3, 2, 0, 1}),
                                format_of(nchw));
}

}  // namespace manualconv
