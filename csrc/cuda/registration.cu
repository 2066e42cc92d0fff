// CUDA kernels of the torch.ops.manualconv.* operators. The schemas (and the CPU kernels) are
// registered in registration.cpp, which is part of the same library; this file adds the CUDA
// dispatch key, so each op runs on the device of its tensor arguments (the entry points,
// operators.h, are the CPU's; the kernels they call are cuda/*.cu's).

#include <torch/library.h>

#include "common.cuh"

#ifdef MANUALCONV_EMULATE_ON_HOST
#define MANUALCONV_CUDA_KEY CPU  // the host-emulation build: the CUDA kernels serve CPU tensors
#else
#define MANUALCONV_CUDA_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(manualconv, MANUALCONV_CUDA_KEY, m) {
#define MANUALCONV_REGISTER_CUDA(name) \
  m.impl(#name, TORCH_FN(manualconv::Operators<manualconv::Cuda>::name));
  MANUALCONV_OPS(MANUALCONV_REGISTER_CUDA)
#undef MANUALCONV_REGISTER_CUDA
}
