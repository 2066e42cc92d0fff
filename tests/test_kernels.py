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
