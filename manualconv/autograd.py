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



import torch
from torch.autograd import Function

from .backend import kernels
from .reference import conv2d_grad_bias, max_pool2d_gather


class Conv2dFunction(Function):
    """y = x ⋆ W + b, backward δx = full-correlation(dilate_s(δ), rot180(W)), ∂J/∂W = x ⋆ δ, ∂J/∂b = Σδ."""

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, backend):
        return kernels(backend).conv2d_forward(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, backend = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # save only what backward needs: W for δx, x for ∂J/∂W
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
        ctx.input_size = tuple(input.shape)
        ctx.weight_size = tuple(weight.shape)
        ctx.conf = (stride, padding, dilation, groups, backend)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = Conv2dGradInputFunction.apply(grad_output, weight, ctx.input_size, *ctx.conf)
        if ctx.needs_input_grad[1]:
            grad_weight = Conv2dGradWeightFunction.apply(input, grad_output, ctx.weight_size, *ctx.conf)
        if ctx.needs_input_grad[2]:
            grad_bias = conv2d_grad_bias(grad_output)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


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
        ctx.input_size = tuple(input.shape)
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
        ctx.save_for_backward(indices)  # the argmax is all backward needs, not x
        ctx.input_size = tuple(input.shape)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_input = MaxPool2dBackwardFunction.apply(grad_output, indices, ctx.input_size, ctx.backend)
        return grad_input, None, None, None, None, None, None


class MaxPool2dBackwardFunction(Function):
    """δx[argmax] += δy. Linear in δy; its adjoint gathers at the argmax."""

    @staticmethod
    def forward(grad_output, indices, input_size, backend):
        return kernels(backend).max_pool2d_backward(grad_output, indices, input_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices, _, _ = inputs
        ctx.save_for_backward(indices)

    @staticmethod
    def backward(ctx, grad_grad_input):
        (indices,) = ctx.saved_tensors
        return max_pool2d_gather(grad_grad_input, indices), None, None, None


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
        grad_input = AvgPool2dBackwardFunction.apply(grad_output, ctx.input_size, *ctx.conf)
        return (grad_input,) + (None,) * 7


class AvgPool2dBackwardFunction(Function):
    """δx = spread(δy / divisor). Linear; its adjoint is average pooling itself."""

    @staticmethod
    def forward(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
                divisor_override, backend):
        return kernels(backend).avg_pool2d_backward(grad_output, input_size, kernel_size, stride, padding,
                                                    ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, *conf = inputs
        ctx.conf = tuple(conf)

    @staticmethod
    def backward(ctx, grad_grad_input):
        return (AvgPool2dFunction.apply(grad_grad_input, *ctx.conf),) + (None,) * 8
