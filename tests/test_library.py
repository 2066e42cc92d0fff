"""The C++ kernels are proper torch.library operators: opcheck passes (schema, fake kernels,
dynamic-shape tracing), torch.compile(fullgraph=True) matches eager, and torch.func composes
with the autograd Functions."""

from __future__ import annotations

import pytest
import torch

import manualconv
import manualconv.functional as MF
from cases import SAMPLES, make_inputs
from manualconv.checks import pair

ops = torch.ops.manualconv
OPCHECKED = {"conv2d-k3-pad1", "conv2d-dilation3-stride2", "conv2d-depthwise-multiplier", "conv2d-no-bias",
             "max_pool2d-ceil-mode-padding", "max_pool2d-dilation2", "avg_pool2d-padding-exclude",
             "avg_pool2d-divisor-override-ceil", "conv2d-channels-last-strided-dilated-groups",
             "conv2d-channels-last-1x1", "max_pool2d-channels-last-padding-dilation-ceil",
             "conv2d-channels-last-direct-16"}


def kernel_calls(case):
    """(operator, args) for each kernel a case exercises, in the kernels' own (batched) terms."""
    tensors = make_inputs(case, torch.float32)
    x = tensors[0] if tensors[0].dim() == 4 else tensors[0].unsqueeze(0)
    kw = case.kwargs
    if case.op == "conv2d":
        weight, bias = tensors[1], (tensors[2] if len(tensors) > 2 else None)
        conf = (list(pair(kw.get("stride", 1), "stride", "")), list(pair(kw.get("padding", 0), "padding", "")),
                list(pair(kw.get("dilation", 1), "dilation", "")), kw.get("groups", 1))
        y = ops.conv2d_forward(x, weight, bias, *conf)
        delta = torch.randn_like(y)
        return [(ops.conv2d_forward.default, (x, weight, bias, *conf)),
                (ops.conv2d_grad_input.default, (delta, weight, list(x.shape), *conf)),
                (ops.conv2d_grad_weight.default, (x, delta, list(weight.shape), *conf))]
    kernel = list(pair(kw["kernel_size"], "kernel_size", ""))
    stride = kernel if kw.get("stride") is None else list(pair(kw["stride"], "stride", ""))
    padding = list(pair(kw.get("padding", 0), "padding", ""))
    if case.op == "max_pool2d":
        conf = (kernel, stride, padding, list(pair(kw.get("dilation", 1), "dilation", "")), kw.get("ceil_mode", False))
        y, indices = ops.max_pool2d_forward(x, *conf)
        return [(ops.max_pool2d_forward.default, (x, *conf)),
                (ops.max_pool2d_backward.default, (torch.randn_like(y), indices, list(x.shape)))]
    conf = (kernel, stride, padding, kw.get("ceil_mode", False), kw.get("count_include_pad", True), kw.get("divisor_override"))
    y = ops.avg_pool2d_forward(x, *conf)
    return [(ops.avg_pool2d_forward.default, (x, *conf)),
            (ops.avg_pool2d_backward.default, (torch.randn_like(y), list(x.shape), *conf))]


@pytest.mark.parametrize("case", [c for c in SAMPLES if str(c) in OPCHECKED], ids=str)
def test_opcheck(case):
    for op, args in kernel_calls(case):
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
