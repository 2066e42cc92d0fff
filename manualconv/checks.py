"""One shape check per op, shared by its forward and backward (and by the fake kernels).

Each ``check_*`` function validates the arguments of one operator, raises the exception type
torch.nn raises for the same mistake (with a message that names the bad argument), and returns
the output size. Sizes are plain ints here, or SymInts when traced by ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def pair(value, name: str, op: str) -> Tuple[int, int]:
    """Normalise an int or a 1/2-sequence to a (height, width) pair, as torch's _pair does."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        if len(value) != 2:
            raise RuntimeError(
                f"{op}: {name} must be a single int or a pair of ints, got {name}={list(value)}"
            )
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


def _fmt(size: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in size) + "]"


def conv2d_output_size(input_hw, kernel_hw, stride, padding, dilation) -> Tuple[int, int]:
    """H_out = ⌊(H + 2p − d·(k−1) − 1) / s⌋ + 1 for each spatial dim."""
    return tuple(
        (h + 2 * p - d * (k - 1) - 1) // s + 1
        for h, k, s, p, d in zip(input_hw, kernel_hw, stride, padding, dilation)
    )


def check_conv2d(
    input_size: Sequence[int],
    weight_size: Sequence[int],
    bias_size: Optional[Sequence[int]],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
) -> Tuple[int, int, int, int]:
    """Validate a conv2d call on (N, C, H, W) input; return the output size (N, O, H_out, W_out)."""
    if len(weight_size) != 4:
        raise RuntimeError(
            "conv2d: weight must be 4-D (out_channels, in_channels/groups, kH, kW), "
            f"but got weight of size {_fmt(weight_size)}"
        )
    if len(input_size) != 4:
        raise RuntimeError(
            "Expected 3D (unbatched) or 4D (batched) input to conv2d, "
            f"but got input of size: {_fmt(input_size)}"
        )
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"conv2d: non-positive stride is not supported, got stride={tuple(stride)}")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"conv2d: negative padding is not supported, got padding={tuple(padding)}")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(
            f"conv2d: non-positive dilation is not supported, got dilation={tuple(dilation)}"
        )
    if groups <= 0:
        raise RuntimeError(f"conv2d: non-positive groups is not supported, got groups={groups}")
    out_channels, in_per_group, kh, kw = weight_size
    if out_channels % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {_fmt(weight_size)} instead"
        )
    n, c, h, w = input_size
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
    padded = (h + 2 * padding[0], w + 2 * padding[1])
    effective = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if padded[0] < effective[0] or padded[1] < effective[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
            f"Kernel size: ({effective[0]} x {effective[1]}). "
            "Kernel size can't be greater than actual input size"
        )
    h_out, w_out = conv2d_output_size((h, w), (kh, kw), stride, padding, dilation)
    return (n, out_channels, h_out, w_out)


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
    for k, p, d in zip(kernel_size, padding, dilation):
        if p > ((k - 1) * d + 1) // 2:
            raise RuntimeError(
                f"{op}: pad should be at most half of effective kernel size, but got pad={p}, "
                f"kernel_size={k} and dilation={d}"
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
