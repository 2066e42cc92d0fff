"""The Winograd F(2×2, 3×3) and F(4×4, 3×3) kernels (csrc/conv2d_winograd.cpp; docs/derivation.md,
section 18).

MANUALCONV_WINOGRAD=always makes select_conv2d_kernel run F(2×2) wherever it applies (float32, 3×3,
stride 1, dilation 1, one group, padding ≤ 2), =always4x4 F(4×4) for the forward and the input
gradient (the weight gradient F(2×2)), =never keeps them off, so every case here runs the kernel
whatever the measured selection picks. Checked against torch.nn:
  * exactly, on small-integer data: every transformed value, product and sum of F(2×2, 3×3) is then
    a float32 number (quarters times small integers), so the result equals torch's float64 one;
  * on random float32 data, within tests/oracle.py's bound n·ε·Σ|terms| (unchanged), at 3, 16,
    64 and 128 channels, with random and large-magnitude inputs;
  * on data built to break that bound (one dominant kernel tap, large inputs only where the
    direct sum gives them a tiny weight), within Winograd's own rigorous bound (section 18).
float64 never runs Winograd (gradcheck stays on the GEMM kernels; see test_float64_stays_off).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from manualconv import ops
from oracle import EPS32, sum_error_bound

LAYOUTS = ("contiguous", "channels_last")
# (H, W) from 1 to 9, odd and even (partial 2×2 tiles at the bottom and right)
SIZES = ((1, 1), (2, 5), (3, 3), (4, 7), (5, 2), (6, 6), (7, 9), (8, 3), (9, 8))
CHANNELS = ((3, 16), (16, 16), (64, 64))  # (C_in, C_out)


@pytest.fixture
def winograd(monkeypatch):
    """Force the Winograd kernels on (read by csrc at every call)."""
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    monkeypatch.setenv("MANUALCONV_WINOGRAD", "always")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def forward(x, w, b, p):
    return torch.ops.manualconv.conv2d_forward(x, w, b, [1, 1], [p, p], [1, 1], 1)


def grad_input(dy, w, size, p):
    return torch.ops.manualconv.conv2d_grad_input(dy, w, list(size), [1, 1], [p, p], [1, 1], 1)


def grad_weight(x, dy, size, p):
    return torch.ops.manualconv.conv2d_grad_weight(x, dy, list(size), [1, 1], [p, p], [1, 1], 1)


def integers(gen, *shape, high=4):
    return torch.randint(-high, high + 1, shape, generator=gen).float()


def check_layout(result, source):
    """geometry.h's output_layout: channels-last for a channels-last (and not also contiguous)
    source, else NCHW-contiguous."""
    channels_last = not source.is_contiguous() and source.is_contiguous(memory_format=torch.channels_last)
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert result.is_contiguous(memory_format=expected), f"result strides {result.stride()}, expected {expected}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", (0, 1, 2))
def test_exact_on_integer_data(winograd, padding, layout):
    """Forward, input and weight gradients equal torch's float64 results exactly on small integers, for
    every size 1..9 (partial tiles), padding 0/1/2, channels 3/16/64, batch 1 and 3."""
    gen = torch.Generator().manual_seed(padding)
    for (H, W), (C, O), N in itertools.product(SIZES, CHANNELS, (1, 3)):
        if H + 2 * padding < 3 or W + 2 * padding < 3:
            continue  # no output
        if C == 64 and N == 3 and (H, W) not in ((7, 9), (2, 5)):
            continue  # (keeps the file fast; 64 channels at batch 3 on two sizes)
        x, w, b = integers(gen, N, C, H, W), integers(gen, O, C, 3, 3), integers(gen, O)
        xl = laid_out(x, layout)
        y = forward(xl, w, b, padding)
        expected = F.conv2d(x.double(), w.double(), b.double(), padding=padding)
        assert torch.equal(y.double(), expected), f"forward {N, C, O, H, W} p={padding}"
        check_layout(y, xl)
        dyl = laid_out(integers(gen, *expected.shape), layout)
        dy = dyl.contiguous()
        dx = grad_input(dyl, w, x.shape, padding)
        expected = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), padding=padding)
        assert torch.equal(dx.double(), expected), f"grad_input {N, C, O, H, W} p={padding}"
        check_layout(dx, dyl)
        dw = grad_weight(xl, dyl, w.shape, padding)
        expected = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), padding=padding)
        assert torch.equal(dw.double(), expected), f"grad_weight {N, C, O, H, W} p={padding}"


def within_oracle_bound(x, w, b, dy, padding, what):
    """Forward and δx of the Winograd kernels within tests/oracle.py's float32 bound, against
    torch.nn in float64 on the same float32 data (n: the direct sum's length, as cases.py's
    conv_reduction_length: C·9 + 1 forward, O·9 for δx)."""
    C, O = x.shape[1], w.shape[0]
    y = forward(x, w, b, padding)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=padding)
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), padding=padding)
    bound = sum_error_bound(C * 9 + 1, torch.float32, magnitude)
    error = (y.double() - exact).abs()
    assert (error <= bound).all(), f"{what}: forward error {(error / bound).max().item():.2f}× the bound"
    dx = grad_input(dy, w, x.shape, padding)
    exact = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), padding=padding)
    magnitude = torch.nn.grad.conv2d_input(x.shape, w.double().abs(), dy.double().abs(), padding=padding)
    bound = sum_error_bound(O * 9, torch.float32, magnitude)
    error = (dx.double() - exact).abs()
    assert (error <= bound).all(), f"{what}: grad_input error {(error / bound).max().item():.2f}× the bound"


def random_data(channels, scale, padding, gen, N=3, H=9, W=8):
    """x, w, b, δy (N samples of H×W maps): randn, or ×1e6 ('large': the bound is relative, so
    this checks that nothing overflows or loses scale), or each entry of x and δy ×10^U(−3, 3)
    ('mixed': neighbouring pixels of very different size, what the transforms mix)."""
    x, w = torch.randn(N, channels, H, W, generator=gen), torch.randn(channels, channels, 3, 3, generator=gen)
    b = torch.randn(channels, generator=gen)
    dy = torch.randn(N, channels, H + 2 * padding - 2, W + 2 * padding - 2, generator=gen)
    if scale == "large":
        x, dy = x * 1e6, dy * 1e6
    if scale == "mixed":
        x = x * 10 ** (6 * torch.rand(x.shape, generator=gen) - 3)
        dy = dy * 10 ** (6 * torch.rand(dy.shape, generator=gen) - 3)
    return x, w, b, dy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels, scale", [(c, s) for c in (3, 16, 64, 128) for s in ("randn", "large", "mixed")
                                             if (c, s) != (3, "mixed")])
def test_float32_within_oracle_bound(winograd, channels, scale, layout):
    """Within the suite's bound at 3, 16, 64 and 128 channels (3 channels with mixed magnitudes
    exceeds it: see the next test)."""
    gen = torch.Generator().manual_seed(channels)
    for padding in (0, 1, 2):
        x, w, b, dy = random_data(channels, scale, padding, gen)
        within_oracle_bound(laid_out(x, layout), w, b, laid_out(dy, layout), padding, f"C={channels} {scale} p={padding}")


def test_three_channels_with_mixed_magnitudes_exceed_the_oracle_bound(winograd):
    """Why select_conv2d_kernel takes Winograd only from 16 summed channels on: with 3 channels
    (n = 28 terms in the direct sum) the transforms' 7× larger Σ|terms| (section 18) shows on
    mixed-magnitude data; measured up to 2.6× the bound."""
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(AssertionError, match="the bound"):
        for padding in (0, 1, 2):
            x, w, b, dy = random_data(3, "mixed", padding, gen)
            within_oracle_bound(x, w, b, dy, padding, f"C=3 mixed p={padding}")


@pytest.fixture
def winograd4x4(monkeypatch):
    """Force the F(4×4, 3×3) kernels on for the forward and the input gradient."""
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    monkeypatch.setenv("MANUALCONV_WINOGRAD", "always4x4")


# (H, W): partial 4×4 tiles at the bottom and right, maps of one tile and of a few
SIZES_4X4 = ((4, 4), (5, 7), (9, 8), (13, 6), (16, 16))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels, scale", [(c, s) for c in (128, 256) for s in ("randn", "large", "mixed")])
def test_float32_4x4_within_oracle_bound(winograd4x4, channels, scale, layout):
    """F(4×4): forward and input gradient within the suite's bound, unchanged, from 128 summed
    channels (where select_conv2d_kernel takes it), over paddings 0–2 and partial tiles."""
    gen = torch.Generator().manual_seed(channels + 1)
    for padding, (H, W) in itertools.product((0, 1, 2), SIZES_4X4):
        x, w, b, dy = random_data(channels, scale, padding, gen, N=2, H=H, W=W)
        within_oracle_bound(laid_out(x, layout), w, b, laid_out(dy, layout), padding,
                            f"C={channels} {scale} p={padding} {H}x{W}")


def test_64_channels_with_mixed_magnitudes_exceed_the_oracle_bound_in_4x4(winograd4x4):
    """Why select_conv2d_kernel takes F(4×4) only from 128 summed channels: its larger transform
    entries (section 18) on mixed-magnitude data reach 3.7× the bound at 64 channels over 90
    draws (0.87× at 128, 0.27× at 256; F(2×2) at 32: 0.15×)."""
    with pytest.raises(AssertionError, match="the bound"):
        for seed in range(1000, 1006):  # the 90 draws measured: the worst is 3.7× the bound
            gen = torch.Generator().manual_seed(seed)
            for padding, (H, W) in itertools.product((0, 1, 2), SIZES_4X4):
                x, w, b, dy = random_data(64, "mixed", padding, gen, N=2, H=H, W=W)
                within_oracle_bound(laid_out(x, "channels_last"), w, b, laid_out(dy, "channels_last"), padding,
                                    f"C=64 mixed p={padding} {H}x{W}")


def grad_weight_within_oracle_bound(x, dy, shape, padding, what):
    """∂W of the Winograd kernel within tests/oracle.py's float32 bound (n = N·H_out·W_out, the
    direct sum's length), against torch.nn in float64 on the same float32 data."""
    dw = grad_weight(x, dy, shape, padding)
    exact = torch.nn.grad.conv2d_weight(x.double(), shape, dy.double(), padding=padding)
    magnitude = torch.nn.grad.conv2d_weight(x.double().abs(), shape, dy.double().abs(), padding=padding)
    bound = sum_error_bound(dy[:, 0].numel(), torch.float32, magnitude)
    error = (dw.double() - exact).abs()
    assert (error <= bound).all(), f"{what}: grad_weight error {(error / bound).max().item():.2f}× the bound"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels, scale", [(c, s) for c in (16, 32, 64) for s in ("randn", "large", "mixed")])
def test_grad_weight_within_oracle_bound(winograd, channels, scale, layout):
    """The weight gradient within the suite's bound on sums of at least 2048 terms (N·H_out·W_out,
    where select_conv2d_kernel takes it): N = 48 samples of 9×9 maps, 2352–5808 terms."""
    gen = torch.Generator().manual_seed(channels)
    for padding in (0, 1, 2):
        x, _, _, dy = random_data(channels, scale, padding, gen, N=48, H=9, W=9)
        grad_weight_within_oracle_bound(laid_out(x, layout), laid_out(dy, layout), (channels, channels, 3, 3), padding,
                                        f"C={channels} {scale} p={padding}")


def test_short_grad_weight_sums_with_mixed_magnitudes_exceed_the_oracle_bound(winograd):
    """Why select_conv2d_kernel takes the Winograd weight gradient only on sums of at least 2048
    terms: a tile's transforms multiply inputs and deltas that the direct sum never pairs (offsets
    outside the kernel), so on mixed-magnitude data a short sum (3 samples of 7×7 to 11×11 δy,
    147–363 terms, 12 draws) exceeds n·ε·Σ|terms| (measured up to 2.6× at 32 channels; 0.02× from 2048
    terms on)."""
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(AssertionError, match="the bound"):
        for _, padding in itertools.product(range(4), (0, 1, 2)):  # 12 draws: some exceed the bound
            x, _, _, dy = random_data(32, "mixed", padding, gen, N=3, H=9, W=9)
            grad_weight_within_oracle_bound(x, dy, (32, 32, 3, 3), padding, f"C=32 mixed p={padding}")


def winograd_magnitude(d: torch.Tensor, g: torch.Tensor, padding: int) -> torch.Tensor:
    """Section 18's Σ|terms| of F(2×2, 3×3): Σ_c |Aᵀ|[(|G||g||Gᵀ|) ⊙ (|Bᵀ||d||B|)]|A| per output
    pixel, in float64 (d: (1, C, H, W) with H + 2p − 2, W + 2p − 2 even; g: (O, C, 3, 3))."""
    BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64).abs()
    G = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=torch.float64).abs()
    AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64).abs()
    tiles = F.pad(d.double().abs(), [padding] * 4).unfold(2, 4, 2).unfold(3, 4, 2)[0]  # (C, th, tw, 4, 4)
    V = BT @ tiles @ BT.T
    U = G @ g.double().abs() @ G.T  # (O, C, 4, 4)
    M = torch.einsum("ocrs,cxyrs->oxyrs", U, V)
    y = AT @ M @ AT.T  # (O, th, tw, 2, 2)
    return y.permute(0, 1, 3, 2, 4).reshape(1, g.shape[0], 2 * y.shape[1], 2 * y.shape[2])


def test_adversarial_data_exceeds_the_direct_bound_but_not_winograds(winograd):
    """A kernel with one dominant tap (a = b = 0) and inputs large only where the direct sum
    weighs them by the tiny taps: Winograd's transformed tiles mix the large inputs into every
    product, so its error exceeds the direct sum's bound n·ε·Σ|x||w| (section 18 says so), yet
    stays within its own rigorous bound γ_k·Σ|Aᵀ|[(|G||g||Gᵀ|)⊙(|Bᵀ||d||B|)]|A|, k = C + 9."""
    gen = torch.Generator().manual_seed(0)
    C, O, H, W = 16, 16, 8, 8
    w = torch.rand(O, C, 3, 3, generator=gen) * 1e-6
    w[:, :, 0, 0] = 1 + torch.rand(O, C, generator=gen)
    x = torch.rand(1, C, H, W, generator=gen)
    x[:, :, 2::2, 2::2] = 1e6 * (1 + torch.rand(1, C, H // 2 - 1, W // 2 - 1, generator=gen))  # tap (2, 2) of even tiles
    y = forward(x, w, None, 0).double()
    exact = F.conv2d(x.double(), w.double())
    error = (y - exact).abs()
    direct = sum_error_bound(C * 9 + 1, torch.float32, F.conv2d(x.double().abs(), w.double().abs()))
    assert (error > direct).any(), "the constructed data no longer exceeds the direct bound"
    k = C + 9
    rigorous = k * EPS32 / (1 - k * EPS32) * winograd_magnitude(x, w, 0)
    assert (error <= rigorous).all(), f"error {(error / rigorous).max().item():.2f}× Winograd's rigorous bound"


def test_never_and_always_run_different_kernels(monkeypatch):
    """The switch reaches the selection: the two paths round differently on random data (a
    Winograd kernel that silently fell back to GEMM would give identical bits)."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 64, 8, 8, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)
    results = {}
    for choice in ("never", "always", "always4x4"):
        monkeypatch.setenv("MANUALCONV_WINOGRAD", choice)
        results[choice] = forward(laid_out(x, "channels_last"), w, None, 1)
    for a, b in itertools.combinations(results, 2):
        assert not torch.equal(results[a], results[b]), (a, b)
    monkeypatch.setenv("MANUALCONV_WINOGRAD", "sometimes")
    with pytest.raises(RuntimeError, match="MANUALCONV_WINOGRAD must be 'always', 'always4x4', 'never' or unset"):
        forward(x, w, None, 1)


def test_float64_stays_off(monkeypatch):
    """float64 (gradcheck's dtype) never takes Winograd: with the switch on and a bogus value
    alike the float64 conv runs (the switch is not even read) and equals torch to rounding."""
    monkeypatch.setenv("MANUALCONV_WINOGRAD", "sometimes")
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    # float64 GEMM sums of 27 terms: n·u·Σ|terms| (oracle.py's float64 bound)
    bound = sum_error_bound(27, torch.float64, F.conv2d(x.abs(), w.abs(), padding=1))
    assert ((forward(x, w, None, 1) - F.conv2d(x, w, padding=1)).abs() <= bound).all()


def test_outside_its_geometry_the_switch_is_not_read(monkeypatch):
    """Stride 2, dilation 2, groups 2, a 5×5 kernel, padding 3: Winograd does not apply, so a
    bogus switch value is never read."""
    monkeypatch.setenv("MANUALCONV_WINOGRAD", "sometimes")
    x = torch.randn(1, 4, 9, 9)
    for w, kw in ((torch.randn(4, 4, 3, 3), dict(stride=2)), (torch.randn(4, 4, 3, 3), dict(dilation=2)),
                  (torch.randn(4, 2, 3, 3), dict(groups=2)), (torch.randn(4, 4, 5, 5), {}),
                  (torch.randn(4, 4, 3, 3), dict(padding=3))):
        s, p, d, g = kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1)
        torch.ops.manualconv.conv2d_forward(x, w, None, [s, s], [p, p], [d, d], g)


# the kernel of each pass (forward, input gradient, weight gradient): 4 = F(4×4), 2 = F(2×2),
# - = the GEMM / direct kernel (MANUALCONV_WINOGRAD=always4x4's weight gradient is F(2×2))
MODES = {"4": "always4x4", "2": "always", "-": "never"}


@pytest.mark.parametrize("C, O, size, nchw, channels_last", [
    (128, 128, 8, "442", "442"),  # ≥ 128 summed channels, output maps ≥ 8×8: F(4×4)
    (128, 128, 16, "442", "442"),  # (where the tiles outrun the BLAS, maps ≥ 16×16: see below)
    (64, 128, 8, "242", "242"),  # the forward sums 64 channels, the input gradient 128
    (128, 128, 4, "222", "222"),  # a 4×4 map: F(2×2)
    (64, 64, 8, "222", "222"), (32, 64, 5, "222", "222"), (128, 32, 4, "222", "222"),  # ≥ 32 each way, maps ≥ 4×4
    (32, 32, 8, "222", "222"),  # 32 each way is enough (the direct tiles' products)
    (32, 64, 32, "222", "222"),  # NCHW 32×32 too (staged a block of rows at a time)
    (16, 128, 8, "---", "---"), (128, 16, 8, "---", "---"),  # under 32 channels one way
    (64, 64, 3, "---", "---"),  # a map under 4×4
])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_measured_selection(monkeypatch, C, O, size, nchw, channels_last, layout):
    """select_conv2d_kernel's measured choice (switch unset) gives the bits of the kernel it
    names, in each pass: Winograd's with at least 32 channels each way, on maps of at least 4×4
    (either layout), and for the weight gradient on sums of at least 2048 terms, F(4×4)
    for the forward and input gradient from 128 summed channels on output maps of at least 8×8
    (16×16 where the tiles outrun the BLAS); the GEMM/direct kernels' otherwise."""
    gen = torch.Generator().manual_seed(C + O + size)
    N = 2048 // (size * size) + 1  # the weight gradient's sum N·H_out·W_out just over 2048 terms
    x = laid_out(torch.randn(N, C, size, size, generator=gen), layout)
    w, dy = torch.randn(O, C, 3, 3, generator=gen), laid_out(torch.randn(N, O, size, size, generator=gen), layout)
    results = {}
    for choice in ("", "always", "always4x4", "never"):
        monkeypatch.setenv("MANUALCONV_WINOGRAD", choice)
        results[choice] = (forward(x, w, None, 1), grad_input(dy, w, x.shape, 1), grad_weight(x, dy, w.shape, 1))
    modes = channels_last if layout == "channels_last" else nchw
    if ops.tiles_outrun_blas() and size < 16:  # there F(4×4) takes output maps of ≥ 16×16 only
        modes = modes.replace("4", "2")
    for k, what in enumerate(("forward", "grad_input", "grad_weight")):
        assert not torch.equal(results["always"][k], results["never"][k]), f"{what}: the two kernels agree bit for bit"
        if k < 2:
            assert not torch.equal(results["always4x4"][k], results["always"][k]), f"{what}: F(4×4) and F(2×2) agree"
        expected = MODES[modes[k]]
        assert torch.equal(results[""][k], results[expected][k]), f"{what}: the measured choice is not {expected}"


def test_short_grad_weight_sums_stay_off_winograd(monkeypatch):
    """The weight gradient of 31 samples of 8×8 (1984 terms, under 2048) keeps the GEMM/direct
    kernel where 33 samples (2112 terms) take Winograd (see the test above for why)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, 3, 3, generator=gen)
    for N, selected in ((31, False), (33, True)):
        x = laid_out(torch.randn(N, 64, 8, 8, generator=gen), "channels_last")
        dy = laid_out(torch.randn(N, 64, 8, 8, generator=gen), "channels_last")
        results = {}
        for choice in ("", "always", "never"):
            monkeypatch.setenv("MANUALCONV_WINOGRAD", choice)
            results[choice] = grad_weight(x, dy, w.shape, 1)
        assert not torch.equal(results["always"], results["never"])
        assert torch.equal(results[""], results["always" if selected else "never"]), f"N={N}"


@pytest.mark.parametrize("forced", ["always", "always4x4"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["input", "weight", "grad_output"])
def test_non_finite_values_give_torchs_nan_and_inf(monkeypatch, where, layout, forced):
    """An inf, −inf or NaN among the data: the transforms would turn an inf into inf − inf = NaN
    where the direct sum (and torch) give ±inf, so a Winograd result holding a NaN or ±inf is
    recomputed by the direct / GEMM kernel: forced Winograd gives the bits of that kernel, and
    NaN and ±inf exactly where torch's float64 conv has them, in all three passes. (float64: with
    a NaN / ±inf weight torch's own float32 forward disagrees with itself — oneDNN skips the
    padding taps, its im2col path multiplies the zeros there, 0·inf = NaN — and its float64
    path is im2col, as ours.)"""
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(3, 32, 8, 8, generator=gen), torch.randn(32, 32, 3, 3, generator=gen)
    dy = torch.randn(3, 32, 8, 8, generator=gen)
    target = {"input": x, "weight": w, "grad_output": dy}[where]
    target.view(-1)[[5, 700, 1300]] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    xl, dyl = laid_out(x, layout), laid_out(dy, layout)
    results = {}
    for choice in (forced, "never"):
        monkeypatch.setenv("MANUALCONV_WINOGRAD", choice)
        results[choice] = (forward(xl, w, None, 1), grad_input(dyl, w, x.shape, 1), grad_weight(xl, dyl, w.shape, 1))
    expected = (F.conv2d(x.double(), w.double(), padding=1),
                torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), padding=1),
                torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), padding=1))
    for what, winograd, other, native in zip(("forward", "grad_input", "grad_weight"), results[forced],
                                             results["never"], expected):
        if not native.isfinite().all():  # (a pass the bad value does not reach stays on Winograd)
            assert torch.equal(winograd.isnan(), other.isnan()) and torch.equal(winograd.nan_to_num(), other.nan_to_num()), what
        assert torch.equal(winograd.isnan(), native.isnan()), f"{what}: NaN where torch has none, or the reverse"
        assert torch.equal(winograd.isinf(), native.isinf()), f"{what}: ±inf positions differ from torch's"
        assert torch.equal(winograd[winograd.isinf()].double(), native[native.isinf()]), f"{what}: inf signs differ"
