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
        return functional.relu(input)


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
