"""Drop-in modules: subclasses of torch.nn's, so constructor arguments, defaults, validation,
parameter initialisation, ``state_dict`` keys, ``extra_repr`` and ``isinstance`` checks are
torch.nn's own; only the computation (and so the backward) is manualconv's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import functional

__all__ = [
    "Conv2d", "MaxPool2d", "AvgPool2d", "Conv1d", "ConvTranspose2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d",
    "Linear", "ReLU", "Sigmoid", "Tanh", "ScaledTanh", "CrossEntropyLoss", "Subsampling2d",
]


def _prepare_scriptable(module):
    raise RuntimeError(
        f"manualconv: torch.jit.script cannot compile {type(module).__name__}: TorchScript does not support "
        "custom autograd Functions (and is in maintenance mode). Use torch.compile or torch.export, which "
        "are supported, or manualconv.revert(model) for a scriptable torch.nn copy."
    )


def refuse_torchscript() -> None:
    """Give every module class defined here a ``__prepare_scriptable__`` hook (torch.jit.script calls it
    on each submodule first), so scripting a manualconv model fails with that clear message instead
    of an unrelated TorchScript parse error. Called once from manualconv/__init__.py, after every
    class below exists."""
    for cls in list(globals().values()):
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == __name__:
            cls.__prepare_scriptable__ = _prepare_scriptable


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d with the hand-derived backward; all four ``padding_mode``s."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # reflect/replicate/circular padding is applied to the input, then a padding-0 conv
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return functional.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d with the hand-derived backward (δ routed to the argmax)."""

    def forward(self, input):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                     ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d with the hand-derived backward (δ spread evenly)."""

    def forward(self, input):
        return functional.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                     self.count_include_pad, self.divisor_override)


class Conv1d(torch.nn.Conv1d):
    """torch.nn.Conv1d with the hand-derived backward; all four ``padding_mode``s."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional.conv1d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return functional.conv1d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d (``output_size`` in forward too) computed by conv2d's grad-input kernel."""

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError('Only "zeros" padding mode is supported for ConvTranspose2d')
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return functional.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                           output_padding, self.groups, self.dilation)


class AdaptiveMaxPool2d(torch.nn.AdaptiveMaxPool2d):
    def forward(self, input):
        return functional.adaptive_max_pool2d(input, self.output_size, self.return_indices)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    def forward(self, input):
        return functional.adaptive_avg_pool2d(input, self.output_size)


class Linear(torch.nn.Linear):
    """torch.nn.Linear with the fully connected derivation: δx = Wᵀδ, ∂J/∂W = δxᵀ, ∂J/∂b = δ."""

    def forward(self, input):
        return functional.linear(input, self.weight, self.bias)


class ReLU(torch.nn.ReLU):
    def forward(self, input):
        return functional.relu(input, self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input):
        return functional.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input):
        return functional.tanh(input)


class ScaledTanh(torch.nn.Module):
    """LeCun's squashing function f(a) = A·tanh(S·a), A = 1.7159, S = 2/3 (LeNet-5)."""

    def __init__(self, amplitude: float = 1.7159, slope: float = 2.0 / 3.0):
        super().__init__()
        self.amplitude, self.slope = amplitude, slope

    def forward(self, input):
        return functional.tanh(input, self.amplitude, self.slope)

    def extra_repr(self) -> str:
        return f"amplitude={self.amplitude}, slope={self.slope:.4f}"


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss with the derived output delta softmax(z) − onehot(y)."""

    def forward(self, input, target):
        return functional.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing)


class Subsampling2d(torch.nn.Module):
    """The trainable subsampling layer of LeNet-5: per channel j, y_j = β_j·down(x_j) + b_j where
    down sums non-overlapping n×n blocks. Parameters ``weight`` (β, one per channel) and ``bias``.
    Initialised as LeCun (1998): uniform in ±2.4 / fan_in, fan_in = n²."""

    def __init__(self, channels: int, kernel_size=2, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"Subsampling2d: channels must be positive, but got {channels}")
        self.channels = channels
        self.kernel_size = torch.nn.modules.utils._pair(kernel_size)
        if min(self.kernel_size) <= 0:
            raise ValueError(f"Subsampling2d: kernel_size must be positive, but got {kernel_size}")
        self.weight = torch.nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 2.4 / (self.kernel_size[0] * self.kernel_size[1])
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        return functional.subsampling2d(input, self.weight, self.bias, self.kernel_size)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------
# Normalisation and dropout


class _BatchNormForward:
    """The forward of torch's _BatchNorm (its running-statistics bookkeeping: num_batches_tracked,
    momentum or, for momentum=None, the cumulative average 1/num_batches_tracked; batch statistics
    in training or when no running statistics are kept) computed by functional.batch_norm."""

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats  # buffers passed only when used or updated
        return functional.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                                     self.weight, self.bias, use_batch_statistics, factor, self.eps)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d with the hand-derived backward δx = γ/(N·σ)·(N·δy − Σδy − x̂·Σ(δy·x̂))."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d with the hand-derived backward δx = γ/(N·σ)·(N·δy − Σδy − x̂·Σ(δy·x̂))."""


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm with the hand-derived backward (per row, as batch norm's per channel)."""

    def forward(self, input):
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm: layer norm of each (sample, group), then the per-channel affine map."""

    def forward(self, input):
        return functional.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout; the mask is drawn as torch draws it (same seed, same mask)."""

    def forward(self, input):
        return functional.dropout(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    """torch.nn.Dropout2d; one draw per (sample, channel), as torch draws it."""

    def forward(self, input):
        return functional.dropout2d(input, self.p, self.training, self.inplace)


__all__ += ["BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "Dropout", "Dropout2d"]


# =============================================================================================
# Activations: drop-in subclasses of torch.nn's GELU, SiLU, ReLU6, Hardtanh, Hardswish,
# Hardsigmoid, LeakyReLU, ELU, Softmax and LogSoftmax (same arguments, inplace flags, extra_repr)

__all__ += ["GELU", "SiLU", "ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid", "LeakyReLU", "ELU", "Softmax", "LogSoftmax"]


class GELU(torch.nn.GELU):
    def forward(self, input):
        return functional.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    def forward(self, input):
        return functional.silu(input, inplace=self.inplace)


class Hardtanh(torch.nn.Hardtanh):
    def forward(self, input):
        return functional.hardtanh(input, self.min_val, self.max_val, self.inplace)


class ReLU6(torch.nn.ReLU6):
    def forward(self, input):
        return functional.hardtanh(input, self.min_val, self.max_val, self.inplace)


class Hardswish(torch.nn.Hardswish):
    def forward(self, input):
        return functional.hardswish(input, self.inplace)


class Hardsigmoid(torch.nn.Hardsigmoid):
    def forward(self, input):
        return functional.hardsigmoid(input, self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, input):
        return functional.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(torch.nn.ELU):
    def forward(self, input):
        return functional.elu(input, self.alpha, self.inplace)


class Softmax(torch.nn.Softmax):
    def forward(self, input):
        return functional.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    def forward(self, input):
        return functional.log_softmax(input, self.dim, _stacklevel=5)
