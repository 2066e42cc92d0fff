"""The CUDA kernels (csrc/cuda/), through manualconv's API on CUDA tensors.

Every sample of every op record (cases.OPS) with a 'cuda' entry in its dtypes is run forward and
backward on the GPU in each of those dtypes (float64, float32, float16, bfloat16) and compared
with the native twin's float64 result on the same (rounded) data, within a rigorous error bound
(oracle.error_bound): n·ε·Σ|terms| for a sum of n terms computed in precision ε, plus, for
float16/bfloat16, c·u·Σ|terms| for the roundings to the format's unit roundoff u on the way.
Max-pool indices must equal torch.nn's on CUDA exactly, and float32/float64 results must agree
with the CPU backend. gradcheck and gradgradcheck run in float64 on the samples each record
names in cuda_gradcheck; the deterministic kernels must give bitwise identical results on
repeated runs.

Build the CUDA kernels first:  MANUALCONV_CUDA=1 python setup.py build_ext --inplace
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF
from cases import OPS, SAMPLES, call, make_inputs, record_of
from oracle import assert_within, error_bound, exact_and_magnitude, output_of, run_with_grads, sum_error_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

CASES = [case for case in SAMPLES if "cuda" in record_of(case).dtypes]
CASES_AND_DTYPES = [pytest.param(case, dtype, id=f"{case}-{dtype}") for case in CASES for dtype in record_of(case).dtypes["cuda"]]


@pytest.fixture(autouse=True)
def ieee_gemms():
    """cuBLAS in full precision: no TF32 for float32, float32 accumulation (no reduced-precision
    split-K reductions) for float16/bfloat16, the precision the error bounds assume."""
    matmul = torch.backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = {name: getattr(matmul, name) for name in names if hasattr(matmul, name)}
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    for name in saved:
        setattr(matmul, name, False)
    yield
    torch.set_float32_matmul_precision(precision)
    for name, value in saved.items():
        setattr(matmul, name, value)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """t on device with t's strides (a non-contiguous view stays a view of a bigger tensor)."""
    if t._base is not None and not t.is_contiguous():
        return t._base.to(device).as_strided(t.shape, t.stride(), t.storage_offset())
    return t.to(device)


def test_cuda_kernels_are_registered():
    assert manualconv.ops.AVAILABLE, f"the C++ extension is not built: {manualconv.ops.LOAD_ERROR}"
    for op in sorted({kernel for record in OPS.values() if "cuda" in record.dtypes for kernel in record.kernels}):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"manualconv::{op}", "CUDA"), (
            f"manualconv::{op} has no CUDA kernel: build with MANUALCONV_CUDA=1")


@pytest.mark.parametrize("case,dtype", CASES_AND_DTYPES)
def test_matches_native(case, dtype, cpp):
    tensors = make_inputs(case, dtype, seed=1)
    output = output_of(call(case, "native", *[t.double() for t in tensors]))
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    ours = run_with_grads(case, "manual", [_to(t, "cuda") for t in tensors], grad_output.cuda())
    assert all(v.is_cuda for v in ours.values()), case
    ours = {k: v.cpu() for k, v in ours.items()}
    exact, magnitude = exact_and_magnitude(case, tensors, grad_output)
    assert ours.keys() == exact.keys(), case
    for what in exact:
        if what == "indices":
            native = call(case, "native", *[_to(t, "cuda") for t in tensors])[1].cpu()
            assert torch.equal(ours["indices"], native), f"{case}: {dtype} max-pool indices differ from torch's"
            continue
        assert ours[what].dtype == dtype, f"{case}: {what} is {ours[what].dtype}"
        assert_within(case, f"{dtype} {what}", ours[what], exact[what], error_bound(case, dtype, magnitude[what]))
    if dtype in (torch.float32, torch.float64):  # the CPU backend: the same results within the bounds
        cpu = run_with_grads(case, "manual", tensors, grad_output)
        for what in exact:
            if what == "indices":
                assert torch.equal(ours[what], cpu[what]), f"{case}: indices differ from the CPU backend's"
            else:
                assert_within(case, f"{dtype} {what} vs CPU", ours[what], cpu[what].double(),
                              2 * error_bound(case, dtype, magnitude[what]))


# One case per kernel family (each record's cuda_gradcheck): finite differences in float64 on the GPU.
GRADCHECK = [case for case in CASES if case.name in record_of(case).cuda_gradcheck]


@pytest.mark.parametrize("case", GRADCHECK, ids=str)
def test_gradcheck_and_gradgradcheck(case, cpp):
    tensors = [_to(t, "cuda").requires_grad_() for t in make_inputs(case, torch.float64)]
    function = lambda *ts: output_of(call(case, "manual", *ts))  # noqa: E731
    # nondet_tol: max pooling's default backward adds with atomicAdd (last-bit differences
    # between runs where one input is the maximum of three or more windows)
    assert torch.autograd.gradcheck(function, tensors, nondet_tol=1e-12), case
    assert torch.autograd.gradgradcheck(function, tensors, nondet_tol=1e-12), case


def _twice(fn):
    first, second = fn(), fn()
    return first, second


def test_conv_and_avg_pool_kernels_are_deterministic(cpp):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 16, 20, 20, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(32, 8, 3, 3, device="cuda", generator=g, requires_grad=True)

    def run():
        y = MF.conv2d(x, w, stride=2, padding=1, groups=2)
        z = MF.avg_pool2d(y, 3, stride=1, padding=1) + MF.adaptive_avg_pool2d(y, 3).mean()
        return (z, *torch.autograd.grad(z, (x, w), torch.ones_like(z)))

    for a, b in zip(*_twice(run)):
        assert torch.equal(a, b)


def test_max_pool_backward_deterministic_mode(cpp):
    """Under torch.use_deterministic_algorithms the scatter of max pooling's backward is sorted:
    bitwise reproducible, and equal to the CPU backend's (which adds in the same order)."""
    x = torch.randn(4, 8, 33, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(device):
        xx = x.to(device).requires_grad_()
        y = MF.max_pool2d(xx, 3, stride=2)  # overlapping windows: positions reached 1 to 4 times
        return torch.autograd.grad(y, xx, grad.to(device))[0]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = _twice(lambda: run("cuda"))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)
    cpu = run("cpu")
    # sums of up to 4 deltas: equal up to the order of the additions
    torch.testing.assert_close(first.cpu(), cpu, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(run("cuda").cpu(), cpu, rtol=1e-14, atol=1e-14)  # default: atomicAdd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_batch_is_chunked(dtype, cpp):
    """Column buffers over 256 MiB are processed in chunks of samples (here 9.4 MB per sample in
    float32: chunks of 28, 28 and 8 samples; float16: 56 and 8): compare with torch.nn in float64
    on the GPU, within oracle.sum_error_bound: n·ε32·Σ|terms| (+ 4u in float16)."""
    N, C, H, W = 64, 64, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, C, H, W, device="cuda", generator=g).to(dtype)
    w = (torch.randn(C, C, 3, 3, device="cuda", generator=g) / 24).to(dtype)
    delta = torch.randn(N, C, H, W, device="cuda", generator=g).to(dtype)
    results = []
    for fn, args, d in ((MF.conv2d, (x, w), delta), (F.conv2d, (x.double(), w.double()), delta.double()),
                        (F.conv2d, (x.double().abs(), w.double().abs()), delta.double().abs())):
        xx, ww = (a.detach().requires_grad_() for a in args)
        y = fn(xx, ww, padding=1)
        results.append((y.detach(), *torch.autograd.grad(y, (xx, ww), d)))
    n = N * H * W  # the longest sum: the weight gradient's
    for what, ours, exact, magnitude in zip(("output", "grad_input", "grad_weight"), *results):
        assert ours.dtype == dtype
        error = (ours.double() - exact).abs()
        assert (error <= sum_error_bound(n, dtype, magnitude)).all(), what


def test_empty_batch_and_empty_output(cpp):
    x = torch.randn(0, 3, 8, 8, device="cuda", requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device="cuda", requires_grad=True)
    y = MF.conv2d(x, w, padding=1)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert y.shape == (0, 4, 8, 8) and gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))
    for pool in (lambda t: MF.max_pool2d(t, 2), lambda t: MF.avg_pool2d(t, 2), lambda t: MF.adaptive_avg_pool2d(t, 3)):
        (gx,) = torch.autograd.grad(pool(x).sum(), x)
        assert gx.shape == x.shape
    z = torch.randn(2, 3, 5, 5, device="cuda", requires_grad=True)
    y = MF.adaptive_avg_pool2d(z, (0, 2))
    (gz,) = torch.autograd.grad(y.sum(), z)
    assert y.shape == (2, 3, 0, 2) and torch.equal(gz, torch.zeros_like(z))


def test_bad_device_combinations(cpp):
    x = torch.randn(1, 2, 6, 6, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        MF.conv2d(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.manualconv.conv2d_forward(x, torch.randn(3, 2, 3, 3, device="cuda"), torch.randn(3),
                                            [1, 1], [0, 0], [1, 1], 1)
    y, indices = torch.ops.manualconv.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.manualconv.max_pool2d_backward(y, indices.cpu(), list(x.shape))
