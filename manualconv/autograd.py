"""The hand-derived backward passes, as ``torch.autograd.Function``s.

Each Function has a separate ``forward`` and ``setup_context`` (so ``torch.func`` can use it)
and calls the kernels of the backend named in its last argument. Every backward is itself
built from these Functions, so the derivatives of the derivatives are hand-derived too and
double backward (``gradgradcheck``) works. The conv ops form a closed family of three linear
maps: y = conv(x, W), δx = grad_input(δ, W) and ∂J/∂W = grad_weight(x, δ); each one's adjoint
is one of the others. The pooling ops pair up the same way: max-pool routing with gathering
at the argmax, average spreading with average pooling.
"""

from __future__ import annotations

import inspect
import math

import torch

from . import recompute
from .backend import kernels
from .checks import check_conv2d
from .reference import (GELU_TANH_KAPPA, SQRT_2_OVER_PI, conv2d_grad_bias, gelu_tanh_inner, max_pool2d_gather,
                        normal_pdf)


class _PositionalBound(inspect.BoundArguments):
    """The binding of a call that gives every parameter positionally: nothing to look up, no
    default to apply."""

    __slots__ = ()

    @property
    def args(self):
        return tuple(self.arguments.values())

    @property
    def kwargs(self):
        return {}

    def apply_defaults(self):
        pass


class _ForwardSignature(inspect.Signature):
    """A ``forward``'s signature (plain positional-or-keyword parameters), binding a call that
    passes all of them positionally directly; any other call binds as inspect does."""

    __slots__ = ()

    def bind(self, /, *args, **kwargs):
        if not kwargs and len(args) == len(self.parameters):
            return _PositionalBound(self, dict(zip(self.parameters, args)))
        return super().bind(*args, **kwargs)


def differentiated_again() -> bool:
    """Whether a backward's result may itself be differentiated: create_graph (grad mode on), a
    torch.func transform, or forward-mode AD (an open dual level: forward over reverse). Then a
    backward computes in Functions or differentiable tensor code; otherwise it may call a kernel
    directly, whose result carries no derivative."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() \
        or getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0  # (unknown: a level may be open)


def derivative(function, *args):
    """``function.apply(*args)`` inside a backward where the result may be differentiated again,
    else the same kernel call without a Function's bookkeeping (its forward alone: ~30 µs less a
    call; two a conv backward)."""
    return function.apply(*args) if differentiated_again() else function.forward(*args)


class Function(torch.autograd.Function):
    """torch's Function, with ``forward``'s signature computed once per class and a fast bind.
    ``Function.apply`` binds every call's arguments to forward's signature when the Function has
    ``setup_context`` (torch.autograd.function._bind_default_args): ``inspect.signature``
    recomputes it unless the function carries ``__signature__`` (~25 µs a call; measured
    ReLUFunction.apply 40 → 16 µs), and ``Signature.bind`` + ``apply_defaults`` walk the
    parameters in Python (~15 µs; 1940 calls a ResNet-20 step at batch 2 cost 60 ms of cProfile
    time in them). Our calls pass every argument positionally (functional.py), which
    _ForwardSignature binds directly. AMD EPYC Zen 4, torch 2.14.1.

    Outside torch.func's transforms (and except for keyword calls), ``apply`` runs ``_eager``, the
    same Function in torch's ctx-first form (its forward calls ``forward``, then ``setup_context``),
    whose ``apply`` binds no arguments: 11-15 µs less a forward + backward (a batch-1 ReLU 63.6 → 51.9 µs, torch's
    26.5; linear 110.8 → 98.2, torch's 72.0; AMD EPYC Zen 4). Under torch.func ``apply`` is
    torch's, with ``setup_context`` and ``vmap`` as torch.func requires; torch.compile never calls
    it (dynamo traces Function.apply itself)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        signature = inspect.signature(cls.forward)
        plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in signature.parameters.values())
        cls.forward.__signature__ = _ForwardSignature(list(signature.parameters.values()),
                                                      return_annotation=signature.return_annotation) \
            if plain else signature
        cls._eager = _eager_twin(cls) if plain else None

    @classmethod
    def apply(cls, *args, **kwargs):
        if kwargs or cls._eager is None or torch._C._are_functorch_transforms_active():
            return super().apply(*args, **kwargs)
        return cls._eager.apply(*args)


def _eager_twin(cls):
    """The same Function in torch's ctx-first form for eager calls: forward(ctx, *args) runs cls's
    forward then its setup_context; backward and jvp are cls's."""

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    # backward and jvp are looked up at each call: a backward replaced on the class after it was
    # defined (a researcher's variant, tests/test_verify.py's injected error) is the one that runs,
    # and forward_mode_rule answers per caller
    def backward(ctx, *grads):
        return cls.backward(ctx, *grads)

    def jvp(ctx, *tangents):
        return cls.jvp(ctx, *tangents)

    twin = torch.autograd.function.FunctionMeta(cls.__name__, (torch.autograd.Function,), dict(
        forward=staticmethod(forward), backward=staticmethod(backward), jvp=staticmethod(jvp),
        __module__=cls.__module__, __qualname__=cls.__qualname__, function=cls))
    return twin


# ---------------------------------------------------------------------------------------------
# torch.func support (vmap, jacrev, jacfwd, jvp, hessian). Each Function's ``vmap`` rule folds
# the mapped dimension of B samples into a dimension its kernel already loops over: the batch
# (B·N entries) where all samples share the weights, the channels and groups where each sample
# has its own weights, so B samples' filters become B·g groups of one conv call and the
# per-sample weight gradient ∂J/∂W_n = x_n ⋆ δ_n is the grad-weight kernel without the sum over
# n (no unfold). Each ``jvp`` rule is the forward-mode derivative: a linear op's is the op itself,
# max pooling's gathers the tangent at the argmax, an elementwise op's is f′(x)·ẋ. Both are built
# from these Functions again, so the transforms compose (hessian = jacfwd(jacrev)).


class forward_mode_rule:
    """Declares a Function's ``jvp`` (in place of ``@staticmethod``). torch.autograd's forward mode
    and torch.func (jvp, jacfwd, hessian) see the rule; torch.compile's tracer, which refuses
    Functions that define a custom jvp (a graph break, an error under fullgraph=True) and never
    calls one (it differentiates with backward), sees torch.autograd.Function's default."""

    def __init__(self, rule):
        self.rule = rule

    def __get__(self, instance, owner=None):
        if torch._guards.TracingContext.try_get() is not None:  # dynamo is tracing
            return torch.autograd.Function.jvp
        return self.rule.__get__(instance, owner) if isinstance(self.rule, classmethod) else self.rule


def _sample_first(t: torch.Tensor, dim, batch: int) -> torch.Tensor:
    """t with its mapped dimension first; an unmapped t (dim None) as ``batch`` broadcast copies."""
    return t.expand(batch, *t.shape) if dim is None else t.movedim(dim, 0)


def samples_into_batch(t: torch.Tensor, dim, batch: int) -> torch.Tensor:
    """(B, N, …) → (B·N, …): the samples' batches as one batch (for weights shared by all samples)."""
    t = _sample_first(t, dim, batch)
    return t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def batch_into_samples(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·N, …) → (B, N, …), the inverse of samples_into_batch (mapped dimension 0)."""
    return t.reshape((batch, t.shape[0] // batch) + tuple(t.shape[1:]))


def samples_into_channels(t: torch.Tensor, dim, batch: int) -> torch.Tensor:
    """(B, N, C, …) → (N, B·C, …): sample b's channels become channel block b (the groups trick)."""
    t = _sample_first(t, dim, batch).transpose(0, 1)
    return t.reshape((t.shape[0], t.shape[1] * t.shape[2]) + tuple(t.shape[3:]))


def channels_into_samples(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, B·C, …) → (B, N, C, …), the inverse of samples_into_channels (mapped dimension 0)."""
    return t.reshape((t.shape[0], batch, t.shape[1] // batch) + tuple(t.shape[2:])).transpose(0, 1)


def per_sample_channels(t: torch.Tensor, dim, batch: int, rank: int) -> torch.Tensor:
    """A per-channel vector (C) or per-sample vectors (B, C), shaped to broadcast over (B, N, C, …)
    with ``rank`` dimensions after the sample dimension."""
    shape = (-1,) + (1,) * (rank - 2)
    return t.reshape(shape) if dim is None else t.movedim(dim, 0).reshape((batch, 1) + shape)


def tangent_sum(*terms):
    """ẏ = the sum of the tangent terms present (None: that input has no tangent)."""
    present = [t for t in terms if t is not None]
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def conv2d_grad_weight_per_sample(input, grad_output, weight_size, stride, padding, dilation, groups, backend):
    """∂J/∂W_n = x_n ⋆ δ_n for each of B samples (input (B, N, C, H, W), δ (B, N, O, H', W')): one
    grad-weight call with the samples' channels side by side in B·g groups; returns (B, O, C/g, kH, kW)."""
    batch = input.shape[0]
    size = (batch * weight_size[0],) + tuple(weight_size[1:])
    grad = Conv2dGradWeightFunction.apply(samples_into_channels(input, 0, batch), samples_into_channels(grad_output, 0, batch),
                                          size, stride, padding, dilation, batch * groups, backend)
    return batch_into_samples(grad, batch)


class Conv2dFunction(Function):
    """y = x ⋆ W + b, backward δx = full-correlation(dilate_s(δ), rot180(W)), ∂J/∂W = x ⋆ δ, ∂J/∂b = Σδ."""

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, backend):
        return kernels(backend).conv2d_forward(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, backend = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # save only what backward needs: W for δx, x for ∂J/∂W (x = f(BN(x₀)): what rebuilds it, recompute.py)
        source = recompute.rebuildable(input) if need_weight else None
        recompute.save(ctx, input if need_weight else None, source, weight if need_input else None)
        ctx.save_for_forward(input, weight)  # jvp: ẏ = ẋ ⋆ W + x ⋆ Ẇ + ḃ
        ctx.input_size = tuple(input.shape)
        ctx.weight_size = tuple(weight.shape)
        ctx.conf = (stride, padding, dilation, groups, backend)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = recompute.saved(ctx, differentiated_again())
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = derivative(Conv2dGradInputFunction, grad_output, weight, ctx.input_size, *ctx.conf)
        if ctx.needs_input_grad[1]:
            grad_weight = derivative(Conv2dGradWeightFunction, input, grad_output, ctx.weight_size, *ctx.conf)
        if ctx.needs_input_grad[2]:  # ∂J/∂b = Σ δ (the C++ sum on the CPU; tensor code to differentiate again)
            backend = ctx.conf[-1]
            grad_bias = conv2d_grad_bias(grad_output) if differentiated_again() else \
                cpu_only_kernels(backend, grad_output).conv2d_grad_bias(grad_output)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, stride, padding, dilation, groups, backend):
        x_dim, w_dim, b_dim = in_dims[:3]
        batch, conf = info.batch_size, (stride, padding, dilation)
        if w_dim is None:  # one kernel for all samples: their batches are one batch
            shared_bias = bias if b_dim is None else None
            y = batch_into_samples(Conv2dFunction.apply(samples_into_batch(input, x_dim, batch), weight, shared_bias,
                                                        *conf, groups, backend), batch)
        elif x_dim is None and groups == 1:  # one input, B kernels: B·O filters of one conv
            y = channels_into_samples(Conv2dFunction.apply(input, samples_into_batch(weight, w_dim, batch), None,
                                                           *conf, 1, backend), batch)
        else:  # a kernel per sample: y_n = x_n ⋆ W_n as B·g groups of one conv
            y = channels_into_samples(Conv2dFunction.apply(samples_into_channels(input, x_dim, batch),
                                                           samples_into_batch(weight, w_dim, batch), None,
                                                           *conf, batch * groups, backend), batch)
        if bias is not None and (w_dim is not None or b_dim is not None):
            y = y + per_sample_channels(bias, b_dim, batch, 4)  # + b_n
        return y, 0

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        # ẏ = ẋ ⋆ W + x ⋆ Ẇ + ḃ  (y is linear in each of x, W, b)
        input, weight = ctx.saved_tensors
        conf = ctx.conf
        size = check_conv2d(input.shape, weight.shape, None, *conf[:4])
        return tangent_sum(
            None if input_t is None else Conv2dFunction.apply(input_t, weight, None, *conf),
            None if weight_t is None else Conv2dFunction.apply(input, weight_t, None, *conf),
            None if bias_t is None else bias_t.reshape(1, -1, 1, 1).expand(size),
        )


class Conv2dGradInputFunction(Function):
    """δx = grad_input(δ, W). Linear in δ and in W: its adjoints are conv(·, W) and grad_weight(·, δ)."""

    @staticmethod
    def forward(grad_output, weight, input_size, stride, padding, dilation, groups, backend):
        return kernels(backend).conv2d_grad_input(grad_output, weight, input_size, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, weight, input_size, stride, padding, dilation, groups, backend = inputs
        ctx.save_for_backward(grad_output if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(grad_output, weight)  # jvp
        ctx.input_size = tuple(input_size)
        ctx.weight_size = tuple(weight.shape)
        ctx.conf = (stride, padding, dilation, groups, backend)

    @staticmethod
    def backward(ctx, grad_grad_input):
        grad_output, weight = ctx.saved_tensors
        stride, padding, dilation, groups, backend = ctx.conf
        d_grad_output = d_weight = None
        if ctx.needs_input_grad[0]:  # ∂/∂δ ⟨g, grad_input(δ, W)⟩ = conv(g, W)
            d_grad_output = Conv2dFunction.apply(grad_grad_input, weight, None, *ctx.conf)
        if ctx.needs_input_grad[1]:  # ∂/∂W ⟨g, grad_input(δ, W)⟩ = grad_weight(g, δ)
            d_weight = Conv2dGradWeightFunction.apply(grad_grad_input, grad_output, ctx.weight_size, *ctx.conf)
        return d_grad_output, d_weight, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad_output, weight, input_size, stride, padding, dilation, groups, backend):
        d_dim, w_dim = in_dims[:2]
        batch, conf = info.batch_size, (stride, padding, dilation)
        n, c, h, w = input_size
        if w_dim is None:  # shared kernel: the samples' batches are one batch
            grad = Conv2dGradInputFunction.apply(samples_into_batch(grad_output, d_dim, batch), weight,
                                                 (batch * n, c, h, w), *conf, groups, backend)
            return batch_into_samples(grad, batch), 0
        grad = Conv2dGradInputFunction.apply(samples_into_channels(grad_output, d_dim, batch),  # B·g groups
                                             samples_into_batch(weight, w_dim, batch), (n, batch * c, h, w),
                                             *conf, batch * groups, backend)
        return channels_into_samples(grad, batch), 0

    @forward_mode_rule
    def jvp(ctx, grad_output_t, weight_t, *_):
        # d grad_input(δ, W) = grad_input(δ̇, W) + grad_input(δ, Ẇ)  (bilinear)
        grad_output, weight = ctx.saved_tensors
        return tangent_sum(
            None if grad_output_t is None else Conv2dGradInputFunction.apply(grad_output_t, weight, ctx.input_size, *ctx.conf),
            None if weight_t is None else Conv2dGradInputFunction.apply(grad_output, weight_t, ctx.input_size, *ctx.conf),
        )


class Conv2dGradWeightFunction(Function):
    """∂J/∂W = grad_weight(x, δ). Linear in x and in δ: its adjoints are grad_input(δ, ·) and conv(x, ·)."""

    @staticmethod
    def forward(input, grad_output, weight_size, stride, padding, dilation, groups, backend):
        return kernels(backend).conv2d_grad_weight(input, grad_output, weight_size, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, grad_output, weight_size, stride, padding, dilation, groups, backend = inputs
        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None,
                              grad_output if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(input, grad_output)  # jvp
        ctx.input_size = tuple(input.shape)
        ctx.weight_size = tuple(weight_size)
        ctx.conf = (stride, padding, dilation, groups, backend)

    @staticmethod
    def backward(ctx, grad_grad_weight):
        input, grad_output = ctx.saved_tensors
        d_input = d_grad_output = None
        if ctx.needs_input_grad[0]:  # ∂/∂x ⟨G, grad_weight(x, δ)⟩ = grad_input(δ, G)
            d_input = Conv2dGradInputFunction.apply(grad_output, grad_grad_weight, ctx.input_size, *ctx.conf)
        if ctx.needs_input_grad[1]:  # ∂/∂δ ⟨G, grad_weight(x, δ)⟩ = conv(x, G)
            d_grad_output = Conv2dFunction.apply(input, grad_grad_weight, None, *ctx.conf)
        return d_input, d_grad_output, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, grad_output, weight_size, stride, padding, dilation, groups, backend):
        # ∂J/∂W_n = x_n ⋆ δ_n: the per-sample weight gradient, B·g groups of one grad-weight call
        batch = info.batch_size
        return conv2d_grad_weight_per_sample(_sample_first(input, in_dims[0], batch),
                                             _sample_first(grad_output, in_dims[1], batch),
                                             weight_size, stride, padding, dilation, groups, backend), 0

    @forward_mode_rule
    def jvp(ctx, input_t, grad_output_t, *_):
        # d grad_weight(x, δ) = grad_weight(ẋ, δ) + grad_weight(x, δ̇)  (bilinear)
        input, grad_output = ctx.saved_tensors
        return tangent_sum(
            None if input_t is None else Conv2dGradWeightFunction.apply(input_t, grad_output, ctx.weight_size, *ctx.conf),
            None if grad_output_t is None else Conv2dGradWeightFunction.apply(input, grad_output_t, ctx.weight_size, *ctx.conf),
        )


class MaxPool2dFunction(Function):
    """y = max over each window, argmax recorded; backward routes δ to the recorded argmax."""

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode, backend):
        return kernels(backend).max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, *_, backend = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        # no zero tensor materialised for the indices' gradient (int64, twice y's bytes: measured
        # 2 ms a max pool of an airbench step, with its page faults); δy is then None where y got
        # no gradient (gradcheck's undefined-gradient check calls backward so)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(indices)  # the argmax is all backward needs, not x
        ctx.save_for_forward(indices)  # jvp: ẏ = ẋ at the argmax
        ctx.input_size = tuple(input.shape)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:  # y got no gradient: neither does x
            return None, None, None, None, None, None, None
        (indices,) = ctx.saved_tensors
        grad_input = derivative(MaxPool2dBackwardFunction, grad_output, indices, ctx.input_size, ctx.backend)
        return grad_input, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, *args):
        batch = info.batch_size
        y, indices = MaxPool2dFunction.apply(samples_into_batch(input, in_dims[0], batch), *args)
        return (batch_into_samples(y, batch), batch_into_samples(indices, batch)), (0, 0)

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        (indices,) = ctx.saved_tensors
        return max_pool2d_gather(input_t, indices), None  # ẏ = ẋ[argmax]


class MaxPool2dBackwardFunction(Function):
    """δx[argmax] += δy. Linear in δy; its adjoint gathers at the argmax."""

    @staticmethod
    def forward(grad_output, indices, input_size, backend):
        return kernels(backend).max_pool2d_backward(grad_output, indices, input_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices, ctx.input_size, ctx.backend = inputs
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)  # jvp

    @staticmethod
    def backward(ctx, grad_grad_input):
        (indices,) = ctx.saved_tensors
        return max_pool2d_gather(grad_grad_input, indices), None, None, None

    @staticmethod
    def vmap(info, in_dims, grad_output, indices, input_size, backend):
        batch, (n, c, h, w) = info.batch_size, input_size
        grad = MaxPool2dBackwardFunction.apply(samples_into_batch(grad_output, in_dims[0], batch),
                                               samples_into_batch(indices, in_dims[1], batch), (batch * n, c, h, w), backend)
        return batch_into_samples(grad, batch), 0

    @forward_mode_rule
    def jvp(ctx, grad_output_t, *_):
        (indices,) = ctx.saved_tensors  # linear in δy: its derivative is itself
        return MaxPool2dBackwardFunction.apply(grad_output_t, indices, ctx.input_size, ctx.backend)


class AvgPool2dFunction(Function):
    """y = Σ_window x / divisor; backward spreads δ / divisor evenly over each window."""

    @staticmethod
    def forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, backend):
        return kernels(backend).avg_pool2d_forward(input, kernel_size, stride, padding, ceil_mode,
                                                   count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, *conf = inputs
        ctx.input_size = tuple(input.shape)  # average pooling's backward needs no saved tensor
        ctx.conf = tuple(conf)

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = derivative(AvgPool2dBackwardFunction, grad_output, ctx.input_size, *ctx.conf)
        return (grad_input,) + (None,) * 7

    @staticmethod
    def vmap(info, in_dims, input, *conf):
        batch = info.batch_size
        return batch_into_samples(AvgPool2dFunction.apply(samples_into_batch(input, in_dims[0], batch), *conf), batch), 0

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        return AvgPool2dFunction.apply(input_t, *ctx.conf)  # linear: its derivative is itself


class AvgPool2dBackwardFunction(Function):
    """δx = spread(δy / divisor). Linear; its adjoint is average pooling itself."""

    @staticmethod
    def forward(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
                divisor_override, backend):
        return kernels(backend).avg_pool2d_backward(grad_output, input_size, kernel_size, stride, padding,
                                                    ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.input_size, *conf = inputs
        ctx.conf = tuple(conf)

    @staticmethod
    def backward(ctx, grad_grad_input):
        return (AvgPool2dFunction.apply(grad_grad_input, *ctx.conf),) + (None,) * 8

    @staticmethod
    def vmap(info, in_dims, grad_output, input_size, *conf):
        batch, (n, c, h, w) = info.batch_size, input_size
        grad = AvgPool2dBackwardFunction.apply(samples_into_batch(grad_output, in_dims[0], batch), (batch * n, c, h, w), *conf)
        return batch_into_samples(grad, batch), 0

    @forward_mode_rule
    def jvp(ctx, grad_output_t, *_):
        return AvgPool2dBackwardFunction.apply(grad_output_t, ctx.input_size, *ctx.conf)  # linear


class AdaptiveMaxPool2dFunction(Function):
    """y = max over each adaptive window, argmax recorded; backward is max pooling's routing."""

    @staticmethod
    def forward(input, output_size, backend):
        return kernels(backend).adaptive_max_pool2d_forward(input, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, _, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensor for the indices' gradient (MaxPool2dFunction)
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])  # jvp: ẏ = ẋ at the argmax
        ctx.input_size = tuple(input.shape)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:  # y got no gradient: neither does x
            return None, None, None
        (indices,) = ctx.saved_tensors
        return derivative(MaxPool2dBackwardFunction, grad_output, indices, ctx.input_size, ctx.backend), None, None

    @staticmethod
    def vmap(info, in_dims, input, output_size, backend):
        batch = info.batch_size
        y, indices = AdaptiveMaxPool2dFunction.apply(samples_into_batch(input, in_dims[0], batch), output_size, backend)
        return (batch_into_samples(y, batch), batch_into_samples(indices, batch)), (0, 0)

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        (indices,) = ctx.saved_tensors
        return max_pool2d_gather(input_t, indices), None  # ẏ = ẋ[argmax]


class AdaptiveAvgPool2dFunction(Function):
    """y = Σ_window x / area; backward spreads δ / area over each adaptive window."""

    @staticmethod
    def forward(input, output_size, backend):
        return kernels(backend).adaptive_avg_pool2d_forward(input, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.output_size, backend = inputs
        ctx.input_size = tuple(input.shape)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_output):
        return derivative(AdaptiveAvgPool2dBackwardFunction, grad_output, ctx.input_size, ctx.backend), None, None

    @staticmethod
    def vmap(info, in_dims, input, output_size, backend):
        batch = info.batch_size
        y = AdaptiveAvgPool2dFunction.apply(samples_into_batch(input, in_dims[0], batch), output_size, backend)
        return batch_into_samples(y, batch), 0

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        return AdaptiveAvgPool2dFunction.apply(input_t, ctx.output_size, ctx.backend)  # linear


class AdaptiveAvgPool2dBackwardFunction(Function):
    """δx = spread(δy / area). Linear; its adjoint is adaptive average pooling itself."""

    @staticmethod
    def forward(grad_output, input_size, backend):
        return kernels(backend).adaptive_avg_pool2d_backward(grad_output, input_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, ctx.input_size, backend = inputs
        ctx.output_size = tuple(grad_output.shape[2:])
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_grad_input):
        return AdaptiveAvgPool2dFunction.apply(grad_grad_input, ctx.output_size, ctx.backend), None, None

    @staticmethod
    def vmap(info, in_dims, grad_output, input_size, backend):
        batch, (n, c, h, w) = info.batch_size, input_size
        grad = AdaptiveAvgPool2dBackwardFunction.apply(samples_into_batch(grad_output, in_dims[0], batch),
                                                       (batch * n, c, h, w), backend)
        return batch_into_samples(grad, batch), 0

    @forward_mode_rule
    def jvp(ctx, grad_output_t, *_):
        return AdaptiveAvgPool2dBackwardFunction.apply(grad_output_t, ctx.input_size, ctx.backend)  # linear


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) as a matrix with one row per sample (also when F = 0, where reshape(-1, F) is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class LinearFunction(Function):
    """z = W·x + b (rows of x are samples: z = x Wᵀ + b); δx = Wᵀδ, ∂J/∂W = δ xᵀ, ∂J/∂b = δ."""

    @staticmethod
    def forward(input, weight, bias, backend):
        if input.dim() == 2 and bias is not None and bias.dim() <= 1:
            # z = b + x Wᵀ in one GEMM pass (b over the rows). Only for a matrix x: a reshaped result
            # would be a view, which in-place ops on the output (Hardswish(inplace=True)) may not modify
            return torch.addmm(bias, input, weight.t())
        z = input.matmul(weight.t())
        return z if bias is None else z + bias  # (a bias with leading dimensions: broadcast)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, ctx.backend = inputs
        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(input, weight)  # jvp: ż = ẋWᵀ + xẆᵀ + ḃ
        ctx.bias_size = None if bias is None else bias.shape  # a bias broadcasts to z, as torch's does

    @staticmethod
    def backward(ctx, delta):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and not differentiated_again():
            # δx = δW and ∂J/∂W = δᵀx in one call, which may run the two products side by side (csrc/linear.cpp)
            grad_input, grad_weight = cpu_only_kernels(ctx.backend, delta).linear_backward(_rows(delta), _rows(input), weight)
            grad_input = grad_input.reshape(input.shape)
        elif ctx.needs_input_grad[0]:
            grad_input = delta.matmul(weight)  # δˡ⁻¹ = Wᵀ δˡ (before ⊙ f′, which the activation applies)
        if ctx.needs_input_grad[1] and grad_weight is None:
            grad_weight = _rows(delta).t().matmul(_rows(input))  # δ xᵀ
        if ctx.needs_input_grad[2]:
            grad_bias = delta.sum_to_size(ctx.bias_size)  # ∂J/∂b = δ, summed over samples (and broadcast dims)
        return grad_input, grad_weight, grad_bias, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, backend):
        x_dim, w_dim, b_dim, _ = in_dims
        batch = info.batch_size
        x = _sample_first(input, x_dim, batch)  # linear acts on the last dimension: the rest are rows
        if w_dim is None:
            z = LinearFunction.apply(x, weight, bias if b_dim is None else None, backend)
        else:  # a weight per sample: z_n = x_n W_nᵀ, one batched matmul
            w = _sample_first(weight, w_dim, batch)
            z = x.reshape(batch, -1, x.shape[-1]).matmul(w.transpose(1, 2)).reshape(x.shape[:-1] + w.shape[1:2])
            if b_dim is None and bias is not None:
                z = z + bias
        if b_dim is not None:  # + b_n
            b = bias.movedim(b_dim, 0)
            z = z + b.reshape((batch,) + (1,) * (z.dim() - b.dim()) + tuple(b.shape[1:]))
        return z, 0

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t, _):
        # ż = ẋWᵀ + xẆᵀ + ḃ  (z is linear in each of x, W, b)
        input, weight = ctx.saved_tensors
        size = torch.broadcast_shapes(input.shape[:-1] + weight.shape[:1], () if ctx.bias_size is None else ctx.bias_size)
        return tangent_sum(
            None if input_t is None else LinearFunction.apply(input_t, weight, None, ctx.backend),
            None if weight_t is None else LinearFunction.apply(input, weight_t, None, ctx.backend),
            None if bias_t is None else bias_t.expand(size),
        )


class ReLUFunction(Function):
    """y = max(z, 0); δz = δy ⊙ f′(z) with f′(z) = 1 where z > 0, else 0. The product is a
    selection: δz = δy where y > 0 (or y is NaN, as torch), else 0 — never δy·0, which is NaN for
    δy = ±∞ or NaN where torch gives 0 (relu_backward: csrc/relu.cpp, reference.py)."""

    piecewise = True  # rebuilt after a training batch norm (recompute.py)

    @staticmethod
    def forward(input, backend):
        return input.clamp(min=0)

    @staticmethod
    def forward_(input, backend):
        """forward in place, the same bits (recompute.rebuild's y from its own z)."""
        return input.clamp_(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # y = max(BN(x), 0) after a training batch norm: x, γ, β, μ, σ⁻¹ saved in y's place (recompute.py)
        source = recompute.batch_norm_output(inputs[0], ReLUFunction)
        recompute.save(ctx, output, source, made_by=ctx)
        if source is not None:
            recompute.mark_rebuilt(ctx, output, source, inputs[1:])
        ctx.save_for_forward(output)  # jvp
        ctx.backend = inputs[1]

    @staticmethod
    def backward(ctx, delta):
        (output,) = recompute.saved(ctx, differentiable=False, activate=False)  # y, or z: the selection reads either
        if differentiated_again():  # create_graph or forward AD: the selection in differentiable tensor code
            return _reference.relu_backward(delta, output), None
        return cpu_only_kernels(ctx.backend, output).relu_backward(delta, output), None

    @staticmethod
    def vmap(info, in_dims, input, backend):
        return ReLUFunction.apply(input, backend), in_dims[0]  # elementwise: the mapped dimension is one more

    @forward_mode_rule
    def jvp(ctx, input_t, _):
        (output,) = ctx.saved_tensors
        return _reference.relu_backward(input_t, output)  # ẏ = f′(z)·ż, selected as in backward

    @staticmethod
    def output_grad(output, delta, backend):
        """δz from y (InplaceActivationFromOutputFunction: relu in place)."""
        if differentiated_again():
            return _reference.relu_backward(delta, output)
        return cpu_only_kernels(backend, output).relu_backward(delta, output)


def squashing_input_grad(kind, y, delta, params, backend):
    """δx = δ ⊙ f′(x) of the squashing function ``kind`` (sigmoid, tanh) from its output y: the
    backward kernel (csrc/activations.cpp), or, where the result may be differentiated again,
    reference.py's same formula in tensor code that autograd differentiates once more."""
    if differentiated_again():
        return _reference.SQUASHING[kind](y, delta, *params)
    return cpu_only_kernels(backend, y).activation_backward_from_output(delta, y, kind, [float(p) for p in params])


class SigmoidFunction(Function):
    """y = 1 / (1 + e⁻ᶻ); δz = δy ⊙ (1 − y)·y."""

    @staticmethod
    def forward(input, backend):
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)  # jvp

    @staticmethod
    def backward(ctx, delta):
        (y,) = ctx.saved_tensors
        return squashing_input_grad("sigmoid", y, delta, (), ctx.backend), None

    @staticmethod
    def vmap(info, in_dims, input, backend):
        return SigmoidFunction.apply(input, backend), in_dims[0]  # elementwise

    @forward_mode_rule
    def jvp(ctx, input_t, _):
        (y,) = ctx.saved_tensors
        return _reference.sigmoid_grad_from_output(y, input_t)  # ẏ = (1 − y)·y·ż


class TanhFunction(Function):
    """y = A·tanh(S·z) (A = S = 1: tanh; LeNet-5's squashing: A = 1.7159, S = 2/3);
    δz = δy ⊙ f′(z) with f′(z) = A·S·(1 − tanh²(S·z)) = S·(A − y²/A)."""

    @staticmethod
    def forward(input, amplitude, slope, backend):
        y = torch.tanh(input * slope) if slope != 1 else torch.tanh(input)
        return y * amplitude if amplitude != 1 else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.amplitude, ctx.slope, ctx.backend = inputs
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)  # jvp

    @staticmethod
    def backward(ctx, delta):
        (y,) = ctx.saved_tensors
        return squashing_input_grad("tanh", y, delta, (ctx.amplitude, ctx.slope), ctx.backend), None, None, None

    @staticmethod
    def vmap(info, in_dims, input, amplitude, slope, backend):
        return TanhFunction.apply(input, amplitude, slope, backend), in_dims[0]  # elementwise

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        (y,) = ctx.saved_tensors
        return _reference.tanh_grad_from_output(y, input_t, ctx.amplitude, ctx.slope)  # ẏ = S·(A − y²/A)·ż


class CrossEntropyFunction(Function):
    """Softmax cross-entropy of logit rows z (M, C) against weighted target rows r (M, C):
    J_i = −Σ_{c ∈ T_i} r_ic·log softmax(z_i)_c, then reduced (none, sum, or sum / divisor for mean).
    T_i (``terms``, a boolean (M, C) mask) holds the classes whose term torch evaluates: the target
    class alone for a class index (torch gathers log p_y, so a masked logit −∞ elsewhere adds
    nothing rather than 0·(−∞) = NaN), every class for probability targets and label smoothing
    (torch multiplies there, NaN included), none for an ignored sample.
    With one-hot r this is the derived output delta ∂J/∂z = softmax(z) − onehot(y); in general
    ∂J_i/∂z_i = s_i·softmax(z_i) − r_i with s_i = Σ_c r_ic, and ∂J_i/∂r_ic = −log softmax(z_i)_c
    on T_i. An ignored sample's gradient is 0, also when every sample is ignored (divisor 0)."""

    @staticmethod
    def forward(logits, target, terms, reduction, divisor):
        losses = -torch.where(terms, target * log_softmax_rows(logits), 0).sum(dim=1)
        if reduction == "none":
            return losses
        return losses.sum() if reduction == "sum" else losses.sum() / divisor

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, terms, ctx.reduction, ctx.divisor = inputs
        ctx.save_for_backward(logits, target, terms)
        ctx.save_for_forward(logits, target, terms)  # jvp

    @staticmethod
    def backward(ctx, grad):
        logits, target, terms = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad.unsqueeze(1)
        else:
            scale = grad if ctx.reduction == "sum" else grad / ctx.divisor
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            # δ of log p: −scale·r on the terms, exactly 0 elsewhere (an ignored sample, also when the
            # divisor is 0); then log softmax's backward δz = δlogp − softmax(z)·Σ_c δlogp, which is
            # s·softmax(z) − r scaled, for a kept sample
            grad_log_probs = torch.where(terms, -scale * target, 0)
            probs = log_softmax_rows(logits).exp()
            grad_logits = grad_log_probs - probs * grad_log_probs.sum(dim=1, keepdim=True)
        if ctx.needs_input_grad[1]:
            grad_target = torch.where(terms, scale * -log_softmax_rows(logits), 0)
        return grad_logits, grad_target, None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, terms, reduction, divisor):
        # the samples' rows are one set of rows; each sample's losses are then reduced on their own
        batch = info.batch_size
        rows = [samples_into_batch(t, d, batch) for t, d in zip((logits, target, terms), in_dims[:3])]
        losses = batch_into_samples(CrossEntropyFunction.apply(*rows, "none", 1.0), batch)
        if reduction == "none":
            return losses, 0
        if reduction == "sum":
            return losses.sum(dim=1), 0
        return losses.sum(dim=1) / (divisor if in_dims[4] is None else divisor.movedim(in_dims[4], 0)), 0

    @forward_mode_rule
    def jvp(ctx, logits_t, target_t, *_):
        # J̇_i = Σ_c (s_i·softmax(z_i)_c − r_ic)·ż_ic − Σ_{c ∈ T_i} log softmax(z_i)_c·ṙ_ic, then reduced
        logits, target, terms = ctx.saved_tensors
        log_probs = log_softmax_rows(logits)
        kept = terms.any(dim=1)  # an ignored sample has J_i = 0
        losses_t = tangent_sum(
            None if logits_t is None else torch.where(
                kept, ((target.sum(dim=1, keepdim=True) * log_probs.exp() - target) * logits_t).sum(dim=1), 0),
            None if target_t is None else -torch.where(terms, target_t * log_probs, 0).sum(dim=1),
        )
        if ctx.reduction == "none":
            return losses_t
        return losses_t.sum() if ctx.reduction == "sum" else losses_t.sum() / ctx.divisor


class NLLLossFunction(Function):
    """The loss of class-index targets on log-probability rows p (M, C) (log_softmax's output):
    J_i = −w_i·p_{i,y_i} for a kept sample (w_i its class's weight), 0 for an ignored one; then
    reduced (none, sum, or sum / divisor for mean). ∂J/∂p = −scale·w_i at (i, y_i), 0 elsewhere.
    Composed with log-softmax's backward (δz = δp − e^p·Σ δp) this is the derived output delta
    ∂J/∂z = scale·w_i·(softmax(z_i) − onehot(y_i)), in two passes over the rows, as torch's
    cross_entropy = nll_loss ∘ log_softmax; CrossEntropyFunction covers the other targets."""

    @staticmethod
    def forward(log_probs, labels, kept, row_weight, reduction, divisor):
        picked = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        losses = torch.where(kept, -row_weight * picked, 0)  # an ignored sample: 0, whatever p holds
        if reduction == "none":
            return losses
        return losses.sum() if reduction == "sum" else losses.sum() / divisor

    @staticmethod
    def setup_context(ctx, inputs, output):
        log_probs, labels, kept, row_weight, ctx.reduction, ctx.divisor = inputs
        ctx.save_for_backward(labels, kept, row_weight)
        ctx.shape = log_probs.shape

    @staticmethod
    def backward(ctx, grad):
        labels, kept, row_weight = ctx.saved_tensors
        scale = grad if ctx.reduction != "mean" else grad / ctx.divisor  # (none: one per row)
        # an ignored sample's delta is 0, also when every sample is ignored (divisor 0: scale = ±inf)
        values = torch.where(kept, -scale * row_weight, 0).unsqueeze(1)
        grad_log_probs = values.new_zeros(ctx.shape).scatter(1, labels.unsqueeze(1), values)
        return grad_log_probs, None, None, None, None, None


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """log softmax(z_i)_c = (z_ic − m_i) − log Σ_c' exp(z_ic' − m_i) for logit rows (M, C), m_i = max_c z_ic
    (a constant: the result does not depend on it). Written as torch computes it, so a +∞ logit
    gives NaN as torch's does (logsumexp would give +∞ and a finite loss)."""
    shifted = logits - logits.amax(dim=1, keepdim=True).detach()
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


class Subsampling2dFunction(Function):
    """LeNet-5's trainable subsampling, per channel j: y_j = β_j·down(x_j) + b_j, down = sums of
    n×n blocks. δx_j = β_j·up(δ_j) (up copies each δ over its block); ∂J/∂β_j = Σ δ_j ⊙ down(x_j);
    ∂J/∂b_j = Σ δ_j  ("Notes on Convolutional Neural Networks", §3.2)."""

    @staticmethod
    def forward(input, weight, bias, kernel_size, backend):
        down = AvgPool2dFunction.forward(input, kernel_size, kernel_size, (0, 0), False, True, 1, backend)
        y = down * weight.reshape(1, -1, 1, 1)
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, kernel_size, backend = inputs
        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None, weight)
        ctx.save_for_forward(input, weight)  # jvp: ẏ = β·down(ẋ) + β̇·down(x) + ḃ
        ctx.input_size = tuple(input.shape)
        ctx.conf = (kernel_size, backend)

    @staticmethod
    def backward(ctx, delta):
        input, weight = ctx.saved_tensors
        kernel_size, backend = ctx.conf
        sums = (kernel_size, kernel_size, (0, 0), False, True, 1, backend)  # divisor 1: block sums
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # δx = up(β ⊙ δ)
            grad_input = AvgPool2dBackwardFunction.apply(delta * weight.reshape(1, -1, 1, 1), ctx.input_size, *sums)
        if ctx.needs_input_grad[1]:  # ∂J/∂β = Σ δ ⊙ down(x)
            grad_weight = (delta * AvgPool2dFunction.apply(input, *sums)).sum(dim=(0, 2, 3))
        if ctx.needs_input_grad[2]:  # ∂J/∂b = Σ δ
            grad_bias = delta.sum(dim=(0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, kernel_size, backend):
        x_dim, w_dim, b_dim = in_dims[:3]
        batch = info.batch_size
        if w_dim is None and b_dim is None:  # shared β, b: the samples' batches are one batch
            y = Subsampling2dFunction.apply(samples_into_batch(input, x_dim, batch), weight, bias, kernel_size, backend)
            return batch_into_samples(y, batch), 0
        # β_n, b_n per sample: per-channel parameters, so the samples' channels side by side
        y = Subsampling2dFunction.apply(samples_into_channels(input, x_dim, batch), samples_into_batch(weight, w_dim, batch),
                                        None if bias is None else samples_into_batch(bias, b_dim, batch), kernel_size, backend)
        return channels_into_samples(y, batch), 0

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        # ẏ = β·down(ẋ) + β̇·down(x) + ḃ  (bilinear in x and β, linear in b)
        input, weight = ctx.saved_tensors
        kernel_size, backend = ctx.conf
        n, c, h, w = ctx.input_size
        return tangent_sum(
            None if input_t is None else Subsampling2dFunction.apply(input_t, weight, None, kernel_size, backend),
            None if weight_t is None else Subsampling2dFunction.apply(input, weight_t, None, kernel_size, backend),
            None if bias_t is None else bias_t.reshape(1, -1, 1, 1).expand(n, c, h // kernel_size[0], w // kernel_size[1]),
        )


class BiasFunction(Function):
    """y = x + b per channel of an (N, C, H, W) map; ∂J/∂x = δ, ∂J/∂b = Σ δ over batch and space."""

    @staticmethod
    def forward(input, bias):
        return input + bias.reshape(1, -1, 1, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input_size = tuple(inputs[0].shape)  # jvp: ẏ = ẋ + ḃ of y's size

    @staticmethod
    def backward(ctx, delta):
        return delta, conv2d_grad_bias(delta)

    @staticmethod
    def vmap(info, in_dims, input, bias):
        batch = info.batch_size
        if in_dims[1] is None:  # one bias for all samples
            return batch_into_samples(BiasFunction.apply(samples_into_batch(input, in_dims[0], batch), bias), batch), 0
        y = BiasFunction.apply(samples_into_channels(input, in_dims[0], batch), samples_into_batch(bias, in_dims[1], batch))
        return channels_into_samples(y, batch), 0

    @forward_mode_rule
    def jvp(ctx, input_t, bias_t):
        return tangent_sum(input_t, None if bias_t is None else bias_t.reshape(1, -1, 1, 1).expand(ctx.input_size))


# ---------------------------------------------------------------------------------------------
# Normalisation and dropout
#
# The normalisation Functions take the statistics (μ, σ⁻¹) as computed by the caller (batch
# statistics in training, running statistics in eval) and apply x̂ = (x − μ)·σ⁻¹, y = γ·x̂ + β.
# Their first-order backward is the kernel's (the derived formula in one pass). For double
# backward (create_graph=True) the same formula is evaluated by reference.py's plain tensor code,
# with the batch statistics recomputed from x, so autograd can differentiate it once more.

from . import reference as _reference  # noqa: E402


def _differentiable_batch_statistics(input, eps):
    """μ and σ⁻¹ = 1/√(var + ε) recomputed from x in plain tensor code (for double backward)."""
    mean, var = _reference.batch_norm_statistics(input)
    return mean, (var + eps).rsqrt()


class BatchNormFunction(Function):
    """y = γ·(x − μ)·σ⁻¹ + β per channel of an (n, C, H, W) map. training (μ, σ the batch's own):
    δx = γ·σ⁻¹/N·(N·δy − Σδy − x̂·Σ(δy·x̂)); eval (running μ, σ): δx = γ·σ⁻¹·δy;
    ∂J/∂γ = Σ δy·x̂, ∂J/∂β = Σ δy, N = n·H·W."""

    @staticmethod
    def forward(input, weight, bias, mean, invstd, training, eps, backend):
        return kernels(backend).batch_norm_apply(input, mean, invstd, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, mean, invstd, training, eps, backend = inputs
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)  # jvp
        ctx.conf = (training, eps, backend)
        if training:  # y = BN(x) can be rebuilt from what is saved, and β (recompute.py)
            ctx.rebuilds_output = (bias, eps, backend)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        training, eps, backend = ctx.conf
        if differentiated_again():  # create_graph or forward AD: the formula in differentiable pieces
            if training:
                mean, invstd = _differentiable_batch_statistics(input, eps)
            grad_input, grad_weight, grad_bias = _reference.batch_norm_backward(
                grad_output, input, mean, invstd, weight, training)
        else:
            grad_output = grad_output.contiguous(memory_format=_memory_format(input))
            grad_input, grad_weight, grad_bias = kernels(backend).batch_norm_backward(
                grad_output, input, mean, invstd, weight, training)
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, mean, invstd, training, eps, backend):
        # each of the B samples is a batch norm of its own: sample b's channel c becomes channel
        # b·C + c of one (n, B·C, H, W) map (the groups trick), whose per-channel statistics over
        # (n, H, W) are exactly sample b's
        batch = info.batch_size
        channels = samples_into_channels(input, in_dims[0], batch)
        vectors = [None if v is None else _sample_first(v, dim, batch).reshape(-1)  # (B·C)
                   for v, dim in zip((weight, bias, mean, invstd), in_dims[1:5])]
        y = BatchNormFunction.apply(channels, *vectors, training, eps, backend)
        return channels_into_samples(y, batch), 0

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        # training: ẏ = γ·σ⁻¹·(ẋ − mean ẋ − x̂·mean(ẋ ⊙ x̂)) + γ̇·x̂ + β̇ (means per channel over n, H, W:
        # the backward's self-adjoint projection, statistics recomputed from x in plain tensor code so
        # the rule differentiates again); eval: ẏ = γ·σ⁻¹·ẋ + γ̇·x̂ + β̇. μ and σ⁻¹ get no tangent,
        # as they get no gradient: the batch's are functions of x (above), the running ones are buffers
        input, weight, mean, invstd = ctx.saved_tensors
        training, eps, _ = ctx.conf
        if training:
            mean, invstd = _differentiable_batch_statistics(input, eps)
        x_hat = _reference.normalized(input, mean, invstd, (1, -1, 1, 1))
        x_hat_t = None
        if input_t is not None:
            x_hat_t, _, _ = _reference.batch_norm_backward(input_t, input, mean, invstd, weight, training)
        channel = (1, -1, 1, 1)
        return tangent_sum(x_hat_t, None if weight_t is None else x_hat * weight_t.reshape(channel),
                           None if bias_t is None else bias_t.reshape(channel).expand(input.shape))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels-last for a 4-D channels-last (and not NCHW-contiguous) tensor, else contiguous."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class LayerNormFunction(Function):
    """Rows of an (M, D) matrix: x̂ = (x − μ)·σ⁻¹, y = γ ⊙ x̂ + β (μ, σ per row). With g = γ ⊙ δy:
    δx = σ⁻¹/D·(D·g − Σg − x̂·Σ(g·x̂)); ∂J/∂γ = Σ_rows δy ⊙ x̂, ∂J/∂β = Σ_rows δy.
    Returns (y, μ, σ⁻¹); the statistics are not differentiable outputs."""

    @staticmethod
    def forward(input, weight, bias, eps, backend):
        return kernels(backend).layer_norm_forward(input, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, eps, backend = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight)  # jvp
        ctx.conf = (eps, backend)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        eps, backend = ctx.conf
        if differentiated_again():  # create_graph or forward AD: statistics recomputed from x, formula in plain tensor code
            _, mean, invstd = _reference.layer_norm_forward(input, None, None, eps)
            grads = _reference.layer_norm_backward(grad_output, input, mean, invstd, weight)
        else:
            grads = kernels(backend).layer_norm_backward(grad_output.contiguous(), input, mean, invstd, weight)
        grad_input, grad_weight, grad_bias = grads
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, eps, backend):
        x_dim, w_dim, b_dim = in_dims[:3]
        batch = info.batch_size
        rows = samples_into_batch(input, x_dim, batch)  # the samples' rows are one set of rows
        if w_dim is None and b_dim is None:
            y, mean, invstd = LayerNormFunction.apply(rows, weight, bias, eps, backend)
            return tuple(batch_into_samples(t, batch) for t in (y, mean, invstd)), (0, 0, 0)
        y, mean, invstd = (batch_into_samples(t, batch) for t in LayerNormFunction.apply(rows, None, None, eps, backend))
        if weight is not None:  # γ_n ⊙ x̂ + β_n per sample
            y = y * _sample_first(weight, w_dim, batch).unsqueeze(1)
        if bias is not None:
            y = y + _sample_first(bias, b_dim, batch).unsqueeze(1)
        return (y, mean, invstd), (0, 0, 0)

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        # ẏ = γ ⊙ ẋ̂ + γ̇ ⊙ x̂ + β̇ with ẋ̂ = σ⁻¹·(ẋ − mean ẋ − x̂·mean(ẋ ⊙ x̂)) (the backward's self-adjoint
        # projection); statistics recomputed from x in plain tensor code, so the rule differentiates again
        input, weight = ctx.saved_tensors
        x_hat, mean, invstd = _reference.layer_norm_forward(input, None, None, ctx.conf[0])
        x_hat_t = None
        if input_t is not None:
            x_hat_t = _reference.normalization_grad_input(input_t, x_hat, invstd, input.shape[1], (-1, 1), (1,))
            x_hat_t = x_hat_t if weight is None else x_hat_t * weight
        return tangent_sum(x_hat_t, None if weight_t is None else x_hat * weight_t,
                           None if bias_t is None else bias_t.expand(input.shape)), None, None


def _group_rows(t: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(n, C, *) → (n·G, C/G·∏*): one row per (sample, group), the sets group norm normalises."""
    return t.reshape(t.shape[0] * num_groups, -1)


def _group_norm_x_hat(input, num_groups, eps):
    """x̂ = (x − μ_ng)·σ⁻¹_ng and σ⁻¹ per row, in plain tensor code (differentiable again)."""
    rows = _group_rows(input, num_groups)
    x_hat, _, invstd = _reference.layer_norm_forward(rows, None, None, eps)
    return x_hat, invstd


class GroupNormFunction(Function):
    """Group norm of an (n, C, H, W) map (the 'cpp' kernels, csrc/group_norm.cpp): per (sample n,
    group g) of M = C/G·H·W entries x̂ = (x − μ_ng)·σ⁻¹_ng, y = γ_c·x̂ + β_c. With g = γ_c·δy:
    δx = σ⁻¹/M·(M·g − Σg − x̂·Σ(g·x̂)) per (n, g); ∂J/∂γ_c = Σ δy·x̂, ∂J/∂β_c = Σ δy.
    Returns (y, μ, σ⁻¹), the statistics (n, G) not differentiable outputs."""

    @staticmethod
    def forward(input, weight, bias, num_groups, eps, backend):
        return kernels(backend).group_norm_forward(input, weight, bias, num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, num_groups, eps, backend = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight)  # jvp
        ctx.conf = (num_groups, eps, backend)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        num_groups, eps, backend = ctx.conf
        if differentiated_again():  # create_graph or forward AD: statistics recomputed from x, formula in plain tensor code
            shape = (1, -1) + (1,) * (input.dim() - 2)
            g = grad_output if weight is None else grad_output * weight.reshape(shape)
            x_hat, invstd = _group_norm_x_hat(input, num_groups, eps)
            rows = _group_rows(g, num_groups)
            grad_input = _reference.normalization_grad_input(rows, x_hat, invstd, rows.shape[1], (-1, 1), (1,))
            grad_input = grad_input.reshape(input.shape)
            dims = (0,) + tuple(range(2, input.dim()))
            grad_weight = (grad_output * x_hat.reshape(input.shape)).sum(dim=dims)
            grad_bias = grad_output.sum(dim=dims)
        else:
            grad_output = grad_output.contiguous(memory_format=_memory_format(input))
            grad_input, grad_weight, grad_bias = kernels(backend).group_norm_backward(
                grad_output, input, mean, invstd, weight, num_groups)
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, num_groups, eps, backend):
        x_dim, w_dim, b_dim = in_dims[:3]
        batch = info.batch_size
        maps = samples_into_batch(input, x_dim, batch)  # the statistics are per sample: the samples' batches are one batch
        if w_dim is None and b_dim is None:
            outputs = GroupNormFunction.apply(maps, weight, bias, num_groups, eps, backend)
            return tuple(batch_into_samples(t, batch) for t in outputs), (0, 0, 0)
        y, mean, invstd = (batch_into_samples(t, batch)
                           for t in GroupNormFunction.apply(maps, None, None, num_groups, eps, backend))
        if weight is not None:  # γ_n,c·x̂ + β_n,c per sample
            y = y * per_sample_channels(weight, w_dim, batch, y.dim() - 1)
        if bias is not None:
            y = y + per_sample_channels(bias, b_dim, batch, y.dim() - 1)
        return (y, mean, invstd), (0, 0, 0)

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        # ẏ = γ ⊙ ẋ̂ + γ̇ ⊙ x̂ + β̇, ẋ̂ = σ⁻¹·(ẋ − mean ẋ − x̂·mean(ẋ ⊙ x̂)) per (n, g) (the backward's
        # self-adjoint projection); statistics recomputed from x in plain tensor code
        input, weight = ctx.saved_tensors
        num_groups, eps, _ = ctx.conf
        shape = (1, -1) + (1,) * (input.dim() - 2)
        x_hat, invstd = _group_norm_x_hat(input, num_groups, eps)
        x_hat_t = None
        if input_t is not None:
            rows = _group_rows(input_t, num_groups)
            x_hat_t = _reference.normalization_grad_input(rows, x_hat, invstd, rows.shape[1], (-1, 1), (1,))
            x_hat_t = x_hat_t.reshape(input.shape)
            x_hat_t = x_hat_t if weight is None else x_hat_t * weight.reshape(shape)
        x_hat = x_hat.reshape(input.shape)
        return tangent_sum(x_hat_t, None if weight_t is None else x_hat * weight_t.reshape(shape),
                           None if bias_t is None else bias_t.reshape(shape).expand(input.shape)), None, None


class ChannelAffineFunction(Function):
    """y = γ_c·x + β_c on channel c (dim 1) of an (n, C, *) tensor (group norm's affine step);
    δx = γ_c·δy, ∂J/∂γ_c = Σ δy·x, ∂J/∂β_c = Σ δy over every entry of channel c."""

    @staticmethod
    def forward(input, weight, bias):
        shape = (1, -1) + (1,) * (input.dim() - 2)
        y = input if weight is None else input * weight.reshape(shape)
        return y if bias is None else y + bias.reshape(shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None, weight)
        ctx.save_for_forward(input, weight)  # jvp: ẏ = γ·ẋ + γ̇·x + β̇
        ctx.input_size = tuple(input.shape)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad_output.dim() - 2)
        dims = (0,) + tuple(range(2, grad_output.dim()))
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output if weight is None else grad_output * weight.reshape(shape)  # γ_c·δy
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_output * input).sum(dim=dims)  # Σ δy·x
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=dims)  # Σ δy
        return grad_input, grad_weight, grad_bias

    @staticmethod
    def vmap(info, in_dims, input, weight, bias):
        x_dim, w_dim, b_dim = in_dims
        batch = info.batch_size
        if w_dim is None and b_dim is None:  # shared γ, β: the samples' batches are one batch
            return batch_into_samples(ChannelAffineFunction.apply(samples_into_batch(input, x_dim, batch), weight, bias),
                                      batch), 0
        # γ_n, β_n per sample: per-channel parameters, so the samples' channels side by side
        y = ChannelAffineFunction.apply(samples_into_channels(input, x_dim, batch),
                                        None if weight is None else samples_into_batch(weight, w_dim, batch),
                                        None if bias is None else samples_into_batch(bias, b_dim, batch))
        return channels_into_samples(y, batch), 0

    @forward_mode_rule
    def jvp(ctx, input_t, weight_t, bias_t):
        input, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (len(ctx.input_size) - 2)
        return tangent_sum(
            None if input_t is None else ChannelAffineFunction.apply(input_t, weight, None),
            None if weight_t is None else input * weight_t.reshape(shape),
            None if bias_t is None else bias_t.reshape(shape).expand(ctx.input_size),
        )


class DropoutFunction(Function):
    """y = x ⊙ m with the scaled keep mask m = s where the drawn bool mask holds, else 0 (s = 1/(1 − p);
    the mask broadcast over whole feature maps for dropout2d); linear in x, so δx = δy ⊙ m."""

    @staticmethod
    def forward(input, mask, scale, backend):
        return dropout_masked_scale(input, mask, scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mask, ctx.scale, ctx.backend = inputs
        ctx.save_for_backward(mask)  # one byte an entry (torch's dropout keeps its float mask)
        ctx.save_for_forward(mask)  # jvp

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return derivative(DropoutFunction, grad_output, mask, ctx.scale, ctx.backend), None, None, None

    @staticmethod
    def vmap(info, in_dims, input, mask, scale, backend):
        # elementwise with a broadcast mask: an unmapped input or mask broadcasts over the samples
        batch = info.batch_size
        mask = mask if in_dims[1] is None else mask.movedim(in_dims[1], 0)
        x = _sample_first(input, in_dims[0], batch)
        if in_dims[1] is not None:
            mask = mask.reshape(mask.shape[:1] + (1,) * (x.dim() - mask.dim()) + mask.shape[1:])
        return DropoutFunction.apply(x, mask, scale, backend), 0

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        (mask,) = ctx.saved_tensors
        return DropoutFunction.apply(input_t, mask, ctx.scale, ctx.backend)  # linear in x


def dropout_masked_scale(values, mask, scale, backend):
    """values ⊙ m (dropout's product, both directions): csrc/dropout.cpp for a CPU float32/float64
    tensor of the mask's size (dropout's), else reference.py's formula (dropout2d's broadcast mask,
    bfloat16/float16, CUDA)."""
    kernel = backend == "cpp" and values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) \
        and values.shape == mask.shape
    return (kernels("cpp") if kernel else _reference).dropout_masked_scale(values, mask, scale)


# =============================================================================================
# Activations: GELU, SiLU, Hardtanh (ReLU6), Hardswish, Hardsigmoid, LeakyReLU, ELU, Softmax and
# LogSoftmax (docs/derivation.md, "Activations"). y = f(x) elementwise, δx = δy ⊙ f′(x). Each f
# and f′ is one function below; a piecewise f′ SELECTS with torch.where (never a 0/1 mask, since
# 0·inf = NaN). The branch conditions are torch's, so the derivative at a breakpoint and at NaN
# is torch's. Every backward is differentiable tensor algebra: double backward works.


def cpu_only_kernels(backend: str, input: torch.Tensor):
    """The kernels of an op with only CPU kernels in csrc (GELU, linear's backward): a CUDA tensor
    takes the reference formulas (torch's CUDA math)."""
    return kernels(backend if input.device.type == "cpu" else "reference")


def gelu_second_derivative(x, approximate):
    """GELU″(x) = φ(x)(2 − x²); 'tanh': (1 − t²)(u′ − x·t·u′² + ½x·u″), t = tanh u(x),
    u′ = √(2/π)(1 + 3κx²), u″ = 6κ√(2/π)·x (differentiable tensor code: third derivatives work)."""
    if approximate == "tanh":
        t = TanhFunction.apply(gelu_tanh_inner(x), 1.0, 1.0, "reference")  # hand-derived derivative of tanh too
        du = SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_KAPPA * x * x)
        ddu = 6 * GELU_TANH_KAPPA * SQRT_2_OVER_PI * x
        return (1 - t * t) * (du - x * t * du * du + 0.5 * x * ddu)
    return normal_pdf(x) * (2 - x * x)


def silu_derivative(x):
    """SiLU′(x) = σ(x)(1 + x(1 − σ(x))) (σ by SigmoidFunction: its derivative is hand-derived too)."""
    s = SigmoidFunction.apply(x, "reference")
    return s * (1 + x * (1 - s))


def save_activation_input(ctx, input, output):
    """setup_context's save of an activation that keeps its input z: z, or, where z = BN(x) of a
    training batch norm, what rebuilds it (and then y = f(z) too, for the next conv: recompute.py)."""
    function = recompute.function_of(ctx) if recompute.may_rebuild() else None  # (torch.compile's ctx has no class)
    source = None if function is None else recompute.batch_norm_output(input, function)
    recompute.save(ctx, input, source)
    if source is not None:
        recompute.mark_rebuilt(ctx, output, source, ctx.args, function)


class ElementwiseRules:
    """torch.func rules of an elementwise y = f(x, *args) whose Function saves x for forward
    (``ctx.save_for_forward(x)``, args in ``ctx.args``) and has ``input_grad(x, δ, *args) = δ ⊙ f′(x)``:
    vmap applies f to the mapped tensor as it is; jvp is ẏ = f′(x)·ẋ = input_grad(x, ẋ, *args)."""

    @classmethod
    def vmap(cls, info, in_dims, input, *args):
        return cls.apply(input, *args), in_dims[0]

    @forward_mode_rule
    @classmethod
    def jvp(cls, ctx, input_t, *_):
        (input,) = ctx.saved_tensors
        return cls.input_grad(input, input_t, *getattr(ctx, "args", ()))


class GELUFunction(ElementwiseRules, Function):
    """y = GELU(x) ('none' or 'tanh'); δx = δy ⊙ GELU′(x) (GELUBackwardFunction)."""

    @staticmethod
    def forward(input, approximate, backend):
        return cpu_only_kernels(backend, input).gelu_forward(input, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.args = inputs[0], inputs[1:]
        save_activation_input(ctx, input, output)
        ctx.save_for_forward(input)  # jvp

    @staticmethod
    def input_grad(input, delta, approximate, backend):
        return derivative(GELUBackwardFunction, delta, input, approximate, backend)

    @staticmethod
    def backward(ctx, delta):
        (input,) = recompute.saved(ctx, differentiated_again(), activate=False)
        return GELUFunction.input_grad(input, delta, *ctx.args), None, None


class GELUBackwardFunction(Function):
    """δx = δy ⊙ GELU′(x) as a Function of (δy, x), so second derivatives are hand-derived too:
    ∂δx/∂δy = GELU′(x) (this Function again), ∂δx/∂x = δy ⊙ GELU″(x)."""

    @staticmethod
    def forward(grad_output, input, approximate, backend):
        return cpu_only_kernels(backend, input).gelu_backward(grad_output, input, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, ctx.approximate, ctx.backend = inputs
        ctx.save_for_backward(grad_output, input)
        ctx.save_for_forward(grad_output, input)  # jvp

    @staticmethod
    def backward(ctx, g):
        grad_output, input = ctx.saved_tensors
        d_grad_output = d_input = None
        if ctx.needs_input_grad[0]:  # g ⊙ GELU′(x)
            d_grad_output = GELUBackwardFunction.apply(g, input, ctx.approximate, ctx.backend)
        if ctx.needs_input_grad[1]:  # g ⊙ δy ⊙ GELU″(x)
            d_input = g * grad_output * gelu_second_derivative(input, ctx.approximate)
        return d_grad_output, d_input, None, None

    @staticmethod
    def vmap(info, in_dims, grad_output, input, approximate, backend):
        # elementwise: both with the mapped dimension first (an unmapped one broadcast)
        batch = info.batch_size
        return GELUBackwardFunction.apply(_sample_first(grad_output, in_dims[0], batch),
                                          _sample_first(input, in_dims[1], batch), approximate, backend), 0

    @forward_mode_rule
    def jvp(ctx, grad_output_t, input_t, *_):
        # d(δy ⊙ GELU′(x)) = δẏ ⊙ GELU′(x) + δy ⊙ GELU″(x) ⊙ ẋ
        grad_output, input = ctx.saved_tensors
        return tangent_sum(
            None if grad_output_t is None else GELUBackwardFunction.apply(grad_output_t, input, ctx.approximate, ctx.backend),
            None if input_t is None else input_t * grad_output * gelu_second_derivative(input, ctx.approximate),
        )


def activation_kernel_forward(kind, input, *args):
    """y = f(x) by the activation kernel ``kind`` (csrc/activations.cpp; the reference backend and
    CUDA tensors: reference.py's same formulas); args = (*params, backend)."""
    *params, backend = args
    return cpu_only_kernels(backend, input).activation_forward(input, kind, [float(p) for p in params])


def activation_input_grad(kind, differentiable_grad, input, delta, args):
    """δx = δ ⊙ f′(x) of the activation ``kind`` (args = its (*params, backend)): the backward
    kernel, or, where the result may be differentiated again, ``differentiable_grad(x, δ, *params)``
    in tensor code that autograd differentiates once more (double backward, torch.func, forward AD)."""
    if differentiated_again():
        return differentiable_grad(input, delta, *args[:-1])
    *params, backend = args
    return cpu_only_kernels(backend, input).activation_backward(delta, input, kind, [float(p) for p in params])


def activation_backward(kind, differentiable_grad, ctx, delta):
    """The backward of the activation ``kind``: δx, and None for each of its (*params, backend)."""
    (input,) = recompute.saved(ctx, differentiated_again(), activate=False)
    return (activation_input_grad(kind, differentiable_grad, input, delta, ctx.args),) + (None,) * len(ctx.args)


class KernelActivation(ElementwiseRules):
    """An activation Function of (input, *params, backend) whose forward and backward are the
    activation kernels of its ``kind``; subclasses give ``forward`` (named parameters),
    ``differentiable_grad(x, δ, *params)``, and ``backward`` and ``input_grad`` as static methods
    naming their kind and differentiable_grad (torch.compile traces those, not class methods or a
    class attribute passed on)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.args = inputs[0], inputs[1:]
        save_activation_input(ctx, input, output)
        ctx.save_for_forward(input)  # jvp


class SiLUFunction(KernelActivation, Function):
    """y = x·σ(x); δx = δy ⊙ σ(x)(1 + x(1 − σ(x)))."""

    @staticmethod
    def forward(input, backend):
        return activation_kernel_forward("silu", input, backend)

    @staticmethod
    def input_grad(input, delta, *args):
        return activation_input_grad("silu", SiLUFunction.differentiable_grad, input, delta, args)

    @staticmethod
    def backward(ctx, delta):
        return activation_backward("silu", SiLUFunction.differentiable_grad, ctx, delta)

    @staticmethod
    def differentiable_grad(input, delta):
        return delta * silu_derivative(input)


class HardtanhFunction(KernelActivation, Function):
    """y = clamp(x, min_val, max_val); δx = δy where min_val < x < max_val, else 0."""

    piecewise = True  # rebuilt after a training batch norm (recompute.py)

    @staticmethod
    def forward(input, min_val, max_val, backend):
        return activation_kernel_forward("hardtanh", input, min_val, max_val, backend)

    @staticmethod
    def input_grad(input, delta, *args):
        return activation_input_grad("hardtanh", HardtanhFunction.differentiable_grad, input, delta, args)

    @staticmethod
    def backward(ctx, delta):
        return activation_backward("hardtanh", HardtanhFunction.differentiable_grad, ctx, delta)

    differentiable_grad = staticmethod(_reference.hardtanh_grad)

    @staticmethod
    def support(output, min_val, max_val, backend):
        """Where f′ = 1, read from y = clamp(x, min_val, max_val): min_val < y < max_val exactly where
        min_val < x < max_val (NaN: neither)."""
        return cpu_only_kernels(backend, output).hardtanh_backward_mask(output, float(min_val), float(max_val))

    @staticmethod
    def support_is_exact(input, min_val, max_val, backend):
        """Whether y tells the clamped entries from the rest: the clamp's bounds are values of x's
        dtype (float32 / float64 clamp with the bounds in their dtype; bfloat16 / float16 are
        clamped in float32 and rounded, so a bound between two of their values is not)."""
        if input.dtype in (torch.float32, torch.float64):
            return True
        return all(torch.tensor(b, dtype=input.dtype).item() == b for b in (min_val, max_val))


class HardswishFunction(KernelActivation, Function):
    """y = x·relu6(x + 3)/6; δx = 0 | δ(x/3 + ½) | δ on x ≤ −3 | −3 < x < 3 | x ≥ 3."""

    piecewise = True  # rebuilt after a training batch norm (recompute.py)

    @staticmethod
    def forward(input, backend):
        return activation_kernel_forward("hardswish", input, backend)

    @staticmethod
    def input_grad(input, delta, *args):
        return activation_input_grad("hardswish", HardswishFunction.differentiable_grad, input, delta, args)

    @staticmethod
    def backward(ctx, delta):
        return activation_backward("hardswish", HardswishFunction.differentiable_grad, ctx, delta)

    differentiable_grad = staticmethod(_reference.hardswish_grad)


class HardsigmoidFunction(KernelActivation, Function):
    """y = relu6(x + 3)/6; δx = δ/6 where −3 < x < 3, else 0."""

    piecewise = True  # rebuilt after a training batch norm (recompute.py)

    @staticmethod
    def forward(input, backend):
        return activation_kernel_forward("hardsigmoid", input, backend)

    @staticmethod
    def input_grad(input, delta, *args):
        return activation_input_grad("hardsigmoid", HardsigmoidFunction.differentiable_grad, input, delta, args)

    @staticmethod
    def backward(ctx, delta):
        return activation_backward("hardsigmoid", HardsigmoidFunction.differentiable_grad, ctx, delta)

    differentiable_grad = staticmethod(_reference.hardsigmoid_grad)


class LeakyReLUFunction(KernelActivation, Function):
    """y = x | a·x on x > 0 | x ≤ 0; δx = δ | a·δ."""

    piecewise = True  # rebuilt after a training batch norm (recompute.py)

    @staticmethod
    def forward(input, negative_slope, backend):
        return activation_kernel_forward("leaky_relu", input, negative_slope, backend)

    @staticmethod
    def input_grad(input, delta, *args):
        return activation_input_grad("leaky_relu", LeakyReLUFunction.differentiable_grad, input, delta, args)

    @staticmethod
    def backward(ctx, delta):
        return activation_backward("leaky_relu", LeakyReLUFunction.differentiable_grad, ctx, delta)

    differentiable_grad = staticmethod(_reference.leaky_relu_grad)

    @staticmethod
    def check_inplace_backward(negative_slope, backend):
        if negative_slope < 0:  # torch's in-place leaky_relu_ backward refuses a negative slope
            raise RuntimeError(
                "In-place leakyReLu backward calculation is triggered with a negative slope which is not "
                "supported. This is caused by calling in-place forward function with a negative slope, "
                "please call out-of-place version instead.")


class ELUFunction(KernelActivation, Function):
    """y = α(eˣ − 1) | x on x ≤ 0 | x > 0; δx = δ·αeˣ | δ."""

    @staticmethod
    def forward(input, alpha, backend):
        return activation_kernel_forward("elu", input, alpha, backend)

    @staticmethod
    def input_grad(input, delta, *args):
        return activation_input_grad("elu", ELUFunction.differentiable_grad, input, delta, args)

    @staticmethod
    def backward(ctx, delta):
        return activation_backward("elu", ELUFunction.differentiable_grad, ctx, delta)

    differentiable_grad = staticmethod(_reference.elu_grad)

    @staticmethod
    def check_inplace_backward(alpha, backend):
        if alpha < 0:  # torch's in-place elu_ backward refuses a negative alpha
            raise RuntimeError(
                "In-place elu backward calculation is triggered with a negative slope which is not supported. "
                "This is caused by calling in-place forward function with a negative slope, please call "
                "out-of-place version instead.")


class InplaceActivationFunction(Function):
    """x ← f(x) in place (torch's ``inplace=True``): the input is overwritten and returned, marked
    dirty as torch's in-place ops are; ``original`` is a copy of x taken before the write, so
    δx = δy ⊙ f′(x) is the out-of-place Function's own ``input_grad``. Where x = BN(x₀) of a
    training batch norm is rebuilt instead (recompute.py), no copy is taken: original is None."""

    @staticmethod
    def forward(input, original, function, args):
        return input.copy_(function.forward(input if original is None else original, *args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, original, ctx.function, ctx.args = inputs
        ctx.mark_dirty(input)
        # x = BN(x₀) of a training batch norm, written once since (by forward's copy_): recompute.py
        source = recompute.batch_norm_output(input, ctx.function, writes=1)
        if source is None and original is None:  # (_activation asked the same question just before)
            raise RuntimeError("manualconv: an in-place activation without a copy of x found nothing to rebuild x from")
        recompute.save(ctx, None if source is not None else original, source)
        if source is not None:
            recompute.mark_rebuilt(ctx, output, source, ctx.args, ctx.function)

    @staticmethod
    def backward(ctx, delta):
        (original,) = recompute.saved(ctx, differentiable=False, activate=False)  # (detached, as the copy is)
        check = getattr(ctx.function, "check_inplace_backward", None)
        if check is not None:
            check(*ctx.args)
        return ctx.function.input_grad(original, delta, *ctx.args), None, None, None


class InplaceActivationFromOutputFunction(Function):
    """x ← f(x) in place, for an f whose derivative reads as well from its output y = f(x), so no
    copy of x is kept (InplaceActivationFunction keeps one: mobilenet_v2's ReLU6(inplace=True)
    layers held one more activation each).
    - ReLU (``output_grad``): y, the overwritten input, is saved, as torch's relu_ saves its result
      (δz = δ where y > 0 or y is NaN); a later in-place change of y makes the backward raise, as
      torch's does.
    - hardtanh (``support``): f′ = 1 where min_val < x < max_val, which is where min_val < y <
      max_val, else 0 (NaN: 0); that bool mask is taken from y before anything can change y (1 byte
      an entry; torch's hardtanh_ keeps a copy of x) and δx = δ where it holds, selected, so a later
      change of y leaves the gradient torch's."""

    @staticmethod
    def forward(input, function, args):
        return input.copy_(function.forward(input, *args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.function, ctx.args = inputs
        ctx.mark_dirty(input)
        support = getattr(ctx.function, "support", None)
        # x = BN(x₀) of a training batch norm, written once since (by forward's copy_): recompute.py
        source = recompute.batch_norm_output(input, ctx.function, writes=1)
        if support is None:
            recompute.save(ctx, output, source, made_by=ctx)
        else:  # the mask, unless it can be read from a rebuilt BN(x₀) (min < z < max where min < y < max)
            recompute.save(ctx, support(output, *ctx.args) if source is None else None, source)
        if source is not None:
            recompute.mark_rebuilt(ctx, output, source, ctx.args, ctx.function)

    @staticmethod
    def backward(ctx, delta):
        (saved,) = recompute.saved(ctx, differentiable=False, activate=False)  # y or the mask; or z = BN(x₀)
        if hasattr(ctx.function, "support") and ctx.rebuild is not None:
            saved = ctx.function.support(saved, *ctx.args)
        if hasattr(ctx.function, "support"):  # δx = δ where f′ = 1, else 0 (a selection: never δ·0)
            backend = "reference" if differentiated_again() else ctx.args[-1]
            return cpu_only_kernels(backend, delta).select_backward(delta, saved), None, None
        return ctx.function.output_grad(saved, delta, *ctx.args), None, None


class SoftmaxFunction(Function):
    """y = softmax(x) along dim; δx = y ⊙ (δy − Σ δy ⊙ y) (csrc/softmax.cpp; reference.py)."""

    @staticmethod
    def forward(input, dim, backend):
        return cpu_only_kernels(backend, input).softmax_forward(input, dim, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim, ctx.backend = inputs[1:]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)  # jvp

    @staticmethod
    def backward(ctx, delta):
        (y,) = ctx.saved_tensors
        if differentiated_again():  # the formula in differentiable tensor code
            return _reference.softmax_backward(delta, y, ctx.dim, False), None, None
        return cpu_only_kernels(ctx.backend, y).softmax_backward(delta, y, ctx.dim, False), None, None

    @staticmethod
    def vmap(info, in_dims, input, dim, backend):
        return SoftmaxFunction.apply(input.movedim(in_dims[0], 0), dim + 1 if dim >= 0 else dim, backend), 0

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        (y,) = ctx.saved_tensors  # ẏ = y ⊙ (ẋ − Σ ẋ ⊙ y): the Jacobian diag(y) − y yᵀ is symmetric
        return _reference.softmax_backward(input_t, y, ctx.dim, False)


class LogSoftmaxFunction(Function):
    """y = log softmax(x) along dim; δx = δy − e^y · Σ δy (csrc/softmax.cpp; reference.py)."""

    @staticmethod
    def forward(input, dim, backend):
        return cpu_only_kernels(backend, input).softmax_forward(input, dim, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim, ctx.backend = inputs[1:]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)  # jvp

    @staticmethod
    def backward(ctx, delta):
        (y,) = ctx.saved_tensors
        if differentiated_again():  # the formula in differentiable tensor code
            return _reference.softmax_backward(delta, y, ctx.dim, True), None, None
        return cpu_only_kernels(ctx.backend, y).softmax_backward(delta, y, ctx.dim, True), None, None

    @staticmethod
    def vmap(info, in_dims, input, dim, backend):
        return LogSoftmaxFunction.apply(input.movedim(in_dims[0], 0), dim + 1 if dim >= 0 else dim, backend), 0

    @forward_mode_rule
    def jvp(ctx, input_t, *_):
        (y,) = ctx.saved_tensors  # ẏ = ẋ − Σ e^y ⊙ ẋ
        return input_t - (torch.exp(y) * input_t).sum(ctx.dim, keepdim=True)
