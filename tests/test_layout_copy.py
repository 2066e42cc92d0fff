"""The kernels' copies between the NCHW and channels-last layouts (csrc/layout_copy.cpp, reached
through torch.ops.manualconv.layout_copy): equal, bit for bit, to torch's Tensor.contiguous in the
requested layout, with torch's strides, for every shape (channels and pixel counts that do and do
not fill the 8 × 8 blocks, empty batches, one pixel, one channel), NaN payloads included, in both
directions; 4-byte dtypes take the transposes, others and non-dense inputs torch's copy. The
transposes run on every instruction set this CPU supports (a subprocess per capability)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from manualconv import ops
from test_cpu_capability import CAPABILITIES, SUPPORTED, VARIABLE

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = [(3, 5, 7, 9), (2, 8, 8, 8), (1, 17, 33, 2), (2, 24, 16, 16), (3, 9, 1, 1), (2, 1, 6, 5),
          (0, 4, 3, 3), (2, 64, 9, 7), (130, 16, 4, 4)]


def _layout(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def _source(shape, dtype, channels_last: bool) -> torch.Tensor:
    """A tensor of every bit pattern class: for float32, NaNs with distinct payloads, ±inf, -0.0."""
    bits = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    t = bits.to(torch.int32)
    if dtype == torch.float32:
        t = t.view(torch.float32)  # random bits: NaNs with payloads, infs and denormals among them
    elif dtype != torch.int32:
        t = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return t.contiguous(memory_format=_layout(channels_last))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("to_channels_last", (True, False), ids=("to-channels-last", "to-nchw"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.int32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layout_copy_matches_torch(shape, dtype, to_channels_last):
    src = _source(shape, dtype, channels_last=not to_channels_last)
    out = torch.ops.manualconv.layout_copy(src, to_channels_last)
    expected = src.contiguous(memory_format=_layout(to_channels_last))
    assert out.shape == expected.shape
    # (a dim of size 1, or any dim of an empty tensor, may take any stride: torch keeps the
    # source's where both layouts hold)
    assert src.numel() == 0 or [st for st, n in zip(out.stride(), shape) if n > 1] == [st for st, n in zip(expected.stride(), shape) if n > 1]
    assert out.data_ptr() != src.data_ptr() or src.numel() == 0
    assert torch.equal(_bits(out), _bits(expected))


def test_non_dense_input_is_copied_by_value():
    base = _source((4, 12, 10, 10), torch.float32, channels_last=False)
    src = base[:, 1::2, :, 2:9]  # neither layout: torch's copy
    out = torch.ops.manualconv.layout_copy(src, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_bits(out), _bits(src.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("channels_last", (True, False))
def test_gradcheck(channels_last):
    """A copy's gradient is the incoming δ: gradcheck and gradgradcheck in float64."""
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last).requires_grad_()
    op = lambda t: torch.ops.manualconv.layout_copy(t, channels_last)  # noqa: E731
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))


def test_channels_last_needs_4_dims():
    with pytest.raises(RuntimeError, match="layout_copy: channels_last needs a 4-d input, got 3 dimensions"):
        torch.ops.manualconv.layout_copy(torch.zeros(2, 3, 4), True)


def test_fake_kernel_matches():
    torch.library.opcheck(torch.ops.manualconv.layout_copy, (torch.randn(2, 8, 3, 5), True))
    torch.library.opcheck(torch.ops.manualconv.layout_copy,
                          (torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last), False))


@pytest.mark.parametrize("capability", [c for c in CAPABILITIES if c in SUPPORTED])
def test_each_capability(capability):
    """The float32 cases again, in a process whose kernels use `capability` (the AVX transposes,
    or element by element under default)."""
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "float32",
                          f"{HERE}/test_layout_copy.py::test_layout_copy_matches_torch"],
                         cwd=ROOT, env={**os.environ, VARIABLE: capability}, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert f"{2 * len(SHAPES)} passed" in output, output
