"""The table every op test is generated from (in the spirit of PyTorch's OpInfo).

A ``Case`` is one call of one op: valid samples (``error is None``) feed gradcheck,
gradgradcheck and the float32 comparisons with torch.nn; error samples (``error`` set) feed the
bad-input tests. ``call(case, lib, ...)`` runs the same call through manualconv (``lib='manual'``)
or torch.nn (``lib='native'``): both libraries share one signature, so every comparison is of
identical calls.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # 'conv2d' | 'max_pool2d' | 'avg_pool2d'
    input: Tuple[int, ...]
    kwargs: Dict = field(default_factory=dict)
    weight: Optional[Tuple[int, ...]] = None  # conv only
    bias: bool = True  # conv only
    padding_mode: str = "zeros"  # conv only: other modes run through the Conv2d modules
    fill: str = "randn"  # 'randn' | 'zeros' | 'relu' (half the entries tie at 0) | 'nan'
    layout: str = "contiguous"  # 'contiguous' | 'channels_last' | 'strided' (a non-contiguous view)
    error: Optional[Tuple[type, str]] = None  # (exception type, regex the message must match)
    torch_error: Optional[type] = None  # the type torch raises, where it differs (see note)
    target: Optional[str] = None  # cross_entropy: 'index' | 'probabilities' (| spoiled variants)
    corrupt: Optional[str] = None  # error cases: 'input-float64' | 'bias-float64' | 'weight-on-meta' | 'integer'

    def __str__(self) -> str:
        return f"{self.op}-{self.name}"

    def _replace_error(self, error) -> "Case":
        return dataclasses.replace(self, error=error)


@dataclass(frozen=True)
class Rand:
    """A keyword argument that is a tensor (e.g. cross_entropy's class weights): positive random
    values of this shape, the same for every library, made when the case is called."""

    shape: Tuple[int, ...]


LINEAR_OPS = {"conv2d", "conv1d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_max_pool2d",
              "adaptive_avg_pool2d", "linear", "subsampling2d"}
MAX_OPS = {"max_pool2d", "adaptive_max_pool2d"}


def conv2d_cases() -> List[Case]:
    c = lambda name, input, weight, bias=True, **kw: Case(name, "conv2d", input, kw, weight=weight, bias=bias)  # noqa: E731
    samples = [
        c("k1", (2, 3, 5, 5), (4, 3, 1, 1)),
        c("k2", (2, 3, 5, 6), (4, 3, 2, 2)),
        c("k3-pad1", (2, 3, 6, 6), (4, 3, 3, 3), padding=1),
        c("k4-pad2", (1, 2, 7, 7), (3, 2, 4, 4), padding=2),
        c("k5", (1, 2, 7, 8), (2, 2, 5, 5), bias=False),
        c("k2x3-nonsquare", (2, 2, 6, 7), (3, 2, 2, 3), padding=(1, 0)),
        c("stride2", (2, 3, 7, 7), (4, 3, 3, 3), stride=2, padding=1),
        c("stride3-remainder", (1, 2, 8, 9), (3, 2, 3, 3), stride=3),
        c("stride-tuple", (2, 2, 7, 8), (3, 2, 3, 2), stride=(2, 1), padding=(0, 1)),
        c("pad-tuple", (1, 2, 5, 5), (2, 2, 3, 3), padding=(2, 1)),
        c("pad-bigger-than-kernel-reach", (1, 2, 4, 4), (2, 2, 2, 2), padding=2, stride=2),
        c("dilation2", (2, 2, 8, 8), (3, 2, 3, 3), dilation=2, padding=2),
        c("dilation3-stride2", (1, 2, 11, 10), (2, 2, 3, 2), dilation=(3, 2), stride=2, padding=1),
        c("groups2", (1, 4, 5, 5), (4, 2, 3, 3), groups=2, padding=1),
        c("depthwise", (2, 3, 6, 5), (3, 1, 3, 3), groups=3, padding=1),
        c("depthwise-multiplier", (1, 2, 5, 5), (4, 1, 3, 3), groups=2, stride=2),
        c("no-bias", (2, 3, 5, 5), (2, 3, 3, 3), bias=False, padding=1),
        c("batch3", (3, 2, 5, 5), (2, 2, 3, 3)),
        c("batch1-nonsquare-image", (1, 2, 4, 9), (3, 2, 3, 3), padding=1),
        c("unbatched", (2, 5, 6), (3, 2, 3, 3), padding=1),
        c("same-odd", (2, 2, 6, 6), (3, 2, 3, 3), padding="same"),
        c("same-even-dilated", (1, 2, 7, 6), (2, 2, 4, 3), padding="same", dilation=(1, 2)),
        c("valid", (1, 2, 6, 6), (2, 2, 3, 3), padding="valid"),
        c("kernel-equals-input", (2, 2, 3, 3), (4, 2, 3, 3)),
        c("1x1-stride1", (2, 4, 4, 4), (3, 4, 1, 1), bias=False),
        c("1x1-stride2", (1, 4, 5, 5), (3, 4, 1, 1), stride=2),
        Case("channels-last", "conv2d", (2, 3, 5, 5), dict(padding=1), weight=(4, 3, 3, 3), layout="channels_last"),
        # the channels-last kernels (csrc/conv2d_channels_last.cpp): im2col with partial and whole
        # kernel rows, the 1×1 path without im2col, and blocks of several samples per GEMM
        Case("channels-last-strided-dilated-groups", "conv2d", (3, 4, 9, 8), dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2), weight=(6, 2, 3, 2), layout="channels_last"),
        Case("channels-last-k2-no-bias", "conv2d", (2, 2, 5, 6), {}, weight=(3, 2, 2, 2), bias=False, layout="channels_last"),
        Case("channels-last-1x1", "conv2d", (2, 4, 4, 5), {}, weight=(3, 4, 1, 1), layout="channels_last"),
        Case("channels-last-1x1-groups2", "conv2d", (2, 4, 3, 3), dict(groups=2), weight=(6, 2, 1, 1), bias=False, layout="channels_last"),
        Case("channels-last-sample-blocks", "conv2d", (9, 3, 3, 3), dict(padding=1), weight=(4, 3, 3, 3), layout="channels_last"),
        # the direct float32 kernels (csrc/conv2d_direct.cpp; float32 tests only, float64 takes the
        # GEMM path): 6×16 and 6×8 tiles (pixel tiles wrapping from row to row, a moved-back last
        # tile), a strided forward and weight gradient, the input gradient as a full correlation
        # with the rotated kernel, 16- and 8-wide weight-gradient tiles
        Case("channels-last-direct-16", "conv2d", (2, 8, 6, 7), dict(padding=1), weight=(16, 8, 3, 3), layout="channels_last"),
        Case("channels-last-direct-8-strided-dilated", "conv2d", (2, 16, 9, 11), dict(stride=2, padding=2, dilation=2), weight=(8, 16, 3, 3), bias=False, layout="channels_last"),
        Case("channels-last-direct-narrow-rows", "conv2d", (2, 16, 5, 4), dict(padding=(1, 0), dilation=(1, 2)), weight=(16, 16, 3, 2), layout="channels_last"),
        # fewer than 6 output pixels (1-pixel tiles; δx too), a weight gradient whose last tile of
        # 6 columns is moved back (K = 16); 24 output channels (a 16-wide tile, then a 6×8 tile)
        Case("channels-last-direct-few-pixels", "conv2d", (3, 8, 1, 4), {}, weight=(16, 8, 1, 2), layout="channels_last"),
        Case("channels-last-direct-24-16", "conv2d", (1, 16, 3, 4), {}, weight=(24, 16, 2, 2), bias=False, layout="channels_last"),
        Case("non-contiguous", "conv2d", (2, 3, 6, 5), dict(stride=2, padding=1), weight=(4, 3, 3, 3), layout="strided"),
        Case("padding-mode-reflect", "conv2d", (1, 2, 5, 5), dict(padding=1), weight=(3, 2, 3, 3), padding_mode="reflect"),
        Case("padding-mode-replicate", "conv2d", (2, 2, 5, 4), dict(padding=(2, 1), stride=2), weight=(3, 2, 3, 3), padding_mode="replicate"),
        Case("padding-mode-circular", "conv2d", (1, 2, 5, 5), dict(padding=2, dilation=2), weight=(3, 2, 3, 3), padding_mode="circular"),
        Case("padding-mode-reflect-same", "conv2d", (1, 2, 6, 6), dict(padding="same"), weight=(2, 2, 4, 4), padding_mode="reflect"),
    ]
    e = lambda name, input, weight, error, bias=True, **kw: Case(name, "conv2d", input, kw, weight=weight, bias=bias, error=error)  # noqa: E731
    errors = [
        e("rank2-input", (4, 8), (2, 4, 3, 3), (RuntimeError, r"3D \(unbatched\) or 4D \(batched\) input")),
        e("rank5-input", (1, 1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"3D \(unbatched\) or 4D \(batched\) input")),
        e("weight-rank3", (1, 4, 8, 8), (2, 4, 3), (RuntimeError, r"weight")),
        e("channels-mismatch", (1, 3, 8, 8), (2, 4, 3, 3), (RuntimeError, r"expected input\[1, 3, 8, 8\] to have 4 channels, but got 3")),
        e("groups-channels-mismatch", (1, 5, 8, 8), (4, 2, 3, 3), (RuntimeError, r"to have 4 channels, but got 5"), groups=2),
        e("out-channels-not-divisible-by-groups", (1, 4, 8, 8), (5, 2, 3, 3), (RuntimeError, r"groups=2, expected weight to be divisible by 2"), groups=2),
        e("groups0", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"non-positive groups"), groups=0),
        e("kernel-larger-than-padded-input", (1, 4, 2, 2), (2, 4, 3, 3), (RuntimeError, r"Kernel size can't be greater than actual input size")),
        e("dilated-kernel-larger-than-input", (1, 4, 4, 4), (2, 4, 3, 3), (RuntimeError, r"Kernel size: \(5 x 5\)"), dilation=2),
        e("stride0", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"non-positive stride"), stride=0),
        e("stride-negative", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"non-positive stride"), stride=(1, -1)),
        e("padding-negative", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"negative padding"), padding=-1),
        e("dilation0", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"non-positive dilation"), dilation=0),
        e("same-with-stride2", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"padding='same' is not supported for strided"), padding="same", stride=2),
        e("padding-string-unknown", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"Invalid padding string: 'full'"), padding="full"),
        e("bias-wrong-size", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"expected bias to be 1-dimensional with 2 elements"), bias=(5,)),
        e("stride-three-values", (1, 4, 8, 8), (2, 4, 3, 3), (RuntimeError, r"stride"), stride=(1, 1, 1)),
        Case("dtype-mismatch", "conv2d", (1, 4, 8, 8), {}, weight=(2, 4, 3, 3), error=(RuntimeError, r"input type \(torch.float64\) and weight type \(torch.float32\)"), corrupt="input-float64"),
        Case("bias-dtype-mismatch", "conv2d", (1, 4, 8, 8), {}, weight=(2, 4, 3, 3), error=(RuntimeError, r"bias type \(torch.float64\)"), corrupt="bias-float64"),
        Case("device-mismatch", "conv2d", (1, 4, 8, 8), {}, weight=(2, 4, 3, 3), error=(RuntimeError, r"same device"), corrupt="weight-on-meta"),
        Case("integer-input", "conv2d", (1, 4, 8, 8), {}, weight=(2, 4, 3, 3), error=(RuntimeError, r"floating-point"), corrupt="integer"),
    ]
    return samples + errors


def max_pool2d_cases() -> List[Case]:
    m = lambda name, input, **kw: Case(name, "max_pool2d", input, kw)  # noqa: E731
    samples = [
        m("k2", (2, 3, 6, 6), kernel_size=2),
        m("k3-s2-overlap", (2, 2, 7, 7), kernel_size=3, stride=2),
        m("k3-s1-overlap", (1, 2, 5, 6), kernel_size=3, stride=1),
        m("nonsquare", (1, 2, 7, 8), kernel_size=(3, 2), stride=(2, 1)),
        m("padding", (2, 2, 6, 6), kernel_size=3, stride=2, padding=1),
        m("padding-tuple", (1, 2, 6, 7), kernel_size=(2, 4), stride=2, padding=(1, 2)),
        m("dilation2", (1, 2, 9, 9), kernel_size=3, stride=2, dilation=2, padding=1),
        m("dilation-tuple", (1, 2, 8, 9), kernel_size=2, dilation=(2, 3)),
        m("ceil-mode", (2, 2, 7, 7), kernel_size=2, stride=2, ceil_mode=True),
        m("ceil-mode-padding", (1, 2, 8, 8), kernel_size=3, stride=2, padding=1, ceil_mode=True),
        m("ceil-mode-drop-last", (1, 1, 5, 5), kernel_size=2, stride=2, padding=1, ceil_mode=True),
        m("return-indices", (2, 2, 6, 6), kernel_size=2, return_indices=True),
        m("stride-none-explicit", (1, 2, 6, 6), kernel_size=3, stride=None),
        m("unbatched", (2, 6, 6), kernel_size=2, return_indices=True),
        Case("ties-zeros", "max_pool2d", (2, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, return_indices=True), fill="zeros"),
        Case("ties-relu", "max_pool2d", (2, 3, 8, 8), dict(kernel_size=3, stride=1, return_indices=True), fill="relu"),
        Case("ties-relu-dilated-ceil", "max_pool2d", (2, 2, 9, 9), dict(kernel_size=2, stride=2, dilation=2, ceil_mode=True, return_indices=True), fill="relu"),
        Case("nan", "max_pool2d", (2, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, return_indices=True), fill="nan"),
        Case("channels-last", "max_pool2d", (2, 3, 6, 6), dict(kernel_size=2, return_indices=True), layout="channels_last"),
        # the channels-last kernels (csrc/max_pool2d.cpp)
        Case("channels-last-padding-dilation-ceil", "max_pool2d", (2, 3, 9, 9), dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True, return_indices=True), layout="channels_last"),
        Case("channels-last-ties-relu", "max_pool2d", (2, 3, 8, 8), dict(kernel_size=3, stride=1, return_indices=True), fill="relu", layout="channels_last"),
        Case("channels-last-nan", "max_pool2d", (2, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, return_indices=True), fill="nan", layout="channels_last"),
        Case("non-contiguous", "max_pool2d", (2, 3, 7, 6), dict(kernel_size=3, stride=2, return_indices=True), layout="strided"),
    ]
    e = lambda name, input, error, **kw: Case(name, "max_pool2d", input, kw, error=error)  # noqa: E731
    errors = [
        e("rank2", (6, 6), (RuntimeError, r"3D \(C, H, W\) or 4D"), kernel_size=2),
        e("rank5", (1, 1, 1, 6, 6), (RuntimeError, r"3D \(C, H, W\) or 4D"), kernel_size=2),
        e("empty-channels", (2, 0, 6, 6), (RuntimeError, r"non-empty"), kernel_size=2),
        e("padding-over-half-kernel", (1, 2, 8, 8), (RuntimeError, r"pad should be at most half of effective kernel size, but got pad=2, kernel_size=3"), kernel_size=3, padding=2),
        e("padding-negative", (1, 2, 8, 8), (RuntimeError, r"pad must be non-negative"), kernel_size=3, padding=-1),
        e("kernel0", (1, 2, 8, 8), (RuntimeError, r"kernel_size should be greater than zero"), kernel_size=0, stride=1),
        e("stride0", (1, 2, 8, 8), (RuntimeError, r"stride should be greater than zero"), kernel_size=2, stride=0),
        e("dilation0", (1, 2, 8, 8), (RuntimeError, r"dilation should be greater than zero"), kernel_size=2, dilation=0),
        e("kernel-larger-than-input", (1, 2, 2, 2), (RuntimeError, r"Output size is too small"), kernel_size=3),
        e("kernel-three-values", (1, 2, 8, 8), (RuntimeError, r"kernel_size"), kernel_size=(2, 2, 2)),
        Case("integer-input", "max_pool2d", (1, 2, 8, 8), dict(kernel_size=2), error=(RuntimeError, r"floating-point"), corrupt="integer"),
    ]
    return samples + errors


def avg_pool2d_cases() -> List[Case]:
    a = lambda name, input, **kw: Case(name, "avg_pool2d", input, kw)  # noqa: E731
    samples = [
        a("k2", (2, 3, 6, 6), kernel_size=2),
        a("k3-s2-overlap", (2, 2, 7, 7), kernel_size=3, stride=2),
        a("k3-s1-overlap", (1, 2, 5, 6), kernel_size=3, stride=1),
        a("nonsquare", (1, 2, 7, 8), kernel_size=(3, 2), stride=(2, 1)),
        a("padding-include", (2, 2, 6, 6), kernel_size=3, stride=2, padding=1),
        a("padding-exclude", (2, 2, 6, 6), kernel_size=3, stride=2, padding=1, count_include_pad=False),
        a("padding-tuple", (1, 2, 6, 7), kernel_size=(2, 4), stride=2, padding=(1, 2)),
        a("ceil-mode", (2, 2, 7, 7), kernel_size=2, stride=2, ceil_mode=True),
        a("ceil-mode-padding-include", (1, 2, 8, 8), kernel_size=3, stride=2, padding=1, ceil_mode=True),
        a("ceil-mode-padding-exclude", (1, 2, 8, 8), kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        a("ceil-mode-drop-last", (1, 1, 5, 5), kernel_size=2, stride=2, padding=1, ceil_mode=True),
        a("divisor-override", (2, 2, 6, 6), kernel_size=3, stride=2, padding=1, divisor_override=5),
        a("divisor-override-ceil", (1, 2, 7, 7), kernel_size=2, ceil_mode=True, divisor_override=3),
        a("unbatched", (2, 6, 6), kernel_size=2),
        Case("channels-last", "avg_pool2d", (2, 3, 6, 6), dict(kernel_size=2), layout="channels_last"),
        Case("non-contiguous", "avg_pool2d", (2, 3, 7, 6), dict(kernel_size=3, stride=2, padding=1), layout="strided"),
    ]
    e = lambda name, input, error, **kw: Case(name, "avg_pool2d", input, kw, error=error)  # noqa: E731
    errors = [
        # torch raises IndexError here (a side effect of indexing dim -3); a rank check raises RuntimeError
        Case("rank2", "avg_pool2d", (6, 6), dict(kernel_size=2), error=(RuntimeError, r"3D \(C, H, W\) or 4D"), torch_error=IndexError),
        e("rank5", (1, 1, 1, 6, 6), (RuntimeError, r"3D \(C, H, W\) or 4D"), kernel_size=2),
        e("padding-over-half-kernel", (1, 2, 8, 8), (RuntimeError, r"pad should be at most half of effective kernel size, but got pad=2, kernel_size=3"), kernel_size=3, padding=2),
        e("padding-negative", (1, 2, 8, 8), (RuntimeError, r"pad must be non-negative"), kernel_size=3, padding=-1),
        e("kernel0", (1, 2, 8, 8), (RuntimeError, r"kernel_size should be greater than zero"), kernel_size=0, stride=1),
        e("stride0", (1, 2, 8, 8), (RuntimeError, r"stride should be greater than zero"), kernel_size=2, stride=0),
        e("divisor-override0", (1, 2, 8, 8), (RuntimeError, r"divisor must be not zero"), kernel_size=2, divisor_override=0),
        e("kernel-larger-than-input", (1, 2, 2, 2), (RuntimeError, r"Output size is too small"), kernel_size=3),
    ]
    return samples + errors



def conv1d_cases() -> List[Case]:
    c = lambda name, input, weight, bias=True, **kw: Case(name, "conv1d", input, kw, weight=weight, bias=bias)  # noqa: E731
    samples = [
        c("k3-pad1", (2, 3, 9), (4, 3, 3), padding=1),
        c("stride2-dilation2", (2, 2, 11), (3, 2, 3), stride=2, dilation=2, padding=2, bias=False),
        c("groups-depthwise", (1, 4, 8), (4, 1, 3), groups=4),
        c("same-even", (1, 2, 7), (2, 2, 4), padding="same"),
        c("unbatched", (2, 8), (3, 2, 2)),
        Case("padding-mode-circular", "conv1d", (2, 2, 6), dict(padding=2), weight=(3, 2, 3), padding_mode="circular"),
        Case("padding-mode-reflect", "conv1d", (1, 2, 6), dict(padding=1), weight=(3, 2, 3), padding_mode="reflect"),
        Case("padding-mode-replicate", "conv1d", (1, 2, 6), dict(padding=1, stride=2), weight=(3, 2, 3), padding_mode="replicate"),
    ]
    e = lambda name, input, weight, error, **kw: Case(name, "conv1d", input, kw, weight=weight, error=error)  # noqa: E731
    errors = [
        e("rank4-input", (1, 2, 3, 8), (4, 2, 3), (RuntimeError, r"2D \(unbatched\) or 3D \(batched\) input to conv1d")),
        e("channels-mismatch", (1, 3, 8), (4, 2, 3), (RuntimeError, r"expected input\[1, 3, 8\] to have 2 channels")),
        e("kernel-larger-than-input", (1, 2, 2), (4, 2, 3), (RuntimeError, r"Kernel size can't be greater")),
        e("stride0", (1, 2, 8), (4, 2, 3), (RuntimeError, r"non-positive stride"), stride=0),
    ]
    return samples + errors


def conv_transpose2d_cases() -> List[Case]:
    c = lambda name, input, weight, bias=True, **kw: Case(name, "conv_transpose2d", input, kw, weight=weight, bias=bias)  # noqa: E731
    samples = [
        c("k3", (2, 3, 4, 5), (3, 4, 3, 3)),
        c("stride2-padding1-output-padding1", (2, 3, 4, 4), (3, 2, 3, 3), stride=2, padding=1, output_padding=1),
        c("stride-tuple-nonsquare", (1, 2, 3, 5), (2, 3, 2, 3), stride=(2, 3), padding=(0, 1), bias=False),
        c("groups2", (1, 4, 4, 4), (4, 3, 3, 3), groups=2, stride=2),
        c("dilation2-output-padding-above-stride", (1, 2, 4, 4), (2, 2, 3, 3), dilation=2, output_padding=1),
        c("unbatched", (2, 4, 4), (2, 3, 2, 2), stride=2),
    ]
    e = lambda name, input, weight, error, **kw: Case(name, "conv_transpose2d", input, kw, weight=weight, error=error)  # noqa: E731
    errors = [
        e("output-padding-not-below-stride-or-dilation", (1, 4, 5, 5), (4, 2, 3, 3), (RuntimeError, r"output padding must be smaller than either stride or dilation"), stride=2, output_padding=2),
        e("channels-mismatch", (1, 3, 5, 5), (4, 2, 3, 3), (RuntimeError, r"expected input\[1, 3, 5, 5\] to have 4 channels")),
        e("output-too-small", (1, 4, 1, 1), (4, 2, 1, 1), (RuntimeError, r"Output size is too small"), padding=1),
        e("rank2-input", (5, 5), (4, 2, 3, 3), (RuntimeError, r"3D \(unbatched\) or 4D \(batched\) input to conv_transpose2d")),
    ]
    return samples + errors


def adaptive_pool_cases() -> List[Case]:
    samples, errors = [], []
    for op in ("adaptive_max_pool2d", "adaptive_avg_pool2d"):
        a = lambda name, input, **kw: Case(name, op, input, kw)  # noqa: E731
        samples += [
            a("divisible", (2, 3, 8, 8), output_size=4),
            a("overlapping-windows", (2, 2, 7, 9), output_size=(3, 4)),
            a("larger-than-input", (1, 2, 3, 5), output_size=(5, 7)),
            a("global", (2, 3, 5, 6), output_size=1),
            a("none-entry", (1, 2, 6, 7), output_size=(None, 3)),
            a("unbatched", (2, 7, 7), output_size=3),
            Case("channels-last", op, (2, 3, 6, 6), dict(output_size=4), layout="channels_last"),
        ]
        errors += [
            Case("rank2", op, (6, 6), dict(output_size=2), error=(RuntimeError, r"3D \(C, H, W\) or 4D")),
            Case("negative-output-size", op, (1, 2, 6, 6), dict(output_size=(-1, 2)), error=(RuntimeError, r"greater than or equal to 0")),
            Case("output-size-three-values", op, (1, 2, 6, 6), dict(output_size=(2, 2, 2)), error=(RuntimeError, r"output_size")),
        ]
    samples += [
        Case("ties-relu", "adaptive_max_pool2d", (2, 2, 7, 7), dict(output_size=3, return_indices=True), fill="relu"),
        Case("nan", "adaptive_max_pool2d", (2, 2, 7, 7), dict(output_size=3, return_indices=True), fill="nan"),
        Case("return-indices", "adaptive_max_pool2d", (2, 2, 9, 5), dict(output_size=(4, 2), return_indices=True)),
    ]
    return samples + errors


def dense_cases() -> List[Case]:
    """Linear, the activations and the loss: the rest of a network's backward pass."""
    samples = [
        Case("2d", "linear", (4, 6), weight=(3, 6)),
        Case("3d-no-bias", "linear", (2, 3, 5), weight=(4, 5), bias=False),
        Case("1d", "linear", (5,), weight=(2, 5)),
    ]
    for op in ("relu", "sigmoid", "tanh"):
        samples.append(Case("4d", op, (2, 3, 4, 5)))
    samples += [
        Case("mean", "cross_entropy", (6, 5), target="index"),
        Case("weight-ignore-index", "cross_entropy", (6, 5), dict(weight=Rand((5,)), ignore_index=2), target="index"),
        Case("label-smoothing-weight", "cross_entropy", (6, 5), dict(weight=Rand((5,)), label_smoothing=0.2), target="index"),
        Case("sum", "cross_entropy", (6, 5), dict(reduction="sum", label_smoothing=0.1), target="index"),
        Case("none-spatial", "cross_entropy", (3, 4, 2, 3), dict(reduction="none", weight=Rand((4,))), target="index"),
        Case("unbatched", "cross_entropy", (5,), target="index"),
        Case("probabilities", "cross_entropy", (6, 5), dict(weight=Rand((5,)), label_smoothing=0.3), target="probabilities"),
        Case("probabilities-none", "cross_entropy", (4, 3), dict(reduction="none"), target="probabilities"),
    ]
    errors = [
        Case("in-features-mismatch", "linear", (4, 6), weight=(3, 5), error=(RuntimeError, r"in_features=5")),
        Case("target-out-of-bounds", "cross_entropy", (3, 5), target="index-out-of-bounds", error=(IndexError, r"Target 7 is out of bounds")),
        Case("batch-mismatch", "cross_entropy", (3, 5), target="index-short", error=(ValueError, r"Expected input batch_size \(3\) to match target batch_size \(2\)")),
        Case("weight-wrong-size", "cross_entropy", (3, 5), dict(weight=Rand((4,))), target="index", error=(RuntimeError, r"weight tensor should be defined either for all 5 classes")),
        Case("label-smoothing-above-1", "cross_entropy", (3, 5), dict(label_smoothing=1.5), target="index", error=(RuntimeError, r"label_smoothing must be between 0.0 and 1.0")),
        Case("unknown-reduction", "cross_entropy", (3, 5), dict(reduction="avg"), target="index", error=(ValueError, r"avg is not a valid value for reduction")),
        Case("float-target-wrong-shape", "cross_entropy", (3, 5), target="probabilities-wrong-shape", error=(RuntimeError, r"probability targets must have the input.s size")),
    ]
    return samples + errors


def subsampling2d_cases() -> List[Case]:
    s = lambda name, input, **kw: Case(name, "subsampling2d", input, kw, weight=(input[-3],))  # noqa: E731
    samples = [
        s("n2", (2, 3, 6, 8), kernel_size=2),
        s("n3-nonsquare-image", (1, 2, 6, 9), kernel_size=3),
        s("unbatched", (2, 4, 4), kernel_size=2),
        Case("no-bias", "subsampling2d", (2, 2, 4, 4), dict(kernel_size=2), weight=(2,), bias=False),
    ]
    errors = [
        s("input-not-divisible-by-block", (1, 2, 7, 8), kernel_size=2)._replace_error((RuntimeError, r"must be divisible by kernel_size")),
        Case("weight-wrong-size", "subsampling2d", (1, 2, 4, 4), dict(kernel_size=2), weight=(3,), error=(RuntimeError, r"one per input channel")),
    ]
    return samples + errors


ALL_CASES = (conv2d_cases() + max_pool2d_cases() + avg_pool2d_cases() + conv1d_cases() + conv_transpose2d_cases()
             + adaptive_pool_cases() + dense_cases() + subsampling2d_cases())
SAMPLES = [case for case in ALL_CASES if case.error is None]
ERRORS = [case for case in ALL_CASES if case.error is not None]


# ---------------------------------------------------------------------------------------------
# Building the inputs of a case and calling it


def _fill(case: Case, shape, dtype, generator) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype, generator=generator)
    if case.fill == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if case.fill == "relu":
        return x.clamp(min=0)
    if case.fill == "nan":
        x.view(-1)[:: 7] = float("nan")
        return x
    return x


def _layout(case: Case, x: torch.Tensor) -> torch.Tensor:
    if case.layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if case.layout == "strided":
        # the same values, seen through a transposed, sliced view of a bigger tensor
        big = torch.zeros(x.shape[:-2] + (x.shape[-1], 2 * x.shape[-2]), dtype=x.dtype)
        big[..., ::2] = x.transpose(-1, -2)
        view = big[..., ::2].transpose(-1, -2)
        assert not view.is_contiguous() and torch.equal(view, x)
        return view
    return x


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0) -> List[torch.Tensor]:
    """The case's tensors: [x], [x, W(, b)] (conv, linear, subsampling), [logits, target] (loss)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [_layout(case, _fill(case, case.input, dtype, generator))]
    if case.weight is not None:
        fan_in = math.prod(case.weight[1:]) if len(case.weight) > 1 else 1
        tensors.append(_layout(case, torch.randn(case.weight, dtype=dtype, generator=generator) / math.sqrt(fan_in)))
        if case.bias:
            channels = case.weight[1] * case.kwargs.get("groups", 1) if case.op == "conv_transpose2d" else case.weight[0]
            bias_size = case.bias if isinstance(case.bias, tuple) else (channels,)
            tensors.append(torch.randn(bias_size, dtype=dtype, generator=generator))
    if case.target is not None:
        tensors.append(_target(case, dtype, generator))
    return tensors


def _target(case: Case, dtype, generator) -> torch.Tensor:
    classes = case.input[0] if len(case.input) == 1 else case.input[1]
    batch = () if len(case.input) == 1 else (case.input[0],) + tuple(case.input[2:])
    if case.target == "index":
        return torch.randint(0, classes, batch, generator=generator)
    if case.target == "index-out-of-bounds":
        return torch.full(batch, 7, dtype=torch.long)
    if case.target == "index-short":
        return torch.zeros((batch[0] - 1,), dtype=torch.long)
    if case.target == "probabilities-wrong-shape":
        return torch.rand((case.input[0], classes - 1), dtype=dtype, generator=generator)
    return torch.rand(case.input, dtype=dtype, generator=generator).softmax(dim=1 if len(case.input) > 1 else 0)


def materialize(kwargs: Dict, dtype) -> Dict:
    """Turn Rand(shape) keyword arguments into tensors (positive, seeded: the same for both libraries)."""
    generator = torch.Generator().manual_seed(1234)
    return {k: (torch.rand(v.shape, dtype=dtype, generator=generator) + 0.5 if isinstance(v, Rand) else v)
            for k, v in kwargs.items()}


def make_error_inputs(case: Case) -> List[torch.Tensor]:
    """make_inputs in float32, then spoiled as the error case says."""
    tensors = make_inputs(case, torch.float32)
    if case.corrupt == "input-float64":
        tensors[0] = tensors[0].double()
    elif case.corrupt == "bias-float64":
        tensors[2] = tensors[2].double()
    elif case.corrupt == "weight-on-meta":
        tensors[1] = tensors[1].to("meta")
    elif case.corrupt == "integer":
        tensors = [t.round().long() for t in tensors]
    return tensors


_MODULES: Dict[str, torch.nn.Module] = {}


def _conv_module(case: Case, lib: str, weight: torch.Tensor, bias) -> torch.nn.Module:
    key = f"{case}-{lib}-{bias is not None}"
    if key not in _MODULES:
        _MODULES[key] = _new_conv_module(case, lib, weight, bias)
    return _MODULES[key]


def _new_conv_module(case: Case, lib: str, weight: torch.Tensor, bias) -> torch.nn.Module:
    modules = {("conv2d", "manual"): manualconv.Conv2d, ("conv2d", "native"): torch.nn.Conv2d,
               ("conv1d", "manual"): manualconv.Conv1d, ("conv1d", "native"): torch.nn.Conv1d}
    out_channels, in_per_group, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    groups = case.kwargs.get("groups", 1)
    return modules[case.op, lib](in_per_group * groups, out_channels, kernel, padding_mode=case.padding_mode,
               bias=bias is not None, device="meta", **case.kwargs)


def _subsampling_by_tensor_ops(x, beta, bias=None, kernel_size=2):
    """The oracle for Subsampling2d (torch.nn has none): block sums by reshape + sum."""
    n = kernel_size
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    b, c, h, w = batched.shape
    down = batched.reshape(b, c, h // n, n, w // n, n).sum(dim=(3, 5))
    y = down * beta.reshape(1, -1, 1, 1) + (0 if bias is None else bias.reshape(1, -1, 1, 1))
    return y if x.dim() == 4 else y.squeeze(0)


def call(case: Case, lib: str, *tensors):
    """Run the case through manualconv (lib='manual') or torch.nn (lib='native')."""
    functional = MF if lib == "manual" else F
    kwargs = materialize(case.kwargs, tensors[0].dtype if tensors[0].is_floating_point() else torch.float32)
    if case.op in ("conv2d", "conv1d", "conv_transpose2d", "linear"):
        x, weight, bias = (list(tensors) + [None])[:3]
        if case.padding_mode != "zeros":
            module = _conv_module(case, lib, weight, bias)
            params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            return torch.func.functional_call(module, params, (x,))
        return getattr(functional, case.op)(x, weight, bias, **kwargs)
    if case.op == "subsampling2d":
        x, beta, bias = (list(tensors) + [None])[:3]
        if lib == "manual":
            return MF.subsampling2d(x, beta, bias, **kwargs)
        return _subsampling_by_tensor_ops(x, beta, bias, **kwargs)
    return getattr(functional, case.op)(*tensors, **kwargs)


def reduction_length(case: Case) -> int:
    """The longest sum any output or gradient entry of the case is made of (for error bounds)."""
    batched = len(case.input) == (3 if case.op == "conv1d" else 4)
    batch = case.input[0] if batched else 1
    spatial = math.prod(case.input[-2:]) if case.op != "conv1d" else case.input[-1]
    if case.op in ("conv2d", "conv1d", "conv_transpose2d"):
        out_channels, in_per_group = case.weight[:2]
        taps = math.prod(case.weight[2:])
        stride, dilation = case.kwargs.get("stride", 1), case.kwargs.get("dilation", 1)
        growth = math.prod(stride) if isinstance(stride, tuple) else stride ** 2
        growth *= (max(dilation) if isinstance(dilation, tuple) else dilation) ** 2 * taps
        return max(in_per_group * taps + 1, out_channels * taps, batch * spatial * growth)
    if case.op == "linear":
        return max(case.weight[1] + 1, math.prod(case.input[:-1]), case.weight[0])
    if case.op in ("adaptive_max_pool2d", "adaptive_avg_pool2d", "subsampling2d"):
        return batch * spatial + 1
    kernel = case.kwargs["kernel_size"]
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return kh * kw + 1
