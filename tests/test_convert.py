"""manualconv.convert / revert on whole models, and LeNet-5 built from manualconv layers only."""

from __future__ import annotations

import pytest
import torch
import torchvision

import manualconv

# (model name, constructor kwargs, input size): small inputs and 10 classes, to stay fast on 2
# cores; 4 samples of 64×64 leave batch norm 16+ values per channel even at the last (2×2) maps
TORCHVISION = [
    ("resnet18", {}, (4, 3, 64, 64)),
    ("vgg11_bn", {}, (4, 3, 64, 64)),
    ("mobilenet_v2", {}, (4, 3, 64, 64)),
    ("squeezenet1_1", {}, (4, 3, 64, 64)),
    ("efficientnet_b0", {}, (4, 3, 64, 64)),
    ("shufflenet_v2_x0_5", {}, (4, 3, 64, 64)),
    ("googlenet", dict(aux_logits=False, init_weights=True), (4, 3, 64, 64)),
    ("alexnet", {}, (4, 3, 64, 64)),
]


def _outputs_and_grads(model, x, train):
    model.train(train)
    torch.manual_seed(0)  # dropout draws the same masks in both models
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])
    return out, grads


# Whole models run on the C++ backend only: the reference kernels are checked against it on the
# case table (test_ops.test_backends_agree) and would take minutes on these networks.
@pytest.mark.parametrize("name,kwargs,size", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_converted_torchvision_model_matches(name, kwargs, size, cpp):
    torch.manual_seed(0)
    native = getattr(torchvision.models, name)(num_classes=10, **kwargs).double()
    converted = manualconv.convert(native)
    assert any(type(m).__module__.startswith("manualconv") for m in converted.modules()), name
    x = torch.randn(size, dtype=torch.float64)
    for train in (True, False):
        out_native, grads_native = _outputs_and_grads(native, x, train)
        out, grads = _outputs_and_grads(converted, x, train)
        # float64 through a whole network: rounding of ~1e-16 per operation, amplified by the
        # depth and by batch norm's division by small spreads, stays below 1e-9 of the largest
        # gradient entry. The scale is the model's largest gradient, since some gradients are
        # exactly zero (a conv bias before batch norm) and then both sides are rounding noise.
        # A real difference in a layer is of the order of the values themselves.
        rtol = 1e-9
        assert (out - out_native).abs().max() <= rtol * out_native.abs().max(), f"{name} train={train}: output differs"
        scale = max(h.abs().max().item() for h in grads_native)
        for (pname, _), g, h in zip(converted.named_parameters(), grads, grads_native):
            assert (g - h).abs().max().item() <= rtol * scale, f"{name} train={train}: grad of {pname} differs"


def test_converted_resnet_float32(cpp):
    """float32: outputs agree to 1e-4 of their largest entry, gradients to 1e-4 of the largest
    gradient entry (float32 rounding of ~1e-7 per operation, compounded over ~20 layers and
    batch norm; the scale is global because some gradients are rounding noise around zero)."""
    torch.manual_seed(0)
    native = torchvision.models.resnet18(num_classes=10)
    converted = manualconv.convert(native)
    x = torch.randn(4, 3, 64, 64)
    out_native, grads_native = _outputs_and_grads(native, x, True)
    out, grads = _outputs_and_grads(converted, x, True)
    assert (out - out_native).abs().max() <= 1e-4 * out_native.abs().max()
    scale = max(h.abs().max().item() for h in grads_native)
    for (name, _), g, h in zip(converted.named_parameters(), grads, grads_native):
        assert (g - h).abs().max().item() <= 1e-4 * scale, f"grad of {name} differs"


def test_convert_keeps_parameters_buffers_mode_and_state_dict():
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                 torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    native[0].weight.requires_grad_(False)
    native.eval()
    copy = manualconv.convert(native)
    assert type(native[0]) is torch.nn.Conv2d, "convert(inplace=False) must leave the original alone"
    assert type(copy[0]) is manualconv.Conv2d and type(copy[6]) is manualconv.Linear
    assert type(copy[1]) is manualconv.BatchNorm2d, "batch norm (with its buffers) is converted"
    assert type(copy[2]) is torch.nn.InstanceNorm2d, "unsupported layers stay as they are"
    assert not copy.training and not copy[0].weight.requires_grad
    assert copy[0].weight is not native[0].weight and torch.equal(copy[0].weight, native[0].weight)
    for key, value in native.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    same = manualconv.convert(native, inplace=True)
    assert same is native and type(native[0]) is manualconv.Conv2d
    weight = native[0].weight
    reverted = manualconv.revert(native, inplace=True)
    assert type(reverted[0]) is torch.nn.Conv2d and reverted[0].weight is weight
    reverted.load_state_dict(copy.state_dict())
    copy.load_state_dict(reverted.state_dict())


def test_convert_leaves_subclasses_alone():
    class MyConv(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyConv(1, 1, 1))
    assert type(manualconv.convert(model)[0]) is MyConv
    with pytest.raises(TypeError, match="torch.nn.Module"):
        manualconv.convert("not a model")


def test_lenet5_backward_graph_is_hand_derived(backend):
    """Every node of a LeNet-5 training step's backward graph is a manualconv autograd Function,
    a view, or the accumulation into a parameter."""
    torch.manual_seed(0)
    net = manualconv.models.LeNet5(in_channels=3)
    loss = manualconv.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    manual = {n for n in names if n.endswith("FunctionBackward")}
    views = {n for n in names if n.startswith(("View", "Reshape", "UnsafeView", "Flatten", "Permute"))}
    assert {"Conv2dFunctionBackward", "Subsampling2dFunctionBackward", "TanhFunctionBackward",
            "LinearFunctionBackward", "LogSoftmaxFunctionBackward", "NLLLossFunctionBackward"} <= manual, names
    assert names - manual - views == {"AccumulateGrad"}, names - manual - views
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_lenet5_grads_match_plain_autograd(backend):
    """LeNet-5's hand-derived gradients equal autograd's through the same model built from
    torch's own ops (Subsampling2d as reshape + sum)."""
    torch.manual_seed(0)
    net = manualconv.models.LeNet5(in_channels=1).double()
    x, target = torch.randn(3, 1, 32, 32, dtype=torch.float64), torch.tensor([1, 5, 9])

    def plain(x):
        f = lambda t: 1.7159 * torch.tanh(2.0 / 3.0 * t)  # noqa: E731
        conv1, sub2, conv3, sub4 = net.features[0], net.features[2], net.features[4], net.features[6]
        for conv, sub in ((conv1, sub2), (conv3, sub4)):
            x = f(torch.nn.functional.conv2d(x, conv.weight, conv.bias))
            n, c, h, w = x.shape
            x = f(x.reshape(n, c, h // 2, 2, w // 2, 2).sum(dim=(3, 5)) * sub.weight.reshape(1, -1, 1, 1) + sub.bias.reshape(1, -1, 1, 1))
        x = x.flatten(1)
        fc1, fc2, fc3 = net.classifier[0], net.classifier[2], net.classifier[4]
        return torch.nn.functional.linear(f(torch.nn.functional.linear(f(torch.nn.functional.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)), fc3.weight, fc3.bias)

    params = list(net.parameters())
    ours = torch.autograd.grad(manualconv.functional.cross_entropy(net(x), target), params)
    theirs = torch.autograd.grad(torch.nn.functional.cross_entropy(plain(x), target), params)
    for (name, _), a, b in zip(net.named_parameters(), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_lenet5_rejects_wrong_input():
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        manualconv.models.LeNet5(in_channels=2)
    with pytest.raises(ValueError, match="32×32"):
        manualconv.models.LeNet5()(torch.randn(1, 1, 28, 28))
