"""Graph audit of converted torchvision classifiers (issue 14): after ``manualconv.convert``, the
backward graph of forward + loss holds only manualconv Functions, AccumulateGrad and plain tensor
glue (the one list: manualconv/verify.py::GLUE_NODES), a TorchDispatchMode sees no native conv,
pool, norm, activation, softmax or loss op (nor their backward) in forward and backward, and the
outputs and every gradient equal the original model's: float64 within 1e-9 of the largest
gradient, float32 (resnet18, mobilenet_v3_small) within 1e-4.

Small inputs (64×64, see MODELS) and batch 2 keep the file fast; each model is built once, runs
as the original and, converted in place, as manualconv's.
"""

from __future__ import annotations

import copy
import re
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
import torchvision

import manualconv
from manualconv.verify import native_backward_nodes
from test_audit import RecordAtenOps

# aten ops of torch's own layers and their derivatives (general algebra — mm, add, mul, exp,
# where, sum, amax, cat, view, ... — is fine); manualconv's kernels are in the manualconv:: namespace
NATIVE_OPS = re.compile(
    r"conv|pool|im2col|col2im|unfold|fold|mkldnn|cudnn|miopen|nnpack|_norm|norm_|relu|gelu|silu|hardswish|hardsigmoid"
    r"|hardtanh|elu|softmax|nll_loss|cross_entropy|threshold|sigmoid_backward|tanh_backward|dropout", re.IGNORECASE)


def native_ops(names) -> List[str]:
    return sorted(n for n in names if n.startswith("aten::") and NATIVE_OPS.search(n))


# name → (constructor kwargs, input side): 64×64 (inception_v3: 107×107). Batch 2 of these
# leaves training-mode batch norm 8+ values per channel at the last (2×2 or 3×3) maps; at 32×32
# its 1×1 maps give 2 values, whose normalisation amplifies rounding ~1e5-fold (float64 gradients
# then differ by ~1e-9 of their scale, float32 by ~1e-3: the inputs are ill-conditioned there)
MODELS: Dict[str, Tuple[dict, int]] = {
    "resnet18": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "vgg11_bn": ({}, 64),
    "alexnet": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": (dict(aux_logits=False, init_weights=True), 64),
    "inception_v3": (dict(aux_logits=False, init_weights=True), 107),  # 2×2 at its last maps
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "mnasnet0_5": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "convnext_tiny": ({}, 64),
}
BATCH, CLASSES = 2, 10


def build(name: str, dtype: torch.dtype) -> torch.nn.Module:
    kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES, **kwargs).to(dtype)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, train: bool):
    """Output, loss and the gradients of (input, parameters...) of one training step."""
    model.train(train)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # dropout draws the same masks in both models
    out = model(x)
    with manualconv.capture():  # the loss: F.cross_entropy, routed to manualconv's for a converted model
        loss = F.cross_entropy(out, target) if _is_converted(model) else None
    if loss is None:
        loss = F.cross_entropy(out, target)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x] + params)
    return out.detach(), loss, grads


def _is_converted(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("manualconv.") for m in model.modules())


def audit(name: str, dtype: torch.dtype, rtol: float, manual_layout=torch.contiguous_format) -> None:
    """The model's original and converted runs in train then eval mode, from the same state; the
    converted one with its parameters and input in ``manual_layout``."""
    _, side = MODELS[name]
    model = build(name, dtype)
    initial = copy.deepcopy(model.state_dict())  # with its version metadata (mnasnet checks it)
    torch.manual_seed(2)
    x = torch.randn(BATCH, 3, side, side, dtype=dtype)
    target = torch.randint(0, CLASSES, (BATCH,))
    # a model with grouped convolutions runs channels-last as the original: torch's float64 grouped
    # (depthwise) convolution on the CPU in NCHW runs one slow convolution per group, ~15× slower
    # than its channels-last path; the values are the same up to rounding (far below the
    # tolerances). Others stay NCHW: a 4-D dropout mask is drawn in memory order (squeezenet).
    grouped = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
    layout = torch.channels_last if grouped else torch.contiguous_format
    model.to(memory_format=layout)
    native = {train: forward_backward(model, x.to(memory_format=layout), target, train) for train in (True, False)}
    assert native_backward_nodes(native[True][1]), "the audit can fail: the original model has torch's nodes"

    model.to(memory_format=manual_layout)
    manualconv.convert(model, inplace=True)
    model.load_state_dict(initial)  # the running statistics the original run started from
    for train in (True, False):
        with RecordAtenOps() as recorder:
            out, loss, grads = forward_backward(model, x.to(memory_format=manual_layout), target, train)
        mode = "train" if train else "eval"
        remaining = native_backward_nodes(loss)
        assert not remaining, f"{name} ({mode}): torch's own backward nodes remain: {remaining}"
        found = native_ops(recorder.names)
        assert not found, f"{name} ({mode}): native ops ran: {found}"
        out_native, _, grads_native = native[train]
        assert (out - out_native).abs().max() <= rtol * out_native.abs().max(), f"{name} ({mode}): output differs"
        scale = max(g.abs().max().item() for g in grads_native)
        names = ["input"] + [n for n, p in model.named_parameters() if p.requires_grad]
        for pname, g, h in zip(names, grads, grads_native):
            error = (g - h).abs().max().item()
            assert error <= rtol * scale, f"{name} ({mode}): grad of {pname} differs by {error:.3e} (scale {scale:.3e})"


# Whole models on the C++ backend only (the reference kernels are checked against it on the case
# table, and would take minutes on these networks).
# float64: rounding of ~1e-16 per operation, compounded through the depth and batch norm's
# division by small spreads, stays far below 1e-9 of the largest gradient (measured ≤ 1e-12);
# a wrong derivative changes gradients by the order of the gradients themselves.
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_is_hand_derived_float64(name, cpp):
    audit(name, torch.float64, rtol=1e-9)


# Channels-last, as train.py runs: the converted model's maps stay channels-last through every
# layer, and mobilenet_v2's ReLU6(inplace=True) writes into batch norm's channels-last output
# (which must be a tensor of its own: autograd refuses an in-place op on a view a Function
# returned; it was one, and the training step raised).
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_converted_model_channels_last_float64(name, cpp):
    audit(name, torch.float64, rtol=1e-9, manual_layout=torch.channels_last)


# float32: ~6e-8 per operation, compounded over ~20-50 layers and batch norm (test_convert's
# argument): 1e-4 of the largest entry, still a hundred times below a 1% derivative error.
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_converted_model_is_hand_derived_float32(name, cpp):
    audit(name, torch.float32, rtol=1e-4)


def test_audit_detects_native_layers():
    """The checks can fail: an unconverted network of each layer kind is caught by both."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Hardswish(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
                              torch.nn.LogSoftmax(1))
    with RecordAtenOps() as recorder:
        loss = F.nll_loss(net(torch.randn(2, 3, 8, 8)), torch.tensor([0, 2]))
        loss.backward()
    nodes = native_backward_nodes(loss)
    assert {"ConvolutionBackward0", "NativeBatchNormBackward0", "HardswishBackward0", "AddmmBackward0",
            "LogSoftmaxBackward0", "NllLossBackward0"} <= set(nodes), nodes
    found = native_ops(recorder.names)
    for op in ("convolution", "batch_norm", "hardswish", "_log_softmax", "nll_loss"):
        assert any(op in n for n in found), (op, found)


def test_coverage_command(capsys, cpp):
    """``python -m manualconv.verify --coverage BUILDERS``: one line per builder, then the count."""
    from manualconv.verify import main

    assert main(["--coverage", "alexnet,squeezenet1_1,resnet18"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4, lines
    rows = {line.split()[0]: line.split()[1:] for line in lines[:3]}
    assert rows["alexnet"] == ["hand-derived"] and rows["squeezenet1_1"] == ["hand-derived"], rows
    # resnet18 is hand-derived exactly when batch norm is converted; otherwise its node is named
    assert rows["resnet18"] in (["hand-derived"], ["native", "NativeBatchNormBackward0"]), rows
    full = sum(row == ["hand-derived"] for row in rows.values())
    assert lines[3] == f"{full} of 3 torchvision classification builders are hand-derived end to end after convert"
    with pytest.raises(SystemExit) as error:
        main(["--coverage", "resnet18,no_such_net"])
    assert error.value.code == 2 and "no_such_net" in capsys.readouterr().err
