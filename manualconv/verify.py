"""Verify a whole model's hand-derived backward pass against torch.nn, layer by layer.

    python -m manualconv.verify resnet18 --input-shape 2,3,64,64
    python -m manualconv.verify my_models:make_net --dtype float64 --json

MODEL is a torchvision model name (built with ``weights=None`` and its default number of
classes) or ``module:callable`` (the module is imported and the callable called with no
arguments; it must return a ``torch.nn.Module``). The model is built once from ``--seed``;
``manualconv.convert`` makes the manualconv copy, so both models hold the same parameters.
Both run forward and backward on the same random input, and the loss is the same random
projection of the outputs, J = Σ ⟨output, g⟩, so every output entry gets a different delta.

For every leaf module and the model itself (one row per call: a module called twice, such as
torchvision's ResNet blocks' ``relu``, gives rows ``name`` and ``name#2``) the two models'
output, input gradient (this call's own contribution, ∂J/∂input through this module only),
weight gradient and bias gradient are compared: max |manualconv − torch| and the same divided
by the tensor's scale. Parameter gradients (summed over calls) are reported on a module's
first row.

Mode: eval by default, so batch norm is a fixed per-channel affine map and dropout is off — the
comparison then isolates the layers manualconv implements. ``--train`` runs training mode:
batch statistics become part of the forward and backward, and dropout draws the same masks in
both models (the generator is re-seeded before each forward).

Tolerance: a tensor passes when max |manualconv − torch| ≤ rtol × scale, where the scale is
max |torch's tensor|, except for bias gradients, whose scale is the size of the terms they add
up, max over channels of Σ |δ| (a bias gradient is a sum of deltas that may cancel to almost
nothing — a conv bias before a training-mode batch norm has gradient ≈ 0 — and then its
rounding noise measured against its own size would be meaningless).

    float32: rtol = 1e-3. A float32 operation rounds to ~6e-8 relative; a long sum of n terms
             can lose up to ~n·6e-8 of the terms' size, and the error compounds through every
             layer of the forward and again through the backward. On torchvision networks
             the differences measured at 1e-6..1e-4 (ResNet-18: about 1e-5); a mistake in a
             derivation is of the order of the values themselves (a gradient scaled by 1.01
             shows as 1e-2).
    float64: rtol = 1e-9. The same compounding from ~1e-16 per operation: measured
             differences stay below 1e-12, and 1e-9 leaves room for deeper networks while
             catching any mistake larger than a billionth.

A float32 caveat: if two entries of a max-pool window differ by less than the rounding, the
two models may pick different winners and route that delta differently. Use ``--dtype float64``
for a definitive answer.

The exit status is 0 when every row passes, 1 when any fails, 2 for bad arguments (an unknown
model, a malformed shape, a module that cannot be imported, ...). ``--json`` prints the report
as JSON instead of the table. The rows whose inputs agree but whose results do not are named as
the places where the differences start (``sources``): for a wrong backward, the layer whose δ
agrees but whose input or parameter gradient does not.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import ops
from .backend import BACKENDS, get_backend, use_backend
from .convert import convert

TOLERANCES = {torch.float32: 1e-3, torch.float64: 1e-9}
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
        raise UsageError(
            f"unknown model {spec!r}: not a torchvision model name ({error}); "
            "see torchvision.models.list_models(), or give module:callable"
        ) from None


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


def resolve_device_and_backend(device_name: str, backend: Optional[str]) -> Tuple[torch.device, str]:
    """The device must exist; the 'cpp' kernels are CPU-only, so other devices default to 'reference'."""
    try:
        device = torch.device(device_name)
        torch.empty(0, device=device)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"device {device_name!r} is not usable: {error}") from None
    if backend is None:
        backend = get_backend() if device.type == "cpu" else "reference"
    if backend == "cpp" and not ops.AVAILABLE:
        raise UsageError(f"the 'cpp' backend is not built ({ops.LOAD_ERROR}); use --backend reference")
    if backend == "cpp" and device.type != "cpu":
        raise UsageError(f"the 'cpp' backend runs on the CPU only; use --backend reference on {device}")
    return device, backend


# ---------------------------------------------------------------------------------------------
# Capturing every layer's tensors


@dataclass
class Call:
    """One call of one module: its input and output, and (after backward) the delta arriving at
    its output and the gradient it hands to its input."""

    input: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None
    grad_input: Optional[torch.Tensor] = None


def _first_float_tensor(value) -> Optional[torch.Tensor]:
    """The first floating-point tensor in a module's output (a tensor, tuple, list, dict, namedtuple)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_float_tensor(item)
            if found is not None:
                return found
    return None


def _all_float_tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _all_float_tensors(item)]
    return []


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """A private copy: the original may still be modified in place (ReLU(inplace=True), +=)."""
    return tensor.detach().clone()


class LayerRecorder:
    """Hooks on the model and on every leaf module record each call's tensors.

    The input gradient is this call's own contribution: a forward pre-hook hands the module a
    copy of its input and hooks the copy, so other consumers of the same tensor (a residual
    branch) do not add in. (A copy, not a view: a module that works in place, such as
    ReLU(inplace=True), then modifies the copy, and the hook still sees the gradient of the
    value before the modification; on a view it would not fire. The module's caller keeps its
    tensor unmodified, which changes nothing for modules that return their result.) The delta
    is a hook on the output: a tensor hook fires with the gradient of the value the tensor had
    when hooked, even if the caller later modifies it in place (ResNet's ``out += identity``)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: Dict[str, List[Call]] = {}
        self.order: List[Tuple[str, int]] = []  # (name, call index) in the order calls finish
        self.ops: Dict[str, torch.nn.Module] = {}
        self._open: Dict[str, List[Call]] = {}
        self._handles = []
        for name, module in model.named_modules():
            if name and next(module.children(), None) is not None:
                continue  # containers: their leaves have rows of their own
            row = name or MODEL_ROW
            self.ops[row] = module
            self._handles.append(module.register_forward_pre_hook(self._before(row)))
            self._handles.append(module.register_forward_hook(self._after(row)))

    def _before(self, row: str) -> Callable:
        def hook(module, args):
            call = Call()
            self._open.setdefault(row, []).append(call)
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None
            call.input = _keep(args[0])
            if not args[0].requires_grad:
                return None
            own = args[0].clone()
            own.register_hook(lambda grad: setattr(call, "grad_input", _keep(grad)))
            return (own,) + tuple(args[1:])

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

    recorder: LayerRecorder
    param_grads: Dict[str, Optional[torch.Tensor]]


def forward_backward(model: torch.nn.Module, x: torch.Tensor, seed: int, train: bool) -> Run:
    """One forward and backward with every layer recorded. The loss is J = Σ ⟨output, g⟩ with g
    drawn from ``seed``, the same for both models."""
    model.train(train)
    recorder = LayerRecorder(model)
    try:
        x = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)  # dropout (train mode) draws the same masks in both models
        outputs = _all_float_tensors(model(x))
        if not outputs:
            raise UsageError("the model returned no floating-point tensor to differentiate")
        generator = torch.Generator().manual_seed(seed + 1)
        loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)).sum()
                   for out in outputs)
        loss.backward()
    finally:
        recorder.remove()
    grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}
    return Run(recorder, grads)


# ---------------------------------------------------------------------------------------------
# Comparing


@dataclass
class Difference:
    """max |manualconv − torch| and that divided by the scale; inf where shapes or NaNs differ."""

    max_abs: float
    max_rel: float

    def passes(self, rtol: float) -> bool:
        return self.max_rel <= rtol


def difference(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
               scale: Optional[float] = None) -> Optional[Difference]:
    """Compare manualconv's tensor with torch's. None when neither has one; ``scale`` defaults
    to max |expected|."""
    if actual is None and expected is None:
        return None
    if actual is None or expected is None or actual.shape != expected.shape:
        return Difference(math.inf, math.inf)
    a, e = actual.detach().double(), expected.detach().double()
    same = (a == e) | (a.isnan() & e.isnan())  # equal infinities and matching NaNs agree
    if bool((a.isnan() != e.isnan()).any()):
        return Difference(math.inf, math.inf)
    error = torch.where(same, torch.zeros_like(a), (a - e).abs())
    max_abs = float(error.max()) if error.numel() else 0.0
    if scale is None:
        finite = e[e.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
    if max_abs == 0.0:
        return Difference(0.0, 0.0)
    return Difference(max_abs, max_abs / scale if scale > 0 else math.inf)


def bias_scale(module: torch.nn.Module, deltas: Sequence[torch.Tensor]) -> Optional[float]:
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


@dataclass
class Row:
    """One call of one layer in the report."""

    name: str
    op: str
    manual: bool  # the module is a manualconv layer (hand-derived backward)
    diffs: Dict[str, Optional[Difference]]  # output, grad_input, grad_weight, grad_bias, grad_<other param>
    input_diff: Optional[Difference]  # the inputs and deltas the two models gave this layer
    delta_diff: Optional[Difference]
    passed: bool = True
    source: Optional[str] = None  # 'forward' / 'backward': differences start here

    def to_json(self) -> Dict[str, Any]:
        def encode(d: Optional[Difference]):
            return None if d is None else {"max_abs": _finite_or_str(d.max_abs), "max_rel": _finite_or_str(d.max_rel)}

        return {"name": self.name, "op": self.op, "manualconv": self.manual, "passed": self.passed,
                "source": self.source, **{k: encode(v) for k, v in self.diffs.items()},
                "input": encode(self.input_diff), "delta": encode(self.delta_diff)}


def _finite_or_str(value: float):
    return value if math.isfinite(value) else str(value)


def _is_manual(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("manualconv.")


def compare_runs(manual_run: Run, native_run: Run, rtol: float) -> List[Row]:
    """One row per call, in forward order; parameter gradients on each module's first row."""
    manual, native = manual_run.recorder, native_run.recorder
    rows = []
    for name, index in native.order:
        module, native_call = native.ops[name], native.calls[name][index]
        manual_calls = manual.calls.get(name, [])
        manual_call = manual_calls[index] if index < len(manual_calls) else Call()
        diffs = {
            "output": difference(manual_call.output, native_call.output),
            "grad_input": difference(manual_call.grad_input, native_call.grad_input),
        }
        if index == 0 and name != MODEL_ROW:
            deltas = [call.delta for call in native.calls[name]]
            for pname, _ in module.named_parameters(recurse=False):
                key = "grad_" + ("weight" if pname == "weight" else "bias" if pname == "bias" else pname)
                qualified = f"{name}.{pname}"
                scale = bias_scale(module, deltas) if pname == "bias" else None
                diffs[key] = difference(manual_run.param_grads.get(qualified), native_run.param_grads.get(qualified), scale)
        row = Row(name if index == 0 else f"{name}#{index + 1}", type(manual.ops[name]).__name__,
                  _is_manual(manual.ops[name]), diffs,
                  difference(manual_call.input, native_call.input), difference(manual_call.delta, native_call.delta))
        row.passed = all(d is None or d.passes(rtol) for d in diffs.values())
        row.source = _source(row, rtol)
        rows.append(row)
    missing = [name for name in manual.calls if name not in native.calls]
    for name in missing:  # a layer that ran only in the manualconv model
        rows.append(Row(name, type(manual.ops[name]).__name__, _is_manual(manual.ops[name]),
                        {"output": Difference(math.inf, math.inf)}, None, None, passed=False, source="forward"))
    return rows


def _source(row: Row, rtol: float) -> Optional[str]:
    """'forward' if the layer got matching inputs but its output differs; 'backward' if it got
    matching deltas but its gradients differ; None if it passes or only inherits differences."""
    agrees = lambda d: d is None or d.passes(rtol)  # noqa: E731
    if not agrees(row.diffs.get("output")) and agrees(row.input_diff):
        return "forward"
    gradients = [d for key, d in row.diffs.items() if key != "output"]
    if not all(agrees(d) for d in gradients) and agrees(row.delta_diff) and agrees(row.diffs.get("output")):
        return "backward"
    return None


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
    def rtol(self) -> float:
        return TOLERANCES[self.dtype]


@dataclass
class Report:
    settings: Settings
    rows: List[Row] = field(default_factory=list)
    error: Optional[str] = None  # manualconv raised where torch did not

    @property
    def passed(self) -> bool:
        return self.error is None and all(row.passed for row in self.rows)

    @property
    def sources(self) -> List[Row]:
        return [row for row in self.rows if row.source]

    def to_json(self) -> Dict[str, Any]:
        s = self.settings
        return {
            "model": s.model, "input_shape": list(s.input_shape), "dtype": str(s.dtype).replace("torch.", ""),
            "device": str(s.device), "backend": s.backend, "seed": s.seed, "mode": "train" if s.train else "eval",
            "tolerance": {"rtol": s.rtol, "rule": "max|manualconv - torch| <= rtol * scale; scale = max|torch| "
                          "(bias gradients: max over channels of sum|delta|)"},
            "passed": self.passed, "error": self.error,
            "failures": [row.name for row in self.rows if not row.passed],
            "sources": [{"name": row.name, "direction": row.source} for row in self.sources],
            "layers": [row.to_json() for row in self.rows],
        }


def verify(settings: Settings) -> Report:
    """Build, convert, run both models and compare them."""
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
        raise UsageError(f"torch.nn cannot run {settings.model} on input of shape {list(settings.input_shape)}: "
                         f"{type(error).__name__}: {error}") from None
    report = Report(settings)
    try:
        with use_backend(settings.backend):
            manual_run = forward_backward(manual, x, settings.seed, settings.train)
    except Exception as error:  # noqa: BLE001 - torch ran it and manualconv did not: a failure
        report.error = f"manualconv raised {type(error).__name__}: {error}"
        return report
    report.rows = compare_runs(manual_run, native_run, settings.rtol)
    return report


# ---------------------------------------------------------------------------------------------
# Output


def _cell(d: Optional[Difference]) -> str:
    if d is None:
        return f"{'-':>8} {'-':>8}"
    return f"{d.max_abs:8.1e} {d.max_rel:8.1e}"


def format_table(report: Report) -> str:
    """The per-layer table with a heading and a verdict."""
    s = report.settings
    lines = [
        f"manualconv.verify {s.model}: input {list(s.input_shape)} {str(s.dtype).replace('torch.', '')} on {s.device}, "
        f"{'train' if s.train else 'eval'} mode, backend {s.backend}, seed {s.seed}",
        f"tolerance: max|manualconv - torch| <= {s.rtol:g} x max|torch| per tensor "
        "(bias gradients: x max over channels of sum|delta|)",
        "",
    ]
    if report.error:
        lines.append(f"FAIL: {report.error}")
        return "\n".join(lines)
    width = max([len(r.name) for r in report.rows] + [5])
    op_width = max([len(r.op) + 1 for r in report.rows] + [2])
    names = ("output", "input grad", "weight grad", "bias grad")
    lines.append(f"{'layer':<{width}}  {'op':<{op_width}}  " + "  ".join(f"{n:<17}" for n in names) + "  status")
    lines.append(f"{'':<{width}}  {'':<{op_width}}  " + "  ".join(f"{'abs':>8} {'rel':>8}" for _ in names))
    for row in report.rows:
        op = row.op + ("*" if row.manual else "")
        cells = "  ".join(_cell(row.diffs.get(q)) for q in QUANTITIES)
        status = "PASS" if row.passed else "FAIL"
        if row.source:
            status += f"  <- differences start here ({row.source})"
        lines.append(f"{row.name:<{width}}  {op:<{op_width}}  {cells}  {status}")
        extra = [key for key in row.diffs if key not in QUANTITIES]
        for key in extra:  # parameters other than weight and bias
            lines.append(f"{'':<{width}}  {key:<{op_width}}  {_cell(row.diffs[key])}")
    lines.append("")
    lines.append("* manualconv layer (hand-derived backward); the others are torch.nn's own, compared because "
                 "their inputs and deltas pass through manualconv layers.")
    failures = [row for row in report.rows if not row.passed]
    if not failures:
        lines.append(f"PASS: all {len(report.rows)} rows within tolerance.")
    else:
        lines.append(f"FAIL: {len(failures)} of {len(report.rows)} rows beyond tolerance: "
                     + ", ".join(row.name for row in failures))
        for row in report.sources:
            what = ("its input agrees, its output does not" if row.source == "forward"
                    else "its delta agrees, its gradients do not")
            lines.append(f"differences start at {row.name} ({row.op}): {what}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m manualconv.verify",
        description="Compare a model's manualconv forward and backward with torch.nn's, layer by layer.",
    )
    parser.add_argument("model", metavar="MODEL", help="a torchvision model name (e.g. resnet18) or module:callable")
    parser.add_argument("--input-shape", default=",".join(map(str, DEFAULT_INPUT_SHAPE)), metavar="N,C,H,W",
                        help="shape of the random input (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default: float32")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="manualconv kernels (default: the current backend on the CPU, 'reference' elsewhere)")
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters, input and loss (default: 0)")
    parser.add_argument("--train", action="store_true", help="training mode (batch statistics, dropout); default eval")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 all rows pass, 1 some row fails, 2 bad arguments (raised as SystemExit)."""
    parser = make_parser()
    args = parser.parse_args(argv)
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
