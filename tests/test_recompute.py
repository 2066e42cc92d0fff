"""ReLU outputs after a training batch norm rebuilt in the backward (manualconv/recompute.py).

The claim is exact: with recomputation on, every output and gradient equals the one with it off
bit for bit (the rebuilt y comes from the forward's own kernel calls), while the graph keeps no
such y. Each test compares on with off, so a rebuild that drifted by one ulp fails; the saved-
tensor walk proves the rebuild happened (with it off, the same walk finds y kept, so it can fail).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import manualconv
from manualconv import models, recompute
from manualconv.verify import backward_nodes


@contextlib.contextmanager
def recomputing(enabled):
    """True: every activation rebuilt ('all'); False: none; or a mode's name."""
    before = recompute.get_recompute()
    recompute.set_recompute({True: "all", False: "none"}.get(enabled, enabled))
    try:
        yield
    finally:
        recompute.set_recompute(before)


# every activation that can follow a batch norm, each in-place path: ReLU keeps y (relu_: y in
# place), hardtanh/ReLU6 in place a mask, the others x (in place: a copy of x)
ACTIVATIONS = {
    "relu": lambda: manualconv.ReLU(), "relu_": lambda: manualconv.ReLU(inplace=True),
    "relu6": lambda: manualconv.ReLU6(), "relu6_": lambda: manualconv.ReLU6(inplace=True),
    "gelu": lambda: manualconv.GELU(), "gelu_tanh": lambda: manualconv.GELU("tanh"),
    "silu": lambda: manualconv.SiLU(), "silu_": lambda: manualconv.SiLU(inplace=True),
    "hardswish": lambda: manualconv.Hardswish(), "hardsigmoid_": lambda: manualconv.Hardsigmoid(inplace=True),
    "leaky_relu_": lambda: manualconv.LeakyReLU(0.1, inplace=True), "elu": lambda: manualconv.ELU(),
}


def block(activation: str = "relu", dtype=torch.float32) -> torch.nn.Module:
    """conv → BN → ReLU → conv → BN → activation → conv (the activation's both neighbours as in a CNN)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(manualconv.Conv2d(3, 6, 3, padding=1), manualconv.BatchNorm2d(6), manualconv.ReLU(),
                              manualconv.Conv2d(6, 5, 3, padding=1, bias=False), manualconv.BatchNorm2d(5),
                              ACTIVATIONS[activation](), manualconv.Conv2d(5, 4, 3, stride=2)).to(dtype)
    with torch.no_grad():  # γ, β away from 1, 0; some negative γ; entries on both sides of ReLU6's 6
        for m in net:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-4, 4)
                m.bias.uniform_(-0.5, 0.5)
    return net


def run(net, x, enabled: bool):
    """Output, input gradient and parameter gradients of a fresh copy of ``net`` (training mode)."""
    import copy
    net = copy.deepcopy(net)
    x = x.detach().clone().requires_grad_()
    with recomputing(enabled):
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in net.parameters()]


def saved_storages(output: torch.Tensor) -> dict:
    """data_ptr → bytes of every tensor saved by the graph behind ``output`` (all manualconv nodes)."""
    storages = {}
    for node in backward_nodes(output):
        for t in getattr(node, "saved_tensors", ()) or ():
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return storages


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rebuilt_equals_kept_bit_for_bit(backend, activation, layout, dtype):
    net = block(activation, dtype)
    x = torch.randn(4, 3, 9, 9, dtype=dtype).to(memory_format=layout)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])  # hostile values travel too
    on, off = run(net, x, True), run(net, x, False)
    for a, b in zip(on, off):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rebuild_is_the_forward_output_bit_for_bit(backend, activation, layout, dtype):
    """recompute.rebuild from the activation node's saved tensors gives y's very bits (signed zeros and
    NaN payloads included), by the kernels and by the Functions (the double-backward path)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6, dtype=dtype).to(memory_format=layout)
    x[0, 1, 2, :2] = torch.tensor([float("nan"), float("inf")])
    x.requires_grad_()
    gamma, beta = torch.randn(5, dtype=dtype, requires_grad=True), torch.randn(5, dtype=dtype, requires_grad=True)
    with recomputing("all"):
        z = manualconv.functional.batch_norm(x * 1, None, None, gamma * 4, beta, training=True)  # past ReLU6's 6
        y = ACTIVATIONS[activation]()(z)
    node = y.grad_fn
    assert node.rebuilds_input is not None
    for differentiable in (False, True):
        rebuilt = recompute.rebuild(node.rebuilds_input, node.saved_tensors, differentiable)
        assert rebuilt.stride() == y.stride()
        assert torch.equal(bits(rebuilt), bits(y))


@pytest.mark.parametrize("write", ["recorded", "no_grad"])
def test_batch_norm_output_written_since_is_kept(cpp, write):
    """z changed in place after the batch norm (recorded by autograd, or under no_grad where only
    its version says so) is no longer BN(x): the activation keeps what it would without recomputation."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    z = manualconv.functional.batch_norm(x * 1, None, None, torch.rand(3) + 0.5, torch.randn(3), training=True)
    if write == "no_grad":
        with torch.no_grad():
            z.mul_(2)
    else:
        z = z.mul_(2)
    y = manualconv.functional.relu(z)
    assert getattr(y.grad_fn, "rebuilds_input", None) is None
    assert y.untyped_storage().data_ptr() in saved_storages(y)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_graph_keeps_no_activation_after_batch_norm(cpp, activation):
    """Neither z = BN(x) nor y = f(z) is in a saved tensor (or a mask of y); with recomputation
    off y is (the test can fail)."""
    net, x = block(activation), torch.randn(2, 3, 8, 8)
    for enabled in (True, False):
        with recomputing(enabled):
            seen = {}

            def record(name):
                def hook(module, inputs, output):
                    seen[name] = output  # held: its memory is not reused while the walk compares addresses
                return hook

            hooks = [net[4].register_forward_hook(record("z")), net[5].register_forward_hook(record("y"))]
            out = net(x)
            for hook in hooks:
                hook.remove()
            kept = saved_storages(out)
            address = {name: t.untyped_storage().data_ptr() for name, t in seen.items()}
            assert (address["y"] in kept) is not enabled
            if enabled:
                assert address["z"] not in kept
                assert len(kept) == len(saved_storages(net[:4](x))) + 6  # + x, γ, β, μ, σ⁻¹ of the BN, W of the last conv


def test_resnet20_keeps_ten_activations_fewer(cpp):
    """Converted ResNet-20: the graph with recomputation on saves the storages it saves with it off
    less exactly the ten ReLU outputs that follow a batch norm alone (the stem's and each block's
    first; the blocks' second ReLUs follow a residual sum and stay kept)."""
    torch.manual_seed(0)
    model, n = manualconv.convert(models.resnet20()), 2
    x = torch.randn(n, 3, 32, 32)
    kept = {}
    for enabled in (True, False):
        with recomputing(enabled):
            out = model(x)
            kept[enabled] = saved_storages(out)
            del out
    sizes = {enabled: Counter(storages.values()) for enabled, storages in kept.items()}
    maps, channels = [n * 16 * 32 * 32, n * 32 * 16 * 16, n * 64 * 8 * 8], [16, 32, 64]  # per stage
    counts = [4, 3, 3]  # ReLUs after a batch norm alone, per stage
    # kept with it off only: the ten y; with it on only: the ten batch norms' β (saved in y's place)
    assert sizes[False] - sizes[True] == Counter({4 * m: k for m, k in zip(maps, counts)})
    assert sizes[True] - sizes[False] == Counter({4 * c: k for c, k in zip(channels, counts)})


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu_"])
def test_write_to_rebuilt_output_raises_as_torch(inplace):
    """y written in place after the conv used it: torch.nn's backward raises (it kept y); so does
    this one, though it kept no y (recompute.Watch)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for layers in (torch.nn, manualconv):
        conv1, bn, conv2 = layers.Conv2d(3, 4, 3), layers.BatchNorm2d(4), layers.Conv2d(4, 2, 3)
        y = F.relu(bn(conv1(x)), inplace=inplace) if layers is torch.nn else \
            manualconv.functional.relu(bn(conv1(x)), inplace=inplace)
        out = conv2(y)
        with torch.no_grad():
            y.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def bn_relu_conv(x, w1, gamma, beta, w2, activation=manualconv.functional.relu):
    """conv → training batch norm (no running statistics) → activation → conv, in manualconv.functional."""
    z = manualconv.functional.batch_norm(manualconv.functional.conv2d(x, w1, padding=1), None, None, gamma, beta,
                                         training=True)
    return manualconv.functional.conv2d(activation(z), w2)


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "gelu"])
def test_double_backward_reaches_batch_norm_parameters(backend, activation):
    """create_graph: z and y are rebuilt by the Functions, so ∂(∂J/∂W)/∂(x, γ, β) are those of the
    kept ones (SiLU's and GELU's own backward reads z: their f″ path too). gradgradcheck in float64,
    and the second derivatives on against off (the second-order graph sums the same terms, in the
    order of a different set of nodes: agreement to float64 rounding)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(*inputs):
        return bn_relu_conv(*inputs, activation=getattr(manualconv.functional, activation))

    inputs = (x, w1, gamma, beta, w2)
    with recomputing(True):
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)
    second = {}
    for enabled in (True, False):
        with recomputing(enabled):
            out = f(*inputs)
            (g_w2,) = torch.autograd.grad(out.square().sum(), w2, create_graph=True)
            second[enabled] = torch.autograd.grad(g_w2.square().sum(), (x, w1, gamma, beta))
    for a, b in zip(second[True], second[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert a.abs().max() > 0  # the terms exist: a lost path would give 0 (or None)


def test_graph_freed_then_reused_output_is_kept(cpp):
    """y used again after the graph that could rebuild it was freed: it is saved as it is."""
    net, x = block(), torch.randn(2, 3, 8, 8)
    y = net[:3](x)
    net[3:](y).sum().backward()  # frees the ReLU node's saved tensors
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.grad_fn.saved_tensors
    w = torch.randn(2, 6, 3, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(manualconv.functional.conv2d(y, w).sum(), w)  # (y's own graph is spent)
    (grad_plain,) = torch.autograd.grad(manualconv.functional.conv2d(y.detach(), w).sum(), w)  # y with no history
    torch.testing.assert_close(grad, grad_plain, rtol=0, atol=0)


def test_off_where_others_decide_what_is_kept(cpp):
    """Under saved-tensor hooks and torch.func nothing is rebuilt, and the gradients are the same."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.rand(4) + 0.5, torch.randn(4),
              torch.randn(2, 4, 3, 3)]
    inputs = [t.requires_grad_() for t in inputs]
    grads = {}
    with torch.autograd.graph.save_on_cpu():
        out = bn_relu_conv(*inputs)
    relu_out = out.grad_fn.next_functions[0][0]
    assert getattr(relu_out, "rebuilds_input", None) is None
    grads["hooks"] = torch.autograd.grad(out.sum(), inputs)
    with recomputing(True):
        out = bn_relu_conv(*inputs)
        assert getattr(out.grad_fn.next_functions[0][0], "rebuilds_input", None) is not None  # (on, this graph rebuilds)
        grads["rebuilt"] = torch.autograd.grad(out.sum(), inputs)
        grads["func"] = torch.func.grad(lambda *a: bn_relu_conv(*a).sum(), argnums=tuple(range(5)))(*inputs)
    for a, b in zip(grads["hooks"], grads["rebuilt"]):  # the same kernels: the same bits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads["func"], grads["rebuilt"]):
        # torch.func runs the backward's differentiable formulas (reference.py) where the eager
        # backward calls the C++ kernels: the same sums of a few hundred float32 terms, rounded in
        # another order (a few ulp of the largest term)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_default_rebuilds_the_piecewise_activations_only(cpp):
    """'piecewise' (the default) rebuilds ReLU and ReLU6, and leaves GELU, SiLU and ELU (erf, exp)
    keeping their input, as with 'none'."""
    assert recompute.get_recompute() == "piecewise"
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    for name in ACTIVATIONS:
        y = ACTIVATIONS[name]()(manualconv.functional.batch_norm(x, None, None, None, None, training=True))
        piecewise = name.split("_")[0] in ("relu", "relu6", "hardswish", "hardsigmoid", "leaky")
        assert (getattr(y.grad_fn, "rebuilds_input", None) is not None) is piecewise, name


def test_set_recompute_takes_a_mode(monkeypatch):
    with pytest.raises(ValueError, match="mode"):
        recompute.set_recompute(True)
    with pytest.raises(ValueError, match="mode"):
        recompute.set_recompute("some")
    assert manualconv.set_recompute is recompute.set_recompute


def test_bad_environment_value_is_refused_at_import():
    """MANUALCONV_RECOMPUTE=1 (not a mode): import raises ValueError naming the variable."""
    import subprocess
    import sys
    env = dict(__import__("os").environ, MANUALCONV_RECOMPUTE="1")
    run = subprocess.run([sys.executable, "-c", "import manualconv"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "ValueError" in run.stderr and "MANUALCONV_RECOMPUTE" in run.stderr


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_model_same_bits_with_every_activation_rebuilt(cpp, name):
    """Converted torchvision nets whose blocks put hardswish / ReLU (mobilenet_v3) or SiLU
    (efficientnet) after batch norm, with squeeze-excitation gates and stochastic depth around
    them: with every activation rebuilt ('all') the output and every gradient are those of 'none'."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    native = getattr(torchvision.models, name)(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for mode in ("all", "none"):
        model = manualconv.convert(native).train()
        with recomputing(mode):
            torch.manual_seed(1)  # the same dropout and stochastic-depth draws
            out = model(x)
            rebuilt = sum(getattr(n, "rebuilds_input", None) is not None for n in backward_nodes(out))
            out.square().sum().backward()
        results[mode] = [out.detach()] + [p.grad for p in model.parameters()]
        assert (rebuilt > 0) is (mode == "all")
    for a, b in zip(results["all"], results["none"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch_is_rebuilt_empty(backend):
    """An empty batch through batch norm, ReLU6 in place and a conv: rebuilt (empty) tensors, and
    gradients (zeros, empty) equal to those with nothing rebuilt."""
    net, x = block("relu6_"), torch.randn(0, 3, 8, 8)
    on, off = run(net, x, True), run(net, x, False)
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert on[0].shape == (0, 4, 3, 3) and on[1].shape == (0, 3, 8, 8)
