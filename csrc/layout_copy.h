// Copies between the NCHW and channels-last layouts of a 4-d tensor, as per-sample transposes
// (layout_copy.cpp: why, and the measurements).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace manualconv {

// dst = src where src is NCHW-contiguous and dst channels-last-contiguous (or the other way
// round), both CPU tensors of one 4-byte dtype and the same sizes; returns false, copying
// nothing, for any other pair (the caller then copies with dst.copy_(src)).
bool copy_between_layouts(const at::Tensor& src, at::Tensor& dst);

// Each of N row-major planes: dst[n] (cols × rows) = src[n] (rows × cols)ᵀ, planes spread over
// threads (the transposes copy_between_layouts runs; also the Winograd kernels' weight layouts).
void transpose_planes(const float* src, float* dst, int64_t N, int64_t rows, int64_t cols);

// dst (cols × rows, row stride ld_dst) = srcᵀ, src (rows × cols, row stride ld_src), on the
// calling thread (the direct kernels' per-sample layout changes, inside their parallel loops).
void transpose_matrix(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols);

}  // namespace manualconv
