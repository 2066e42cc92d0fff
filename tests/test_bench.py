"""The benchmark script runs end to end (tiny batch, one repeat): every layer of the requested
kind gets a row, in the printed table and in the Markdown file. Timings are not checked here
(speed is the benchmark's output, never a test's assertion)."""

import re

import pytest
import torch

import manualconv
from manualconv import bench


@pytest.mark.parametrize("kind", ["conv", "pool", "other"])
def test_bench_writes_a_row_per_layer(kind, tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    assert bench.main(["--batch", "2", "--repeat", "1", "--seconds", "0", "--only", kind, "--markdown", str(markdown)]) == 0
    printed, written = capsys.readouterr().out, markdown.read_text()
    layers = [layer for layer in bench.SUITE if layer.kind == kind]
    assert layers, kind
    for layer in layers:
        assert f"\n{layer.name} " in printed, f"{kind}: no printed row for {layer.name}"
        assert f"| {layer.name} |" in written, f"{kind}: no Markdown row for {layer.name}"
    assert f"geomean ratio {kind}: **" in written, kind
    _check_header(printed.splitlines()[0])
    _check_header(written.splitlines()[0])


def test_a_layer_row_repeats_to_its_time_budget():
    """At least --repeat pairs; more until each side has run --seconds (at most MAX_PAIRS)."""
    layer = next(layer for layer in bench.SUITE if layer.op == "relu")
    assert bench.measure(layer, batch=2, repeat=3, seconds=0)["pairs"] == 3
    pairs = bench.measure(layer, batch=2, repeat=1, seconds=0.05)["pairs"]
    assert 1 < pairs <= bench.MAX_PAIRS  # a batch-2 ReLU step takes well under 50 ms
    assert bench.measure(layer, batch=2, repeat=1, seconds=1e9)["pairs"] == bench.MAX_PAIRS


@pytest.mark.parametrize("value", ["-1", "nan", "x"])
def test_bad_seconds_are_refused(value, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--seconds", value, "--only", "conv"])
    assert "--seconds" in capsys.readouterr().err


def _check_header(line: str) -> None:
    """The first line names the CPU (/proc/cpuinfo's model name, family and model), the capability
    the kernels run with (and whether the kernel choice favours the tiles) and this machine's SGEMM
    rate: every figure below holds for those."""
    with open("/proc/cpuinfo") as f:
        fields = dict(l.split(":", 1) for l in f.read().split("\n\n")[0].splitlines() if ":" in l)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    cpu = f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
    outrun = " (tiles outrun BLAS)" if manualconv.tiles_outrun_blas() else ""
    assert line.startswith(f"{cpu}, capability {manualconv.cpu_capability()}{outrun}, SGEMM "), line
    assert re.search(r", SGEMM \d+ GFLOP/s; ", line), line


def test_channels_last_rows_run_channels_last():
    """The NHWC rows feed strictly channels-last x, weight and δ (so they time the channels-last
    kernels); the other rows feed NCHW-contiguous ones."""
    assert any(layer.channels_last for layer in bench.SUITE)
    for layer in bench.SUITE:
        if layer.kind != "conv":
            continue
        for name, t in zip(("x", "weight", "grad_output"), bench.inputs(layer, batch=2)):
            strictly_nhwc = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
            assert strictly_nhwc == layer.channels_last, f"{layer.name}: {name} strides {t.stride()}"


def test_pairs_alternate_which_side_runs_first():
    """time_pairs calls native, manual, then manual, native, and so on: neither side is always the
    second of a pair (which ran slower); at least `repeat` pairs."""
    calls = []
    times_native, times_manual = bench.time_pairs(lambda: calls.append("n"), lambda: calls.append("m"), repeat=5)
    assert calls == ["n", "m", "m", "n", "n", "m", "m", "n", "n", "m"]
    assert len(times_native) == len(times_manual) == 5
