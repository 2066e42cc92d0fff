"""The ``reference`` backend: the derivation written literally in plain tensor code.

Readable and slow, with no compiled code. Every function takes and returns batched NCHW tensors
and has the same signature as the C++ operator of the same name (``torch.ops.manualconv.*``).
Notation (docs/derivation.md): x input, W kernel, b bias, y = x ⋆ W + b the output, δ = ∂J/∂y
the delta arriving from the layer above, s stride, p padding, d dilation, k kernel size.

Only general tensor algebra is used here: pad, strided slicing, einsum (a matmul), flip,
scatter/gather, reductions and elementwise arithmetic.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import math

import torch
import torch.nn.functional as F

from .checks import (
    adaptive_windows,
    check_adaptive_pool2d,
    check_avg_pool2d,
    check_conv2d,
    check_grad_output,
    check_linear_backward,
    check_max_pool2d_indices,
    check_pool2d,
)
from .precision import in_float32  # bfloat16/float16: computed in float32, rounded once


def _window(offset: int, count: int, step: int) -> slice:
    """Rows offset, offset+step, …, offset+(count−1)·step: where one kernel tap lands."""
    return slice(offset, offset + (count - 1) * step + 1, step)


def correlate2d(x: torch.Tensor, weight: torch.Tensor, stride, dilation, groups: int) -> torch.Tensor:
    # y[n,o,i,j] = Σ_{c,a,b} W[o,c,a,b] · x[n,c,i·s+a·d, j·s+b·d]   (cross-correlation, no padding)
    n, c, h, w = x.shape
    out_channels, c_per_group, kh, kw = weight.shape
    h_out = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x_g = x.reshape(n, groups, c_per_group, h, w)
    w_g = weight.reshape(groups, out_channels // groups, c_per_group, kh, kw)
    y = x.new_zeros(n, out_channels, h_out, w_out)  # (a tensor of its own: an op's output is never a view)
    for a in range(kh):
        for b in range(kw):
            tap = x_g[:, :, :, _window(a * dilation[0], h_out, stride[0]), _window(b * dilation[1], w_out, stride[1])]
            y = y + torch.einsum("ngchw,goc->ngohw", tap, w_g[:, :, :, a, b]).reshape(y.shape)
    return y


def zero_pad(x: torch.Tensor, padding, value: float = 0.0) -> torch.Tensor:
    """Surround each plane with p rows/columns of ``value`` (a negative p crops)."""
    return F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=value)


@in_float32
def conv2d_forward(input, weight, bias, stride, padding, dilation, groups):
    # y = pad(x, p) ⋆ W + b
    check_conv2d(input.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation, groups)
    y = correlate2d(zero_pad(input, padding), weight, stride, dilation, groups)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


def dilate_with_zeros(delta: torch.Tensor, stride) -> torch.Tensor:
    # stride s as zero insertion: s−1 zeros between neighbouring entries of δ
    if tuple(stride) == (1, 1):
        return delta
    n, c, h, w = delta.shape
    out = delta.new_zeros(n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1)
    out[:, :, :: stride[0], :: stride[1]] = delta
    return out


def rotate180_transposed(weight: torch.Tensor, groups: int) -> torch.Tensor:
    # rot180(W) with input and output channels swapped within each group: (C, O/g, kH, kW)
    out_channels, c_per_group, kh, kw = weight.shape
    w_g = weight.reshape(groups, out_channels // groups, c_per_group, kh, kw)
    return w_g.transpose(1, 2).reshape(groups * c_per_group, out_channels // groups, kh, kw).flip(2, 3)


@in_float32
def conv2d_grad_input(grad_output, weight, input_size, stride, padding, dilation, groups):
    # δx = "full" correlation of the stride-dilated δ with the 180°-rotated kernel
    out_size = check_conv2d(input_size, weight.shape, None, stride, padding, dilation, groups)
    check_grad_output("conv2d_grad_input", grad_output.shape, out_size)
    kernel = weight.shape[2:]
    delta = dilate_with_zeros(grad_output, stride)
    # "full" padding d·(k−1) − p on each side; the bottom/right also get back the r rows the
    # forward's floor division skipped, so the result has exactly the input's size.
    before, after = [], []
    for dim in range(2):
        full = dilation[dim] * (kernel[dim] - 1) - padding[dim]
        skipped = input_size[2 + dim] - (delta.shape[2 + dim] + dilation[dim] * (kernel[dim] - 1) - 2 * padding[dim])
        before.append(full)
        after.append(full + skipped)
    delta = F.pad(delta, (before[1], after[1], before[0], after[0]))  # negative amounts crop
    return correlate2d(delta, rotate180_transposed(weight, groups), (1, 1), dilation, groups)


@in_float32
def conv2d_grad_weight(input, grad_output, weight_size, stride, padding, dilation, groups):
    # ∂J/∂W[o,c,a,b] = Σ_{n,i,j} δ[n,o,i,j] · pad(x)[n,c,i·s+a·d, j·s+b·d]  (x correlated with δ)
    out_size = check_conv2d(input.shape, weight_size, None, stride, padding, dilation, groups)
    check_grad_output("conv2d_grad_weight", grad_output.shape, out_size)
    n, _, h_out, w_out = grad_output.shape
    out_channels, c_per_group, kh, kw = weight_size
    x = zero_pad(input, padding)
    x_g = x.reshape(n, groups, c_per_group, x.shape[2], x.shape[3])
    d_g = grad_output.reshape(n, groups, out_channels // groups, h_out, w_out)
    taps = []
    for a in range(kh):
        for b in range(kw):
            tap = x_g[:, :, :, _window(a * dilation[0], h_out, stride[0]), _window(b * dilation[1], w_out, stride[1])]
            taps.append(torch.einsum("ngchw,ngohw->goc", tap, d_g))
    return torch.stack(taps, dim=-1).reshape(out_channels, c_per_group, kh, kw)


def conv2d_grad_bias(grad_output: torch.Tensor) -> torch.Tensor:
    # ∂J/∂b[o] = Σ_{n,i,j} δ[n,o,i,j]
    return grad_output.sum(dim=(0, 2, 3))


def dropout_masked_scale(values, mask, scale: float):
    # values ⊙ m, m = scale where the bool mask holds, else 0 (a product: inf·0 = NaN, as torch's x·0);
    # scale is already a value of values' dtype, so m's entries are exact
    return values * mask.to(values.dtype).mul_(scale)


def linear_backward(grad_output, input, weight):
    # δx = δ W, ∂J/∂W = δᵀ x  (z = x Wᵀ + b, rows of x are samples; derivation.md §11)
    check_linear_backward(grad_output.shape, input.shape, weight.shape)
    return grad_output.mm(weight), grad_output.t().mm(input)


def _pool_taps(size: int, out: int, kernel: int, stride: int, pad: int, dilation: int):
    """For each kernel tap a: positions a·d + i·s − p (i < out) in input coordinates, clamped
    into the input, and which of them are really inside it (the rest read padding)."""
    i = torch.arange(out)
    for a in range(kernel):
        pos = a * dilation + i * stride - pad
        yield pos.clamp(0, size - 1), (pos >= 0) & (pos < size)


def _first_inside(out: int, stride: int, pad: int, dilation: int) -> torch.Tensor:
    """Each window's first tap at or past 0 (i·s − p moved on by whole dilations): torch's index of
    a window lying entirely in the padding (its max stays −∞)."""
    start = torch.arange(out) * stride - pad
    return torch.where(start >= 0, start, start + (-start + dilation - 1) // dilation * dilation)


def _window_max(input, out_size, row_taps, col_taps, default_index=None):
    """y = max of each window over its taps (lists of (positions, inside) per dim); the argmax as
    a flat index h·W + w. Ties keep the first maximum in row-major order; a NaN wins over
    numbers (torch's rule: take v when v > best or v is NaN)."""
    n, c, h, w = input.shape
    x = input.reshape(n, c, h * w)
    best = input.new_full((n, c) + tuple(out_size), float("-inf"))
    best_index = torch.zeros((n, c) + tuple(out_size), dtype=torch.long, device=input.device)
    if default_index is not None:  # what a window with no tap inside the image reports
        best_index = best_index + default_index.to(input.device)
    seen = torch.zeros(tuple(out_size), dtype=torch.bool, device=input.device)
    for rows, row_ok in row_taps:
        for cols, col_ok in col_taps:
            inside = (row_ok[:, None] & col_ok[None, :]).to(input.device)
            index = (rows[:, None] * w + cols[None, :]).to(input.device)
            value = x[:, :, index]
            take = inside & (~seen | (value > best) | value.isnan())
            best = torch.where(take, value, best)
            best_index = torch.where(take, index, best_index)
            seen = seen | inside
    return best, best_index


@in_float32
def max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    # y[i,j] = max over the window of x; argmax recorded as a flat index h·W + w into the plane
    n, c, h_out, w_out = check_pool2d("max_pool2d", input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    h, w = input.shape[2:]
    rows = list(_pool_taps(h, h_out, kernel_size[0], stride[0], padding[0], dilation[0]))
    cols = list(_pool_taps(w, w_out, kernel_size[1], stride[1], padding[1], dilation[1]))
    first = _first_inside(h_out, stride[0], padding[0], dilation[0])[:, None] * w \
        + _first_inside(w_out, stride[1], padding[1], dilation[1])[None, :]
    return _window_max(input, (h_out, w_out), rows, cols, first)


@in_float32
def max_pool2d_backward(grad_output, indices, input_size):
    # δx[argmax] += δy: each delta is routed to the position that won the max in forward
    check_max_pool2d_indices(grad_output, indices, input_size)
    n, c, h, w = input_size
    grad_input = grad_output.new_zeros(n, c, h * w)
    grad_input = grad_input.scatter_add(2, indices.flatten(2), grad_output.flatten(2))  # flatten: also for empty batches
    return grad_input.reshape(n, c, h, w)


def max_pool2d_gather(grad_input, indices):
    # δy[i,j] = δx[argmax(i,j)]: the adjoint of max_pool2d_backward (used for double backward)
    flat = grad_input.flatten(2).gather(2, indices.flatten(2))
    return flat.reshape(indices.shape)


def avg_pool2d_divisors(input_size, out_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, device, dtype):
    # divisor of window (i,j): divisor_override, else the window's area inside the padded input
    # (count_include_pad) or inside the input alone
    if divisor_override is not None:
        return torch.full(out_size, float(divisor_override), dtype=dtype, device=device)
    sides: List[torch.Tensor] = []
    for size, out, k, s, p in zip(input_size, out_size, kernel_size, stride, padding):
        start = torch.arange(out) * s - p
        end = torch.clamp(start + k, max=size + p)
        if count_include_pad:
            sides.append(end - start)
        else:
            sides.append(torch.clamp(end, max=size) - torch.clamp(start, min=0))
    area = sides[0][:, None] * sides[1][None, :]
    return area.clamp(min=1).to(device=device, dtype=dtype)


def _avg_pool_padding(input_size, out_size, kernel_size, stride, padding):
    """Zero padding (top, bottom, left, right) that holds every window, ceil_mode's last one too."""
    extra = [max(p, (o - 1) * s + k - n - p) for n, o, k, s, p in zip(input_size, out_size, kernel_size, stride, padding)]
    return (padding[1], extra[1], padding[0], extra[0])


@in_float32
def avg_pool2d_forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    # y[i,j] = (Σ_window x) / divisor(i,j)
    n, c, h_out, w_out = check_avg_pool2d(input.shape, kernel_size, stride, padding, ceil_mode, divisor_override)
    pads = _avg_pool_padding(input.shape[2:], (h_out, w_out), kernel_size, stride, padding)
    x = F.pad(input, pads)
    total = input.new_zeros(n, c, h_out, w_out)
    for a in range(kernel_size[0]):
        for b in range(kernel_size[1]):
            total = total + x[:, :, _window(a, h_out, stride[0]), _window(b, w_out, stride[1])]
    divisor = avg_pool2d_divisors(input.shape[2:], (h_out, w_out), kernel_size, stride, padding, ceil_mode,
                                  count_include_pad, divisor_override, input.device, input.dtype)
    return total / divisor


@in_float32
def avg_pool2d_backward(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    # δx[h,w] = Σ_{windows (i,j) ∋ (h,w)} δy[i,j] / divisor(i,j): each delta spread evenly over its window
    out_size = check_avg_pool2d(input_size, kernel_size, stride, padding, ceil_mode, divisor_override)
    check_grad_output("avg_pool2d_backward", grad_output.shape, out_size)
    n, c, h, w = input_size
    h_out, w_out = out_size[2:]
    divisor = avg_pool2d_divisors((h, w), (h_out, w_out), kernel_size, stride, padding, ceil_mode,
                                  count_include_pad, divisor_override, grad_output.device, grad_output.dtype)
    share = grad_output / divisor
    left, right, top, bottom = _avg_pool_padding((h, w), (h_out, w_out), kernel_size, stride, padding)
    grad = grad_output.new_zeros(n, c, top + h + bottom, left + w + right)
    for a in range(kernel_size[0]):
        for b in range(kernel_size[1]):
            grad[:, :, _window(a, h_out, stride[0]), _window(b, w_out, stride[1])] += share
    return grad[:, :, top : top + h, left : left + w]


def _adaptive_taps(size: int, out: int):
    """For each tap a: rows start(i)+a of every window i, and which are still inside window i."""
    windows = adaptive_windows(size, out)
    if not windows:
        return
    start = torch.tensor([s for s, _ in windows])
    end = torch.tensor([e for _, e in windows])
    for a in range(max(e - s for s, e in windows)):  # python ints: no data-dependent value when traced
        pos = start + a
        yield pos.clamp(max=size - 1), pos < end


@in_float32
def adaptive_max_pool2d_forward(input, output_size):
    # y[i,j] = max over window [⌊iH/H_out⌋, ⌈(i+1)H/H_out⌉) × (same for columns); argmax as in max_pool2d
    n, c, h_out, w_out = check_adaptive_pool2d("adaptive_max_pool2d", input.shape, output_size)
    h, w = input.shape[2:]
    return _window_max(input, (h_out, w_out), list(_adaptive_taps(h, h_out)), list(_adaptive_taps(w, w_out)))


@in_float32
def adaptive_avg_pool2d_forward(input, output_size):
    # y[i,j] = (Σ_window x) / area(window)
    n, c, h_out, w_out = check_adaptive_pool2d("adaptive_avg_pool2d", input.shape, output_size)
    h, w = input.shape[2:]
    x = input.reshape(n, c, h * w)
    total = input.new_zeros(n, c, h_out, w_out)
    for rows, row_ok in _adaptive_taps(h, h_out):
        for cols, col_ok in _adaptive_taps(w, w_out):
            inside = (row_ok[:, None] & col_ok[None, :]).to(input.device)
            index = (rows[:, None] * w + cols[None, :]).to(input.device)
            total = total + torch.where(inside, x[:, :, index], 0)
    return total / adaptive_areas((h, w), (h_out, w_out), input)


def adaptive_areas(input_hw, output_hw, like: torch.Tensor) -> torch.Tensor:
    """area(i, j) of each adaptive window, shape (H_out, W_out)."""
    sides = [torch.tensor([e - s for s, e in adaptive_windows(size, out)]) for size, out in zip(input_hw, output_hw)]
    return (sides[0][:, None] * sides[1][None, :]).to(device=like.device, dtype=like.dtype)


@in_float32
def adaptive_avg_pool2d_backward(grad_output, input_size):
    # δx[h,w] = Σ_{windows (i,j) ∋ (h,w)} δy[i,j] / area(i,j)
    n, c, h, w = input_size
    out_size = check_adaptive_pool2d("adaptive_avg_pool2d", input_size, grad_output.shape[2:])
    check_grad_output("adaptive_avg_pool2d_backward", grad_output.shape, out_size)
    h_out, w_out = out_size[2:]
    share = (grad_output / adaptive_areas((h, w), (h_out, w_out), grad_output)).flatten(2)  # also for 0 channels
    grad = grad_output.new_zeros(n, c, h * w)
    for rows, row_ok in _adaptive_taps(h, h_out):
        for cols, col_ok in _adaptive_taps(w, w_out):
            inside = (row_ok[:, None] & col_ok[None, :]).to(grad_output.device).reshape(-1)
            index = (rows[:, None] * w + cols[None, :]).to(grad_output.device).reshape(-1)
            grad = grad.index_add(2, index, torch.where(inside, share, 0))
    return grad.reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------
# Normalisation: batch norm, layer norm (group norm reuses layer norm's kernels)
#
# Every norm normalises x over a set of entries that share statistics, then scales and shifts:
#   μ = Σx / N,  var = Σ(x − μ)² / N (biased),  σ⁻¹ = 1/√(var + ε),  x̂ = (x − μ)·σ⁻¹,  y = γ·x̂ + β.
# Batch norm: one set per channel c, the N = n·H·W entries x[:, c, :, :] (input (n, C, H, W), NCHW
# or channels-last). Layer norm: one set per row of an (M, D) matrix. The backward of a set:
#   δx = γ·σ⁻¹/N · (N·δy − Σδy − x̂·Σ(δy·x̂)),  ∂J/∂γ = Σ δy·x̂,  ∂J/∂β = Σ δy.
# In eval mode batch norm uses the running statistics: an affine map, δx = γ·σ⁻¹·δy.

_CHANNEL_DIMS = (0, 2, 3)  # batch norm's reduction: every entry of a channel


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """A (C,) vector broadcast over (n, C, H, W)."""
    return v.reshape(1, -1, 1, 1)


def batch_norm_statistics(input):
    # μ_c = Σ x[:, c] / N,  var_c = Σ (x[:, c] − μ_c)² / N   (N = n·H·W; biased variance)
    count = input.shape[0] * input.shape[2] * input.shape[3]
    mean = input.sum(dim=_CHANNEL_DIMS) / count
    var = ((input - _per_channel(mean)) ** 2).sum(dim=_CHANNEL_DIMS) / count
    return mean, var


def normalized(input, mean, invstd, dims):
    # x̂ = (x − μ)·σ⁻¹, the statistics broadcast along ``dims`` ((1, C, 1, 1) or (M, 1))
    return (input - mean.reshape(dims)) * invstd.reshape(dims)


def batch_norm_apply(input, mean, invstd, weight, bias):
    # y = γ·(x − μ)·σ⁻¹ + β per channel (γ = 1, β = 0 when absent)
    y = normalized(input, mean, invstd, (1, -1, 1, 1))
    if weight is not None:
        y = y * _per_channel(weight)
    if bias is not None:
        y = y + _per_channel(bias)
    return y


def normalization_grad_input(grad_output, x_hat, scale, count, dims, reduce_dims):
    # δx = scale/N · (N·δy − Σδy − x̂·Σ(δy·x̂)), scale = γ·σ⁻¹ (the sums over each set of entries)
    sum_dy = grad_output.sum(dim=reduce_dims, keepdim=True)
    sum_dy_xhat = (grad_output * x_hat).sum(dim=reduce_dims, keepdim=True)
    return scale.reshape(dims) / count * (count * grad_output - sum_dy - x_hat * sum_dy_xhat)


def batch_norm_backward(grad_output, input, mean, invstd, weight, training):
    # training: δx = γ·σ⁻¹/N·(N·δy − Σδy − x̂·Σ(δy·x̂)); eval (μ, σ fixed): δx = γ·σ⁻¹·δy;
    # both: ∂J/∂γ = Σ δy·x̂, ∂J/∂β = Σ δy (per channel)
    x_hat = normalized(input, mean, invstd, (1, -1, 1, 1))
    scale = invstd if weight is None else weight * invstd
    if training:
        count = input.shape[0] * input.shape[2] * input.shape[3]
        grad_input = normalization_grad_input(grad_output, x_hat, scale, count, (1, -1, 1, 1), _CHANNEL_DIMS)
    else:
        grad_input = grad_output * _per_channel(scale)
    return grad_input, (grad_output * x_hat).sum(dim=_CHANNEL_DIMS), grad_output.sum(dim=_CHANNEL_DIMS)


def layer_norm_forward(input, weight, bias, eps: float):
    # rows of an (M, D) matrix: μ_m, var_m over the row, x̂ = (x − μ)·σ⁻¹, y = γ ⊙ x̂ + β
    d = input.shape[1]
    mean = input.sum(dim=1) / d
    var = ((input - mean[:, None]) ** 2).sum(dim=1) / d
    invstd = (var + eps).rsqrt()
    y = normalized(input, mean, invstd, (-1, 1))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, invstd


def layer_norm_backward(grad_output, input, mean, invstd, weight):
    # per row: δx = σ⁻¹/D·(D·g − Σg − x̂·Σ(g·x̂)) with g = γ ⊙ δy; ∂J/∂γ = Σ_rows δy ⊙ x̂, ∂J/∂β = Σ_rows δy
    # (without γ there is no affine map, hence no β either: ∂J/∂γ, ∂J/∂β are returned empty)
    x_hat = normalized(input, mean, invstd, (-1, 1))
    g = grad_output if weight is None else grad_output * weight
    grad_input = normalization_grad_input(g, x_hat, invstd, input.shape[1], (-1, 1), (1,))
    if weight is None:
        return grad_input, grad_output.new_empty(0), grad_output.new_empty(0)
    return grad_input, (grad_output * x_hat).sum(dim=0), grad_output.sum(dim=0)


# ---------------------------------------------------------------------------------------------
# ReLU's backward (the cpp kernel: csrc/relu.cpp)


def relu_backward(grad_output, output):
    # δz = δy where y > 0 (or y is NaN, as torch), else 0: f′ = 0 on y ≤ 0 selects 0
    return torch.where(output <= 0, 0, grad_output)


def hardtanh_backward_mask(output, min_val, max_val):
    # where hardtanh's f′ = 1, read from y = clamp(x, min_val, max_val): min_val < y < max_val (NaN: no)
    return (output > min_val) & (output < max_val)


def select_backward(grad_output, support):
    # δx = δy where the support holds, else 0 (a selection: never δy·0)
    return torch.where(support, grad_output, torch.zeros((), dtype=grad_output.dtype, device=grad_output.device))


# ---------------------------------------------------------------------------------------------
# GELU (docs/derivation.md, "Activations"); the cpp kernels: csrc/gelu.cpp

SQRT1_2 = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_KAPPA = 0.044715


def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2))."""
    return 0.5 * (1 + torch.erf(x * SQRT1_2))


def normal_pdf(x):
    """φ(x) = e^(−x²/2) / √(2π)."""
    return torch.exp(-0.5 * x * x) * INV_SQRT_2PI


def gelu_tanh_inner(x):
    """u(x) = √(2/π)·(x + κx³), κ = 0.044715."""
    return SQRT_2_OVER_PI * (x + GELU_TANH_KAPPA * x * x * x)


def gelu_forward(input, approximate: str):
    # GELU(x) = x·Φ(x); 'tanh': ½x(1 + tanh u(x))
    if approximate == "tanh":
        return 0.5 * input * (1 + torch.tanh(gelu_tanh_inner(input)))
    return input * normal_cdf(input)


def gelu_derivative(x, approximate: str):
    """GELU′(x) = Φ(x) + x·φ(x); 'tanh': ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3κx²), t = tanh u(x)."""
    if approximate == "tanh":
        t = torch.tanh(gelu_tanh_inner(x))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_KAPPA * x * x)
    return normal_cdf(x) + x * normal_pdf(x)


def gelu_backward(grad_output, input, approximate: str):
    # δx = δy ⊙ GELU′(x)
    return grad_output * gelu_derivative(input, approximate)


# ---------------------------------------------------------------------------------------------
# The other pointwise activations (docs/derivation.md, "Activations"); the cpp kernels:
# csrc/activations.cpp. Each ``*_grad(x, δ, *params)`` is δ ⊙ f′(x), differentiable tensor code
# (autograd.py differentiates it again for double backward).

# torch's hardsigmoid backward multiplies by 1/6 rounded to float32, also for float64 tensors
# (0.1666666716337204); manualconv uses the same constant, so float64 gradients equal torch's
HARDSIGMOID_SLOPE = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


def silu(x):
    """SiLU(x) = x·σ(x) (σ by torch.sigmoid, as SigmoidFunction)."""
    return x * torch.sigmoid(x)


def silu_grad(x, delta):
    """δ·σ(x)(1 + x(1 − σ(x)))."""
    s = torch.sigmoid(x)
    return delta * (s * (1 + x * (1 - s)))


def hardtanh(x, min_val, max_val):
    """clamp(x, min_val, max_val); ReLU6 is min_val = 0, max_val = 6."""
    return x.clamp(min_val, max_val)


def hardtanh_grad(x, delta, min_val, max_val):
    """δ where min_val < x < max_val, else 0 (0 at both breakpoints and at NaN, as torch)."""
    return torch.where((x > min_val) & (x < max_val), delta, torch.zeros_like(delta))


def hardswish(x):
    """x·min(max(x + 3, 0), 6)/6."""
    return x * (x + 3).clamp(0, 6) / 6


def hardswish_grad(x, delta):
    """0 for x ≤ −3, δ·(x/3 + ½) for −3 < x < 3, δ for x ≥ 3: torch's breakpoints; a NaN x takes
    the middle branch (NaN), as torch's vectorised kernel does."""
    upper = torch.where(x >= 3, delta, delta * (x / 3 + 0.5))
    return torch.where(x <= -3, torch.zeros_like(delta), upper)


def hardsigmoid(x):
    """min(max(x + 3, 0), 6)/6."""
    return (x + 3).clamp(0, 6) / 6


def hardsigmoid_grad(x, delta):
    """δ/6 for −3 < x < 3, else 0 (0 at ±3 and at NaN, as torch)."""
    return torch.where((x > -3) & (x < 3), delta * HARDSIGMOID_SLOPE, torch.zeros_like(delta))


def leaky_relu(x, negative_slope):
    """x for x > 0, a·x otherwise."""
    return torch.where(x > 0, x, x * negative_slope)


def leaky_relu_grad(x, delta, negative_slope):
    """δ for x > 0, a·δ otherwise (x = 0 and NaN take the slope, as torch)."""
    return torch.where(x > 0, delta, delta * negative_slope)


def elu(x, alpha):
    """α(eˣ − 1) for x ≤ 0, x otherwise."""
    return torch.where(x <= 0, alpha * torch.expm1(x), x)


def elu_grad(x, delta, alpha):
    """δ for x > 0, δ·αeˣ otherwise (a NaN x gives NaN, as torch's vectorised kernel)."""
    return torch.where(x > 0, delta, delta * (alpha * torch.exp(x)))


# kind → (f(x, *params), grad(x, δ, *params)): the kinds of csrc/activations.cpp
ACTIVATIONS = {
    "silu": (silu, silu_grad),
    "hardtanh": (hardtanh, hardtanh_grad),
    "hardswish": (hardswish, hardswish_grad),
    "hardsigmoid": (hardsigmoid, hardsigmoid_grad),
    "leaky_relu": (leaky_relu, leaky_relu_grad),
    "elu": (elu, elu_grad),
}


def activation_forward(input, kind: str, params):
    # y = f(x)
    return ACTIVATIONS[kind][0](input, *params)


def activation_backward(grad_output, input, kind: str, params):
    # δx = δy ⊙ f′(x)
    return ACTIVATIONS[kind][1](input, grad_output, *params)


# The squashing functions' derivatives written in their output y (the forward is torch.sigmoid /
# torch.tanh); the cpp kernels: csrc/activations.cpp's activation_backward_from_output.


def sigmoid_grad_from_output(y, delta):
    """δ·(1 − y)·y: σ′ = σ(1 − σ)."""
    return delta * (1 - y) * y


def tanh_grad_from_output(y, delta, amplitude, slope):
    """δ·S·(A − y²/A) for y = A·tanh(S·x): (A·tanh(S·x))′ = A·S·(1 − tanh²(S·x))."""
    return delta * (slope * (amplitude - y * y / amplitude))


# kind → grad(y, δ, *params): the kinds of activation_backward_from_output
SQUASHING = {"sigmoid": sigmoid_grad_from_output, "tanh": tanh_grad_from_output}


def activation_backward_from_output(grad_output, output, kind: str, params):
    # δx = δy ⊙ f′(x), f′ written in y = f(x)
    return SQUASHING[kind](output, grad_output, *params)


# ---------------------------------------------------------------------------------------------
# softmax and log-softmax along a dim (docs/derivation.md, section 17); the cpp kernels:
# csrc/softmax.cpp. Outputs contiguous, as torch's.


def softmax_forward(input, dim: int, log: bool):
    # softmax y = e^(x − m)/Σ e^(x − m), log-softmax y = (x − m) − log Σ e^(x − m), m = max x along dim
    # (a row of −inf only: m = −inf, x − m = NaN, as torch)
    if input.dim() > 0 and input.shape[dim] == 0:
        return input.contiguous().clone()
    shifted = input - input.amax(dim, keepdim=True)
    if log:
        return (shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))).contiguous()
    e = torch.exp(shifted)
    return (e / e.sum(dim, keepdim=True)).contiguous()


def softmax_backward(grad_output, output, dim: int, log: bool):
    # softmax: δx = y ⊙ (δy − Σ δy ⊙ y); log-softmax: δx = δy − e^y · Σ δy (differentiable tensor code)
    if log:
        return grad_output - torch.exp(output) * grad_output.sum(dim, keepdim=True)
    return output * (grad_output - (grad_output * output).sum(dim, keepdim=True))
