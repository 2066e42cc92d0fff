"""The ``cpp`` backend: the compiled kernels in csrc/, registered as ``torch.ops.manualconv.*``.

Importing this module loads the extension (if it was built) and registers a fake kernel for
each operator, so ``torch.compile`` and ``torch.library.opcheck`` can trace them: a fake kernel
runs the op's shape check and returns an empty tensor of the output's size, dtype and layout
(the input's dtype: float16 and bfloat16 included, which the CPU kernels compute in float32).
"""

from __future__ import annotations

import importlib

import torch

from .precision import AUTOCAST_OPERATORS, register_autocast
from .checks import (check_adaptive_pool2d, check_avg_pool2d, check_conv2d, check_grad_output, check_linear_backward,
                     check_pool2d)

try:
    importlib.import_module("manualconv._C")  # loading it runs TORCH_LIBRARY(manualconv, ...)

    LOAD_ERROR = None
except ImportError as error:  # not built: the package falls back to the reference backend
    LOAD_ERROR = error

AVAILABLE = LOAD_ERROR is None


def cpu_capability() -> str:
    """The instruction set the C++ kernels run with: 'avx512', 'avx2' or 'default' (the portable
    GEMM paths; also what a build without the extension reports). The best this CPU supports, or
    the one the environment variable MANUALCONV_CPU_CAPABILITY names (as ATen's
    ATEN_CPU_CAPABILITY); csrc/cpu_capability.cpp."""
    return torch.ops.manualconv.cpu_capability() if AVAILABLE else "default"


def tiles_outrun_blas() -> bool:
    """Whether the direct kernels' register tiles outrun torch's BLAS on this CPU (MKL's AVX2 code
    on an AMD Zen 5, family 0x1A), so that the kernel choice gives them wider layers and NCHW convs;
    MANUALCONV_TILES_OUTRUN_BLAS=1|0 overrides the detection. csrc/cpu_capability.h."""
    return bool(torch.ops.manualconv.tiles_outrun_blas()) if AVAILABLE else False


def output_cache_info() -> dict:
    """The C++ operators' CPU output cache (csrc/output_cache.cpp: their tensors of 1 MiB and more
    reuse freed memory instead of faulting fresh pages in): bytes free and reserved (free and in
    use), hits, misses, and the limit on free bytes (MANUALCONV_CPU_CACHE_MB; 0: off)."""
    if not AVAILABLE:
        return dict(free_bytes=0, reserved_bytes=0, hits=0, misses=0, limit_bytes=0)
    free, reserved, hits, misses, limit = torch.ops.manualconv.output_cache_info()
    return dict(free_bytes=free, reserved_bytes=reserved, hits=hits, misses=misses, limit_bytes=limit)


def empty_cache() -> int:
    """Gives the output cache's free blocks back to the system (as torch.cuda.empty_cache does for
    the GPU); returns how many."""
    return torch.ops.manualconv.output_cache_release() if AVAILABLE else 0


# An unknown or unsupported MANUALCONV_CPU_CAPABILITY is a RuntimeError here, at import (naming the
# variable, its value and what this CPU supports), not at the first conv; so is a
# MANUALCONV_TILES_OUTRUN_BLAS other than 0 or 1, and a MANUALCONV_CPU_CACHE_MB that is not a whole
# number of MiB.
cpu_capability()
tiles_outrun_blas()
output_cache_info()


def _empty(like: torch.Tensor, size, channels_last: bool = False) -> torch.Tensor:
    out = like.new_empty(size)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def is_channels_last(t: torch.Tensor) -> bool:
    """The kernels' layout rule on every device (csrc/geometry.h, ``output_layout``): a 4-D tensor
    that is channels-last (NHWC) and not also NCHW-contiguous gives channels-last outputs from the
    conv and pooling kernels (as torch.nn's)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


if AVAILABLE:

    @torch.library.register_fake("manualconv::conv2d_forward")
    def _(input, weight, bias, stride, padding, dilation, groups):
        size = check_conv2d(input.shape, weight.shape, None if bias is None else bias.shape,
                            stride, padding, dilation, groups)
        return _empty(input, size, is_channels_last(input))

    @torch.library.register_fake("manualconv::conv2d_grad_input")
    def _(grad_output, weight, input_size, stride, padding, dilation, groups):
        out_size = check_conv2d(input_size, weight.shape, None, stride, padding, dilation, groups)
        check_grad_output("conv2d_grad_input", grad_output.shape, out_size)
        return _empty(grad_output, input_size, is_channels_last(grad_output))

    @torch.library.register_fake("manualconv::conv2d_grad_weight")
    def _(input, grad_output, weight_size, stride, padding, dilation, groups):
        out_size = check_conv2d(input.shape, weight_size, None, stride, padding, dilation, groups)
        check_grad_output("conv2d_grad_weight", grad_output.shape, out_size)
        return _empty(input, weight_size, is_channels_last(input))

    @torch.library.register_fake("manualconv::conv2d_grad_bias")
    def _(grad_output):
        torch._check(grad_output.dim() == 4,
                     lambda: f"conv2d_grad_bias: grad_output must be 4-D (N, C, H, W), but got size {list(grad_output.shape)}")
        return grad_output.new_empty(grad_output.shape[1])

    @torch.library.register_fake("manualconv::linear_backward")
    def _(grad_output, input, weight):
        check_linear_backward(grad_output.shape, input.shape, weight.shape)
        return input.new_empty(input.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("manualconv::max_pool2d_forward")
    def _(input, kernel_size, stride, padding, dilation, ceil_mode):
        size = check_pool2d("max_pool2d", input.shape, kernel_size, stride, padding, dilation, ceil_mode)
        layout = is_channels_last(input)
        return _empty(input, size, layout), _empty(input.new_empty((), dtype=torch.int64), size, layout)

    @torch.library.register_fake("manualconv::max_pool2d_backward")
    def _(grad_output, indices, input_size):
        if tuple(indices.shape) != tuple(grad_output.shape):
            raise RuntimeError("max_pool2d_backward: indices must have grad_output's size")
        return _empty(grad_output, input_size, is_channels_last(grad_output) and is_channels_last(indices))

    @torch.library.register_fake("manualconv::avg_pool2d_forward")
    def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        size = check_avg_pool2d(input.shape, kernel_size, stride, padding, ceil_mode, divisor_override)
        return _empty(input, size, is_channels_last(input))

    @torch.library.register_fake("manualconv::avg_pool2d_backward")
    def _(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        out_size = check_avg_pool2d(input_size, kernel_size, stride, padding, ceil_mode, divisor_override)
        check_grad_output("avg_pool2d_backward", grad_output.shape, out_size)
        return _empty(grad_output, input_size, is_channels_last(grad_output))

    @torch.library.register_fake("manualconv::adaptive_max_pool2d_forward")
    def _(input, output_size):
        size = check_adaptive_pool2d("adaptive_max_pool2d", input.shape, output_size)
        layout = is_channels_last(input)
        return _empty(input, size, layout), _empty(input.new_empty((), dtype=torch.int64), size, layout)

    @torch.library.register_fake("manualconv::adaptive_avg_pool2d_forward")
    def _(input, output_size):
        size = check_adaptive_pool2d("adaptive_avg_pool2d", input.shape, output_size)
        return _empty(input, size, is_channels_last(input))

    @torch.library.register_fake("manualconv::adaptive_avg_pool2d_backward")
    def _(grad_output, input_size):
        out_size = check_adaptive_pool2d("adaptive_avg_pool2d", input_size, grad_output.shape[2:])
        check_grad_output("adaptive_avg_pool2d_backward", grad_output.shape, out_size)
        return _empty(grad_output, input_size, is_channels_last(grad_output))

    @torch.library.register_fake("manualconv::layout_copy")
    def _(input, channels_last):
        torch._check(not channels_last or input.dim() == 4,
                     lambda: f"layout_copy: channels_last needs a 4-d input, got {input.dim()} dimensions")
        return input.new_empty(input.shape).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    # a copy: its gradient is δ itself (in whatever layout it comes)
    torch.library.register_autograd("manualconv::layout_copy", lambda ctx, grad: (grad, None))


if AVAILABLE:
    # torch.autocast: the conv operators cast their inputs to the autocast dtype (bfloat16 on CPU,
    # float16 on CUDA by default) as torch.nn's conv does; the pooling operators fall through
    # (run in their input's dtype), as torch's pools do. Policy: precision.py.
    _autocast_library = torch.library.Library("manualconv", "IMPL")
    for _name in AUTOCAST_OPERATORS:
        for _device_type in ("cpu", "cuda"):
            register_autocast(_autocast_library, _name, _device_type)

if AVAILABLE and hasattr(torch.ops.manualconv, "batch_norm_apply"):  # fake kernels of csrc/batch_norm.cpp, csrc/layer_norm.cpp
    from . import ops_norm  # noqa: E402,F401

if AVAILABLE and hasattr(torch.ops.manualconv, "gelu_forward"):  # fake kernels of csrc/gelu.cpp, relu.cpp, activations.cpp
    from . import ops_activation  # noqa: E402,F401
