// Shared by the elementwise kernels (gelu.cpp, relu.cpp): the layout they walk in storage order.
#pragma once

#include <ATen/ATen.h>

namespace manualconv {

// The tensor an elementwise kernel walks: t as it is when dense (non-overlapping, no gaps: its
// storage order is an order of its entries), else a contiguous copy. The output is empty_like it.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// t laid out in the strides of the dense tensor `like` (t itself when it already is: one copy at
// most), so a second operand (δy) is walked in the same order as the first (x or y).
inline at::Tensor in_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  at::Tensor out = at::empty_like(like);
  out.copy_(t);
  return out;
}

}  // namespace manualconv
