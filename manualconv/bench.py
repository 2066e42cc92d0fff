"""Benchmark: manualconv against torch.nn, forward + backward, in one process.

    python -m manualconv.bench [--batch 128] [--repeat 7] [--seconds 0.5] [--only conv|pool|other|bfloat16|model|per_sample] [--markdown FILE]

For each layer of a fixed suite of CIFAR-size layers (ResNet-20 and VGG-style 3×3 convs at
32², 16², 8², a stride-2 conv, 1×1 convs, ResNet-20's convs again in channels-last (NHWC)
layout, 2×2 and 3×3 pools, then the rest of the layer family:
adaptive pools, every pool again on channels-last input, a transposed conv, a 1-D conv, a linear
layer, the norms, dropout, GELU and ReLU), native and manualconv steps are run alternately, so both see the same machine state; the
median of the repeats is reported (at least --repeat pairs, more until each side has run --seconds).
ratio = native time / manualconv time (above 1: manualconv is faster). Conv rows also give
GFLOP/s: forward + grad-input + grad-weight are 3 × 2·N·O·(C/g)·kH·kW·H_out·W_out flops, and
their share of this machine's SGEMM rate (a square float32 matmul, measured first, all threads).

Then whole training steps (zero_grad, forward, cross-entropy, backward, SGD-with-momentum step)
of ResNet-20 (batch 128) and train.py's default airbench net (batch 512), channels-last as
train.py runs them: torch.nn against the same model passed through ``manualconv.convert``.
Peak memory is the high-water mark, above the step's start, of the bytes the CPU allocator
handed out during one step (recorded by torch.profiler), so native and manualconv are measured
the same way; ratio = manualconv / native there (below 1: manualconv uses less).

Then per-sample gradients (DP-SGD's step before clipping): forward + backward of ResNet-20 with
GroupNorm (Opacus's ModuleValidator.fix of the BatchNorm net) at batch 128, channels-last, wrapped in
opacus.GradSampleModule, so every parameter gets its (N, *shape) grad_sample: Opacus on the
torch.nn model (its unfold + einsum conv sampler) against Opacus on the converted model
(manualconv.per_sample's samplers: one per-sample grad-weight kernel call per conv, a GEMM per
(sample, group) written into the result, with the 'cpp' backend); time ratio
native / manualconv, peak-memory ratio manualconv / native as above; then each of ResNet-20's
conv shapes' sampler alone (the per-sample weight gradient from captured activations and deltas).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import functional as MF
from . import models
from .backend import get_backend, use_backend
from .convert import convert
from .ops import cpu_capability, empty_cache, output_cache_info, tiles_outrun_blas


@dataclass
class Layer:
    name: str
    kind: str  # 'conv' (GFLOP/s reported) | 'pool' | 'other' | 'bfloat16' (KINDS)
    op: str  # the function's name in both torch.nn.functional and manualconv.functional
    input: tuple  # sizes without the batch
    kwargs: dict
    weight: Optional[tuple] = None
    channels_last: bool = False  # input, weight and δ in NHWC (the channels-last kernels)
    dtype: torch.dtype = torch.float32  # input, weight and δ (both libraries run in it)

    def flops(self, batch: int) -> float:
        """forward + grad-input + grad-weight: 3 × 2 multiply-adds per (output, tap, input channel)."""
        if self.kind != "conv":
            return 0.0
        x = torch.empty(batch, *self.input, device="meta")
        y = getattr(F, self.op)(x, torch.empty(self.weight, device="meta"), **self.kwargs)
        per_output = self.weight[1] * math.prod(self.weight[2:])
        if self.op == "conv_transpose2d":  # each input entry meets (C_out/g)·k² weights
            return 3 * 2.0 * x.numel() * per_output
        return 3 * 2.0 * y.numel() * per_output


SUITE: List[Layer] = [
    Layer("conv3x3 3->16 @32 (stem)", "conv", "conv2d", (3, 32, 32), dict(padding=1), (16, 3, 3, 3)),
    Layer("conv3x3 16->16 @32", "conv", "conv2d", (16, 32, 32), dict(padding=1), (16, 16, 3, 3)),
    Layer("conv3x3 32->32 @16", "conv", "conv2d", (32, 16, 16), dict(padding=1), (32, 32, 3, 3)),
    Layer("conv3x3 64->64 @8", "conv", "conv2d", (64, 8, 8), dict(padding=1), (64, 64, 3, 3)),
    Layer("conv3x3 64->128 @16 (VGG)", "conv", "conv2d", (64, 16, 16), dict(padding=1), (128, 64, 3, 3)),
    Layer("conv3x3 128->256 @8 (VGG)", "conv", "conv2d", (128, 8, 8), dict(padding=1), (256, 128, 3, 3)),
    Layer("conv3x3 16->32 stride2 @32", "conv", "conv2d", (16, 32, 32), dict(stride=2, padding=1), (32, 16, 3, 3)),
    Layer("conv1x1 16->32 stride2 @32", "conv", "conv2d", (16, 32, 32), dict(stride=2), (32, 16, 1, 1)),
    Layer("conv1x1 64->128 @8", "conv", "conv2d", (64, 8, 8), {}, (128, 64, 1, 1)),
    # ResNet-20's layers in NHWC, as train.py and the model steps below run them
    Layer("NHWC conv3x3 3->16 @32 (stem)", "conv", "conv2d", (3, 32, 32), dict(padding=1), (16, 3, 3, 3), True),
    Layer("NHWC conv3x3 16->16 @32", "conv", "conv2d", (16, 32, 32), dict(padding=1), (16, 16, 3, 3), True),
    Layer("NHWC conv3x3 32->32 @16", "conv", "conv2d", (32, 16, 16), dict(padding=1), (32, 32, 3, 3), True),
    Layer("NHWC conv3x3 64->64 @8", "conv", "conv2d", (64, 8, 8), dict(padding=1), (64, 64, 3, 3), True),
    Layer("NHWC conv3x3 16->32 stride2 @32", "conv", "conv2d", (16, 32, 32), dict(stride=2, padding=1), (32, 16, 3, 3), True),
    Layer("maxpool 2x2 64@32", "pool", "max_pool2d", (64, 32, 32), dict(kernel_size=2)),
    Layer("maxpool 3x3 s2 p1 64@32", "pool", "max_pool2d", (64, 32, 32), dict(kernel_size=3, stride=2, padding=1)),
    Layer("maxpool 2x2 128@16", "pool", "max_pool2d", (128, 16, 16), dict(kernel_size=2)),
    Layer("avgpool 2x2 64@32", "pool", "avg_pool2d", (64, 32, 32), dict(kernel_size=2)),
    Layer("avgpool 3x3 s1 p1 64@16", "pool", "avg_pool2d", (64, 16, 16), dict(kernel_size=3, stride=1, padding=1)),
    # the layer family
    Layer("adaptive avgpool 256@8 -> 1", "pool", "adaptive_avg_pool2d", (256, 8, 8), dict(output_size=1)),
    Layer("adaptive maxpool 64@32 -> 7", "pool", "adaptive_max_pool2d", (64, 32, 32), dict(output_size=7)),
    # every pool again on channels-last input (what a channels-last network feeds them)
    Layer("NHWC maxpool 2x2 64@32", "pool", "max_pool2d", (64, 32, 32), dict(kernel_size=2), channels_last=True),
    Layer("NHWC maxpool 3x3 s2 p1 64@32", "pool", "max_pool2d", (64, 32, 32), dict(kernel_size=3, stride=2, padding=1),
          channels_last=True),
    Layer("NHWC avgpool 2x2 64@32", "pool", "avg_pool2d", (64, 32, 32), dict(kernel_size=2), channels_last=True),
    Layer("NHWC avgpool 3x3 s1 p1 64@16", "pool", "avg_pool2d", (64, 16, 16), dict(kernel_size=3, stride=1, padding=1),
          channels_last=True),
    Layer("NHWC adaptive avgpool 256@8 -> 1", "pool", "adaptive_avg_pool2d", (256, 8, 8), dict(output_size=1),
          channels_last=True),
    Layer("NHWC adaptive avgpool 64@32 -> 4", "pool", "adaptive_avg_pool2d", (64, 32, 32), dict(output_size=4),
          channels_last=True),
    Layer("NHWC adaptive maxpool 64@32 -> 7", "pool", "adaptive_max_pool2d", (64, 32, 32), dict(output_size=7),
          channels_last=True),
    Layer("conv_transpose 32->16 s2 @16", "other", "conv_transpose2d", (32, 16, 16), dict(stride=2, padding=1, output_padding=1), (32, 16, 3, 3)),
    Layer("conv1d k3 64->64 L256", "other", "conv1d", (64, 256), dict(padding=1), (64, 64, 3)),
    Layer("linear 512->256", "other", "linear", (512,), {}, (256, 512)),
]


def _norm_kwargs(channels: int, running: bool = True) -> dict:
    """γ, β (learned) and the running statistics of a batch norm over ``channels``."""
    return dict(weight=torch.ones(channels, requires_grad=True), bias=torch.zeros(channels, requires_grad=True),
                **(dict(running_mean=torch.zeros(channels), running_var=torch.ones(channels)) if running else {}))


# bfloat16 (mixed precision): torch's kernels (oneDNN; AMX where the CPU has it) against
# manualconv's, which accumulate in float32 and round once
SUITE += [
    Layer("bf16 conv3x3 16->16 @32", "bfloat16", "conv2d", (16, 32, 32), dict(padding=1), (16, 16, 3, 3), dtype=torch.bfloat16),
    Layer("bf16 conv3x3 64->64 @8", "bfloat16", "conv2d", (64, 8, 8), dict(padding=1), (64, 64, 3, 3), dtype=torch.bfloat16),
    Layer("bf16 NHWC conv3x3 32->32 @16", "bfloat16", "conv2d", (32, 16, 16), dict(padding=1), (32, 32, 3, 3), True,
          dtype=torch.bfloat16),
    Layer("bf16 maxpool 2x2 64@32", "bfloat16", "max_pool2d", (64, 32, 32), dict(kernel_size=2), dtype=torch.bfloat16),
    Layer("bf16 avgpool 2x2 64@32", "bfloat16", "avg_pool2d", (64, 32, 32), dict(kernel_size=2), dtype=torch.bfloat16),
    Layer("bf16 linear 512->256", "bfloat16", "linear", (512,), {}, (256, 512), dtype=torch.bfloat16),
]
KINDS = ("conv", "pool", "other", "bfloat16")  # the layer suite's kinds (--only, geomean per kind)

SUITE += [  # normalisation and dropout (train.py's and ResNet-20's sizes)
    Layer("batchnorm2d train 64@32", "other", "batch_norm", (64, 32, 32), dict(training=True, **_norm_kwargs(64))),
    Layer("batchnorm2d eval 64@32", "other", "batch_norm", (64, 32, 32), dict(training=False, **_norm_kwargs(64))),
    Layer("NHWC batchnorm2d train 64@32", "other", "batch_norm", (64, 32, 32), dict(training=True, **_norm_kwargs(64)),
          channels_last=True),
    Layer("NHWC batchnorm2d train 128@8", "other", "batch_norm", (128, 8, 8), dict(training=True, **_norm_kwargs(128)),
          channels_last=True),
    Layer("layernorm 64x384", "other", "layer_norm", (64, 384), dict(normalized_shape=(384,), weight=torch.ones(384, requires_grad=True),
                                                                     bias=torch.zeros(384, requires_grad=True))),
    Layer("groupnorm 16 groups 64@16", "other", "group_norm", (64, 16, 16), dict(num_groups=16, **_norm_kwargs(64, False))),
    Layer("NHWC groupnorm 16 groups 64@16", "other", "group_norm", (64, 16, 16),
          dict(num_groups=16, **_norm_kwargs(64, False)), channels_last=True),
    Layer("dropout p=0.2 64@32", "other", "dropout", (64, 32, 32), dict(p=0.2)),
    # the activations of train.py's nets, channels-last as they run there (airbench: GELU; ResNet-20: ReLU)
    Layer("NHWC gelu 64@32", "other", "gelu", (64, 32, 32), {}, channels_last=True),
    Layer("NHWC relu 16@32", "other", "relu", (16, 32, 32), {}, channels_last=True),
    # the activations of torchvision's mobile nets (csrc/activations.cpp): mobilenet_v2's ReLU6,
    # mobilenet_v3's hardswish, efficientnet's SiLU
    Layer("NHWC relu6 64@32", "other", "relu6", (64, 32, 32), {}, channels_last=True),
    Layer("NHWC hardswish 64@32", "other", "hardswish", (64, 32, 32), {}, channels_last=True),
    Layer("NHWC silu 64@32", "other", "silu", (64, 32, 32), {}, channels_last=True),
    # the squashing functions (LeNet-5's): torch's forward, the backward from the output in C++
    Layer("NHWC sigmoid 64@32", "other", "sigmoid", (64, 32, 32), {}, channels_last=True),
    Layer("NHWC tanh 64@32", "other", "tanh", (64, 32, 32), {}, channels_last=True),
    # csrc/softmax.cpp: rows (attention-like, the last dim) and the class dim of a map (segmentation)
    Layer("softmax 16x1024 rows", "other", "softmax", (16, 1024), dict(dim=-1)),
    Layer("log_softmax 21 classes @32", "other", "log_softmax", (21, 32, 32), dict(dim=1)),
]


def _step(functional, layer: Layer, x: torch.Tensor, weight, grad_output) -> Callable[[], None]:
    """One forward + backward of the layer through ``functional`` (torch's or manualconv's)."""
    op = getattr(functional, layer.op)

    def step():
        x.grad = None
        if weight is not None:
            weight.grad = None
            y = op(x, weight, None, **layer.kwargs)
        else:
            y = op(x, **layer.kwargs)
        y.backward(grad_output)
    return step


def _time(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def inputs(layer: Layer, batch: int):
    """x, the weight (None for a pool) and δ for one layer, in the layer's layout."""
    torch.manual_seed(0)
    layout = torch.channels_last if layer.channels_last else torch.contiguous_format
    x = torch.randn(batch, *layer.input).to(dtype=layer.dtype, memory_format=layout).requires_grad_()
    weight = None if layer.weight is None else \
        torch.randn(layer.weight).to(dtype=layer.dtype, memory_format=layout).requires_grad_()
    with torch.no_grad():
        op = getattr(F, layer.op)
        y = op(x, weight, None, **layer.kwargs) if weight is not None else op(x, **layer.kwargs)
    return x, weight, torch.randn_like(y).contiguous(memory_format=layout)


# A layer row runs at least `repeat` pairs, and more until each side has run `seconds` (at most
# MAX_PAIRS): a ~1 ms row's median of 7 is a draw of the machine's noise (page faults, a busy
# core). Measured (AMD EPYC Zen 4, the same code, four runs each): NHWC batch norm 128@8
# 0.84–1.73 and NHWC ReLU 16@32 0.83–1.78 with 7 pairs; with 41, 1.05–1.10 and 0.86–0.98.
DEFAULT_SECONDS = 0.5
MAX_PAIRS = 201


def time_pairs(native: Callable[[], None], manual: Callable[[], None], repeat: int, seconds: float = 0.0,
               max_pairs: int = MAX_PAIRS) -> Tuple[List[float], List[float]]:
    """Times of ``native`` and ``manual`` called in pairs: at least ``repeat`` pairs, more until
    each side has run ``seconds`` (at most ``max_pairs``). Who runs first alternates from pair to
    pair, so that neither side is always the one called just after the other (whose freed memory
    and cache contents it meets). Measured (AMD EPYC Zen 4, 2 threads): torch's ReLU 16@32 (batch
    128, channels-last) timed against itself, 201 pairs, always second: 0.94, 0.95, 0.97, 1.06 of
    itself in four runs; alternating: 0.96, 0.99, 1.04 — the row's noise, at least ±5 %."""
    times_native, times_manual = [], []
    while len(times_native) < repeat or (
            min(sum(times_native), sum(times_manual)) < seconds and len(times_native) < max_pairs):
        if len(times_native) % 2 == 0:
            times_native.append(_time(native))
            times_manual.append(_time(manual))
        else:
            times_manual.append(_time(manual))
            times_native.append(_time(native))
    return times_native, times_manual


def measure(layer: Layer, batch: int, repeat: int, seconds: float = DEFAULT_SECONDS) -> Dict[str, float]:
    x, weight, grad_output = inputs(layer, batch)
    native, manual = _step(F, layer, x, weight, grad_output), _step(MF, layer, x, weight, grad_output)
    for step in (native, manual):  # warm-up: allocator, thread pool, caches
        step()
        step()
    times_native, times_manual = time_pairs(native, manual, repeat, seconds)
    t_native, t_manual = statistics.median(times_native), statistics.median(times_manual)
    return dict(native_ms=1e3 * t_native, manual_ms=1e3 * t_manual, ratio=t_native / t_manual,
                native_gflops=layer.flops(batch) / t_native / 1e9, manual_gflops=layer.flops(batch) / t_manual / 1e9,
                pairs=len(times_native))


def sgemm_gflops(size: int = 1024, repeat: int = 10) -> float:
    """This machine's float32 matmul rate (size³ square, all threads), the roof for im2col + GEMM."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = min(_time(lambda: torch.mm(a, b, out=out)) for _ in range(repeat))
    return 2.0 * size ** 3 / best / 1e9


def cpu_model() -> str:
    """The CPU the figures hold for: /proc/cpuinfo's model name with its family and model numbers
    (a name such as "AMD EPYC Processor" does not tell Zen 3 from Zen 4), else platform's guess."""
    import platform

    fields = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's fields
                fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


@dataclass
class ModelCase:
    name: str
    build: Callable[[], torch.nn.Module]
    batch: int


def _torchvision(name: str) -> Callable[[], torch.nn.Module]:
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=10)
    return build


MODELS: List[ModelCase] = [
    ModelCase("ResNet-20", lambda: models.resnet20(), 128),
    ModelCase("airbench 32/64/128 (train.py default)", lambda: models.airbench(), 512),
    # depthwise convs, ReLU6(inplace=True) after batch norm: torchvision's mobile net, on 32×32 images
    ModelCase("mobilenet_v2 (torchvision, 10 classes)", _torchvision("mobilenet_v2"), 64),
]


def _train_step(model: torch.nn.Module, optimizer, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    return step


def peak_bytes(step: Callable[[], None]) -> int:
    """High-water mark of CPU allocator bytes during one call of step, above its start. The step
    runs twice under the profiler and the second is measured, so that every block it frees was
    allocated under the profiler (whose size is therefore known). The output cache (csrc/
    output_cache.cpp) tells the profiler when it takes a block from the system or gives one back,
    not when a tensor reuses a free block: the free blocks it holds at the second step's start are
    memory the process holds, and are added. (It starts empty, so that one step's blocks are not
    charged to the next.)"""
    from torch.profiler import ProfilerActivity, profile
    empty_cache()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        torch.empty(_MARKER_BYTES, dtype=torch.uint8)  # allocated and freed: marks the second step
        cached = output_cache_info()["free_bytes"]
        step()
    events = [e.nbytes() for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
              if e.name() == "[memory]"]
    events = events[len(events) - events[::-1].index(-_MARKER_BYTES):]  # after the marker's free
    live = peak = 0
    for nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak + cached


_MARKER_BYTES = 1234567


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop to stderr; keep the table readable."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def compare_steps(steps: Dict[str, Callable[[], None]], repeat: int, warmup: int) -> Dict[str, float]:
    """Times (median of ``repeat`` pairs, time_pairs, after ``warmup`` calls of each) and peak
    memory of the two steps ``steps['native']`` and ``steps['manual']``; ratio = native / manual
    time, memory_ratio = manual / native peak."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times_native, times_manual = time_pairs(steps["native"], steps["manual"], repeat)
    t_native, t_manual = statistics.median(times_native), statistics.median(times_manual)
    m_native, m_manual = peak_bytes(steps["native"]), peak_bytes(steps["manual"])
    return dict(native_ms=1e3 * t_native, manual_ms=1e3 * t_manual, ratio=t_native / t_manual,
                native_mb=m_native / 2**20, manual_mb=m_manual / 2**20, memory_ratio=m_manual / m_native)


def measure_model(case: ModelCase, repeat: int) -> Dict[str, float]:
    torch.manual_seed(0)
    native = case.build().to(memory_format=torch.channels_last)
    manual = convert(native)  # a deep copy: same weights, manualconv layers
    x = torch.randn(case.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (case.batch,))
    steps = {}
    for key, model in (("native", native), ("manual", manual)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        steps[key] = _train_step(model, optimizer, x, target)
    return compare_steps(steps, repeat, warmup=2)  # the 2nd warm-up step: optimizer buffers exist


def resnet20_group_norm() -> torch.nn.Module:
    """ResNet-20 with each BatchNorm replaced by GroupNorm (Opacus's ModuleValidator.fix)."""
    from opacus.validators import ModuleValidator
    return ModuleValidator.fix(models.resnet20())


PER_SAMPLE = ModelCase("ResNet-20 (GroupNorm) per-sample grads", resnet20_group_norm, 128)


def _per_sample_step(model: torch.nn.Module, loss_fn, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """Forward + backward through a GradSampleModule: each parameter's grad_sample (N, *shape)."""
    def step():
        model.zero_grad(set_to_none=True)  # clears grad_sample too
        loss_fn(model(x), target).backward()
    return step


def measure_per_sample(case: ModelCase, repeat: int, batch: Optional[int] = None) -> Dict[str, float]:
    from opacus import GradSampleModule
    from . import per_sample  # noqa: F401  (registers manualconv's grad samplers with Opacus)
    from .modules import CrossEntropyLoss
    batch = batch or case.batch
    torch.manual_seed(0)
    native = case.build().to(memory_format=torch.channels_last)
    manual = convert(native)  # a deep copy: same weights, manualconv layers
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,))
    steps = {"native": _per_sample_step(GradSampleModule(native), torch.nn.CrossEntropyLoss(), x, target),
             "manual": _per_sample_step(GradSampleModule(manual), CrossEntropyLoss(), x, target)}
    return dict(batch=batch, **compare_steps(steps, repeat, warmup=2))


# ResNet-20's convs (input C×H×W, out channels, stride): the per-sample weight gradient alone
SAMPLER_LAYERS = [((16, 32, 32), 16, 1), ((16, 32, 32), 32, 2), ((32, 16, 16), 32, 1), ((64, 8, 8), 64, 1)]


def measure_sampler(layer, repeat: int, batch: int) -> Dict[str, float]:
    """One conv's per-sample weight gradients from captured activations and deltas (channels-last):
    Opacus's sampler (unfold + einsum) against manualconv.per_sample's (one per-sample grad-weight call)."""
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from .per_sample import conv2d_grad_sample
    (c, h, w), out_channels, stride = layer
    torch.manual_seed(0)
    native = torch.nn.Conv2d(c, out_channels, 3, stride, 1, bias=False)
    manual = convert(native)
    x = torch.randn(batch, c, h, w).to(memory_format=torch.channels_last)
    delta = torch.randn(batch, out_channels, h // stride, w // stride).to(memory_format=torch.channels_last)
    steps = {"native": lambda: compute_conv_grad_sample(native, [x], delta),
             "manual": lambda: conv2d_grad_sample(manual, [x], delta)}
    return compare_steps(steps, repeat, warmup=1)


def geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run(batch: int, repeat: int, only: Optional[str], markdown: Optional[str],
        per_sample_batch: Optional[int] = None, seconds: float = DEFAULT_SECONDS) -> Dict[str, float]:
    rows, model_rows = [], []
    peak = sgemm_gflops() if only != "per_sample" else float("nan")  # the roof only the conv rows use
    header = f"{cpu_model()}, capability {cpu_capability()}" + (" (tiles outrun BLAS)" if tiles_outrun_blas() else "") + \
             ("" if math.isnan(peak) else f", SGEMM {peak:.0f} GFLOP/s") + \
             f"; manualconv {get_backend()} vs torch {torch.__version__}, float32 (bf16 rows: bfloat16), batch {batch}, " \
             f"{torch.get_num_threads()} threads, median of {repeat} (layers: of at least {repeat}, to {seconds:g} s a side), " \
             f"forward+backward"
    print(header)
    if only not in ("model", "per_sample"):
        print(f"{'layer':32s} {'native ms':>10s} {'manual ms':>10s} {'ratio':>7s} {'nat GF/s':>9s} "
              f"{'man GF/s':>9s} {'nat %':>6s} {'man %':>6s}")
    for layer in SUITE:
        if only and layer.kind != only:
            continue
        result = measure(layer, batch, repeat, seconds)
        rows.append((layer, result))
        gf = (f"{result['native_gflops']:9.1f} {result['manual_gflops']:9.1f} "
              f"{100 * result['native_gflops'] / peak:6.0f} {100 * result['manual_gflops'] / peak:6.0f}"
              if layer.kind == "conv" else "")
        print(f"{layer.name:32s} {result['native_ms']:10.2f} {result['manual_ms']:10.2f} {result['ratio']:7.2f} {gf}")
        sys.stdout.flush()
    summary = {kind: geomean([r["ratio"] for layer, r in rows if layer.kind == kind]) for kind in KINDS}
    for kind, value in summary.items():
        if not math.isnan(value):
            print(f"geomean ratio (native/manual), {kind}: {value:.2f}")
    if only in (None, "model"):
        print(f"\ntraining step (channels-last){'':10s} {'native ms':>10s} {'manual ms':>10s} {'ratio':>7s} "
              f"{'nat MiB':>8s} {'man MiB':>8s} {'mem ratio':>9s}")
        for case in MODELS:
            r = measure_model(case, repeat)
            model_rows.append((case, r))
            print(f"{case.name + f' b{case.batch}':40s} {r['native_ms']:10.1f} {r['manual_ms']:10.1f} {r['ratio']:7.2f} "
                  f"{r['native_mb']:8.1f} {r['manual_mb']:8.1f} {r['memory_ratio']:9.2f}")
            sys.stdout.flush()
            summary[case.name] = r["ratio"]
    if markdown:
        with open(markdown, "w") as f:
            f.write(header + "\n\n")
            if rows:
                f.write("| layer | native ms | manualconv ms | ratio | native GFLOP/s | manualconv GFLOP/s "
                        "| native % SGEMM | manualconv % SGEMM |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
                for layer, r in rows:
                    gf = (f"{r['native_gflops']:.1f} | {r['manual_gflops']:.1f} | "
                          f"{100 * r['native_gflops'] / peak:.0f} | {100 * r['manual_gflops'] / peak:.0f}"
                          if layer.kind == "conv" else " | | | ")
                    f.write(f"| {layer.name} | {r['native_ms']:.2f} | {r['manual_ms']:.2f} | {r['ratio']:.2f} | {gf} |\n")
                f.write("\n" + ", ".join(f"geomean ratio {kind}: **{value:.2f}**"
                                         for kind, value in summary.items() if kind in KINDS
                                         and not math.isnan(value)) + "\n")
            if model_rows:
                f.write("\n| training step (channels-last) | native ms | manualconv ms | ratio | native peak MiB "
                        "| manualconv peak MiB | memory ratio |\n|---|---:|---:|---:|---:|---:|---:|\n")
                for case, r in model_rows:
                    f.write(f"| {case.name}, batch {case.batch} | {r['native_ms']:.1f} | {r['manual_ms']:.1f} | "
                            f"{r['ratio']:.2f} | {r['native_mb']:.1f} | {r['manual_mb']:.1f} | {r['memory_ratio']:.2f} |\n")
    if only in (None, "per_sample"):
        r = measure_per_sample(PER_SAMPLE, repeat, per_sample_batch)
        name = f"{PER_SAMPLE.name} b{r['batch']}"
        print(f"\nper-sample gradients (Opacus){'':10s} {'native ms':>10s} {'manual ms':>10s} {'ratio':>7s} "
              f"{'nat MiB':>8s} {'man MiB':>8s} {'mem ratio':>9s}")
        print(f"{name:40s} {r['native_ms']:10.1f} {r['manual_ms']:10.1f} {r['ratio']:7.2f} "
              f"{r['native_mb']:8.1f} {r['manual_mb']:8.1f} {r['memory_ratio']:9.2f}")
        summary[PER_SAMPLE.name] = r["ratio"]
        samplers = []
        for layer in SAMPLER_LAYERS:
            (c, h, _), out_channels, stride = layer
            s = measure_sampler(layer, repeat, r["batch"])
            samplers.append((f"conv3x3 {c}->{out_channels} s{stride} @{h} sampler b{r['batch']}", s))
            print(f"{samplers[-1][0]:40s} {s['native_ms']:10.1f} {s['manual_ms']:10.1f} {s['ratio']:7.2f} "
                  f"{s['native_mb']:8.1f} {s['manual_mb']:8.1f} {s['memory_ratio']:9.2f}")
        if markdown:
            with open(markdown, "a") as f:
                f.write("\n| per-sample gradients (GradSampleModule) | Opacus native ms | Opacus manualconv ms | ratio "
                        "| native peak MiB | manualconv peak MiB | memory ratio |\n|---|---:|---:|---:|---:|---:|---:|\n")
                f.write(f"| {PER_SAMPLE.name}, batch {r['batch']} | {r['native_ms']:.1f} | {r['manual_ms']:.1f} | "
                        f"{r['ratio']:.2f} | {r['native_mb']:.1f} | {r['manual_mb']:.1f} | {r['memory_ratio']:.2f} |\n")
                for name, s in samplers:
                    f.write(f"| {name} | {s['native_ms']:.1f} | {s['manual_ms']:.1f} | {s['ratio']:.2f} | "
                            f"{s['native_mb']:.1f} | {s['manual_mb']:.1f} | {s['memory_ratio']:.2f} |\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manualconv.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="batch of the layer suite (models use their own)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"a layer row repeats until each side has run this long (default {DEFAULT_SECONDS}; "
                             f"at most {MAX_PAIRS} pairs)")
    parser.add_argument("--only", choices=[*KINDS, "model", "per_sample"])
    parser.add_argument("--per-sample-batch", type=int, default=None,
                        help=f"batch of the per-sample-gradient rows (default {PER_SAMPLE.batch})")
    parser.add_argument("--backend", choices=["cpp", "reference"], default=None)
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    if args.batch <= 0 or args.repeat <= 0 or (args.per_sample_batch is not None and args.per_sample_batch <= 0):
        parser.error("--batch, --repeat and --per-sample-batch must be positive")
    if not args.seconds >= 0:  # (NaN too)
        parser.error("--seconds must be zero or positive")
    with use_backend(args.backend or get_backend()):
        run(args.batch, args.repeat, args.only, args.markdown, args.per_sample_batch, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
