"""Mixed precision: bfloat16 / float16 with float32 accumulation, and torch.autocast.

Two rules, one place:

- Low-precision compute (``in_float32``): a kernel given bfloat16 or float16 tensors upcasts them
  to float32 (exact), computes every sum in float32 and rounds each result once to the input
  dtype, as torch's own CPU kernels do. The reference kernels use it; the C++ kernels do the same
  in csrc/.
- Autocast policy (``AUTOCAST_POLICY``, ``autocast_inputs``): under ``torch.autocast`` each
  manualconv op casts its inputs as autocast casts torch.nn's op of the same name (torch's lists
  in aten/src/ATen/autocast_mode.cpp): convolutions and linear run in the autocast dtype
  (bfloat16 on CPU, float16 on CUDA by default), the loss runs in float32, pooling and the
  activations run in their input's dtype. The cast happens in ``manualconv.functional``, before
  the autograd Function, so autograd records it (its backward casts the gradient back) and
  both backends see the same dtypes; the C++ operators also get autocast kernels of their own
  (``register_autocast``), so calling ``torch.ops.manualconv.*`` directly under autocast casts
  the same way.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)

# autocast's policy per device and op, as torch's lists have it: "lower" = cast floating inputs
# to the autocast dtype, "float32" = cast them to float32; an op not listed runs in its input's
# dtype (torch's fall-through ops: pooling, activations, batch norm; on CPU also layer/group norm
# and softmax). Norm entries are for manualconv's norm layers where they exist.
_LOWER = {"conv2d": "lower", "conv1d": "lower", "conv_transpose2d": "lower", "linear": "lower"}
AUTOCAST_POLICY = {
    "cpu": {**_LOWER, "cross_entropy": "float32"},
    "cuda": {**_LOWER, "cross_entropy": "float32", "layer_norm": "float32", "group_norm": "float32",
             "softmax": "float32", "log_softmax": "float32"},
}
# the C++ operators that implement a "lower" op (the rest, pooling, fall through)
AUTOCAST_OPERATORS = ("conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight")


def _low_precision_dtype(args) -> Optional[torch.dtype]:
    """The dtype of the first floating-point tensor argument when it is bfloat16 or float16."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            return arg.dtype if arg.dtype in LOW_PRECISION else None
    return None


def _round_to(result, dtype: torch.dtype):
    """Each floating-point tensor of a kernel's result rounded (once) to dtype; indices unchanged."""
    if isinstance(result, tuple):
        return tuple(_round_to(r, dtype) for r in result)
    return result.to(dtype) if isinstance(result, torch.Tensor) and result.is_floating_point() else result


def _device_type(args) -> str:
    return next(a.device.type for a in args if isinstance(a, torch.Tensor))


def _autocast_off(device_type: str):
    """A context with autocast disabled for device_type (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def in_float32(kernel: Callable) -> Callable:
    """A kernel that, given bfloat16/float16 tensors, computes in float32 (with autocast off, so
    no matmul inside drops back to low precision) and rounds its results once to that dtype;
    float32 and float64 calls run the kernel unchanged."""

    @functools.wraps(kernel)
    def low_precision_kernel(*args):
        dtype = _low_precision_dtype(args)
        if dtype is None:
            return kernel(*args)
        wide = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with _autocast_off(_device_type(args)):
            return _round_to(kernel(*wide), dtype)

    return low_precision_kernel


def _autocast_target(policy: str, device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32


def _cast_eligible(value, device_type: str, dtype: torch.dtype):
    """autocast's cast rule: floating-point tensors on the autocast device, except float64."""
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == device_type):
        return value.to(dtype)
    return value


def autocast_inputs(op: str, *tensors):
    """``tensors`` as torch.autocast hands them to torch.nn's ``op`` (the first one's device
    decides which autocast applies); unchanged outside autocast and for fall-through ops."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    device_type = None if first is None else first.device.type
    policy = AUTOCAST_POLICY.get(device_type, {}).get(op)
    if policy is None or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = _autocast_target(policy, device_type)
    return tuple(_cast_eligible(t, device_type, dtype) for t in tensors)


def register_autocast(library: torch.library.Library, name: str, device_type: str) -> None:
    """An autocast kernel for operator ``name`` on ``device_type``: cast eligible inputs to the
    autocast dtype in force (torch.get_autocast_dtype, as torch.nn's conv does; the defaults are
    bfloat16 on CPU and float16 on CUDA), then run the operator with autocast off.
    (torch.library.register_autocast does the same with a fixed dtype.)"""
    op = getattr(torch.ops.manualconv, name).default
    key = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device_type]

    def autocast_kernel(_keyset, *args):
        dtype = _autocast_target("lower", device_type)
        cast = [_cast_eligible(a, device_type, dtype) for a in args]
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    library.impl(name, autocast_kernel, key, with_keyset=True)
