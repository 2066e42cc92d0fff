"""The compute path never calls a native convolution, pooling, unfold/fold (im2col/col2im) or
their backward: every aten op of forward + backward + double backward is recorded and checked."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import manualconv

FORBIDDEN = re.compile(r"conv|pool|im2col|col2im|unfold|fold|mkldnn|cudnn|miopen|nnpack", re.IGNORECASE)


class RecordAtenOps(TorchDispatchMode):
    """Records the name of every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))


def forbidden(names):
    return sorted(n for n in names if n.startswith("aten::") and FORBIDDEN.search(n))


def forward_backward_double_backward(conv, max_pool, avg_pool, padding_mode="zeros"):
    """A conv (all options) + max pool + avg pool, differentiated twice."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 11, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = conv(x, w, b, stride=2, padding=1, dilation=2, groups=2)
    y = max_pool(y, 3, stride=1, padding=1, ceil_mode=True) + avg_pool(y, 3, stride=1, padding=1, count_include_pad=False)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b), create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    return x.grad


def layer_family_double_backward():
    """Every other manualconv op in one graph, differentiated twice."""
    MF = manualconv.functional
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    w_t = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w_1 = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w_fc = torch.randn(5, 2 * 3 * 3 + 3 * 2, dtype=torch.float64, requires_grad=True)
    y = MF.conv_transpose2d(x, w_t, stride=2, padding=1, output_padding=1)          # (2, 3, 16, 16)
    y = MF.subsampling2d(MF.tanh(y), beta, None, 2)                                # (2, 3, 8, 8)
    a = MF.adaptive_max_pool2d(MF.relu(y), (3, 3))                                 # (2, 3, 3, 3)
    b = MF.adaptive_avg_pool2d(MF.sigmoid(y), (1, 2)).flatten(2)                   # (2, 3, 2)
    c = MF.conv1d(a.flatten(2), w_1, padding=1)                                    # (2, 2, 9)
    logits = MF.linear(torch.cat([c.flatten(1), b.flatten(1)], dim=1), w_fc)
    loss = MF.cross_entropy(logits, torch.tensor([1, 4]), label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (x, w_t, w_1, beta, w_fc), create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    return x.grad


def test_audit_detects_native_ops():
    """The audit can fail: the native layers are caught by it."""
    with RecordAtenOps() as recorder:
        forward_backward_double_backward(F.conv2d, F.max_pool2d, F.avg_pool2d)
    found = forbidden(recorder.names)
    assert any("convolution" in n for n in found) and any("pool" in n for n in found), found
    with RecordAtenOps() as recorder:
        torch.randn(1, 1, 4, 4).unfold(2, 2, 1)
        F.unfold(torch.randn(1, 1, 4, 4), 2)
    assert forbidden(recorder.names), recorder.names


def test_no_native_conv_or_pool_in_compute_path(backend):
    with RecordAtenOps() as recorder:
        grad = forward_backward_double_backward(
            manualconv.functional.conv2d, manualconv.functional.max_pool2d, manualconv.functional.avg_pool2d)
    assert grad is not None
    assert not forbidden(recorder.names), forbidden(recorder.names)
    if backend == "cpp":  # the kernels really ran
        assert {"manualconv::conv2d_forward", "manualconv::conv2d_grad_input", "manualconv::conv2d_grad_weight",
                "manualconv::max_pool2d_forward", "manualconv::max_pool2d_backward",
                "manualconv::avg_pool2d_forward", "manualconv::avg_pool2d_backward"} <= recorder.names


def test_no_native_ops_in_the_layer_family(backend):
    with RecordAtenOps() as recorder:
        assert layer_family_double_backward() is not None
    assert not forbidden(recorder.names), forbidden(recorder.names)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_no_native_conv_with_padding_modes(padding_mode, backend):
    conv = manualconv.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    with RecordAtenOps() as recorder:
        (gx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
        gx.sum().backward()
    assert not forbidden(recorder.names), forbidden(recorder.names)


def test_no_native_ops_inside_the_cpp_kernels():
    """Dispatch modes see only the op boundary; the profiler also records the aten ops that the
    C++ kernels call internally (BLAS matmuls, zeros, ...)."""
    with manualconv.use_backend("cpp"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            forward_backward_double_backward(
                manualconv.functional.conv2d, manualconv.functional.max_pool2d, manualconv.functional.avg_pool2d)
            layer_family_double_backward()
    names = {event.name for event in profile.events()}
    assert "manualconv::conv2d_forward" in names, sorted(names)
    assert not forbidden(names), forbidden(names)


@pytest.mark.parametrize("pool", ["max_pool2d", "adaptive_max_pool2d"])
def test_max_pool_backward_materialises_no_zero_index_gradient(pool):
    """The indices output is non-differentiable; autograd would still hand backward a zero tensor of
    their size (int64: twice y's bytes) unless the Function declines it (set_materialize_grads)."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    y = getattr(manualconv.functional, pool)(x, 2)
    record = RecordAtenOps()
    with record:
        y.backward(torch.ones_like(y))
    assert not {"aten::zeros", "aten::zeros_like", "aten::new_zeros"} & record.names, sorted(record.names)
