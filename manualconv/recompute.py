"""Activations rebuilt in the backward instead of kept: y = max(BN(x), 0) after a training-mode batch norm.

A CNN's commonest pair is a batch norm in training followed by a ReLU, y = max(γ·(x − μ)·σ⁻¹ + β, 0),
whose output feeds a conv. torch.nn's layers keep y twice over: the ReLU for its selection
(δz = δy where y > 0) and the conv for ∂J/∂W = y ⋆ δ. Yet the batch norm's backward keeps x, μ,
σ⁻¹ and γ anyway, so y is a function of tensors the graph holds already. Here the ReLU and the conv
save those (and β) in place of y, and rebuild y in their backward by the forward's own kernel
calls: ``batch_norm_apply`` (per channel a·x + b with a = γ·σ⁻¹, b = β − μ·a) and ``clamp(min=0)``,
elementwise with no reduction, so the rebuilt y equals the forward's bit for bit. y's memory is
free as soon as the forward has used it; the cost is one elementwise pass per use in the backward.
(ResNet-20 at batch 128 keeps 92 MiB of ReLU outputs, half of them of this kind.)

What stays as torch's:
- the values, bit for bit (tests/test_recompute.py compares with the kept tensor and with torch.nn);
- double backward: where the backward is differentiated again, y is rebuilt by the Functions
  (BatchNormFunction, ReLUFunction), so its derivative reaches x, γ and β as the kept y's does;
- an in-place change of y between the forward and the backward raises torch's error, as a kept y
  would (y is watched by a weak reference and its version); an in-place change of x, γ or β
  raises it too (they are saved), where torch's would only for x and γ, which its batch norm keeps.
What does not: a write through ``.data`` to x, γ or β between the forward and the backward,
which bypasses version counters, changes the rebuilt y (torch.utils.checkpoint has the same caveat).

Off under torch.func transforms, forward-mode AD, torch.compile and saved-tensor hooks (such as
``torch.autograd.graph.save_on_cpu``): their own graphs and hooks decide what is kept. Off too by
``set_recompute(False)`` or MANUALCONV_RECOMPUTE=0, for a comparison; the results do not change.
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple, Optional, Tuple

import torch

from .backend import kernels

_enabled = os.environ.get("MANUALCONV_RECOMPUTE", "1") != "0"


def set_recompute(enabled: bool) -> None:
    """Rebuild ReLU outputs after batch norm in the backward (True, the default) or keep them."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_recompute(): argument 'enabled' must be bool, not {type(enabled).__name__}")
    _enabled = enabled


def get_recompute() -> bool:
    return _enabled


class Recipe(NamedTuple):
    """How a tensor is rebuilt from saved (x, γ, β, μ, σ⁻¹): BN(x) = batch_norm_apply(x, μ, σ⁻¹, γ, β)
    by ``backend``'s kernel, then max(·, 0) when ``relu``."""
    eps: float
    backend: str
    relu: bool


class Source(NamedTuple):
    tensors: Tuple[Optional[torch.Tensor], ...]  # (x, γ, β, μ, σ⁻¹): saved in place of the tensor
    recipe: Recipe


def _active() -> bool:
    # (a Function's forward and setup_context run with grad mode off: whether a node exists is the test)
    return _enabled and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active() \
        and getattr(torch.autograd.forward_ad, "_current_level", 0) < 0 \
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _saved(node) -> Optional[tuple]:
    try:
        return node.saved_tensors
    except RuntimeError:  # the graph's backward has run and freed them: keep the tensor itself
        return None


def batch_norm_output(z: torch.Tensor, writes: int = 0) -> Optional[Source]:
    """z = BN(x) as a training-mode BatchNormFunction returned it, changed since by nothing but the
    caller's own ``writes`` in-place writes: the source to save in place of max(z, 0), or None."""
    if not _active():  # (first: torch.compile cannot trace a grad_fn)
        return None
    node = z.grad_fn
    conf = getattr(node, "rebuilds_output", None)  # (β, ε, backend): BatchNormFunction.setup_context
    if conf is None or z._version != writes:
        return None
    saved = _saved(node)
    if saved is None:
        return None
    x, weight, mean, invstd = saved
    bias, eps, backend = conf
    return Source((x, weight, bias, mean, invstd), Recipe(eps, backend, relu=True))


def mark_rebuilt(ctx, output: torch.Tensor, source: Source) -> None:
    """For a Function whose output ``output`` is the source's tensor (the ReLU's y): a later
    Function taking y as input may save the source in its place (``rebuildable``)."""
    ctx.rebuilds_input = source.recipe
    ctx.output_version = output._version


def rebuildable(t: torch.Tensor) -> Optional[Source]:
    """The source of t if t is the unchanged output of a Function that rebuilds it (mark_rebuilt)."""
    if not _active():
        return None
    node = t.grad_fn
    recipe = getattr(node, "rebuilds_input", None)
    if recipe is None or t._version != node.output_version:
        return None
    saved = _saved(node)
    return None if saved is None else Source(saved, recipe)


class Watch(NamedTuple):
    """A rebuilt tensor's weak reference and version at save time: a write to it before the
    backward raises torch's error for a modified saved tensor, as if it had been kept."""
    ref: weakref.ReferenceType
    version: int
    made_by: str

    @staticmethod
    def of(t: torch.Tensor, made_by) -> "Watch":
        return Watch(weakref.ref(t), t._version, type(made_by).__name__)

    def check(self) -> None:
        t = self.ref()
        if t is not None and t._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{t.type()} {list(t.shape)}], which is output 0 of {self.made_by}, is at version "
                f"{t._version}; expected version {self.version} instead.")


def save(ctx, t: torch.Tensor, source: Optional[Source], *others, output: bool = False) -> None:
    """ctx.save_for_backward(t, *others), with the source's tensors in place of t where it has one
    (``output``: t is ctx's own output, else an input made by t.grad_fn)."""
    ctx.rebuild = None if source is None else (source.recipe, Watch.of(t, ctx if output else t.grad_fn),
                                               len(source.tensors))
    ctx.save_for_backward(*((t,) if source is None else source.tensors), *others)


def saved(ctx, differentiable: bool, relu: bool = True) -> tuple:
    """ctx.saved_tensors as ``save`` was given them: t (rebuilt where it has a source), *others.
    ``relu=False`` may skip the clamp for a reader that finds the same answer in BN(x) as in y
    (the ReLU's own selection: BN(x) > 0 exactly where y > 0, NaN where y is NaN)."""
    tensors = ctx.saved_tensors
    if ctx.rebuild is None:
        return tensors
    recipe, watch, n = ctx.rebuild
    watch.check()
    return (rebuild(recipe._replace(relu=recipe.relu and relu), tensors[:n], differentiable),) + tuple(tensors[n:])


def rebuild(recipe: Recipe, tensors: tuple, differentiable: bool) -> torch.Tensor:
    """y = max(BN(x), 0) from the saved (x, γ, β, μ, σ⁻¹) by the forward's kernels (bit-identical);
    ``differentiable``: by the Functions, so a second derivative reaches x, γ and β."""
    x, weight, bias, mean, invstd = tensors
    if differentiable:
        from .autograd import BatchNormFunction, ReLUFunction
        z = BatchNormFunction.apply(x, weight, bias, mean, invstd, True, recipe.eps, recipe.backend)
        return ReLUFunction.apply(z, recipe.backend) if recipe.relu else z
    with torch.no_grad():
        z = kernels(recipe.backend).batch_norm_apply(x, mean, invstd, weight, bias)  # BN(x) = γ·(x − μ)·σ⁻¹ + β
        return z.clamp_(min=0) if recipe.relu else z  # y = max(BN(x), 0)
