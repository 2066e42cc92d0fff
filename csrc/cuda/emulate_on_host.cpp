// The host-emulation build of the CUDA kernels (tests only; setup.py builds it with
// MANUALCONV_EMULATE_CUDA=1, which also defines MANUALCONV_EMULATE_ON_HOST): the kernels of
// conv2d.cu and pool2d.cu compiled as C++ and bound to the CPU key, so the op tests run their
// index arithmetic on a machine without a GPU. Never part of a normal build (setup.py compiles
// csrc/*.cpp, and csrc/cuda/*.cu only with nvcc).

#include "conv2d.cu"
#include "pool2d.cu"
#include "registration.cu"
