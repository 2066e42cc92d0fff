"""manualconv.capture(): covered torch / torch.nn.functional calls run as manualconv's, everything
else passes through; convert(model) runs the model's forward under it, revert removes it."""

from __future__ import annotations

import copy
import importlib
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import sys

import manualconv
from manualconv.verify import native_backward_nodes

capture_module = sys.modules["manualconv.capture"]  # manualconv.capture is the context manager


def grad_fn_names(output: torch.Tensor):
    """Every node type of the backward graph behind ``output``."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def native_nodes(output: torch.Tensor):
    """Backward nodes of torch's own layers (ConvolutionBackward0, ReluBackward0, ...): neither
    manualconv Functions nor the glue of manualconv/verify.py::GLUE_NODES."""
    return set(native_backward_nodes(output))


torch.manual_seed(0)
X = torch.randn(2, 3, 8, 8, dtype=torch.float64)
W = torch.randn(4, 3, 3, 3, dtype=torch.float64)
B = torch.randn(4, dtype=torch.float64)
# (id, call, expected manualconv Function): each spelling of each covered call
CALLS = [
    ("F.conv2d", lambda x: F.conv2d(x, W, B, padding=1), "Conv2dFunctionBackward"),
    ("torch.conv2d", lambda x: torch.conv2d(x, W, None, 1, 1), "Conv2dFunctionBackward"),
    ("F.conv1d", lambda x: F.conv1d(x.flatten(2), W[:, :, 0], stride=2), "Conv2dFunctionBackward"),
    ("F.conv_transpose2d", lambda x: F.conv_transpose2d(x, W.transpose(0, 1), stride=2), "Conv2dGradInputFunctionBackward"),
    ("F.max_pool2d", lambda x: F.max_pool2d(x, 2), "MaxPool2dFunctionBackward"),
    ("F.max_pool2d indices", lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True)[0], "MaxPool2dFunctionBackward"),
    ("torch.max_pool2d", lambda x: torch.max_pool2d(x, 2), "MaxPool2dFunctionBackward"),
    ("F.avg_pool2d", lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), "AvgPool2dFunctionBackward"),
    ("F.adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), "AdaptiveAvgPool2dFunctionBackward"),
    ("F.adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, 3), "AdaptiveMaxPool2dFunctionBackward"),
    ("F.adaptive_max_pool2d indices", lambda x: F.adaptive_max_pool2d(x, 3, True)[0], "AdaptiveMaxPool2dFunctionBackward"),
    ("F.linear", lambda x: F.linear(x, W.flatten(1)[:, :8]), "LinearFunctionBackward"),
    ("F.relu", lambda x: F.relu(x), "ReLUFunctionBackward"),
    ("torch.relu", lambda x: torch.relu(x), "ReLUFunctionBackward"),
    ("x.relu", lambda x: x.relu(), "ReLUFunctionBackward"),
    ("F.sigmoid", lambda x: F.sigmoid(x), "SigmoidFunctionBackward"),
    ("torch.sigmoid", lambda x: torch.sigmoid(x), "SigmoidFunctionBackward"),
    ("x.tanh", lambda x: x.tanh(), "TanhFunctionBackward"),
    ("F.gelu", lambda x: F.gelu(x), "GELUFunctionBackward"),
    ("F.gelu tanh", lambda x: F.gelu(x, approximate="tanh"), "GELUFunctionBackward"),
    ("F.silu", lambda x: F.silu(x), "SiLUFunctionBackward"),
    ("F.relu6", lambda x: F.relu6(x), "HardtanhFunctionBackward"),
    ("F.hardtanh", lambda x: F.hardtanh(x, -0.5, 2.0), "HardtanhFunctionBackward"),
    ("F.hardswish", lambda x: F.hardswish(x), "HardswishFunctionBackward"),
    ("F.hardsigmoid", lambda x: F.hardsigmoid(x), "HardsigmoidFunctionBackward"),
    ("F.leaky_relu", lambda x: F.leaky_relu(x, 0.2), "LeakyReLUFunctionBackward"),
    ("F.elu", lambda x: F.elu(x, alpha=0.5), "ELUFunctionBackward"),
    ("F.softmax", lambda x: F.softmax(x, dim=1), "SoftmaxFunctionBackward"),
    ("torch.softmax", lambda x: torch.softmax(x, -1), "SoftmaxFunctionBackward"),
    ("x.softmax", lambda x: x.softmax(1), "SoftmaxFunctionBackward"),
    ("F.log_softmax", lambda x: F.log_softmax(x, 1), "LogSoftmaxFunctionBackward"),
    ("x.log_softmax", lambda x: x.log_softmax(dim=0), "LogSoftmaxFunctionBackward"),
    ("F.cross_entropy", lambda x: F.cross_entropy(x.flatten(1)[:, :5], torch.tensor([1, 4])), "NLLLossFunctionBackward"),
    ("F.cross_entropy-probabilities", lambda x: F.cross_entropy(x.flatten(1)[:, :5], x.flatten(1)[:, :5].softmax(1).detach()), "CrossEntropyFunctionBackward"),
]
INPLACE_CALLS = [
    ("F.relu inplace", lambda x: F.relu(x, inplace=True)), ("F.relu_", lambda x: F.relu_(x)),
    ("torch.relu_", lambda x: torch.relu_(x)), ("x.relu_", lambda x: x.relu_()),
    ("F.relu6 inplace", lambda x: F.relu6(x, inplace=True)), ("F.hardtanh_", lambda x: F.hardtanh_(x)),
    ("F.silu inplace", lambda x: F.silu(x, inplace=True)), ("F.hardswish inplace", lambda x: F.hardswish(x, True)),
    ("F.hardsigmoid inplace", lambda x: F.hardsigmoid(x, True)), ("F.leaky_relu_", lambda x: F.leaky_relu_(x, 0.3)),
    ("F.elu_", lambda x: F.elu_(x)),
]


def run(call, capturing: bool):
    x = X.clone().requires_grad_(True)
    if capturing:
        with manualconv.capture():
            y = call(x)
    else:
        y = call(x)
    torch.manual_seed(1)
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    return y, g


@pytest.mark.parametrize("name,call,function", CALLS, ids=[c[0] for c in CALLS])
def test_covered_call_is_routed(name, call, function, cpp):
    y, g = run(call, capturing=True)
    y_native, g_native = run(call, capturing=False)
    assert type(y.grad_fn).__name__ == function or function in grad_fn_names(y), grad_fn_names(y)
    assert not native_nodes(y), native_nodes(y)
    assert native_nodes(y_native), "the check can fail: torch's own call leaves its backward node"
    # float64: manualconv and torch order their sums differently, a few units of 2⁻⁵³ per term
    torch.testing.assert_close(y, y_native, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_native, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,call", INPLACE_CALLS, ids=[c[0] for c in INPLACE_CALLS])
def test_inplace_call_is_routed_and_stays_in_place(name, call):
    results = []
    for capturing in (True, False):
        leaf = X.clone().requires_grad_(True)
        a = leaf * 1
        if capturing:
            with manualconv.capture():
                out = call(a)
        else:
            out = call(a)
        assert out is a, "an in-place call returns its input"
        (g,) = torch.autograd.grad(out.pow(2).sum(), leaf)
        results.append((out.detach(), g, native_nodes(out)))
    (y, g, native), (y_t, g_t, native_t) = results
    assert not native, native
    assert native_t
    torch.testing.assert_close(y, y_t, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g, g_t, rtol=1e-14, atol=1e-14)


def test_unservable_calls_pass_through():
    """Integer, half and complex tensors, tensor subclasses: torch's own result and backward."""
    ints = torch.tensor([-1, 2, -3])
    half = torch.randn(5, dtype=torch.float16, requires_grad=True)
    with manualconv.capture():
        assert torch.equal(F.relu(ints), torch.tensor([0, 2, 0]))
        assert torch.equal(torch.softmax(ints, 0, dtype=torch.float32), torch.softmax(ints.float(), 0))
        assert type(F.gelu(half).grad_fn).__name__ == "GeluBackward0"
        assert type(torch.tanh(torch.randn(3, dtype=torch.complex64, requires_grad=True)).grad_fn).__name__ == "TanhBackward0"
        param = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        assert type(F.silu(param).grad_fn).__name__ == "SiLUFunctionBackward"  # Parameter is served
        # an argument value manualconv does not serve: a float16 result dtype
        x = X.clone().requires_grad_(True)
        assert type(F.softmax(x, 1, dtype=torch.float16).grad_fn).__name__ == "SoftmaxBackward0"
        assert type(F.softmax(x, 1, dtype=torch.float32).grad_fn).__name__ == "SoftmaxFunctionBackward"


def test_bad_arguments_raise_torchs_exception_under_capture():
    with manualconv.capture():
        with pytest.raises(ValueError, match="min_val"):
            F.hardtanh(X, 2.0, 1.0)
        with pytest.raises(IndexError, match="Dimension out of range"):
            X.softmax(7)
        with pytest.raises(RuntimeError, match="approximate"):
            F.gelu(X, approximate="erf")


def count_routes(monkeypatch):
    """Replace every route by a counting wrapper; returns the list of routed functions' names."""
    routed = []

    def counting(route):
        def wrapper(*args, **kwargs):
            routed.append(route.__name__)
            return route(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(capture_module, "ROUTES", {f: counting(r) for f, r in capture_module.ROUTES.items()})
    return routed


def test_manualconvs_own_calls_and_backward_are_not_rerouted(monkeypatch):
    """torch.tanh inside GELU('tanh') and torch.sigmoid inside SiLU (manualconv's own code), and
    everything in a backward pass, run as torch's: only the user's call is routed."""
    routed = count_routes(monkeypatch)
    x = X.clone().requires_grad_(True)
    with manualconv.capture():
        y = F.gelu(x, approximate="tanh")
        assert routed == ["gelu"]
        z = manualconv.SiLU()(y) + manualconv.functional.gelu(y, "tanh")
        assert routed == ["gelu"]
        (g,) = torch.autograd.grad(z.sum(), x, create_graph=True)
        g.sum().backward()
        assert routed == ["gelu"]
        torch.sigmoid(x)
    assert routed == ["gelu", "sigmoid"]


class FunctionalNet(torch.nn.Module):
    """A model whose forward uses functional calls only (as torchvision's densenet, inception do)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x), inplace=True), 2)
        x = F.hardswish(x).mean((2, 3))
        return F.log_softmax(self.fc(x), dim=1)


def test_converted_model_forward_is_captured_and_revert_removes_it():
    torch.manual_seed(2)
    native = FunctionalNet().double()
    converted = manualconv.convert(native)
    x = X.clone().requires_grad_(True)
    out = converted(x)
    assert not native_nodes(out), native_nodes(out)
    # (F.relu(inplace=True): ReLU in place, its derivative read from the overwritten input)
    assert {"InplaceActivationFromOutputFunctionBackward", "HardswishFunctionBackward",
            "LogSoftmaxFunctionBackward", "MaxPool2dFunctionBackward"} <= grad_fn_names(out)
    out_native = native(x)
    assert native_nodes(out_native), "the original model is untouched"
    torch.testing.assert_close(out, out_native, rtol=1e-12, atol=1e-12)
    assert not torch.overrides._get_current_function_mode_stack(), "no capture left active after forward"
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert not native_nodes(copied(x))
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    assert not native_nodes(torch.load(buffer, weights_only=False)(x))
    assert converted.state_dict().keys() == native.state_dict().keys()
    reverted = manualconv.revert(converted)
    assert {"ReluBackward0", "LogSoftmaxBackward0"} <= native_nodes(reverted(x))
    assert not native_nodes(converted(x)), "revert(inplace=False) leaves the converted model alone"
    manualconv.convert(converted, inplace=True)  # converting twice: still one capture per forward
    assert not native_nodes(converted(x)) and not torch.overrides._get_current_function_mode_stack()
    assert not converted._forward_pre_hooks and not converted._forward_hooks, "no hook on the model itself"


def test_manualconv_layers_step_out_of_the_capture():
    """A converted model's manualconv layers run their forward outside the capture (their calls
    are manualconv's own, never routed): a conv and a linear layer add no call the capture sees,
    while the model's own functional calls around them are still routed, the capture is back on
    top after each layer, and a user's forward pre-hook on a layer still runs captured."""
    converted = manualconv.convert(FunctionalNet().double())
    seen = []
    module = importlib.import_module("manualconv.capture")  # (manualconv.capture is the class)
    original = module.capture.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return original(self, func, types, args, kwargs)

    module.capture.__torch_function__ = spy
    try:
        out = converted(X)
        assert {"InplaceActivationFromOutputFunctionBackward", "HardswishFunctionBackward",
                "LogSoftmaxFunctionBackward"} <= grad_fn_names(out)
        assert sorted(seen) == sorted(["relu", "max_pool2d", "hardswish", "mean", "log_softmax"]), seen
        seen.clear()
        hook_calls = []
        converted.conv.register_forward_pre_hook(lambda m, args: hook_calls.append(F.relu(args[0]).grad_fn))
        converted(X.clone().requires_grad_(True))
        assert type(hook_calls[0]).__name__ == "ReLUFunctionBackward", "the pre-hook's F.relu is routed"
        layer_calls = [name for name in seen if name not in ("relu", "max_pool2d", "hardswish", "mean", "log_softmax")]
        assert layer_calls, "a layer with a user's pre-hook keeps the capture (its own calls are seen)"
    finally:
        module.capture.__torch_function__ = original
    assert not torch.overrides._get_current_function_mode_stack()


def test_capture_is_left_when_forward_raises():
    converted = manualconv.convert(FunctionalNet().double())
    with pytest.raises(RuntimeError):
        converted(torch.randn(2, 5, 8, 8, dtype=torch.float64))  # wrong channel count
    assert not torch.overrides._get_current_function_mode_stack()
    assert type(F.relu(X.clone().requires_grad_(True)).grad_fn).__name__ == "ReluBackward0"


RM, RV = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
G, BETA = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
NORM_CALLS = [
    ("F.batch_norm train", lambda x: F.batch_norm(x, RM.clone(), RV.clone(), G, BETA, True, 0.1, 1e-5)),
    ("F.batch_norm eval", lambda x: F.batch_norm(x, RM, RV, G, BETA)),
    ("torch.batch_norm", lambda x: torch.batch_norm(x, G, BETA, RM.clone(), RV.clone(), True, 0.1, 1e-5, False)),
    ("F.layer_norm", lambda x: F.layer_norm(x, (8, 8), G.new_ones(8, 8) * 2, None, 1e-5)),
    ("torch.layer_norm", lambda x: torch.layer_norm(x, (8,), None, None, 1e-5, False)),
    ("F.group_norm", lambda x: F.group_norm(x, 3, G, BETA)),
    ("torch.group_norm", lambda x: torch.group_norm(x, 1, G, BETA, 1e-5, False)),
    ("F.dropout eval", lambda x: F.dropout(x, 0.3, training=False) * 1),
    ("F.dropout", lambda x: (torch.manual_seed(5), F.dropout(x, 0.3))[1]),
]


@pytest.mark.parametrize("name,call", NORM_CALLS, ids=[c[0] for c in NORM_CALLS])
def test_norm_and_dropout_calls_are_routed_once_converted(name, call, cpp):
    """The norm and dropout routes serve once convert's table lists the layer (it does now)."""
    y, g = run(call, capturing=True)
    y_native, g_native = run(call, capturing=False)
    assert not native_nodes(y), native_nodes(y)
    torch.testing.assert_close(y, y_native, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_native, rtol=1e-12, atol=1e-12)


def test_converted_model_compiles_fullgraph_and_matches_eager(cpp):
    """torch.compile(fullgraph=True) of a converted model with the whole layer family: the jvp rules
    are hidden from dynamo (autograd.forward_mode_rule) and capture passes calls through while
    compiling, so nothing breaks the graph; outputs and gradients equal eager's (float64, same sums)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.GELU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 5), torch.nn.LayerNorm(5)).double()
    model = manualconv.convert(net)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])

    def run(m):
        out = m(x)
        loss = manualconv.functional.cross_entropy(out, target)
        return [out] + list(torch.autograd.grad(loss, [x] + list(model.parameters())))

    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
