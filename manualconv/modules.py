"""Drop-in modules: subclasses of torch.nn's, so constructor arguments, defaults, validation,
parameter initialisation, ``state_dict`` keys, ``extra_repr`` and ``isinstance`` checks are
torch.nn's own; only the computation (and so the backward) is manualconv's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import functional

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d"]


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
