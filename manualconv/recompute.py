"""Activations after a training batch norm rebuilt in the backward instead of kept: y = f(BN(x)).

A CNN's commonest pair is a batch norm in training followed by an activation,
y = f(z), z = BN(x) = γ·(x − μ)·σ⁻¹ + β, whose output feeds a conv. torch.nn's layers keep y or z
for the activation's backward (ReLU keeps y for its selection δz = δy where y > 0; GELU, SiLU,
hardswish ... keep z for f′(z); ReLU6 in place a copy of z) and y again for the conv's
∂J/∂W = y ⋆ δ. Yet the batch norm's backward keeps x, μ, σ⁻¹ and γ anyway, so z and y are
functions of tensors the graph holds already. Here the activation and the conv save those (and β)
in their place and rebuild in their backward: z by the forward's own ``batch_norm_apply`` (per
channel a·x + b, a = γ·σ⁻¹, b = β − μ·a), y = f(z) by the activation's own forward. Both are
elementwise with no reduction, so the rebuilt tensors equal the forward's bit for bit; their
memory is free as soon as the forward has used them, for one pass per rebuild in the backward.
ReLU's selection and the in-place ReLU6's mask read the same from z as from y (z > 0 exactly where
y > 0; min < z < max exactly where min < y < max; NaN in both), so their backward rebuilds z only.

Which activations (``set_recompute``, MANUALCONV_RECOMPUTE; MODES below): the piecewise ones by
default, whose rebuild costs one pass over memory; GELU, SiLU and ELU too with 'all'.

What stays as torch's:
- the values, bit for bit (tests/test_recompute.py compares with the kept tensor and with torch.nn);
- double backward: where the backward is differentiated again, z and y are rebuilt by the
  Functions (BatchNormFunction, the activation's), so their derivatives reach x, γ and β as the
  kept ones' do;
- an in-place write, before the backward, to a tensor torch would have kept (y, or z) raises
  torch's error as if it had been kept (it is watched by a weak reference and its version); an
  in-place write to x, γ or β raises it too (they are saved), where torch's would only for x and
  γ, which its batch norm keeps.
What does not: a write through ``.data`` to x, γ or β between the forward and the backward,
which bypasses version counters, changes the rebuilt y (torch.utils.checkpoint has the same caveat).

Off under torch.func transforms, forward-mode AD, torch.compile and saved-tensor hooks (such as
``torch.autograd.graph.save_on_cpu``): their own graphs and hooks decide what is kept.
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple, Optional, Tuple

import torch

from .backend import kernels

# Which activations after a training batch norm are rebuilt rather than kept. Measured on an AMD
# EPYC Zen 5 (avx512, 2 threads), training steps of bench.MODELS, time with "none" / time with the
# mode in alternating pairs (21 each), and held memory against torch.nn's:
# - "piecewise" (the default): the piecewise polynomials (ReLU, hardtanh / ReLU6, leaky ReLU,
#   hardswish, hardsigmoid: Functions with ``piecewise = True``), rebuilt in one pass over memory.
#   ResNet-20 1.000–1.044, memory 1.01 → 0.75; mobilenet_v2 0.989–1.004, 0.74 → 0.42; airbench
#   (GELU: nothing rebuilt) 1.005–1.008, 0.74;
# - "all": GELU, SiLU and ELU too, whose rebuild evaluates erf or exp once more for each entry:
#   airbench 0.965–0.975 (3 % slower), memory 0.74 → 0.59;
# - "none": every activation keeps what torch.nn's keeps.
MODES = ("piecewise", "all", "none")


def _checked(mode, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"manualconv: {where} must be one of {MODES}, but got {mode!r}")
    return mode


_mode = _checked(os.environ.get("MANUALCONV_RECOMPUTE", "piecewise"), "MANUALCONV_RECOMPUTE")


def set_recompute(mode: str) -> None:
    """Which activations after a training batch norm are rebuilt in the backward instead of kept:
    'piecewise' (default: ReLU, hardtanh / ReLU6, leaky ReLU, hardswish, hardsigmoid), 'all'
    (GELU, SiLU, ELU too) or 'none'. Results are the same bits in every mode."""
    global _mode
    _mode = _checked(mode, "set_recompute(): argument 'mode'")


def get_recompute() -> str:
    return _mode


class Recipe(NamedTuple):
    """How a tensor is rebuilt from saved (x, γ, β, μ, σ⁻¹): z = BN(x) = batch_norm_apply(x, μ, σ⁻¹,
    γ, β) by ``backend``'s kernel, then y = f(z) = function.forward(z, *args) when ``activation`` is
    (function, args): the forward's own calls, hence its bits."""
    eps: float
    backend: str
    activation: Optional[tuple] = None


class Source(NamedTuple):
    tensors: Tuple[Optional[torch.Tensor], ...]  # (x, γ, β, μ, σ⁻¹): saved in place of the tensor
    recipe: Recipe


def _active() -> bool:
    # (a Function's forward and setup_context run with grad mode off: whether a node exists is the test)
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active() \
        and getattr(torch.autograd.forward_ad, "_current_level", 0) < 0 \
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _saved(node, count: int) -> Optional[tuple]:
    try:
        return node.saved_tensors[:count]
    except RuntimeError:  # the graph's backward has run and freed them: keep the tensor itself
        return None


def may_rebuild() -> bool:
    """Whether anything may be rebuilt here and now (the mode and the context alone)."""
    return _mode != "none" and _active()


def function_of(ctx):
    """The Function whose node ctx is (autograd.py's eager twin: the class it was made from)."""
    return getattr(ctx._forward_cls, "function", ctx._forward_cls)


def batch_norm_output(z: torch.Tensor, function, writes: int = 0) -> Optional[Source]:
    """For the activation ``function`` of z: if z = BN(x) as a training-mode BatchNormFunction
    returned it, changed since by nothing but the caller's own ``writes`` in-place writes, and the
    mode rebuilds ``function``, the source to save in place of z or of f(z); else None."""
    if _mode == "none" or (_mode == "piecewise" and not getattr(function, "piecewise", False)):
        return None
    if not _active():  # (before any grad_fn: torch.compile cannot trace one)
        return None
    node = z.grad_fn
    conf = getattr(node, "rebuilds_output", None)  # (β, ε, backend): BatchNormFunction.setup_context
    if conf is None or z._version != writes:
        return None
    saved = _saved(node, 4)
    if saved is None:
        return None
    x, weight, mean, invstd = saved
    bias, eps, backend = conf
    return Source((x, weight, bias, mean, invstd), Recipe(eps, backend))


def mark_rebuilt(ctx, output: torch.Tensor, source: Source, args, function=None) -> None:
    """For an activation y = function.forward(z, *args) of a batch norm's z = BN(x) (the source's):
    a later Function taking y as input may save the source in its place (``rebuildable``).
    function: ctx's own Function by default."""
    if function is None:
        function = function_of(ctx)
    ctx.rebuilds_input = source.recipe._replace(activation=(function, tuple(args)))
    # a dirty (in-place) output's version is bumped once more after setup_context: returned() reads it
    ctx.output_version = None if getattr(ctx, "dirty_tensors", None) else output._version


def returned(t: torch.Tensor) -> torch.Tensor:
    """An in-place activation's output as its Function returns it: torch bumps a dirty tensor's
    version once more after setup_context, so the version a later reader must find is read here."""
    node = t.grad_fn
    if getattr(node, "rebuilds_input", None) is not None:
        node.output_version = t._version
    return t


def rebuildable(t: torch.Tensor) -> Optional[Source]:
    """The source of t if t is the unchanged output of an activation that rebuilds it (mark_rebuilt)."""
    if not _active():
        return None
    node = t.grad_fn
    recipe = getattr(node, "rebuilds_input", None)
    if recipe is None or t._version != node.output_version:
        return None
    saved = _saved(node, 5)
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


def save(ctx, t: Optional[torch.Tensor], source: Optional[Source], *others, made_by=None) -> None:
    """ctx.save_for_backward(t, *others), with the source's tensors in place of t where it has one.
    A write to t before the backward then raises as if t were kept: t is watched, as made by
    ``made_by`` (ctx for its own output; default t.grad_fn), unless t is None."""
    watch = None if source is None or t is None else Watch.of(t, t.grad_fn if made_by is None else made_by)
    ctx.rebuild = None if source is None else (source.recipe, watch)
    ctx.save_for_backward(*((t,) if source is None else source.tensors), *others)


def saved(ctx, differentiable: bool, activate: bool = True) -> tuple:
    """ctx.saved_tensors as ``save`` was given them: t (rebuilt where it has a source), *others.
    ``activate=False``: z = BN(x) alone, for an activation's own backward (what it kept: z, or y
    for ReLU, whose selection reads the same from z: z > 0 exactly where y > 0, NaN where y is)."""
    tensors = ctx.saved_tensors
    if ctx.rebuild is None:
        return tensors
    recipe, watch = ctx.rebuild
    if watch is not None:
        watch.check()
    recipe = recipe if activate else recipe._replace(activation=None)
    return (rebuild(recipe, tensors[:5], differentiable),) + tuple(tensors[5:])


def rebuild(recipe: Recipe, tensors: tuple, differentiable: bool) -> torch.Tensor:
    """y = f(BN(x)) (or z = BN(x)) from the saved (x, γ, β, μ, σ⁻¹) by the forward's kernels, bit
    for bit; ``differentiable``: by the Functions, so a second derivative reaches x, γ and β."""
    x, weight, bias, mean, invstd = tensors
    if differentiable:
        from .autograd import BatchNormFunction
        z = BatchNormFunction.apply(x, weight, bias, mean, invstd, True, recipe.eps, recipe.backend)
        return z if recipe.activation is None else recipe.activation[0].apply(z, *recipe.activation[1])
    with torch.no_grad():
        z = kernels(recipe.backend).batch_norm_apply(x, mean, invstd, weight, bias)  # z = γ·(x − μ)·σ⁻¹ + β
        if recipe.activation is None:
            return z
        function, args = recipe.activation
        forward_ = getattr(function, "forward_", None)  # in place where f has that form: z is the rebuild's own
        return (function.forward if forward_ is None else forward_)(z, *args)  # y = f(z)
