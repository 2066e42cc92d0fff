"""``torch.nn.functional``'s layers with hand-derived backward: convolutions (conv1d, conv2d,
conv_transpose2d), pooling (max and average, fixed and adaptive windows), linear, the
activations, normalisation, dropout and cross_entropy, and LeNet-5's trainable subsampling2d,
which torch.nn lacks (``__all__`` lists every function).

Same signatures, defaults and semantics as torch's: unbatched (C, H, W) input, int or pair
arguments, ``padding='same'``/``'valid'``, ``ceil_mode``, ``return_indices``,
``count_include_pad``, ``divisor_override``. Arguments are validated here (one check per op,
in checks.py) before any kernel runs, so mistakes raise the exception torch would.
"""

from __future__ import annotations

import functools
import math
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
    NLLLossFunction,
    LinearFunction,
    MaxPool2dFunction,
    ReLUFunction,
    SigmoidFunction,
    Subsampling2dFunction,
    TanhFunction,
)
from . import recompute
from .backend import get_backend
from .precision import autocast_inputs
from .checks import (
    check_adaptive_pool2d,
    check_avg_pool2d,
    check_conv,
    check_conv2d,
    check_conv_transpose2d,
    check_pool2d,
    as_int,
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


def _expands_to(shape: tuple, target: tuple) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` unchanged: each trailing-aligned size
    is 1 or target's (torch.broadcast_shapes says the same, at ~20 µs a call: a fifth of linear's
    fixed cost; AMD EPYC Zen 4)."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


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
    input, weight, bias = autocast_inputs(op, input, weight, bias)  # under torch.autocast: as torch.nn's op
    _check_conv_tensors(op, input, weight, bias, 2)
    x, unbatched = _batched(op, input)
    stride, dilation = pair(stride, "stride", op), pair(dilation, "dilation", op)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise RuntimeError("conv2d: padding='same' is not supported for strided convolutions")
            if weight.dim() == 4 and min(dilation) > 0:  # else check_conv2d reports the bad weight or dilation
                x, padding = _same_padding(x, weight.shape[2:], dilation)
            else:
                padding = (0, 0)
        else:
            raise RuntimeError(f"conv2d: Invalid padding string: {padding!r} (expected 'valid' or 'same')")
    else:
        padding = pair(padding, "padding", op)
    groups = as_int(groups, "groups", op)
    check_conv2d(x.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation, groups)
    y = Conv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, get_backend())
    return y.squeeze(0) if unbatched else y


def _pool_args(op: str, kernel_size, stride, padding):
    kernel = pair(kernel_size, "kernel_size", op)
    # stride=None (or an empty list, as torch accepts) means stride = kernel_size
    step = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else pair(stride, "stride", op)
    return kernel, step, pair(padding, "padding", op)


def _pool_planes(op: str, input: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """An adaptive pool treats every (H, W) plane alike, so an unbatched (C, H, W) input is pooled as a
    batch of C one-channel images (C, 1, H, W): as in torch's checks, its C may then be 0. Returns
    (4-D input, was_unbatched); the caller squeezes dim 1 of an unbatched result."""
    if isinstance(input, torch.Tensor) and input.dim() == 3:
        x, _ = _pool_input(op, input.unsqueeze(1))
        return x, True
    return _pool_input(op, input)


def _pool_input(op: str, input: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    x, unbatched = _batched(op, input)
    _check_floating(op, x)
    return x, unbatched


def _check_floating(op: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():  # torch's type for the dtypes its own pools reject (bool)
        raise NotImplementedError(f"{op}: input must be a floating-point tensor, but got dtype {x.dtype}")


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
    x, unbatched = _batched(op, input)
    kernel, step, pad = _pool_args(op, kernel_size, stride, padding)
    dil = pair(dilation, "dilation", op)
    check_pool2d(op, x.shape, kernel, step, pad, dil, bool(ceil_mode))
    _check_floating(op, x)  # after the shape check, in torch's order
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
    divisor = None if divisor_override is None else as_int(divisor_override, "divisor_override", op)
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
    input, weight, bias = autocast_inputs(op, input, weight, bias)  # under torch.autocast: as torch.nn's op
    _check_conv_tensors(op, input, weight, bias, 1)
    (s,), (d,) = _single(stride, "stride", op), _single(dilation, "dilation", op)
    x = input if input.dim() == 3 else input.unsqueeze(0)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise RuntimeError(f"conv1d: Invalid padding string: {padding!r} (expected 'valid' or 'same')")
        if padding == "same" and s != 1:
            raise RuntimeError("conv1d: padding='same' is not supported for strided convolutions")
        p = padding
        checked_padding = (0,) if padding == "valid" or weight.dim() != 3 or d <= 0 else ((d * (weight.shape[-1] - 1)) // 2,)
    else:
        (p,) = _single(padding, "padding", op)
        checked_padding = (p,)
    groups = as_int(groups, "groups", op)
    check_conv(op, x.shape, weight.shape, None if bias is None else bias.shape, (s,), checked_padding, (d,), groups)
    y = conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, s), p if isinstance(p, str) else (0, p), (1, d), groups)
    y = y.squeeze(2)
    return y if input.dim() == 3 else y.squeeze(0)


def _single(value, name: str, op: str) -> Tuple[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise RuntimeError(f"{op}: {name} must be a single int, but got {name}={list(value)}")
        return (as_int(value[0], name, op),)
    return (as_int(value, name, op),)


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
    input, weight, bias = autocast_inputs(op, input, weight, bias)  # under torch.autocast: as torch.nn's op
    _check_conv_tensors(op, input, weight, bias, 2)
    x, unbatched = _batched(op, input)
    stride, padding = pair(stride, "stride", op), pair(padding, "padding", op)
    output_padding, dilation = pair(output_padding, "output_padding", op), pair(dilation, "dilation", op)
    groups = as_int(groups, "groups", op)
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
        if len(output_size) >= input.dim():  # torch.nn.functional's own check, before its kernel's
            raise ValueError(f"{op}: Input dimension should be at least {len(output_size) + 1} for output_size={list(output_size)}")
        if len(output_size) != 2:
            raise RuntimeError(f"{op}: output_size must be an int or a pair, but got {list(output_size)}")
        return tuple(input.shape[-2 + i] if o is None else as_int(o, "output_size", op) for i, o in enumerate(output_size))
    if output_size is None:
        return (input.shape[-2], input.shape[-1])
    return pair(output_size, "output_size", op)


def adaptive_max_pool2d(input: torch.Tensor, output_size, return_indices: bool = False):
    """Max over torch's adaptive windows [⌊iH/H_out⌋, ⌈(i+1)H/H_out⌉); backward routes δ to the argmax."""
    op = "adaptive_max_pool2d"
    x, unbatched = _pool_planes(op, input)
    size = _output_size_pair(output_size, input, op)
    check_adaptive_pool2d(op, x.shape, size)
    y, indices = AdaptiveMaxPool2dFunction.apply(x, size, get_backend())
    if unbatched:
        y, indices = y.squeeze(1), indices.squeeze(1)
    return (y, indices) if return_indices else y


def adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """Mean over torch's adaptive windows; backward spreads δ / area evenly over each window."""
    op = "adaptive_avg_pool2d"
    x, unbatched = _pool_planes(op, input)
    size = _output_size_pair(output_size, input, op)
    check_adaptive_pool2d(op, x.shape, size)
    y = AdaptiveAvgPool2dFunction.apply(x, size, get_backend())
    return y.squeeze(1) if unbatched else y


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fully connected layer z = W·x + b with δx = Wᵀδ, ∂J/∂W = δxᵀ, ∂J/∂b = δ."""
    op = "linear"
    input, weight, bias = autocast_inputs(op, input, weight, bias)  # under torch.autocast: as torch.nn's op
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
        out_size = tuple(input.shape[:-1]) + (weight.shape[0],)
        # torch adds the bias by broadcasting: a 0-D or (1,) bias is accepted, as is any shape that expands to z
        if not _expands_to(tuple(bias.shape), out_size):
            raise RuntimeError(
                f"{op}: bias of size {list(bias.shape)} does not broadcast to the output size {list(out_size)}"
            )
    return LinearFunction.apply(input, weight, bias, get_backend())


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """max(z, 0) with δz = δ ⊙ 1[z > 0]; with ``inplace`` z is overwritten by y and returned, and
    δz is computed from y (as torch's relu_). Integer tensors are clamped in their dtype, as torch's."""
    _activation_input("relu", input, integers=True)
    if not input.is_floating_point():  # integers carry no gradient: the clamp alone
        return input.clamp_(min=0) if inplace else input.clamp(min=0)
    return _activation(ReLUFunction, input, inplace, get_backend())


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e⁻ᶻ) with δz = δ ⊙ y(1 − y)."""
    _check_tensor("sigmoid", "input", input, input)
    return SigmoidFunction.apply(input, get_backend())


def tanh(input: torch.Tensor, amplitude: float = 1.0, slope: float = 1.0) -> torch.Tensor:
    """A·tanh(S·z) with δz = δ ⊙ S·(A − y²/A); A = S = 1 is torch.tanh."""
    _check_tensor("tanh", "input", input, input)
    return TanhFunction.apply(input, float(amplitude), float(slope), get_backend())


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
    input, target, weight = autocast_inputs(op, input, target, weight)  # under torch.autocast: float32, as torch's
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not label_smoothing <= 1.0:  # torch checks the upper end only ...
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    label_smoothing = max(float(label_smoothing), 0.0)  # ... and smooths only for a positive value
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
        if ignore_index >= 0:  # torch's rule: any negative ignore_index means "none"
            raise RuntimeError("ignore_index is not supported for floating point target")
        q = (target.unsqueeze(0) if target.dim() == 1 else target.movedim(1, -1)).reshape(-1, classes)
        rows = w * ((1 - label_smoothing) * q + label_smoothing / classes)
        terms = torch.ones_like(rows, dtype=torch.bool)  # torch multiplies every class's term
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
        concrete = _concrete(labels)  # under torch.func: every mapped sample's labels
        bad = (concrete != ignore_index) & ((concrete < 0) | (concrete >= classes))
        if bool(bad.any()):
            raise IndexError(f"Target {int(concrete[bad][0])} is out of bounds.")
        safe = labels.masked_fill(~kept, 0)
        if label_smoothing == 0 and _plain_autograd():  # nll_loss ∘ log_softmax, as torch's
            row_weight = w[safe] * kept.to(w.dtype)
            log_probs = LogSoftmaxFunction.apply(logits, 1, get_backend())
            loss = NLLLossFunction.apply(log_probs, safe, kept, row_weight, reduction, row_weight.sum())
            return _cross_entropy_shape(loss, input, reduction)
        onehot = torch.zeros_like(logits).scatter(1, safe.unsqueeze(1), 1.0)
        rows = (1 - label_smoothing) * onehot * w + (label_smoothing / classes) * w
        rows = rows * kept.unsqueeze(1).to(rows.dtype)  # ignored samples carry no target: J_i = 0, δ_i = 0
        # the terms torch evaluates: log p_y gathered alone, or every class when smoothing adds Σ_c w_c log p_c
        terms = kept.unsqueeze(1) & (onehot.bool() if label_smoothing == 0 else torch.ones_like(onehot, dtype=torch.bool))
        divisor = (w[safe] * kept.to(w.dtype)).sum()
    loss = CrossEntropyFunction.apply(logits, rows, terms, reduction, divisor)
    return _cross_entropy_shape(loss, input, reduction)


def _cross_entropy_shape(loss: torch.Tensor, input: torch.Tensor, reduction: str) -> torch.Tensor:
    """reduction='none': the losses in the input's shape less its class dim."""
    if reduction == "none":
        return loss.reshape(input.shape[:1] + input.shape[2:]) if input.dim() > 1 else loss.reshape(())
    return loss


def _plain_autograd() -> bool:
    """No torch.func transform and no forward-mode level: NLLLossFunction serves (it has no vmap
    or jvp rule; CrossEntropyFunction has both)."""
    return not torch._C._are_functorch_transforms_active() \
        and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0


def _concrete(t: torch.Tensor) -> torch.Tensor:
    """The values behind torch.func's wrappers (vmap's batched tensors, grad's and jvp's tracked
    ones), so that a check on the data (a class index in range) runs under vmap as torch's kernels
    run theirs: on the real tensor, which holds every mapped sample's values."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


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


# ---------------------------------------------------------------------------------------------
# Normalisation and dropout: batch_norm, layer_norm, group_norm, dropout, dropout2d
#
# torch.nn.functional's signatures and checks. Batch norm runs on (n, C, H, W) maps: (n, C) and
# (n, C, L) inputs (and more spatial dims) are viewed as (n, C, L, 1); a 4-D channels-last
# input stays channels-last. Layer norm runs on the (M, D) rows of the trailing dims; group norm
# is layer norm of each (sample, group) row followed by a per-channel affine map.

import warnings  # noqa: E402

from .autograd import (  # noqa: E402
    BatchNormFunction,
    ChannelAffineFunction,
    GroupNormFunction,
    DropoutFunction,
    LayerNormFunction,
)
from .backend import kernels  # noqa: E402

__all__ += ["batch_norm", "layer_norm", "group_norm", "dropout", "dropout2d"]


def _check_norm_input(op: str, input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, but got {type(input).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(f'"{op}" not implemented for {input.dtype} input: it must be floating point')


def _check_norm_vector(op: str, name: str, tensor, input: torch.Tensor, size: int) -> None:
    """A per-channel vector (weight, bias, running_mean, running_var) of ``size`` entries."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, but got {type(tensor).__name__}")
    if tensor.numel() != size:
        raise RuntimeError(f"{op}: {name} should contain {size} elements not {tensor.numel()}")
    if tensor.dtype != input.dtype:
        raise RuntimeError(f"{op}: mixed dtype: input ({input.dtype}) and {name} ({tensor.dtype}) must share one dtype")
    if tensor.device != input.device:
        raise RuntimeError(f"{op}: input and {name} must be on the same device, but got {input.device} and {tensor.device}")


def _check_batch_size(size) -> None:
    """torch's rule: training statistics need more than one value per channel (or group)."""
    count = size[0]
    for s in size[2:]:
        count *= s
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(size)}")


def _batch_norm_map(input: torch.Tensor) -> torch.Tensor:
    """(n, C, *) as the (n, C, H, W) map the kernels take: 4-D as it is, else (n, C, L, 1)."""
    if input.dim() == 4:
        return input
    return input.reshape(input.shape[0], input.shape[1], -1, 1)


def _update_running_statistics(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    # running ← (1 − momentum)·running + momentum·batch, with the unbiased variance var·N/(N − 1)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)


def _norm_in_float32(norm, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A bfloat16/float16 input to a norm is normalised in float32 and the result rounded once to its
    dtype, with parameters and running statistics of its dtype or float32 (torch's CPU norms accept
    that mix): float32 buffers are updated in place as they are; low-precision ones get the float32
    update rounded back."""
    up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    y = norm(input.float(), *up, **kwargs)
    for original, wide in zip(args, up):
        if isinstance(original, torch.Tensor) and wide is not original and not original.requires_grad:
            original.copy_(wide)  # a running statistic updated in float32
    return y.to(input.dtype)


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalisation per channel with the hand-derived backward (see BatchNormFunction):
    training uses the batch statistics (and updates running_mean / running_var in place when
    given), eval the running statistics."""
    op = "batch_norm"
    _check_norm_input(op, input)
    if input.dtype in (torch.bfloat16, torch.float16):
        return _norm_in_float32(batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.dim() < 2:
        raise ValueError(f"{op}: expected an input of at least 2 dimensions (N, C, *), but got input of size {list(input.shape)}")
    if training:
        _check_batch_size(list(input.shape))
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    channels = input.shape[1]
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_norm_vector(op, name, tensor, input, channels)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(f"{op}: running_mean and running_var must be given when training=False")
    x = _batch_norm_map(input)
    backend = get_backend()
    if training:
        mean, var = kernels(backend).batch_norm_statistics(x.detach())
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if running_mean is not None and running_var is not None and count > 0:
            _update_running_statistics(running_mean, running_var, mean, var, count, momentum)
    else:
        mean, var = running_mean.detach(), running_var.detach()
    invstd = (var + eps).rsqrt()  # σ⁻¹ = 1/√(var + ε)
    y = BatchNormFunction.apply(x, weight, bias, mean, invstd, bool(training), float(eps), backend)
    return y if input.dim() == 4 else y.reshape(input.shape)


def _shaped(t: Optional[torch.Tensor], size: tuple) -> Optional[torch.Tensor]:
    """t reshaped to size, or t itself where it has that size already: a reshape of a tensor that
    requires grad is a view autograd walks back through (a node and a reshape of δ each backward),
    as γ and β of a 1-D normalized_shape, a matrix input and a norm's output mostly do not need."""
    return t if t is None or tuple(t.shape) == size else t.reshape(size)


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims with the hand-derived
    backward (see LayerNormFunction)."""
    op = "layer_norm"
    _check_norm_input(op, input)
    if input.dtype in (torch.bfloat16, torch.float16):
        return _norm_in_float32(layer_norm, input, normalized_shape, weight, bias, eps)
    shape = ([as_int(normalized_shape, "normalized_shape", op)] if not isinstance(normalized_shape, (list, tuple, torch.Size))
             else [as_int(s, "normalized_shape", op) for s in normalized_shape])
    if not shape:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
            f"but got normalized_shape = {shape}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            _check_tensor(op, name, tensor, input)
            if list(tensor.shape) != shape:
                raise RuntimeError(
                    f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                    f"{list(tensor.shape)} and normalized_shape = {shape}")
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={shape}, expected input with shape [*, {', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}")
    d = 1
    for s in shape:
        d *= s
    rows = math.prod(input.shape[:input.dim() - len(shape)])
    y, _, _ = LayerNormFunction.apply(_shaped(input, (rows, d)), _shaped(weight, (d,)),
                                      _shaped(bias, (d,)), float(eps), get_backend())
    return _shaped(y, tuple(input.shape))


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalisation: each (sample, group) set of C/G·H·W entries normalised by its own μ, σ,
    then y = γ_c·x̂ + β_c per channel. 'cpp' on the CPU: GroupNormFunction (csrc/group_norm.cpp, one
    kernel per pass, NCHW or channels-last); otherwise layer norm of each (sample, group) row, then
    the channel affine map (LayerNormFunction, then ChannelAffineFunction)."""
    op = "group_norm"
    num_groups = as_int(num_groups, "num_groups", op)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    _check_batch_size([input.shape[0] * input.shape[1] // num_groups, num_groups] + list(input.shape[2:]))
    _check_norm_input(op, input)
    if input.dtype in (torch.bfloat16, torch.float16):
        return _norm_in_float32(group_norm, input, num_groups, weight, bias, eps)
    n, channels = input.shape[:2]
    if num_groups <= 0 or channels % num_groups:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            _check_tensor(op, name, tensor, input)
            if tensor.dim() != 1 or tensor.shape[0] != channels:
                raise RuntimeError(
                    f"Expected {name} to be a vector of size equal to the number of channels in input, but got "
                    f"{name} of shape {list(tensor.shape)} and input of shape {list(input.shape)}")
    group_size = channels // num_groups
    for s in input.shape[2:]:
        group_size *= s
    backend = get_backend()
    if backend == "cpp" and input.device.type == "cpu" and hasattr(kernels(backend), "group_norm_forward"):
        maps = input if input.dim() == 4 else input.reshape(n, channels, group_size // (channels // num_groups), 1)  # (n, C, P, 1)
        y, _, _ = GroupNormFunction.apply(maps, weight, bias, num_groups, float(eps), backend)
        return _shaped(y, tuple(input.shape))
    rows = input.reshape(n * num_groups, group_size)
    x_hat, _, _ = LayerNormFunction.apply(rows, None, None, float(eps), get_backend())
    x_hat = x_hat.reshape(input.shape)
    if weight is None and bias is None:
        return x_hat
    return ChannelAffineFunction.apply(x_hat, weight, bias)


def _check_dropout(p: float) -> None:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


@functools.lru_cache(maxsize=64)
def _keep_scale(p: float, dtype: torch.dtype) -> float:
    """1/(1 − p) rounded in ``dtype`` as torch's dropout mask holds it (noise.div_(1 − p))."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


def _dropout(input: torch.Tensor, p: float, training: bool, noise_shape) -> torch.Tensor:
    """x ⊙ m, m = Bernoulli(1 − p)/(1 − p): the mask drawn as torch's CPU dropout draws it
    (bernoulli_(1 − p) on a new tensor of the mask's shape and layout: bool here, 1 byte an entry,
    the same values), so a seeded run draws the same mask; the scale 1/(1 − p) rounded in x's
    dtype, as torch's float mask holds it. p = 0, eval or an empty input: x itself; p = 1: x ⊙ 0
    (NaN stays NaN)."""
    if not input.is_floating_point():
        raise RuntimeError(f"dropout: input must be a floating-point tensor, but got dtype {input.dtype}")
    if p == 0 or not training or input.numel() == 0:
        return input
    if p == 1:  # torch multiplies by 0 and draws nothing
        mask, scale = input.new_zeros((), dtype=torch.bool), 0.0
    else:  # bernoulli_ draws the same values into a bool tensor as into torch's float one
        mask = torch.empty_like(input, dtype=torch.bool) if noise_shape is None else \
            input.new_empty(noise_shape, dtype=torch.bool)
        mask.bernoulli_(1 - p)
        scale = _keep_scale(float(p), input.dtype)
    return DropoutFunction.apply(input, mask, scale, get_backend())


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Each entry zeroed with probability p, the rest scaled by 1/(1 − p); δx = δy ⊙ m."""
    _check_dropout(p)
    y = _dropout(input, p, training, None)
    return input.copy_(y) if inplace and y is not input else y


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels input[n, c] zeroed with probability p, the rest scaled by 1/(1 − p)."""
    _check_dropout(p)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dropout2d: input must be a Tensor, but got {type(input).__name__}")
    if input.dim() not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated and will result in an "
            "error in a future release. Use dropout for it.", stacklevel=2)
    if input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    noise_shape = tuple(input.shape[:2]) + (1,) * (input.dim() - 2)  # one draw per (sample, channel)
    y = _dropout(input, p, training, noise_shape)
    return input.copy_(y) if inplace and y is not input else y


# =============================================================================================
# Activations: torch.nn.functional's gelu, silu, relu6, hardtanh, hardswish, hardsigmoid,
# leaky_relu, elu (with their ``inplace=`` and trailing-underscore forms) and softmax /
# log_softmax, with the hand-derived derivatives of autograd.py's "Activations" section.

from .autograd import (  # noqa: E402
    ELUFunction,
    GELUFunction,
    HardsigmoidFunction,
    HardswishFunction,
    HardtanhFunction,
    InplaceActivationFunction,
    InplaceActivationFromOutputFunction,
    LeakyReLUFunction,
    LogSoftmaxFunction,
    SiLUFunction,
    SoftmaxFunction,
)
from .checks import as_int  # noqa: E402

__all__ += [
    "gelu", "silu", "relu6", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "softmax", "log_softmax",
]


def _activation_input(op: str, input, integers: bool = False) -> None:
    """A Tensor, floating point (torch's kernels raise NotImplementedError for other dtypes;
    relu, hardtanh and relu6 also take integer tensors, as torch's do)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}")
    if not input.is_floating_point() and not (integers and not input.is_complex() and input.dtype != torch.bool):
        raise NotImplementedError(f"{op}: input must be a floating-point tensor, but got dtype {input.dtype}")


def _activation(function, input: torch.Tensor, inplace: bool, *args) -> torch.Tensor:
    """y = f(x) by ``function``; with ``inplace`` x is overwritten by f(x) and returned, and autograd
    sees an in-place op exactly as for torch's (version counter, leaf check, views)."""
    if not inplace:
        return function.apply(input, *args)
    if torch.is_grad_enabled() and input.requires_grad:
        if hasattr(function, "output_grad") or (hasattr(function, "support") and function.support_is_exact(input, *args)):
            # f′ read from y: no copy of x
            return recompute.returned(InplaceActivationFromOutputFunction.apply(input, function, args))
        # a copy of x for f′(x), unless x = BN(x₀) is rebuilt in the backward (recompute.py)
        original = None if recompute.batch_norm_output(input, function) is not None else input.detach().clone()
        return recompute.returned(InplaceActivationFunction.apply(input, original, function, args))
    return input.copy_(function.forward(input, *args))


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x·Φ(x) (or its tanh approximation) with δx = δ ⊙ (Φ(x) + x·φ(x))."""
    _activation_input("gelu", input)
    if approximate not in ("none", "tanh"):
        raise RuntimeError("approximate argument must be either none or tanh.")
    return GELUFunction.apply(input, approximate, get_backend())


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x·σ(x) with δx = δ ⊙ σ(x)(1 + x(1 − σ(x)))."""
    _activation_input("silu", input)
    return _activation(SiLUFunction, input, inplace, get_backend())


def hardtanh(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """clamp(x, min_val, max_val) with δx = δ where min_val < x < max_val, else 0."""
    _activation_input("hardtanh", input, integers=True)
    if min_val > max_val:
        raise ValueError("min_val cannot be greater than max_val")
    if not input.is_floating_point():  # integers carry no gradient: the clamp alone, in their dtype
        y = input.clamp(min_val, max_val).to(input.dtype)
        return input.copy_(y) if inplace else y
    return _activation(HardtanhFunction, input, inplace, min_val, max_val, get_backend())


def hardtanh_(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0) -> torch.Tensor:
    return hardtanh(input, min_val, max_val, inplace=True)


def relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """min(max(x, 0), 6) = hardtanh(x, 0, 6): δx = δ where 0 < x < 6, else 0."""
    return hardtanh(input, 0.0, 6.0, inplace)


def hardswish(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x·relu6(x + 3)/6 with δx = 0 | δ(x/3 + ½) | δ on x ≤ −3 | −3 < x < 3 | x ≥ 3."""
    _activation_input("hardswish", input)
    return _activation(HardswishFunction, input, inplace, get_backend())


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu6(x + 3)/6 with δx = δ/6 where −3 < x < 3, else 0."""
    _activation_input("hardsigmoid", input)
    return _activation(HardsigmoidFunction, input, inplace, get_backend())


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """x | a·x on x > 0 | x ≤ 0, with δx = δ | a·δ."""
    _activation_input("leaky_relu", input)
    return _activation(LeakyReLUFunction, input, inplace, negative_slope, get_backend())


def leaky_relu_(input: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    return leaky_relu(input, negative_slope, inplace=True)


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """α(eˣ − 1) | x on x ≤ 0 | x > 0, with δx = δ·αeˣ | δ."""
    _activation_input("elu", input)
    return _activation(ELUFunction, input, inplace, alpha, get_backend())


def elu_(input: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return elu(input, alpha, inplace=True)


def _softmax_args(op: str, input, dim, stacklevel: int, dtype) -> Tuple[torch.Tensor, int]:
    """torch's softmax arguments: dim=None picks torch's legacy implicit dim (with its warning),
    ``dtype`` casts the input first; dim must be in range, the input floating point."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}")
    if dim is None:
        dim = F._get_softmax_dim(op, input.dim(), stacklevel + 1)
    dim = as_int(dim, "dim", op)
    if dtype is not None:
        input = input.to(dtype)
    _activation_input(op, input)
    size = max(input.dim(), 1)
    if not -size <= dim < size:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-size}, {size - 1}], but got {dim})")
    return input, dim


def softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """e^(x − max) / Σ e^(x − max) along dim, with δx = y ⊙ (δ − Σ δ ⊙ y)."""
    x, dim = _softmax_args("softmax", input, dim, _stacklevel, dtype)
    return SoftmaxFunction.apply(x, dim, get_backend())


def log_softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """(x − max) − log Σ e^(x − max) along dim, with δx = δ − softmax(x) · Σ δ."""
    x, dim = _softmax_args("log_softmax", input, dim, _stacklevel, dtype)
    return LogSoftmaxFunction.apply(x, dim, get_backend())
