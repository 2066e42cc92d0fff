"""The C++ kernels are proper torch.library operators: opcheck passes (schema, fake kernels,
dynamic-shape tracing), torch.compile(fullgraph=True) matches eager, and torch.func composes
with the autograd Functions."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import manualconv
import manualconv.functional as MF
from cases import OPS, call, make_inputs
from oracle import output_of


class KernelCalls(TorchDispatchMode):
    """Records each torch.ops.manualconv operator call (with detached copies of its arguments)
    made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "manualconv":
            keep = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, tree_map(keep, args)))
        return func(*args, **(kwargs or {}))


def kernel_calls(case):
    """(operator, args) for each kernel the case runs on the cpp backend, forward and backward,
    in float32: the calls manualconv itself makes, recorded."""
    tensors = [t.requires_grad_(t.is_floating_point()) for t in make_inputs(case, torch.float32)]
    with manualconv.use_backend("cpp"), KernelCalls() as recorder:
        out = output_of(call(case, "manual", *tensors))
        torch.autograd.grad(out, [t for t in tensors if t.requires_grad], torch.randn_like(out))
    return recorder.calls


OPCHECKED = [case for record in OPS.values() for case in record.samples if case.name in record.opcheck]


@pytest.mark.parametrize("case", OPCHECKED, ids=str)
def test_opcheck(case):
    calls = kernel_calls(case)
    record = OPS[case.op]
    expected = set(record.kernels) | (set(record.bias_kernels) if case.bias else set())
    assert {op._opname for op, _ in calls} == expected, f"{case}: {calls}"
    for op, args in calls:
        torch.library.opcheck(op, args)


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = manualconv.Conv2d(3, 8, 3, padding=1)
        self.pool1 = manualconv.MaxPool2d(2)
        self.conv2 = manualconv.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.pool2 = manualconv.AvgPool2d(2, ceil_mode=True)
        self.head = torch.nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net, x = SmallNet(), torch.randn(4, 3, 12, 12)
    with manualconv.use_backend("cpp"):
        eager_out = net(x)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), list(net.parameters()))
        torch._dynamo.reset()
        compiled = torch.compile(net, fullgraph=True)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    # the same kernels run in both; inductor may fuse the elementwise ops around them, so allow
    # float32 rounding of those few operations
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_torch_func_grad_matches_autograd(backend):
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def loss(weight):
        y = MF.conv2d(x, weight, stride=2, padding=1)
        return (MF.max_pool2d(y, 2, ceil_mode=True).sum() + MF.avg_pool2d(y, 2).square().sum())

    expected = torch.autograd.grad(loss(w), w)[0]
    torch.testing.assert_close(torch.func.grad(loss)(w.detach()), expected, rtol=0, atol=0)
