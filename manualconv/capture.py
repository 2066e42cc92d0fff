"""Functional capture: torch and torch.nn.functional calls routed to manualconv.

    with manualconv.capture():
        y = model_code(x)   # its torch conv / relu / softmax calls run manualconv.functional's
    model = manualconv.convert(torchvision_model)  # its forward runs under capture

A ``torch.overrides.TorchFunctionMode`` sees every torch function call. A covered one (the
table ``ROUTES`` below: conv, pools, linear, activations, softmax, norms, dropout, cross-entropy,
in their torch.nn.functional, torch.* and Tensor-method spellings) is served by the manualconv
function of the same signature, so its backward is hand-derived. A call is passed through to
torch unchanged when manualconv cannot serve it: a tensor argument that is not a plain float32 /
float64 tensor on the CPU or a CUDA device, an argument value the route does not take, or a
manualconv function that does not exist (yet): the norm and dropout routes look theirs up when
called, and serve once convert's table lists the torch.nn layer (BatchNorm2d, LayerNorm, ...).

Not routed (torch runs them as written): calls made while a routed call runs (the mode is off
inside its own handler), calls made by manualconv's own code (its modules and autograd
Functions use torch's elementwise ops on purpose), and calls made during a backward pass
(derivative code and hooks).
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import functional as manual

PASS = object()  # a route's answer when manualconv cannot serve the call: torch runs it
SERVED_DTYPES = (torch.float32, torch.float64)
SERVED_DEVICES = ("cpu", "cuda")


def servable(*tensors) -> bool:
    """Every given tensor (None = absent) is a plain float32/float64 torch.Tensor (or Parameter)
    on a device manualconv runs on; subclasses (fake, functorch, quantised...) are torch's."""
    return all(t is None or (plain(t) and t.dtype in SERVED_DTYPES) for t in tensors)


def plain(t) -> bool:
    """A torch.Tensor or Parameter (no subclass) on a device manualconv runs on."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type in SERVED_DEVICES


def in_place(input: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """torch's in-place contract (the input holds the result and is returned) for a manualconv
    function that returned a new tensor: the result is copied into the input (a differentiable copy)."""
    return input if result is input else input.copy_(result)


def _optional(name: str, module: type) -> Optional[Callable]:
    """manualconv.functional.<name>, looked up at call time: None until it exists and convert's
    table lists the torch.nn ``module`` it serves (the switch that says the layer has landed)."""
    from .convert import TO_MANUAL  # convert imports this module

    return getattr(manual, name, None) if module in TO_MANUAL else None


# ---------------------------------------------------------------------------------------------
# Routes: torch's signature in, manualconv.functional's call (or PASS) out


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if not servable(input, weight, bias):
        return PASS
    return manual.conv1d(input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if not servable(input, weight, bias):
        return PASS
    return manual.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    if not servable(input, weight, bias) or isinstance(padding, str):
        return PASS
    return manual.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if not servable(input):
        return PASS
    return manual.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    return max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, True)


def max_pool2d_without_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                               return_indices=False):
    return max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, False)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    if not servable(input):
        return PASS
    return manual.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def adaptive_avg_pool2d(input, output_size):
    if not servable(input):
        return PASS
    return manual.adaptive_avg_pool2d(input, output_size)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    if not servable(input):
        return PASS
    return manual.adaptive_max_pool2d(input, output_size, return_indices)


def adaptive_max_pool2d_with_indices(input, output_size, return_indices=False):
    return adaptive_max_pool2d(input, output_size, True)


def adaptive_max_pool2d_without_indices(input, output_size, return_indices=False):
    return adaptive_max_pool2d(input, output_size, False)


def linear(input, weight, bias=None):
    if not servable(input, weight, bias):
        return PASS
    return manual.linear(input, weight, bias)


def relu(input, inplace=False):
    if not servable(input):
        return PASS
    result = manual.relu(input, inplace=inplace)
    return in_place(input, result) if inplace else result


def relu_(input):
    return relu(input, inplace=True)


def sigmoid(input):
    return manual.sigmoid(input) if servable(input) else PASS


def tanh(input):
    return manual.tanh(input) if servable(input) else PASS


def gelu(input, approximate="none"):
    return manual.gelu(input, approximate) if servable(input) else PASS


def silu(input, inplace=False):
    return manual.silu(input, inplace) if servable(input) else PASS


def relu6(input, inplace=False):
    return manual.relu6(input, inplace) if servable(input) else PASS


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return manual.hardtanh(input, min_val, max_val, inplace) if servable(input) else PASS


def hardtanh_(input, min_val=-1.0, max_val=1.0):
    return hardtanh(input, min_val, max_val, True)


def hardswish(input, inplace=False):
    return manual.hardswish(input, inplace) if servable(input) else PASS


def hardsigmoid(input, inplace=False):
    return manual.hardsigmoid(input, inplace) if servable(input) else PASS


def leaky_relu(input, negative_slope=0.01, inplace=False):
    return manual.leaky_relu(input, negative_slope, inplace) if servable(input) else PASS


def leaky_relu_(input, negative_slope=0.01):
    return leaky_relu(input, negative_slope, True)


def elu(input, alpha=1.0, inplace=False):
    return manual.elu(input, alpha, inplace) if servable(input) else PASS


def elu_(input, alpha=1.0):
    return elu(input, alpha, True)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    if not (servable(input) if dtype is None else plain(input) and dtype in SERVED_DTYPES):
        return PASS
    return manual.softmax(input, dim, _stacklevel + 1, dtype)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    if not (servable(input) if dtype is None else plain(input) and dtype in SERVED_DTYPES):
        return PASS
    return manual.log_softmax(input, dim, _stacklevel + 1, dtype)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    if not servable(input, weight) or not isinstance(target, torch.Tensor):
        return PASS
    return manual.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    function = _optional("batch_norm", torch.nn.BatchNorm2d)
    if function is None or not servable(input, running_mean, running_var, weight, bias):
        return PASS
    return function(input, running_mean, running_var, weight, bias, training, momentum, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    function = _optional("layer_norm", torch.nn.LayerNorm)
    if function is None or not servable(input, weight, bias):
        return PASS
    return function(input, normalized_shape, weight, bias, eps)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    function = _optional("group_norm", torch.nn.GroupNorm)
    if function is None or not servable(input, weight, bias):
        return PASS
    return function(input, num_groups, weight, bias, eps)


def torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    """The torch-namespace spelling's argument order (weight and bias before the running statistics)."""
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return layer_norm(input, normalized_shape, weight, bias, eps)


def torch_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return group_norm(input, num_groups, weight, bias, eps)


def dropout(input, p=0.5, training=True, inplace=False):
    function = _optional("dropout", torch.nn.Dropout)
    if function is None or not servable(input):
        return PASS
    result = function(input, p, training, inplace)
    return in_place(input, result) if inplace else result


def dropout2d(input, p=0.5, training=True, inplace=False):
    function = _optional("dropout2d", torch.nn.Dropout2d)
    if function is None or not servable(input):
        return PASS
    result = function(input, p, training, inplace)
    return in_place(input, result) if inplace else result


def _spellings(*names_and_owners):
    """(owner, attribute name) pairs → the function objects that exist (torch versions differ)."""
    found = []
    for owner, name in names_and_owners:
        function = getattr(owner, name, None)
        if function is not None:
            found.append(function)
    return found


T = torch.Tensor
ROUTES: Dict[Callable, Callable] = {}
for _route, _spelled in [
    (conv1d, [(F, "conv1d"), (torch, "conv1d")]),
    (conv2d, [(F, "conv2d"), (torch, "conv2d")]),
    (conv_transpose2d, [(F, "conv_transpose2d"), (torch, "conv_transpose2d")]),
    (max_pool2d, [(F, "max_pool2d")]),
    (max_pool2d_with_indices, [(F, "max_pool2d_with_indices")]),
    (max_pool2d_without_indices, [(F, "_max_pool2d"), (torch, "max_pool2d")]),
    (avg_pool2d, [(F, "avg_pool2d"), (torch._C._nn, "avg_pool2d")]),
    (adaptive_avg_pool2d, [(F, "adaptive_avg_pool2d"), (torch._C._nn, "adaptive_avg_pool2d")]),
    (adaptive_max_pool2d, [(F, "adaptive_max_pool2d")]),
    (adaptive_max_pool2d_with_indices, [(F, "adaptive_max_pool2d_with_indices")]),
    (adaptive_max_pool2d_without_indices, [(F, "_adaptive_max_pool2d")]),
    (linear, [(F, "linear"), (torch._C._nn, "linear")]),
    (relu, [(F, "relu"), (torch, "relu"), (T, "relu")]),
    (relu_, [(F, "relu_"), (torch, "relu_"), (T, "relu_")]),
    (sigmoid, [(F, "sigmoid"), (torch, "sigmoid"), (T, "sigmoid")]),
    (tanh, [(F, "tanh"), (torch, "tanh"), (T, "tanh")]),
    (gelu, [(F, "gelu")]),
    (silu, [(F, "silu")]),
    (relu6, [(F, "relu6")]),
    (hardtanh, [(F, "hardtanh")]),
    (hardtanh_, [(F, "hardtanh_")]),
    (hardswish, [(F, "hardswish")]),
    (hardsigmoid, [(F, "hardsigmoid")]),
    (leaky_relu, [(F, "leaky_relu")]),
    (leaky_relu_, [(F, "leaky_relu_")]),
    (elu, [(F, "elu")]),
    (elu_, [(F, "elu_")]),
    (softmax, [(F, "softmax"), (torch, "softmax"), (T, "softmax")]),
    (log_softmax, [(F, "log_softmax"), (torch, "log_softmax"), (T, "log_softmax")]),
    (cross_entropy, [(F, "cross_entropy")]),
    (batch_norm, [(F, "batch_norm")]),
    (torch_batch_norm, [(torch, "batch_norm")]),
    (layer_norm, [(F, "layer_norm")]),
    (torch_layer_norm, [(torch, "layer_norm")]),
    (group_norm, [(F, "group_norm")]),
    (torch_group_norm, [(torch, "group_norm")]),
    (dropout, [(F, "dropout"), (torch, "dropout")]),
    (dropout2d, [(F, "dropout2d")]),
]:
    for _function in _spellings(*_spelled):
        ROUTES[_function] = _route


# manualconv modules that hold model code, written as a user writes it (F.relu in a forward):
# their calls are routed like any user's
MODEL_CODE = {"manualconv.models"}


def called_from_manualconv(frame) -> bool:
    """Whether the innermost caller outside torch (and outside this module) is manualconv's own
    layer code (its functional, modules, autograd and kernels; not MODEL_CODE)."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != __name__ and module != "torch" and not module.startswith("torch."):
            return (module.startswith("manualconv.") or module == "manualconv") and module not in MODEL_CODE
        frame = frame.f_back
    return False


class capture(TorchFunctionMode):
    """Within ``with manualconv.capture():`` covered torch calls run as manualconv's (see the
    module docstring). Re-entrant; thread-local (as every TorchFunctionMode)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            # torch.compile cannot trace the routing (it inspects the caller's frame): a compiled
            # model runs its manualconv modules as they are, its own F.* calls as torch's
            return func(*args, **kwargs)
        route = ROUTES.get(func)
        if route is not None and torch._C._current_graph_task_id() == -1 \
                and not called_from_manualconv(sys._getframe(1)):
            result = route(*args, **kwargs)
            if result is not PASS:
                return result
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# convert(model) runs the model's forward under capture. The model only carries a flag (a plain
# attribute, so it pickles, deep-copies and keeps its state_dict); two process-wide module hooks,
# installed at the first convert, enter a capture before a flagged module's forward and leave it
# after (also when forward raises). No hook is registered on the model itself; revert removes
# the flag.
#
# A manualconv layer's own forward (a module of manualconv.modules itself, not a user's subclass,
# which may override forward) runs with the capture stepped out of: its calls are manualconv's,
# never routed, and a mode sees every torch call made under it (attribute reads included), ~1200
# calls a ResNet-20 training step, all passed through.

FLAG = "_manualconv_capture"
LAYERS = "manualconv.modules"  # the module whose layer classes' forwards step out of a capture
_local = threading.local()  # .active: this thread's captures entered by the hooks, innermost last
_global_hooks = []


def _active() -> list:
    if not hasattr(_local, "active"):
        _local.active = []
    return _local.active


def _stepped_out() -> list:
    """This thread's (layer, capture) pairs stepped out of by the hooks, innermost last."""
    if not hasattr(_local, "stepped_out"):
        _local.stepped_out = []
    return _local.stepped_out


def _capture_on_top() -> bool:
    depth = torch._C._len_torch_function_stack()
    return depth > 0 and isinstance(torch._C._get_function_stack_at(depth - 1), capture)


def enter_capture_hook(module, args):
    if module.__dict__.get(FLAG, False):
        mode = capture()
        mode.__enter__()
        _active().append((module, mode))
    elif type(module).__module__ == LAYERS and not module._forward_pre_hooks and _capture_on_top() \
            and not torch.compiler.is_compiling():  # (a user's pre-hooks on the layer stay captured)
        _stepped_out().append((module, torch._C._pop_torch_function_stack()))


def exit_capture_hook(module, args, output):
    active = _active()
    if module.__dict__.get(FLAG, False) and active and active[-1][0] is module:
        active.pop()[1].__exit__(None, None, None)
        return
    stepped_out = _stepped_out()
    if stepped_out and stepped_out[-1][0] is module:
        torch._C._push_on_torch_function_stack(stepped_out.pop()[1])


def has_capture_hooks(model: torch.nn.Module) -> bool:
    return bool(model.__dict__.get(FLAG, False))


def add_capture_hooks(model: torch.nn.Module) -> None:
    """Make ``model``'s forward run under capture."""
    if not _global_hooks:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        _global_hooks.append(register_module_forward_pre_hook(enter_capture_hook))
        _global_hooks.append(register_module_forward_hook(exit_capture_hook, always_call=True))
    object.__setattr__(model, FLAG, True)


def remove_capture_hooks(model: torch.nn.Module) -> None:
    model.__dict__.pop(FLAG, None)
