"""The table every op test is generated from: one ``OpRecord`` per op, in the spirit of
PyTorch's OpInfo, all in the registry ``OPS``; the tests iterate the registry and never name an op.

How to add an op: write its implementation, then one ``OpRecord`` in ``OPS`` (bottom of this
file). Its fields:

- ``name``, ``manual`` (manualconv.functional's function), ``native`` (torch.nn.functional's, or
  an oracle written as plain tensor ops where torch.nn has none), ``args`` (the tensor arguments
  in call order, e.g. ('input', 'weight', 'bias'), ('input', 'target'), ('input',)) and
  ``make_args`` (builds them for a case: ``input_only``, ``input_weight_bias(...)``,
  ``logits_and_target``). Both functions are called as ``f(*args, **case.kwargs)``, missing
  trailing arguments (no bias) as None.
- ``cases``: its samples (``Case`` with ``error=None``) and bad-input cases (``error`` set).
- ``bound``: 'linear' (linear in each argument: the rigorous float32 bound of oracle.py, with
  Σ|terms| = the op on |inputs|), 'max' (max-like: exact output, gradients routed deltas) or
  None (compared with torch.testing's float32 defaults); ``reduction_length(case)``: the longest
  sum in any output or gradient entry (the n of the bound; needed unless ``bound`` is None).
- ``kernels``: the torch.ops.manualconv operators its cases run (test_library records the calls
  and opchecks them on the samples named in ``opcheck``); ``bias_kernels``: those only a case with
  a bias runs, on the CPU only (a CUDA tensor's takes reference.py's formula); ``kernel_errors``:
  bad backward inputs each kernel must reject.
- ``dtypes``: device → the dtypes it is tested in there ('cuda' present: test_cuda runs every
  sample on the CUDA kernels, and gradcheck on those named in ``cuda_gradcheck``); ``backends``:
  the manualconv backends its tests run under.
- ``modules``: {'manual': class, 'native': class} where they exist; ``module_from_case`` builds
  one for a case whose ``padding_mode`` only the modules have; ``module_samples`` and
  ``module_errors`` feed test_modules' drop-in checks.
- ``channels_last``: the cpp kernels return channels-last results for channels-last input, as
  torch's do (conv and every pool) (test_ops checks it on the channels-last samples).

A ``Case`` is one call of one op: valid samples (``error is None``) feed gradcheck,
gradgradcheck and the float32 comparisons with torch.nn; error samples (``error`` set) feed the
bad-input tests. ``call(case, lib, ...)`` runs the same call through manualconv (``lib='manual'``)
or the native twin (``lib='native'``): both share one signature, so every comparison is of
identical calls.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF
from manualconv.backend import BACKENDS


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the name of its OpRecord in OPS
    input: Tuple[int, ...]
    kwargs: Dict = field(default_factory=dict)
    weight: Optional[Tuple[int, ...]] = None  # the second tensor argument's size (conv or linear weight, subsampling β)
    bias: bool = True  # with a bias (ops with a weight); a tuple: the bias's (wrong) size
    padding_mode: str = "zeros"  # other modes exist on the modules only: the case runs through the record's module
    fill: str = "randn"  # 'randn' | 'zeros' | 'relu' (half the entries tie at 0) | 'nan'
    layout: str = "contiguous"  # 'contiguous' | 'channels_last' | 'strided' (a non-contiguous view)
    error: Optional[Tuple[type, str]] = None  # (exception type, regex the message must match)
    torch_error: Optional[type] = None  # the type torch raises, where it differs (see note)
    target: Optional[str] = None  # losses: 'index' | 'probabilities' (| spoiled variants)
    corrupt: Optional[str] = None  # error cases: '<arg>-float64' | '<arg>-on-meta' | 'integer' (every tensor)

    def __str__(self) -> str:
        return f"{self.op}-{self.name}"

    def _replace_error(self, error) -> "Case":
        return dataclasses.replace(self, error=error)


@dataclass(frozen=True)
class Rand:
    """A keyword argument that is a tensor (e.g. cross_entropy's class weights): positive random
    values of this shape, the same for every library, made when the case is called."""

    shape: Tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# The cases of each op


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
        # at least 16 input channels, NCHW: where the direct tiles outrun the BLAS (AMD Zen 5) these
        # run the direct kernel on channels-last copies (select_conv2d_kernel; the strided input
        # gradient and the strided 1×1 stay NCHW); tests/test_cpu_capability.py runs them both ways
        c("nchw-16-channels", (2, 16, 6, 7), (16, 16, 3, 3), padding=1),
        c("nchw-16-channels-strided", (2, 16, 7, 9), (32, 16, 3, 3), bias=False, stride=2, padding=1),
        c("nchw-16-channels-1x1", (2, 16, 4, 5), (24, 16, 1, 1)),
        c("nchw-16-channels-1x1-strided", (2, 16, 5, 5), (16, 16, 1, 1), stride=2),
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
        # the depthwise kernels (csrc/conv2d_depthwise.cpp: groups = C = O, either layout): strides,
        # dilation, padding past the kernel's reach, a non-square kernel, an odd channel count
        c("depthwise-5x5-stride2-dilated", (2, 5, 11, 10), (5, 1, 5, 5), groups=5, stride=2, padding=3, dilation=(2, 1)),
        Case("channels-last-depthwise", "conv2d", (2, 19, 7, 9), dict(groups=19, stride=(2, 1), padding=1), weight=(19, 1, 3, 3), layout="channels_last"),
        Case("channels-last-depthwise-3x2", "conv2d", (1, 40, 6, 5), dict(groups=40, padding=(0, 2)), weight=(40, 1, 3, 2), bias=False, layout="channels_last"),
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
        # C not a multiple of the vector width (a remainder loop), batch 1; ties at 0 everywhere
        Case("channels-last-odd-channels-batch1", "max_pool2d", (1, 19, 7, 7), dict(kernel_size=3, stride=2, return_indices=True), layout="channels_last"),
        Case("channels-last-ties-zeros", "max_pool2d", (2, 5, 6, 6), dict(kernel_size=3, stride=2, padding=1, return_indices=True), fill="zeros", layout="channels_last"),
        Case("non-contiguous", "max_pool2d", (2, 3, 7, 6), dict(kernel_size=3, stride=2, return_indices=True), layout="strided"),
    ]
    e = lambda name, input, error, **kw: Case(name, "max_pool2d", input, kw, error=error)  # noqa: E731
    errors = [
        e("rank2", (6, 6), (RuntimeError, r"3D \(C, H, W\) or 4D"), kernel_size=2),
        e("rank5", (1, 1, 1, 6, 6), (RuntimeError, r"3D \(C, H, W\) or 4D"), kernel_size=2),
        e("empty-channels", (2, 0, 6, 6), (RuntimeError, r"non-empty"), kernel_size=2),
        e("padding-over-half-kernel", (1, 2, 8, 8), (RuntimeError, r"pad should be at most half of kernel size, but got pad=2, kernel_size=3"), kernel_size=3, padding=2),
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
        # the channels-last kernels (csrc/avg_pool2d.cpp): every divisor rule, windows clipped by
        # padding and ceil mode, overlapping and strided windows, C not a multiple of the vector
        # width, batch 1
        Case("channels-last-padding-exclude-ceil", "avg_pool2d", (2, 5, 9, 9), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), layout="channels_last"),
        Case("channels-last-padding-include-ceil", "avg_pool2d", (2, 5, 8, 8), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), layout="channels_last"),
        Case("channels-last-divisor-override-batch1", "avg_pool2d", (1, 17, 7, 7), dict(kernel_size=2, ceil_mode=True, divisor_override=3), layout="channels_last"),
        Case("channels-last-nonsquare-overlap", "avg_pool2d", (2, 19, 7, 8), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)), layout="channels_last"),
        Case("channels-last-ceil-drop-last", "avg_pool2d", (2, 3, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True), layout="channels_last"),
        Case("non-contiguous", "avg_pool2d", (2, 3, 7, 6), dict(kernel_size=3, stride=2, padding=1), layout="strided"),
    ]
    e = lambda name, input, error, **kw: Case(name, "avg_pool2d", input, kw, error=error)  # noqa: E731
    errors = [
        # torch raises IndexError here (a side effect of indexing dim -3); a rank check raises RuntimeError
        Case("rank2", "avg_pool2d", (6, 6), dict(kernel_size=2), error=(RuntimeError, r"3D \(C, H, W\) or 4D"), torch_error=IndexError),
        e("rank5", (1, 1, 1, 6, 6), (RuntimeError, r"3D \(C, H, W\) or 4D"), kernel_size=2),
        e("padding-over-half-kernel", (1, 2, 8, 8), (RuntimeError, r"pad should be at most half of kernel size, but got pad=2, kernel_size=3"), kernel_size=3, padding=2),
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




def adaptive_pool_cases(op: str) -> List[Case]:
    """The cases adaptive max and average pooling share."""
    a = lambda name, input, **kw: Case(name, op, input, kw)  # noqa: E731
    samples = [
        a("divisible", (2, 3, 8, 8), output_size=4),
        a("overlapping-windows", (2, 2, 7, 9), output_size=(3, 4)),
        a("larger-than-input", (1, 2, 3, 5), output_size=(5, 7)),
        a("global", (2, 3, 5, 6), output_size=1),
        a("none-entry", (1, 2, 6, 7), output_size=(None, 3)),
        a("unbatched", (2, 7, 7), output_size=3),
        Case("channels-last", op, (2, 3, 6, 6), dict(output_size=4), layout="channels_last"),
        # the channels-last kernels (csrc/adaptive_pool2d.cpp): overlapping windows, windows of
        # one pixel repeated (output larger than the input), C not a multiple of the vector
        # width, batch 1
        Case("channels-last-overlapping-windows", op, (2, 17, 7, 9), dict(output_size=(3, 4)), layout="channels_last"),
        Case("channels-last-larger-than-input-batch1", op, (1, 5, 3, 5), dict(output_size=(5, 7)), layout="channels_last"),
        Case("channels-last-one-row", op, (2, 9, 6, 7), dict(output_size=(1, 3)), layout="channels_last"),
    ]
    errors = [
        Case("rank2", op, (6, 6), dict(output_size=2), error=(RuntimeError, r"3D \(C, H, W\) or 4D")),
        Case("negative-output-size", op, (1, 2, 6, 6), dict(output_size=(-1, 2)), error=(RuntimeError, r"greater than or equal to 0")),
        Case("output-size-three-values", op, (1, 2, 6, 6), dict(output_size=(2, 2, 2)), error=(RuntimeError, r"output_size")),
    ]
    return samples + errors


def adaptive_max_pool2d_cases() -> List[Case]:
    return adaptive_pool_cases("adaptive_max_pool2d") + [
        Case("ties-relu", "adaptive_max_pool2d", (2, 2, 7, 7), dict(output_size=3, return_indices=True), fill="relu"),
        Case("nan", "adaptive_max_pool2d", (2, 2, 7, 7), dict(output_size=3, return_indices=True), fill="nan"),
        Case("return-indices", "adaptive_max_pool2d", (2, 2, 9, 5), dict(output_size=(4, 2), return_indices=True)),
        # NCHW with more planes (15, 18) than the samples above, ties and NaN spread over them
        Case("plane-groups-ties-relu", "adaptive_max_pool2d", (3, 5, 7, 7), dict(output_size=3, return_indices=True), fill="relu"),
        Case("plane-groups-nan", "adaptive_max_pool2d", (2, 9, 7, 9), dict(output_size=(3, 4), return_indices=True), fill="nan"),
        Case("channels-last-ties-relu", "adaptive_max_pool2d", (2, 19, 7, 7), dict(output_size=3, return_indices=True), fill="relu", layout="channels_last"),
        Case("channels-last-ties-zeros", "adaptive_max_pool2d", (1, 6, 6, 5), dict(output_size=(4, 3), return_indices=True), fill="zeros", layout="channels_last"),
        Case("channels-last-nan", "adaptive_max_pool2d", (2, 3, 7, 7), dict(output_size=3, return_indices=True), fill="nan", layout="channels_last"),
    ]


def adaptive_avg_pool2d_cases() -> List[Case]:
    return adaptive_pool_cases("adaptive_avg_pool2d")


def linear_cases() -> List[Case]:
    return [
        Case("2d", "linear", (4, 6), weight=(3, 6)),
        Case("3d-no-bias", "linear", (2, 3, 5), weight=(4, 5), bias=False),
        Case("1d", "linear", (5,), weight=(2, 5)),
        Case("in-features-mismatch", "linear", (4, 6), weight=(3, 5), error=(RuntimeError, r"in_features=5")),
        Case("bias-broadcast-scalar-like", "linear", (4, 6), weight=(3, 6), bias=(1,)),  # torch broadcasts b to z
        Case("bias-per-row", "linear", (4, 6), weight=(3, 6), bias=(4, 3)),
        Case("bias-wrong-size", "linear", (4, 6), weight=(3, 6), bias=(5,),
             error=(RuntimeError, r"bias of size \[5\] does not broadcast")),
        Case("bias-too-many-dims", "linear", (4, 6), weight=(3, 6), bias=(2, 4, 3),
             error=(RuntimeError, r"bias of size \[2, 4, 3\] does not broadcast")),
    ]


def activation_cases(op: str) -> List[Case]:
    return [Case("4d", op, (2, 3, 4, 5))]


def cross_entropy_cases() -> List[Case]:
    samples = [
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
        Case("target-out-of-bounds", "cross_entropy", (3, 5), target="index-out-of-bounds", error=(IndexError, r"Target 7 is out of bounds")),
        Case("batch-mismatch", "cross_entropy", (3, 5), target="index-short", error=(ValueError, r"Expected input batch_size \(3\) to match target batch_size \(2\)")),
        Case("weight-wrong-size", "cross_entropy", (3, 5), dict(weight=Rand((4,))), target="index", error=(RuntimeError, r"weight tensor should be defined either for all 5 classes")),
        Case("label-smoothing-above-1", "cross_entropy", (3, 5), dict(label_smoothing=1.5), target="index", error=(RuntimeError, r"label_smoothing must be between 0.0 and 1.0")),
        Case("unknown-reduction", "cross_entropy", (3, 5), dict(reduction="avg"), target="index", error=(ValueError, r"avg is not a valid value for reduction")),
        Case("float-target-wrong-shape", "cross_entropy", (3, 5), target="probabilities-wrong-shape", error=(RuntimeError, r"probability targets must have the input.s size")),
    ]
    return samples + errors


def dense_cases() -> List[Case]:
    """Linear, the activations and the loss: the rest of a network's backward pass (their
    records' cases together; docs/derivation.md cites this name)."""
    return linear_cases() + [c for op in ("relu", "sigmoid", "tanh") for c in activation_cases(op)] + cross_entropy_cases()


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



# ---------------------------------------------------------------------------------------------
# Building the inputs of a case


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


def input_only(case: Case, dtype, generator) -> List[torch.Tensor]:
    """[x]: random (or as case.fill says), in case.layout."""
    return [_layout(case, _fill(case, case.input, dtype, generator))]


def input_weight_bias(bias_channels: Callable[[Case], int] = lambda case: case.weight[0]):
    """[x, W(, b)]: W of size case.weight scaled by 1/√fan-in, b (if case.bias) of
    bias_channels(case) entries, or of the size case.bias gives."""

    def make(case: Case, dtype, generator) -> List[torch.Tensor]:
        tensors = input_only(case, dtype, generator)
        fan_in = math.prod(case.weight[1:]) if len(case.weight) > 1 else 1
        tensors.append(_layout(case, torch.randn(case.weight, dtype=dtype, generator=generator) / math.sqrt(fan_in)))
        if case.bias:
            bias_size = case.bias if isinstance(case.bias, tuple) else (bias_channels(case),)
            tensors.append(torch.randn(bias_size, dtype=dtype, generator=generator))
        return tensors

    return make


def logits_and_target(case: Case, dtype, generator) -> List[torch.Tensor]:
    """[logits, target]: the target as case.target says (class indices or probabilities)."""
    return input_only(case, dtype, generator) + [_target(case, dtype, generator)]


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


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0) -> List[torch.Tensor]:
    """The case's tensors, in the order of its record's ``args``."""
    return record_of(case).make_args(case, dtype, torch.Generator().manual_seed(seed))


def materialize(kwargs: Dict, dtype) -> Dict:
    """Turn Rand(shape) keyword arguments into tensors (positive, seeded: the same for both libraries)."""
    generator = torch.Generator().manual_seed(1234)
    return {k: (torch.rand(v.shape, dtype=dtype, generator=generator) + 0.5 if isinstance(v, Rand) else v)
            for k, v in kwargs.items()}


def make_error_inputs(case: Case) -> List[torch.Tensor]:
    """make_inputs in float32, then spoiled as case.corrupt says."""
    tensors = make_inputs(case, torch.float32)
    if case.corrupt == "integer":
        return [t.round().long() for t in tensors]
    if case.corrupt is not None:
        name, spoil = case.corrupt.split("-", 1)
        i = record_of(case).args.index(name)
        tensors[i] = {"float64": lambda t: t.double(), "on-meta": lambda t: t.to("meta")}[spoil](tensors[i])
    return tensors


# ---------------------------------------------------------------------------------------------
# Calling a case


_MODULES: Dict[str, torch.nn.Module] = {}


def conv_module(cls, case: Case, args: Sequence[Optional[torch.Tensor]]) -> torch.nn.Module:
    """The Conv module (class cls) whose parameters have the sizes of the case's W and b."""
    weight, bias = args[1], args[2]
    out_channels, in_per_group, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    groups = case.kwargs.get("groups", 1)
    return cls(in_per_group * groups, out_channels, kernel, padding_mode=case.padding_mode,
               bias=bias is not None, device="meta", **case.kwargs)


def _module_call(record: "OpRecord", case: Case, lib: str, args: List[Optional[torch.Tensor]]):
    """The case through the record's module: its parameters are the arguments after the input."""
    key = f"{case}-{lib}-{[a is not None for a in args]}"
    if key not in _MODULES:
        _MODULES[key] = record.module_from_case(record.modules[lib], case, args)
    params = {name: t for name, t in zip(record.args[1:], args[1:]) if t is not None}
    return torch.func.functional_call(_MODULES[key], params, (args[0],))


def _subsampling_by_tensor_ops(x, beta, bias=None, kernel_size=2):
    """The oracle for Subsampling2d (torch.nn has none): block sums by reshape + sum."""
    n = kernel_size
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    b, c, h, w = batched.shape
    down = batched.reshape(b, c, h // n, n, w // n, n).sum(dim=(3, 5))
    y = down * beta.reshape(1, -1, 1, 1) + (0 if bias is None else bias.reshape(1, -1, 1, 1))
    return y if x.dim() == 4 else y.squeeze(0)


def call(case: Case, lib: str, *tensors):
    """Run the case through manualconv (lib='manual') or its native twin (lib='native')."""
    record = record_of(case)
    args = list(tensors) + [None] * (len(record.args) - len(tensors))  # no bias: None
    if case.padding_mode != "zeros":
        return _module_call(record, case, lib, args)
    kwargs = materialize(case.kwargs, tensors[0].dtype if tensors[0].is_floating_point() else torch.float32)
    return (record.manual if lib == "manual" else record.native)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Reduction lengths: the longest sum any output or gradient entry of a case is made of (the n of
# the float32 error bound, oracle.py)


def _batch_and_spatial(case: Case, spatial_dims: int) -> Tuple[int, int]:
    batched = len(case.input) == spatial_dims + 2
    return (case.input[0] if batched else 1), math.prod(case.input[-spatial_dims:])


def conv_reduction_length(spatial_dims: int) -> Callable[[Case], int]:
    """Forward: C_in/groups·taps products + bias; δx: C_out·taps; ∂J/∂W: every output pixel of
    the batch (input pixels × stride and dilation growth × taps bounds it)."""

    def n(case: Case) -> int:
        batch, spatial = _batch_and_spatial(case, spatial_dims)
        out_channels, in_per_group = case.weight[:2]
        taps = math.prod(case.weight[2:])
        stride, dilation = case.kwargs.get("stride", 1), case.kwargs.get("dilation", 1)
        growth = math.prod(stride) if isinstance(stride, tuple) else stride ** 2
        growth *= (max(dilation) if isinstance(dilation, tuple) else dilation) ** 2 * taps
        return max(in_per_group * taps + 1, out_channels * taps, batch * spatial * growth)

    return n


def linear_reduction_length(case: Case) -> int:
    """Forward: in_features products + bias; ∂J/∂W: every sample; δx: out_features."""
    return max(case.weight[1] + 1, math.prod(case.input[:-1]), case.weight[0])


def whole_plane_reduction_length(case: Case) -> int:
    """Adaptive windows and parameters summed over the batch and the plane: at most all of it."""
    batch, spatial = _batch_and_spatial(case, 2)
    return batch * spatial + 1


def window_reduction_length(case: Case) -> int:
    """A pooling window's entries (+1 for the divide)."""
    kernel = case.kwargs["kernel_size"]
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return kh * kw + 1


# ---------------------------------------------------------------------------------------------
# The records


@dataclass(frozen=True)
class ModuleSample:
    """A module built as modules[lib](*args, **kwargs) from the same seed, called on an input of size `input`."""

    name: str
    args: Tuple
    kwargs: Dict
    input: Tuple[int, ...]


@dataclass(frozen=True)
class ModuleError:
    """Constructor arguments both modules reject with error = (exception type, message regex)."""

    name: str
    kwargs: Dict
    error: Tuple[type, str]


@dataclass(frozen=True)
class KernelError:
    """A kernel (name in manualconv.backend.kernels(backend)) called on args() must raise
    RuntimeError matching pattern: the kernels check backward's inputs too."""

    name: str
    kernel: str
    args: Callable[[], tuple]
    pattern: str


CPU = (torch.float64, torch.float32)
CPU_AND_CUDA = {"cpu": CPU, "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
CONV2D_KERNELS = ("conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight")


@dataclass(frozen=True)
class OpRecord:
    """Everything the tests know about one op (see "How to add an op" at the top)."""

    name: str
    manual: Callable
    native: Callable
    args: Tuple[str, ...]
    make_args: Callable[[Case, torch.dtype, torch.Generator], List[torch.Tensor]]
    cases: Tuple[Case, ...]
    bound: Optional[str]  # 'linear' | 'max' | None
    reduction_length: Optional[Callable[[Case], int]] = None
    kernels: Tuple[str, ...] = ()
    bias_kernels: Tuple[str, ...] = ()
    kernel_errors: Tuple[KernelError, ...] = ()
    opcheck: FrozenSet[str] = frozenset()
    dtypes: Dict[str, Tuple[torch.dtype, ...]] = field(default_factory=lambda: {"cpu": CPU})
    cuda_gradcheck: FrozenSet[str] = frozenset()
    backends: Tuple[str, ...] = BACKENDS
    modules: Dict[str, type] = field(default_factory=dict)
    module_from_case: Optional[Callable] = None
    module_samples: Tuple[ModuleSample, ...] = ()
    module_errors: Tuple[ModuleError, ...] = ()
    channels_last: bool = False

    @property
    def samples(self) -> List[Case]:
        return [case for case in self.cases if case.error is None]

    @property
    def errors(self) -> List[Case]:
        return [case for case in self.cases if case.error is not None]

    def check(self) -> None:
        """The record is consistent (a misspelt sample name would silently drop a test)."""
        names = {case.name for case in self.samples}
        assert all(case.op == self.name for case in self.cases), f"{self.name}: a case of another op"
        assert self.opcheck <= names and self.cuda_gradcheck <= names, f"{self.name}: unknown sample names"
        assert self.bound in ("linear", "max", None), f"{self.name}: bound={self.bound!r}"
        assert self.bound is None or self.reduction_length is not None, f"{self.name}: bound without reduction_length"
        assert not self.opcheck or self.kernels, f"{self.name}: opcheck without kernels"
        assert "cuda" not in self.dtypes or self.kernels, f"{self.name}: CUDA without kernels"
        assert not self.module_samples or self.modules.keys() == {"manual", "native"}, f"{self.name}: modules"
        assert self.module_from_case or all(case.padding_mode == "zeros" for case in self.cases), \
            f"{self.name}: a padding_mode case without module_from_case"


def _pool(name: str, cases, bound: str, reduction_length, kernels, manual_module, native_module, **extra) -> OpRecord:
    """A pooling op: one input, CPU and CUDA kernels."""
    return OpRecord(name, getattr(MF, name), getattr(F, name), ("input",), input_only, tuple(cases), bound,
                    reduction_length, kernels, dtypes=CPU_AND_CUDA,
                    modules={"manual": manual_module, "native": native_module}, **extra)


def _pointwise(name: str, manual_module, native_module) -> OpRecord:
    """An activation: one input, plain tensor code (no kernels), torch.testing's float32 tolerances."""
    return OpRecord(name, getattr(MF, name), getattr(F, name), ("input",), input_only, tuple(activation_cases(name)),
                    bound=None, modules={"manual": manual_module, "native": native_module})


_RECORDS = [
    OpRecord(
        "conv2d", MF.conv2d, F.conv2d, ("input", "weight", "bias"), input_weight_bias(), tuple(conv2d_cases()),
        "linear", conv_reduction_length(2), CONV2D_KERNELS, bias_kernels=("conv2d_grad_bias",),
        kernel_errors=(
            KernelError("grad-input-wrong-delta", "conv2d_grad_input",
                        lambda: (torch.randn(1, 2, 5, 5), torch.randn(2, 3, 3, 3), [1, 3, 8, 8], [1, 1], [0, 0], [1, 1], 1), r"grad_output"),
            KernelError("grad-weight-wrong-delta", "conv2d_grad_weight",
                        lambda: (torch.randn(1, 3, 8, 8), torch.randn(1, 2, 5, 5), [2, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1), r"grad_output"),
        ),
        opcheck=frozenset({"k3-pad1", "dilation3-stride2", "depthwise-multiplier", "no-bias", "channels-last-depthwise",
                           "channels-last-strided-dilated-groups", "channels-last-1x1", "channels-last-direct-16"}),
        dtypes=CPU_AND_CUDA,
        cuda_gradcheck=frozenset({"stride2", "dilation3-stride2", "groups2", "1x1-stride1", "no-bias"}),
        modules={"manual": manualconv.Conv2d, "native": torch.nn.Conv2d}, module_from_case=conv_module,
        module_samples=(
            ModuleSample("conv-default", (3, 8, 3), {}, (2, 3, 9, 9)),
            ModuleSample("conv-options", (4, 6, (3, 2)), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=False), (2, 4, 9, 8)),
            ModuleSample("conv-same", (3, 4, 4), dict(padding="same"), (1, 3, 7, 7)),
            ModuleSample("conv-reflect", (3, 4, 3), dict(padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
            ModuleSample("conv-replicate", (3, 4, 3), dict(padding=2, padding_mode="replicate", stride=2), (2, 3, 6, 6)),
            ModuleSample("conv-circular", (3, 4, 3), dict(padding=1, padding_mode="circular"), (2, 3, 6, 6)),
        ),
        module_errors=(
            ModuleError("in-channels-not-divisible", dict(in_channels=5, out_channels=6, kernel_size=3, groups=2), (ValueError, "in_channels must be divisible by groups")),
            ModuleError("out-channels-not-divisible", dict(in_channels=4, out_channels=5, kernel_size=3, groups=2), (ValueError, "out_channels must be divisible by groups")),
            ModuleError("same-with-stride", dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding="same"), (ValueError, "padding='same' is not supported for strided")),
            ModuleError("bad-padding-mode", dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode="mirror"), (ValueError, "padding_mode must be one of")),
        ),
        channels_last=True,
    ),
    _pool(
        "max_pool2d", max_pool2d_cases(), "max", window_reduction_length, ("max_pool2d_forward", "max_pool2d_backward"),
        manualconv.MaxPool2d, torch.nn.MaxPool2d,
        kernel_errors=(
            KernelError("max-backward-wrong-indices", "max_pool2d_backward",
                        lambda: (torch.randn(1, 2, 4, 4), torch.zeros(1, 2, 3, 3, dtype=torch.long), [1, 2, 8, 8]), r"indices"),
            KernelError("max-backward-index-out-of-plane", "max_pool2d_backward",
                        lambda: (torch.randn(1, 2, 4, 4), torch.full((1, 2, 4, 4), 64, dtype=torch.long), [1, 2, 8, 8]), r"indices"),
        ),
        opcheck=frozenset({"ceil-mode-padding", "dilation2", "channels-last-padding-dilation-ceil"}),
        cuda_gradcheck=frozenset({"padding", "ceil-mode-padding"}),
        module_samples=(
            ModuleSample("maxpool", (3,), dict(stride=2, padding=1, ceil_mode=True), (2, 3, 8, 8)),
            ModuleSample("maxpool-indices", (2,), dict(return_indices=True, dilation=2), (2, 3, 8, 8)),
        ),
        channels_last=True,
    ),
    _pool(
        "avg_pool2d", avg_pool2d_cases(), "linear", window_reduction_length, ("avg_pool2d_forward", "avg_pool2d_backward"),
        manualconv.AvgPool2d, torch.nn.AvgPool2d,
        kernel_errors=(
            KernelError("avg-backward-wrong-delta", "avg_pool2d_backward",
                        lambda: (torch.randn(1, 2, 3, 3), [1, 2, 8, 8], [2, 2], [2, 2], [0, 0], False, True, None), r"grad_output"),
        ),
        opcheck=frozenset({"padding-exclude", "divisor-override-ceil", "channels-last-padding-exclude-ceil"}),
        cuda_gradcheck=frozenset({"ceil-mode-padding-exclude", "divisor-override"}),
        module_samples=(
            ModuleSample("avgpool", (3,), dict(stride=2, padding=1, count_include_pad=False), (2, 3, 8, 8)),
            ModuleSample("avgpool-divisor", (2,), dict(divisor_override=3, ceil_mode=True), (2, 3, 7, 7)),
        ),
        channels_last=True,
    ),
    OpRecord(
        "conv1d", MF.conv1d, F.conv1d, ("input", "weight", "bias"), input_weight_bias(), tuple(conv1d_cases()),
        "linear", conv_reduction_length(1), CONV2D_KERNELS, bias_kernels=("conv2d_grad_bias",), dtypes=CPU_AND_CUDA,
        cuda_gradcheck=frozenset({"stride2-dilation2"}),
        modules={"manual": manualconv.Conv1d, "native": torch.nn.Conv1d}, module_from_case=conv_module,
    ),
    OpRecord(
        "conv_transpose2d", MF.conv_transpose2d, F.conv_transpose2d, ("input", "weight", "bias"),
        input_weight_bias(bias_channels=lambda case: case.weight[1] * case.kwargs.get("groups", 1)),
        tuple(conv_transpose2d_cases()), "linear", conv_reduction_length(2), CONV2D_KERNELS, dtypes=CPU_AND_CUDA,
        cuda_gradcheck=frozenset({"stride2-padding1-output-padding1"}),
        modules={"manual": manualconv.ConvTranspose2d, "native": torch.nn.ConvTranspose2d},
    ),
    _pool(
        "adaptive_max_pool2d", adaptive_max_pool2d_cases(), "max", whole_plane_reduction_length,
        ("adaptive_max_pool2d_forward", "max_pool2d_backward"), manualconv.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool2d,
        opcheck=frozenset({"channels-last-overlapping-windows"}),
        cuda_gradcheck=frozenset({"overlapping-windows"}),
        channels_last=True,
    ),
    _pool(
        "adaptive_avg_pool2d", adaptive_avg_pool2d_cases(), "linear", whole_plane_reduction_length,
        ("adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward"), manualconv.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool2d,
        opcheck=frozenset({"channels-last-overlapping-windows"}),
        cuda_gradcheck=frozenset({"overlapping-windows"}),
        channels_last=True,
    ),
    OpRecord(
        "linear", MF.linear, F.linear, ("input", "weight", "bias"), input_weight_bias(), tuple(linear_cases()),
        "linear", linear_reduction_length, ("linear_backward",),
        kernel_errors=(
            KernelError("backward-wrong-delta", "linear_backward",
                        lambda: (torch.randn(4, 2), torch.randn(4, 6), torch.randn(3, 6)), r"grad_output must have .* size \[4, 3\]"),
            KernelError("backward-in-features", "linear_backward",
                        lambda: (torch.randn(4, 3), torch.randn(4, 6), torch.randn(3, 5)), r"input of size \[4, 6\] does not fit weight"),
            KernelError("backward-not-matrices", "linear_backward",
                        lambda: (torch.randn(4, 3), torch.randn(2, 2, 6), torch.randn(3, 6)), r"must be matrices"),
        ),
        opcheck=frozenset({"2d", "3d-no-bias", "1d", "bias-per-row"}),
        modules={"manual": manualconv.Linear, "native": torch.nn.Linear},
    ),
    _pointwise("relu", manualconv.ReLU, torch.nn.ReLU),
    _pointwise("sigmoid", manualconv.Sigmoid, torch.nn.Sigmoid),
    _pointwise("tanh", manualconv.Tanh, torch.nn.Tanh),
    OpRecord(
        "cross_entropy", MF.cross_entropy, F.cross_entropy, ("input", "target"), logits_and_target,
        tuple(cross_entropy_cases()), bound=None,
        modules={"manual": manualconv.CrossEntropyLoss, "native": torch.nn.CrossEntropyLoss},
    ),
    OpRecord(
        "subsampling2d", MF.subsampling2d, _subsampling_by_tensor_ops, ("input", "weight", "bias"),
        input_weight_bias(), tuple(subsampling2d_cases()), "linear", whole_plane_reduction_length,
        ("avg_pool2d_forward", "avg_pool2d_backward"), dtypes=CPU_AND_CUDA, cuda_gradcheck=frozenset({"n2"}),
        modules={"manual": manualconv.Subsampling2d},
    ),
]
for _record in _RECORDS:
    _record.check()
OPS: Dict[str, OpRecord] = {record.name: record for record in _RECORDS}

ALL_CASES = [case for record in OPS.values() for case in record.cases]
SAMPLES = [case for case in ALL_CASES if case.error is None]
ERRORS = [case for case in ALL_CASES if case.error is not None]


def record_of(case: Case) -> OpRecord:
    return OPS[case.op]


def backend_params(record: OpRecord, values: tuple, id: str) -> list:
    """pytest parameters (*values, backend) for each of the record's backends, for
    ``parametrize(..., indirect=["backend"])`` (conftest's backend fixture selects it)."""
    return [pytest.param(*values, backend, id=f"{backend}-{id}") for backend in record.backends]


def per_backend(cases: Sequence[Case]) -> list:
    """(case, backend) parameters: every case under each of its op's backends."""
    return [p for case in cases for p in backend_params(record_of(case), (case,), str(case))]
