"""Fake kernels of the activation operators (csrc/gelu.cpp, csrc/relu.cpp, csrc/activations.cpp) and of
dropout's product (csrc/dropout.cpp), so ``torch.compile`` and
``torch.library.opcheck`` can trace them: each checks what the C++ kernel checks and returns an
empty tensor with the output's size, dtype and strides. Imported by ops.py when the extension is
built."""

from __future__ import annotations

import inspect

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from . import reference


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


@torch.library.register_fake("manualconv::hardtanh_backward_mask")
def _(output, min_val, max_val):
    return _like(output).to(torch.bool)


@torch.library.register_fake("manualconv::dropout_masked_scale")
def _(values, mask, scale):
    torch._check(mask.dtype == torch.bool, lambda: f"dropout_masked_scale: mask must be a bool tensor, but got dtype {mask.dtype}")
    torch._check(values.shape == mask.shape,
                 lambda: f"dropout_masked_scale: values must have the mask's size {list(mask.shape)}")
    return torch.empty_like(_like(mask), dtype=values.dtype)  # the mask's strides (dense) or contiguous


@torch.library.register_fake("manualconv::select_backward")
def _(grad_output, support):
    torch._check(support.dtype == torch.bool, lambda: f"select_backward: support must be a bool tensor, but got dtype {support.dtype}")
    torch._check(grad_output.shape == support.shape,
                 lambda: f"select_backward: grad_output must have the support's size {list(support.shape)}")
    return _like(support).to(grad_output.dtype)


# csrc/activations.cpp's kinds and their parameter counts: reference.py's formulas f(x, *params)
ACTIVATION_PARAMS = {kind: len(inspect.signature(forward).parameters) - 1
                     for kind, (forward, _) in reference.ACTIVATIONS.items()}


def _check_activation(op: str, kind: str, params) -> None:
    torch._check(kind in ACTIVATION_PARAMS,
                 lambda: f"{op}: kind must be one of {', '.join(ACTIVATION_PARAMS)}, but got kind={kind}")
    torch._check(len(params) == ACTIVATION_PARAMS[kind],
                 lambda: f"{op}: {kind} takes {ACTIVATION_PARAMS[kind]} params, but got {len(params)}")


@torch.library.register_fake("manualconv::activation_forward")
def _(input, kind, params):
    _check_activation("activation_forward", kind, params)
    return _like(input)


@torch.library.register_fake("manualconv::activation_backward")
def _(grad_output, input, kind, params):
    _check_activation("activation_backward", kind, params)
    torch._check(grad_output.shape == input.shape,
                 lambda: f"activation_backward: grad_output must have the input's size {list(input.shape)}")
    return _like(input)


# the squashing functions of activation_backward_from_output and their parameter counts
SQUASHING_PARAMS = {kind: len(inspect.signature(grad).parameters) - 2 for kind, grad in reference.SQUASHING.items()}


@torch.library.register_fake("manualconv::activation_backward_from_output")
def _(grad_output, output, kind, params):
    op = "activation_backward_from_output"
    torch._check(kind in SQUASHING_PARAMS,
                 lambda: f"{op}: kind must be one of {', '.join(SQUASHING_PARAMS)}, but got kind={kind}")
    torch._check(len(params) == SQUASHING_PARAMS[kind],
                 lambda: f"{op}: {kind} takes {SQUASHING_PARAMS[kind]} params, but got {len(params)}")
    torch._check(grad_output.shape == output.shape,
                 lambda: f"{op}: grad_output must have the output's size {list(output.shape)}")
    return _like(output)


def _check_softmax(op: str, input, dim: int) -> None:
    rank = max(input.dim(), 1)
    torch._check(-rank <= dim < rank,
                 lambda: f"{op}: dim out of range (expected to be in range of [{-rank}, {rank - 1}], but got {dim})")


@torch.library.register_fake("manualconv::softmax_forward")
def _(input, dim, log):
    _check_softmax("softmax_forward", input, dim)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("manualconv::softmax_backward")
def _(grad_output, output, dim, log):
    _check_softmax("softmax_backward", output, dim)
    torch._check(grad_output.shape == output.shape,
                 lambda: f"softmax_backward: grad_output must have the output's size {list(output.shape)}")
    return torch.empty_like(output, memory_format=torch.contiguous_format)
