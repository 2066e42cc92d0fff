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

from .autograd import (
    AdaptiveAvgPool2dFunction,
    AdaptiveMaxPool2dFunction,
    AvgPool2dFunction,
    BiasFunction,
    Conv2dFunction,
    Conv2dGradInputFunction,
    CrossEntropyFunction,
    LinearFunction,
    MaxPool2dFunction,
    ReLUFunction,
    SigmoidFunction,
    Subsampling2dFunction,
    TanhFunction,
)
from .backend import get_backend
from .checks import (
    check_adaptive_pool2d,
    check_avg_pool2d,
    check_conv,
    check_conv2d,
    check_conv_transpose2d,
    check_pool2d,
    pair,
)

__all__ = [
    "conv2d", "max_pool2d", "avg_pool2d", "conv1d", "conv_transpose2d", "adaptive_max_pool2d",
    "adaptive_avg_pool2d", "linear", "relu", "sigmoid", "tanh", "cross_entropy", "subsampling2d",
]

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


def _check_conv_tensors(op: str, input, weight, bias, spatial_dims: int) -> None:
    """Input of rank spatial_dims + 1 (unbatched) or + 2, and weight/bias of its dtype and device."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, but got {type(input).__name__}")
    if input.dim() not in (spatial_dims + 1, spatial_dims + 2):
        raise RuntimeError(
            f"Expected {spatial_dims + 1}D (unbatched) or {spatial_dims + 2}D (batched) input to {op}, "
            f"but got input of size: {list(input.shape)}"
        )
    _check_tensor(op, "input", input, input)
    _check_tensor(op, "weight", weight, input)
    if bias is not None:
        _check_tensor(op, "bias", bias, input)


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
    _check_conv_tensors(op, input, weight, bias, 2)
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


def conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Tuple[int]] = 1,
    padding: Union[str, int, Tuple[int]] = 0,
    dilation: Union[int, Tuple[int]] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """1-D cross-correlation y[n,o,i] = Σ_{c,a} W[o,c,a]·x[n,c,i·s+a·d] + b[o]: a conv2d whose
    height is 1, so it shares conv2d's kernels and hand-derived backward."""
    op = "conv1d"
    _check_conv_tensors(op, input, weight, bias, 1)
    (s,), (d,) = _single(stride, "stride", op), _single(dilation, "dilation", op)
    x = input if input.dim() == 3 else input.unsqueeze(0)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise RuntimeError(f"conv1d: Invalid padding string: {padding!r} (expected 'valid' or 'same')")
        if padding == "same" and s != 1:
            raise RuntimeError("conv1d: padding='same' is not supported for strided convolutions")
        p = padding
        checked_padding = (0,) if padding == "valid" or weight.dim() != 3 else ((d * (weight.shape[-1] - 1)) // 2,)
    else:
        (p,) = _single(padding, "padding", op)
        checked_padding = (p,)
    check_conv(op, x.shape, weight.shape, None if bias is None else bias.shape, (s,), checked_padding, (d,), groups)
    y = conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, s), p if isinstance(p, str) else (0, p), (1, d), groups)
    y = y.squeeze(2)
    return y if input.dim() == 3 else y.squeeze(0)


def _single(value, name: str, op: str) -> Tuple[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise RuntimeError(f"{op}: {name} must be a single int, but got {name}={list(value)}")
        return (int(value[0]),)
    return (int(value),)


def conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    output_padding: IntOrPair = 0,
    groups: int = 1,
    dilation: IntOrPair = 1,
) -> torch.Tensor:
    """Transposed convolution: exactly conv2d's grad-input computation (the "full" correlation of
    the stride-dilated x with the rotated kernel), so it reuses that kernel and autograd Function;
    its backward is conv2d's forward (for x) and weight correlation (for W)."""
    op = "conv_transpose2d"
    _check_conv_tensors(op, input, weight, bias, 2)
    x, unbatched = _batched(op, input)
    stride, padding = pair(stride, "stride", op), pair(padding, "padding", op)
    output_padding, dilation = pair(output_padding, "output_padding", op), pair(dilation, "dilation", op)
    out_size = check_conv_transpose2d(x.shape, weight.shape, None if bias is None else bias.shape,
                                      stride, padding, output_padding, dilation, groups)
    # output_padding ≥ stride (allowed when < dilation) adds output rows that no δ entry reaches:
    # give x that many zero rows at the bottom/right, so the conv of the output has x's size
    extra = [o // s for o, s in zip(output_padding, stride)]
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    y = Conv2dGradInputFunction.apply(x, weight, out_size, stride, padding, dilation, groups, get_backend())
    if bias is not None:
        y = BiasFunction.apply(y, bias)
    return y.squeeze(0) if unbatched else y


def _output_size_pair(output_size, input: torch.Tensor, op: str) -> Tuple[int, int]:
    """int, pair, or pair with None entries (None keeps the input's size)."""
    if isinstance(output_size, (list, tuple)):
        if len(output_size) != 2:
            raise RuntimeError(f"{op}: output_size must be an int or a pair, but got {list(output_size)}")
        return tuple(input.shape[-2 + i] if o is None else int(o) for i, o in enumerate(output_size))
    if output_size is None:
        return (input.shape[-2], input.shape[-1])
    return (int(output_size), int(output_size))


def adaptive_max_pool2d(input: torch.Tensor, output_size, return_indices: bool = False):
    """Max over torch's adaptive windows [⌊iH/H_out⌋, ⌈(i+1)H/H_out⌉); backward routes δ to the argmax."""
    op = "adaptive_max_pool2d"
    x, unbatched = _pool_input(op, input)
    size = _output_size_pair(output_size, x, op)
    check_adaptive_pool2d(op, x.shape, size)
    y, indices = AdaptiveMaxPool2dFunction.apply(x, size, get_backend())
    if unbatched:
        y, indices = y.squeeze(0), indices.squeeze(0)
    return (y, indices) if return_indices else y


def adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """Mean over torch's adaptive windows; backward spreads δ / area evenly over each window."""
    op = "adaptive_avg_pool2d"
    x, unbatched = _pool_input(op, input)
    size = _output_size_pair(output_size, x, op)
    check_adaptive_pool2d(op, x.shape, size)
    y = AdaptiveAvgPool2dFunction.apply(x, size, get_backend())
    return y.squeeze(0) if unbatched else y


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fully connected layer z = W·x + b with δx = Wᵀδ, ∂J/∂W = δxᵀ, ∂J/∂b = δ."""
    op = "linear"
    _check_tensor(op, "input", input, input)
    _check_tensor(op, "weight", weight, input)
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be 2-D (out_features, in_features), but got size {list(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"{op}: input's last dimension must equal in_features={weight.shape[1]}, but got input of size {list(input.shape)}"
        )
    if bias is not None:
        _check_tensor(op, "bias", bias, input)
        if tuple(bias.shape) != (weight.shape[0],):
            raise RuntimeError(f"{op}: bias must have size [{weight.shape[0]}], but got {list(bias.shape)}")
    return LinearFunction.apply(input, weight, bias)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """max(z, 0) with δz = δ ⊙ 1[z > 0]. (``inplace`` is accepted for compatibility; the result
    is always a new tensor.)"""
    _check_tensor("relu", "input", input, input)
    return ReLUFunction.apply(input)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e⁻ᶻ) with δz = δ ⊙ y(1 − y)."""
    _check_tensor("sigmoid", "input", input, input)
    return SigmoidFunction.apply(input)


def tanh(input: torch.Tensor, amplitude: float = 1.0, slope: float = 1.0) -> torch.Tensor:
    """A·tanh(S·z) with δz = δ ⊙ S·(A − y²/A); A = S = 1 is torch.tanh."""
    _check_tensor("tanh", "input", input, input)
    return TanhFunction.apply(input, float(amplitude), float(slope))


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """torch's cross_entropy (class-index or class-probability targets, weight, ignore_index,
    reduction, label_smoothing) with the derived delta ∂J/∂z = softmax(z) − onehot(y),
    generalised to weighted, smoothed targets: ∂J/∂z_i = s_i·softmax(z_i) − r_i."""
    op = "cross_entropy"
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    _check_tensor(op, "input", input, input)
    if input.dim() == 0:
        raise RuntimeError(f"{op}: input must have at least 1 dimension (classes), but got a scalar")
    classes_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[classes_dim]
    if weight is not None:
        _check_tensor(op, "weight", weight, input)
        if tuple(weight.shape) != (classes,):
            raise RuntimeError(
                f"weight tensor should be defined either for all {classes} classes or no classes but got "
                f"weight tensor of shape: {list(weight.shape)}"
            )
    # logits as rows (M, C): move the class dim last, flatten the batch and any extra dims
    logits = input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1)
    logits = logits.reshape(-1, classes)
    w = input.new_ones(classes) if weight is None else weight
    if target.is_floating_point():  # class probabilities, same shape as input
        if target.shape != input.shape:
            raise RuntimeError(
                f"{op}: probability targets must have the input's size {list(input.shape)}, got {list(target.shape)}"
            )
        q = (target.unsqueeze(0) if target.dim() == 1 else target.movedim(1, -1)).reshape(-1, classes)
        rows = w * ((1 - label_smoothing) * q + label_smoothing / classes)
        divisor = float(logits.shape[0])
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(f"expected target dtype to be Long or Byte, but got {target.dtype}")
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() > 1 else ()
        if tuple(target.shape) != expected:
            if input.dim() > 1 and (target.dim() == 0 or target.shape[0] != input.shape[0]):
                raise ValueError(
                    f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                    f"({target.shape[0] if target.dim() else 0})."
                )
            raise RuntimeError(f"{op}: target must have size {list(expected)}, but got {list(target.shape)}")
        labels = target.reshape(-1).long()
        kept = labels != ignore_index
        bad = kept & ((labels < 0) | (labels >= classes))
        if bool(bad.any()):
            raise IndexError(f"Target {int(labels[bad][0])} is out of bounds.")
        safe = labels.masked_fill(~kept, 0)
        onehot = torch.zeros_like(logits).scatter(1, safe.unsqueeze(1), 1.0)
        rows = (1 - label_smoothing) * onehot * w + (label_smoothing / classes) * w
        rows = rows * kept.unsqueeze(1).to(rows.dtype)  # ignored samples carry no target: J_i = 0, δ_i = 0
        divisor = (w[safe] * kept.to(w.dtype)).sum()
    loss = CrossEntropyFunction.apply(logits, rows, reduction, divisor)
    if reduction == "none":
        return loss.reshape(input.shape[:1] + input.shape[2:]) if input.dim() > 1 else loss.reshape(())
    return loss


def subsampling2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: int) -> torch.Tensor:
    """LeNet-5's trainable subsampling: y_j = β_j·down(x_j) + b_j, down = sums of n×n blocks."""
    op = "subsampling2d"
    x, unbatched = _pool_input(op, input)
    _check_tensor(op, "weight", weight, x)
    n = pair(kernel_size, "kernel_size", op)
    if x.dim() != 4:
        raise RuntimeError(f"{op}: expected a 3D (C, H, W) or 4D (N, C, H, W) input, but got input of size {list(input.shape)}")
    if n[0] <= 0 or n[1] <= 0:
        raise RuntimeError(f"{op}: kernel_size must be positive, but got {n}")
    channels, h, w = x.shape[1:]
    if h % n[0] or w % n[1]:
        raise RuntimeError(
            f"{op}: input height and width ({h} x {w}) must be divisible by kernel_size {n} (non-overlapping blocks)"
        )
    if tuple(weight.shape) != (channels,) or (bias is not None and tuple(bias.shape) != (channels,)):
        raise RuntimeError(f"{op}: weight (β) and bias must have size [{channels}] (one per input channel)")
    if bias is not None:
        _check_tensor(op, "bias", bias, x)
    y = Subsampling2dFunction.apply(x, weight, bias, n, get_backend())
    return y.squeeze(0) if unbatched else y
