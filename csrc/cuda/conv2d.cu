// conv2d on CUDA: forward, input gradient and weight gradient as im2col / GEMM / col2im steps,
// the same formulation as conv2d.cpp (see its notation), with the same checks (geometry.h):
//
//   forward        y[g]     = W[g] · im2col(x[g]) + b[g]
//   input grad     δx[g]    = col2im(W[g]ᵀ · δy[g])
//   weight grad    ∂J/∂W[g] = Σ_n δy[g] · im2col(x[g])ᵀ
//
// The batch is processed in chunks of B samples whose column buffers fit kColumnBytes: per chunk
// one im2col or col2im launch and one batched GEMM (cuBLAS through ATen's bmm/baddbmm) over all
// B·G (sample, group) pairs: the weight is broadcast over the samples (a zero batch stride when
// G = 1, else repeated, a copy of B weight tensors, small next to the columns). For the weight
// gradient the columns are laid out group-major, so each group's GEMM reduces over all B·L
// columns of the chunk at once (one batched GEMM over the G groups).
//
// Determinism: im2col writes each column entry once; col2im is a gather (each δx element sums its
// kH·kW possible column entries in a fixed order, no atomics); the weight gradient adds the
// chunks' GEMMs one after the other into one accumulator. cuBLAS GEMMs are run-to-run
// reproducible on a given GPU, so all three ops give bitwise identical results on repeated runs.

#include "common.cuh"

#include <ATen/Dispatch.h>

#include <algorithm>

namespace manualconv {
namespace gpu {
namespace {

// Column buffers of one chunk are kept under this size (the whole batch when it fits).
constexpr int64_t kColumnBytes = int64_t(256) << 20;

// Samples per chunk: as many as fit kColumnBytes with per_sample column elements each (≥ 1).
int64_t chunk_samples(int64_t N, int64_t per_sample, int64_t element_size) {
  const int64_t fit = kColumnBytes / std::max<int64_t>(per_sample * element_size, 1);
  return std::max<int64_t>(1, std::min(N, fit));
}

// Where entry (sample b, group g, row k, column l) of a chunk's column buffer lives:
//   b·stride_b + g·stride_g + k·stride_k + l.
// Batch-major [B, G, K, L] feeds the per-sample batched GEMMs (forward, grad_input);
// group-major [G, K, B, L] makes each group's buffer one K × (B·L) matrix (grad_weight).
struct ColumnLayout {
  int64_t stride_b, stride_g, stride_k;
};
ColumnLayout batch_major(const Conv2dGeometry& g, int64_t /*B*/) {
  return {g.groups * g.K() * g.L(), g.K() * g.L(), g.L()};
}
ColumnLayout group_major(const Conv2dGeometry& g, int64_t B) {
  return {g.L(), g.K() * B * g.L(), B * g.L()};
}

// Sizes passed to the kernels, in the kernels' index type.
template <typename index_t>
struct ConvArgs {
  index_t C, H, W, C_g, kH, kW, sH, sW, pH, pW, dH, dW, H_out, W_out;
  index_t stride_b, stride_g, stride_k;

  ConvArgs(const Conv2dGeometry& g, const ColumnLayout& layout)
      : C(g.C), H(g.H), W(g.W), C_g(g.C_g()), kH(g.kH), kW(g.kW), sH(g.sH), sW(g.sW), pH(g.pH),
        pW(g.pW), dH(g.dH), dW(g.dW), H_out(g.H_out), W_out(g.W_out),
        stride_b(layout.stride_b), stride_g(layout.stride_g), stride_k(layout.stride_k) {}
};

// im2col: cols[b, g, (c·kH + a)·kW + b', i·W_out + j] = x_pad[b, g·C/G + c, i·sH − pH + a·dH,
// j·sW − pW + b'·dW], zero where that reads the padding. One thread per column entry, in the
// order (b, channel, a, b', i, j): neighbouring threads read neighbouring input columns (for
// sW = 1) and write neighbouring column entries in either layout.
// x points at the chunk's first sample; t < B·C·kH·kW·H_out·W_out.
template <typename scalar_t, typename index_t>
struct Im2col {
  const scalar_t* __restrict__ x;
  ConvArgs<index_t> s;
  scalar_t* __restrict__ cols;

  __host__ __device__ void operator()(int64_t t) const {
    index_t e = static_cast<index_t>(t);
    const index_t j = e % s.W_out;
    e /= s.W_out;
    const index_t i = e % s.H_out;
    e /= s.H_out;
    const index_t bw = e % s.kW;
    e /= s.kW;
    const index_t a = e % s.kH;
    e /= s.kH;
    const index_t c = e % s.C;
    const index_t b = e / s.C;
    const index_t grp = c / s.C_g, c_g = c - grp * s.C_g;
    const index_t h = i * s.sH - s.pH + a * s.dH;
    const index_t w = j * s.sW - s.pW + bw * s.dW;
    const bool inside = h >= 0 && h < s.H && w >= 0 && w < s.W;
    const index_t k = (c_g * s.kH + a) * s.kW + bw;
    cols[b * s.stride_b + grp * s.stride_g + k * s.stride_k + i * s.W_out + j] =
        inside ? x[((b * s.C + c) * s.H + h) * s.W + w] : scalar_t(0);
  }
};

template <typename Op>
__global__ void im2col_kernel(int64_t total, Op op) {
  MANUALCONV_FOR_EACH_ELEMENT(total, op)
}

// col2im as a gather, the adjoint of im2col: δx[b, c, h, w] = Σ of the column entries that
// im2col read from x_pad[b, c, h, w]. Entry (a, b') of output (i, j) read row h when
// h + pH − a·dH = i·sH with 0 ≤ i < H_out (columns alike), so each thread walks the kH·kW kernel
// offsets in row-major order, keeps those that land on the output grid, and sums in acc_t.
// One thread per δx element, each written once: no atomics, a fixed summation order.
// dx points at the chunk's first sample; t < B·C·H·W.
template <typename scalar_t, typename index_t>
struct Col2im {
  const scalar_t* __restrict__ cols;
  ConvArgs<index_t> s;
  scalar_t* __restrict__ dx;

  __host__ __device__ void operator()(int64_t t) const {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    index_t e = static_cast<index_t>(t);
    const index_t w = e % s.W;
    e /= s.W;
    const index_t h = e % s.H;
    e /= s.H;
    const index_t c = e % s.C;
    const index_t b = e / s.C;
    const index_t grp = c / s.C_g, c_g = c - grp * s.C_g;
    // rows (c, ·, ·) of this sample's and group's column matrix
    const scalar_t* col =
        cols + b * s.stride_b + grp * s.stride_g + (c_g * s.kH * s.kW) * s.stride_k;
    acc_t sum = acc_t(0);
    for (index_t a = 0; a < s.kH; ++a) {
      const index_t h_grid = h + s.pH - a * s.dH;  // = i·sH for the output row i that reads h
      if (h_grid < 0) break;                       // decreasing in a
      if (h_grid % s.sH != 0) continue;
      const index_t i = h_grid / s.sH;
      if (i >= s.H_out) continue;
      for (index_t bw = 0; bw < s.kW; ++bw) {
        const index_t w_grid = w + s.pW - bw * s.dW;
        if (w_grid < 0) break;
        if (w_grid % s.sW != 0) continue;
        const index_t j = w_grid / s.sW;
        if (j >= s.W_out) continue;
        sum += static_cast<acc_t>(col[(a * s.kW + bw) * s.stride_k + i * s.W_out + j]);
      }
    }
    dx[t] = static_cast<scalar_t>(sum);
  }
};

template <typename Op>
__global__ void col2im_kernel(int64_t total, Op op) {
  MANUALCONV_FOR_EACH_ELEMENT(total, op)
}

// Fills the column buffer of samples [n0, n0 + B) (layout as given).
void im2col(const at::Tensor& x, const Conv2dGeometry& g, int64_t n0, int64_t B,
            const ColumnLayout& layout, at::Tensor& cols) {
  const int64_t total = B * g.C * g.kH * g.kW * g.L();
  const bool use_int32 = fits_int32({total, cols.numel(), B * g.C * g.H * g.W,
                                     g.H + 2 * g.pH + g.dH * g.kH, g.W + 2 * g.pW + g.dW * g.kW});
  MANUALCONV_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manualconv_im2col_cuda", [&] {
    dispatch_index_type(use_int32, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      using Op = Im2col<scalar_t, index_t>;
      launch_elements(&im2col_kernel<Op>, total,
                      Op{x.const_data_ptr<scalar_t>() + n0 * g.C * g.H * g.W,
                         ConvArgs<index_t>(g, layout), cols.mutable_data_ptr<scalar_t>()});
    });
  });
}

// Writes δx of samples [n0, n0 + B) from their column buffer (batch-major).
void col2im(const at::Tensor& cols, const Conv2dGeometry& g, int64_t n0, int64_t B,
            at::Tensor& dx) {
  const int64_t total = B * g.C * g.H * g.W;
  const bool use_int32 = fits_int32({total, cols.numel(), g.H + 2 * g.pH + g.dH * g.kH,
                                     g.W + 2 * g.pW + g.dW * g.kW});
  MANUALCONV_DISPATCH_FLOATING_TYPES(dx.scalar_type(), "manualconv_col2im_cuda", [&] {
    dispatch_index_type(use_int32, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      using Op = Col2im<scalar_t, index_t>;
      launch_elements(&col2im_kernel<Op>, total,
                      Op{cols.const_data_ptr<scalar_t>(), ConvArgs<index_t>(g, batch_major(g, B)),
                         dx.mutable_data_ptr<scalar_t>() + n0 * g.C * g.H * g.W});
    });
  });
}

// The G per-group matrices of w ([G, rows, cols]) for each of B samples, as B·G matrices in
// (sample, group) order: for G = 1 a zero-stride view, which cuBLAS's strided-batched GEMM reads
// without a copy; for G > 1 a copy (no single batch stride spans samples and groups).
at::Tensor per_sample(const at::Tensor& w, int64_t B) {
  const int64_t G = w.size(0), rows = w.size(1), cols = w.size(2);
  if (G == 1) return w.expand({B, rows, cols});
  return w.unsqueeze(0).expand({B, G, rows, cols}).reshape({B * G, rows, cols});
}

}  // namespace
}  // namespace gpu

// y = W · im2col(x) + b   (per sample and group)
at::Tensor conv2d_forward(Cuda, const at::Tensor& input, const at::Tensor& weight,
                          const at::Tensor& bias, const Conv2dGeometry& g) {
  const bool has_bias = bias.defined();
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous().view({g.groups, g.O_g(), g.K()});
  const at::Tensor b = has_bias ? bias.contiguous().view({g.groups, g.O_g(), 1}) : at::Tensor();
  at::Tensor y = at::empty(g.output_size(), x.options());
  if (g.N == 0) return y.contiguous(output_layout(input));
  // y as per-sample, per-group (O/G) × L matrices
  const at::Tensor y_groups = y.view({g.N, g.groups, g.O_g(), g.L()});

  const int64_t B = g.is_pointwise() ? g.N
                                     : gpu::chunk_samples(g.N, g.groups * g.K() * g.L(),
                                                          x.element_size());
  at::Tensor buffer =
      g.is_pointwise() ? at::Tensor() : at::empty({B * g.groups, g.K(), g.L()}, x.options());
  const at::Tensor w_all = gpu::per_sample(w, B);  // [B·G, O/G, K]
  for (int64_t n0 = 0; n0 < g.N; n0 += B) {
    const int64_t nb = std::min(B, g.N - n0);
    at::Tensor cols;  // [nb·G, K, L]: im2col(x[n, g]) for each (sample, group)
    if (g.is_pointwise()) {
      // im2col(x) = x for a pointwise kernel
      cols = x.view({g.N * g.groups, g.C_g(), g.L()}).narrow(0, n0 * g.groups, nb * g.groups);
    } else {
      // cols = im2col(x[n0 : n0 + nb])
      cols = buffer.narrow(0, 0, nb * g.groups);
      gpu::im2col(x, g, n0, nb, gpu::batch_major(g, nb), cols);
    }
    at::Tensor y_chunk = y_groups.narrow(0, n0, nb);  // [nb, G, O/G, L]
    at::Tensor y_all = y_chunk.view({nb * g.groups, g.O_g(), g.L()});
    const at::Tensor w_chunk = w_all.narrow(0, 0, nb * g.groups);
    if (has_bias) {
      // y[n, g] = W[g] · im2col(x[n, g]) + b[g]   (y filled with b, the GEMM adds to it)
      y_chunk.copy_(b.unsqueeze(0));
      y_all.baddbmm_(w_chunk, cols);
    } else {
      // y[n, g] = W[g] · im2col(x[n, g])
      at::bmm_out(y_all, w_chunk, cols);
    }
  }
  return y.contiguous(output_layout(input));
}

// δx = col2im(Wᵀ · δy)   (per sample and group)
at::Tensor conv2d_grad_input(Cuda, const at::Tensor& grad_output, const at::Tensor& weight,
                             const Conv2dGeometry& g) {
  const at::Tensor dy = grad_output.contiguous().view({g.N, g.groups, g.O_g(), g.L()});
  const at::Tensor w = weight.contiguous().view({g.groups, g.O_g(), g.K()});
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W}, dy.options());
  if (g.N == 0) return dx.contiguous(output_layout(grad_output));

  const int64_t B = g.is_pointwise() ? g.N
                                     : gpu::chunk_samples(g.N, g.groups * g.K() * g.L(),
                                                          dy.element_size());
  const at::Tensor w_t_all = gpu::per_sample(w.transpose(1, 2), B);  // [B·G, K, O/G]
  if (g.is_pointwise()) {
    // col2im is the identity for a pointwise kernel: δx[n, g] = W[g]ᵀ · δy[n, g]
    at::Tensor dx_all = dx.view({g.N * g.groups, g.C_g(), g.L()});
    at::bmm_out(dx_all, w_t_all, dy.view({g.N * g.groups, g.O_g(), g.L()}));
    return dx.contiguous(output_layout(grad_output));
  }
  at::Tensor buffer = at::empty({B * g.groups, g.K(), g.L()}, dy.options());
  for (int64_t n0 = 0; n0 < g.N; n0 += B) {
    const int64_t nb = std::min(B, g.N - n0);
    // cols[n, g] = W[g]ᵀ · δy[n, g]
    at::Tensor cols = buffer.narrow(0, 0, nb * g.groups);  // [nb·G, K, L]
    at::bmm_out(cols, w_t_all.narrow(0, 0, nb * g.groups),
                dy.narrow(0, n0, nb).view({nb * g.groups, g.O_g(), g.L()}));
    // δx[n0 : n0 + nb] = col2im(cols)
    gpu::col2im(cols, g, n0, nb, dx);
  }
  return dx.contiguous(output_layout(grad_output));
}

// ∂J/∂W = Σ_n δy · im2col(x)ᵀ   (per group; one batched GEMM over the groups per chunk)
// With the chunk's columns group-major, im2col(x[n0 : n0 + B, g]) is one K × (B·L) matrix and
// δy[n0 : n0 + B, g], permuted to (O/G) × (B·L), its partner: one GEMM sums over the B samples.
// The chunks are added into one accumulator in order (float for half/bfloat16, so the sum over
// chunks is not rounded to half precision at every step), cast to the weight dtype at the end.
at::Tensor conv2d_grad_weight(Cuda, const at::Tensor& input, const at::Tensor& grad_output,
                              const Conv2dGeometry& g) {
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous().view({g.N, g.groups, g.O_g(), g.L()});
  const at::ScalarType dtype = x.scalar_type();
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  const at::ScalarType acc_dtype = reduced ? at::kFloat : dtype;
  at::Tensor dw = at::zeros({g.groups, g.O_g(), g.K()}, x.options().dtype(acc_dtype));

  const int64_t B = g.N == 0 ? 0 : gpu::chunk_samples(g.N, g.groups * g.K() * g.L(),
                                                      x.element_size());
  at::Tensor buffer = B == 0 ? at::Tensor() : at::empty({g.groups * g.K() * B * g.L()},
                                                        x.options());
  at::Tensor partial = reduced ? at::empty_like(dw) : at::Tensor();
  for (int64_t n0 = 0; n0 < g.N; n0 += B) {
    const int64_t nb = std::min(B, g.N - n0);
    // cols[g] = im2col(x[n0 : n0 + nb, g]), a K × (nb·L) matrix per group
    at::Tensor cols = buffer.narrow(0, 0, g.groups * g.K() * nb * g.L())
                          .view({g.groups, g.K(), nb * g.L()});
    gpu::im2col(x, g, n0, nb, gpu::group_major(g, nb), cols);
    // δy[n0 : n0 + nb] as an (O/G) × (nb·L) matrix per group
    const at::Tensor dy_chunk = dy.narrow(0, n0, nb).permute({1, 2, 0, 3}).contiguous()
                                    .view({g.groups, g.O_g(), nb * g.L()});
    if (reduced) {
      // ∂J/∂W[g] += δy[g] · im2col(x[g])ᵀ, the GEMM accumulating and returning float32
#ifdef MANUALCONV_EMULATE_ON_HOST
      at::bmm_out(partial, dy_chunk.to(at::kFloat), cols.transpose(1, 2).to(at::kFloat));
#else
      at::bmm_out(partial, dy_chunk, cols.transpose(1, 2), at::kFloat);
#endif
      dw.add_(partial);
    } else {
      // ∂J/∂W[g] += δy[g] · im2col(x[g])ᵀ
      dw.baddbmm_(dy_chunk, cols.transpose(1, 2));
    }
  }
  return dw.view({g.O, g.C_g(), g.kH, g.kW}).to(dtype).contiguous(output_layout(input));
}

}  // namespace manualconv
