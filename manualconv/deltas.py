"""Seeing the deltas: record, per manualconv layer and per backward pass, the norm of the delta
δ = ∂J/∂y arriving at the layer's output and the norms of its parameter gradients.

    with manualconv.record_deltas(model) as record:
        for x, target in batches:
            loss = criterion(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    record.deltas["features.0"]          # [‖δ‖ of the first backward, of the second, ...]
    record.param_grads["features.0.weight"]
    record.as_rows()                     # [{"step": 0, "name": ..., "kind": "delta", "norm": ...}, ...]

The layers recorded are the modules whose class comes from manualconv.modules (the ones whose
backward is hand-derived). A forward hook puts a tensor hook on each layer's output, which
receives δ; a tensor hook on each parameter receives that parameter's gradient of this backward
pass alone (not the accumulated ``.grad``). A layer called several times in one forward (a
shared ReLU) gets one entry per backward: the norm of all its deltas together,
sqrt(Σ‖δ_call‖²). Every list has one entry per backward pass run in the block (NaN for a pass
that did not reach the layer), so the lists line up for plotting. Forward passes without
gradient (``torch.no_grad()``) record nothing. All hooks are removed when the block exits.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List

import torch
from torch.autograd import Variable

__all__ = ["record_deltas", "DeltaRecord"]


def is_manualconv_layer(module: torch.nn.Module) -> bool:
    """A manualconv layer: its class comes from manualconv.modules (its backward is hand-derived;
    models.py's containers and helpers such as Mul are not). verify.py uses it too."""
    return type(module).__module__ == "manualconv.modules"


class DeltaRecord:
    """The norms recorded by :func:`record_deltas`, one entry per backward pass.

    ``deltas``       {layer name: [‖δ‖, ...]}          δ = ∂J/∂(layer output)
    ``param_grads``  {"layer.weight": [‖∂J/∂W‖, ...]}  this pass's gradient, before accumulation
    ``passes``       the number of backward passes recorded
    """

    def __init__(self) -> None:
        self.deltas: Dict[str, List[float]] = {}
        self.param_grads: Dict[str, List[float]] = {}
        self.passes = 0
        self._pending: Dict[str, Dict[str, List[torch.Tensor]]] = {"delta": {}, "grad": {}}
        self._in_pass = False

    # -- while a backward pass runs -----------------------------------------------------------

    def _add(self, kind: str, name: str, gradient: torch.Tensor) -> None:
        """Hold this gradient's squared norm until the pass ends (no device sync per hook)."""
        squared = torch.linalg.vector_norm(gradient.detach(), dtype=torch.float64) ** 2
        self._pending[kind].setdefault(name, []).append(squared)
        if not self._in_pass:
            self._in_pass = True
            Variable._execution_engine.queue_callback(self._end_pass)  # runs when this backward ends

    def _end_pass(self) -> None:
        """One entry per layer: the norm of everything it received in this pass."""
        for kind, table in (("delta", self.deltas), ("grad", self.param_grads)):
            pending = self._pending[kind]
            names = list(pending)
            norms = torch.stack([torch.stack(pending[n]).sum() for n in names]).sqrt().tolist() if names else []
            for name, norm in zip(names, norms):
                column = table.setdefault(name, [])
                column.extend([math.nan] * (self.passes - len(column)))  # passes that missed this layer
                column.append(norm)
            pending.clear()
        self.passes += 1
        self._in_pass = False

    def _finish(self) -> None:
        """Line every list up with the number of passes."""
        for table in (self.deltas, self.param_grads):
            for column in table.values():
                column.extend([math.nan] * (self.passes - len(column)))

    # -- reading ------------------------------------------------------------------------------

    def as_rows(self) -> List[Dict[str, object]]:
        """Long format, one dict per (pass, name): {"step", "name", "kind" ('delta' or 'grad'), "norm"}."""
        rows = []
        for step in range(self.passes):
            for kind, table in (("delta", self.deltas), ("grad", self.param_grads)):
                for name, column in table.items():
                    if step < len(column):
                        rows.append({"step": step, "name": name, "kind": kind, "norm": column[step]})
        return rows

    def __repr__(self) -> str:
        return f"DeltaRecord(passes={self.passes}, layers={list(self.deltas)}, params={list(self.param_grads)})"


@contextlib.contextmanager
def record_deltas(model: torch.nn.Module) -> Iterator[DeltaRecord]:
    """Record δ norms and parameter-gradient norms of ``model``'s manualconv layers for every
    backward pass run inside the block (see the module docstring)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"record_deltas: expected a torch.nn.Module, but got {type(model).__name__}")
    record = DeltaRecord()
    handles = []

    def on_output(name: str):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):  # MaxPool2d(return_indices=True): (y, indices)
                output = output[0]
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda delta: record._add("delta", name, delta))

        return hook

    try:
        for name, module in model.named_modules():
            if not is_manualconv_layer(module):
                continue
            handles.append(module.register_forward_hook(on_output(name or type(module).__name__)))
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    qualified = f"{name}.{pname}" if name else pname
                    handles.append(param.register_hook(lambda g, q=qualified: record._add("grad", q, g)))
        yield record
    finally:
        for handle in handles:
            handle.remove()
        record._finish()
