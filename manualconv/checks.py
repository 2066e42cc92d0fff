"""One shape check per op, shared by its forward and backward (and by the fake kernels).

Each ``check_*`` function validates the arguments of one operator, raises the exception type
torch.nn raises for the same mistake (with a message that names the bad argument), and returns
the output size. Sizes are plain ints here, or SymInts when traced by ``torch.compile``.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch


def as_int(value, name: str, op: str, expected: str = "int") -> int:
    """An integer argument, as torch's argument parser reads one: ints and integer-like objects
    (numpy integers, one-element integer tensors, SymInts: anything with ``__index__``) are
    accepted; floats (even 2.0), bools and strings raise TypeError naming the argument, never a
    silent truncation."""
    if isinstance(value, torch.SymInt):
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{op}(): argument '{name}' must be {expected}, not {type(value).__name__}")


_INTS = "int or tuple of ints"


def pair(value, name: str, op: str) -> Tuple[int, int]:
    """Normalise an int or a 1/2-sequence to a (height, width) pair, as torch's _pair does."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return (as_int(value[0], name, op, _INTS),) * 2
        if len(value) != 2:
            raise RuntimeError(
                f"{op}: {name} must be a single int or a pair of ints, got {name}={list(value)}"
            )
        return (as_int(value[0], name, op, _INTS), as_int(value[1], name, op, _INTS))
    return (as_int(value, name, op, _INTS),) * 2


def _fmt(size: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in size) + "]"


def conv_output_size(input_size, kernel_size, stride, padding, dilation) -> Tuple[int, ...]:
    """H_out = ⌊(H + 2p − d·(k−1) − 1) / s⌋ + 1 for each spatial dim."""
    return tuple(
        (h + 2 * p - d * (k - 1) - 1) // s + 1
        for h, k, s, p, d in zip(input_size, kernel_size, stride, padding, dilation)
    )


def _x(values) -> str:
    return " x ".join(str(v) for v in values)


def check_conv(
    op: str,
    input_size: Sequence[int],
    weight_size: Sequence[int],
    bias_size: Optional[Sequence[int]],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tuple[int, ...]:
    """Validate a convolution with len(stride) spatial dims on (N, C, *spatial) input; return the
    output size (N, O, *spatial_out). ``op`` ('conv1d', 'conv2d') names the call in messages."""
    dims = len(stride)
    if len(weight_size) != dims + 2:
        raise RuntimeError(
            f"{op}: weight must be {dims + 2}-D (out_channels, in_channels/groups, *kernel_size), "
            f"but got weight of size {_fmt(weight_size)}"
        )
    if len(input_size) != dims + 2:
        raise RuntimeError(
            f"Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to {op}, "
            f"but got input of size: {_fmt(input_size)}"
        )
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{op}: non-positive stride is not supported, got stride={tuple(stride)}")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"{op}: negative padding is not supported, got padding={tuple(padding)}")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"{op}: non-positive dilation is not supported, got dilation={tuple(dilation)}")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, got groups={groups}")
    out_channels, in_per_group, kernel = weight_size[0], weight_size[1], tuple(weight_size[2:])
    if out_channels % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {_fmt(weight_size)} instead"
        )
    n, c, spatial = input_size[0], input_size[1], tuple(input_size[2:])
    if c != in_per_group * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {_fmt(weight_size)}, expected "
            f"input{_fmt(input_size)} to have {in_per_group * groups} channels, "
            f"but got {c} channels instead"
        )
    if bias_size is not None and (len(bias_size) != 1 or bias_size[0] != out_channels):
        raise RuntimeError(
            f"Given weight of size {_fmt(weight_size)}, expected bias to be 1-dimensional with "
            f"{out_channels} elements, but got bias of size {_fmt(bias_size)} instead"
        )
    padded = [h + 2 * p for h, p in zip(spatial, padding)]
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if any(p < e for p, e in zip(padded, effective)):
        raise RuntimeError(
            f"{op}: Calculated padded input size per channel: ({_x(padded)}). "
            f"Kernel size: ({_x(effective)}). Kernel size can't be greater than actual input size"
        )
    return (n, out_channels) + conv_output_size(spatial, kernel, stride, padding, dilation)


def check_conv2d(input_size, weight_size, bias_size, stride, padding, dilation, groups) -> Tuple[int, int, int, int]:
    """check_conv for conv2d (N, C, H, W) input; returns (N, O, H_out, W_out)."""
    return check_conv("conv2d", input_size, weight_size, bias_size, stride, padding, dilation, groups)


def pool2d_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling size: ⌊ or ⌈(H + 2p − d·(k−1) − 1) / s⌉ + 1, minus one if the last
    window (ceil_mode) would start in the right padding."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def check_pool2d(
    op: str,
    input_size: Sequence[int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
) -> Tuple[int, int, int, int]:
    """Validate a max/avg pool on (N, C, H, W) input; return the output size (N, C, H_out, W_out)."""
    if len(input_size) != 4 or any(s == 0 for s in input_size[1:]):
        raise RuntimeError(
            f"{op}: expected a non-empty 3D (C, H, W) or 4D (N, C, H, W) input "
            f"(batch may be 0), but got input of size {_fmt(input_size)}"
        )
    if any(k <= 0 for k in kernel_size):
        raise RuntimeError(
            f"{op}: kernel_size should be greater than zero, but got kernel_size={tuple(kernel_size)}"
        )
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{op}: stride should be greater than zero, but got stride={tuple(stride)}")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(
            f"{op}: dilation should be greater than zero, but got dilation={tuple(dilation)}"
        )
    if any(p < 0 for p in padding):
        raise RuntimeError(f"{op}: pad must be non-negative, but got padding={tuple(padding)}")
    for k, p in zip(kernel_size, padding):
        if p > k // 2:  # torch's rule: half the kernel, whatever the dilation
            raise RuntimeError(
                f"{op}: pad should be at most half of kernel size, but got pad={p}, kernel_size={k}"
            )
    n, c, h, w = input_size
    h_out = pool2d_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    w_out = pool2d_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    if h_out <= 0 or w_out <= 0:
        raise RuntimeError(
            f"{op}: Given input size: ({c}x{h}x{w}). Calculated output size: ({c}x{h_out}x{w_out}). "
            "Output size is too small"
        )
    return (n, c, h_out, w_out)


def check_grad_output(op: str, grad_output_size: Sequence[int], expected: Sequence[int]) -> None:
    """Backward half of each check: δy must have the forward's output size."""
    if tuple(grad_output_size) != tuple(expected):
        raise RuntimeError(
            f"{op}: grad_output must have the forward output's size {_fmt(expected)}, "
            f"but got {_fmt(grad_output_size)}"
        )


def check_linear_backward(grad_output_size, input_size, weight_size) -> None:
    """linear's backward (csrc/linear.cpp): δ (n × out), x (n × in) and W (out × in) as the
    forward z = x Wᵀ left them."""
    if len(grad_output_size) != 2 or len(input_size) != 2 or len(weight_size) != 2:
        raise RuntimeError(f"linear_backward: grad_output, input and weight must be matrices, but got sizes "
                           f"{_fmt(grad_output_size)}, {_fmt(input_size)} and {_fmt(weight_size)}")
    if input_size[1] != weight_size[1]:
        raise RuntimeError(f"linear_backward: input of size {_fmt(input_size)} does not fit weight of size {_fmt(weight_size)}")
    check_grad_output("linear_backward", grad_output_size, (input_size[0], weight_size[0]))


def check_avg_pool2d(input_size, kernel_size, stride, padding, ceil_mode, divisor_override):
    """check_pool2d for average pooling (no dilation), plus a non-zero divisor_override."""
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor must be not zero (divisor_override=0)")
    return check_pool2d("avg_pool2d", input_size, kernel_size, stride, padding, (1, 1), ceil_mode)


def check_max_pool2d_indices(grad_output, indices, input_size) -> None:
    """Backward half of max_pool2d's check: the recorded argmax must fit δy and the input plane."""
    if tuple(indices.shape) != tuple(grad_output.shape):
        raise RuntimeError(
            f"max_pool2d_backward: indices must have grad_output's size {_fmt(grad_output.shape)}, "
            f"but got {_fmt(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise RuntimeError(f"max_pool2d_backward: indices must be int64, but got {indices.dtype}")
    plane = input_size[2] * input_size[3]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= plane):
        raise RuntimeError(
            f"max_pool2d_backward: indices must lie in [0, {plane}) (the flattened H·W plane)"
        )


def adaptive_windows(size: int, out: int):
    """Adaptive pooling's window i covers [⌊i·H/H_out⌋, ⌈(i+1)·H/H_out⌉) (torch's boundaries)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def check_adaptive_pool2d(op: str, input_size: Sequence[int], output_size: Sequence[int]) -> Tuple[int, int, int, int]:
    """Validate an adaptive pool on (N, C, H, W) input; return (N, C, H_out, W_out). As torch, the
    average pool accepts zero channels (an empty result); the max pool, like both on an empty
    plane, raises."""
    non_empty = input_size[2:] if op == "adaptive_avg_pool2d" else input_size[1:]
    if len(input_size) != 4 or any(s == 0 for s in non_empty):
        raise RuntimeError(
            f"{op}: expected a 3D (C, H, W) or 4D (N, C, H, W) input with non-zero channels, height "
            f"and width, but got input of size {_fmt(input_size)}"
        )
    if len(output_size) != 2:
        raise RuntimeError(f"{op}: output_size must be an int or a pair, but got {list(output_size)}")
    if any(o < 0 for o in output_size):
        raise RuntimeError(
            f"{op}: elements of output_size must be greater than or equal to 0, but got output_size={tuple(output_size)}"
        )
    return (input_size[0], input_size[1], output_size[0], output_size[1])


def check_conv_transpose2d(input_size, weight_size, bias_size, stride, padding, output_padding, dilation, groups):
    """Validate conv_transpose2d on (N, C_in, H, W) input; return (N, C_out, H_out, W_out) with
    H_out = (H − 1)·s − 2p + d·(k − 1) + output_padding + 1."""
    op = "conv_transpose2d"
    if len(input_size) != 4:
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to {op}, but got input of size: {_fmt(input_size)}"
        )
    if len(weight_size) != 4:
        raise RuntimeError(
            f"{op}: weight must be 4-D (in_channels, out_channels/groups, kH, kW), but got weight of size {_fmt(weight_size)}"
        )
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{op}: non-positive stride is not supported, got stride={tuple(stride)}")
    if any(p < 0 for p in padding) or any(p < 0 for p in output_padding):
        raise RuntimeError(f"{op}: negative padding is not supported, got padding={tuple(padding)}, "
                           f"output_padding={tuple(output_padding)}")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"{op}: non-positive dilation is not supported, got dilation={tuple(dilation)}")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, got groups={groups}")
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= s and op_ >= d:
            raise RuntimeError(
                f"{op}: output padding must be smaller than either stride or dilation, but got "
                f"output_padding={tuple(output_padding)}, stride={tuple(stride)}, dilation={tuple(dilation)}"
            )
    in_channels, out_per_group, kh, kw = weight_size
    if in_channels % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {_fmt(weight_size)} instead"
        )
    if input_size[1] != in_channels:
        raise RuntimeError(
            f"Given transposed=1, weight of size {_fmt(weight_size)}, expected input{_fmt(input_size)} "
            f"to have {in_channels} channels, but got {input_size[1]} channels instead"
        )
    out_channels = out_per_group * groups
    if bias_size is not None and (len(bias_size) != 1 or bias_size[0] != out_channels):
        raise RuntimeError(
            f"Given transposed=1, weight of size {_fmt(weight_size)}, expected bias to be 1-dimensional "
            f"with {out_channels} elements, but got bias of size {_fmt(bias_size)} instead"
        )
    out = [(h - 1) * s - 2 * p + d * (k - 1) + o + 1
           for h, s, p, d, k, o in zip(input_size[2:], stride, padding, dilation, (kh, kw), output_padding)]
    if any(o <= 0 for o in out):
        raise RuntimeError(
            f"{op}: Given input size per channel: ({_x(input_size[2:])}). Calculated output size per "
            f"channel: ({_x(out)}). Output size is too small"
        )
    return (input_size[0], out_channels, out[0], out[1])
