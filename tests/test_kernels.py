"""Kernel-level contracts the case table does not reach: windows that lie entirely in the padding
(issue 12, item 3) and the CPU kernels' float16/bfloat16 inputs (computed in float32).

torch.nn's channels-last max pooling is not a trustworthy oracle for these windows (its backward
writes out of bounds for some of them, issue 12): every expectation here comes from torch's NCHW
path in float64, whatever layout manualconv is given.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import manualconv.functional as MF

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# Max-pool geometries whose windows lie entirely in the padding (along one dimension every tap
# of the dilated window falls outside the image; then all windows do, since each is a row range ×
# a column range), as (input size, kernel_size, stride, padding, dilation, ceil_mode). The first
# is issue 12's example; in the second the first tap at or past the corner lies beyond the plane.
ALL_PADDING_WINDOWS = [
    ((2, 16, 4, 1), 2, 1, 1, 2, False),
    ((2, 8, 1, 5), (2, 3), 1, 1, (2, 1), False),
    ((1, 24, 5, 1), (3, 2), (2, 1), 1, (2, 2), True),
    ((3, 5, 6, 2), 2, (1, 2), 1, (2, 3), True),
    ((2, 3, 7, 2), (3, 2), (2, 1), (1, 1), (1, 3), False),
]


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", ALL_PADDING_WINDOWS, ids=lambda g: "x".join(map(str, g[0])))
def test_max_pool2d_all_padding_windows(backend, layout, geometry):
    """A window with no tap inside the image gives −∞ and torch's index (its first tap at or past
    the top-left corner, h·W + w, as on the NCHW path); it must never be left unwritten."""
    size, kernel_size, stride, padding, dilation, ceil_mode = geometry
    x = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    args = (kernel_size, stride, padding, dilation, ceil_mode)
    expected, expected_indices = F.max_pool2d(x, *args, return_indices=True)
    assert expected.isinf().any(), "the geometry has no all-padding window: the test would test nothing"
    for _ in range(3):  # uninitialised memory differs from call to call: look more than once
        y, indices = MF.max_pool2d(_in_layout(x, layout), *args, return_indices=True)
        assert torch.equal(y, expected), f"{backend} {layout}: values differ from torch's NCHW path"
        assert torch.equal(indices, expected_indices), f"{backend} {layout}: indices differ from torch's"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", ALL_PADDING_WINDOWS, ids=lambda g: "x".join(map(str, g[0])))
def test_max_pool2d_all_padding_windows_backward(backend, layout, geometry):
    """The backward routes each δy to the recorded index, the all-padding windows' too, as torch's
    NCHW path does. Where such an index falls outside the plane torch's backward writes out of
    bounds (it is not run then); manualconv's must raise a RuntimeError instead."""
    size, kernel_size, stride, padding, dilation, ceil_mode = geometry
    args = (kernel_size, stride, padding, dilation, ceil_mode)
    x = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    _, torch_indices = F.max_pool2d(x, *args, return_indices=True)
    # small integers: every sum of routed deltas is exact in float64, whatever the order of the adds
    grad_output = torch.randint(-8, 9, torch_indices.shape, generator=torch.Generator().manual_seed(14)).double()
    leaf = _in_layout(x.clone(), layout).requires_grad_()
    y = MF.max_pool2d(leaf, *args)
    if int(torch_indices.max()) >= size[2] * size[3]:
        with pytest.raises(RuntimeError, match="indices"):
            y.backward(grad_output)
        return
    x64 = x.clone().requires_grad_()  # NCHW, float64
    F.max_pool2d(x64, *args).backward(grad_output)
    y.backward(grad_output)
    assert torch.equal(leaf.grad, x64.grad), f"{backend} {layout}: gradient differs from torch's NCHW path"


def _kernel_calls(x, w, dy_conv, dy_pool, dy_avg, dy_adaptive):
    """One call of each CPU kernel (torch.ops.manualconv.*) on the given tensors, in order."""
    ops = torch.ops.manualconv
    conv = ([1, 1], [1, 1], [1, 1], 1)
    avg = ([3, 3], [2, 2], [1, 1], False, True, None)
    y, indices = ops.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    return {
        "conv2d_forward": ops.conv2d_forward(x, w, w[:, 0, 0, 0].contiguous(), *conv),
        "conv2d_grad_input": ops.conv2d_grad_input(dy_conv, w, list(x.shape), *conv),
        "conv2d_grad_weight": ops.conv2d_grad_weight(x, dy_conv, list(w.shape), *conv),
        "max_pool2d_forward": (y, indices),
        "max_pool2d_backward": ops.max_pool2d_backward(dy_pool, indices, list(x.shape)),
        "avg_pool2d_forward": ops.avg_pool2d_forward(x, *avg),
        "avg_pool2d_backward": ops.avg_pool2d_backward(dy_avg, list(x.shape), *avg),
        "adaptive_max_pool2d_forward": ops.adaptive_max_pool2d_forward(x, [3, 3]),
        "adaptive_avg_pool2d_forward": ops.adaptive_avg_pool2d_forward(x, [3, 3]),
        "adaptive_avg_pool2d_backward": ops.adaptive_avg_pool2d_backward(dy_adaptive, list(x.shape)),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernels_compute_low_precision_in_float32(dtype, layout):
    """Every CPU kernel takes float16 / bfloat16 tensors: it computes in float32 and rounds its
    result once to the input dtype (indices stay int64), in the layout float32 gives. So the
    result must equal, bit for bit, the float32 kernel's on the same (rounded) data, rounded."""
    gen = torch.Generator().manual_seed(15)
    # 8 channels: in channels-last float32 the conv runs its direct kernels (csrc/conv2d_direct.cpp)
    tensors = {
        "x": torch.randn(2, 8, 7, 7, generator=gen),
        "w": torch.randn(8, 8, 3, 3, generator=gen),
        "dy_conv": torch.randn(2, 8, 7, 7, generator=gen),
        "dy_pool": torch.randn(2, 8, 3, 3, generator=gen),
        "dy_avg": torch.randn(2, 8, 4, 4, generator=gen),
        "dy_adaptive": torch.randn(2, 8, 3, 3, generator=gen),
    }
    low = {name: _in_layout(t.to(dtype), layout) for name, t in tensors.items()}
    wide = {name: t.float() for name, t in low.items()}  # .float() keeps the layout
    results, expected = _kernel_calls(**low), _kernel_calls(**wide)
    for op, result in results.items():
        outputs = result if isinstance(result, tuple) else (result,)
        references = expected[op] if isinstance(expected[op], tuple) else (expected[op],)
        for out, ref in zip(outputs, references):
            rounded = ref.to(dtype) if ref.is_floating_point() else ref
            assert out.dtype == rounded.dtype, f"{op}: dtype {out.dtype}, expected {rounded.dtype}"
            assert out.stride() == ref.stride(), f"{op}: layout differs from the float32 kernel's"
            assert torch.equal(out, rounded), f"{op} in {dtype}: not the float32 result rounded"


# ---------------------------------------------------------------------------------------------
# The channels-last pooling kernels (csrc/avg_pool2d.cpp, csrc/adaptive_pool2d.cpp,
# csrc/max_pool2d.cpp) where the case table does not reach: layouts that are ambiguous (1×1
# planes, one channel, batch 1), and NaN / ±∞ in the average pools.

def _layout_of(t: torch.Tensor) -> str:
    return "nchw" if t.is_contiguous() else "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def _rule(t: torch.Tensor) -> str:
    """csrc/geometry.h's output_layout: channels-last for a channels-last tensor that is not also
    NCHW-contiguous, else NCHW."""
    return "channels_last" if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) else "nchw"


# (functional, keyword arguments): each pool with the options its channels-last kernel branches on
CHANNELS_LAST_POOLS = [
    ("max_pool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("max_pool2d", dict(kernel_size=1)),
    ("avg_pool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg_pool2d", dict(kernel_size=2, stride=1, padding=1, divisor_override=3)),
    ("avg_pool2d", dict(kernel_size=1)),
    ("adaptive_avg_pool2d", dict(output_size=1)),
    ("adaptive_avg_pool2d", dict(output_size=(3, 2))),
    ("adaptive_max_pool2d", dict(output_size=1)),
    ("adaptive_max_pool2d", dict(output_size=(3, 2))),
]
# batch 1, one channel, 1×1 planes (then every layout is also NCHW-contiguous), 1×1 outputs of a
# larger plane, and channel counts around the vector widths (4, 8, 16 float lanes)
AMBIGUOUS_SHAPES = [(1, 5, 4, 3), (3, 1, 4, 4), (2, 5, 1, 1), (1, 1, 1, 1), (2, 7, 2, 2), (2, 17, 3, 5), (1, 33, 5, 4)]


def _pool_call(name, kwargs, x):
    if name in ("max_pool2d", "adaptive_max_pool2d"):
        return getattr(MF, name)(x, **kwargs, return_indices=True)
    return getattr(MF, name)(x, **kwargs), None


def _fits(name, kwargs, shape):
    if name.startswith("adaptive"):
        return True
    k, p = kwargs["kernel_size"], kwargs.get("padding", 0)
    return min(shape[2:]) + 2 * p >= k


def _pool_id(pool) -> str:
    return f"{pool[0]}-{'-'.join(f'{k}{v}' for k, v in pool[1].items())}"


@pytest.mark.parametrize("pool,shape", [
    pytest.param(pool, shape, id=f"{_pool_id(pool)}-{'x'.join(map(str, shape))}")
    for pool in CHANNELS_LAST_POOLS for shape in AMBIGUOUS_SHAPES if _fits(*pool, shape)])
def test_channels_last_pool_layout_and_values(cpp, pool, shape):
    """A channels-last input (as a channels-last network feeds it, δy channels-last too): output,
    indices and δx follow the layout rule (geometry.h, ops.py's fake kernels), which is torch's
    wherever the tensor's layout is not ambiguous; values equal torch's NCHW float64 path."""
    name, kwargs = pool
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    leaf = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y, indices = _pool_call(name, kwargs, leaf)
    native = getattr(F, name)(leaf, **kwargs)
    grad_output = torch.randn(y.shape, dtype=torch.float64, generator=gen).contiguous(memory_format=torch.channels_last)
    (grad_input,) = torch.autograd.grad(y, leaf, grad_output)
    # (a 1×1 plane, or one channel, is both: it meets either layout)
    for what, ours, like in (("output", y, leaf), ("indices", indices, leaf), ("grad_input", grad_input, grad_output)):
        if ours is not None:
            assert ours.is_contiguous(memory_format=LAYOUTS[_rule(like)]), f"{what}: {ours.stride()}, the rule says {_rule(like)}"
    assert _layout_of(y) == _layout_of(native), f"output: {_layout_of(y)}, torch's is {_layout_of(native)}"
    if _rule(grad_output) == "channels_last":  # (torch's δx follows the input; ours δy: they agree here)
        (native_grad,) = torch.autograd.grad(native, leaf, grad_output)
        assert _layout_of(grad_input) == _layout_of(native_grad), \
            f"grad_input: {_layout_of(grad_input)}, torch's is {_layout_of(native_grad)}"
    x64 = x.clone().requires_grad_()  # NCHW, float64: the oracle
    expected = getattr(F, name)(x64, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad_output)
    # float64 sums of at most H·W terms, in another order than torch's: a few ulps apart
    torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad_input, expected_grad, rtol=1e-13, atol=1e-13)
    if indices is not None:
        assert torch.equal(indices, getattr(F, name)(x64, **kwargs, return_indices=True)[1])


HOSTILE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("pool", CHANNELS_LAST_POOLS[2:], ids=_pool_id)
def test_channels_last_pools_propagate_nan_and_inf(cpp, pool, value):
    """NaN and ±∞ in a channels-last input give torch's values (NCHW path, float64) in every
    output: the average pools' sums (∞ − ∞ = NaN), the max pool's ties and NaN winners, and the
    indices. Some entries hold ∞ and others −∞ in the same windows."""
    name, kwargs = pool
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 11, 7, 6, dtype=torch.float64, generator=gen)
    x.view(-1)[::5] = HOSTILE[value]
    x.view(-1)[3::13] = -HOSTILE[value] if value != "nan" else 0.0
    y, indices = _pool_call(name, kwargs, x.contiguous(memory_format=torch.channels_last))
    expected = getattr(F, name)(x, **kwargs)
    assert (~expected.isfinite()).any(), "no non-finite output: the test would test nothing"
    torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13, equal_nan=True)  # (as above: float64 sums)
    if indices is not None:
        assert torch.equal(indices, getattr(F, name)(x, **kwargs, return_indices=True)[1])


BUILDS_SCRIPT = """
import sys, torch, manualconv
import manualconv.functional as MF
gen = torch.Generator().manual_seed(18)
x = torch.randn(3, 19, 9, 8, generator=gen)
x.view(-1)[::7] = float("nan")
x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
results = []
for name, kwargs in [("max_pool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
                     ("avg_pool2d", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
                     ("adaptive_avg_pool2d", dict(output_size=(4, 3))), ("adaptive_max_pool2d", dict(output_size=(4, 3)))]:
    y = getattr(MF, name)(x, **kwargs)
    dy = torch.randn(y.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    results += [y, torch.autograd.grad(y, x, dy)[0]]
    if "max" in name:
        results.append(getattr(MF, name)(x, **kwargs, return_indices=True)[1])
torch.save(results, sys.argv[1])
"""


def test_channels_last_pool_builds_agree(tmp_path):
    """The channels-last pool loops' two builds (pool_channels_last.h: AVX-512, which the CPU
    chooses where it has it, and the baseline that MANUALCONV_CPU_CAPABILITY=default selects) give bit-identical
    results: the loops are element-wise over channels. (On a CPU without AVX-512 both runs take
    the baseline build.) 19 channels: full vectors and a remainder in either build."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for capability in ("chosen", "default"):  # (chosen: the variable unset, the CPU decides)
        path = tmp_path / f"{capability}.pt"
        env = {k: v for k, v in os.environ.items() if k != "MANUALCONV_CPU_CAPABILITY"}
        env.update(PYTHONPATH=root, **({"MANUALCONV_CPU_CAPABILITY": capability} if capability == "default" else {}))
        subprocess.run([sys.executable, "-c", BUILDS_SCRIPT, str(path)], env=env, check=True, cwd=root)
        runs[capability] = torch.load(path)
    for wide, base in zip(runs["chosen"], runs["default"]):
        assert wide.stride() == base.stride() and torch.equal(wide.isnan(), base.isnan())
        assert torch.equal(wide.nan_to_num(), base.nan_to_num()), "the builds differ"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,kwargs", [("max_pool2d", dict(kernel_size=2)), ("adaptive_avg_pool2d", dict(output_size=64))],
                         ids=["max_pool2d", "adaptive_avg_pool2d"])
def test_pools_large_outputs(cpp, layout, name, kwargs):
    """A δx of 32 MiB (8×64×128×128 float32: always a fresh mmap from glibc, first touched by
    the kernel that writes it) holds torch's values (NCHW path). Both are exact here: the max pool
    routes each δy to one position and its windows do not overlap; the 2×2 adaptive windows tile
    the image and δy / 4 is exact, as is the max's output and index."""
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(8, 64, 128, 128, generator=gen)
    leaf = _in_layout(x, layout).requires_grad_()
    y = getattr(MF, name)(leaf, **kwargs)
    grad_output = _in_layout(torch.randn(y.shape, generator=gen), layout)
    (grad_input,) = torch.autograd.grad(y, leaf, grad_output)
    assert grad_input.nbytes >= 32 << 20
    x_nchw = x.clone().requires_grad_()
    expected = getattr(F, name)(x_nchw, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, x_nchw, grad_output.contiguous())
    assert torch.equal(grad_input, expected_grad)
    if name == "max_pool2d":
        assert torch.equal(y, expected)
        assert torch.equal(MF.max_pool2d(leaf, **kwargs, return_indices=True)[1],
                           F.max_pool2d(x_nchw, **kwargs, return_indices=True)[1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels,kernel,padding", [(8, 3, 1), (16, 5, 2), (32, 3, 1), (64, 3, 0)],
                         ids=["direct-8", "direct-16-5x5", "winograd-32", "winograd-64-p0"])
def test_grad_input_of_a_non_finite_weight_matches_torch(cpp, layout, channels, kernel, padding):
    """A weight holding inf, −inf and NaN: torch's input gradient (col2im) never multiplies δy's
    zero padding, so where only padding meets a bad tap its δx stays finite. The direct and
    Winograd kernels correlate the zero-padded δy (0·inf = NaN there), so select_conv2d_kernel
    gives such a weight the GEMM kernel: NaN and ±inf exactly where torch's float32 δx has them,
    the finite values within the suite's bound."""
    from oracle import sum_error_bound

    gen = torch.Generator().manual_seed(channels + kernel)
    x = _in_layout(torch.randn(2, channels, 9, 9, generator=gen), layout).requires_grad_()
    w = torch.randn(channels, channels, kernel, kernel, generator=gen)
    w.view(-1)[[3, channels * kernel * kernel + 1, 7 * kernel * kernel]] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    y = F.conv2d(x, w, padding=padding)
    dy = _in_layout(torch.randn(y.shape, generator=gen), layout)
    (expected,) = torch.autograd.grad(y, x, dy)
    (got,) = torch.autograd.grad(MF.conv2d(x, w, padding=padding), x, dy)
    assert torch.equal(got.isnan(), expected.isnan()), "NaN where torch has none, or the reverse"
    assert torch.equal(got.isinf(), expected.isinf()) and torch.equal(got[got.isinf()], expected[expected.isinf()])
    finite = expected.isfinite()
    # float32 sums of channels·k² terms, both sides within n·ε·Σ|terms| (oracle.py) of the exact
    # value, so within twice that of each other, over the finite entries
    bound = sum_error_bound(channels * kernel * kernel, torch.float32,
                            torch.nn.grad.conv2d_input(x.shape, w.nan_to_num(0, 0, 0).abs(), dy.abs(), padding=padding))
    assert ((got - expected).abs()[finite] <= 2 * bound[finite]).all()


# δy layouts csrc/conv2d_grad_bias.cpp sums as they are (NCHW planes, channels-last rows) or copies
GRAD_BIAS_LAYOUTS = {
    "nchw": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: t[:, :, ::2],
}


@pytest.mark.parametrize("layout", list(GRAD_BIAS_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 24, 31, 31), (2, 3, 1, 1), (0, 5, 4, 4), (3, 0, 2, 2), (4, 17, 8, 8)])
def test_conv2d_grad_bias_kernel(cpp, layout, dtype, shape):
    """∂J/∂b = Σ δ over (n, i, j) (csrc/conv2d_grad_bias.cpp): opcheck, and the sum within one
    rounding to the dtype (half an ulp: 2⁻²⁴, 2⁻⁵³, 2⁻⁸ relative) plus both float64 sums' error
    (the kernel's and torch's oracle: n·2⁻⁵³·Σ|δ| each) of torch's float64 sum of the same data,
    empty maps and channels included; NaN and ±inf propagated as torch's sum does."""
    torch.manual_seed(0)
    full = torch.randn(shape[0], shape[1], shape[2] * (2 if layout == "strided" else 1), shape[3], dtype=torch.float64)
    delta = GRAD_BIAS_LAYOUTS[layout](full.to(dtype))
    torch.library.opcheck(torch.ops.manualconv.conv2d_grad_bias, (delta,))
    got = torch.ops.manualconv.conv2d_grad_bias(delta)
    exact = delta.double().sum(dim=(0, 2, 3))
    assert got.dtype == dtype and got.shape == (shape[1],)
    half_ulp = {torch.float32: 2**-24, torch.float64: 2**-53, torch.bfloat16: 2**-8}[dtype]
    n = shape[0] * shape[2] * shape[3]
    bound = half_ulp * exact.abs() + 2 * n * 2**-53 * delta.double().abs().sum(dim=(0, 2, 3))
    assert ((got.double() - exact).abs() <= bound).all(), (got, exact)
    if delta.numel() and shape[1] >= 3:
        delta = delta.clone()
        delta[0, 0, 0, 0], delta[-1, 1, -1, -1], delta[0, 2, 0, 0] = float("nan"), float("inf"), float("-inf")
        got = torch.ops.manualconv.conv2d_grad_bias(delta)
        assert got[0].isnan() and got[1] == float("inf") and got[2] == float("-inf")


def test_conv2d_grad_bias_kernel_rejects_bad_input(cpp):
    with pytest.raises(RuntimeError, match="grad_output must be 4-D"):
        torch.ops.manualconv.conv2d_grad_bias(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.manualconv.conv2d_grad_bias(torch.ones(1, 2, 3, 3, dtype=torch.int64))


# csrc/linear.cpp: δx = δW and ∂J/∂W = δᵀx, side by side on two threads where
# linear_backward_side_by_side says so (up to 512 MFLOP a product), else one after the other.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,in_features,out_features", [
    (128, 512, 256),  # side by side on two threads
    (1024, 512, 600),  # 629 MFLOP a product: one after the other
    (3, 5, 4), (1, 7, 1),
    (0, 5, 4),  # no rows: δx empty, ∂J/∂W = 0
    (6, 0, 4),  # no input features: both gradients empty
])
def test_linear_backward_kernel(cpp, threads, dtype, rows, in_features, out_features):
    """Both products against float64 ones, within the bound of a k-term dot product (Higham §3.1:
    γ_k·Σ|terms|, γ_k = k·u/(1 − k·u) ≤ (k + 1)·u here, u the unit roundoff; k = out_features for
    δx, rows for ∂J/∂W): the two schedules run the BLAS on different thread counts, so the
    summation order may differ, the bound holds for any. Also a transposed δ (autograd's δ of a
    transposed output), and opcheck."""
    torch.manual_seed(0)
    delta, x, w = (torch.randn(s, dtype=dtype) for s in ((rows, out_features), (rows, in_features), (out_features, in_features)))
    u = torch.finfo(dtype).eps / 2
    d, xd, wd = delta.double(), x.double(), w.double()
    expected = ((d @ wd, d.abs() @ wd.abs(), out_features), (d.t() @ xd, d.t().abs() @ xd.abs(), rows))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for grad_output in (delta, delta.t().contiguous().t()):
            for got, (exact, magnitude, k) in zip(torch.ops.manualconv.linear_backward(grad_output, x, w), expected):
                assert got.dtype == dtype and got.shape == exact.shape
                assert ((got.double() - exact).abs() <= (k + 1) * u * magnitude).all()
    finally:
        torch.set_num_threads(saved)
    torch.library.opcheck(torch.ops.manualconv.linear_backward, (delta, x, w))
