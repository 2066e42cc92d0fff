"""Property-based tests (hypothesis): random geometries and values for every op of
manualconv.functional, compared with torch.nn.functional in float64, on both backends.

Valid draws: outputs, max-pool indices and every gradient equal torch's (NaN where torch has
NaN, ±inf where torch has ±inf, finite values within a float64 summation bound). Where torch
itself raises for a drawn call, manualconv must raise the same exception type.
Invalid draws: a valid call with one argument spoiled; manualconv must raise exactly the
exception type torch raises for the same call, with a message naming the spoiled argument.

Torch as the oracle is always called on contiguous NCHW copies of the inputs: torch's
F.conv2d crashes or misbehaves on some channels-last strided/dilated shapes, and its values do
not depend on the layout, so manualconv's result for a channels-last or non-contiguous input
is compared with torch's NCHW result for the same values.

Example counts come from the hypothesis profile (tests/conftest.py): the default 'ci' profile
is bounded and derandomized; ``--hypothesis-profile=long`` runs many more examples.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, note
from hypothesis import strategies as st

import manualconv
import manualconv.functional as MF
from cases import _subsampling_by_tensor_ops

BACKENDS = ("cpp", "reference")
F64 = torch.float64

# Both libraries compute the same float64 sums in different orders. A sum of n terms has a
# rounding error of at most n·2⁻⁵³·Σ|terms| (Higham §3.1). The drawn sizes keep n ≤ 300 (the
# longest: a weight gradient over batch 3 × 9 × 9 outputs) with terms |x·δ| < 25 (randn values
# stay below 5), so an error is below 300·1.1e-16·300·25 ≈ 2.5e-10 < ATOL. Huge logits (~1e300)
# are covered by RTOL (log-sum-exp in float64 is relatively accurate). An indexing mistake gives
# errors of the order of the values themselves (≈ 1).
ATOL = 1e-9
RTOL = 1e-9

FILLS = ("randn", "ties", "special")
LAYOUTS = ("contiguous", "channels_last", "noncontiguous", "transposed")


# ---------------------------------------------------------------------------------------------
# values, layouts, running both libraries


def make_values(shape: Sequence[int], fill: str, seed: int) -> torch.Tensor:
    """float64 values of ``shape``: 'randn'; 'ties' (integers in {-1, 0, 1}: many equal
    maxima and exact zeros); 'special' (randn with ±inf and NaN sprinkled in); 'masked' (randn
    with -inf sprinkled in, as masked logits: dim 1, or the last dim below 2-D, is the class
    dim); 'huge' (finite values near ±3e38 and ±1e300)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if fill == "ties":
        return torch.randint(-1, 2, shape, generator=g).to(F64)
    t = torch.randn(shape, generator=g, dtype=F64)
    r = torch.rand(shape, generator=g, dtype=F64)
    if fill == "special":
        t = t.masked_fill(r < 0.1, math.inf).masked_fill((r >= 0.1) & (r < 0.2), -math.inf)
        t = t.masked_fill((r >= 0.2) & (r < 0.3), math.nan)
    elif fill == "masked":  # a masked subset of classes: the largest logit of each row stays finite
        keep = t == t.amax(dim=-1 if len(shape) < 2 else 1, keepdim=True) if t.numel() else t.bool()
        t = t.masked_fill((r < 0.4) & ~keep, -math.inf)
    elif fill == "huge":  # |x| ≤ 2e300: a few of them summed or subtracted cannot overflow float64
        t = t.sign() * torch.where(r < 0.5, torch.full_like(t, 3e38), torch.full_like(t, 1e300)) * (1 + r)
    return t


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous" and t.dim() >= 1:
        return torch.stack([t, torch.full_like(t, 7.0)], dim=-1)[..., 0]  # every other element
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def run(fn: Callable, tensors: List[Optional[torch.Tensor]], grad_output: Callable[[torch.Tensor], torch.Tensor],
        backward: bool = True):
    """Forward and backward of fn(*tensors): returns (output, extra outputs, gradients of every
    floating-point tensor). grad_output(y) makes the upstream gradient for y."""
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    result = fn(*leaves)
    y, extra = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    grads = []
    if backward:
        diff = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, diff, grad_output(y), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(diff, grads)]
    return y.detach(), [e.detach() for e in extra], grads


def assert_equal_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: size {list(actual.shape)}, torch {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, torch {expected.dtype}"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True,
                               msg=lambda m: f"{what} differs from torch:\n{m}")


def contiguous_copy(t):
    return None if t is None else t.detach().contiguous()


def compare(manual: Callable, native: Callable, tensors: List[Optional[torch.Tensor]], backend: str,
            grad_fill: str, grad_seed: int, grad_layout: str = "contiguous", compare_extra=True):
    """Run manual on ``tensors`` (as laid out) and native on contiguous copies; the same
    upstream gradient for both. If torch raises, manualconv must raise the same type."""

    def grad_output(y):
        return laid_out(make_values(y.shape, grad_fill, grad_seed), grad_layout)

    native_tensors = [contiguous_copy(t) for t in tensors]
    try:
        run(native, native_tensors, grad_output, backward=False)
    except Exception as error:  # torch rejects this call: manualconv must reject it alike
        note(f"torch raised {type(error).__name__}: {error}")
        with manualconv.use_backend(backend), pytest.raises(Exception) as caught:
            run(manual, tensors, grad_output)
        assert type(caught.value) is type(error), (
            f"torch raises {type(error).__name__} ({error}), manualconv {type(caught.value).__name__} ({caught.value})")
        return None
    try:
        expected = run(native, native_tensors, grad_output)
    except Exception as error:
        # torch's forward works but its backward refuses (e.g. adaptive_avg_pool2d_backward on
        # zero channels): torch defines no gradient, so only the forward is compared
        note(f"torch's backward raised {type(error).__name__}: {error}")
        expected = run(native, native_tensors, grad_output, backward=False)
        with manualconv.use_backend(backend):
            actual = run(manual, tensors, grad_output, backward=False)
        assert_equal_values(actual[0], expected[0], "output")
        return None
    with manualconv.use_backend(backend):
        actual = run(manual, tensors, grad_output)
    assert_equal_values(actual[0], expected[0], "output")
    if compare_extra:
        for i, (a, e) in enumerate(zip(actual[1], expected[1])):
            assert a.dtype == e.dtype and torch.equal(a, e), f"extra output {i} (indices) differs from torch:\n{a}\n{e}"
    assert len(actual[2]) == len(expected[2])
    for i, (a, e) in enumerate(zip(actual[2], expected[2])):
        assert_equal_values(a, e, f"gradient {i}")
    return actual, expected


backends = pytest.mark.parametrize("backend", BACKENDS)
seeds = st.integers(0, 2**31 - 1)
fills = st.sampled_from(FILLS)
layouts = st.sampled_from(LAYOUTS)
# the upstream gradient of the linear ops stays finite: torch's kernels multiply the implicit
# zero padding by δ (0·inf = NaN) or skip it, depending on the kernel, so an infinite δ has no
# layout-independent torch result to compare with
finite_fills = st.sampled_from(("randn", "ties"))


@st.composite
def pair_or_int(draw, values):
    """An int or an (h, w) pair (as a tuple or list) of values drawn from ``values``."""
    h = draw(values)
    form = draw(st.sampled_from(("int", "tuple", "list")))
    if form == "int":
        return h, (h, h)
    w = draw(values)
    return ((h, w) if form == "tuple" else [h, w]), (h, w)


# ---------------------------------------------------------------------------------------------
# convolutions


@st.composite
def conv2d_calls(draw):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dil_arg, dilation = draw(pair_or_int(st.integers(1, 3)))
    pad_kind = draw(st.sampled_from(("int", "same", "valid")))
    if pad_kind == "same":
        stride_arg, stride = 1, (1, 1)
        pad_arg, padding = "same", (0, 0)
    else:
        stride_arg, stride = draw(pair_or_int(st.integers(1, 3)))
        if pad_kind == "valid":
            pad_arg, padding = "valid", (0, 0)
        else:
            pad_arg, padding = draw(pair_or_int(st.integers(0, 3)))
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    size = [max(1, e - 2 * p + draw(st.integers(0, 4))) for e, p in zip(effective, padding)]
    batch = draw(st.sampled_from((None, 0, 1, 2, 3)))  # None: unbatched (C, H, W)
    shape = ((batch,) if batch is not None else ()) + (cin, *size)
    kwargs = dict(stride=stride_arg, padding=pad_arg, dilation=dil_arg, groups=groups)
    return shape, (cout, cin // groups, *kernel), draw(st.booleans()), kwargs


@backends
@given(call=conv2d_calls(), fill=fills, weight_fill=finite_fills, layout=layouts, weight_layout=layouts,
       grad_fill=finite_fills, grad_layout=layouts, seed=seeds)
def test_conv2d(backend, call, fill, weight_fill, layout, weight_layout, grad_fill, grad_layout, seed):
    shape, weight_shape, bias, kwargs = call
    x = laid_out(make_values(shape, fill, seed), layout)
    w = laid_out(make_values(weight_shape, weight_fill, seed + 1), weight_layout)
    b = make_values((weight_shape[0],), "randn", seed + 2) if bias else None
    compare(lambda x, w, b: MF.conv2d(x, w, b, **kwargs), lambda x, w, b: F.conv2d(x, w, b, **kwargs),
            [x, w, b], backend, grad_fill, seed + 3, grad_layout)


@st.composite
def conv1d_calls(draw):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel, dilation = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    pad_kind = draw(st.sampled_from(("int", "same", "valid")))
    stride = 1 if pad_kind == "same" else draw(st.integers(1, 3))
    padding = {"same": "same", "valid": "valid"}.get(pad_kind) or draw(st.integers(0, 3))
    p = padding if isinstance(padding, int) else 0
    length = max(1, dilation * (kernel - 1) + 1 - 2 * p + draw(st.integers(0, 5)))
    batch = draw(st.sampled_from((None, 0, 1, 3)))
    wrap = draw(st.sampled_from((lambda v: v, lambda v: (v,) if not isinstance(v, str) else v)))
    shape = ((batch,) if batch is not None else ()) + (cin, length)
    kwargs = dict(stride=wrap(stride), padding=wrap(padding), dilation=wrap(dilation), groups=groups)
    return shape, (cout, cin // groups, kernel), draw(st.booleans()), kwargs


@backends
@given(call=conv1d_calls(), fill=fills, weight_fill=finite_fills, layout=layouts, grad_fill=finite_fills, seed=seeds)
def test_conv1d(backend, call, fill, weight_fill, layout, grad_fill, seed):
    shape, weight_shape, bias, kwargs = call
    x = laid_out(make_values(shape, fill, seed), layout)
    w = make_values(weight_shape, weight_fill, seed + 1)
    b = make_values((weight_shape[0],), "randn", seed + 2) if bias else None
    compare(lambda x, w, b: MF.conv1d(x, w, b, **kwargs), lambda x, w, b: F.conv1d(x, w, b, **kwargs),
            [x, w, b], backend, grad_fill, seed + 3)


@st.composite
def conv_transpose2d_calls(draw):
    groups = draw(st.integers(1, 3))
    cin, cout_per_group = groups * draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride_arg, stride = draw(pair_or_int(st.integers(1, 3)))
    dil_arg, dilation = draw(pair_or_int(st.integers(1, 3)))
    pad_arg, padding = draw(pair_or_int(st.integers(0, 3)))
    # output_padding must be smaller than stride or dilation
    out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    size = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    out = [(h - 1) * s - 2 * p + d * (k - 1) + o + 1
           for h, s, p, d, k, o in zip(size, stride, padding, dilation, kernel, out_pad)]
    assume(all(o > 0 for o in out))
    batch = draw(st.sampled_from((None, 0, 1, 2)))
    shape = ((batch,) if batch is not None else ()) + (cin, *size)
    kwargs = dict(stride=stride_arg, padding=pad_arg, output_padding=out_pad, groups=groups, dilation=dil_arg)
    return shape, (cin, cout_per_group, *kernel), draw(st.booleans()), kwargs


@backends
@given(call=conv_transpose2d_calls(), fill=fills, weight_fill=finite_fills, layout=layouts, grad_fill=finite_fills,
       grad_layout=layouts, seed=seeds)
def test_conv_transpose2d(backend, call, fill, weight_fill, layout, grad_fill, grad_layout, seed):
    shape, weight_shape, bias, kwargs = call
    x = laid_out(make_values(shape, fill, seed), layout)
    w = make_values(weight_shape, weight_fill, seed + 1)
    b = make_values((weight_shape[1] * kwargs["groups"],), "randn", seed + 2) if bias else None
    compare(lambda x, w, b: MF.conv_transpose2d(x, w, b, **kwargs),
            lambda x, w, b: F.conv_transpose2d(x, w, b, **kwargs),
            [x, w, b], backend, grad_fill, seed + 3, grad_layout)


# ---------------------------------------------------------------------------------------------
# pooling


def all_padding_windows(size, kernel, stride, padding, dilation, out_size) -> torch.Tensor:
    """(H_out, W_out) bool: windows none of whose taps lands in the image (only padding)."""
    def per_dim(n, k, s, p, d, o):
        return torch.tensor([not any(0 <= i * s - p + j * d < n for j in range(k)) for i in range(o)])
    rows = per_dim(size[0], kernel[0], stride[0], padding[0], dilation[0], out_size[0])
    cols = per_dim(size[1], kernel[1], stride[1], padding[1], dilation[1], out_size[1])
    return rows[:, None] | cols[None, :]


@st.composite
def max_pool2d_calls(draw):
    kernel_arg, kernel = draw(pair_or_int(st.integers(1, 4)))
    dil_arg, dilation = draw(pair_or_int(st.integers(1, 3)))
    if draw(st.booleans()):
        stride_arg, stride = None, kernel
    else:
        stride_arg, stride = draw(pair_or_int(st.integers(1, 3)))
    # torch's bound is half the kernel size, not of the dilated (effective) kernel
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(draw(st.integers(1, 9)) for _ in range(2))
    ceil_mode = draw(st.booleans())
    batch = draw(st.sampled_from((None, 0, 1, 2)))
    shape = ((batch,) if batch is not None else ()) + (draw(st.integers(1, 4)), *size)
    kwargs = dict(kernel_size=kernel_arg, stride=stride_arg, padding=padding, dilation=dil_arg, ceil_mode=ceil_mode)
    return shape, kwargs, (kernel, stride, padding, dilation)


@backends
@given(call=max_pool2d_calls(), fill=fills, layout=layouts, grad_fill=fills, grad_layout=layouts, seed=seeds)
# issue 12 item 3: channels-last windows lying entirely in the padding (width 1, dilation 2)
@example(call=((2, 16, 4, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2, ceil_mode=False),
               ((2, 2), (1, 1), (1, 1), (2, 2))),
         fill="randn", layout="channels_last", grad_fill="randn", grad_layout="contiguous", seed=0)
def test_max_pool2d(backend, call, fill, layout, grad_fill, grad_layout, seed):
    shape, kwargs, (kernel, stride, padding, dilation) = call
    x = laid_out(make_values(shape, fill, seed), layout)
    try:
        out_size = F.max_pool2d(x.contiguous(), **kwargs).shape[-2:]
    except RuntimeError:
        out_size = None
    empty = (all_padding_windows(shape[-2:], kernel, stride, padding, dilation, out_size)
             if out_size is not None else torch.zeros((), dtype=torch.bool))
    if not empty.any():
        compare(lambda x: MF.max_pool2d(x, **kwargs, return_indices=True),
                lambda x: F.max_pool2d(x, **kwargs, return_indices=True), [x], backend, grad_fill, seed + 3, grad_layout)
        return
    # Some windows lie entirely in the padding (possible with dilation). Their output is -inf;
    # their index is not meaningful, and torch's backward routes their δ through it (it can
    # crash or write out of bounds). So: values and the other indices against torch's forward,
    # the gradient against torch's forward indices with δ of the all-padding windows left out.
    note(f"all-padding windows:\n{empty}")
    expected_y, expected_indices = F.max_pool2d(x.contiguous(), **kwargs, return_indices=True)
    delta = make_values(expected_y.shape, grad_fill, seed + 3).masked_fill(empty, 0)
    if expected_indices.numel() and int(expected_indices.max()) >= shape[-1] * shape[-2]:
        # torch's index of such a window lies outside the plane (its backward writes out of
        # bounds): manualconv's forward gives the same index, its backward refuses it clearly
        with manualconv.use_backend(backend):
            y, indices = MF.max_pool2d(x, **kwargs, return_indices=True)
            assert torch.equal(indices.contiguous(), expected_indices), f"indices differ from torch's:\n{indices}\n{expected_indices}"
            with pytest.raises(RuntimeError, match="indices"):
                MF.max_pool2d(x.detach().requires_grad_(), **kwargs).backward(laid_out(delta, grad_layout))
        return
    with manualconv.use_backend(backend):
        y, (indices,), (grad,) = run(lambda x: MF.max_pool2d(x, **kwargs, return_indices=True), [x],
                                     lambda y: laid_out(delta, grad_layout))
    assert_equal_values(y, expected_y, "output")
    assert torch.equal(indices.masked_fill(empty, 0), expected_indices.masked_fill(empty, 0)), (
        f"indices differ from torch outside the all-padding windows:\n{indices}\n{expected_indices}")
    plane = x.contiguous().flatten(-2)
    expected_grad = torch.zeros_like(plane).scatter_add(-1, expected_indices.flatten(-2), delta.flatten(-2))
    assert_equal_values(grad, expected_grad.reshape(x.shape), "gradient")


@st.composite
def avg_pool2d_calls(draw):
    kernel_arg, kernel = draw(pair_or_int(st.integers(1, 4)))
    if draw(st.booleans()):
        stride_arg = None
    else:
        stride_arg, _ = draw(pair_or_int(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(draw(st.integers(1, 9)) for _ in range(2))
    batch = draw(st.sampled_from((None, 0, 1, 2)))
    shape = ((batch,) if batch is not None else ()) + (draw(st.integers(1, 4)), *size)
    kwargs = dict(kernel_size=kernel_arg, stride=stride_arg, padding=padding, ceil_mode=draw(st.booleans()),
                  count_include_pad=draw(st.booleans()),
                  divisor_override=draw(st.sampled_from((None, 1, 2, 3, 7))))
    return shape, kwargs


@backends
@given(call=avg_pool2d_calls(), fill=fills, layout=layouts, grad_fill=fills, grad_layout=layouts, seed=seeds)
def test_avg_pool2d(backend, call, fill, layout, grad_fill, grad_layout, seed):
    shape, kwargs = call
    x = laid_out(make_values(shape, fill, seed), layout)
    compare(lambda x: MF.avg_pool2d(x, **kwargs), lambda x: F.avg_pool2d(x, **kwargs), [x], backend,
            grad_fill, seed + 3, grad_layout)


@st.composite
def adaptive_calls(draw):
    size = tuple(draw(st.integers(1, 9)) for _ in range(2))
    form = draw(st.sampled_from(("int", "pair", "none")))
    if form == "int":
        output_size = draw(st.integers(1, 10))
    else:
        output_size = tuple(draw(st.integers(1, 10)) for _ in range(2))
        if form == "none":
            output_size = (None, output_size[1]) if draw(st.booleans()) else (output_size[0], None)
    batch = draw(st.sampled_from((None, 0, 1, 2)))
    shape = ((batch,) if batch is not None else ()) + (draw(st.integers(0, 4)), *size)
    return shape, output_size


@backends
@given(call=adaptive_calls(), fill=fills, layout=layouts, grad_fill=fills, grad_layout=layouts, seed=seeds)
def test_adaptive_max_pool2d(backend, call, fill, layout, grad_fill, grad_layout, seed):
    shape, output_size = call
    x = laid_out(make_values(shape, fill, seed), layout)
    compare(lambda x: MF.adaptive_max_pool2d(x, output_size, return_indices=True),
            lambda x: F.adaptive_max_pool2d(x, output_size, return_indices=True), [x], backend,
            grad_fill, seed + 3, grad_layout)


@backends
@given(call=adaptive_calls(), fill=fills, layout=layouts, grad_fill=fills, grad_layout=layouts, seed=seeds)
def test_adaptive_avg_pool2d(backend, call, fill, layout, grad_fill, grad_layout, seed):
    shape, output_size = call
    x = laid_out(make_values(shape, fill, seed), layout)
    compare(lambda x: MF.adaptive_avg_pool2d(x, output_size), lambda x: F.adaptive_avg_pool2d(x, output_size),
            [x], backend, grad_fill, seed + 3, grad_layout)


@st.composite
def subsampling_calls(draw):
    n = draw(st.integers(1, 3))
    size = (n * draw(st.integers(1, 4)), n * draw(st.integers(1, 4)))
    batch = draw(st.sampled_from((None, 0, 1, 2)))
    shape = ((batch,) if batch is not None else ()) + (draw(st.integers(1, 4)), *size)
    return shape, n, draw(st.booleans())


@backends
@given(call=subsampling_calls(), fill=fills, layout=layouts, grad_fill=finite_fills, seed=seeds)
def test_subsampling2d(backend, call, fill, layout, grad_fill, seed):
    """torch.nn has no trainable subsampling: the oracle is the block sums written as tensor ops."""
    shape, n, bias = call
    x = laid_out(make_values(shape, fill, seed), layout)
    beta = make_values((shape[-3],), "randn", seed + 1)
    b = make_values((shape[-3],), "randn", seed + 2) if bias else None
    compare(lambda x, beta, b: MF.subsampling2d(x, beta, b, n),
            lambda x, beta, b: _subsampling_by_tensor_ops(x, beta, b, kernel_size=n),
            [x, beta, b], backend, grad_fill, seed + 3)


# ---------------------------------------------------------------------------------------------
# linear, activations, loss


@st.composite
def linear_calls(draw):
    batch = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
    in_features, out_features = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    bias = draw(st.sampled_from((None, (out_features,), ())))
    return batch + (in_features,), (out_features, in_features), bias


@backends
@given(call=linear_calls(), fill=fills, weight_fill=finite_fills, layout=layouts, grad_fill=finite_fills, seed=seeds)
def test_linear(backend, call, fill, weight_fill, layout, grad_fill, seed):
    shape, weight_shape, bias_shape = call
    x = laid_out(make_values(shape, fill, seed), layout)
    w = make_values(weight_shape, weight_fill, seed + 1)
    b = None if bias_shape is None else make_values(bias_shape, "randn", seed + 2)
    compare(MF.linear, F.linear, [x, w, b], backend, grad_fill, seed + 3)


ACTIVATIONS = {"relu": (MF.relu, F.relu), "sigmoid": (MF.sigmoid, torch.sigmoid), "tanh": (MF.tanh, torch.tanh)}


@backends
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4), fill=fills, layout=layouts, grad_fill=fills,
       seed=seeds)
def test_activation(backend, name, shape, fill, layout, grad_fill, seed):
    """Piecewise derivatives select: an infinite or NaN δ where the derivative is 0 gives 0."""
    manual, native = ACTIVATIONS[name]
    x = laid_out(make_values(shape, fill, seed), layout)
    compare(manual, native, [x], backend, grad_fill, seed + 3)


@st.composite
def cross_entropy_calls(draw):
    classes = draw(st.integers(1, 5))
    form = draw(st.sampled_from(("1d", "2d", "4d")))
    batch = draw(st.integers(0, 4))
    if form == "1d":
        shape = (classes,)
    elif form == "2d":
        shape = (batch, classes)
    else:
        shape = (batch, classes, draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    target_kind = draw(st.sampled_from(("index", "probabilities")))
    kwargs = dict(reduction=draw(st.sampled_from(("mean", "sum", "none"))),
                  label_smoothing=draw(st.sampled_from((0.0, 0.1, 0.5, 1.0))))
    if target_kind == "index":
        kwargs["ignore_index"] = draw(st.sampled_from((-100, 0, classes - 1)))
    return shape, target_kind, draw(st.booleans()), kwargs, draw(st.floats(0.0, 1.0))


# the upstream gradient stays finite: with an infinite δ torch's own gradient is 0·inf artefacts
# of its log_softmax backward (NaN at the target, ±inf elsewhere), no defined result to match
@backends
@pytest.mark.parametrize("fill", ("randn", "ties", "masked", "huge", "special"))  # one test each: separate findings
@given(call=cross_entropy_calls(), grad_fill=finite_fills, seed=seeds)
def test_cross_entropy(backend, fill, call, grad_fill, seed):
    """Masked logits (-inf), NaN, ±inf, huge finite logits, ignored samples (all of them too),
    class weights, label smoothing, probability targets (differentiable, so their gradient too)."""
    shape, target_kind, weighted, kwargs, ignored_share = call
    classes = shape[0] if len(shape) == 1 else shape[1]
    logits = make_values(shape, fill, seed)
    g = torch.Generator().manual_seed(seed + 1)
    if target_kind == "index":
        target_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        target = torch.randint(0, classes, target_shape, generator=g)
        ignore = torch.rand(target_shape, generator=g) < ignored_share
        target = target.masked_fill(ignore, kwargs["ignore_index"])
    else:
        target = torch.rand(shape, generator=g, dtype=F64).softmax(dim=0 if len(shape) == 1 else 1)
    weight = torch.rand((classes,), generator=g, dtype=F64) + 0.5 if weighted else None
    # class weights are not differentiable in torch: passed outside the differentiated tensors
    compare(lambda x, t: MF.cross_entropy(x, t, weight, **kwargs), lambda x, t: F.cross_entropy(x, t, weight, **kwargs),
            [logits, target], backend, grad_fill, seed + 3)


# ---------------------------------------------------------------------------------------------
# invalid arguments: manualconv raises what torch raises, naming the argument


def assert_rejected_like_torch(backend: str, manual: Callable, native: Callable, names: Sequence[str]):
    """torch's call raises T: manualconv's raises exactly T with a message naming one of
    ``names``. If torch accepts the call, manualconv must too (and give torch's output)."""
    try:
        expected = native()
    except Exception as error:
        note(f"torch raised {type(error).__name__}: {error}")
        with manualconv.use_backend(backend), pytest.raises(Exception) as caught:
            manual()
        assert type(caught.value) is type(error), (
            f"torch raises {type(error).__name__} ({error}); manualconv raises "
            f"{type(caught.value).__name__} ({caught.value})")
        message = str(caught.value).lower()
        assert any(name.lower() in message for name in names), (
            f"manualconv's message does not name {' or '.join(names)}: {caught.value}")
        return
    with manualconv.use_backend(backend):
        actual = manual()
    if isinstance(expected, tuple):
        expected, actual = expected[0], actual[0]
    assert_equal_values(actual, expected, f"torch accepts this call; manualconv's output")


BAD_INTS = (0, -1, -2, 1.5, 2.0, True, (1, 1, 1), (1, 0), "1")


def nonempty(shape) -> None:
    """Spoiled calls use non-empty input: torch's conv returns an empty result for an empty
    batch without validating stride/dilation/... (F.conv2d(x[:0], w, dilation=0) works), a
    laxness manualconv need not copy; empty input is tested by the valid-call tests."""
    assume(math.prod(shape) > 0)


def spoil(draw, kwargs, name, bad_values):
    spoiled = dict(kwargs)
    spoiled[name] = draw(st.sampled_from(bad_values))
    return spoiled


@backends
@pytest.mark.parametrize("what", ("stride", "padding", "dilation", "groups", "kernel", "input", "bias", "weight", "dtype"))
@given(data=st.data(), call=conv2d_calls(), seed=seeds)
def test_conv2d_invalid(backend, what, data, call, seed):
    shape, weight_shape, bias, kwargs = call
    nonempty(shape)
    x = make_values(shape, "randn", seed)
    w = make_values(weight_shape, "randn", seed + 1)
    b = make_values((weight_shape[0],), "randn", seed + 2) if bias else None
    names = (what,)
    if what in ("stride", "dilation"):
        kwargs = spoil(data.draw, kwargs, what, BAD_INTS)
    elif what == "padding":
        kwargs = spoil(data.draw, kwargs, what, (-1, 1.5, (1, -1), "full", "SAME", (1, 1, 1), None))
    elif what == "groups":
        kwargs = spoil(data.draw, kwargs, what, (0, -1, 1.5, kwargs["groups"] + 1, 5, (1,), None))
        names = ("groups", "channels")
    elif what == "kernel":  # a kernel larger than the padded input
        size = x.shape[-2:]
        w = make_values(weight_shape[:2] + (size[0] + 5, 1), "randn", seed + 1)
        kwargs["padding"] = 0 if kwargs["padding"] == "same" else kwargs["padding"]
        kwargs["padding"] = kwargs["padding"] if isinstance(kwargs["padding"], (int, str)) else 0
        kwargs["dilation"] = 1
        names = ("kernel",)
    elif what == "input":  # wrong rank
        x = data.draw(st.sampled_from((x.reshape(-1), x.reshape(1, 1, *x.shape) if x.dim() == 4 else x.reshape(-1, 1))))
        names = ("input", "expected")
    elif what == "bias":
        b = make_values((weight_shape[0] + 1,), "randn", seed + 2)
    elif what == "weight":
        w = data.draw(st.sampled_from((w[0], w.unsqueeze(0), make_values((weight_shape[0], weight_shape[1] + 1) + weight_shape[2:], "randn", 0))))
        names = ("weight", "channels")
    else:  # dtype
        kind = data.draw(st.sampled_from(("float32-weight", "integer-input", "float32-bias")))
        if kind == "float32-weight":
            w, names = w.float(), ("weight", "type")
        elif kind == "integer-input":
            x, names = x.long(), ("input", "type")
        else:
            b, names = make_values((weight_shape[0],), "randn", 0).float(), ("bias", "type")
            # torch's padding='same'/'valid' path skips its bias dtype check (it accepts a float32
            # bias on float64 input); its numeric-padding path rejects it: compare with that one
            if isinstance(kwargs["padding"], str):
                kwargs["padding"] = 0 if kwargs["padding"] == "valid" else [(k - 1) // 2 for k in weight_shape[2:]]
                assume(all((k - 1) % 2 == 0 for k in weight_shape[2:]) or kwargs["padding"] == 0)
    note(f"spoiled {what}: {kwargs}")
    assert_rejected_like_torch(backend, lambda: MF.conv2d(x, w, b, **kwargs), lambda: F.conv2d(x, w, b, **kwargs), names)


@backends
@pytest.mark.parametrize("what", ("stride", "padding", "dilation", "groups"))
@given(data=st.data(), call=conv1d_calls(), seed=seeds)
def test_conv1d_invalid(backend, what, data, call, seed):
    shape, weight_shape, bias, kwargs = call
    nonempty(shape)
    x, w = make_values(shape, "randn", seed), make_values(weight_shape, "randn", seed + 1)
    bad = {"stride": BAD_INTS, "dilation": BAD_INTS, "padding": (-1, 1.5, (1, 1), "full", None),
           "groups": (0, -1, 1.5, kwargs["groups"] + 1)}[what]
    kwargs = spoil(data.draw, kwargs, what, bad)
    note(f"spoiled {what}: {kwargs}")
    assert_rejected_like_torch(backend, lambda: MF.conv1d(x, w, None, **kwargs), lambda: F.conv1d(x, w, None, **kwargs),
                               (what, "channels") if what == "groups" else (what,))


@backends
@pytest.mark.parametrize("what", ("stride", "padding", "dilation", "groups", "output_padding"))
@given(data=st.data(), call=conv_transpose2d_calls(), seed=seeds)
def test_conv_transpose2d_invalid(backend, what, data, call, seed):
    shape, weight_shape, bias, kwargs = call
    nonempty(shape)
    x, w = make_values(shape, "randn", seed), make_values(weight_shape, "randn", seed + 1)
    bad = {"stride": BAD_INTS, "dilation": BAD_INTS, "padding": (-1, 1.5, "same", "valid", (1, 1, 1)),
           "groups": (0, -1, 1.5, kwargs["groups"] + 1), "output_padding": (-1, 1.5, 3, (0, 3), (1, 1, 1))}[what]
    kwargs = spoil(data.draw, kwargs, what, bad)
    note(f"spoiled {what}: {kwargs}")
    assert_rejected_like_torch(backend, lambda: MF.conv_transpose2d(x, w, None, **kwargs),
                               lambda: F.conv_transpose2d(x, w, None, **kwargs),
                               (what, "channels") if what == "groups" else (what,))


@backends
@pytest.mark.parametrize("what", ("kernel_size", "stride", "padding", "padding-dilated", "dilation", "input-rank",
                                  "input-dtype"))
@given(data=st.data(), call=max_pool2d_calls(), seed=seeds)
def test_max_pool2d_invalid(backend, what, data, call, seed):
    shape, kwargs, _ = call
    nonempty(shape)
    x = make_values(shape, "randn", seed)
    names = (what,)
    if what == "input-rank":
        x = data.draw(st.sampled_from((x.reshape(-1), x.reshape(1, 1, *x.shape) if x.dim() == 4 else x.reshape(-1, 1))))
        names = ("input", "dim", "size")
    elif what == "input-dtype":
        x = (x * 10).to(data.draw(st.sampled_from((torch.int64, torch.int32, torch.uint8, torch.bool))))
        names = ("input", "type")
        try:
            F.max_pool2d(x, **kwargs)
        except Exception:
            pass  # torch rejects it (bool, or a bad shape): manualconv must raise the same below
        else:
            # torch max-pools integer tensors; manualconv's kernels are floating-point only, and it
            # says so with the type torch raises for the dtypes it does not pool (bool): a choice
            # listed in README's "Choices worth knowing"
            with manualconv.use_backend(backend), pytest.raises(NotImplementedError, match="floating-point"):
                MF.max_pool2d(x, **kwargs)
            return
    elif what == "padding-dilated":
        # torch bounds the padding by half the kernel size, not half the dilated kernel: a pad in
        # between, on an input large enough for a positive output size, must be rejected too
        k, d = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 3))
        pad = k // 2 + 1
        assume(pad <= ((k - 1) * d + 1) // 2)
        x = make_values((1, 2, (k - 1) * d + 3, 4), "randn", seed)
        kwargs = dict(kernel_size=(k, 1), padding=(pad, 0), dilation=(d, 1))
        names = ("pad",)
    else:
        bad = {"kernel_size": (0, -1, 1.5, (1, 1, 1), (2, 0), 20), "stride": BAD_INTS,
               "padding": (-1, 1.5, 5, (0, 5), (1, 1, 1)), "dilation": BAD_INTS}[what]
        kwargs = spoil(data.draw, kwargs, what, bad)
        if what == "kernel_size":
            names = ("kernel", "output size", "pad")
        if what == "padding":
            names = ("pad",)
    note(f"spoiled {what}: {kwargs}")
    assert_rejected_like_torch(backend, lambda: MF.max_pool2d(x, **kwargs), lambda: F.max_pool2d(x, **kwargs), names)


@backends
@pytest.mark.parametrize("what", ("kernel_size", "stride", "padding", "divisor_override"))
@given(data=st.data(), call=avg_pool2d_calls(), seed=seeds)
def test_avg_pool2d_invalid(backend, what, data, call, seed):
    shape, kwargs = call
    nonempty(shape)
    x = make_values(shape, "randn", seed)
    bad = {"kernel_size": (0, -1, 1.5, (1, 1, 1), (2, 0), 20), "stride": BAD_INTS,
           "padding": (-1, 1.5, 5, (0, 5), (1, 1, 1)), "divisor_override": (0, 1.5, 2.0, "2")}[what]
    kwargs = spoil(data.draw, kwargs, what, bad)
    names = {"kernel_size": ("kernel", "output size", "pad"), "padding": ("pad",),
             "divisor_override": ("divisor",)}.get(what, (what,))
    note(f"spoiled {what}: {kwargs}")
    assert_rejected_like_torch(backend, lambda: MF.avg_pool2d(x, **kwargs), lambda: F.avg_pool2d(x, **kwargs), names)


@backends
@pytest.mark.parametrize("op", ("adaptive_max_pool2d", "adaptive_avg_pool2d"))
@pytest.mark.parametrize("output_size", (-1, (2, -1), 1.5, (2.0, 2), (1, 2, 3), "2"), ids=repr)
@given(call=adaptive_calls(), seed=seeds)
def test_adaptive_pool2d_invalid(backend, op, output_size, call, seed):
    shape, _ = call
    nonempty(shape)  # zero channels are valid (test_adaptive_*): spoil one thing at a time
    x = make_values(shape, "randn", seed)
    note(f"output_size={output_size!r}")
    assert_rejected_like_torch(backend, lambda: getattr(MF, op)(x, output_size),
                               lambda: getattr(F, op)(x, output_size), ("output_size",))


@backends
@pytest.mark.parametrize("what", ("target-range", "reduction", "label_smoothing", "weight",
                                  "probabilities-ignore_index", "target-dtype"))
@given(data=st.data(), call=cross_entropy_calls(), seed=seeds)
def test_cross_entropy_invalid(backend, what, data, call, seed):
    shape, target_kind, weighted, kwargs, _ = call
    classes = shape[0] if len(shape) == 1 else shape[1]
    logits = make_values(shape, "randn", seed)
    target_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    target = torch.zeros(target_shape, dtype=torch.long)
    weight = None
    names = {"target-range": ("target",), "reduction": ("reduction",), "label_smoothing": ("label_smoothing",),
             "weight": ("weight",), "probabilities-ignore_index": ("ignore_index",),
             "target-dtype": ("target",)}[what]
    if what == "target-range":
        target = torch.full(target_shape, data.draw(st.sampled_from((classes, -1, classes + 7))), dtype=torch.long)
    elif what == "reduction":
        kwargs["reduction"] = data.draw(st.sampled_from(("avg", "", "MEAN")))
    elif what == "label_smoothing":
        kwargs["label_smoothing"] = data.draw(st.sampled_from((-0.1, 1.5)))
    elif what == "weight":
        weight = make_values((classes + 1,), "randn", seed).abs()
    elif what == "probabilities-ignore_index":
        target = torch.full(shape, 1.0 / classes, dtype=F64)
        kwargs["ignore_index"] = data.draw(st.sampled_from((0, 3, -1)))
    else:
        target = target.to(data.draw(st.sampled_from((torch.int32, torch.int16, torch.bool))))
    note(f"spoiled {what}: {kwargs}")
    assert_rejected_like_torch(backend, lambda: MF.cross_entropy(logits, target, weight, **kwargs),
                               lambda: F.cross_entropy(logits, target, weight, **kwargs), names)
