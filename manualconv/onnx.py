"""ONNX export: manualconv's operators translated to standard ONNX operators.

    import manualconv.onnx
    program = torch.onnx.export(model, (x,), dynamo=True,
                                custom_translation_table=manualconv.onnx.translation_table())
    program.save("model.onnx")
    # or, the same call:  manualconv.onnx.export(model, (x,), "model.onnx")

With the 'cpp' backend an exported graph holds ``torch.ops.manualconv.*`` operators; the table
maps each forward operator to the ONNX operator (default domain, no custom ops) that computes
the same function: conv2d → Conv, conv2d's input gradient (conv_transpose2d's forward) →
ConvTranspose, max_pool2d → MaxPool with indices (made per-plane, as torch's), avg_pool2d →
AveragePool, adaptive pools → GlobalAveragePool / AveragePool / MaxPool where the windows are
uniform, else one ReduceMean/ReduceMax (and ArgMax) per window; the norms' statistics and
normalisation → ReduceMean, Sub, Mul, Sqrt, Reciprocal, Add; GELU → Erf (or Tanh), Mul, Add; SiLU →
Sigmoid, Mul; hardtanh / ReLU6 → Clip; hardswish, hardsigmoid, leaky ReLU, ELU → HardSwish,
HardSigmoid, LeakyRelu, Elu; softmax, log-softmax → Softmax, LogSoftmax; a layout copy → Identity. Linear, ReLU, sigmoid,
tanh and the loss are plain tensor code and export through torch's own translations (MatMul,
Add, Clip, ...).
With the 'reference' backend the graph is plain tensor code throughout.
Exported graphs are for inference: the backward operators have no translation.
Requires onnxscript (and onnx); onnxruntime runs the result.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
from onnxscript import opset18 as op

from .checks import adaptive_windows, check_conv2d


def _pads(padding: Sequence[int]):
    """ONNX pads [top, left, bottom, right] of torch's symmetric (p_h, p_w)."""
    return [padding[0], padding[1], padding[0], padding[1]]


def _static_shape(value) -> tuple:
    """The value's shape as ints (the exporter records static shapes; a symbolic dimension raises)."""
    dims = tuple(value.shape)
    if not all(isinstance(d, int) for d in dims):
        raise NotImplementedError(f"manualconv.onnx: this translation needs static shapes, got {dims}")
    return dims


def conv2d_forward(input, weight, bias, stride, padding, dilation, groups):
    # y = pad(x, p) ⋆ W + b: ONNX Conv is the same cross-correlation
    args = (input, weight) if bias is None else (input, weight, bias)
    return op.Conv(*args, strides=list(stride), pads=_pads(padding), dilations=list(dilation), group=groups)


def conv2d_grad_input(grad_output, weight, input_size, stride, padding, dilation, groups):
    # δx = full correlation of the stride-dilated δ with rot180(W): ONNX ConvTranspose, whose
    # weight layout (C_in, C_out/group, kH, kW) is the conv weight's (O, C/g, kH, kW); the
    # rows the forward's floor division skipped come back as output_padding
    out_size = check_conv2d(tuple(input_size), _static_shape(weight), None, stride, padding, dilation, groups)
    kernel = _static_shape(weight)[2:]
    output_padding = [input_size[2 + i] - ((out_size[2 + i] - 1) * stride[i] - 2 * padding[i]
                                           + dilation[i] * (kernel[i] - 1) + 1) for i in range(2)]
    return op.ConvTranspose(grad_output, weight, strides=list(stride), pads=_pads(padding),
                            dilations=list(dilation), group=groups, output_padding=output_padding)


def _per_plane(indices, input):
    """ONNX's MaxPool indices count over the whole (N, C, H, W) tensor; torch's (and
    manualconv's) within each plane: subtract (n·C + c)·H·W."""
    shape = op.Shape(input)
    planes = op.ReduceProd(op.Slice(shape, [0], [2]), keepdims=0)
    plane_size = op.ReduceProd(op.Slice(shape, [2], [4]), keepdims=1)
    offsets = op.Mul(op.Range(op.Constant(value_int=0), planes, op.Constant(value_int=1)), plane_size)
    offsets = op.Reshape(offsets, op.Concat(op.Slice(shape, [0], [2]), op.Constant(value_ints=[1, 1]), axis=0))
    return op.Sub(indices, offsets)


def max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    # y = max over each window, argmax as h·W + w within the plane
    values, indices = op.MaxPool(input, kernel_shape=list(kernel_size), strides=list(stride), pads=_pads(padding),
                                 dilations=list(dilation), ceil_mode=int(ceil_mode))
    return values, _per_plane(indices, input)


def avg_pool2d_forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    # y = Σ_window x / divisor; divisor_override d: the window sum is AveragePool(include pad)·k_h·k_w,
    # exact while every window lies inside the padded input (no ceil_mode overhang)
    pooled = op.AveragePool(input, kernel_shape=list(kernel_size), strides=list(stride), pads=_pads(padding),
                            ceil_mode=int(ceil_mode), count_include_pad=int(count_include_pad or divisor_override is not None))
    if divisor_override is None:
        return pooled
    if ceil_mode:
        raise NotImplementedError("manualconv.onnx: avg_pool2d with divisor_override and ceil_mode=True has no ONNX equivalent")
    area = kernel_size[0] * kernel_size[1]
    return op.Mul(pooled, op.CastLike(op.Constant(value_float=area / divisor_override), pooled))


def _uniform_window(size: int, out: int) -> Optional[int]:
    """The window (= stride) when every adaptive window has the same size and no overlap: out divides size."""
    return size // out if size % out == 0 else None


def _window_slices(input, output_size):
    """For each adaptive window (i, j): the slice of input it covers, its row/column start and width."""
    h, w = _static_shape(input)[2:]
    for i, (top, bottom) in enumerate(adaptive_windows(h, output_size[0])):
        for j, (left, right) in enumerate(adaptive_windows(w, output_size[1])):
            yield op.Slice(input, [top, left], [bottom, right], [2, 3]), top, left, right - left


def _assemble(values, output_size):
    """Window results (N, C, 1, 1) in row-major order → (N, C, H_out, W_out)."""
    rows = [op.Concat(*values[i * output_size[1]:(i + 1) * output_size[1]], axis=3) for i in range(output_size[0])]
    return op.Concat(*rows, axis=2)


def adaptive_avg_pool2d_forward(input, output_size):
    # y[i,j] = mean over window [⌊iH/H_out⌋, ⌈(i+1)H/H_out⌉) × (same for columns)
    h, w = _static_shape(input)[2:]
    if tuple(output_size) == (1, 1):
        return op.GlobalAveragePool(input)
    kernel = (_uniform_window(h, output_size[0]), _uniform_window(w, output_size[1]))
    if None not in kernel:
        return op.AveragePool(input, kernel_shape=list(kernel), strides=list(kernel))
    return _assemble([op.ReduceMean(window, [2, 3], keepdims=1) for window, *_ in _window_slices(input, output_size)],
                     output_size)


def adaptive_max_pool2d_forward(input, output_size):
    # y[i,j] = max over the adaptive window, argmax as h·W + w within the plane
    h, w = _static_shape(input)[2:]
    kernel = (_uniform_window(h, output_size[0]), _uniform_window(w, output_size[1]))
    if None not in kernel:
        values, indices = op.MaxPool(input, kernel_shape=list(kernel), strides=list(kernel))
        return values, _per_plane(indices, input)
    values, indices = [], []
    for window, top, left, width in _window_slices(input, output_size):
        # the first maximum in row-major order within the window, then as h·W + w in the plane
        local = op.ArgMax(op.Reshape(window, [0, 0, -1, 1]), axis=2, keepdims=1)
        width_ = op.Constant(value_int=width)
        row, col = op.Div(local, width_), op.Mod(local, width_)
        indices.append(op.Add(op.Mul(op.Add(row, op.Constant(value_int=top)), op.Constant(value_int=w)),
                              op.Add(col, op.Constant(value_int=left))))
        values.append(op.ReduceMax(window, [2, 3], keepdims=1))
    return _assemble(values, output_size), _assemble(indices, output_size)


def _epsilon_like(eps: float, like):
    return op.CastLike(op.Constant(value_float=eps), like)


def batch_norm_statistics(input):
    # μ_c = Σ x[:, c] / N,  var_c = Σ (x[:, c] − μ_c)² / N (biased), over n, H, W
    mean = op.ReduceMean(input, [0, 2, 3], keepdims=0)
    centered = op.Sub(input, op.Reshape(mean, [1, -1, 1, 1]))
    return mean, op.ReduceMean(op.Mul(centered, centered), [0, 2, 3], keepdims=0)


def batch_norm_apply(input, mean, invstd, weight, bias):
    # y = γ·(x − μ)·σ⁻¹ + β per channel (the statistics as given: σ⁻¹, not the variance, so no
    # BatchNormalization, whose ε would enter a second time)
    channel = [1, -1, 1, 1]
    y = op.Mul(op.Sub(input, op.Reshape(mean, channel)), op.Reshape(invstd, channel))
    if weight is not None:
        y = op.Mul(y, op.Reshape(weight, channel))
    return y if bias is None else op.Add(y, op.Reshape(bias, channel))


def layer_norm_forward(input, weight, bias, eps):
    # rows of (M, D): μ, var over the row, σ⁻¹ = 1/√(var + ε), y = γ ⊙ (x − μ)·σ⁻¹ + β; returns (y, μ, σ⁻¹)
    mean = op.ReduceMean(input, [1], keepdims=1)
    centered = op.Sub(input, mean)
    invstd = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(centered, centered), [1], keepdims=1),
                                          _epsilon_like(eps, input))))
    y = op.Mul(centered, invstd)
    if weight is not None:
        y = op.Mul(y, weight)
    if bias is not None:
        y = op.Add(y, bias)
    return y, op.Squeeze(mean, [1]), op.Squeeze(invstd, [1])


def gelu_forward(input, approximate):
    # GELU(x) = x·½(1 + erf(x/√2)); 'tanh': ½x(1 + tanh(√(2/π)(x + κx³))) (opset 18 has no Gelu)
    def c(value: float):
        return _epsilon_like(value, input)

    half_x = op.Mul(input, c(0.5))
    if approximate == "tanh":
        inner = op.Mul(c(math.sqrt(2.0 / math.pi)), op.Add(input, op.Mul(c(0.044715), op.Mul(input, op.Mul(input, input)))))
        return op.Mul(half_x, op.Add(c(1.0), op.Tanh(inner)))
    return op.Mul(half_x, op.Add(c(1.0), op.Erf(op.Mul(input, c(math.sqrt(0.5))))))


def activation_forward(input, kind, params):
    # the activations of csrc/activations.cpp, each an ONNX operator of the same function
    # (hardswish and hardsigmoid as x·max(0, min(1, x/6 + ½)): the same values, rounded in another order)
    if kind == "silu":  # x·σ(x)
        return op.Mul(input, op.Sigmoid(input))
    if kind == "hardtanh":  # clamp(x, lo, hi)
        return op.Clip(input, _epsilon_like(params[0], input), _epsilon_like(params[1], input))
    if kind == "hardswish":
        return op.HardSwish(input)
    if kind == "hardsigmoid":
        return op.HardSigmoid(input, alpha=1.0 / 6.0, beta=0.5)
    if kind == "leaky_relu":
        return op.LeakyRelu(input, alpha=params[0])
    if kind == "elu":
        return op.Elu(input, alpha=params[0])
    raise NotImplementedError(f"manualconv.onnx: no translation for the activation {kind}")


def softmax_forward(input, dim, log):
    # softmax / log-softmax along dim: ONNX Softmax / LogSoftmax (opset 13+: along one axis)
    return op.LogSoftmax(input, axis=dim) if log else op.Softmax(input, axis=dim)


def group_norm_forward(input, weight, bias, num_groups, eps):
    # per (sample, group) set of an (n, C, H, W) map: μ, var, σ⁻¹ = 1/√(var + ε),
    # y = γ_c·(x − μ)·σ⁻¹ + β_c; returns (y, μ, σ⁻¹), the statistics (n, G)
    sets = op.Reshape(input, [0, num_groups, -1])
    mean = op.ReduceMean(sets, [2], keepdims=1)
    centered = op.Sub(sets, mean)
    invstd = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(centered, centered), [2], keepdims=1),
                                          _epsilon_like(eps, input))))
    y = op.Reshape(op.Mul(centered, invstd), op.Shape(input))
    channel = [1, -1, 1, 1]
    if weight is not None:
        y = op.Mul(y, op.Reshape(weight, channel))
    if bias is not None:
        y = op.Add(y, op.Reshape(bias, channel))
    return y, op.Squeeze(mean, [2]), op.Squeeze(invstd, [2])


def layout_copy(input, channels_last):
    # a copy in the other memory layout (csrc/layout_copy.cpp): ONNX tensors have no layout
    return op.Identity(input)


_FORWARD_OPERATORS: Dict[str, Callable] = {
    "conv2d_forward": conv2d_forward,
    "conv2d_grad_input": conv2d_grad_input,
    "max_pool2d_forward": max_pool2d_forward,
    "avg_pool2d_forward": avg_pool2d_forward,
    "adaptive_avg_pool2d_forward": adaptive_avg_pool2d_forward,
    "adaptive_max_pool2d_forward": adaptive_max_pool2d_forward,
    "batch_norm_statistics": batch_norm_statistics,
    "batch_norm_apply": batch_norm_apply,
    "layer_norm_forward": layer_norm_forward,
    "gelu_forward": gelu_forward,
    "activation_forward": activation_forward,
    "softmax_forward": softmax_forward,
    "group_norm_forward": group_norm_forward,
    "layout_copy": layout_copy,
}


# Operators only a training graph holds (dropout in eval mode is the identity and calls nothing):
# no translation, as for the backward operators.
TRAINING_ONLY_OPERATORS = ("dropout_masked_scale",)


def translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.manualconv.<op>.default: ONNX translation}`` for torch.onnx.export's
    ``custom_translation_table`` (empty when the C++ extension is not built: then manualconv's
    graphs hold no manualconv operators)."""
    from .ops import AVAILABLE

    if not AVAILABLE:
        return {}
    return {getattr(torch.ops.manualconv, name).default: f for name, f in _FORWARD_OPERATORS.items()
            if hasattr(torch.ops.manualconv, name)}


def export(model, args, f=None, *, custom_translation_table: Optional[Dict] = None, **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with manualconv's translations
    added to ``custom_translation_table`` (yours take precedence). Returns the ONNXProgram."""
    table = {**translation_table(), **(custom_translation_table or {})}
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
