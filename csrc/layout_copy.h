// Copies between the NCHW and channels-last layouts of a 4-d tensor, as per-sample transposes
// (layout_copy.cpp: why, and the measurements).
#pragma once

#include <ATen/ATen.h>

namespace manualconv {

// dst = src where src is NCHW-contiguous and dst channels-last-contiguous (or the other way
// round), both CPU tensors of one 4-byte dtype and the same sizes; returns false, copying
// nothing, for any other pair (the caller then copies with dst.copy_(src)).
bool copy_between_layouts(const at::Tensor& src, at::Tensor& dst);

}  // namespace manualconv
