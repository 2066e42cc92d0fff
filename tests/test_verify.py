"""python -m manualconv.verify: passes on a correct model, names the layer of a deliberately
wrong backward, prints parseable JSON, and rejects bad arguments with exit status 2.

This file is also the verifier's ``module:callable`` target: ``test_verify:make_model``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import manualconv
from manualconv import reference, verify
from manualconv.autograd import Conv2dFunction

REPO = Path(__file__).resolve().parents[1]
SMALL = ["test_verify:make_model", "--input-shape", "2,3,16,16"]
LAYERS = ["conv1", "bn", "relu1", "pool", "conv2", "relu2", "gap", "flatten", "dropout", "fc", "(model)"]


def make_model() -> torch.nn.Module:
    """conv → batch norm → ReLU → max pool → conv (stride 2) → ReLU → global average pool →
    flatten → dropout → linear: every kind of layer the verifier has to handle, small."""
    return torch.nn.Sequential(OrderedDict(
        conv1=torch.nn.Conv2d(3, 4, 3, padding=1), bn=torch.nn.BatchNorm2d(4), relu1=torch.nn.ReLU(inplace=True),
        pool=torch.nn.MaxPool2d(2), conv2=torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), relu2=torch.nn.ReLU(),
        gap=torch.nn.AdaptiveAvgPool2d(1), flatten=torch.nn.Flatten(), dropout=torch.nn.Dropout(0.5),
        fc=torch.nn.Linear(6, 5),
    ))


def not_a_model():
    return "a string"


def run_main(argv, capsys):
    """verify.main's exit status (returned, or raised as SystemExit) and its stdout, stderr."""
    try:
        code = verify.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend_name", ["reference", "cpp"])
def test_verifier_passes_on_a_small_model(backend_name, dtype, capsys):
    code, out, _ = run_main(SMALL + ["--backend", backend_name, "--dtype", dtype], capsys)
    assert code == 0, out
    table = [line.split() for line in out.splitlines()[5:5 + len(LAYERS)]]
    assert [cells[0] for cells in table] == LAYERS, out
    assert all(cells[-1] == "PASS" for cells in table), out
    assert out.rstrip().endswith(f"PASS: {len(LAYERS)} rows."), out


def test_verifier_passes_in_train_mode(capsys):
    """Batch statistics and dropout: the dropout masks must be the same in both models."""
    code, out, _ = run_main(SMALL + ["--train", "--dtype", "float64", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["passed"] and report["mode"] == "train", out


def test_verifier_on_a_torchvision_model(capsys):
    code, out, _ = run_main(["resnet18", "--input-shape", "1,3,32,32", "--dtype", "float64"], capsys)
    assert code == 0, out
    assert "layer4.1.relu#2" in out and "fc" in out


def scale_max_pool_backward(monkeypatch):
    """The reference kernel routes 1.01 × δ: a wrong max-pool backward."""
    kernel = reference.max_pool2d_backward
    monkeypatch.setattr(reference, "max_pool2d_backward", lambda *args: kernel(*args) * 1.01)


def scale_conv_weight_gradient(monkeypatch):
    """Conv2dFunction.backward returns 1.01 × ∂J/∂W: a wrong weight gradient in every conv."""
    backward = Conv2dFunction.backward

    def wrong(ctx, grad_output):
        grad_input, grad_weight, *rest = backward(ctx, grad_output)
        return (grad_input, None if grad_weight is None else grad_weight * 1.01, *rest)

    monkeypatch.setattr(Conv2dFunction, "backward", staticmethod(wrong))


@pytest.mark.parametrize("inject,backend_name,wrong_layers", [
    (scale_max_pool_backward, "reference", ["pool"]),
    (scale_conv_weight_gradient, "cpp", ["conv1", "conv2"]),
], ids=["reference-kernel", "autograd-function"])
def test_verifier_names_a_wrong_backward(inject, backend_name, wrong_layers, monkeypatch, capsys):
    inject(monkeypatch)
    code, out, _ = run_main(SMALL + ["--backend", backend_name], capsys)
    assert code == 1, out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[5:5 + len(LAYERS)]}
    assert [name for name, status in rows.items() if status == "FAIL"] == wrong_layers, out
    assert "compute differently from torch.nn" in out and ", ".join(wrong_layers) in out.splitlines()[-1], out
    code, out, _ = run_main(SMALL + ["--backend", backend_name, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and not report["passed"] and report["failures"] == wrong_layers


def test_float64_drift_fails_the_run(monkeypatch, capsys):
    """A difference no layer's local check explains (here: injected into the comparison of the
    end-to-end run only) fails a float64 run; in float32 it is reported as DRIFT."""
    record = verify.forward_backward

    def drifting(model, x, seed, train):
        run = record(model, x, seed, train)
        if any(type(m).__module__ == "manualconv.modules" for m in model.modules()):
            run.recorder.calls["fc"][0].output *= 1.01
        return run

    monkeypatch.setattr(verify, "forward_backward", drifting)
    code, out, _ = run_main(SMALL + ["--dtype", "float64", "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["drift"] == ["fc"] and report["failures"] == []
    code, out, _ = run_main(SMALL + ["--dtype", "float32", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["drift"] == ["fc"] and report["passed"]


def test_manualconv_raising_is_a_failure(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(reference, "avg_pool2d_forward", broken)
    monkeypatch.setattr(reference, "adaptive_avg_pool2d_forward", broken)
    code, out, _ = run_main(SMALL + ["--backend", "reference"], capsys)
    assert code == 1 and "manualconv raised RuntimeError: kernel exploded" in out


def test_json_report(capsys):
    code, out, _ = run_main(SMALL + ["--json", "--seed", "3"], capsys)
    report = json.loads(out)
    assert code == 0 and report["passed"] and report["seed"] == 3 and report["input_shape"] == [2, 3, 16, 16]
    assert [layer["name"] for layer in report["layers"]] == LAYERS
    conv = report["layers"][0]
    assert conv["op"] == "Conv2d" and conv["manualconv"] and conv["status"] == "PASS"
    assert set(conv["end_to_end"]) == {"output", "grad_input", "grad_weight", "grad_bias"}
    assert conv["local"]["grad_weight"]["max_rel"] <= report["tolerance"]["local"]
    bn = report["layers"][1]  # hand-derived too since BatchNorm2d joined the layer family
    assert bn["op"] == "BatchNorm2d" and bn["manualconv"] and bn["status"] == "PASS"
    assert bn["local"]["grad_input"]["max_rel"] <= report["tolerance"]["local"]


def test_command_line_in_a_subprocess():
    """The real entry point: python -m manualconv.verify module:callable --json."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "manualconv.verify", *SMALL, "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["passed"]


@pytest.mark.parametrize("argv,message", [
    (["no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["test_verify:make_model", "--input-shape", "2,3,x"], "--input-shape must be comma-separated positive integers"),
    (["test_verify:make_model", "--input-shape", "2,0,8,8"], "--input-shape must be"),
    (["no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    (["test_verify:no_such_callable"], "has no attribute 'no_such_callable'"),
    (["test_verify:not_a_model"], "returned str, not a torch.nn.Module"),
    (["test_verify:"], "expected module:callable"),
    (["test_verify:make_model", "--input-shape", "2,5,16,16"], "torch.nn cannot run"),
    (["test_verify:make_model", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["test_verify:make_model", "--device", "nonsense"], "device 'nonsense' is not usable"),
    (["test_verify:make_model", "--device", "meta"], "holds no values"),
], ids=["unknown-model", "shape-not-numbers", "shape-zero", "unimportable-module", "missing-callable",
        "callable-returns-non-module", "empty-callable", "shape-model-cannot-run", "bad-dtype", "bad-device",
        "meta-device"])
def test_bad_arguments_exit_2(argv, message, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2 and message in err, err
    assert out == ""


def test_cpp_backend_needs_kernels_for_the_device(monkeypatch, capsys):
    """Where the extension has no kernels for the device (a CPU-only build on a GPU), 'cpp' is
    refused and the default falls back to 'reference'."""
    monkeypatch.setattr(verify, "compiled_kernels_run_on", lambda device: False)
    code, _, err = run_main(SMALL + ["--backend", "cpp"], capsys)
    assert code == 2 and "has no kernels for cpu" in err, err
    assert verify.resolve_device_and_backend("cpu", None)[1] == "reference"


def test_difference_and_bias_scale():
    nan = float("nan")
    same_nans = verify.difference(torch.tensor([1.0, nan]), torch.tensor([1.0, nan]))
    assert (same_nans.max_abs, same_nans.max_rel) == (0.0, 0.0)
    assert verify.difference(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])).max_rel == float("inf")
    assert verify.difference(torch.zeros(2), torch.zeros(3)).max_rel == float("inf")
    inf = float("inf")
    assert verify.difference(torch.tensor([2.0, 4.0, inf]), torch.tensor([1.0, 4.0, inf])).max_rel == 0.25  # finite scale
    assert verify.difference(torch.tensor([1.0, inf]), torch.tensor([1.0, 3.0])).max_rel == inf
    d = verify.difference(torch.tensor([1.0, -4.02]), torch.tensor([1.0, -4.0]))
    assert d.max_abs == pytest.approx(0.02) and d.max_rel == pytest.approx(0.005)
    conv = torch.nn.Conv2d(1, 2, 1)
    delta = torch.tensor([[[[1.0, -1.0]], [[2.0, 3.0]]]])  # channel 0 sums to 0; its terms to 2
    assert verify.bias_scale(conv, [delta]) == 5.0
    assert verify.bias_scale(torch.nn.Linear(2, 2), [torch.tensor([[1.0, -2.0], [1.0, 2.0]])]) == 4.0
