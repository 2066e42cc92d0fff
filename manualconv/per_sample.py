"""Per-sample gradients with manualconv's kernels: ∂J/∂W_n = x_n ⋆ δ_n, the weight gradient of
the derivation without its sum over the samples n.

Two routes, one computation with no unfold (whose buffer is kH·kW times the input): the
Opacus samplers on the 'cpp' backend call ``torch.ops.manualconv.conv2d_grad_weight_per_sample``
(csrc/conv2d_channels_last.cpp: a GEMM per (sample, group) written straight into the result, x and
δ read in place); otherwise, and under torch.func, ``conv2d_grad_weight_per_sample`` in autograd.py
puts the N samples' channels side by side as N·g groups of one grad-weight kernel call, so each
group correlates x_n with δ_n alone:

- ``torch.func``: every manualconv Function has ``vmap`` and ``jvp`` rules, so
  ``vmap(grad(loss))`` over a manualconv model gives per-sample gradients;
  :func:`per_sample_grads` is that in one call.
- Opacus: :func:`register_grad_samplers` (run when this module is imported, if opacus is
  installed) registers a grad sampler for each manualconv layer with parameters — Conv2d,
  Conv1d, Linear, Subsampling2d, GroupNorm — so ``opacus.GradSampleModule`` and
  ``PrivacyEngine.make_private`` compute the per-sample gradients of a converted model from the
  activations and deltas its hooks capture, without rerunning the layer. Other layers with
  parameters (ConvTranspose2d, LayerNorm) take Opacus's functorch route, which reruns
  the layer under ``vmap(grad)`` through the same vmap rules.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from . import functional, modules
from .autograd import conv2d_grad_weight_per_sample
from .backend import get_backend

__all__ = ["per_sample_grads", "register_grad_samplers", "conv2d_grad_sample", "conv1d_grad_sample",
           "linear_grad_sample", "subsampling2d_grad_sample", "group_norm_grad_sample"]


def per_sample_grads(model: torch.nn.Module, loss_fn: Callable, inputs: torch.Tensor,
                     targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{parameter name: (N, *shape)}: the gradient of loss_fn(model(x_n), t_n) for each sample n
    alone, by torch.func.vmap(grad) (buffers are read, not updated). ``targets`` are mapped too, so
    for manualconv's cross_entropy give them as probability rows (one-hot), since its class-index
    bounds check can't run under vmap."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(params, x, target):
        return loss_fn(functional_call(model, (params, buffers), (x.unsqueeze(0),)), target.unsqueeze(0))
    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def _conv_input_and_padding(layer, x: torch.Tensor):
    """The padded input and the padding the module's forward convolves with (padding_mode,
    'valid', 'same'), as (N, C, H, W) with padding a pair (Conv1d: H = 1)."""
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * len(layer.kernel_size)
    else:
        padding = layer.padding
    if x.dim() == 3:  # Conv1d: a conv2d of height 1, as functional.conv1d computes it
        x, kernel, dilation = x.unsqueeze(2), (1,) + tuple(layer.kernel_size), (1,) + tuple(layer.dilation)
        padding = padding if isinstance(padding, str) else (0,) + tuple(padding)
    else:
        kernel, dilation = tuple(layer.kernel_size), tuple(layer.dilation)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        x, padding = functional._same_padding(x, kernel, dilation)
    return x, tuple(padding), dilation


def _per_sample_kernel_serves(x: torch.Tensor) -> bool:
    """Whether the C++ per-sample grad-weight kernel (csrc/conv2d_channels_last.cpp) computes this
    call: the 'cpp' backend, a CPU tensor, the operator built."""
    return get_backend() == "cpp" and x.device.type == "cpu" and hasattr(torch.ops.manualconv, "conv2d_grad_weight_per_sample")


def _conv2d_weight_grad_sample(x, delta, weight_size, stride, padding, dilation, groups) -> torch.Tensor:
    """∂J/∂W_n = x_n ⋆ δ_n, (N, O, C/g, kH, kW). 'cpp' on the CPU: one kernel call, a GEMM per
    (sample, group) written into its own slice (no copy of x or δ, no accumulator); otherwise the
    grouped grad-weight call of the samples' channels side by side (N·g groups)."""
    if _per_sample_kernel_serves(x):
        return torch.ops.manualconv.conv2d_grad_weight_per_sample(x, delta, list(weight_size), list(stride),
                                                                  list(padding), list(dilation), groups)
    return conv2d_grad_weight_per_sample(x.unsqueeze(1), delta.unsqueeze(1), weight_size, stride, padding,
                                         dilation, groups, get_backend())


if hasattr(torch.ops.manualconv, "conv2d_grad_weight_per_sample"):
    @torch.library.register_fake("manualconv::conv2d_grad_weight_per_sample")
    def _(input, grad_output, weight_size, stride, padding, dilation, groups):
        """The kernel's result: (N, O, C/g, kH, kW), each sample's gradient laid out (O, kH, kW, C/g)."""
        o, c, kh, kw = weight_size
        return input.new_empty_strided((input.shape[0], o, c, kh, kw), (o * kh * kw * c, kh * kw * c, 1, kw * c, c))


def conv2d_grad_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """Opacus grad sampler of manualconv.Conv2d / Conv1d: ∂J/∂W_n = x_n ⋆ δ_n (one per-sample
    grad-weight call), ∂J/∂b_n = Σ_ij δ_n."""
    x, padding, dilation = _conv_input_and_padding(layer, activations[0].to(backprops.dtype))
    delta = backprops if backprops.dim() == 4 else backprops.unsqueeze(2)
    stride = tuple(layer.stride) if delta is backprops else (1,) + tuple(layer.stride)
    grads = {}
    if layer.weight.requires_grad:
        weight_size = tuple(layer.weight.shape) if delta is backprops else tuple(layer.weight.unsqueeze(2).shape)
        if x.shape[0] == 0:  # no samples: no per-sample gradients
            grads[layer.weight] = layer.weight.new_zeros((0,) + tuple(layer.weight.shape))
        else:
            grads[layer.weight] = _conv2d_weight_grad_sample(x, delta, weight_size, stride, padding, dilation,
                                                             layer.groups).reshape((x.shape[0],) + tuple(layer.weight.shape))
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = delta.sum(dim=(2, 3))  # ∂J/∂b_n = Σ δ_n
    return grads


conv1d_grad_sample = conv2d_grad_sample  # Conv1d is a conv2d of height 1 (the sampler unsqueezes)


def linear_grad_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """Opacus grad sampler of manualconv.Linear: ∂J/∂W_n = δ_nᵀ x_n (summed over any sequence
    dimensions of sample n), ∂J/∂b_n = Σ δ_n: LinearFunction's δ xᵀ per sample, one batched matmul."""
    n = backprops.shape[0]
    delta = backprops.reshape(n, -1, backprops.shape[-1])
    grads = {}
    if layer.weight.requires_grad:
        x = activations[0].to(backprops.dtype)
        grads[layer.weight] = delta.transpose(1, 2).matmul(x.reshape(n, -1, x.shape[-1]))
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = delta.sum(dim=1)
    return grads


def subsampling2d_grad_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """Opacus grad sampler of manualconv.Subsampling2d: ∂J/∂β_n = Σ_ij δ_n ⊙ down(x_n),
    ∂J/∂b_n = Σ_ij δ_n (Subsampling2dFunction's gradients without the sum over n)."""
    grads = {}
    if layer.weight.requires_grad:
        down = functional.avg_pool2d(activations[0].to(backprops.dtype), layer.kernel_size, divisor_override=1)
        grads[layer.weight] = (backprops * down).sum(dim=(2, 3))
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=(2, 3))
    return grads


def group_norm_grad_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """Opacus grad sampler of manualconv.GroupNorm: ∂J/∂γ_n = Σ δ_n ⊙ x̂_n, ∂J/∂β_n = Σ δ_n per channel
    (ChannelAffineFunction's gradients without the sum over n; x̂ recomputed by group_norm without γ, β)."""
    dims = tuple(range(2, backprops.dim()))
    grads = {}
    if layer.weight is not None and layer.weight.requires_grad:
        x_hat = functional.group_norm(activations[0].to(backprops.dtype), layer.num_groups, None, None, layer.eps)
        grads[layer.weight] = (backprops * x_hat).sum(dim=dims)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=dims)
    return grads


SAMPLERS = {
    modules.Conv2d: conv2d_grad_sample,
    modules.Conv1d: conv1d_grad_sample,
    modules.Linear: linear_grad_sample,
    modules.Subsampling2d: subsampling2d_grad_sample,
    modules.GroupNorm: group_norm_grad_sample,
}


def register_grad_samplers() -> None:
    """Register manualconv's grad samplers with Opacus (its registry is keyed by exact class, so
    torch.nn's samplers don't apply to manualconv's subclasses). Idempotent."""
    from opacus.grad_sample import register_grad_sampler
    for layer_class, sampler in SAMPLERS.items():
        register_grad_sampler(layer_class)(sampler)


OPACUS_INSTALLED = importlib.util.find_spec("opacus") is not None
if OPACUS_INSTALLED:
    register_grad_samplers()
