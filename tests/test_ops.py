"""Every case of every op record (cases.OPS), through each of its backends: gradcheck,
gradgradcheck, float32 equality with the native twin (indices exactly), agreement of the
backends, and bad input."""

from __future__ import annotations

import pytest
import torch

import manualconv
from cases import ERRORS, OPS, SAMPLES, backend_params, call, make_error_inputs, make_inputs, per_backend, record_of
from oracle import assert_within, exact_and_bound, output_of, run_with_grads

# Finite differences need a differentiable point: ties and NaNs (max pool) are not one, so those
# cases are only compared with torch.nn below.
SMOOTH = [case for case in SAMPLES if case.fill == "randn"]


def _function(case):
    return lambda *tensors: output_of(call(case, "manual", *tensors))


@pytest.mark.parametrize("case,backend", per_backend(SMOOTH), indirect=["backend"])
def test_gradcheck(case, backend):
    tensors = [t.requires_grad_(t.is_floating_point()) for t in make_inputs(case, torch.float64)]
    assert torch.autograd.gradcheck(_function(case), tensors), case


@pytest.mark.parametrize("case,backend", per_backend(SMOOTH), indirect=["backend"])
def test_gradgradcheck(case, backend):
    tensors = [t.requires_grad_(t.is_floating_point()) for t in make_inputs(case, torch.float64)]
    assert torch.autograd.gradgradcheck(_function(case), tensors), case


def _float32_run(case, lib):
    tensors = make_inputs(case, torch.float32, seed=1)
    output = output_of(call(case, "native", *tensors))
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    if case.layout == "channels_last" and output.dim() == 4:  # as a channels-last network's δ arrives
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    return tensors, grad_output, run_with_grads(case, lib, tensors, grad_output)


# Ops with a bound ('linear' in each argument, or 'max'-like) get the rigorous bound of
# oracle.py. The others (activations, the loss) are elementwise maps and short reductions whose
# float32 results torch itself only promises to a few ulps: they are compared with
# torch.testing's float32 defaults.
BOUNDED = [case for case in SAMPLES if record_of(case).bound is not None]
NONLINEAR = [case for case in SAMPLES if record_of(case).bound is None]


def _assert_close(case, what, actual, expected):
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{case}: {what}: {m}")


@pytest.mark.parametrize("case,backend", per_backend(BOUNDED), indirect=["backend"])
def test_float32_matches_native(case, backend):
    tensors, grad_output, ours = _float32_run(case, "manual")
    native = run_with_grads(case, "native", tensors, grad_output)
    exact, bound = exact_and_bound(case, tensors, grad_output)
    assert ours.keys() == native.keys(), case
    if "indices" in ours:
        assert ours["indices"].dtype == torch.int64, case
        assert torch.equal(ours["indices"], native["indices"]), f"{case}: max-pool indices differ from torch's"
    for what, exact_value in exact.items():
        if what != "indices":
            assert_within(case, what, ours[what], exact_value, bound[what])
            assert_within(case, f"native {what} (checks the bound)", native[what], exact_value, bound[what])


@pytest.mark.parametrize("case,backend", per_backend(NONLINEAR), indirect=["backend"])
def test_float32_matches_native_nonlinear(case, backend):
    tensors, grad_output, ours = _float32_run(case, "manual")
    native = run_with_grads(case, "native", tensors, grad_output)
    assert ours.keys() == native.keys(), case
    for what, value in native.items():
        _assert_close(case, what, ours[what], value)


@pytest.mark.parametrize("case", [c for c in BOUNDED if {"reference", "cpp"} <= set(record_of(c).backends)], ids=str)
def test_backends_agree(case):
    with manualconv.use_backend("reference"):
        tensors, grad_output, reference = _float32_run(case, "manual")
    with manualconv.use_backend("cpp"):
        cpp = run_with_grads(case, "manual", tensors, grad_output)
    _, bound = exact_and_bound(case, tensors, grad_output)
    for what, value in reference.items():
        if what == "indices":
            assert torch.equal(value, cpp[what]), f"{case}: backends' indices differ"
        else:  # each is within its bound of the exact value, so within twice of each other
            assert_within(case, f"cpp vs reference {what}", cpp[what], value.double(), 2 * bound[what])


@pytest.mark.parametrize("case,backend", per_backend(ERRORS), indirect=["backend"])
def test_bad_input_raises(case, backend):
    tensors = make_error_inputs(case)
    error_type, pattern = case.error
    with pytest.raises(error_type, match=pattern):
        call(case, "manual", *tensors)
    try:  # where torch raises too, it raises the same type
        call(case, "native", *tensors)
    except Exception as native_error:  # noqa: BLE001
        assert type(native_error) is (case.torch_error or error_type), f"{case}: torch raised {native_error!r}"


def test_output_memory_format_and_dtype(backend):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    y = manualconv.functional.conv2d(x, w, padding=1)
    assert y.dtype == torch.float64 and y.shape == (2, 4, 6, 6)


CHANNELS_LAST = [c for c in SAMPLES if c.layout == "channels_last" and record_of(c).channels_last]


def _layout_of(t: torch.Tensor) -> str:
    return "nchw" if t.is_contiguous() else "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


@pytest.mark.parametrize("case", CHANNELS_LAST, ids=str)
def test_channels_last_layout_matches_native(case, cpp):
    """Channels-last conv and max pool keep the layout, as torch.nn's do: output, indices and δx
    come back channels-last (a network stays in one layout, with no copies between layers)."""
    tensors, grad_output, ours = _float32_run(case, "manual")
    native = run_with_grads(case, "native", tensors, grad_output)
    for what in ("output", "indices", "grad_input"):
        if what in native:
            assert _layout_of(ours[what]) == _layout_of(native[what]) == "channels_last", \
                f"{case}: {what} is {_layout_of(ours[what])}, torch's is {_layout_of(native[what])}"
BLAS_FALLBACK_SCRIPT = """
import torch, torch.nn.functional as F, manualconv.functional as MF
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
worst, addmm = 0.0, 0
for layout in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(5, 4, 7, 6, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    results = []
    for f in (F.conv2d, MF.conv2d):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = f(x, w, None, 1, 1, 1, 2)
            grads = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        results.append((y,) + grads)
        if f is MF.conv2d:
            addmm += sum(e.count for e in prof.key_averages() if e.key == "aten::addmm_")
    worst = max(worst, max((a - b).abs().max().item() for a, b in zip(*results)))
print(worst, addmm)
"""


def test_conv_blas_fallback_matches_native(cpp):
    """The conv kernels call the BLAS directly where torch exports it, else at::addmm_
    (csrc/blas.cpp). MANUALCONV_BLAS=aten forces the fallback: it must run (the profiler sees
    its addmm_ calls) and agree with torch.nn to float64 rounding."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MANUALCONV_BLAS="aten")
    out = subprocess.run([sys.executable, "-c", BLAS_FALLBACK_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    worst, addmm = float(out[-2]), int(out[-1])
    assert addmm > 0, "MANUALCONV_BLAS=aten did not route the conv GEMMs through at::addmm_"
    assert worst < 1e-12, f"fallback GEMM path differs from torch.nn by {worst}"


KERNEL_ERRORS = [p for record in OPS.values() for error in record.kernel_errors
                 for p in backend_params(record, (error,), error.name)]


@pytest.mark.parametrize("error,backend", KERNEL_ERRORS, indirect=["backend"])
def test_kernel_rejects_bad_backward_input(error, backend):
    with pytest.raises(RuntimeError, match=error.pattern):
        getattr(manualconv.backend.kernels(backend), error.kernel)(*error.args())
