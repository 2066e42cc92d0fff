// conv2d's CPU kernels: which one runs for a call (select_conv2d_kernel, defined in conv2d.cpp), and
// the kernels conv2d.cpp's entry points hand their tensors to. Geometry and checks: geometry.h.
#pragma once

#include "conv2d_direct_isa.h"
#include "cpu_capability.h"
#include "manualconv.h"

namespace manualconv {

// The three products of a conv layer (the kernels of each pass are separate functions).
enum class Conv2dPass { Forward, GradInput, GradWeight };

// The conv2d kernels of the CPU.
enum class Conv2dKernel {
  NchwGemm,  // conv2d.cpp: im2col + GEMM per sample and group, NCHW
  NhwcGemm,  // conv2d_channels_last.cpp: im2col + GEMM per block of samples, channels-last
  // the same, the input gradient's product on the direct kernels' register tiles as a 1×1 conv
  // over the block's rows (where the tiles outrun the BLAS)
  NhwcGemmAvx2,
  NhwcGemmAvx512,
  // conv2d_direct.cpp: register tiles straight from the padded input, channels-last, compiled
  // per instruction set (conv2d_direct_avx2.cpp, conv2d_direct_avx512.cpp)
  DirectAvx2,
  DirectAvx512,
  // conv2d_winograd.cpp: F(2×2, 3×3), 16 products per block of tiles, run by BLAS GEMMs
  // (Winograd) or by the direct kernels' register tiles as 1×1 convs (WinogradAvx2/Avx512)
  Winograd,
  WinogradAvx2,
  WinogradAvx512,
  // the same with F(4×4, 3×3) (forward and input gradient only)
  Winograd4x4,
  Winograd4x4Avx2,
  Winograd4x4Avx512,
  // conv2d_depthwise.cpp: one filter per channel (groups = C = O), a loop over a pixel's channels
  Depthwise,
};

// The kernel that computes `pass` of a conv with geometry g on tensors of `dtype`, channels-last
// or NCHW, on a CPU with `capability`. Every path and the reason for it is in this one function.
// winograd = false: the kernel Winograd stands in for (a Winograd result with a NaN or ±inf is
// recomputed by it; see the Winograd kernels below). finite_weight = false (the weight holds a NaN
// or ±inf): the input gradient avoids the kernels that correlate the zero-padded δy with the
// rotated kernel (direct, Winograd), where 0·inf = NaN at the padding; torch's col2im, as the GEMM
// kernels', never multiplies the padding.
Conv2dKernel select_conv2d_kernel(Conv2dPass pass, const Conv2dGeometry& g, at::ScalarType dtype,
                                  bool channels_last, CpuCapability capability, bool winograd = true,
                                  bool finite_weight = true);

// Whether every entry of a float32 / float64 tensor is finite (no NaN, no ±inf).
bool all_finite(const at::Tensor& t);

inline bool is_winograd(Conv2dKernel kernel) {
  switch (kernel) {
    case Conv2dKernel::Winograd:
    case Conv2dKernel::WinogradAvx2:
    case Conv2dKernel::WinogradAvx512:
    case Conv2dKernel::Winograd4x4:
    case Conv2dKernel::Winograd4x4Avx2:
    case Conv2dKernel::Winograd4x4Avx512:
      return true;
    default:
      return false;
  }
}

inline bool is_nhwc_gemm(Conv2dKernel kernel) {
  return kernel == Conv2dKernel::NhwcGemm || kernel == Conv2dKernel::NhwcGemmAvx2 ||
         kernel == Conv2dKernel::NhwcGemmAvx512;
}

// The output tile m of a Winograd kernel F(m×m, 3×3): 2 or 4.
inline int64_t winograd_tile(Conv2dKernel kernel) {
  return kernel == Conv2dKernel::Winograd4x4 || kernel == Conv2dKernel::Winograd4x4Avx2 ||
                 kernel == Conv2dKernel::Winograd4x4Avx512
             ? 4
             : 2;
}

// The per-ISA kernels of a Direct*, Winograd*{Avx2,Avx512} or NhwcGemm{Avx2,Avx512} kernel choice (conv2d_direct_isa.h),
// defined in conv2d_direct.cpp.
struct DirectKernels {
  DirectTiling tiling;
  DirectConvSample conv_sample;
  DirectGradWeightSample grad_weight_sample;
};
DirectKernels direct_kernels(Conv2dKernel kernel);

// The (K, C_out) row-major weights regrouped into blocks of `block` output channels (the last one
// narrower when `block` does not divide C_out), block o0 at o0·K, each (K, width) contiguous: the
// layout the direct kernels read (conv2d_direct_isa.h's DirectConv).
at::Tensor pack_weight_blocks(const at::Tensor& wt, int64_t C_out, int64_t block);

// The channels-last GEMM kernels (conv2d_channels_last.cpp). Arguments are already checked;
// x / dy are channels-last, weight any layout; bias may be undefined. The input gradient's
// `kernel` is NhwcGemm (its product δY · W by BLAS) or NhwcGemmAvx2/Avx512 (by the direct tiles, as
// select_conv2d_kernel gives them: float32, one group, the CPU runs that instruction set; K =
// kH·kW·C/G is padded to a multiple of kDirectLanes, except for a pointwise conv, where it must be one).
at::Tensor conv2d_forward_channels_last(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_channels_last(const at::Tensor& dy, const at::Tensor& weight,
                                           const Conv2dGeometry& g,
                                           Conv2dKernel kernel = Conv2dKernel::NhwcGemm);
at::Tensor conv2d_grad_weight_channels_last(const at::Tensor& x, const at::Tensor& dy,
                                            const Conv2dGeometry& g);

// The direct kernels (conv2d_direct.cpp), for the geometries select_conv2d_kernel gives them:
// float32, x / dy channels-last or NCHW (each sample transposed in the cache; the result in x's /
// δy's layout), one group, `kernel` DirectAvx2 or DirectAvx512 (which the CPU
// runs), and for the forward a multiple of kDirectLanes output channels; for the input gradient
// stride 1, padding p ≤ d·(k − 1) and a multiple of kDirectLanes input channels; for the weight
// gradient a multiple of kDirectLanes output channels and at least the tiling's tile_columns
// weight columns K.
at::Tensor conv2d_forward_direct(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias, const Conv2dGeometry& g,
                                 Conv2dKernel kernel);
at::Tensor conv2d_grad_input_direct(const at::Tensor& dy, const at::Tensor& weight,
                                    const Conv2dGeometry& g, Conv2dKernel kernel);
at::Tensor conv2d_grad_weight_direct(const at::Tensor& x, const at::Tensor& dy,
                                     const Conv2dGeometry& g, Conv2dKernel kernel);

// The Winograd F(2×2, 3×3) kernels (conv2d_winograd.cpp), for the geometries select_conv2d_kernel
// gives them: float32, a 3×3 kernel, stride 1, dilation 1, one group, padding ≤ 2 (so that the
// input gradient's padding 2 − p is ≥ 0); x / dy in either layout (read channels-last, the
// result in x's / dy's layout; the weight gradient channels-last, as the other NHWC kernels').
// `kernel` is Winograd (BLAS products) or WinogradAvx2/Avx512 (the direct tiles' products: the
// CPU runs that instruction set, and the product's output channels — O for the forward and the
// weight gradient, C for the input gradient — are a multiple of kDirectLanes; for the weight
// gradient also C ≥ the tiling's tile_columns).
// Each returns an undefined tensor when its result holds a NaN or ±inf: the transforms add and
// subtract inputs, so one inf input gives inf − inf = NaN where the direct sum (and torch) give
// ±inf; the caller then recomputes the result with the direct / GEMM kernel. (A non-finite input
// or weight always leaves a NaN or ±inf in the result, as every product meets it; with finite
// ones only an overflow can, and the recomputation is then right too.)
at::Tensor conv2d_forward_winograd(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias, const Conv2dGeometry& g,
                                   Conv2dKernel kernel);
at::Tensor conv2d_grad_input_winograd(const at::Tensor& dy, const at::Tensor& weight,
                                      const Conv2dGeometry& g, Conv2dKernel kernel);
at::Tensor conv2d_grad_weight_winograd(const at::Tensor& x, const at::Tensor& dy,
                                       const Conv2dGeometry& g, Conv2dKernel kernel);

// The depthwise kernels (conv2d_depthwise.cpp), for groups = C = O (one kH × kW filter per
// channel), float32 / float64, either layout (computed channels-last; the result in x's / δy's
// layout, the weight gradient in x's).
at::Tensor conv2d_forward_depthwise(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_depthwise(const at::Tensor& dy, const at::Tensor& weight,
                                       const Conv2dGeometry& g);
at::Tensor conv2d_grad_weight_depthwise(const at::Tensor& x, const at::Tensor& dy,
                                        const Conv2dGeometry& g);

// MANUALCONV_WINOGRAD=always|always4x4|never forces Winograd on or off wherever it applies (the
// tests run the kernels with it): always with F(2×2, 3×3), always4x4 with F(4×4, 3×3) for the
// forward and the input gradient (the weight gradient F(2×2)); unset, select_conv2d_kernel's
// measured choice holds. Read at every call.
enum class WinogradChoice { Measured, Always, Always4x4, Never };
WinogradChoice winograd_choice();

}  // namespace manualconv
