"""Fake kernels of the normalisation operators (csrc/batch_norm.cpp, csrc/layer_norm.cpp,
csrc/group_norm.cpp), so ``torch.compile`` and ``torch.library.opcheck`` can trace them: each checks the shapes the C++
kernel checks and returns empty tensors of the outputs' sizes (and the input's layout).
Imported by ops.py when the extension is built."""

from __future__ import annotations

import torch


def _map_layout(input: torch.Tensor) -> torch.memory_format:
    """The kernels' layout rule: a 4-D channels-last (and not NCHW-contiguous) map stays channels-last."""
    nhwc = input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def _check_map(op: str, input: torch.Tensor) -> None:
    torch._check(input.dim() == 4, lambda: f"{op}: input must be 4-D (n, C, H, W), got size {list(input.shape)}")


def _check_vector(op: str, name: str, v, size) -> None:
    if v is not None:
        torch._check(v.dim() == 1 and v.shape[0] == size, lambda: f"{op}: {name} must have size [{size}]")


@torch.library.register_fake("manualconv::batch_norm_statistics")
def _(input):
    _check_map("batch_norm_statistics", input)
    return input.new_empty(input.shape[1]), input.new_empty(input.shape[1])


@torch.library.register_fake("manualconv::batch_norm_apply")
def _(input, mean, invstd, weight, bias):
    op = "batch_norm_apply"
    _check_map(op, input)
    for name, v in (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias)):
        _check_vector(op, name, v, input.shape[1])
    return torch.empty_like(input, memory_format=_map_layout(input))


@torch.library.register_fake("manualconv::batch_norm_backward")
def _(grad_output, input, mean, invstd, weight, training):
    op = "batch_norm_backward"
    _check_map(op, input)
    torch._check(grad_output.shape == input.shape, lambda: f"{op}: grad_output must have the input's size")
    for name, v in (("mean", mean), ("invstd", invstd), ("weight", weight)):
        _check_vector(op, name, v, input.shape[1])
    channels = input.shape[1]
    return (torch.empty_like(input, memory_format=_map_layout(input)), input.new_empty(channels),
            input.new_empty(channels))


@torch.library.register_fake("manualconv::layer_norm_forward")
def _(input, weight, bias, eps):
    op = "layer_norm_forward"
    torch._check(input.dim() == 2, lambda: f"{op}: input must be 2-D (rows, entries)")
    for name, v in (("weight", weight), ("bias", bias)):
        _check_vector(op, name, v, input.shape[1])
    rows = input.shape[0]
    return torch.empty_like(input, memory_format=torch.contiguous_format), input.new_empty(rows), input.new_empty(rows)


@torch.library.register_fake("manualconv::layer_norm_backward")
def _(grad_output, input, mean, invstd, weight):
    op = "layer_norm_backward"
    torch._check(input.dim() == 2 and grad_output.shape == input.shape,
                 lambda: f"{op}: grad_output and input must be 2-D of one size")
    _check_vector(op, "weight", weight, input.shape[1])
    d = input.shape[1] if weight is not None else 0  # ∂J/∂γ, ∂J/∂β only with γ
    return torch.empty_like(input, memory_format=torch.contiguous_format), input.new_empty(d), input.new_empty(d)


def _check_groups(op: str, input: torch.Tensor, num_groups: int) -> None:
    _check_map(op, input)
    torch._check(num_groups > 0 and input.shape[1] % num_groups == 0,
                 lambda: f"{op}: num_groups must divide the channels ({input.shape[1]}), got {num_groups}")


if hasattr(torch.ops.manualconv, "group_norm_forward"):  # csrc/group_norm.cpp
    @torch.library.register_fake("manualconv::group_norm_forward")
    def _(input, weight, bias, num_groups, eps):
        op = "group_norm_forward"
        _check_groups(op, input, num_groups)
        for name, v in (("weight", weight), ("bias", bias)):
            _check_vector(op, name, v, input.shape[1])
        n = input.shape[0]
        return (torch.empty_like(input, memory_format=_map_layout(input)), input.new_empty(n, num_groups),
                input.new_empty(n, num_groups))

    @torch.library.register_fake("manualconv::group_norm_backward")
    def _(grad_output, input, mean, invstd, weight, num_groups):
        op = "group_norm_backward"
        _check_groups(op, input, num_groups)
        torch._check(grad_output.shape == input.shape, lambda: f"{op}: grad_output must have the input's size")
        _check_vector(op, "weight", weight, input.shape[1])
        channels = input.shape[1]
        return (torch.empty_like(input, memory_format=_map_layout(input)), input.new_empty(channels),
                input.new_empty(channels))
