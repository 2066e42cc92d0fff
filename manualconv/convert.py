"""Switch any model between torch.nn layers and their manualconv equivalents.

Each manualconv module is a subclass of the torch.nn module it replaces and adds no state, so a
conversion only changes each module's class: parameters (the same Parameter objects),
buffers, hooks, ``requires_grad`` and train/eval mode all stay, and ``state_dict``s are
interchangeable. Only modules whose type is exactly a supported torch.nn class are converted;
subclasses (which may override ``forward``) and unsupported layers are left as they are.
"""

from __future__ import annotations

import copy

import torch

from . import modules
from .capture import add_capture_hooks, remove_capture_hooks

TO_MANUAL = {
    torch.nn.Conv1d: modules.Conv1d,
    torch.nn.Conv2d: modules.Conv2d,
    torch.nn.ConvTranspose2d: modules.ConvTranspose2d,
    torch.nn.MaxPool2d: modules.MaxPool2d,
    torch.nn.AvgPool2d: modules.AvgPool2d,
    torch.nn.AdaptiveMaxPool2d: modules.AdaptiveMaxPool2d,
    torch.nn.AdaptiveAvgPool2d: modules.AdaptiveAvgPool2d,
    torch.nn.Linear: modules.Linear,
    torch.nn.ReLU: modules.ReLU,
    torch.nn.Sigmoid: modules.Sigmoid,
    torch.nn.Tanh: modules.Tanh,
    torch.nn.CrossEntropyLoss: modules.CrossEntropyLoss,
    # activations
    torch.nn.GELU: modules.GELU, torch.nn.SiLU: modules.SiLU, torch.nn.ReLU6: modules.ReLU6,
    torch.nn.Hardtanh: modules.Hardtanh, torch.nn.Hardswish: modules.Hardswish, torch.nn.Hardsigmoid: modules.Hardsigmoid,
    torch.nn.LeakyReLU: modules.LeakyReLU, torch.nn.ELU: modules.ELU, torch.nn.Softmax: modules.Softmax,
    torch.nn.LogSoftmax: modules.LogSoftmax,
    torch.nn.BatchNorm1d: modules.BatchNorm1d,  # normalisation and dropout
    torch.nn.BatchNorm2d: modules.BatchNorm2d,
    torch.nn.LayerNorm: modules.LayerNorm,
    torch.nn.GroupNorm: modules.GroupNorm,
    torch.nn.Dropout: modules.Dropout,
    torch.nn.Dropout2d: modules.Dropout2d,
}
TO_NATIVE = {manual: native for native, manual in TO_MANUAL.items()}


def _swap(model: torch.nn.Module, table, inplace: bool) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, but got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        target = table.get(type(module))
        if target is not None:
            module.__class__ = target
    return model


def convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Replace every supported torch.nn layer in ``model`` by its manualconv equivalent.
    With ``inplace=False`` (default) a converted deep copy is returned and ``model`` is untouched."""
    model = _swap(model, TO_MANUAL, inplace)
    add_capture_hooks(model)  # functional calls in its forward (F.relu, x.softmax(1), ...) too: capture.py
    return model


def revert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The inverse of :func:`convert`: manualconv layers back to torch.nn's."""
    model = _swap(model, TO_NATIVE, inplace)
    remove_capture_hooks(model)
    return model
