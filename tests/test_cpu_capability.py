"""Run-time CPU dispatch (csrc/cpu_capability.cpp, select_conv2d_kernel in csrc/conv2d.cpp): the
float32 channels-last conv cases of the case table (the direct kernels' cases among them) on every
instruction set this CPU supports, each in a subprocess with MANUALCONV_CPU_CAPABILITY set, within
tests/oracle.py's bound; the override selects the requested kernels; an unknown or unsupported
value is refused at import with a message naming the variable; no shared (weak or global) symbol
of the extension holds AVX code outside the per-ISA kernels (the ODR hazard of compiling one unit
for a wider instruction set)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import manualconv
from manualconv import ops
from cases import SAMPLES, Case, record_of
from oracle import assert_within, exact_and_bound, output_of, run_with_grads
from test_ops import _float32_run

CAPABILITIES = ("default", "avx2", "avx512")
VARIABLE = "MANUALCONV_CPU_CAPABILITY"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def supported_by_this_cpu() -> set:
    """What /proc/cpuinfo's flags allow (found independently of the extension's detection)."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    supported = {"default"}
    if {"avx2", "fma"} <= flags:
        supported.add("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            supported.add("avx512")
    return supported


SUPPORTED = supported_by_this_cpu()
# The conv cases of the table in channels-last layout: the direct kernels' cases and the NHWC
# GEMM's (what each capability sends where is select_conv2d_kernel's choice, checked below).
CONV_CHANNELS_LAST = [c for c in SAMPLES if record_of(c).name == "conv2d" and c.layout == "channels_last"]
# and wider ones, for the AVX-512 tiles (12 pixels × 32 channels, 32 channels × 12 columns): 40
# output channels (a 32-wide tile, then an 8-wide one), 32 input channels for δx, 35 pixels (two
# 12-pixel tiles and one moved back); 32 output channels for the weight gradient, 48 columns
CONV_CHANNELS_LAST += [
    Case("channels-last-direct-40-32", "conv2d", (2, 32, 5, 7), dict(padding=1), weight=(40, 32, 3, 3), layout="channels_last"),
    Case("channels-last-direct-32-16-strided", "conv2d", (2, 16, 7, 9), dict(stride=2, padding=1), weight=(32, 16, 3, 1), bias=False, layout="channels_last"),
    # the AVX-512 row tiles (16 pixels along a row, one 16-channel vector, the pixel stride
    # sW·C_in compiled in: 8, 16, 32, 64): rows of 19 pixels (a tile, then one moved back), 64
    # input channels, a 48-channel output (a 32-wide tile, then a 16-wide row tile), stride 2 and
    # dilation 2; 16 and 64 → 16 also take the weight gradient's 16-column tap tiles
    Case("channels-last-direct-row-tiles-16", "conv2d", (2, 16, 5, 19), dict(padding=1), weight=(16, 16, 3, 3), layout="channels_last"),
    Case("channels-last-direct-row-tiles-64", "conv2d", (2, 64, 3, 17), dict(padding=1), weight=(16, 64, 3, 3), layout="channels_last"),
    Case("channels-last-direct-row-tiles-48", "conv2d", (2, 8, 3, 16), dict(padding=1), weight=(48, 8, 3, 3), bias=False, layout="channels_last"),
    Case("channels-last-direct-row-tiles-strided", "conv2d", (2, 8, 5, 36), dict(stride=2, padding=2, dilation=2), weight=(16, 8, 3, 3), layout="channels_last"),
    # a full 32-channel block in row tiles of 12 (rows of 24 pixels), whose weight gradient runs
    # over consecutive columns (a row of taps: 48 columns); a 1×1 conv's 20 columns in two runs of
    # 12, the second moved back over 4
    Case("channels-last-direct-row-tiles-32", "conv2d", (2, 16, 2, 24), dict(padding=1), weight=(32, 16, 3, 3), layout="channels_last"),
    Case("channels-last-direct-column-runs-1x1", "conv2d", (2, 20, 3, 5), {}, weight=(32, 20, 1, 1), layout="channels_last"),
]
# NCHW float32 conv cases with at least 16 input channels: where the tiles outrun the BLAS, the
# direct kernel on channels-last copies (select_conv2d_kernel), else the NCHW GEMM.
CONV_NCHW_WIDE = [c for c in SAMPLES if record_of(c).name == "conv2d" and c.layout == "contiguous"
                  and len(c.input) == 4 and c.input[1] >= 16]
# and narrow NCHW convs the direct kernel takes where the tiles outrun the BLAS (each sample
# transposed into the padded buffer, the result transposed back): 3 input channels (the stem; its
# input gradient on the NCHW GEMM), 8 (the input gradient direct too), a strided 1×1
CONV_NCHW_WIDE += [
    Case("nchw-direct-stem", "conv2d", (2, 3, 9, 7), dict(padding=1), weight=(16, 3, 3, 3)),
    Case("nchw-direct-8", "conv2d", (2, 8, 6, 5), dict(padding=1), weight=(8, 8, 3, 3), bias=False),
    Case("nchw-direct-1x1-stride2", "conv2d", (2, 16, 9, 9), dict(stride=2), weight=(8, 16, 1, 1)),
]
FLAG = "MANUALCONV_TILES_OUTRUN_BLAS"
# A geometry each capability gives to a different kernel: 16 channels, 3×3, stride 1 (a ResNet-20
# conv), forward, input gradient and weight gradient.
GEOMETRY = dict(input_size=[2, 16, 8, 8], weight_size=[16, 16, 3, 3], stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], groups=1, channels_last=True)
EXPECTED_KERNEL = {"default": "nhwc_gemm", "avx2": "direct_avx2", "avx512": "direct_avx512"}


def _amd_full_width_avx512() -> bool:
    """An AMD CPU of family 0x1A (Zen 5) or later, read from /proc/cpuinfo (independently of the
    extension's cpuid)."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields.get("vendor_id") == "AuthenticAMD" and int(fields.get("cpu family", "0")) >= 0x1A


def _selected_kernel(passname: str, **overrides) -> str:
    g = {**GEOMETRY, **overrides}
    return torch.ops.manualconv.conv2d_selected_kernel(
        passname, g["input_size"], g["weight_size"], g["stride"], g["padding"], g["dilation"],
        g["groups"], g["channels_last"])


# ---- run in this process, under whatever capability it has (and by the subprocesses below) ----

@pytest.mark.parametrize("case", CONV_CHANNELS_LAST, ids=str)
def test_channels_last_conv_case(case, cpp):
    tensors, grad_output, ours = _float32_run(case, "manual")
    exact, bound = exact_and_bound(case, tensors, grad_output)
    for what, exact_value in exact.items():
        assert_within(case, f"{what} on {manualconv.cpu_capability()}", ours[what], exact_value, bound[what])


@pytest.mark.parametrize("case", CONV_NCHW_WIDE, ids=str)
def test_nchw_conv_case(case, cpp):
    tensors, grad_output, ours = _float32_run(case, "manual")
    exact, bound = exact_and_bound(case, tensors, grad_output)
    for what, exact_value in exact.items():
        assert_within(case, f"{what} on {manualconv.cpu_capability()}, tiles outrun BLAS: "
                      f"{manualconv.tiles_outrun_blas()}", ours[what], exact_value, bound[what])


def test_selected_kernel_follows_capability(cpp):
    capability = manualconv.cpu_capability()
    assert capability == os.environ.get(VARIABLE) or (not os.environ.get(VARIABLE) and capability == max(
        SUPPORTED, key=CAPABILITIES.index)), capability
    assert manualconv.tiles_outrun_blas() == (os.environ[FLAG] == "1" if os.environ.get(FLAG) else (
        capability == "avx512" and _amd_full_width_avx512() and torch.backends.mkl.is_available()))
    fast = manualconv.tiles_outrun_blas() and capability != "default"  # (the baseline has no tiles)
    for passname in ("forward", "grad_input", "grad_weight"):
        assert _selected_kernel(passname) == EXPECTED_KERNEL[capability], passname
    # Winograd (3×3, stride 1, ≥ 32 channels each way): its products on the capability's direct
    # tiles, BLAS on the baseline; the weight gradient's on the tiles only up to 32 output channels
    # on AVX-512, 16 on AVX2, 128 where the tiles outrun the BLAS
    tiles = {"default": "winograd", "avx2": "winograd_avx2", "avx512": "winograd_avx512"}[capability]
    tiles4x4 = {"default": "winograd4x4", "avx2": "winograd4x4_avx2", "avx512": "winograd4x4_avx512"}[capability]
    wide = dict(input_size=[64, 64, 8, 8], weight_size=[64, 64, 3, 3])
    assert _selected_kernel("forward", **wide) == tiles
    assert _selected_kernel("grad_input", **wide) == tiles
    assert _selected_kernel("grad_weight", **wide) == (tiles if fast else "winograd")
    # (wider, on BLAS; where the tiles outrun the BLAS, the direct kernel up to 256 output channels)
    direct = {"default": "nchw_gemm", "avx2": "direct_avx2", "avx512": "direct_avx512"}[capability]
    assert _selected_kernel("grad_weight", input_size=[64, 128, 8, 8], weight_size=[256, 128, 3, 3]) == (
        direct if fast else "winograd")
    assert _selected_kernel("grad_weight", input_size=[64, 256, 8, 8], weight_size=[512, 256, 3, 3]) == "winograd"
    # F(4×4): 128 summed channels, output maps of 8×8 (16×16 where the tiles outrun the BLAS)
    wider = dict(input_size=[64, 128, 8, 8], weight_size=[128, 128, 3, 3])
    assert _selected_kernel("forward", **wider) == (tiles if fast else tiles4x4)
    assert _selected_kernel("grad_input", **wider) == (tiles if fast else tiles4x4)
    assert _selected_kernel("forward", **{**wider, "input_size": [64, 128, 16, 16]}) == tiles4x4
    # NCHW as channels-last, at any map size (NCHW staged a block of rows at a time)
    wide_nchw = dict(input_size=[8, 64, 32, 32], weight_size=[64, 64, 3, 3], channels_last=False)
    assert _selected_kernel("forward", **wide_nchw) == tiles
    assert _selected_kernel("grad_input", **wide_nchw) == tiles
    narrow = dict(input_size=[64, 32, 8, 8], weight_size=[32, 32, 3, 3])
    assert _selected_kernel("grad_weight", **narrow) == (tiles if capability == "avx512" or fast else "winograd")
    # the direct kernels' channel limits (forward, input gradient: 64; weight gradient: 32 on
    # AVX-512, 16 on AVX2), lifted where the tiles outrun the BLAS (none; 256 for the weight gradient)
    strided = dict(input_size=[8, 128, 16, 16], weight_size=[256, 128, 3, 3], stride=[2, 2])
    direct = EXPECTED_KERNEL[capability]
    assert _selected_kernel("forward", **strided) == (direct if fast else "nhwc_gemm")
    # (stride 2: no direct kernel; where the tiles outrun the BLAS, the GEMM's product on them)
    gemm_tiles = {"default": "nhwc_gemm", "avx2": "nhwc_gemm_avx2", "avx512": "nhwc_gemm_avx512"}[capability]
    assert _selected_kernel("grad_input", **strided) == (gemm_tiles if fast else "nhwc_gemm")
    assert _selected_kernel("grad_weight", **strided) == (direct if fast else "nhwc_gemm")
    assert _selected_kernel("grad_weight", **{**strided, "weight_size": [512, 128, 3, 3]}) == "nhwc_gemm"
    # NCHW: the NCHW GEMM, or where the tiles outrun the BLAS the direct kernel for the passes it
    # takes, at any width; an input gradient it does not take goes via channels-last copies to the
    # tiles' GEMM at ≥ 16 input channels, unless a strided 1×1 (float64, not expressible here: the
    # op asks for float32, and groups never take the direct kernel)
    assert _selected_kernel("forward", channels_last=False) == (direct if fast else "nchw_gemm")
    assert _selected_kernel("grad_input", channels_last=False) == (direct if fast else "nchw_gemm")
    assert _selected_kernel("grad_input", channels_last=False, stride=[2, 2]) == (gemm_tiles if fast else "nchw_gemm")
    narrow_nchw = dict(channels_last=False, input_size=[2, 8, 8, 8], weight_size=[16, 8, 3, 3])
    assert _selected_kernel("forward", **narrow_nchw) == (direct if fast else "nchw_gemm")
    assert _selected_kernel("grad_input", **narrow_nchw, stride=[2, 2]) == "nchw_gemm"
    strided_1x1 = dict(channels_last=False, weight_size=[16, 16, 1, 1], stride=[2, 2], padding=[0, 0])
    assert _selected_kernel("forward", **strided_1x1) == (direct if fast else "nchw_gemm")
    assert _selected_kernel("grad_input", **strided_1x1) == "nchw_gemm"
    assert _selected_kernel("forward", channels_last=False, groups=2, weight_size=[16, 8, 3, 3]) == "nchw_gemm"
    assert _selected_kernel("forward", groups=2, weight_size=[16, 8, 3, 3]) == "nhwc_gemm"
    # one filter per channel (groups = C = O): the depthwise kernels, in either layout, every pass;
    # a channel multiplier (O = 2C) stays on the GEMM path
    depthwise = dict(groups=16, weight_size=[16, 1, 3, 3])
    for passname in ("forward", "grad_input", "grad_weight"):
        for channels_last in (True, False):
            assert _selected_kernel(passname, channels_last=channels_last, **depthwise) == "depthwise", passname
    assert _selected_kernel("forward", groups=16, weight_size=[32, 1, 3, 3]) == "nhwc_gemm"
    # NCHW maps of fewer than 16 output pixels: the channels-last GEMM (one GEMM over the batch);
    # where the tiles outrun the BLAS also channels-last ones (the direct tiles need 16 pixels there),
    # and from 16 pixels on the direct kernel
    tiny = dict(input_size=[32, 960, 2, 2], weight_size=[160, 960, 1, 1], padding=[0, 0], channels_last=False)
    for passname in ("forward", "grad_input", "grad_weight"):
        assert _selected_kernel(passname, **tiny) == "nhwc_gemm", passname
        assert _selected_kernel(passname, **{**tiny, "channels_last": True}) == "nhwc_gemm", passname
    assert _selected_kernel("forward", **{**tiny, "input_size": [32, 960, 4, 4]}) == (direct if fast else "nchw_gemm")


# ---- each capability in a subprocess ----

def _run(capability: str, *args: str, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, VARIABLE: capability, **variables}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("outrun", ("0", "1"))
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_capability(capability, outrun):
    """Supported: every channels-last conv case and every wide NCHW one within its bound and the
    capability's kernels selected, with the tiles outrunning the BLAS (the kernel choice of an AMD
    Zen 5) and without. Not supported by this CPU: `import manualconv` refuses it, naming what it
    supports."""
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    run = _run(capability, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               f"{HERE}/test_cpu_capability.py::test_channels_last_conv_case",
               f"{HERE}/test_cpu_capability.py::test_nchw_conv_case",
               f"{HERE}/test_cpu_capability.py::test_selected_kernel_follows_capability", **{FLAG: outrun})
    output = run.stdout + run.stderr
    if capability in SUPPORTED:
        assert run.returncode == 0, output
        passed = re.search(r"(\d+) passed", output)
        assert passed and int(passed.group(1)) == len(CONV_CHANNELS_LAST) + len(CONV_NCHW_WIDE) + 1, output
        assert "skipped" not in output, output
    else:
        assert run.returncode != 0, output
        assert f"{VARIABLE}={capability}: this CPU does not support {capability}" in output, output


def test_unknown_capability_is_refused_at_import():
    run = _run("avx1024", "-c", "import manualconv")
    assert run.returncode != 0
    assert "RuntimeError" in run.stderr, run.stderr
    assert f"{VARIABLE}=avx1024 is not a capability: use avx512, avx2 or default" in run.stderr, run.stderr
    assert "this CPU supports: " + ", ".join(c for c in reversed(CAPABILITIES) if c in SUPPORTED) in run.stderr


def test_bad_tiles_outrun_blas_is_refused_at_import():
    best = max(SUPPORTED, key=CAPABILITIES.index)
    run = _run(best, "-c", "import manualconv", **{FLAG: "yes"})
    assert run.returncode != 0
    assert "RuntimeError" in run.stderr, run.stderr
    assert f"{FLAG}=yes is not 0 or 1 (unset: detected from the CPU)" in run.stderr, run.stderr


# ---- no AVX code escapes the per-ISA units ----

def _functions_using_vector_registers(library: str) -> dict:
    """{symbol: widest register class it uses ('ymm' or 'zmm')} over the library's disassembly."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True,
                             text=True, check=True).stdout
    found, symbol = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            symbol = header.group(1)
        elif symbol and ("%zmm" in line or "%ymm" in line):
            found[symbol] = "zmm" if "%zmm" in line or found.get(symbol) == "zmm" else "ymm"
    return found


def test_wide_code_only_in_per_isa_kernels():
    """Every function of manualconv/_C*.so that uses ymm or zmm registers is local to its unit
    (lower-case type in nm: the anonymous-namespace tiles) or one of the exported per-ISA
    functions of that width; a weak or global symbol with such code is the ODR hazard (the linker
    may pick that copy for callers on a CPU without the instruction set)."""
    library = manualconv._C.__file__
    binding = {}
    for line in subprocess.run(["nm", library], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            binding[parts[2]] = parts[1]
    wide = _functions_using_vector_registers(library)
    assert any(w == "zmm" for w in wide.values()) == ("x86_64" in os.uname().machine), wide  # the kernels are there
    allowed = {"ymm": re.compile(r"_ZN10manualconv\d+direct_\w+_avx(2|512)E"),
               "zmm": re.compile(r"_ZN10manualconv\d+direct_\w+_avx512E")}
    for symbol, width in wide.items():
        if binding.get(symbol, "t") in "tdbr":
            continue  # internal linkage: only its own unit calls it
        assert allowed[width].match(symbol), f"{symbol} ({binding[symbol]}) uses {width} outside the per-ISA kernels"
