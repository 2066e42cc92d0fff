"""manualconv.record_deltas: per-layer delta norms and parameter-gradient norms, one entry per
backward pass, checked against gradients captured independently with plain tensor hooks."""

from __future__ import annotations

import math

import pytest
import torch

import manualconv


def make_net() -> torch.nn.Module:
    """conv → batch norm → ReLU → max pool → conv → ReLU → global average pool → flatten (torch.nn's,
    not recorded) → linear, converted to manualconv."""
    torch.manual_seed(0)
    native = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(6, 5),
    ).double()
    return manualconv.convert(native)


MANUAL_LAYERS = ["0", "1", "2", "3", "4", "5", "6", "8"]  # every module of make_net but Flatten


def capture_deltas_with_tensor_hooks(model: torch.nn.Module):
    """The independent oracle: forward hooks that put a plain tensor hook on each layer output."""
    captured, handles = {}, []
    for name, module in model.named_modules():
        if name in MANUAL_LAYERS:
            def hook(module, args, output, name=name):
                output.register_hook(lambda g: captured.setdefault(name, []).append(g.norm().item()))
            handles.append(module.register_forward_hook(hook))
    return captured, handles


def loss_of(model, seed):
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    target = torch.tensor([0, 3, 4])
    return manualconv.functional.cross_entropy(model(x), target)


def test_norms_equal_tensor_hooks(backend):
    model = make_net()
    captured, handles = capture_deltas_with_tensor_hooks(model)
    param_grads = {name: [] for name, _ in model.named_parameters()}
    with manualconv.record_deltas(model) as record:
        for step in range(2):
            model.zero_grad()
            loss_of(model, seed=step).backward()
            for name, param in model.named_parameters():
                if name in param_grads:
                    param_grads[name].append(param.grad.norm().item())
    for handle in handles:
        handle.remove()
    assert record.passes == 2
    assert sorted(record.deltas) == sorted(MANUAL_LAYERS)
    for name in MANUAL_LAYERS:
        assert record.deltas[name] == pytest.approx(captured[name], rel=1e-12), name
    assert sorted(record.param_grads) == sorted(param_grads)
    for name, norms in param_grads.items():
        assert record.param_grads[name] == pytest.approx(norms, rel=1e-12), name
    assert all(norm > 0 for column in record.deltas.values() for norm in column)


def test_parameter_gradients_are_per_pass_not_accumulated():
    """Without zero_grad, .grad accumulates; the record holds each pass's own gradient."""
    model = make_net()
    weight = model[0].weight
    with manualconv.record_deltas(model) as record:
        loss_of(model, seed=0).backward()
        first = weight.grad.clone()
        loss_of(model, seed=1).backward()
        second = weight.grad - first
    assert record.param_grads["0.weight"] == pytest.approx([first.norm().item(), second.norm().item()], rel=1e-12)
    assert record.param_grads["0.weight"][1] != pytest.approx(weight.grad.norm().item(), rel=1e-6)


def test_a_layer_called_twice_has_one_entry_per_pass():
    relu = manualconv.ReLU()
    conv = manualconv.Conv2d(2, 2, 3, padding=1).double()
    model = torch.nn.ModuleDict({"conv": conv, "relu": relu})
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    deltas = []
    with manualconv.record_deltas(model) as record:
        first = relu(x)
        first.register_hook(lambda g: deltas.append(g))
        second = relu(conv(first))
        second.register_hook(lambda g: deltas.append(g))
        (second * torch.arange(50.0, dtype=torch.float64).reshape(1, 2, 5, 5)).sum().backward()
    assert record.passes == 1 and len(deltas) == 2
    assert record.deltas["relu"] == pytest.approx([math.sqrt(sum(d.norm().item() ** 2 for d in deltas))], rel=1e-12)


def test_hooks_are_removed_on_exit_even_after_an_error():
    model = make_net()
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="inside the block"):
        with manualconv.record_deltas(model) as record:
            assert any(module._forward_hooks for module in model.modules())
            loss_of(model, seed=0).backward()
            raise RuntimeError("an error inside the block")
    assert not any(module._forward_hooks for module in model.modules())
    assert not any(p._backward_hooks for p in params)
    loss_of(model, seed=1).backward()  # after the block: nothing more is recorded
    assert record.passes == 1 and all(len(column) == 1 for column in record.deltas.values())


def test_no_grad_forward_records_nothing_and_unreached_layers_get_nan():
    model = make_net()
    with manualconv.record_deltas(model) as record:
        with torch.no_grad():
            loss_of(model, seed=0)
        assert record.passes == 0
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        model[:3](x).sum().backward()  # reaches only the first conv and ReLU
        loss_of(model, seed=1).backward()  # reaches all layers
        torch.autograd.grad(model[:3](x).sum(), x)  # autograd.grad is a backward pass too
    assert record.passes == 3
    assert math.isnan(record.deltas["8"][0]) and not math.isnan(record.deltas["8"][1]) and math.isnan(record.deltas["8"][2])
    assert all(len(column) == 3 for column in list(record.deltas.values()) + list(record.param_grads.values()))
    assert not any(math.isnan(v) for v in record.deltas["0"])
    rows = record.as_rows()
    assert len(rows) == 3 * (len(record.deltas) + len(record.param_grads))
    assert {"step": 1, "name": "8", "kind": "delta", "norm": record.deltas["8"][1]} in rows
    assert {"step": 0, "name": "0.weight", "kind": "grad", "norm": record.param_grads["0.weight"][0]} in rows


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with manualconv.record_deltas("not a model"):
            pass
