// CUDA kernels of the torch.ops.manualconv.* operators. The schemas (and the CPU kernels) are
// registered in registration.cpp, which is part of the same library; this file adds the CUDA
// dispatch key, so each op runs on the device of its tensor arguments.

#include <torch/library.h>

#include "common.cuh"

TORCH_LIBRARY_IMPL(manualconv, CUDA, m) {
  m.impl("conv2d_forward", &manualconv::conv2d_forward_cuda);
  m.impl("conv2d_grad_input", &manualconv::conv2d_grad_input_cuda);
  m.impl("conv2d_grad_weight", &manualconv::conv2d_grad_weight_cuda);
  m.impl("max_pool2d_forward", &manualconv::max_pool2d_forward_cuda);
  m.impl("max_pool2d_backward", &manualconv::max_pool2d_backward_cuda);
  m.impl("avg_pool2d_forward", &manualconv::avg_pool2d_forward_cuda);
  m.impl("avg_pool2d_backward", &manualconv::avg_pool2d_backward_cuda);
  m.impl("adaptive_max_pool2d_forward", &manualconv::adaptive_max_pool2d_forward_cuda);
  m.impl("adaptive_avg_pool2d_forward", &manualconv::adaptive_avg_pool2d_forward_cuda);
  m.impl("adaptive_avg_pool2d_backward", &manualconv::adaptive_avg_pool2d_backward_cuda);
}
