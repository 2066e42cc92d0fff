"""Which kernels the autograd Functions call: ``'cpp'`` (csrc/, the default when built) or
``'reference'`` (reference.py, plain tensor code)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

from . import ops, reference

BACKENDS = ("cpp", "reference")
_current = "cpp" if ops.AVAILABLE else "reference"
if not ops.AVAILABLE:
    warnings.warn(
        f"manualconv: the C++ extension is not built ({ops.LOAD_ERROR}); using the slow "
        "'reference' backend. Build it with: pip install --no-build-isolation -e .",
        stacklevel=2,
    )


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"manualconv: backend must be one of {BACKENDS}, but got backend={name!r}")
    if name == "cpp" and not ops.AVAILABLE:
        raise RuntimeError(f"manualconv: the 'cpp' backend is not available: {ops.LOAD_ERROR}")
    return name


def set_backend(name: str) -> None:
    """Select the kernels used from now on: 'cpp' or 'reference'."""
    global _current
    _current = _validate(name)


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with manualconv.use_backend('reference'): ...`` selects a backend for a block."""
    global _current
    previous, _current = _current, _validate(name)
    try:
        yield
    finally:
        _current = previous


def kernels(name: str):
    """The namespace holding ``name``'s kernels; both have the same functions and signatures."""
    return torch.ops.manualconv if name == "cpp" else reference
