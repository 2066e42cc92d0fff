// Operator schemas (torch.ops.manualconv.*) and their CPU kernels.
//
// The schemas are the contract with the Python side (manualconv/): all tensors are 4-D NCHW,
// padding is symmetric, input_size is (N, C, H, W), weight_size is (O, C/groups, kH, kW).

#include <Python.h>

#include <torch/library.h>

#include "manualconv.h"

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

TORCH_LIBRARY_IMPL(manualconv, CPU, m) {
  m.impl("conv2d_forward", &manualconv::conv2d_forward);
  m.impl("conv2d_grad_input", &manualconv::conv2d_grad_input);
  m.impl("conv2d_grad_weight", &manualconv::conv2d_grad_weight);
  m.impl("max_pool2d_forward", &manualconv::max_pool2d_forward);
  m.impl("max_pool2d_backward", &manualconv::max_pool2d_backward);
  m.impl("avg_pool2d_forward", &manualconv::avg_pool2d_forward);
  m.impl("avg_pool2d_backward", &manualconv::avg_pool2d_backward);
  m.impl("adaptive_max_pool2d_forward", &manualconv::adaptive_max_pool2d_forward);
  m.impl("adaptive_avg_pool2d_forward", &manualconv::adaptive_avg_pool2d_forward);
  m.impl("adaptive_avg_pool2d_backward", &manualconv::adaptive_avg_pool2d_backward);
}

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
