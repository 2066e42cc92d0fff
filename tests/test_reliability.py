"""Hostile input (issue 12): results equal to torch's where torch's are defined — masked logits,
all-ignored targets, NaN/±inf through piecewise derivatives, empty tensors — and bad arguments
rejected with torch's exception type and a message naming the argument. Each case runs the same
call through torch.nn.functional and manualconv.functional, through both backends; each failed
before its fix.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import manualconv
import manualconv.functional as MF

INF = float("inf")


def _loss_and_grad(fn, logits, target, **kwargs):
    z = logits.clone().requires_grad_()
    loss = fn(z, target, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def _assert_same(ours, native, what):
    # float64 on both sides; the formulas differ in summation order only (a few ulps)
    torch.testing.assert_close(ours, native, equal_nan=True, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# 1. cross_entropy with masked (−∞) or huge logits: torch gathers log p_y, so a −∞ logit of
#    another class adds nothing (0·(−∞) = NaN was the bug); probability targets and label
#    smoothing multiply every class's term, as torch does, NaN included.

MASKED = torch.tensor([[0.0, -INF, 1.0], [2.0, 1.0, -INF]], dtype=torch.float64)
HUGE = torch.tensor([[3e38, -3e38, 0.0], [-3e38, 3e38, 1.0]], dtype=torch.float32)
CE_CASES = {
    "mean": (MASKED, [0, 1], {}),
    "sum": (MASKED, [0, 1], dict(reduction="sum")),
    "none": (MASKED, [0, 1], dict(reduction="none")),
    "class-weights": (MASKED, [0, 1], dict(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))),
    "ignore-index": (MASKED, [0, 1], dict(ignore_index=1)),
    "label-smoothing": (MASKED, [0, 1], dict(label_smoothing=0.1)),  # torch: inf (Σ_c log p_c)
    "smoothing-zero-weight": (MASKED, [0, 1], dict(label_smoothing=0.1, weight=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))),
    "target-logit-masked": (torch.tensor([[-INF, -INF, 1.0]], dtype=torch.float64), [0], {}),  # torch: inf, δ finite
    "huge-finite-logits-float32": (HUGE, [0, 1], {}),  # −3e38 − 3e38 overflows to −∞ in float32
    "probabilities-masked": (MASKED, None, {}),  # torch multiplies: 0·(−∞) = NaN, δ finite
}


@pytest.mark.parametrize("name", CE_CASES)
def test_cross_entropy_masked_logits_match_torch(name, backend):
    logits, labels, kwargs = CE_CASES[name]
    target = (torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=logits.dtype) if labels is None
              else torch.tensor(labels))
    ours = _loss_and_grad(MF.cross_entropy, logits, target, **kwargs)
    native = _loss_and_grad(F.cross_entropy, logits, target, **kwargs)
    _assert_same(ours[0], native[0], f"{name}: loss")
    _assert_same(ours[1], native[1], f"{name}: gradient")
    if name in ("mean", "sum", "none", "class-weights", "ignore-index", "huge-finite-logits-float32"):
        assert torch.isfinite(ours[0]).all(), f"{name}: torch's loss is finite here"


# 2. every target ignored ('mean'): the loss is 0/0 = NaN, as torch's, but the gradient is 0 —
#    not NaN, which one optimizer step would spread into every weight.

@pytest.mark.parametrize("shape, target, kwargs", [
    ((2, 3), torch.tensor([-100, -100]), {}),
    ((2, 3), torch.tensor([-100, -100]), dict(label_smoothing=0.1)),
    ((2, 3, 2, 2), torch.full((2, 2, 2), 255), dict(ignore_index=255)),  # segmentation: all void
    ((2, 3), torch.tensor([0, 0]), dict(weight=torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))),  # torch: NaN δ
], ids=["index", "smoothing", "segmentation-255", "zero-weight-not-ignored"])
def test_cross_entropy_all_ignored_gradient_matches_torch(shape, target, kwargs, backend):
    logits = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = _loss_and_grad(MF.cross_entropy, logits, target, **kwargs)
    native = _loss_and_grad(F.cross_entropy, logits, target, **kwargs)
    _assert_same(ours[0], native[0], "loss")
    _assert_same(ours[1], native[1], "gradient")


# ---------------------------------------------------------------------------------------------
# 4. Piecewise derivatives select: relu's δ passes where y > 0 (or y is NaN) and is 0 elsewhere,
#    also when δ is ±∞ or NaN (δ·0 would be NaN).

def test_relu_backward_selects_like_torch(backend):
    x = torch.tensor([-1.0, 2.0, float("nan"), 0.0, -3.0], dtype=torch.float64)
    delta = torch.tensor([INF, 1.0, 1.0, float("nan"), -INF], dtype=torch.float64)
    grads = []
    for fn in (MF.relu, F.relu):
        leaf = x.clone().requires_grad_()
        fn(leaf).backward(delta)
        grads.append(leaf.grad)
    _assert_same(grads[0], grads[1], "relu gradient")


# ---------------------------------------------------------------------------------------------
# 5. Integer arguments: a float (even 2.0), a bool or a string raises TypeError naming the
#    argument, as torch's argument parser does — never a silent truncation (stride=1.5 ran as 1).
#    Integer-like values (numpy ints, one-element integer tensors) are accepted, as by torch.

X4 = torch.randn(1, 2, 6, 6)
W4 = torch.randn(2, 2, 3, 3)
X3, W3 = torch.randn(1, 2, 6), torch.randn(2, 2, 3)
BAD_INTS = {
    "conv2d-stride": ("stride", lambda f: f.conv2d(X4, W4, stride=1.5)),
    "conv2d-stride-pair": ("stride", lambda f: f.conv2d(X4, W4, stride=(1, 1.5))),
    "conv2d-padding": ("padding", lambda f: f.conv2d(X4, W4, padding=0.5)),
    "conv2d-dilation": ("dilation", lambda f: f.conv2d(X4, W4, dilation=1.0)),
    "conv2d-groups": ("groups", lambda f: f.conv2d(X4, W4, groups=1.5)),
    "conv2d-groups-whole-float": ("groups", lambda f: f.conv2d(X4, torch.randn(2, 1, 3, 3), groups=2.0)),
    "conv2d-stride-bool": ("stride", lambda f: f.conv2d(X4, W4, stride=True)),
    "conv1d-stride": ("stride", lambda f: f.conv1d(X3, W3, stride=1.5)),
    "conv1d-groups": ("groups", lambda f: f.conv1d(X3, W3, groups=1.5)),
    "conv-transpose-stride": ("stride", lambda f: f.conv_transpose2d(X4, W4, stride=1.5)),
    "conv-transpose-output-padding": ("output_padding", lambda f: f.conv_transpose2d(X4, W4, stride=2, output_padding=0.5)),
    "conv-transpose-padding-same": ("padding", lambda f: f.conv_transpose2d(X4, W4, padding="same")),
    "max-pool-kernel": ("kernel_size", lambda f: f.max_pool2d(X4, 2.5)),
    "max-pool-kernel-whole-float": ("kernel_size", lambda f: f.max_pool2d(X4, 2.0)),
    "max-pool-stride": ("stride", lambda f: f.max_pool2d(X4, 2, stride=1.5)),
    "max-pool-padding": ("padding", lambda f: f.max_pool2d(X4, 2, padding=0.5)),
    "max-pool-dilation": ("dilation", lambda f: f.max_pool2d(X4, 2, dilation=1.5)),
    "max-pool-kernel-bool": ("kernel_size", lambda f: f.max_pool2d(X4, True)),
    "avg-pool-kernel": ("kernel_size", lambda f: f.avg_pool2d(X4, 2.5)),
    "avg-pool-stride": ("stride", lambda f: f.avg_pool2d(X4, 2, stride=1.5)),
    "avg-pool-divisor-override": ("divisor_override", lambda f: f.avg_pool2d(X4, 2, divisor_override=1.5)),
    "avg-pool-divisor-whole-float": ("divisor_override", lambda f: f.avg_pool2d(X4, 2, divisor_override=2.0)),
    "adaptive-avg-output-size": ("output_size", lambda f: f.adaptive_avg_pool2d(X4, (2, 1.5))),
    "adaptive-max-output-size": ("output_size", lambda f: f.adaptive_max_pool2d(X4, (1.5, 2))),
}


@pytest.mark.parametrize("name", BAD_INTS)
def test_float_for_an_integer_argument_raises_type_error(name, backend):
    argument, call = BAD_INTS[name]
    with pytest.raises(TypeError):  # torch's type for the same call
        call(F)
    with pytest.raises(TypeError, match=rf"'{argument}'"):
        call(MF)


@pytest.mark.parametrize("stride", [np.int64(2), torch.tensor(2)], ids=["numpy-int", "int-tensor"])
def test_integer_like_arguments_are_accepted(stride, backend):
    torch.testing.assert_close(MF.conv2d(X4, W4, stride=stride), F.conv2d(X4, W4, stride=2))
    torch.testing.assert_close(MF.max_pool2d(X4, 2, stride=stride), F.max_pool2d(X4, 2, stride=2))


# ---------------------------------------------------------------------------------------------
# 6. Empty and broadcast shapes as torch, and the remaining bad input with torch's exception type.

def _outputs_and_grads(fn, tensors, *args):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *args)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("shapes", [
    ((3, 0), (4, 0), (4,)),  # in_features = 0: the output is the bias, every gradient is zero-sized or 0
    ((3, 2), (4, 2), ()),  # a 0-D bias broadcasts
    ((3, 2), (4, 2), (1,)),
    ((3, 2), (4, 2), (3, 4)),  # a bias of the output's full size
    ((2, 3, 2), (4, 2), (4,)),
], ids=["in-features-0", "bias-0d", "bias-1", "bias-full", "3d-input"])
def test_linear_shapes_match_torch(shapes, backend):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    ours, native = _outputs_and_grads(MF.linear, tensors), _outputs_and_grads(F.linear, tensors)
    _assert_same(ours[0], native[0], "output")
    for g, h, name in zip(ours[1], native[1], ("input", "weight", "bias")):
        assert g.shape == h.shape, name
        _assert_same(g, h, f"grad {name}")


@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 2)], ids=["2d-input", "3d-input"])
def test_linear_output_may_be_modified_in_place(shape, backend):
    """An in-place op on the output (mobilenet_v3's Linear → Hardswish(inplace=True)) works as on
    torch's: the output is no view made inside the Function (autograd would refuse it)."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, dtype=torch.float64, generator=generator) for s in (shape, (4, 2), (4,))]
    def then_in_place(linear):
        return lambda x, w, b: linear(x, w, b).mul_(2).add_(1)
    ours, native = _outputs_and_grads(then_in_place(MF.linear), tensors), _outputs_and_grads(then_in_place(F.linear), tensors)
    _assert_same(ours[0], native[0], "output")
    for g, h, name in zip(ours[1], native[1], ("input", "weight", "bias")):
        _assert_same(g, h, f"grad {name}")


def test_linear_bias_that_does_not_broadcast_is_rejected(backend):
    x, w, b = torch.randn(3, 2), torch.randn(4, 2), torch.randn(5)
    with pytest.raises(RuntimeError):
        F.linear(x, w, b)
    with pytest.raises(RuntimeError, match="bias"):
        MF.linear(x, w, b)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_adaptive_avg_pool_zero_channels_is_empty_like_torch(layout, backend):
    x = torch.randn(2, 0, 4, 4).contiguous(memory_format=layout)
    assert MF.adaptive_avg_pool2d(x, 2).shape == F.adaptive_avg_pool2d(x, 2).shape == (2, 0, 2, 2)
    # torch's own backward raises here ("Expected grad_output to have non-zero size"), so its
    # gradient is not defined: ours is the only consistent one, an empty tensor of x's size
    with pytest.raises(RuntimeError):
        _outputs_and_grads(F.adaptive_avg_pool2d, [x], 2)
    out, (grad,) = _outputs_and_grads(MF.adaptive_avg_pool2d, [x], 2)
    assert grad.shape == x.shape


@pytest.mark.parametrize("fn, input", [
    ("adaptive_max_pool2d", (2, 0, 4, 4)),  # the max pool, unlike the average, rejects zero channels
    ("adaptive_avg_pool2d", (2, 3, 0, 4)),  # both reject an empty plane
], ids=["max-zero-channels", "avg-zero-height"])
def test_adaptive_pool_empty_input_rejected_like_torch(fn, input, backend):
    x = torch.randn(input)
    with pytest.raises(RuntimeError):
        getattr(F, fn)(x, 2)
    with pytest.raises(RuntimeError, match="input"):
        getattr(MF, fn)(x, 2)


@pytest.mark.parametrize("batch", [0, 2])
def test_pools_on_an_empty_batch_match_torch(batch, backend):
    x = torch.randn(batch, 2, 5, 5, dtype=torch.float64)
    for name, args in [("max_pool2d", (2,)), ("avg_pool2d", (2,)), ("adaptive_max_pool2d", (2,)), ("adaptive_avg_pool2d", (3,))]:
        ours = _outputs_and_grads(getattr(MF, name), [x], *args)
        native = _outputs_and_grads(getattr(F, name), [x], *args)
        _assert_same(ours[0], native[0], name)
        _assert_same(ours[1][0], native[1][0], f"{name} gradient")


def test_probability_targets_with_ignore_index_rejected_like_torch(backend):
    logits, target = torch.randn(2, 3), torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(logits, target, ignore_index=1)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        MF.cross_entropy(logits, target, ignore_index=1)


@pytest.mark.parametrize("make", [lambda: manualconv.Conv2d(2, 3, 3), lambda: manualconv.convert(
    torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 2)))],
    ids=["module", "converted-model"])
def test_torchscript_is_refused_with_a_clear_message(make):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*torch\.compile or torch\.export"):
        torch.jit.script(make())


def test_every_manualconv_module_refuses_torchscript():
    classes = [c for c in vars(manualconv.modules).values()
               if isinstance(c, type) and issubclass(c, torch.nn.Module) and c.__module__ == "manualconv.modules"]
    assert len(classes) >= 14
    missing = [c.__name__ for c in classes if "__prepare_scriptable__" not in vars(c)]
    assert not missing, f"no clear TorchScript error for {missing}"


# ---------------------------------------------------------------------------------------------
# 8. The backend is chosen per thread: overlapping use_backend blocks in two threads neither leak
#    into each other nor leave the process on the wrong backend afterwards.

class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_use_backend_is_per_thread():
    default = manualconv.get_backend()
    assert default == "cpp"  # the suite runs with the extension built (conftest.py)
    step = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def worker(name, other_exits_first):
        try:
            with manualconv.use_backend(name):
                step.wait()  # both blocks are open now
                with _OpNames() as ops:
                    manualconv.functional.conv2d(X4, W4)
                seen[name, "inside"] = (manualconv.get_backend(), "manualconv::conv2d_forward" in ops.names)
                step.wait()
                if other_exits_first:
                    step.wait()  # the other thread has left its block
                    seen[name, "after-other-left"] = manualconv.get_backend()
            if not other_exits_first:
                step.wait()
        except Exception as error:  # surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=("reference", False)), threading.Thread(target=worker, args=("cpp", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert seen["reference", "inside"] == ("reference", False)  # reference kernels: no manualconv:: op ran
    assert seen["cpp", "inside"] == ("cpp", True)
    assert seen["cpp", "after-other-left"] == "cpp"
    assert manualconv.get_backend() == default


def test_set_backend_sets_the_process_default_and_the_open_block():
    try:
        with manualconv.use_backend("reference"):
            manualconv.set_backend("reference")
            assert manualconv.get_backend() == "reference"
            manualconv.set_backend("cpp")
            assert manualconv.get_backend() == "cpp"
        assert manualconv.get_backend() == "cpp"
        manualconv.set_backend("reference")
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("backend", manualconv.get_backend()))
        thread.start()
        thread.join()
        assert result["backend"] == "reference"  # a new thread starts on the process default
    finally:
        manualconv.set_backend("cpp")


# ---------------------------------------------------------------------------------------------
# An in-place op on a layer's output (mobilenet_v2's ReLU6(inplace=True) after batch norm,
# ResNet's x += identity): allowed wherever torch allows it, in either layout. A Function that
# returns a view (batch norm's channels-last output was a permuted (n, H, W, C) block) makes
# autograd refuse the in-place op.

C_INPLACE = 6


def _inplace_layers(lib):
    vec = lambda: torch.linspace(0.5, 1.5, C_INPLACE, dtype=torch.float64, requires_grad=True)  # noqa: E731
    conv_w = torch.randn(C_INPLACE, C_INPLACE, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return {
        "conv2d": lambda x: lib.conv2d(x, conv_w, None, 1, 1),
        "max_pool2d": lambda x: lib.max_pool2d(x, 2),
        "avg_pool2d": lambda x: lib.avg_pool2d(x, 2),
        "adaptive_avg_pool2d": lambda x: lib.adaptive_avg_pool2d(x, 3),
        "batch_norm-train": lambda x: lib.batch_norm(x, None, None, vec(), vec(), training=True),
        "batch_norm-eval": lambda x: lib.batch_norm(x, torch.zeros(C_INPLACE, dtype=torch.float64),
                                                   torch.ones(C_INPLACE, dtype=torch.float64), vec(), vec()),
        "group_norm": lambda x: lib.group_norm(x, 3, vec(), vec()),
        "gelu": lambda x: lib.gelu(x),
        "silu": lambda x: lib.silu(x),
        "hardswish": lambda x: lib.hardswish(x),
        "adaptive_max_pool2d": lambda x: lib.adaptive_max_pool2d(x, 4),
        "conv_transpose2d": lambda x: lib.conv_transpose2d(x, conv_w, None, 2, 1),
        "layer_norm": lambda x: lib.layer_norm(x, (6, 6), None, None),
        "linear": lambda x: lib.linear(x, conv_w[:, :, 0, 0]),
        "dropout": lambda x: (torch.manual_seed(5), lib.dropout(x, 0.3))[1],  # the same mask: torch's draw
    }


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(_inplace_layers(F)))
def test_inplace_op_on_a_layer_output_as_torch(name, layout, backend):
    x = torch.randn(2, C_INPLACE, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.to(memory_format=layout)
    results = []
    for lib in (MF, F):
        leaf = x.clone().requires_grad_()
        y = _inplace_layers(lib)[name](leaf)
        y = F.relu6(y, inplace=True)  # torch's ReLU6(inplace=True): hardtanh_ on the layer's output
        y.mul_(2.0)
        (grad,) = torch.autograd.grad(y.pow(2).sum(), leaf)
        results.append((y.detach(), grad))
    _assert_same(results[0][0], results[1][0], f"{name}: output")
    _assert_same(results[0][1], results[1][1], f"{name}: input gradient")
