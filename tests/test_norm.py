"""Normalisation (BatchNorm1d/2d, LayerNorm, GroupNorm) and dropout (Dropout, Dropout2d) against
torch.nn, on both backends.

Float64: gradcheck and gradgradcheck of the hand-derived backward. Float32: outputs, every
gradient and the running statistics against torch.nn computed in float64 on the same float32
data, within the bound n·ε·Σ|terms| of an n-term float32 sum (ε = 2⁻²⁴; the same rule as
tests/oracle.py), n = the number of entries that share one set of statistics. The terms of each
quantity are written out in ``bounds``. A wrong formula is off by the size of the values
themselves, orders of magnitude above the bound.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF
from manualconv import ops

EPS32 = torch.finfo(torch.float32).eps / 2  # unit roundoff 2⁻²⁴

NATIVE_TO_MANUAL = {
    torch.nn.BatchNorm1d: manualconv.BatchNorm1d,
    torch.nn.BatchNorm2d: manualconv.BatchNorm2d,
    torch.nn.LayerNorm: manualconv.LayerNorm,
    torch.nn.GroupNorm: manualconv.GroupNorm,
    torch.nn.Dropout: manualconv.Dropout,
    torch.nn.Dropout2d: manualconv.Dropout2d,
}


def pair_of_modules(native_cls, *args, **kwargs):
    """A torch.nn module with random affine parameters and running statistics, and the manualconv
    module holding a copy of the same state."""
    torch.manual_seed(1)
    native = native_cls(*args, **kwargs)
    with torch.no_grad():
        for name, tensor in list(native.named_parameters()) + list(native.named_buffers()):
            if name in ("weight", "bias", "running_mean"):
                tensor.copy_(torch.randn_like(tensor))
            elif name == "running_var":
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    manual = NATIVE_TO_MANUAL[native_cls](*args, **kwargs)
    manual.load_state_dict(native.state_dict())
    return native, manual


def data(shape, dtype=torch.float32, offset=0.5, channels_last=False, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype) * 2 + offset
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def forward_backward(module, x, grad_output):
    """Output, δx and the parameter gradients of one forward + backward."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x] + params, grad_output)
    named = {"output": y.detach(), "grad_input": grads[0]}
    named.update({f"grad_{name}": g for (name, _), g in zip(module.named_parameters(), grads[1:])})
    return named


# ---------------------------------------------------------------------------------------------
# float32 bounds: n·ε·Σ|terms| for each quantity of y = γ·x̂ + β, x̂ = (x − μ)·σ⁻¹


def bounds(x, grad_output, weight, bias, mean, invstd, dims, count):
    """Σ|terms| of output, δx, ∂γ, ∂β (float64) times count·ε. ``dims``: the reduction dims of
    one set of statistics; ``mean``/``invstd`` broadcast against x; weight/bias too (or None)."""
    g = torch.ones(()) if weight is None else weight.abs()
    b = torch.zeros(()) if bias is None else bias.abs()
    x_hat = (x - mean) * invstd
    # |μ| and the mean of |x| over the set (the terms of μ's sum) enter x − μ
    mean = mean.abs() + x.abs().mean(dims, keepdim=True)
    dy, x_hat_abs = grad_output.abs(), x_hat.abs()
    scale = count * EPS32
    out = {
        # γ·(x − μ)·σ⁻¹ + β: |x| and |μ| enter the difference
        "output": scale * (g * (x.abs() + mean) * invstd + b),
        # γσ⁻¹·(δy − mean δy − x̂·mean(δy·x̂)) (+ the rounding of x̂ itself, |x| + |μ| scaled)
        "grad_input": scale * g * invstd * (dy + dy.mean(dims, keepdim=True)
                                            + (x_hat_abs + (x.abs() + mean) * invstd)
                                            * (dy * x_hat_abs).mean(dims, keepdim=True)),
    }
    return out, (dy * (x_hat_abs + (x.abs() + mean) * invstd)), dy


def assert_within(what, actual, exact, bound):
    assert actual.shape == exact.shape, f"{what}: size {list(actual.shape)}, native {list(exact.shape)}"
    actual = actual.double()
    nan = exact.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaNs differ from native's"
    error = (actual - exact).abs().masked_fill(nan, 0)
    excess = error - bound.expand_as(error).masked_fill(nan, 0)
    assert not (excess > 0).any(), (
        f"{what}: differs from native by {error.max().item():.3e} (bound at the worst entry "
        f"{bound.expand_as(error).flatten()[int(excess.argmax())].item():.3e})")


# ---------------------------------------------------------------------------------------------
# Batch norm


BN_CASES = [  # (class, input shape, constructor kwargs)
    (torch.nn.BatchNorm2d, (4, 3, 5, 6), {}),
    (torch.nn.BatchNorm2d, (2, 5, 3, 3), {"affine": False}),
    (torch.nn.BatchNorm2d, (3, 4, 4, 2), {"momentum": None}),
    (torch.nn.BatchNorm2d, (3, 4, 4, 2), {"track_running_stats": False}),
    (torch.nn.BatchNorm2d, (3, 4, 2, 3), {"bias": False, "eps": 1e-3, "momentum": 0.3}),
    (torch.nn.BatchNorm1d, (8, 5), {}),
    (torch.nn.BatchNorm1d, (4, 3, 7), {"affine": False, "momentum": None}),
    # the kernels' blocking (csrc/batch_norm.cpp: rows of 16 columns, blocks of 32 rows): NCHW planes
    # of 90 = 5 rows of 16 and 10 more, 40 rows a channel (a block runs on into the next plane);
    # NHWC 720 rows of 19 channels (a group of 16 and 3 more), 23 blocks, a chunk per thread
    (torch.nn.BatchNorm2d, (8, 19, 9, 10), {}),
]
BN_IDS = [f"{cls.__name__}-{'x'.join(map(str, shape))}-{kw}" for cls, shape, kw in BN_CASES]


def batch_norm_exact(native, x, grad_output):
    """torch.nn's float64 result on the float32 data, and the float32 bound of each quantity."""
    wide = copy.deepcopy(native).double()
    exact = forward_backward(wide, x.double(), grad_output.double())
    x64, dy64 = x.double(), grad_output.double()
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = x.numel() // x.shape[1]
    if native.training or native.running_mean is None:
        mean = x64.mean(dims, keepdim=True)
        invstd = (x64.var(dims, unbiased=False, keepdim=True) + native.eps).rsqrt()
    else:
        mean = native.running_mean.double().reshape(shape)
        invstd = (native.running_var.double().reshape(shape) + native.eps).rsqrt()
    weight = None if native.weight is None else native.weight.detach().double().reshape(shape)
    bias = None if native.bias is None else native.bias.detach().double().reshape(shape)
    bound, weight_terms, bias_terms = bounds(x64, dy64, weight, bias, mean, invstd, dims, count)
    if native.weight is not None:
        bound["grad_weight"] = count * EPS32 * weight_terms.sum(dims)
    if native.bias is not None:
        bound["grad_bias"] = count * EPS32 * bias_terms.sum(dims)
    return exact, bound, wide


# every case in NCHW, and the 4-D ones channels-last too (a layout of 4-D maps only)
BN_LAYOUT_CASES = [case + (False,) for case in BN_CASES] + [case + (True,) for case in BN_CASES if len(case[1]) == 4]
BN_LAYOUT_IDS = [f"{i}-nchw" for i in BN_IDS] + [f"{i}-channels_last" for c, i in zip(BN_CASES, BN_IDS) if len(c[1]) == 4]


@pytest.mark.parametrize("cls,shape,kwargs,channels_last", BN_LAYOUT_CASES, ids=BN_LAYOUT_IDS)
def test_batch_norm_float32_equals_torch(backend, cls, shape, kwargs, channels_last):
    """Three training steps then eval: outputs, δx, ∂γ, ∂β, running statistics and
    num_batches_tracked against torch.nn (float64 on the same data) within the float32 bound."""
    native, manual = pair_of_modules(cls, shape[1], **kwargs)
    for step, training in enumerate([True, True, True, False]):
        native.train(training), manual.train(training)
        x = data(shape, channels_last=channels_last, seed=step)
        dy = data(shape, offset=0.0, seed=10 + step)
        exact, bound, wide = batch_norm_exact(native, x, dy)
        got = forward_backward(manual, x, dy)
        forward_backward(native, x, dy)  # torch.nn's own float32 step, to follow its running stats
        for key in exact:
            assert_within(f"step {step} {key}", got[key], exact[key], bound[key])
        if channels_last:
            assert got["output"].is_contiguous(memory_format=torch.channels_last)
            assert got["grad_input"].is_contiguous(memory_format=torch.channels_last)
        if native.track_running_stats:
            assert torch.equal(manual.num_batches_tracked, native.num_batches_tracked)
            count = x.numel() // x.shape[1]
            # the running statistics are one multiply-add per step of the batch mean / variance
            # (an n-term sum): bounded by n·ε times their magnitude, per step
            for name in ("running_mean", "running_var"):
                ours, theirs = getattr(manual, name), getattr(native, name)
                bound_stats = (step + 1) * count * EPS32 * (ours.abs() + theirs.abs() + 1)
                assert ((ours - theirs).abs() <= bound_stats).all(), f"step {step}: {name} differs"
        else:
            assert manual.running_mean is None and manual.num_batches_tracked is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_batch_norm_gradcheck(backend, training, channels_last):
    torch.manual_seed(0)
    x = data((3, 2, 3, 2), torch.float64, channels_last=channels_last).requires_grad_(True)
    weight = torch.randn(2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def f(x, weight, bias):
        return MF.batch_norm(x, mean.clone(), var.clone(), weight, bias, training)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_batch_norm1d_gradcheck_without_affine(backend):
    x = data((5, 3), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: MF.batch_norm(x, None, None, training=True), (x,))
    assert torch.autograd.gradgradcheck(lambda x: MF.batch_norm(x, None, None, training=True), (x,))


@pytest.mark.parametrize("cls,shape", [(torch.nn.BatchNorm2d, (1, 3, 1, 1)), (torch.nn.BatchNorm1d, (1, 3))])
def test_batch_norm_one_value_per_channel(backend, cls, shape):
    """torch raises ValueError (after counting the batch); eval mode is fine."""
    native, manual = pair_of_modules(cls, 3)
    x = data(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        native(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        manual(x)
    assert torch.equal(manual.num_batches_tracked, native.num_batches_tracked)
    native.eval(), manual.eval()
    assert torch.allclose(manual(x), native(x), rtol=1e-6, atol=1e-6)  # an affine map: a few roundings


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_empty_batch(backend, training):
    """An empty batch gives an empty output, zero parameter gradients and, in training, leaves
    the running statistics alone while counting the batch, as torch does."""
    native, manual = pair_of_modules(torch.nn.BatchNorm2d, 3)
    native.train(training), manual.train(training)
    x = torch.randn(0, 3, 2, 2)
    theirs, ours = forward_backward(native, x, x.clone()), forward_backward(manual, x, x.clone())
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(manual, name), getattr(native, name)), name


def raised_by(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    return None


BAD_BN = [  # (what, module kwargs, class, input shape, the word the message must name)
    ("channels", {}, torch.nn.BatchNorm2d, (2, 4, 2, 2), "running_mean"),
    ("channels-weight-only", {"track_running_stats": False}, torch.nn.BatchNorm2d, (2, 4, 2, 2), "weight"),
    ("rank-3-to-2d", {}, torch.nn.BatchNorm2d, (2, 3, 2), "4D"),
    ("rank-5-to-2d", {}, torch.nn.BatchNorm2d, (2, 3, 2, 2, 2), "4D"),
    ("rank-4-to-1d", {}, torch.nn.BatchNorm1d, (2, 3, 2, 2), "2D or 3D"),
]


@pytest.mark.parametrize("what,kwargs,cls,shape,word", BAD_BN, ids=[b[0] for b in BAD_BN])
def test_batch_norm_bad_input(backend, what, kwargs, cls, shape, word):
    native, manual = pair_of_modules(cls, 3, **kwargs)
    x = torch.randn(shape)
    expected = raised_by(lambda: native(x))
    assert expected is not None, "torch accepted it"
    with pytest.raises(type(expected), match=word):
        manual(x)


def test_batch_norm_bad_functional_arguments(backend):
    x = torch.randn(4, 3)
    for call, word in [
        (lambda f: f.batch_norm(x, None, None, training=True, eps=0.0), "eps"),
        (lambda f: f.batch_norm(x.double(), torch.zeros(3), torch.ones(3)), "running_mean"),
        (lambda f: f.batch_norm(x.long(), torch.zeros(3), torch.ones(3)), "batch_norm"),
    ]:
        expected = raised_by(lambda: call(F))
        assert expected is not None
        with pytest.raises(type(expected), match=word):
            call(MF)


def test_batch_norm_affine_false_track_false_accepts_any_channel_count(backend):
    """Without weight and running statistics there is nothing to check the channels against
    (torch normalises whatever it gets)."""
    native, manual = pair_of_modules(torch.nn.BatchNorm2d, 3, affine=False, track_running_stats=False)
    x = data((2, 4, 3, 3))
    assert torch.allclose(manual(x), native(x), rtol=1e-5, atol=1e-5)  # x̂ ≈ 1: a few float32 roundings


def nan_inf_input(shape):
    x = data(shape)
    x.view(-1)[1] = float("nan")
    x.view(-1)[-1] = float("inf")
    x.view(-1)[-2] = float("-inf")
    return x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_nan_inf(backend, training):
    """NaN and ±inf spread as torch's: a channel with one in it becomes NaN in training."""
    native, manual = pair_of_modules(torch.nn.BatchNorm2d, 3)
    native.train(training), manual.train(training)
    x = nan_inf_input((2, 3, 2, 2))
    theirs, ours = native(x), manual(x)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
    finite = theirs.isfinite()
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(manual.running_mean.isnan(), native.running_mean.isnan())
    assert torch.equal(manual.running_var.isnan(), native.running_var.isnan())


# ---------------------------------------------------------------------------------------------
# Layer norm and group norm


LN_CASES = [  # (input shape, normalized_shape, kwargs)
    ((4, 6), 6, {}),
    ((2, 3, 4, 5), (4, 5), {}),
    ((3, 2, 7), [7], {"elementwise_affine": False}),
    ((3, 5, 4), (4,), {"bias": False, "eps": 1e-3}),
    ((3, 70), 70, {}),  # rows of two full blocks of the kernel's 32 sum lanes and a tail of 6
]


def layer_norm_exact(native, x, dy, normalized_ndim):
    wide = copy.deepcopy(native).double()
    exact = forward_backward(wide, x.double(), dy.double())
    x64, dy64 = x.double(), dy.double()
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x64.mean(dims, keepdim=True)
    invstd = (x64.var(dims, unbiased=False, keepdim=True) + native.eps).rsqrt()
    weight = None if native.weight is None else native.weight.detach().double()
    bias = None if native.bias is None else native.bias.detach().double()
    # the row formula carries γ inside its sums (g = γ ⊙ δy): bound it with |g| as the delta
    g = dy64 if weight is None else dy64 * weight
    bound, weight_terms, bias_terms = bounds(x64, g.abs(), None, bias, mean, invstd, dims, count)
    mean = mean.abs() + x64.abs().mean(dims, keepdim=True)  # the terms of μ, as in bounds()
    if weight is not None:
        bound["output"] = count * EPS32 * (weight.abs() * (x64.abs() + mean) * invstd
                                          + (0 if bias is None else bias.abs()))
    rows = x.numel() // count
    across = tuple(range(x.dim() - normalized_ndim))
    # ∂γ, ∂β sum over the rows: an n-term sum of δy·x̂, with x̂ itself rounded within n·ε
    terms = (dy64.abs() * ((x64.abs() + mean) * invstd * 2)).sum(across)  # |x̂| ≤ (|x| + |μ|)σ⁻¹, plus its rounding
    if weight is not None:
        bound["grad_weight"] = (rows + count) * EPS32 * terms
    if bias is not None:
        bound["grad_bias"] = rows * EPS32 * dy64.abs().sum(across)
    return exact, bound


@pytest.mark.parametrize("shape,normalized_shape,kwargs", LN_CASES, ids=[str(c[0]) + str(c[2]) for c in LN_CASES])
def test_layer_norm_float32_equals_torch(backend, shape, normalized_shape, kwargs):
    native, manual = pair_of_modules(torch.nn.LayerNorm, normalized_shape, **kwargs)
    x, dy = data(shape), data(shape, offset=0.0, seed=3)
    ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    exact, bound = layer_norm_exact(native, x, dy, ndim)
    got = forward_backward(manual, x, dy)
    assert set(got) == set(exact)
    for key in exact:
        assert_within(key, got[key], exact[key], bound[key])


GN_CASES = [((2, 6, 3, 3), 3, {}), ((3, 4, 5), 2, {"affine": False}), ((2, 4), 4, {}), ((4, 6, 2, 2), 1, {"eps": 1e-3}),
            ((2, 8, 3, 3), 8, {}),  # C = groups: one channel per set
            ((3, 6, 1, 1), 2, {}),  # 1×1 planes
            ((2, 4, 3, 2, 2), 2, {}),  # 3-D maps: (n, C, D·H·W) sets
            ((2, 4, 6, 7), 2, {})]  # planes of 42 (sets of 84): full blocks of the kernel's 32 sum lanes and tails
# channels-last maps (csrc/group_norm.cpp's NHWC kernels): C = groups, 1×1 planes, wide channels
GN_CHANNELS_LAST_CASES = [((2, 6, 3, 3), 3, {}), ((2, 8, 3, 3), 8, {}), ((3, 6, 1, 1), 2, {}),
                          ((2, 64, 4, 5), 16, {}), ((4, 6, 2, 2), 1, {"affine": False})]


@pytest.mark.parametrize("shape,groups,kwargs", GN_CASES, ids=[f"{c[0]}-g{c[1]}-{c[2]}" for c in GN_CASES])
def test_group_norm_float32_equals_torch(backend, shape, groups, kwargs):
    check_group_norm_float32(shape, groups, kwargs, channels_last=False)


@pytest.mark.parametrize("shape,groups,kwargs", GN_CHANNELS_LAST_CASES,
                         ids=[f"{c[0]}-g{c[1]}-{c[2]}" for c in GN_CHANNELS_LAST_CASES])
def test_group_norm_channels_last_float32_equals_torch(backend, shape, groups, kwargs):
    check_group_norm_float32(shape, groups, kwargs, channels_last=True, same_layout=backend == "cpp")


def check_group_norm_float32(shape, groups, kwargs, channels_last, same_layout=False):
    """Output, δx, ∂γ, ∂β of manualconv's GroupNorm within the float32 bound of the exact (float64
    torch) result; with same_layout, a channels-last input gives a channels-last output and δx, as
    torch's (the 'cpp' kernels; the reference backend's rows are NCHW: README's list of differences)."""
    native, manual = pair_of_modules(torch.nn.GroupNorm, groups, shape[1], **kwargs)
    x, dy = data(shape, channels_last=channels_last), data(shape, offset=0.0, seed=3, channels_last=channels_last)
    if same_layout:
        theirs = forward_backward(native, x, dy)
        ours = forward_backward(manual, x, dy)
        for key in ("output", "grad_input"):
            assert ours[key].is_contiguous(memory_format=torch.channels_last) == \
                theirs[key].is_contiguous(memory_format=torch.channels_last), key
    wide = copy.deepcopy(native).double()
    exact = forward_backward(wide, x.double(), dy.double())
    got = forward_backward(manual, x, dy)
    # group norm is layer norm of each (sample, group) row of n = C/G·H·W entries followed by a
    # per-channel affine map: the layer-norm bound of those rows, scaled by |γ_c| and plus |β_c|
    n = x.numel() // (shape[0] * groups)
    rows64, dy64 = x.double().reshape(shape[0], groups, -1), dy.double()
    mean = rows64.mean(2, keepdim=True)
    invstd = (rows64.var(2, unbiased=False, keepdim=True) + native.eps).rsqrt()
    x_hat = ((rows64 - mean) * invstd).reshape(shape)
    cshape = (1, -1) + (1,) * (len(shape) - 2)
    gamma = torch.ones(()) if native.weight is None else native.weight.detach().double().reshape(cshape).abs()
    g = dy64.abs() * gamma
    spread = ((rows64.abs() + mean.abs() + rows64.abs().mean(2, keepdim=True)) * invstd).reshape(shape)
    g_rows = g.reshape(shape[0], groups, -1)
    bound = {
        "output": n * EPS32 * (gamma * spread + (0 if native.bias is None else native.bias.detach().double().abs().reshape(cshape))),
        "grad_input": n * EPS32 * (invstd * (g_rows + g_rows.mean(2, keepdim=True) + (x_hat.abs() + spread).reshape(g_rows.shape)
                                             * (g_rows * x_hat.abs().reshape(g_rows.shape)).mean(2, keepdim=True))).reshape(shape),
    }
    dims = (0,) + tuple(range(2, len(shape)))
    if native.weight is not None:
        bound["grad_weight"] = (x.numel() // shape[1] + n) * EPS32 * (dy64.abs() * (x_hat.abs() + spread)).sum(dims)
        bound["grad_bias"] = (x.numel() // shape[1]) * EPS32 * dy64.abs().sum(dims)
    for key in exact:
        assert_within(key, got[key], exact[key], bound[key])


def test_layer_and_group_norm_gradcheck(backend):
    x = data((2, 4, 2, 3), torch.float64).requires_grad_(True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(4, dtype=torch.float64, requires_grad=True)
    gb = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for f, args in [
        (lambda x, w, b: MF.layer_norm(x, (2, 3), w, b), (x, w, b)),
        (lambda x: MF.layer_norm(x, [3]), (x,)),
        (lambda x, w, b: MF.group_norm(x, 2, w, b), (x, gw, gb)),
        (lambda x: MF.group_norm(x, 4), (x,)),
    ]:
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


def test_layer_and_group_norm_empty_and_nan(backend):
    for native_cls, args, shape in [(torch.nn.LayerNorm, (4,), (3, 4)), (torch.nn.GroupNorm, (2, 4), (3, 4, 2))]:
        native, manual = pair_of_modules(native_cls, *args)
        empty = torch.randn((0,) + shape[1:])
        theirs, ours = forward_backward(native, empty, empty.clone()), forward_backward(manual, empty, empty.clone())
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), f"{native_cls.__name__} empty: {key}"
        x = nan_inf_input(shape)
        theirs, ours = native(x), manual(x)
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
        finite = theirs.isfinite()
        assert torch.allclose(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)


def test_group_norm_channels_last_gradcheck_and_nan(backend):
    """Channels-last maps: gradcheck and gradgradcheck (float64), and NaN / ±inf spread as torch's."""
    x = data((2, 6, 3, 2), torch.float64, channels_last=True).requires_grad_(True)
    gw = torch.randn(6, dtype=torch.float64, requires_grad=True)
    gb = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for f, args in [(lambda x, w, b: MF.group_norm(x, 3, w, b), (x, gw, gb)), (lambda x: MF.group_norm(x, 6), (x,))]:
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)
    native, manual = pair_of_modules(torch.nn.GroupNorm, 2, 4)
    x = nan_inf_input((3, 4, 2, 2)).contiguous(memory_format=torch.channels_last)
    theirs, ours = native(x), manual(x)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
    finite = theirs.isfinite()
    # float32, sets of 8 entries: rounding of μ, σ and the affine map, a few ε of |y| ≲ 10
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)


def test_group_norm_large_mean(backend):
    """|μ| ≫ σ (x = 10⁴ + N(0, 1)): the shifted one-pass variance keeps x̂ accurate, in both layouts."""
    native, manual = pair_of_modules(torch.nn.GroupNorm, 2, 4)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = (data((3, 4, 5, 5)) + 1e4).contiguous(memory_format=layout)
        exact = copy.deepcopy(native).double()(x.double())
        # x is exact in float32 up to ulp(10⁴) ≈ 1e-3 and σ ≈ 2, so x̂ carries ≈ 1e-3/2 of input rounding
        # that float64 doesn't see either (the same float32 x goes to both): what remains is the
        # kernel's own rounding, n·ε·|x|·σ⁻¹ ≈ 50·6e-8·1e4/2 ≈ 1.5e-2 at most by the layer-norm bound
        assert (manual(x).double() - exact).abs().max() <= 1.5e-2


def test_group_norm_kernels_run_and_bfloat16_in_float32(cpp):
    """'cpp' group norm runs csrc/group_norm.cpp's two operators; given bfloat16 tensors, the operators
    compute in float32 and round once (InFloat32), in both layouts."""
    x = data((2, 6, 3, 3))
    w, b = torch.randn(6), torch.randn(6)
    with torch.autograd.profiler.profile() as prof:
        y = MF.group_norm(x.requires_grad_(True), 3, w, b)
        y.backward(torch.ones_like(y))
    names = {e.name for e in prof.function_events}
    assert {"manualconv::group_norm_forward", "manualconv::group_norm_backward"} <= names
    for layout in (torch.contiguous_format, torch.channels_last):
        xb = x.detach().bfloat16().contiguous(memory_format=layout)
        wb, bb, dyb = w.bfloat16(), b.bfloat16(), data((2, 6, 3, 3), seed=3).bfloat16().contiguous(memory_format=layout)
        got = torch.ops.manualconv.group_norm_forward(xb, wb, bb, 3, 1e-5)
        wide = torch.ops.manualconv.group_norm_forward(xb.float(), wb.float(), bb.float(), 3, 1e-5)
        for g, e in zip(got, wide):
            assert g.dtype == torch.bfloat16 and torch.equal(g, e.bfloat16())
        grads = torch.ops.manualconv.group_norm_backward(dyb, xb, got[1], got[2], wb, 3)
        wide = torch.ops.manualconv.group_norm_backward(dyb.float(), xb.float(), got[1].float(), got[2].float(),
                                                        wb.float(), 3)
        for g, e in zip(grads, wide):
            assert g.dtype == torch.bfloat16 and torch.equal(g, e.bfloat16())
        assert grads[0].is_contiguous(memory_format=layout)


BAD_LN_GN = [
    ("ln-trailing-shape", lambda lib: lib.layer_norm(torch.randn(2, 3, 5), [3, 4]), "normalized_shape"),
    ("ln-weight-shape", lambda lib: lib.layer_norm(torch.randn(2, 4), [4], torch.ones(3)), "weight"),
    ("ln-bias-shape", lambda lib: lib.layer_norm(torch.randn(2, 4), [4], None, torch.ones(3)), "bias"),
    ("ln-empty-shape", lambda lib: lib.layer_norm(torch.randn(2, 4), []), "normalized_shape"),
    ("gn-divisible", lambda lib: lib.group_norm(torch.randn(2, 5, 3), 2), "num_groups"),
    ("gn-rank", lambda lib: lib.group_norm(torch.randn(4), 2), "dimensions"),
    ("gn-weight", lambda lib: lib.group_norm(torch.randn(2, 4), 2, torch.ones(3)), "weight"),
    ("gn-one-value", lambda lib: lib.group_norm(torch.randn(1, 4), 4), "more than 1 value"),
]


@pytest.mark.parametrize("what,call,word", BAD_LN_GN, ids=[b[0] for b in BAD_LN_GN])
def test_layer_and_group_norm_bad_input(backend, what, call, word):
    expected = raised_by(lambda: call(F))
    assert expected is not None, "torch accepted it"
    with pytest.raises(type(expected), match=word):
        call(MF)


# ---------------------------------------------------------------------------------------------
# Dropout: torch's CPU dropout draws bernoulli_(1 − p) on a new tensor of the mask's shape
# (the input's, or (N, C, 1, 1) for dropout2d) and divides by 1 − p; manualconv draws the same
# way, so under one seed the masks are equal and results are compared exactly.


DROPOUT_CASES = [
    (torch.nn.Dropout, (4, 5, 3), 0.3, False),
    (torch.nn.Dropout, (2, 3, 4, 4), 0.5, True),
    (torch.nn.Dropout2d, (4, 6, 3, 3), 0.4, False),
    (torch.nn.Dropout2d, (3, 5, 2, 2), 0.2, True),
    (torch.nn.Dropout2d, (3, 5, 4), 0.5, False),  # 3-D: torch's (N, C, L) channel dropout
]


@pytest.mark.parametrize("cls,shape,p,channels_last", DROPOUT_CASES, ids=[f"{c[0].__name__}-{c[1]}-{c[3]}" for c in DROPOUT_CASES])
def test_dropout_seeded_equals_torch(backend, cls, shape, p, channels_last):
    native, manual = pair_of_modules(cls, p)
    x = data(shape, channels_last=channels_last)
    dy = data(shape, offset=0.0, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's 3-D dropout2d warning
        torch.manual_seed(123)
        theirs = forward_backward(native, x, dy)
        torch.manual_seed(123)
        ours = forward_backward(manual, x, dy)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key  # one product per entry: exact
    kept = (theirs["output"] != 0).double().mean().item()
    assert 0 < kept < 1, "the mask should keep some entries and drop others"
    assert ours["output"].stride() == theirs["output"].stride()


def test_dropout_eval_p0_p1(backend):
    x = torch.tensor([[1.0, float("nan"), float("inf"), -2.0]], requires_grad=True)
    for lib_call in (lambda lib: lib.dropout(x, 0.5, training=False), lambda lib: lib.dropout(x, 0.0),
                     lambda lib: lib.dropout2d(x, 0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert lib_call(MF) is x and lib_call(F) is x  # identity: the input itself
    for call in (lambda lib: lib.dropout(x, 1.0), lambda lib: lib.dropout2d(x, 1.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, ours = call(F), call(MF)
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())
        (g_ours,) = torch.autograd.grad(ours, x, torch.ones_like(ours))
        (g_theirs,) = torch.autograd.grad(theirs, x, torch.ones_like(theirs))
        assert torch.equal(g_ours, g_theirs)


def test_dropout_gradcheck_and_inplace(backend):
    x = data((2, 3, 2, 2), torch.float64).requires_grad_(True)

    def seeded(f):
        def call(x):
            torch.manual_seed(7)  # the same mask on every evaluation
            return f(x)
        return call

    for f in (lambda x: MF.dropout(x, 0.4), lambda x: MF.dropout2d(x, 0.4)):
        assert torch.autograd.gradcheck(seeded(f), (x,))
        assert torch.autograd.gradgradcheck(seeded(f), (x,))
    y = data((4, 5))
    expected = y.clone()
    torch.manual_seed(3)
    F.dropout(expected, 0.5, inplace=True)
    torch.manual_seed(3)
    result = manualconv.Dropout(0.5, inplace=True)(y)
    assert result.data_ptr() == y.data_ptr() and torch.equal(y, expected)


BAD_DROPOUT = [
    ("p-above-1", lambda lib: lib.dropout(torch.ones(3), 1.5), "dropout probability"),
    ("p-negative", lambda lib: lib.dropout2d(torch.ones(2, 3, 2, 2), -0.1), "dropout probability"),
    ("dropout2d-1d", lambda lib: lib.dropout2d(torch.ones(3)), "2 dimensions"),
    ("integer", lambda lib: lib.dropout(torch.ones(3, dtype=torch.int64), 0.5), ""),
]


@pytest.mark.parametrize("what,call,word", BAD_DROPOUT, ids=[b[0] for b in BAD_DROPOUT])
def test_dropout_bad_input(backend, what, call, word):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = raised_by(lambda: call(F))
        assert expected is not None
        with pytest.raises(type(expected), match=word):
            call(MF)
    with pytest.raises(ValueError, match="dropout probability"):
        manualconv.Dropout(p=-0.1)  # torch.nn's own constructor check, inherited


# ---------------------------------------------------------------------------------------------
# Drop-in modules and convert()


@pytest.mark.parametrize("cls,args,kwargs", [
    (torch.nn.BatchNorm2d, (3,), {"momentum": None, "bias": False}),
    (torch.nn.BatchNorm1d, (4,), {"affine": False, "track_running_stats": False}),
    (torch.nn.LayerNorm, ((2, 3),), {"bias": False}),
    (torch.nn.GroupNorm, (2, 4), {"eps": 1e-3}),
    (torch.nn.Dropout, (0.2,), {}),
    (torch.nn.Dropout2d, (0.3,), {"inplace": True}),
])
def test_modules_are_drop_in(cls, args, kwargs):
    """Same parameters (and initialisation), buffers, state_dict keys and extra_repr as torch.nn's."""
    torch.manual_seed(0)
    native = cls(*args, **kwargs)
    torch.manual_seed(0)
    manual = NATIVE_TO_MANUAL[cls](*args, **kwargs)
    assert isinstance(manual, cls)
    assert native.extra_repr() == manual.extra_repr()
    theirs, ours = native.state_dict(), manual.state_dict()
    assert list(theirs) == list(ours)
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key


def test_convert_swaps_norm_and_dropout_layers(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout2d(0.2), torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(), torch.nn.LayerNorm(4 * 4 * 4), torch.nn.Dropout(0.3), torch.nn.Linear(64, 5),
        torch.nn.BatchNorm1d(5),
    )
    converted = manualconv.convert(model)
    for native, manual in zip(model, converted):
        expected = NATIVE_TO_MANUAL.get(type(native))
        if expected is not None:
            assert type(manual) is expected, f"{type(native).__name__} was not converted"
    assert list(model.state_dict()) == list(converted.state_dict())
    x = data((3, 3, 6, 6))
    torch.manual_seed(9)
    theirs = model(x)
    torch.manual_seed(9)
    ours = converted(x)
    # float32 through a conv, three norms and a linear layer: differences of a few roundings of
    # values of order 1, amplified by each norm's σ⁻¹ (≈ 1 here)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(converted[1], name).double(), getattr(model[1], name).double(), rtol=1e-5, atol=1e-6)
    assert type(manualconv.revert(converted)[1]) is torch.nn.BatchNorm2d


# ---------------------------------------------------------------------------------------------
# The C++ operators


def test_cpp_operators_opcheck():
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    x = data((3, 4, 2, 5), torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.manualconv.batch_norm_statistics(x)
    invstd = (var + 1e-5).rsqrt()
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    rows = data((6, 7), torch.float64)
    cases = [
        (torch.ops.manualconv.batch_norm_statistics, (x,)),
        (torch.ops.manualconv.batch_norm_statistics, (x_cl,)),
        (torch.ops.manualconv.batch_norm_apply, (x_cl, mean, invstd, w, b)),
        (torch.ops.manualconv.batch_norm_apply, (x, mean, invstd, None, None)),
        (torch.ops.manualconv.batch_norm_backward, (x.clone(), x, mean, invstd, w, True)),
        (torch.ops.manualconv.batch_norm_backward, (x_cl.clone(), x_cl, mean, invstd, None, False)),
        (torch.ops.manualconv.layer_norm_forward, (rows, torch.randn(7, dtype=torch.float64), None, 1e-5)),
    ]
    _, row_mean, row_invstd = torch.ops.manualconv.layer_norm_forward(rows, None, None, 1e-5)
    cases.append((torch.ops.manualconv.layer_norm_backward, (rows.clone(), rows, row_mean, row_invstd, None)))
    for maps in (x, x_cl):  # group norm, 2 groups, both layouts
        cases.append((torch.ops.manualconv.group_norm_forward, (maps, w, b, 2, 1e-5)))
        _, group_mean, group_invstd = torch.ops.manualconv.group_norm_forward(maps, None, None, 2, 1e-5)
        cases.append((torch.ops.manualconv.group_norm_backward, (maps.clone(), maps, group_mean, group_invstd, w, 2)))
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_cpp_and_reference_statistics_agree():
    """One-pass (cpp) and two-pass (reference) statistics, NCHW and channels-last, including a
    mean far from zero (the shifted sums keep the variance accurate)."""
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    from manualconv import reference
    for offset in (0.0, 1e4):
        x = data((5, 3, 4, 4), torch.float64, offset=offset)
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            mean, var = torch.ops.manualconv.batch_norm_statistics(xl)
            ref_mean, ref_var = reference.batch_norm_statistics(xl)
            # float64: relative error a few ε of |μ| (the mean) and of var·(1 + (μ − K)²/var) (the shift K)
            assert torch.allclose(mean, ref_mean, rtol=1e-13, atol=0)
            assert torch.allclose(var, ref_var, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed-values"])
def test_dropout_masked_scale_kernel(cpp, dtype, layout):
    """csrc/dropout.cpp: values ⊙ (mask ? s : 0) equals torch's product with its float mask (one
    product per entry: exact), NaN and ±inf included (inf·0 = NaN, never a selection); values in
    another layout than the mask are read in their own strides; the saved mask is the bool one;
    opcheck; a mask of another size or dtype is refused."""
    torch.manual_seed(0)
    values = torch.randn(4, 6, 5, 3, dtype=dtype)
    values[0, 0, 0, :] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    mask = torch.rand(4, 6, 5, 3) < 0.7
    mask[0, 0, 0, 0] = False  # inf · 0
    if layout == "channels_last":
        values, mask = values.contiguous(memory_format=torch.channels_last), mask.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed-values":
        values = values.transpose(1, 3).contiguous().transpose(1, 3)  # the same entries, other strides
    scale = torch.ones((), dtype=dtype).div_(1 - 0.3).item()
    got = torch.ops.manualconv.dropout_masked_scale(values, mask, scale)
    expected = values * mask.to(dtype).div_(1 - 0.3)  # torch's float mask: bernoulli 0/1, then ÷ (1 − p)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert got[0, 0, 0, 0].isnan()
    assert got.stride() == mask.stride()
    finite = values.nan_to_num(posinf=1.0, neginf=-1.0)  # (opcheck's comparisons take NaN ≠ NaN)
    torch.library.opcheck(torch.ops.manualconv.dropout_masked_scale, (finite, mask, scale))
    x = values.clone().requires_grad_()
    with manualconv.use_backend("cpp"):
        y = MF.dropout(x, 0.3)
    assert y.grad_fn.saved_tensors[0].dtype == torch.bool  # 1 byte an entry
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        torch.ops.manualconv.dropout_masked_scale(values, mask.to(dtype), scale)
    with pytest.raises(RuntimeError, match="values must have the mask's size"):
        torch.ops.manualconv.dropout_masked_scale(values[:1], mask, scale)
