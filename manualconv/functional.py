"""``torch.nn.functional``'s conv2d, max_pool2d and avg_pool2d, with hand-derived backward.

Same signatures, defaults and semantics as torch's: unbatched (C, H, W) input, int or pair
arguments, ``padding='same'``/``'valid'``, ``ceil_mode``, ``return_indices``,
``count_include_pad``, ``divisor_override``. Arguments are validated here (one check per op,
in checks.py) before any kernel runs, so mistakes raise the exception torch would.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .autograd import AvgPool2dFunction, Conv2dFunction, MaxPool2dFunction
from .backend import get_backend
from .checks import check_avg_pool2d, check_conv2d, check_pool2d, pair

__all__ = ["conv2d", "max_pool2d", "avg_pool2d"]

IntOrPair = Union[int, Tuple[int, int]]


def _check_tensor(op: str, name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    """``name`` must be a floating-point tensor of input's dtype on input's device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, but got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise RuntimeError(f"{op}: {name} must be a floating-point tensor, but got dtype {tensor.dtype}")
    if tensor.dtype != input.dtype:
        raise RuntimeError(
            f"{op}: input type ({input.dtype}) and {name} type ({tensor.dtype}) should be the same"
        )
    if tensor.device != input.device:
        raise RuntimeError(
            f"{op}: input and {name} must be on the same device, but got input on {input.device} "
            f"and {name} on {tensor.device}"
        )


def _batched(op: str, input: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(C, H, W) input becomes a batch of one; returns (4-D input, was_unbatched)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, but got {type(input).__name__}")
    if input.dim() == 3:
        return input.unsqueeze(0), True
    return input, False


def _same_padding(input: torch.Tensor, kernel, dilation) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """'same': total padding d·(k−1) per dim, split evenly; an odd extra row/column goes at the
    bottom/right (padded into the input), as torch does."""
    symmetric, extra = [], []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        symmetric.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, (symmetric[0], symmetric[1])


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[str, IntOrPair] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D cross-correlation y = x ⋆ W + b with the hand-derived backward (see Conv2dFunction)."""
    op = "conv2d"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, but got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise RuntimeError(
            "Expected 3D (unbatched) or 4D (batched) input to conv2d, "
            f"but got input of size: {list(input.shape)}"
        )
    _check_tensor(op, "input", input, input)
    _check_tensor(op, "weight", weight, input)
    if bias is not None:
        _check_tensor(op, "bias", bias, input)
    x, unbatched = _batched(op, input)
    stride, dilation = pair(stride, "stride", op), pair(dilation, "dilation", op)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise RuntimeError("conv2d: padding='same' is not supported for strided convolutions")
            if weight.dim() == 4:
                x, padding = _same_padding(x, weight.shape[2:], dilation)
        else:
            raise RuntimeError(f"conv2d: Invalid padding string: {padding!r} (expected 'valid' or 'same')")
    else:
        padding = pair(padding, "padding", op)
    check_conv2d(x.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation, groups)
    y = Conv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, get_backend())
    return y.squeeze(0) if unbatched else y


def _pool_args(op: str, kernel_size, stride, padding):
    kernel = pair(kernel_size, "kernel_size", op)
    # stride=None (or an empty list, as torch accepts) means stride = kernel_size
    step = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else pair(stride, "stride", op)
    return kernel, step, pair(padding, "padding", op)


def _pool_input(op: str, input: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    x, unbatched = _batched(op, input)
    if not x.is_floating_point():
        raise RuntimeError(f"{op}: input must be a floating-point tensor, but got dtype {x.dtype}")
    return x, unbatched


def max_pool2d(
    input: torch.Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """Max pooling; backward routes each delta to the argmax recorded in forward."""
    op = "max_pool2d"
    x, unbatched = _pool_input(op, input)
    kernel, step, pad = _pool_args(op, kernel_size, stride, padding)
    dil = pair(dilation, "dilation", op)
    check_pool2d(op, x.shape, kernel, step, pad, dil, bool(ceil_mode))
    y, indices = MaxPool2dFunction.apply(x, kernel, step, pad, dil, bool(ceil_mode), get_backend())
    if unbatched:
        y, indices = y.squeeze(0), indices.squeeze(0)
    return (y, indices) if return_indices else y


def avg_pool2d(
    input: torch.Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> torch.Tensor:
    """Average pooling; backward spreads each delta evenly over its window."""
    op = "avg_pool2d"
    x, unbatched = _pool_input(op, input)
    kernel, step, pad = _pool_args(op, kernel_size, stride, padding)
    divisor = None if divisor_override is None else int(divisor_override)
    check_avg_pool2d(x.shape, kernel, step, pad, bool(ceil_mode), divisor)
    y = AvgPool2dFunction.apply(x, kernel, step, pad, bool(ceil_mode), bool(count_include_pad), divisor, get_backend())
    return y.squeeze(0) if unbatched else y
