// manualconv CUDA backend: the Cuda device tag and the kernels' launch helpers.
//
// Same ops, schemas, entry points, checks and output layouts as the CPU kernels: the entry points
// (operators.h) check the arguments (geometry.h) for kKernelDevice and call the kernels
// conv2d_forward(Cuda, ...) etc.; registration.cu binds Operators<Cuda> to the CUDA key.
//
// Conventions (all CUDA kernels, beyond geometry.h's):
//   * the kernels compute on NCHW-contiguous copies of their inputs and return outputs in the
//     layout geometry.h's output_layout gives (a channels-last output is converted at the end);
//   * reductions (window sums, col2im sums) accumulate in at::acc_type (float for half/bf16)
//     and round once; GEMMs go through ATen to cuBLAS;
//   * every output element is written by exactly one thread that sums its contributions in a
//     fixed order (gather, no atomics), so results are bitwise reproducible, except
//     max_pool2d_backward, whose default scatter uses atomicAdd (see pool2d.cu);
//   * index arithmetic is done in int32 when every offset a kernel forms fits, else int64;
//   * each kernel is a grid-stride loop calling a __host__ __device__ functor on every element
//     index t (the functor holds the kernel's arguments), launched by launch_elements below.
//
// Host emulation (tests only): cuda/emulate_on_host.cpp compiles these kernels as C++ with
// -DMANUALCONV_EMULATE_ON_HOST (setup.py, MANUALCONV_EMULATE_CUDA=1): every kernel's loop runs on
// the host, the ops take CPU tensors (registered for the CPU key in place of the CPU kernels),
// and the device guard is a no-op. Such a build runs every kernel's index arithmetic through the
// op tests on a machine without a GPU; the normal builds never define the macro.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#ifdef MANUALCONV_EMULATE_ON_HOST
// compiled as plain C++ (cuda/emulate_on_host.cpp): the CUDA qualifiers mean nothing on the host
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../operators.h"  // geometry.h, the op list and the kernels' declarations

namespace manualconv {
namespace gpu {

// The device the kernels' tensors are on (the CPU in the host-emulation build), for geometry.h's
// checks, and the guard that makes it the current device.
#ifdef MANUALCONV_EMULATE_ON_HOST
constexpr at::DeviceType kKernelDevice = at::kCPU;
using DeviceGuard = at::OptionalDeviceGuard;
#else
constexpr at::DeviceType kKernelDevice = at::kCUDA;
using DeviceGuard = c10::cuda::CUDAGuard;  // makes the tensors' device the current one
#endif

// ---------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements (n > 0).
inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = ceil_div<int64_t>(n, kThreads);
  return static_cast<unsigned int>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

// Whether every offset a kernel forms fits in int32: the kernels divide by sizes in their
// index type, and 32-bit division is several times cheaper than 64-bit on the GPU.
inline bool fits_int32(std::initializer_list<int64_t> extents) {
  for (int64_t e : extents) {
    if (e > std::numeric_limits<int32_t>::max()) return false;
  }
  return true;
}

// Runs op(t) for every t in [0, total): kernel<<<...>>>(total, op) on the current stream (a
// grid-stride loop over t), or a host loop in the emulation build.
template <typename Op>
inline void launch_elements(void (*kernel)(int64_t, Op), int64_t total, const Op& op) {
  if (total <= 0) return;
#ifdef MANUALCONV_EMULATE_ON_HOST
  kernel(total, op);  // the kernel's loop runs on the calling thread (MANUALCONV_FOR_EACH_ELEMENT)
#else
  kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(total, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The body of every kernel: op(t) for each element index t, in a grid-stride loop (in the
// host-emulation build, a plain loop).
#ifdef MANUALCONV_EMULATE_ON_HOST
#define MANUALCONV_FOR_EACH_ELEMENT(total, op) \
  for (int64_t t = 0; t < (total); ++t) {      \
    op(t);                                     \
  }
#else
#define MANUALCONV_FOR_EACH_ELEMENT(total, op)                                    \
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < (total); \
       t += int64_t(blockDim.x) * gridDim.x) {                                    \
    op(t);                                                                        \
  }
#endif

template <typename T>
__host__ __device__ __forceinline__ T min_of(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
__host__ __device__ __forceinline__ T max_of(T a, T b) {
  return a < b ? b : a;
}

// Calls body(index_t{}) with index_t = int32_t when use_int32, else int64_t.
template <typename F>
inline void dispatch_index_type(bool use_int32, const F& body) {
  if (use_int32) {
    body(int32_t{});
  } else {
    body(int64_t{});
  }
}

// The floating types of the CUDA kernels.
#define MANUALCONV_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace gpu

// The CUDA device (operators.h): its tensors' device type and the guard that makes their device
// the current one. Its kernels, conv2d_forward(Cuda, ...) etc., are in conv2d.cu and pool2d.cu.
struct Cuda {
  static constexpr at::DeviceType type = gpu::kKernelDevice;
  using Guard = gpu::DeviceGuard;
};

}  // namespace manualconv
