// conv2d on channels-last (NHWC) tensors: the same three formulas as conv2d.cpp, transposed.
//
// In NHWC a sample is the (H·W) × C matrix whose rows are pixels, and consecutive samples
// stack into one taller matrix of the same kind, so a block of B samples is one GEMM:
//   im2col(x[g])   (B·L) × K, row (n, i, j) the receptive field of output pixel (i, j) of
//                  sample n, columns ordered (a, b, c) like a channels-last weight's
//                  (K = kH·kW·C/G, L = H_out·W_out; zero where it reads the padding)
//   forward        Y[g]      = im2col(x[g]) · W[g]ᵀ + b[g]              (B·L) × O/G
//   input grad     δx[g]     = col2im(δY[g] · W[g])                      (B·L) × K, scattered
//   weight grad    ∂J/∂W[g]  = Σ_blocks δY[g]ᵀ · im2col(x[g])           (O/G) × K
// Y and δY are the channels-last output and its gradient themselves (row stride O, group g
// in columns g·O/G…), so no output is copied; W[g] is rows g·O/G… of the channels-last weight,
// i.e. the (O, kH, kW, C/G) array viewed as an O × K matrix. A 1×1 stride-1 unpadded conv
// needs no im2col at all: im2col(x[g]) is x itself (columns g·C/G…, row stride C).
//
// Parallelism: blocks of samples are spread over threads, each thread owning one column
// buffer (and, for the weight gradient, one accumulator) and calling single-threaded GEMMs.
// A block holds enough samples to give the GEMM at least kTargetRows rows (small feature maps
// batch up), but there are at least as many blocks as threads.

#include "blas.h"
#include "conv2d.h"
#include "low_precision.h"
#include "output_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace manualconv {
namespace {

constexpr int64_t kTargetRows = 256;              // GEMM rows per block, at least
constexpr int64_t kMaxColumnBytes = 8 << 20;     // a block's column buffer, at most (unless one sample needs more)

struct Blocks {
  int64_t size;   // samples per block (the last may have fewer)
  int64_t count;  // number of blocks
};

Blocks sample_blocks(const Conv2dGeometry& g, int64_t element_size) {
  int64_t size = ceil_div(kTargetRows, g.L());
  size = std::min(size, std::max<int64_t>(1, kMaxColumnBytes / (g.L() * g.K() * element_size)));
  size = std::max<int64_t>(1, std::min(size, ceil_div<int64_t>(g.N, at::get_num_threads())));
  return {size, g.N == 0 ? 0 : ceil_div(g.N, size)};
}

// Calls body(n_begin, n_end, buffer) for every block of samples, blocks spread over threads;
// buffer is the calling thread's column buffer of `width` columns a row (K unless given;
// undefined for a pointwise conv, which needs none). The dispatch-key guard is thread-local, so
// each worker sets its own.
template <typename F>
void for_each_block(const Conv2dGeometry& g, const at::TensorOptions& options, const F& body, int64_t width = 0) {
  const Blocks blocks = sample_blocks(g, options.dtype().itemsize());
  at::parallel_for(0, blocks.count, /*grain_size=*/1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor buffer = g.is_pointwise() ? at::Tensor()
                                         : manualconv::empty({blocks.size * g.L(), width > 0 ? width : g.K()}, options);
    for (int64_t block = first; block < last; ++block) {
      const int64_t n_begin = block * blocks.size;
      body(n_begin, std::min(g.N, n_begin + blocks.size), buffer);
    }
  });
}

// Whether kernel row a of output pixel (i, ·) reads input row h inside the image, and the
// input row it reads.
inline bool input_row(const Conv2dGeometry& g, int64_t i, int64_t a, int64_t& h) {
  h = i * g.sH - g.pH + a * g.dH;
  return 0 <= h && h < g.H;
}

// im2col, channels-last, for one sample x (H, W, C) and group grp:
//   cols[i·W_out + j, (a·kW + b)·C/G + c] = x_pad[i·sH − pH + a·dH, j·sW − pW + b·dW, grp·C/G + c]
// Every element of cols (L × K) is written once. With one group and dilation 1 the kW taps of
// a kernel row are kW adjacent pixels, i.e. kW·C contiguous elements of x: one copy.
template <typename scalar_t>
void im2col_channels_last(const scalar_t* x, const Conv2dGeometry& g, int64_t grp,
                          scalar_t* cols) {
  const int64_t C = g.C, Cg = g.C_g(), K = g.K();
  const bool whole_rows = g.groups == 1 && g.dW == 1;
  x += grp * Cg;
  for (int64_t i = 0; i < g.H_out; ++i) {
    for (int64_t j = 0; j < g.W_out; ++j) {
      scalar_t* row = cols + (i * g.W_out + j) * K;
      const int64_t w0 = j * g.sW - g.pW;  // input column of tap b = 0
      const bool all_columns = 0 <= w0 && w0 + (g.kW - 1) * g.dW < g.W;
      for (int64_t a = 0; a < g.kH; ++a) {
        scalar_t* out = row + a * g.kW * Cg;
        int64_t h;
        if (!input_row(g, i, a, h)) {
          std::fill_n(out, g.kW * Cg, scalar_t(0));
          continue;
        }
        const scalar_t* x_row = x + h * g.W * C;
        if (whole_rows && all_columns) {
          std::copy_n(x_row + w0 * C, g.kW * C, out);
          continue;
        }
        for (int64_t b = 0; b < g.kW; ++b) {
          const int64_t w = w0 + b * g.dW;
          if (0 <= w && w < g.W) {
            std::copy_n(x_row + w * C, Cg, out + b * Cg);
          } else {
            std::fill_n(out + b * Cg, Cg, scalar_t(0));
          }
        }
      }
    }
  }
}

// col2im, channels-last, the adjoint of im2col_channels_last: x[h, w, grp·C/G + c] += every
// cols entry that im2col read from there (entries that read the padding are dropped); cols' rows
// are ld ≥ K floats apart (K unless given). Single-threaded per sample, so the summation order is
// fixed.
template <typename scalar_t>
void col2im_channels_last(const scalar_t* cols, const Conv2dGeometry& g, int64_t grp,
                          scalar_t* x, int64_t ld = 0) {
  const int64_t C = g.C, Cg = g.C_g(), K = ld > 0 ? ld : g.K();
  const bool whole_rows = g.groups == 1 && g.dW == 1;
  x += grp * Cg;
  for (int64_t i = 0; i < g.H_out; ++i) {
    for (int64_t j = 0; j < g.W_out; ++j) {
      const scalar_t* row = cols + (i * g.W_out + j) * K;
      const int64_t w0 = j * g.sW - g.pW;
      const bool all_columns = 0 <= w0 && w0 + (g.kW - 1) * g.dW < g.W;
      for (int64_t a = 0; a < g.kH; ++a) {
        const scalar_t* in = row + a * g.kW * Cg;
        int64_t h;
        if (!input_row(g, i, a, h)) continue;
        scalar_t* x_row = x + h * g.W * C;
        if (whole_rows && all_columns) {
          scalar_t* out = x_row + w0 * C;
          for (int64_t e = 0; e < g.kW * C; ++e) out[e] += in[e];
          continue;
        }
        for (int64_t b = 0; b < g.kW; ++b) {
          const int64_t w = w0 + b * g.dW;
          if (0 <= w && w < g.W) {
            scalar_t* out = x_row + w * C;
            for (int64_t c = 0; c < Cg; ++c) out[c] += in[b * Cg + c];
          }
        }
      }
    }
  }
}

// im2col(x[g]) of the samples [n_begin, n_end), and its row stride ld: x itself for a
// pointwise conv (group g's columns, row stride C), else built in buffer (row stride K).
template <typename scalar_t>
const scalar_t* block_columns(const scalar_t* x, const Conv2dGeometry& g, int64_t grp,
                              int64_t n_begin, int64_t n_end, at::Tensor& buffer, int64_t& ld) {
  if (g.is_pointwise()) {
    ld = g.C;
    return x + n_begin * g.L() * g.C + grp * g.C_g();
  }
  scalar_t* cols = buffer.mutable_data_ptr<scalar_t>();
  for (int64_t n = n_begin; n < n_end; ++n) {
    im2col_channels_last(x + n * g.H * g.W * g.C, g, grp, cols + (n - n_begin) * g.L() * g.K());
  }
  ld = g.K();
  return cols;
}

}  // namespace

// Y[g] = im2col(x[g]) · W[g]ᵀ + b[g]   (per block of samples)
at::Tensor conv2d_forward_channels_last(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const Conv2dGeometry& g) {
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = manualconv::empty(g.output_size(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t L = g.L(), K = g.K(), O = g.O, Og = g.O_g();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_forward_channels_last", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    for_each_block(g, x.options(), [&](int64_t n_begin, int64_t n_end, at::Tensor& buffer) {
      const int64_t rows = (n_end - n_begin) * L;
      scalar_t* y_block = y_data + n_begin * L * O;
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        int64_t ld;
        const scalar_t* cols = block_columns(x_data, g, grp, n_begin, n_end, buffer, ld);
        gemm(false, true, rows, Og, K, scalar_t(1), cols, ld, w_data + grp * Og * K, K,
             scalar_t(0), y_block + grp * Og, O);
      }
      if (b_data != nullptr) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t o = 0; o < O; ++o) y_block[r * O + o] += b_data[o];
        }
      }
    });
  });
  return y;
}

// δx[g] = col2im(δY[g] · W[g])   (the "full" correlation of the stride-dilated δy with the
// 180°-rotated kernel, per block of samples)
at::Tensor conv2d_grad_input_channels_last(const at::Tensor& dy, const at::Tensor& weight,
                                           const Conv2dGeometry& g, Conv2dKernel kernel) {
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = manualconv::empty({g.N, g.C, g.H, g.W},
                            dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t L = g.L(), K = g.K(), C = g.C, O = g.O, Cg = g.C_g(), Og = g.O_g();
  const int64_t HWC = g.H * g.W * C;
  if (kernel != Conv2dKernel::NhwcGemm) {
    // NhwcGemmAvx2/Avx512 (one group, float32): cols = δY · W on the direct kernels' register
    // tiles, a 1×1 conv of the block's rows with O input and K output channels (as Winograd's
    // products in conv2d_winograd.cpp; W: O × K, packed in blocks of K), then col2im. K is padded
    // with zero columns to Kp, a multiple of the tiles' vectors (the stem's 3·3·3 = 27 → 32), which
    // col2im skips.
    const DirectKernels k = direct_kernels(kernel);
    const int64_t Kp = ceil_div(K, kDirectLanes) * kDirectLanes;
    TORCH_INTERNAL_ASSERT(Kp == K || !g.is_pointwise(), "conv2d: the tiles' GEMM writes a pointwise δx in place");
    const at::Tensor w_padded = at::constant_pad_nd(w.permute({0, 2, 3, 1}).reshape({O, K}), {0, Kp - K});
    const at::Tensor wt = pack_weight_blocks(w_padded.contiguous(), Kp, k.tiling.block_channels);
    const float* dy_data = dy.const_data_ptr<float>();
    float* dx_data = dx.mutable_data_ptr<float>();
    for_each_block(g, dy.options(), [&](int64_t n_begin, int64_t n_end, at::Tensor& buffer) {
      const int64_t rows = (n_end - n_begin) * L;
      const DirectConv product{1, rows, O, Kp, 1, 1, 1, 1, 1, 1, 1, rows};
      if (g.is_pointwise()) {  // δx = δY · W, written in place
        k.conv_sample(product, dy_data + n_begin * L * O, wt.const_data_ptr<float>(), nullptr, dx_data + n_begin * HWC);
        return;
      }
      float* cols = buffer.mutable_data_ptr<float>();
      k.conv_sample(product, dy_data + n_begin * L * O, wt.const_data_ptr<float>(), nullptr, cols);
      std::fill(dx_data + n_begin * HWC, dx_data + n_end * HWC, 0.0f);  // col2im accumulates
      for (int64_t n = n_begin; n < n_end; ++n) {
        col2im_channels_last(cols + (n - n_begin) * L * Kp, g, 0, dx_data + n * HWC, Kp);
      }
    }, Kp);
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "manualconv_conv2d_grad_input_channels_last", [&] {
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const scalar_t* w_data = w.const_data_ptr<scalar_t>();
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    for_each_block(g, dy.options(), [&](int64_t n_begin, int64_t n_end, at::Tensor& buffer) {
      const int64_t rows = (n_end - n_begin) * L;
      const scalar_t* dy_block = dy_data + n_begin * L * O;
      scalar_t* dx_block = dx_data + n_begin * HWC;
      if (g.is_pointwise()) {  // δx[g] = δY[g] · W[g], written in place
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          gemm(false, false, rows, Cg, Og, scalar_t(1), dy_block + grp * Og, O,
               w_data + grp * Og * K, K, scalar_t(0), dx_block + grp * Cg, C);
        }
        return;
      }
      std::fill(dx_block, dx_block + (n_end - n_begin) * HWC, scalar_t(0));  // col2im accumulates
      scalar_t* cols = buffer.mutable_data_ptr<scalar_t>();
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        gemm(false, false, rows, K, Og, scalar_t(1), dy_block + grp * Og, O,
             w_data + grp * Og * K, K, scalar_t(0), cols, K);
        for (int64_t n = n_begin; n < n_end; ++n) {
          col2im_channels_last(cols + (n - n_begin) * L * K, g, grp, dx_data + n * HWC);
        }
      }
    });
  });
  return dx;
}

// ∂J/∂W[g] = Σ_blocks δY[g]ᵀ · im2col(x[g])   (one accumulator per thread, summed at the end;
// returned channels-last, the layout the accumulator already has). The (block, group) pairs are
// the tasks spread over threads, so a grouped conv with fewer blocks than threads (one sample of
// N·g groups: the per-sample groups trick) still keeps every thread busy.
at::Tensor conv2d_grad_weight_channels_last(const at::Tensor& x, const at::Tensor& dy,
                                            const Conv2dGeometry& g) {
  const int64_t L = g.L(), K = g.K(), O = g.O, Og = g.O_g();
  const PerThreadSum dw_sum(at::get_num_threads(), {O, K}, x.options());
  const Blocks blocks = sample_blocks(g, x.options().dtype().itemsize());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_grad_weight_channels_last", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks.count * g.groups, /*grain_size=*/1, [&](int64_t first, int64_t last) {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : manualconv::empty({blocks.size * L, K}, x.options());
      scalar_t* dw = dw_sum.mine<scalar_t>();
      for (int64_t task = first; task < last; ++task) {
        const int64_t block = task / g.groups, grp = task % g.groups;
        const int64_t n_begin = block * blocks.size, n_end = std::min(g.N, n_begin + blocks.size);
        int64_t ld;
        const scalar_t* cols = block_columns(x_data, g, grp, n_begin, n_end, buffer, ld);
        gemm(true, false, Og, K, (n_end - n_begin) * L, scalar_t(1), dy_data + n_begin * L * O + grp * Og, O,
             cols, ld, scalar_t(1), dw + grp * Og * K, K);
      }
    });
  });
  return dw_sum.total().view({O, g.kH, g.kW, g.C_g()}).permute({0, 3, 1, 2});  // (O, C/G, kH, kW), channels-last
}

// Per-sample weight gradients ∂J/∂W_n[g] = δY_n[g]ᵀ · im2col(x_n[g]): the weight gradient above
// without its sum over the samples, each (sample, group) pair one GEMM written straight into its
// own slice of the result (no accumulator, no copy of x or δy when they are channels-last; the
// only buffer is each thread's L × K column matrix). The pairs are spread over threads; with fewer
// pairs than threads they run one after another and each GEMM gets the threads.
// Returns (N, O, C/G, kH, kW), laid out (N, O, kH, kW, C/G) (each sample's gradient channels-last).
at::Tensor conv2d_grad_weight_per_sample(const at::Tensor& input, const at::Tensor& grad_output,
                                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = check_conv2d_grad_weight(input, grad_output, weight_size, stride, padding,
                                                    dilation, groups, at::kCPU);
  const at::Tensor x = manualconv::contiguous(input, at::MemoryFormat::ChannelsLast);
  const at::Tensor dy = manualconv::contiguous(grad_output, at::MemoryFormat::ChannelsLast);
  const int64_t L = g.L(), K = g.K(), O = g.O, Og = g.O_g(), pairs = g.N * g.groups;
  at::Tensor dw = manualconv::empty({g.N, O, g.kH, g.kW, g.C_g()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_conv2d_grad_weight_per_sample", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    scalar_t* dw_data = dw.mutable_data_ptr<scalar_t>();
    auto run = [&](int64_t first, int64_t last) {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::Tensor buffer = g.is_pointwise() ? at::Tensor() : manualconv::empty({L, K}, x.options());
      for (int64_t pair = first; pair < last; ++pair) {
        const int64_t n = pair / g.groups, grp = pair % g.groups;
        int64_t ld;
        const scalar_t* cols = block_columns(x_data, g, grp, n, n + 1, buffer, ld);
        gemm(true, false, Og, K, L, scalar_t(1), dy_data + n * L * O + grp * Og, O, cols, ld,
             scalar_t(0), dw_data + (n * O + grp * Og) * K, K);
      }
    };
    if (pairs >= at::get_num_threads()) {
      at::parallel_for(0, pairs, /*grain_size=*/1, run);
    } else if (pairs > 0) {
      run(0, pairs);
    }
  });
  return dw.permute({0, 1, 4, 2, 3});
}

}  // namespace manualconv

TORCH_LIBRARY_FRAGMENT(manualconv, m) {
  m.def(
      "conv2d_grad_weight_per_sample(Tensor input, Tensor grad_output, int[4] weight_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("conv2d_grad_weight_per_sample",
         TORCH_FN(manualconv::InFloat32<&manualconv::conv2d_grad_weight_per_sample>::call));
}
