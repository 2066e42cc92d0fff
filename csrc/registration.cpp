// Operator schemas (torch.ops.manualconv.*) and their CPU kernels (the CUDA ones: cuda/registration.cu).
//
// The schemas are the contract with the Python side (manualconv/): all tensors are 4-D, (N, C, H, W)
// in shape (NCHW or channels-last in memory: see geometry.h's output_layout), padding is symmetric,
// input_size is (N, C, H, W), weight_size is (O, C/groups, kH, kW).

#include <Python.h>

#include <torch/library.h>

#include "low_precision.h"
#include "operators.h"

TORCH_LIBRARY(manualconv, m) {
  m.def(
      "conv2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_grad_input(Tensor grad_output, Tensor weight, int[4] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_grad_weight(Tensor input, Tensor grad_output, int[4] weight_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_output, Tensor indices, int[4] input_size) -> Tensor");
  m.def(
      "avg_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def(
      "avg_pool2d_backward(Tensor grad_output, int[4] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
      "int? divisor_override) -> Tensor");
  m.def("adaptive_max_pool2d_forward(Tensor input, int[2] output_size) -> (Tensor, Tensor)");
  m.def("adaptive_avg_pool2d_forward(Tensor input, int[2] output_size) -> Tensor");
  m.def("adaptive_avg_pool2d_backward(Tensor grad_output, int[4] input_size) -> Tensor");
}

#ifndef MANUALCONV_EMULATE_ON_HOST  // (that build binds the CUDA kernels to the CPU key instead)
TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
#define MANUALCONV_REGISTER_CPU(name) \
  m.impl(#name, TORCH_FN(manualconv::InFloat32<&manualconv::Operators<manualconv::Cpu>::name>::call));
  MANUALCONV_OPS(MANUALCONV_REGISTER_CPU)
#undef MANUALCONV_REGISTER_CPU
}
#endif

// `import manualconv._C` loads this library, which runs the registrations above.
// The module itself has no methods: everything is reached through torch.ops.manualconv.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module);
}
