"""Fake kernels of the activation operators (csrc/gelu.cpp, csrc/relu.cpp), so ``torch.compile`` and
``torch.library.opcheck`` can trace them: each checks what the C++ kernel checks and returns an
empty tensor with the output's size, dtype and strides. Imported by ops.py when the extension is
built."""

from __future__ import annotations

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense


def _check_approximate(approximate: str) -> None:
    torch._check(approximate in ("none", "tanh"),
                 lambda: f"gelu: approximate argument must be either none or tanh, but got approximate={approximate}")


def _like(input: torch.Tensor) -> torch.Tensor:
    """The kernels' output layout (csrc/elementwise.h): the input's strides when it is dense, else
    contiguous (a second operand, δy, is walked in the input's strides)."""
    if is_non_overlapping_and_dense(input):
        return torch.empty_like(input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("manualconv::gelu_forward")
def _(input, approximate):
    _check_approximate(approximate)
    return _like(input)


@torch.library.register_fake("manualconv::gelu_backward")
def _(grad_output, input, approximate):
    _check_approximate(approximate)
    torch._check(grad_output.shape == input.shape,
                 lambda: f"gelu_backward: grad_output must have the input's size {list(input.shape)}")
    return _like(input)


@torch.library.register_fake("manualconv::relu_backward")
def _(grad_output, output):
    torch._check(grad_output.shape == output.shape,
                 lambda: f"relu_backward: grad_output must have the output's size {list(output.shape)}")
    return _like(output)
