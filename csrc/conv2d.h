// conv2d's CPU kernels: which one runs for a call (select_conv2d_kernel, defined in conv2d.cpp), and
// the kernels conv2d.cpp's entry points hand their tensors to. Geometry and checks: geometry.h.
#pragma once

#include "manualconv.h"

namespace manualconv {

// The three products of a conv layer (the kernels of each pass are separate functions).
enum class Conv2dPass { Forward, GradInput, GradWeight };

// The conv2d kernels of the CPU.
enum class Conv2dKernel {
  NchwGemm,  // conv2d.cpp: im2col + GEMM per sample and group, NCHW
  NhwcGemm,  // conv2d_channels_last.cpp: im2col + GEMM per block of samples, channels-last
  Direct,    // conv2d_direct.cpp: register tiles straight from the padded input, channels-last
  Winograd,  // conv2d_winograd.cpp: F(2×2, 3×3), 16 GEMMs per block of tiles
};

// The instruction sets a kernel can be compiled for, in increasing order.
enum class CpuCapability { Default, Avx2 };

// What this CPU supports, detected once (conv2d_direct.cpp).
CpuCapability cpu_capability();

// The kernel that computes `pass` of a conv with geometry g on tensors of `dtype`, channels-last
// or NCHW, on a CPU with `capability`. Every path and the reason for it is in this one function.
Conv2dKernel select_conv2d_kernel(Conv2dPass pass, const Conv2dGeometry& g, at::ScalarType dtype,
                                  bool channels_last, CpuCapability capability);

// The direct kernels' register tile (AVX2: 16 registers of 8 floats). A forward / input-gradient
// tile is kDirectTilePixels output pixels × one or two vectors of output channels; a
// weight-gradient tile is one or two vectors of output channels × kDirectTileColumns weight
// columns (a, b, c). Both hold 12 accumulators, in registers named for these sizes.
constexpr int64_t kDirectLanes = 8;                         // floats per AVX register
constexpr int64_t kDirectBlockChannels = 2 * kDirectLanes;  // output channels of a full tile
constexpr int64_t kDirectTilePixels = 6;
constexpr int64_t kDirectTileColumns = 6;

// The channels-last GEMM kernels (conv2d_channels_last.cpp). Arguments are already checked;
// x / dy are channels-last, weight any layout; bias may be undefined.
at::Tensor conv2d_forward_channels_last(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_channels_last(const at::Tensor& dy, const at::Tensor& weight,
                                           const Conv2dGeometry& g);
at::Tensor conv2d_grad_weight_channels_last(const at::Tensor& x, const at::Tensor& dy,
                                            const Conv2dGeometry& g);

// The direct kernels (conv2d_direct.cpp), for the geometries select_conv2d_kernel gives them:
// float32, channels-last x / dy, one group, an AVX2 + FMA CPU, and for the forward a multiple of
// kDirectLanes output channels; for the input gradient stride 1, padding p ≤ d·(k − 1) and a
// multiple of kDirectLanes input channels; for the weight gradient a multiple of kDirectLanes
// output channels and at least kDirectTileColumns weight columns K.
at::Tensor conv2d_forward_direct(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_direct(const at::Tensor& dy, const at::Tensor& weight,
                                    const Conv2dGeometry& g);
at::Tensor conv2d_grad_weight_direct(const at::Tensor& x, const at::Tensor& dy,
                                     const Conv2dGeometry& g);

// The Winograd F(2×2, 3×3) kernels (conv2d_winograd.cpp), for the geometries select_conv2d_kernel
// gives them: float32, a 3×3 kernel, stride 1, dilation 1, one group, padding ≤ 2 (so that the
// input gradient's padding 2 − p is ≥ 0); x / dy in either layout (read channels-last, the
// result in x's / dy's layout).
at::Tensor conv2d_forward_winograd(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_winograd(const at::Tensor& dy, const at::Tensor& weight,
                                      const Conv2dGeometry& g);

// MANUALCONV_WINOGRAD=always|never forces Winograd on or off wherever it applies (the tests run
// the kernel with it); unset, select_conv2d_kernel's measured choice holds. Read at every call.
enum class WinogradChoice { Measured, Always, Never };
WinogradChoice winograd_choice();

}  // namespace manualconv
