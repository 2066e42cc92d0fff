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


class AdaptiveMaxPool2dFunction(Function):
    """y = max over each adaptive window, argmax recorded; backward is max pooling's routing."""

    @staticmethod
    def forward(input, output_size, backend):
        return kernels(backend).adaptive_max_pool2d_forward(input, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, _, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.input_size = tuple(input.shape)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        (indices,) = ctx.saved_tensors
        return MaxPool2dBackwardFunction.apply(grad_output, indices, ctx.input_size, ctx.backend), None, None


class AdaptiveAvgPool2dFunction(Function):
    """y = Σ_window x / area; backward spreads δ / area over each adaptive window."""

    @staticmethod
    def forward(input, output_size, backend):
        return kernels(backend).adaptive_avg_pool2d_forward(input, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, output_size, backend = inputs
        ctx.input_size = tuple(input.shape)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_output):
        return AdaptiveAvgPool2dBackwardFunction.apply(grad_output, ctx.input_size, ctx.backend), None, None


class AdaptiveAvgPool2dBackwardFunction(Function):
    """δx = spread(δy / area). Linear; its adjoint is adaptive average pooling itself."""

    @staticmethod
    def forward(grad_output, input_size, backend):
        return kernels(backend).adaptive_avg_pool2d_backward(grad_output, input_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, _, backend = inputs
        ctx.output_size = tuple(grad_output.shape[2:])
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_grad_input):
        return AdaptiveAvgPool2dFunction.apply(grad_grad_input, ctx.output_size, ctx.backend), None, None


class LinearFunction(Function):
    """z = W·x + b (rows of x are samples: z = x Wᵀ + b); δx = Wᵀδ, ∂J/∂W = δ xᵀ, ∂J/∂b = δ."""

    @staticmethod
    def forward(input, weight, bias):
        z = input.matmul(weight.t())
        return z if bias is None else z + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, delta):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = delta.matmul(weight)  # δˡ⁻¹ = Wᵀ δˡ (before ⊙ f′, which the activation applies)
        if ctx.needs_input_grad[1]:
            grad_weight = delta.reshape(-1, delta.shape[-1]).t().matmul(input.reshape(-1, input.shape[-1]))  # δ xᵀ
        if ctx.needs_input_grad[2]:
            grad_bias = delta.reshape(-1, delta.shape[-1]).sum(0)  # ∂J/∂b = δ, summed over samples
        return grad_input, grad_weight, grad_bias


class ReLUFunction(Function):
    """y = max(z, 0); δz = δy ⊙ f′(z) with f′(z) = 1 where z > 0, else 0."""

    @staticmethod
    def forward(input):
        return input.clamp(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, delta):
        (output,) = ctx.saved_tensors
        return delta * (output > 0).to(delta.dtype)


class SigmoidFunction(Function):
    """y = 1 / (1 + e⁻ᶻ); δz = δy ⊙ y(1 − y)."""

    @staticmethod
    def forward(input):
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, delta):
        (y,) = ctx.saved_tensors
        return delta * y * (1 - y)


class TanhFunction(Function):
    """y = A·tanh(S·z) (A = S = 1: tanh; LeNet-5's squashing: A = 1.7159, S = 2/3);
    δz = δy ⊙ f′(z) with f′(z) = A·S·(1 − tanh²(S·z)) = S·(A − y²/A)."""

    @staticmethod
    def forward(input, amplitude, slope):
        y = torch.tanh(input * slope) if slope != 1 else torch.tanh(input)
        return y * amplitude if amplitude != 1 else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.amplitude, ctx.slope = inputs
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, delta):
        (y,) = ctx.saved_tensors
        a, s = ctx.amplitude, ctx.slope
        return delta * (s * (a - y * y / a)), None, None


class CrossEntropyFunction(Function):
    """Softmax cross-entropy of logit rows z (M, C) against weighted target rows r (M, C):
    J_i = −Σ_c r_ic log softmax(z_i)_c = s_i·logsumexp(z_i) − r_i·z_i with s_i = Σ_c r_ic,
    then reduced (none, sum, or sum / divisor for mean).
    With one-hot r this is the derived output delta ∂J/∂z = softmax(z) − onehot(y); in general
    ∂J_i/∂z_i = s_i·softmax(z_i) − r_i and ∂J_i/∂r_i = −log softmax(z_i)."""

    @staticmethod
    def forward(logits, target, reduction, divisor):
        log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        losses = -(target * log_probs).sum(dim=1)
        if reduction == "none":
            return losses
        return losses.sum() if reduction == "sum" else losses.sum() / divisor

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, ctx.reduction, ctx.divisor = inputs
        ctx.save_for_backward(logits, target)

    @staticmethod
    def backward(ctx, grad):
        logits, target = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad.unsqueeze(1)
        else:
            scale = grad if ctx.reduction == "sum" else grad / ctx.divisor
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            probs = torch.softmax(logits, dim=1)
            grad_logits = scale * (target.sum(dim=1, keepdim=True) * probs - target)  # s·softmax(z) − r
        if ctx.needs_input_grad[1]:
            grad_target = scale * -torch.log_softmax(logits, dim=1)
        return grad_logits, grad_target, None, None


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


class BiasFunction(Function):
    """y = x + b per channel of an (N, C, H, W) map; ∂J/∂x = δ, ∂J/∂b = Σ δ over batch and space."""

    @staticmethod
    def forward(input, bias):
        return input + bias.reshape(1, -1, 1, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, delta):
        return delta, conv2d_grad_bias(delta)
