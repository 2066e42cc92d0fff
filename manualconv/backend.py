"""Which kernels the autograd Functions call: ``'cpp'`` (csrc/, the default when built) or
``'reference'`` (reference.py, plain tensor code)."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator, Optional

import torch

from . import ops, reference

BACKENDS = ("cpp", "reference")
# The process default (set_backend) and each thread's own choice inside use_backend blocks, like
# torch's no_grad and autocast: a block in one thread never changes what another thread runs.
_default = "cpp" if ops.AVAILABLE else "reference"
_chosen: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("manualconv_backend", default=None)
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
    """Select the kernels used from now on: 'cpp' or 'reference'. Sets the process default (what
    every thread runs outside ``use_backend`` blocks); inside a block, the calling thread switches
    too, until the block ends."""
    global _default
    _default = _validate(name)
    if _chosen.get() is not None:
        _chosen.set(_default)


def get_backend() -> str:
    """The backend the calling thread runs now."""
    chosen = _chosen.get()
    return _default if chosen is None else chosen


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with manualconv.use_backend('reference'): ...`` selects a backend for a block, in the
    calling thread (and asyncio task) only."""
    token = _chosen.set(_validate(name))
    try:
        yield
    finally:
        _chosen.reset(token)


def kernels(name: str):
    """The namespace holding ``name``'s kernels; both have the same functions and signatures."""
    return torch.ops.manualconv if name == "cpp" else reference
