"""Hand-derived activations and softmax (docs/derivation.md, "Activations") against torch.nn.

Values, gradients (incl. breakpoints, NaN, ±inf inputs and inf upstream deltas), double
backward, in-place semantics, drop-in modules, bad input, and the absence of native activation
ops in the compute path.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF
from test_audit import RecordAtenOps

NAN, INF = float("nan"), float("inf")
# torch's breakpoints of every piecewise f′ (0, ±3, 6, the hardtanh bounds ±1), NaN, ±inf
SPECIAL = [-3.0, 3.0, 0.0, 6.0, -1.0, 1.0, -0.5, 2.5, 7.0, -4.0, NAN, INF, -INF, -0.0]

# name → (manualconv function, torch function, kwargs); every torch.nn.functional activation here
ACTIVATIONS = {
    "gelu": (MF.gelu, F.gelu, {}),
    "gelu_tanh": (MF.gelu, F.gelu, dict(approximate="tanh")),
    "silu": (MF.silu, F.silu, {}),
    "relu": (MF.relu, F.relu, {}),
    "relu6": (MF.relu6, F.relu6, {}),
    "hardtanh": (MF.hardtanh, F.hardtanh, {}),
    "hardtanh_0_6": (MF.hardtanh, F.hardtanh, dict(min_val=-2.0, max_val=6.0)),
    "hardswish": (MF.hardswish, F.hardswish, {}),
    "hardsigmoid": (MF.hardsigmoid, F.hardsigmoid, {}),
    "leaky_relu": (MF.leaky_relu, F.leaky_relu, {}),
    "leaky_relu_0.2": (MF.leaky_relu, F.leaky_relu, dict(negative_slope=0.2)),
    "elu": (MF.elu, F.elu, {}),
    "elu_alpha": (MF.elu, F.elu, dict(alpha=0.5)),
}
INPLACE = [name for name in ACTIVATIONS if not name.startswith("gelu")]
SOFTMAXES = {"softmax": (MF.softmax, F.softmax), "log_softmax": (MF.log_softmax, F.log_softmax)}

# float64: manualconv's formulas order their few elementwise operations differently from
# torch's kernels (e.g. x·Φ(x) vs x·½·(1 + erf)), a few units of 2⁻⁵³ each: 1e-14 relative is far
# below any derivation mistake (a wrong factor or branch changes entries by O(1)).
F64 = dict(rtol=1e-14, atol=1e-14, equal_nan=True)
# float32 is compared with torch's float64 result on the same data (the suite's oracle: torch's
# own float32 GELU uses a polynomial erf, off by up to 1e-4 relative, and gives NaN at +inf).
# A few float32 operations at 2⁻²⁴ ≈ 6e-8 each: 2e-6 relative; the absolute 1e-6 covers the
# cancellation in 1 + erf(x/√2) for x ≪ 0 (an error of ~|x|·2⁻²⁴ in x·Φ(x), |x| ≤ 16 here).
F32 = dict(rtol=2e-6, atol=1e-6, equal_nan=True)


def special_and_random(dtype):
    torch.manual_seed(0)
    return torch.cat([torch.tensor(SPECIAL, dtype=dtype), 4 * torch.randn(200, dtype=dtype)])


def value_and_grad(function, x, delta, **kwargs):
    leaf = x.detach().clone().requires_grad_(True)
    y = function(leaf, **kwargs)
    (grad,) = torch.autograd.grad(y, leaf, delta)
    return y.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_torch(name, dtype, backend):
    ours, theirs, kwargs = ACTIVATIONS[name]
    x = special_and_random(dtype)
    delta = torch.randn_like(x)
    tol = F64 if dtype == torch.float64 else F32
    y, g = value_and_grad(ours, x, delta, **kwargs)
    y_t, g_t = value_and_grad(theirs, x.double(), delta.double(), **kwargs)
    assert y.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(y.double(), y_t, **tol)
    torch.testing.assert_close(g.double(), g_t, **tol)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_derivative_selects_at_inf_and_nan_deltas(name, backend):
    """Where f′ is 0, torch gives 0 even for an inf or NaN upstream delta (it selects, issue 12 #4)."""
    ours, theirs, kwargs = ACTIVATIONS[name]
    x = special_and_random(torch.float64)
    for fill in (INF, -INF, NAN):
        delta = torch.full_like(x, fill)
        _, g = value_and_grad(ours, x, delta, **kwargs)
        _, g_t = value_and_grad(theirs, x, delta, **kwargs)
        torch.testing.assert_close(g, g_t, **F64)


def test_breakpoint_conventions_are_torchs():
    """The derivative values at the breakpoints, written out (torch 2.14.1's conventions)."""
    x = torch.tensor([-3.0, 3.0, 0.0, 6.0, NAN], dtype=torch.float64)
    ones = torch.ones_like(x)
    assert value_and_grad(MF.hardswish, x, ones)[1].tolist()[:4] == [0.0, 1.0, 0.5, 1.0]
    # at NaN: hardswish, elu NaN (torch's vectorised kernels; its scalar tail loop gives δ instead)
    assert value_and_grad(MF.hardswish, x, ones)[1][4].isnan() and value_and_grad(MF.elu, x, ones)[1][4].isnan()
    assert value_and_grad(MF.relu6, x, ones)[1].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert value_and_grad(MF.hardsigmoid, x, ones)[1].tolist() == [0.0, 0.0, 0.1666666716337204, 0.0, 0.0]
    assert value_and_grad(MF.leaky_relu, x, ones, negative_slope=0.1)[1].tolist() == [0.1, 1.0, 0.1, 1.0, 0.1]
    assert value_and_grad(MF.elu, x, ones, alpha=0.5)[1][:4].tolist() == [0.5 * 0.049787068367863944, 1.0, 0.5, 1.0]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradcheck_and_gradgradcheck(name, backend):
    ours, _, kwargs = ACTIVATIONS[name]
    torch.manual_seed(1)
    x = 4 * torch.randn(3, 7, dtype=torch.float64)
    x = torch.where((x.abs() - 3).abs() < 0.05, x + 0.2, x)  # finite differences must not straddle a kink
    x = torch.where((x.abs() - 1).abs() < 0.05, x + 0.2, x)
    x = torch.where((x - 6).abs() < 0.05, x + 0.2, x)
    x = torch.where(x.abs() < 0.05, x + 0.2, x).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ours(t, **kwargs), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ours(t, **kwargs), (x,))


def test_double_backward_matches_torch(backend):
    """Second derivatives equal torch's (GELU, tanh-GELU, SiLU, ELU: smooth where tested)."""
    torch.manual_seed(2)
    x = torch.randn(50, dtype=torch.float64)
    for name in ("gelu", "gelu_tanh", "silu", "elu_alpha", "hardswish", "softmax"):
        ours, theirs, kwargs = ACTIVATIONS[name] if name in ACTIVATIONS else (*SOFTMAXES[name], dict(dim=0))
        results = []
        for function in (ours, theirs):
            leaf = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(function(leaf, **kwargs).pow(2).sum(), leaf, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(3).sum(), leaf)
            results.append(gg)
        torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


GELU_KERNEL_INPUTS = {  # the layouts csrc/gelu.cpp walks as they are or copies first
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(1, 3),  # dense, other strides
    "strided": lambda x: x[:, :, ::2],  # not dense: walked as a contiguous copy
}


@pytest.mark.parametrize("layout", list(GELU_KERNEL_INPUTS))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gelu_kernels_opcheck_and_layout(layout, approximate, dtype, cpp):
    """csrc/gelu.cpp: opcheck (schema, fake kernel, strides) and the output's strides equal the
    input's where torch's do (a dense input); more entries than one parallel task (kGrain = 32768), so
    the split into tasks and its remainder run. δy in another layout than x is read in its own strides."""
    torch.manual_seed(0)
    x = GELU_KERNEL_INPUTS[layout](4 * torch.randn(2, 9, 50, 80).to(dtype))
    delta = torch.randn(x.shape).to(dtype)
    for op, args in ((torch.ops.manualconv.gelu_forward, (x, approximate)),
                     (torch.ops.manualconv.gelu_backward, (delta, x, approximate))):
        torch.library.opcheck(op, args)
    y = torch.ops.manualconv.gelu_forward(x, approximate)
    assert y.stride() == F.gelu(x, approximate=approximate).stride()
    expected = F.gelu(x.double(), approximate=approximate)
    # bfloat16: computed in float32 and rounded once: within one bfloat16 ulp (2⁻⁸ relative) of
    # the float64 result; float32 / float64: the tolerances of test_activation_matches_torch
    tol = dict(rtol=2**-8, atol=1e-6) if dtype == torch.bfloat16 else (F32 if dtype == torch.float32 else F64)
    torch.testing.assert_close(y.double(), expected, **tol)


@pytest.mark.parametrize("layout", list(GELU_KERNEL_INPUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_relu_backward_kernel(layout, dtype, cpp):
    """csrc/relu.cpp: opcheck, and δz = δy where y > 0 or y is NaN, else exactly 0, even for an
    inf or NaN δy (a selection: torch's threshold_backward), in every layout and dtype."""
    torch.manual_seed(0)
    z = GELU_KERNEL_INPUTS[layout](torch.randn(2, 9, 50, 80).to(dtype))
    z[0, 0, 0, :4] = torch.tensor([NAN, 0.0, -0.0, INF]).to(dtype)
    z[0, 0, 1, :4] = -1.0
    y = MF.relu(z)
    delta = torch.randn(z.shape).to(dtype)
    delta[0, 0, 1, :4] = torch.tensor([INF, -INF, NAN, NAN]).to(dtype)  # dropped: y = 0 there
    delta[0, 0, 2, :2] = torch.tensor([INF, NAN]).to(dtype)
    torch.library.opcheck(torch.ops.manualconv.relu_backward, (delta, y))
    got = torch.ops.manualconv.relu_backward(delta, y)
    expected = torch.ops.aten.threshold_backward(delta, y, 0)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())


DELTA_LAYOUTS = {  # δy as autograd may hand it over: any strides, read as they are (elementwise.h)
    "contiguous": lambda d: d.contiguous(),
    "channels_last": lambda d: d.contiguous(memory_format=torch.channels_last),
    "permuted": lambda d: d.permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0),  # dense, other strides
    "strided": lambda d: d,  # every other row of a larger tensor: not dense
    "expanded": lambda d: d[:1, :1, :1, :1].expand(d.shape),  # the δ of a sum: stride 0
}


@pytest.mark.parametrize("delta_layout", list(DELTA_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_kernels_read_grad_output_in_its_own_strides(delta_layout, dtype, cpp):
    """The backward kernels walk the saved tensor (here channels-last, as in a channels-last
    network) in storage order and read δy in its own strides, never copying it: equal to torch's
    for δy contiguous (a residual δ from an NCHW branch), channels-last, transposed, strided (not
    dense) and expanded; the result has the saved tensor's strides, and so do torch's."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 50, 80, dtype=dtype).contiguous(memory_format=torch.channels_last)
    delta = DELTA_LAYOUTS[delta_layout](torch.randn(2, 9, 100, 80, dtype=dtype)[:, :, ::2])
    y = MF.relu(x)
    cases = [
        (torch.ops.manualconv.relu_backward(delta, y), torch.ops.aten.threshold_backward(delta, y, 0)),
        (torch.ops.manualconv.gelu_backward(delta, x, "none"), torch.ops.aten.gelu_backward(delta, x)),
        (torch.ops.manualconv.activation_backward(delta, x, "silu", []), torch.ops.aten.silu_backward(delta, x)),
        (torch.ops.manualconv.activation_backward_from_output(delta, torch.sigmoid(x), "sigmoid", []),
         torch.ops.aten.sigmoid_backward(delta, torch.sigmoid(x))),
    ]
    for got, expected in cases:
        assert got.stride() == x.stride()
        # the same formula on the same pairs of entries: float32's and float64's tolerances of
        # test_activation_matches_torch (gelu's and silu's exp / erf may differ in the last bits)
        torch.testing.assert_close(got, expected, **(F32 if dtype == torch.float32 else F64))


# csrc/activations.cpp: kind → (params, torch's function with those params)
ACTIVATION_KERNELS = {
    "silu": ([], F.silu),
    "hardtanh": ([-2.0, 6.0], lambda x: F.hardtanh(x, -2.0, 6.0)),
    "hardswish": ([], F.hardswish),
    "hardsigmoid": ([], F.hardsigmoid),
    "leaky_relu": ([0.2], lambda x: F.leaky_relu(x, 0.2)),
    "elu": ([0.5], lambda x: F.elu(x, 0.5)),
}


# δx at a NaN x as torch's vectorised loops give it (docs/derivation.md, section 17), where torch's
# scalar remainder loop gives δ instead: which entries fall in the remainder depends on the sizes
# and layouts (δy and x in different layouts: every inner row has one), so torch's result there is
# not one answer; manualconv gives the vectorised loops' everywhere
NAN_INPUT_GRAD = {"hardtanh": 0.0, "hardswish": NAN, "elu": NAN}


@pytest.mark.parametrize("layout", list(GELU_KERNEL_INPUTS))
@pytest.mark.parametrize("kind", list(ACTIVATION_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_activation_kernels_match_torch_in_every_layout(layout, kind, dtype, cpp):
    """csrc/activations.cpp: opcheck (schema, fake kernel, strides); y and δx equal torch's
    (float64 result on the same data) at the breakpoints, NaN and ±inf too, in every layout (the
    output has the input's strides where torch's does), over more entries than one parallel task.
    bfloat16: computed in float32 and rounded once (one bfloat16 ulp, 2⁻⁸ relative); float32 /
    float64: the tolerances of test_activation_matches_torch."""
    params, theirs = ACTIVATION_KERNELS[kind]
    torch.manual_seed(0)
    base = 4 * torch.randn(2, 9, 50, 80, dtype=torch.float64)
    forward, backward = torch.ops.manualconv.activation_forward, torch.ops.manualconv.activation_backward
    x = GELU_KERNEL_INPUTS[layout](base.to(dtype))  # (opcheck compares outputs without equal_nan)
    delta = torch.randn(x.shape).to(dtype)
    torch.library.opcheck(forward, (x, kind, params))
    torch.library.opcheck(backward, (delta, x, kind, params))
    base.view(-1)[:len(SPECIAL)] = torch.tensor(SPECIAL, dtype=torch.float64)
    x = GELU_KERNEL_INPUTS[layout](base.to(dtype))
    y, g = forward(x, kind, params), backward(delta, x, kind, params)
    assert y.stride() == theirs(x).stride() and y.dtype == g.dtype == dtype
    leaf = x.double().requires_grad_(True)
    expected_y = theirs(leaf)
    (expected_g,) = torch.autograd.grad(expected_y, leaf, delta.double())
    if kind in NAN_INPUT_GRAD:  # torch's own answer at a NaN x depends on where the entry falls
        expected_g = torch.where(leaf.isnan(), NAN_INPUT_GRAD[kind], expected_g)
    tol = dict(rtol=2**-8, atol=1e-6) if dtype == torch.bfloat16 else (F32 if dtype == torch.float32 else F64)
    torch.testing.assert_close(y.double(), expected_y.detach(), **{**tol, "equal_nan": True})
    torch.testing.assert_close(g.double(), expected_g, **{**tol, "equal_nan": True})


# activation_backward_from_output: kind → (params, torch's backward of that kind from (δy, y))
SQUASHING_KERNELS = {
    "sigmoid": ([], torch.ops.aten.sigmoid_backward),
    "tanh": ([1.0, 1.0], torch.ops.aten.tanh_backward),
}


@pytest.mark.parametrize("layout", list(GELU_KERNEL_INPUTS))
@pytest.mark.parametrize("kind", list(SQUASHING_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_squashing_backward_kernel_matches_torch(layout, kind, dtype, cpp):
    """csrc/activations.cpp's sigmoid and tanh backward from the output y: opcheck, and δx equal
    to torch's sigmoid_backward / tanh_backward bit for bit in float32 and float64 (the same
    products in the same order; 1 − y² as one fused multiply-add, as torch's), NaN and ±inf δy and
    y included, in every layout, over more entries than one parallel task. bfloat16: computed in
    float32 and rounded once, within one bfloat16 ulp (2⁻⁸ relative) of torch's float64 result."""
    params, theirs = SQUASHING_KERNELS[kind]
    torch.manual_seed(0)
    base = torch.rand(2, 9, 50, 80, dtype=torch.float64) * 2 - (1 if kind == "tanh" else 0)
    backward = torch.ops.manualconv.activation_backward_from_output
    y = GELU_KERNEL_INPUTS[layout](base.to(dtype))
    delta = GELU_KERNEL_INPUTS[layout](torch.randn(base.shape).to(dtype))  # δy in y's layout, as autograd's
    torch.library.opcheck(backward, (delta, y, kind, params))  # (it compares outputs without equal_nan)
    base.view(-1)[:6] = torch.tensor([0.0, 1.0, -1.0, NAN, INF, -INF], dtype=torch.float64)
    y = GELU_KERNEL_INPUTS[layout](base.to(dtype))
    delta[0, 0, 1, :3] = torch.tensor([NAN, INF, -INF]).to(dtype)
    got = backward(delta, y, kind, params)
    assert got.dtype == dtype and got.stride() == theirs(delta, y).stride()
    if dtype == torch.bfloat16:
        expected = theirs(delta.double(), y.double())
        torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-6, equal_nan=True)
    else:
        expected = theirs(delta, y)
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_scaled_tanh_backward_kernel_matches_its_formula(cpp):
    """LeNet-5's A·tanh(S·x): δx = δy·S·(A − y²/A), the kernel against reference.py's formula in
    float64 (the same formula with A − y²/A unfused: a few units of 2⁻⁵³)."""
    torch.manual_seed(0)
    y = 1.7159 * torch.tanh(torch.randn(3, 40000, dtype=torch.float64))
    delta = torch.randn_like(y)
    got = torch.ops.manualconv.activation_backward_from_output(delta, y, "tanh", [1.7159, 2 / 3])
    expected = manualconv.reference.tanh_grad_from_output(y, delta, 1.7159, 2 / 3)
    torch.testing.assert_close(got, expected, **F64)


def test_squashing_backward_kernel_rejects_bad_arguments(cpp):
    y, backward = torch.rand(3, 4), torch.ops.manualconv.activation_backward_from_output
    with pytest.raises(RuntimeError, match="kind must be one of sigmoid, tanh"):
        backward(y, y, "silu", [])
    with pytest.raises(RuntimeError, match="tanh takes 2 params, but got 0"):
        backward(y, y, "tanh", [])
    with pytest.raises(RuntimeError, match="grad_output must have the output's size"):
        backward(torch.rand(4, 3), y, "sigmoid", [])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        backward(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), "sigmoid", [])


def test_elu_near_zero_keeps_its_relative_precision(cpp):
    """α(eˣ − 1) for x just below 0 is computed without the cancellation of eˣ − 1 (csrc/exp.h's
    expm1): relative error within a few float32 ulp of the float64 result, as torch's expm1."""
    x = -torch.logspace(-30, 0, 2000, dtype=torch.float64)
    y = torch.ops.manualconv.activation_forward(x.float(), "elu", [1.0]).double()
    exact = torch.expm1(x.float().double())
    assert ((y - exact).abs() <= 8 * 2**-24 * exact.abs()).all(), ((y - exact).abs() / exact.abs()).max()


def test_activation_kernels_reject_bad_arguments(cpp):
    x = torch.randn(3, 4)
    forward, backward = torch.ops.manualconv.activation_forward, torch.ops.manualconv.activation_backward
    with pytest.raises(RuntimeError, match="kind must be one of"):
        forward(x, "swish", [])
    with pytest.raises(RuntimeError, match="hardtanh takes 2 params, but got 1"):
        forward(x, "hardtanh", [1.0])
    with pytest.raises(RuntimeError, match="grad_output must have the input's size"):
        backward(torch.randn(4, 3), x, "silu", [])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        forward(torch.ones(3, dtype=torch.int64), "silu", [])


def test_gelu_kernels_reject_bad_arguments(cpp):
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="approximate"):
        torch.ops.manualconv.gelu_forward(x, "erf")
    with pytest.raises(RuntimeError, match="grad_output must have the input's size"):
        torch.ops.manualconv.gelu_backward(torch.randn(4, 3), x, "none")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.manualconv.gelu_forward(torch.ones(3, dtype=torch.int64), "none")
    with pytest.raises(RuntimeError, match="grad_output must have the output's size"):
        torch.ops.manualconv.relu_backward(torch.randn(4, 3), x)


# ---------------------------------------------------------------------------------------------
# In place


@pytest.mark.parametrize("name", INPLACE)
def test_inplace_behaves_as_torch(name):
    ours, theirs, kwargs = ACTIVATIONS[name]
    torch.manual_seed(3)
    leaf = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, 5, dtype=torch.float64)
    results = []
    for function in (ours, theirs):
        a = leaf * 2  # a non-leaf
        version = a._version
        out = function(a, inplace=True, **kwargs)
        assert out is a and a._version > version
        view = leaf[1:3] * 1
        function(view[0], inplace=True, **kwargs)  # in place on a view of a non-leaf
        (g,) = torch.autograd.grad((out * delta).sum() + view.sum(), leaf)
        results.append((out.detach(), view.detach(), g))
    for ours_t, theirs_t in zip(*results):
        torch.testing.assert_close(ours_t, theirs_t, **F64)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ours(leaf, inplace=True, **kwargs)
    # without autograd: the tensor is simply overwritten
    plain = torch.randn(6, dtype=torch.float64)
    expected = theirs(plain.clone(), **kwargs)
    assert ours(plain, inplace=True, **kwargs) is plain
    torch.testing.assert_close(plain, expected, **F64)


FROM_OUTPUT = ["relu", "relu6", "hardtanh", "hardtanh_0_6"]  # f′ read from y = f(x)


@pytest.mark.parametrize("name", FROM_OUTPUT)
def test_inplace_saves_only_the_output_and_matches_torch(name):
    """ReLU and hardtanh in place keep no copy of x (InplaceActivationFromOutputFunction): one
    tensor is saved, the overwritten input for ReLU (as torch's relu_), the bool mask where f′ = 1,
    read from y, for hardtanh (torch's hardtanh_ keeps a copy of x); δx equals torch's at the
    breakpoints, NaN and ±inf too; modifying y afterwards makes the
    backward raise where torch's does (relu_) and gives torch's gradient where it does not
    (hardtanh_); gradcheck and gradgradcheck hold; empty tensors pass through."""
    ours, theirs, kwargs = ACTIVATIONS[name]
    base = special_and_random(torch.float64).requires_grad_(True)
    delta = torch.randn(base.shape, dtype=torch.float64)
    results, saved = [], []
    for function in (ours, theirs):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            a = base * 1
            out = function(a, inplace=True, **kwargs)
        assert out is a
        saved.append([t for t in packed if t.numel() > 1])
        (g,) = torch.autograd.grad(out, base, delta)
        results.append((out.detach(), g))
    assert len(saved[0]) == len(saved[1]) == 1
    if name == "relu":  # y itself, as torch's relu_
        assert saved[0][0].data_ptr() == results[0][0].data_ptr()
    else:  # a bool mask, a quarter of float32 x's bytes (torch's hardtanh_: a copy of x)
        assert saved[0][0].dtype == torch.bool and saved[1][0].dtype == torch.float64
    for ours_t, theirs_t in zip(*results):
        torch.testing.assert_close(ours_t, theirs_t, **F64)
    outcomes = []  # y modified after: torch's relu_ raises, its hardtanh_ does not; as theirs
    for function in (theirs, ours):
        leaf = base.detach().clone().requires_grad_(True)
        out = function(leaf * 1, inplace=True, **kwargs)
        out.mul_(-1)
        try:
            out.sum().backward()
            outcomes.append(leaf.grad)
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
            outcomes.append("raised")
    if isinstance(outcomes[0], str):
        assert outcomes[1] == "raised"
    else:
        torch.testing.assert_close(outcomes[1], outcomes[0], **F64)
    x = (torch.randn(12, dtype=torch.float64) * 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ours(t * 1, inplace=True, **kwargs), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ours(t * 1, inplace=True, **kwargs), (x,))
    for shape in [(0,), (0, 3)]:  # empty tensors, as torch
        empty = torch.empty(shape, dtype=torch.float64, requires_grad=True)
        out = ours(empty * 1, inplace=True, **kwargs)
        out.sum().backward()
        assert out.shape == empty.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bounds", [(0.0, 6.0), (0.1, 0.7)], ids=["relu6", "unrepresentable"])
def test_inplace_hardtanh_in_low_precision_matches_torch(dtype, bounds):
    """In float32 the clamp's bounds are float32 values in forward and support alike; bfloat16 is
    clamped in float32 and rounded, so with a bound between two bfloat16 values y cannot tell a
    clamped entry from an x equal to the rounded bound, and the copy of x is kept (support_is_exact).
    Either way the gradient is torch's, at x on and next to the bounds too."""
    lo, hi = bounds
    values = torch.tensor([lo, hi], dtype=dtype)
    near = torch.cat([values, torch.nextafter(values.float(), values.float() + 1).to(dtype),
                      torch.nextafter(values.float(), values.float() - 1).to(dtype)])
    # (no NaN: torch's own δx at a NaN x depends on the loop the entry falls in; NAN_INPUT_GRAD)
    base = torch.cat([near, torch.randn(40).to(dtype), torch.tensor([float("inf"), -float("inf")], dtype=dtype)])
    grads = []
    for function in (F.hardtanh, MF.hardtanh):
        leaf = base.clone().requires_grad_(True)
        out = function(leaf * 1, lo, hi, inplace=True)
        (g,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        grads.append((out.detach(), g))
    assert torch.equal(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[1][0], grads[0][0], equal_nan=True, rtol=0, atol=0)


def test_selection_kernels(cpp):
    """csrc/relu.cpp's hardtanh_backward_mask and select_backward: opcheck, their results against the
    formulas, and bad arguments refused naming them."""
    torch.manual_seed(0)
    y = torch.randn(2, 9, 50, 80).clamp(-1, 1).contiguous(memory_format=torch.channels_last)
    delta = torch.randn(2, 9, 50, 80)  # NCHW: read in its own strides
    torch.library.opcheck(torch.ops.manualconv.hardtanh_backward_mask, (y, -1.0, 1.0))
    support = torch.ops.manualconv.hardtanh_backward_mask(y, -1.0, 1.0)
    assert torch.equal(support, (y > -1) & (y < 1)) and support.stride() == y.stride()
    torch.library.opcheck(torch.ops.manualconv.select_backward, (delta, support))
    got = torch.ops.manualconv.select_backward(delta, support)
    assert torch.equal(got, torch.where(support, delta, 0.0)) and got.stride() == y.stride()
    with pytest.raises(RuntimeError, match="support must be a bool tensor"):
        torch.ops.manualconv.select_backward(delta, y)
    with pytest.raises(RuntimeError, match="grad_output must have the support's size"):
        torch.ops.manualconv.select_backward(delta[:1], support)


def test_inplace_underscore_spellings():
    for ours, theirs, kwargs in [(MF.hardtanh_, F.hardtanh_, dict(min_val=-0.5, max_val=0.5)),
                                 (MF.leaky_relu_, F.leaky_relu_, dict(negative_slope=0.3)),
                                 (MF.elu_, F.elu_, dict(alpha=2.0))]:
        x = torch.randn(10, dtype=torch.float64)
        expected = theirs(x.clone(), **kwargs)
        assert ours(x, **kwargs) is x
        torch.testing.assert_close(x, expected, **F64)


@pytest.mark.parametrize("ours,theirs,kwargs", [(MF.leaky_relu, F.leaky_relu, dict(negative_slope=-0.5)),
                                                 (MF.elu, F.elu, dict(alpha=-0.5))], ids=["leaky_relu", "elu"])
def test_inplace_negative_slope_backward_raises_as_torch(ours, theirs, kwargs):
    for function in (theirs, ours):
        x = torch.randn(3, requires_grad=True) * 1
        out = function(x, inplace=True, **kwargs)
        with pytest.raises(RuntimeError, match="In-place .* negative slope"):
            out.sum().backward()


# ---------------------------------------------------------------------------------------------
# Softmax and log-softmax


@pytest.mark.parametrize("name", list(SOFTMAXES))
@pytest.mark.parametrize("shape,dim", [((4, 7), 1), ((4, 7), 0), ((2, 3, 5), -1), ((2, 3, 5), 1), ((6,), 0), ((), 0)])
def test_softmax_matches_torch(name, shape, dim, backend):
    ours, theirs = SOFTMAXES[name]
    torch.manual_seed(4)
    for dtype, tol in ((torch.float64, F64), (torch.float32, F32)):
        x = 3 * torch.randn(shape, dtype=dtype)
        delta = torch.randn(shape, dtype=dtype)
        y, g = value_and_grad(ours, x, delta, dim=dim)
        y_t, g_t = value_and_grad(theirs, x.double(), delta.double(), dim=dim)  # float64 oracle
        torch.testing.assert_close(y.double(), y_t, **tol)
        torch.testing.assert_close(g.double(), g_t, **tol)


@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_masked_logits_as_torch(name, backend):
    """-inf logits (masked classes): probability 0 (log: -inf); a fully masked row is NaN; +inf NaN,
    along the last dim (rows) and along the first (columns: the kernel's other loop), float64 and
    float32."""
    ours, theirs = SOFTMAXES[name]
    x = torch.tensor([[0.0, -INF, 1.0], [-INF, -INF, -INF], [2.0, 1.0, -INF], [INF, 0.0, 1.0], [3e38, -3e38, 0.0],
                      [NAN, 0.0, 1.0]], dtype=torch.float64)
    delta = torch.tensor([[1.0, 2.0, -1.0]] * 6, dtype=torch.float64)
    for dtype, tol in ((torch.float64, F64), (torch.float32, F32)):
        for dim, xd, dd in ((1, x, delta), (0, x.t().contiguous(), delta.t().contiguous())):
            y, g = value_and_grad(ours, xd.to(dtype), dd.to(dtype), dim=dim)
            # torch in the same dtype: −3e38 − 3e38 overflows float32 to −inf (both sides), a value
            # the float64 oracle keeps finite
            y_t, g_t = value_and_grad(theirs, xd.to(dtype), dd.to(dtype), dim=dim)
            torch.testing.assert_close(y, y_t, **tol)
            torch.testing.assert_close(g, g_t, **tol)
            rows = y if dim == 1 else y.t()
            assert rows[1].isnan().all() and not rows[0].isnan().any() and rows[0, 1] == (-INF if "log" in name else 0)


SOFTMAX_KERNEL_INPUTS = {  # (x, dim): the rows csrc/softmax.cpp walks: the last dim, or columns
    "last-dim": lambda: (torch.randn(37, 1000), 1),
    "dim1-of-map": lambda: (torch.randn(4, 21, 13, 17), 1),  # inner = 13·17 columns
    "channels-last-dim1": lambda: (torch.randn(4, 21, 13, 17).contiguous(memory_format=torch.channels_last), 1),
    "transposed": lambda: (torch.randn(50, 30).t(), 0),
    "trailing-ones": lambda: (torch.randn(6, 40, 1, 1), 1),
    "scalar": lambda: (torch.randn(()), 0),
    "empty-rows": lambda: (torch.randn(0, 5), 1),
}


@pytest.mark.parametrize("inputs", list(SOFTMAX_KERNEL_INPUTS))
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_softmax_kernels_match_torch(inputs, log, dtype, cpp):
    """csrc/softmax.cpp: opcheck (schema, fake kernel), the output contiguous as torch's, y and δx
    equal torch's float64 result (the tolerances of test_softmax_matches_torch; bfloat16: computed
    in float32 and rounded once, one bfloat16 ulp)."""
    torch.manual_seed(0)
    x, dim = SOFTMAX_KERNEL_INPUTS[inputs]()
    x = (3 * x).to(dtype)
    delta = torch.randn(x.shape).to(dtype)
    forward, backward = torch.ops.manualconv.softmax_forward, torch.ops.manualconv.softmax_backward
    torch.library.opcheck(forward, (x, dim, log))
    y = forward(x, dim, log)
    torch.library.opcheck(backward, (delta, y, dim, log))
    g = backward(delta, y, dim, log)
    theirs = F.log_softmax if log else F.softmax
    assert y.is_contiguous() and g.is_contiguous() and y.stride() == theirs(x, dim).stride()
    expected_y, expected_g = value_and_grad(theirs, x.double(), delta.double(), dim=dim)
    tol = dict(rtol=2**-8, atol=1e-6) if dtype == torch.bfloat16 else (F32 if dtype == torch.float32 else F64)
    torch.testing.assert_close(y.double(), expected_y, **tol)
    if dtype != torch.bfloat16:  # (bfloat16: y rounded to 2⁻⁸ feeds δx; the float32 path is the one tested)
        torch.testing.assert_close(g.double(), expected_g, **tol)


def test_softmax_kernels_reject_bad_arguments(cpp):
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="dim out of range"):
        torch.ops.manualconv.softmax_forward(x, 2, False)
    with pytest.raises(RuntimeError, match="grad_output must have the output's size"):
        torch.ops.manualconv.softmax_backward(torch.randn(4, 3), x, 1, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.manualconv.softmax_forward(torch.ones(3, dtype=torch.int64), 0, False)


@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_gradcheck_and_gradgradcheck(name):
    ours, _ = SOFTMAXES[name]
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ours(t, dim=1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ours(t, dim=1), (x,))


@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_arguments_as_torch(name):
    ours, theirs = SOFTMAXES[name]
    x = torch.randn(2, 3)
    # dtype casts first (an integer input is then fine)
    ints = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(ours(ints, 1, dtype=torch.float64), theirs(ints, 1, dtype=torch.float64), **F64)
    # dim=None: torch's legacy implicit dim, with its warning
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        torch.testing.assert_close(ours(x), theirs(x), **F32)
    # empty along dim, empty elsewhere
    for shape in ((2, 0), (0, 3)):
        assert ours(torch.ones(shape), 1).shape == theirs(torch.ones(shape), 1).shape
    with pytest.raises(IndexError, match="Dimension out of range"):
        theirs(x, 2)
    with pytest.raises(IndexError, match="Dimension out of range"):
        ours(x, 2)
    with pytest.raises(TypeError, match="dim"):
        ours(x, 1.5)
    with pytest.raises(NotImplementedError):
        theirs(ints, 1)
    with pytest.raises(NotImplementedError, match="input"):
        ours(ints, 1)
    with pytest.raises(TypeError, match="input"):
        ours([1.0, 2.0], 0)


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception types, messages naming the argument


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_bad_input_raises_as_torch(name):
    ours, theirs, kwargs = ACTIVATIONS[name]
    with pytest.raises(TypeError, match="input"):
        ours("not a tensor", **kwargs)
    ints = torch.tensor([-2, 0, 3, 9])
    if name.startswith(("relu", "hardtanh")):  # torch clamps integer tensors; so does manualconv
        assert torch.equal(ours(ints, **kwargs), theirs(ints, **kwargs))
        assert ours(ints, **kwargs).dtype == torch.int64
    else:
        with pytest.raises(NotImplementedError):
            theirs(ints, **kwargs)
        with pytest.raises(NotImplementedError, match="input"):
            ours(ints, **kwargs)


def test_bad_arguments_raise_as_torch():
    x = torch.randn(3)
    for function in (F.gelu, MF.gelu):
        with pytest.raises(RuntimeError, match="approximate"):
            function(x, approximate="erf")
    for function in (F.hardtanh, MF.hardtanh):
        with pytest.raises(ValueError, match="min_val cannot be greater than max_val"):
            function(x, 2.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Modules, convert, and the compute path


MODULES = [
    (torch.nn.GELU(), manualconv.GELU), (torch.nn.GELU("tanh"), manualconv.GELU), (torch.nn.SiLU(), manualconv.SiLU),
    (torch.nn.ReLU6(inplace=True), manualconv.ReLU6), (torch.nn.Hardtanh(-2.0, 3.0), manualconv.Hardtanh),
    (torch.nn.Hardswish(), manualconv.Hardswish), (torch.nn.Hardsigmoid(), manualconv.Hardsigmoid),
    (torch.nn.LeakyReLU(0.3), manualconv.LeakyReLU), (torch.nn.ELU(0.7), manualconv.ELU),
    (torch.nn.Softmax(dim=1), manualconv.Softmax), (torch.nn.LogSoftmax(dim=0), manualconv.LogSoftmax),
]


@pytest.mark.parametrize("native,manual_class", MODULES, ids=[type(m).__name__ + repr(m) for m, _ in MODULES])
def test_modules_are_drop_in(native, manual_class):
    converted = manualconv.convert(torch.nn.Sequential(native))
    module = converted[0]
    assert type(module) is manual_class and isinstance(module, type(native))
    assert repr(module) == repr(native) and module.state_dict().keys() == native.state_dict().keys()
    torch.manual_seed(5)
    x = torch.randn(3, 4, dtype=torch.float64)
    leaf_a, leaf_b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_t = module(leaf_a * 1), native(leaf_b * 1)
    assert type(y.grad_fn).__name__.endswith("FunctionBackward"), y.grad_fn
    torch.testing.assert_close(y, y_t, **F64)
    y.sum().backward()
    y_t.sum().backward()
    torch.testing.assert_close(leaf_a.grad, leaf_b.grad, **F64)
    assert type(manualconv.revert(converted)[0]) is type(native)
    assert type(pickle.loads(pickle.dumps(module))) is manual_class and type(copy.deepcopy(module)) is manual_class


NATIVE_ACTIVATION = re.compile(
    r"gelu|silu|hardswish|hardsigmoid|hardtanh|relu|elu|softmax|sigmoid_backward|tanh_backward|threshold", re.IGNORECASE)


def test_no_native_activation_ops_in_the_compute_path():
    """Forward, backward and double backward of every activation run no native activation op."""
    torch.manual_seed(6)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with RecordAtenOps() as recorder:
        total = 0
        for name, (ours, _, kwargs) in ACTIVATIONS.items():
            total = total + ours(x, **kwargs).pow(2).sum()
            if name in INPLACE:
                total = total + ours(x * 1, inplace=True, **kwargs).pow(2).sum()
        total = total + MF.softmax(x, 1).pow(2).sum() + MF.log_softmax(x, 0).pow(2).sum()
        (g,) = torch.autograd.grad(total, x, create_graph=True)
        g.pow(2).sum().backward()
    found = sorted(n for n in recorder.names if n.startswith("aten::") and NATIVE_ACTIVATION.search(n))
    assert not found, found  # (manualconv::gelu_forward / gelu_backward are ours)
    # the audit can fail: torch's own activations are seen
    with RecordAtenOps() as recorder:
        F.gelu(x).sum().backward()
        F.hardswish(x).sum().backward()
        F.softmax(x, 1).sum().backward()
    assert {"aten::gelu", "aten::gelu_backward", "aten::hardswish_backward", "aten::_softmax"} <= recorder.names
