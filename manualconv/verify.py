"""Verify a whole model's hand-derived backward pass against torch.nn, layer by layer.

    python -m manualconv.verify resnet18 --input-shape 2,3,64,64
    python -m manualconv.verify my_models:make_net --dtype float64 --json
    python -m manualconv.verify --coverage [resnet18,alexnet,...]   # which builders convert fully

MODEL is a torchvision model name (built with ``weights=None`` and its default number of
classes) or ``module:callable`` (the module is imported and the callable called with no
arguments; it must return a ``torch.nn.Module``). The model is built once from ``--seed``;
``manualconv.convert`` makes the manualconv copy, so both models hold the same parameters.

What is compared
----------------
Both models run forward and backward on the same random input, with the same loss: a random
projection of the outputs, J = Σ ⟨output, g⟩, so every output entry gets its own delta. For
every leaf module and for the model itself there is one row per call (a module called twice,
such as the ``relu`` of torchvision's ResNet blocks, gives rows ``name`` and ``name#2``), with

- end to end: max |manualconv − torch| (abs) and that divided by the tensor's scale (rel) for
  the output, the input gradient (this call's own contribution, ∂J/∂input through this module
  only), and the weight and bias gradients (summed over calls, shown on a module's first row);
- local (manualconv layers only): the largest rel when the manualconv layer and the torch.nn
  layer are each replayed on torch's own input and delta. This isolates the layer: it is the
  difference its own forward and hand-derived backward make.

A row FAILS when its local check exceeds the local tolerance: that layer computes something
else than torch.nn, and it is named. A row whose end-to-end differences exceed the end-to-end
tolerance while its local check passes is marked DRIFT: the layer itself is right, but its
inputs already differed. That is expected in float32 — rounding compounds through the network,
and a rounding-level difference can push a value across a ReLU kink or change the winner of a
max-pool near-tie, which moves a whole delta entry — so in float32 DRIFT is reported and does
not fail the run. In float64, where rounding cannot reach the tolerance, any DRIFT fails the
run too (the FAIL rows, if any, say where it comes from).

Tolerances (a tensor passes when max |manualconv − torch| ≤ rtol × scale)
----------------------------------------------------------------------
The scale is max |torch's tensor|, except for bias gradients, whose scale is the size of the
terms they add up, max over channels of Σ |δ|: a bias gradient is a sum of deltas that may
cancel to almost nothing (a conv bias before a training-mode batch norm has gradient ≈ 0), and
its rounding noise measured against its own size would be meaningless.

    float32  local 1e-4, end to end 1e-3. One float32 operation rounds by ≤ 6e-8; a layer's
             long sums (a weight gradient adds N·H_out·W_out products) reach a few 1e-6 of the
             scale (measured locally on eight torchvision models: ≤ 3e-6), and that compounds
             through the network (end to end: ~2e-6 in eval mode, up to ~5e-4 in train mode,
             where batch norm divides by small spreads — apart from kink and near-tie flips).
             A mistake in a derivation is of the order of the values themselves; a gradient
             off by 1% shows as 1e-2, a hundred times the local tolerance.
    float64  local 1e-10, end to end 1e-9. The same arguments from ~1e-16 per operation:
             measured ≤ 3e-15 locally and ≤ 2e-13 end to end on the same models, both modes.

Mode: eval by default, so batch norm is a fixed per-channel affine map and dropout is off — the
comparison then isolates the layers manualconv implements. ``--train`` runs training mode:
batch statistics become part of the forward and backward, and dropout draws the same masks in
both models (the generator is re-seeded before each forward).

Exit status: 0 when no row fails, 1 when any does (or manualconv raises where torch.nn does
not), 2 for bad arguments (an unknown model, a malformed shape, a module that cannot be
imported, an input torch.nn itself cannot run). ``--json`` prints the report as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .backend import BACKENDS, get_backend, use_backend
from .convert import convert
from .deltas import is_manualconv_layer


@dataclass(frozen=True)
class Tolerance:
    local: float  # a layer replayed on torch's input and delta: FAIL beyond this
    end_to_end: float  # the two models side by side: DRIFT beyond this


TOLERANCES = {torch.float32: Tolerance(local=1e-4, end_to_end=1e-3),
              torch.float64: Tolerance(local=1e-10, end_to_end=1e-9)}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_INPUT_SHAPE = (2, 3, 64, 64)
QUANTITIES = ("output", "grad_input", "grad_weight", "grad_bias")
MODEL_ROW = "(model)"


class UsageError(Exception):
    """A bad command-line argument: reported with exit status 2."""


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_shape(text: str) -> Tuple[int, ...]:
    """'2,3,64,64' → (2, 3, 64, 64): comma-separated positive integers."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--input-shape must be comma-separated positive integers such as 2,3,64,64, got {text!r}")
    return tuple(int(part) for part in parts)


def build_model(spec: str) -> torch.nn.Module:
    """A torchvision model name (weights=None), or 'module:callable' returning an nn.Module."""
    if ":" in spec:
        return _model_from_callable(spec)
    import torchvision

    try:
        return torchvision.models.get_model(spec, weights=None)
    except ValueError as error:
        raise UsageError(f"unknown model {spec!r} ({error}); give a name from torchvision.models.list_models(), "
                         "or module:callable") from None


def _model_from_callable(spec: str) -> torch.nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"MODEL {spec!r}: expected module:callable, such as my_package.models:make_net")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any failure to import is the user's argument
        raise UsageError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}") from None
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{spec!r} is not callable")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def compiled_kernels_run_on(device: torch.device) -> bool:
    """Whether the built extension registered its kernels for this device type (CPU always;
    CUDA when it was built with its CUDA kernels)."""
    return ops.AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(
        "manualconv::conv2d_forward", device.type.upper())


def resolve_device_and_backend(device_name: str, backend: Optional[str]) -> Tuple[torch.device, str]:
    """The device must exist. Default backend: the current one where the compiled kernels run on
    the device, else 'reference' (plain tensor code runs anywhere)."""
    try:
        device = torch.device(device_name)
        torch.empty(0, device=device)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"device {device_name!r} is not usable: {error}") from None
    if device.type == "meta":
        raise UsageError("device 'meta' holds no values to compare")
    if backend is None:
        backend = get_backend() if compiled_kernels_run_on(device) else "reference"
    if backend == "cpp" and not ops.AVAILABLE:
        raise UsageError(f"the 'cpp' backend is not built ({ops.LOAD_ERROR}); use --backend reference")
    if backend == "cpp" and not compiled_kernels_run_on(device):
        raise UsageError(f"the 'cpp' backend has no kernels for {device.type}; use --backend reference")
    return device, backend


# ---------------------------------------------------------------------------------------------
# Recording every layer's tensors


@dataclass
class Call:
    """One call of one module: its arguments and output, and (after backward) the delta
    arriving at its output and the gradient it hands to its input."""

    args: tuple = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    output: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None
    grad_input: Optional[torch.Tensor] = None

    @property
    def input(self) -> Optional[torch.Tensor]:
        first = self.args[0] if self.args else None
        return first if isinstance(first, torch.Tensor) and first.is_floating_point() else None


def _float_tensors(value) -> List[torch.Tensor]:
    """The floating-point tensors in a module's output (a tensor, tuple, list, dict, namedtuple)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _float_tensors(item)]
    return []


def _first_float_tensor(value) -> Optional[torch.Tensor]:
    found = _float_tensors(value)
    return found[0] if found else None


def _keep(value):
    """A private copy of a tensor (the original may still be modified in place: ReLU(inplace=True),
    ``+=``); anything else as it is."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class LayerRecorder:
    """Hooks on the model and on every leaf module record each call.

    The input gradient is this call's own contribution: a forward pre-hook hands the module a
    copy of its input and hooks the copy, so other consumers of the same tensor (a residual
    branch) do not add in. (A copy, not a view: a module working in place, such as
    ReLU(inplace=True), then modifies the copy, and the hook still receives the gradient of the
    value before the modification; a hook on a view modified in place would not fire. The
    caller's tensor is left unmodified, which changes nothing for modules that return their
    result.) The delta is a hook on the output: a tensor hook receives the gradient of the value
    the tensor had when hooked, even if the caller later modifies it in place (ResNet's
    ``out += identity``)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: Dict[str, List[Call]] = {}
        self.order: List[Tuple[str, int]] = []  # (row name, call index) in the order calls finish
        self.modules: Dict[str, torch.nn.Module] = {}
        self._open: Dict[str, List[Call]] = {}
        self._handles = []
        for name, module in model.named_modules():
            if name and next(module.children(), None) is not None:
                continue  # containers: their leaves have rows of their own
            row = name or MODEL_ROW
            self.modules[row] = module
            self._handles.append(module.register_forward_pre_hook(self._before(row), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after(row)))

    def _before(self, row: str) -> Callable:
        def hook(module, args, kwargs):
            call = Call(tuple(_keep(a) for a in args), {k: _keep(v) for k, v in kwargs.items()})
            self._open.setdefault(row, []).append(call)
            if call.input is None or not args[0].requires_grad:
                return None
            own = args[0].clone()
            own.register_hook(lambda grad: setattr(call, "grad_input", _keep(grad)))
            return (own,) + tuple(args[1:]), kwargs

        return hook

    def _after(self, row: str) -> Callable:
        def hook(module, args, output):
            call = self._open[row].pop()
            out = _first_float_tensor(output)
            if out is not None:
                call.output = _keep(out)
                if out.requires_grad:
                    out.register_hook(lambda grad: setattr(call, "delta", _keep(grad)))
            self.calls.setdefault(row, []).append(call)
            self.order.append((row, len(self.calls[row]) - 1))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Run:
    """What one model did: every call of every layer, and every parameter's gradient."""

    model: torch.nn.Module
    recorder: LayerRecorder
    param_grads: Dict[str, Optional[torch.Tensor]]


def forward_backward(model: torch.nn.Module, x: torch.Tensor, seed: int, train: bool) -> Run:
    """One forward and backward with every layer recorded. The loss is J = Σ ⟨output, g⟩ with g
    drawn from ``seed``: the same for both models."""
    model.train(train)
    recorder = LayerRecorder(model)
    try:
        x = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)  # dropout (train mode) draws the same masks in both models
        outputs = _float_tensors(model(x))
        if not outputs:
            raise UsageError("the model returned no floating-point tensor to differentiate")
        generator = torch.Generator().manual_seed(seed + 1)
        loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)).sum()
                   for out in outputs)
        loss.backward()
    finally:
        recorder.remove()
    grads = {name: _keep(p.grad) for name, p in model.named_parameters()}
    return Run(model, recorder, grads)


@dataclass
class Replay:
    """A module run once more on given arguments and delta: its output and gradients."""

    output: Optional[torch.Tensor]
    grad_input: Optional[torch.Tensor]
    param_grads: Dict[str, Optional[torch.Tensor]]


def replay(module: torch.nn.Module, call: Call, delta: Optional[torch.Tensor]) -> Replay:
    """Run ``module`` on ``call``'s arguments and back-propagate ``delta`` through it alone."""
    leaf = call.input.clone().requires_grad_(True)
    args = (leaf.clone(),) + tuple(_keep(a) for a in call.args[1:])  # a non-leaf: in-place modules may modify it
    output = _first_float_tensor(module(*args, **{k: _keep(v) for k, v in call.kwargs.items()}))
    params = [(name, p) for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    grads: List[Optional[torch.Tensor]] = [None] * (1 + len(params))
    if delta is not None and output is not None and output.requires_grad:
        grads = list(torch.autograd.grad(output, [leaf] + [p for _, p in params], delta, allow_unused=True))
    return Replay(_keep(output), grads[0], {name: g for (name, _), g in zip(params, grads[1:])})


# ---------------------------------------------------------------------------------------------
# Comparing


@dataclass
class Difference:
    """max |manualconv − torch| and that divided by the scale; inf where shapes or NaNs differ."""

    max_abs: float
    max_rel: float


def difference(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
               scale: Optional[float] = None) -> Optional[Difference]:
    """Compare manualconv's tensor with torch's. None when neither has one; ``scale`` defaults
    to max |expected|."""
    if actual is None and expected is None:
        return None
    if actual is None or expected is None or actual.shape != expected.shape:
        return Difference(math.inf, math.inf)
    a, e = actual.detach(), expected.detach()
    max_abs = float((a - e).abs().max()) if a.numel() else 0.0
    if not math.isfinite(max_abs):  # NaN or inf somewhere: the slow, careful comparison
        return _difference_with_non_finite(a.double(), e.double(), scale)
    if max_abs == 0.0:
        return Difference(0.0, 0.0)
    if scale is None:
        scale = float(e.abs().max())
    return Difference(max_abs, max_abs / scale if scale > 0 else math.inf)


def _difference_with_non_finite(a: torch.Tensor, e: torch.Tensor, scale: Optional[float]) -> Difference:
    """Matching NaNs and equal infinities agree; a NaN or an infinity on one side only does not."""
    if bool((a.isnan() != e.isnan()).any()):
        return Difference(math.inf, math.inf)
    same = (a == e) | a.isnan()
    error = torch.where(same, torch.zeros_like(a), (a - e).abs())
    max_abs = float(error.max())
    if max_abs == 0.0:
        return Difference(0.0, 0.0)
    if scale is None:
        finite = e[e.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
    return Difference(max_abs, max_abs / scale if scale > 0 else math.inf)


def bias_scale(module: torch.nn.Module, deltas: Sequence[Optional[torch.Tensor]]) -> Optional[float]:
    """max over channels of Σ |δ|: the size of the terms a bias gradient adds up. The channel
    is the last dimension for Linear and dimension 1 otherwise (conv, pooling, normalisation)."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor) or not deltas or any(d is None for d in deltas):
        return None
    channel = -1 if isinstance(module, torch.nn.Linear) else 1
    total = None
    for delta in deltas:
        if delta.dim() == 0 or delta.shape[channel] != bias.numel():
            return None
        per_channel = delta.detach().double().abs().movedim(channel, 0).reshape(bias.numel(), -1).sum(1)
        total = per_channel if total is None else total + per_channel
    return float(total.max())


def _param_key(name: str) -> str:
    return "grad_" + name  # grad_weight, grad_bias, grad_<other parameter>


def compare(manual: Dict[str, Optional[torch.Tensor]], native: Dict[str, Optional[torch.Tensor]],
            module: torch.nn.Module, deltas: Sequence[Optional[torch.Tensor]]) -> Dict[str, Optional[Difference]]:
    """Differences of each named tensor (output, grad_input, grad_<parameter>)."""
    diffs = {}
    for key in native.keys() | manual.keys():
        scale = bias_scale(module, deltas) if key == "grad_bias" else None
        diffs[key] = difference(manual.get(key), native.get(key), scale)
    return diffs


def _worst(diffs: Dict[str, Optional[Difference]]) -> float:
    return max((d.max_rel for d in diffs.values() if d is not None), default=0.0)


@dataclass
class Row:
    """One call of one layer in the report."""

    name: str
    op: str
    manual: bool  # a manualconv layer (hand-derived backward)
    end_to_end: Dict[str, Optional[Difference]]
    local: Optional[Dict[str, Optional[Difference]]] = None  # manualconv layers only
    status: str = "PASS"  # PASS, DRIFT (end to end beyond tolerance, layer right) or FAIL

    def to_json(self) -> Dict[str, Any]:
        encode = lambda d: None if d is None else {"max_abs": _number(d.max_abs), "max_rel": _number(d.max_rel)}  # noqa: E731
        return {"name": self.name, "op": self.op, "manualconv": self.manual, "status": self.status,
                "end_to_end": {k: encode(v) for k, v in sorted(self.end_to_end.items())},
                "local": None if self.local is None else {k: encode(v) for k, v in sorted(self.local.items())}}


def _number(value: float):
    return value if math.isfinite(value) else str(value)  # strict JSON has no inf


def compare_runs(manual: Run, native: Run, settings: "Settings") -> List[Row]:
    """One row per call, in forward order."""
    rows = []
    for name, index in native.recorder.order:
        native_module, native_call = native.recorder.modules[name], native.recorder.calls[name][index]
        manual_module = manual.recorder.modules[name]
        manual_calls = manual.recorder.calls.get(name, [])
        manual_call = manual_calls[index] if index < len(manual_calls) else Call()
        deltas = [call.delta for call in native.recorder.calls[name]]
        ours = {"output": manual_call.output, "grad_input": manual_call.grad_input}
        theirs = {"output": native_call.output, "grad_input": native_call.grad_input}
        if index == 0 and name != MODEL_ROW:  # parameter gradients are per module: on its first row
            for pname, _ in native_module.named_parameters(recurse=False):
                ours[_param_key(pname)] = manual.param_grads.get(f"{name}.{pname}")
                theirs[_param_key(pname)] = native.param_grads.get(f"{name}.{pname}")
        row = Row(name if index == 0 else f"{name}#{index + 1}", type(manual_module).__name__,
                  is_manualconv_layer(manual_module), compare(ours, theirs, native_module, deltas))
        if row.manual and native_call.input is not None:
            row.local = local_check(manual_module, native_module, native_call, settings.backend)
        row.status = _status(row, settings.tolerance)
        rows.append(row)
    return rows


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    torch.cuda.set_rng_state(state, device) if device.type == "cuda" else torch.set_rng_state(state)


def local_check(manual_module: torch.nn.Module, native_module: torch.nn.Module, call: Call,
                backend: str) -> Dict[str, Optional[Difference]]:
    """The manualconv layer and the torch.nn layer, each run on torch's own input and delta."""
    rng = _rng_state(call.input.device)
    with use_backend(backend):
        ours = replay(manual_module, call, call.delta)
    _set_rng_state(call.input.device, rng)  # a random layer (dropout) draws the same numbers for both
    theirs = replay(native_module, call, call.delta)
    named = lambda r: {"output": r.output, "grad_input": r.grad_input,  # noqa: E731
                       **{_param_key(k): v for k, v in r.param_grads.items()}}
    return compare(named(ours), named(theirs), native_module, [call.delta])


def _status(row: Row, tolerance: Tolerance) -> str:
    if row.local is not None and _worst(row.local) > tolerance.local:
        return "FAIL"
    if _worst(row.end_to_end) > tolerance.end_to_end:
        return "DRIFT"
    return "PASS"


# ---------------------------------------------------------------------------------------------
# Running a verification


@dataclass
class Settings:
    model: str
    input_shape: Tuple[int, ...] = DEFAULT_INPUT_SHAPE
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    backend: str = "cpp"
    seed: int = 0
    train: bool = False

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype]

    @property
    def drift_fails(self) -> bool:
        """Only in float64 can rounding not explain an end-to-end difference beyond tolerance."""
        return self.dtype == torch.float64


@dataclass
class Report:
    settings: Settings
    rows: List[Row] = field(default_factory=list)
    error: Optional[str] = None  # manualconv raised where torch.nn did not

    @property
    def passed(self) -> bool:
        failing = ("FAIL", "DRIFT") if self.settings.drift_fails else ("FAIL",)
        return self.error is None and not any(row.status in failing for row in self.rows)

    def named(self, status: str) -> List[str]:
        return [row.name for row in self.rows if row.status == status]

    def to_json(self) -> Dict[str, Any]:
        s = self.settings
        return {
            "model": s.model, "input_shape": list(s.input_shape), "dtype": str(s.dtype).replace("torch.", ""),
            "device": str(s.device), "backend": s.backend, "seed": s.seed, "mode": "train" if s.train else "eval",
            "tolerance": {"local": s.tolerance.local, "end_to_end": s.tolerance.end_to_end, "drift_fails": s.drift_fails,
                          "rule": "max|manualconv - torch| <= rtol * scale; scale = max|torch| "
                                  "(bias gradients: max over channels of sum|delta|)"},
            "passed": self.passed, "error": self.error,
            "failures": self.named("FAIL"), "drift": self.named("DRIFT"),
            "layers": [row.to_json() for row in self.rows],
        }


def verify(settings: Settings) -> Report:
    """Build the model, convert it, run both and compare them."""
    torch.manual_seed(settings.seed)
    native = build_model(settings.model).to(device=settings.device, dtype=settings.dtype)
    manual = convert(native)
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.input_shape, generator=generator, dtype=settings.dtype).to(settings.device)
    try:
        native_run = forward_backward(native, x, settings.seed, settings.train)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.nn itself cannot run it: a bad argument
        raise UsageError(f"torch.nn cannot run {settings.model} on an input of shape {list(settings.input_shape)}: "
                         f"{type(error).__name__}: {error}") from None
    report = Report(settings)
    try:
        with use_backend(settings.backend):
            manual_run = forward_backward(manual, x, settings.seed, settings.train)
        report.rows = compare_runs(manual_run, native_run, settings)
    except Exception as error:  # noqa: BLE001 - torch.nn ran it and manualconv did not: a failure
        report.error = f"manualconv raised {type(error).__name__}: {error}"
    return report


# ---------------------------------------------------------------------------------------------
# Output


def _cell(d: Optional[Difference]) -> str:
    return f"{'-':>8} {'-':>8}" if d is None else f"{d.max_abs:8.1e} {d.max_rel:8.1e}"


def format_table(report: Report) -> str:
    """The per-layer table, with a heading, a legend and a verdict."""
    s, tol = report.settings, report.settings.tolerance
    lines = [
        f"manualconv.verify {s.model}: input {list(s.input_shape)} {str(s.dtype).replace('torch.', '')} on {s.device}, "
        f"{'train' if s.train else 'eval'} mode, backend {s.backend}, seed {s.seed}",
        f"tolerance: |manualconv - torch| <= rtol x max|torch| per tensor (bias gradients: x max over channels "
        f"of sum|delta|); local rtol {tol.local:g} (FAIL), end-to-end rtol {tol.end_to_end:g} "
        f"(DRIFT; {'fails the run in float64' if s.drift_fails else 'reported only in float32'})",
        "",
    ]
    if report.error:
        return "\n".join(lines + [f"FAIL: {report.error}"])
    width = max([len(r.name) for r in report.rows] + [5])
    op_width = max([len(r.op) + 1 for r in report.rows] + [2])
    headings = ("output", "input grad", "weight grad", "bias grad")
    lines.append(f"{'layer':<{width}}  {'op':<{op_width}}  " + "  ".join(f"{h:<17}" for h in headings)
                 + "  local     status")
    lines.append(f"{'':<{width}}  {'':<{op_width}}  " + "  ".join(f"{'abs':>8} {'rel':>8}" for _ in headings))
    for row in report.rows:
        op = row.op + ("*" if row.manual else "")
        cells = "  ".join(_cell(row.end_to_end.get(q)) for q in QUANTITIES)
        local = "-" if row.local is None else f"{_worst(row.local):.1e}"
        lines.append(f"{row.name:<{width}}  {op:<{op_width}}  {cells}  {local:<8}  {row.status}")
        for key in sorted(set(row.end_to_end) - set(QUANTITIES)):  # parameters other than weight, bias
            lines.append(f"{'':<{width}}  {key:<{op_width}}  {_cell(row.end_to_end[key])}")
    lines += ["", "columns: end to end (the two models side by side); local: largest rel of a manualconv layer "
                  "replayed on torch's own input and delta. * manualconv layer (hand-derived backward)."]
    failures, drift = report.named("FAIL"), report.named("DRIFT")
    if drift:
        lines.append(f"DRIFT (the layer is right, its inputs already differed): {', '.join(drift)}")
    if failures:
        lines.append(f"FAIL: {len(failures)} of {len(report.rows)} rows compute differently from torch.nn "
                     f"on the same input and delta: {', '.join(failures)}")
    if not report.passed and not failures:
        lines.append("FAIL: end-to-end drift beyond the float64 tolerance")
    if report.passed:
        lines.append(f"PASS: {len(report.rows)} rows" + (", drift reported only (float32)" if drift else "") + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Coverage: which torchvision classifiers convert leaves hand-derived end to end (--coverage)

# Backward nodes of plain tensor glue (views, indexing, concatenation, elementwise arithmetic,
# means and sums, copies, zero padding): the one list of what may sit between manualconv
# Functions in a converted model's backward graph (tests/test_model_audit.py uses it too).
GLUE_NODES = re.compile(
    r"^(View|UnsafeView|Reshape|ReshapeAlias|Flatten|Permute|Transpose|T|Select|Slice|Squeeze|Unsqueeze|Expand"
    r"|Cat|Stack|Split|SplitWithSizes|Unbind|Narrow|Clone|Add|Sub|Mul|Div|Neg|Mean|Sum|ToCopy|AsStrided|Alias"
    r"|ConstantPadNd|Flip|Repeat|Index)Backward\d*$|^(CopySlices|CopyBackwards|AccumulateGrad)$")


def backward_nodes(output: torch.Tensor) -> List[Any]:
    """Every node of the autograd graph behind ``output``."""
    nodes, stack, seen = [], [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return nodes


def is_manualconv_node(node) -> bool:
    """The backward node of a manualconv autograd Function."""
    forward_cls = getattr(node, "_forward_cls", None)
    return forward_cls is not None and forward_cls.__module__.startswith("manualconv.")


def native_backward_nodes(output: torch.Tensor) -> List[str]:
    """Names of the backward nodes that are neither manualconv Functions nor glue: torch's own
    derivatives that remain (NativeBatchNormBackward0, ReluBackward0, ...)."""
    return sorted({type(n).__name__ for n in backward_nodes(output)
                   if not is_manualconv_node(n) and not GLUE_NODES.match(type(n).__name__)})


def classification_builders() -> List[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def builder_coverage(name: str, sizes: Sequence[int] = (64, 224, 299)) -> Tuple[Optional[List[str]], str]:
    """(native backward nodes left after convert, note) for one torchvision builder: weights=None,
    training mode, a batch of 2 random images of the first size its forward accepts, loss = the
    sum of the outputs. (None, error) when it cannot be built or run."""
    import torchvision

    torch.manual_seed(0)
    try:
        model = convert(torchvision.models.get_model(name, weights=None), inplace=True).train()
    except Exception as error:  # noqa: BLE001 - reported, not raised: one broken builder is one row
        return None, f"cannot build: {type(error).__name__}: {error}"
    note = ""
    for size in sizes:
        try:
            output = model(torch.randn(2, 3, size, size))
        except Exception as error:  # noqa: BLE001 - too small an input for this model: the next size
            note = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        outputs = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
        return native_backward_nodes(sum(o.sum() for o in outputs)), f"input 2x3x{size}x{size}"
    return None, f"cannot run: {note}"


def coverage(builders: Sequence[str]) -> int:
    """Prints one line per builder and the count; returns the number fully hand-derived."""
    full = 0
    for name in builders:
        remaining, note = builder_coverage(name)
        if remaining is None:
            print(f"{name:28s} ERROR  {note}", flush=True)
        elif remaining:
            print(f"{name:28s} native {', '.join(remaining)}", flush=True)
        else:
            full += 1
            print(f"{name:28s} hand-derived", flush=True)
    print(f"{full} of {len(builders)} torchvision classification builders are hand-derived end to end after convert")
    return full


# ---------------------------------------------------------------------------------------------
# Command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m manualconv.verify",
        description="Compare a model's manualconv forward and backward with torch.nn's, layer by layer.",
    )
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="a torchvision model name (e.g. resnet18) or module:callable")
    parser.add_argument("--input-shape", default=",".join(map(str, DEFAULT_INPUT_SHAPE)), metavar="N,C,H,W",
                        help="shape of the random input (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default: float32")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="manualconv kernels (default: the current backend on the CPU, 'reference' elsewhere)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters, input and loss (default: 0)")
    parser.add_argument("--train", action="store_true", help="training mode (batch statistics, dropout); default: eval")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    parser.add_argument("--coverage", nargs="?", const="all", metavar="BUILDERS",
                        help="instead of MODEL: for every torchvision classification builder (or the comma-separated "
                             "BUILDERS), whether convert leaves it hand-derived and which native backward nodes remain")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns 0 (no row fails) or 1 (some row fails); bad arguments raise SystemExit(2)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.coverage is not None:
        builders = classification_builders() if args.coverage == "all" else args.coverage.split(",")
        unknown = sorted(set(builders) - set(classification_builders()))
        if unknown:
            parser.error(f"--coverage: not torchvision classification builders: {', '.join(unknown)}")
        coverage(builders)
        return 0
    if args.model is None:
        parser.error("the following arguments are required: MODEL (or --coverage)")
    try:
        device, backend = resolve_device_and_backend(args.device, args.backend)
        settings = Settings(args.model, parse_shape(args.input_shape), DTYPES[args.dtype], device, backend,
                            args.seed, args.train)
        report = verify(settings)
    except UsageError as error:
        parser.error(str(error))
    print(json.dumps(report.to_json(), indent=2, allow_nan=False) if args.json else format_table(report))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
