// conv2d's geometry and shape check, shared by the NCHW kernels (conv2d.cpp) and the
// channels-last ones (conv2d_channels_last.cpp).
#pragma once

#include "manualconv.h"

#include <vector>

namespace manualconv {

// Every size a conv2d kernel needs, validated once by check_conv2d.
struct Conv2dGeometry {
  int64_t N, C, H, W;       // input (N, C, H, W)
  int64_t O, kH, kW;        // weight (O, C/groups, kH, kW)
  int64_t sH, sW, pH, pW, dH, dW, groups;
  int64_t H_out, W_out;
  // valid_i[a] / valid_j[b]: the output rows i / columns j whose kernel row a / column b reads
  // inside the image (input row i·sH − pH + a·dH, column j·sW − pW + b·dW); the others read
  // the zero padding. Precomputed once: im2col and col2im need them for every (sample, c, a, b).
  std::vector<Range> valid_i, valid_j;

  int64_t C_g() const { return C / groups; }             // input channels per group
  int64_t O_g() const { return O / groups; }             // output channels per group
  int64_t K() const { return C_g() * kH * kW; }          // rows of im2col(x[g])
  int64_t L() const { return H_out * W_out; }            // columns of im2col(x[g])
  // A 1×1 kernel with stride 1 and no padding reads each pixel once, in order:
  // im2col(x[g]) is x[g] itself, viewed as a (C/G) × (H·W) matrix.
  bool is_pointwise() const {
    return kH == 1 && kW == 1 && sH == 1 && sW == 1 && pH == 0 && pW == 0;
  }
  std::vector<int64_t> output_size() const { return {N, O, H_out, W_out}; }
};

// The one shape check for conv2d, shared by the forward and both backward kernels.
// input_name / weight_name say where the shapes came from (a tensor or a size list).
Conv2dGeometry check_conv2d(const char* op, at::IntArrayRef input_size, const char* input_name,
                            at::IntArrayRef weight_size, const char* weight_name,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups);

// The channels-last kernels (conv2d_channels_last.cpp). Arguments are already checked; x / dy are
// channels-last, weight any layout; bias may be undefined.
at::Tensor conv2d_forward_channels_last(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_channels_last(const at::Tensor& dy, const at::Tensor& weight,
                                           const Conv2dGeometry& g);
at::Tensor conv2d_grad_weight_channels_last(const at::Tensor& x, const at::Tensor& dy,
                                            const Conv2dGeometry& g);

// Direct channels-last float32 kernels (conv2d_direct.cpp), used by the channels-last kernels
// where they apply: float32, one group, a CPU with AVX2 + FMA, and for the forward a multiple
// of 8 up to 64 output channels; for the input gradient stride 1 and a multiple of 8 up to 64
// input channels; for the weight gradient 8 or 16 output channels.
bool conv2d_direct_forward_applies(const Conv2dGeometry& g, at::ScalarType dtype);
bool conv2d_direct_grad_input_applies(const Conv2dGeometry& g, at::ScalarType dtype);
at::Tensor conv2d_forward_direct(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias, const Conv2dGeometry& g);
at::Tensor conv2d_grad_input_direct(const at::Tensor& dy, const at::Tensor& weight,
                                    const Conv2dGeometry& g);
bool conv2d_direct_grad_weight_applies(const Conv2dGeometry& g, at::ScalarType dtype);
at::Tensor conv2d_grad_weight_direct(const at::Tensor& x, const at::Tensor& dy,
                                     const Conv2dGeometry& g);

}  // namespace manualconv
