"""bfloat16 and float16: every op's outputs and gradients within bounds derived for those dtypes,
on each backend, and torch.autocast casting manualconv's layers as it casts torch.nn's.

The bound (ops with a bound in their record). The inputs are already bfloat16/float16, so the
exact answer is the native twin's float64 result on those very values. A kernel upcasts them to
float32 (exact), sums n products in float32 (error ≤ γ_n·M ≈ n·ε₃₂·M, M = Σ|terms|) and rounds
the result to the low dtype, a factor (1 + θ) with |θ| ≤ u (u = 2⁻⁹ bfloat16, 2⁻¹¹ float16);
a bias added or a product taken in the low dtype is one more such rounding. oracle.error_bound
allows (n·ε₃₂ + 4u)·M: at most 4 roundings on any path (conv_transpose2d and linear have 2:
kernel or matmul, then the bias; subsampling2d 3: block sums, × β, + bias). A wrong index, or a
sum rounded term by term in the low dtype (error ~√n·u·M and more), falls outside it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF
from cases import SAMPLES, call, make_inputs, per_backend, record_of
from oracle import EPS32, UNIT_ROUNDOFF, assert_within, error_bound, exact_and_magnitude, output_of, run_with_grads

LOW = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
BOUNDED = [case for case in SAMPLES if record_of(case).bound is not None]


def _low_precision_run(case, dtype):
    tensors = make_inputs(case, dtype, seed=1)
    output = output_of(call(case, "native", *[t.double() for t in tensors]))
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    if case.layout == "channels_last" and output.dim() == 4:  # as a channels-last network's δ arrives
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    return tensors, grad_output


# each sample in one low dtype, alternating along each op's samples, so every op meets both
# (and the file stays fast)
SAMPLE_DTYPES = {str(case): LOW[sum(c.op == case.op for c in BOUNDED[:i]) % 2] for i, case in enumerate(BOUNDED)}


@pytest.mark.parametrize("case,backend", per_backend(BOUNDED), indirect=["backend"])
def test_low_precision_within_bound(case, backend):
    dtype = SAMPLE_DTYPES[str(case)]
    tensors, grad_output = _low_precision_run(case, dtype)
    ours = run_with_grads(case, "manual", tensors, grad_output)
    native = run_with_grads(case, "native", tensors, grad_output)
    exact, magnitude = exact_and_magnitude(case, tensors, grad_output)
    assert ours.keys() == native.keys(), case
    if "indices" in ours:  # max pool: the same argmax as torch's on the same rounded values
        assert torch.equal(ours["indices"], native["indices"]), f"{case}: max-pool indices differ from torch's"
    for what, exact_value in exact.items():
        if what == "indices":
            continue
        assert ours[what].dtype == dtype, f"{case}: {what} is {ours[what].dtype}, not {dtype}"
        bound = error_bound(case, dtype, magnitude[what])
        assert_within(case, f"{dtype} {what}", ours[what], exact_value, bound)
        assert_within(case, f"native {dtype} {what} (checks the bound)", native[what], exact_value, bound)


# Long sums of positive terms (no cancellation: Σ|terms| = the sum itself) are where the
# accumulator's precision shows: summed in the low dtype, each addition rounds the partial sum,
# an error growing to ~n·u/2·M (and stagnation once a term falls below half an ulp of the sum);
# accumulated in float32 and rounded once, it stays within (n·ε₃₂ + u)·M.
LONG_SUMS = {
    "conv2d 8ch 5x5": (lambda x, w: MF.conv2d(x, w), lambda x, w: F.conv2d(x, w), (2, 8, 12, 12), (4, 8, 5, 5), 8 * 25),
    "conv2d grad_weight": (None, None, (8, 4, 16, 16), (4, 4, 3, 3), 8 * 14 * 14),
    "avg_pool2d 8x8": (lambda x, _: MF.avg_pool2d(x, 8), lambda x, _: F.avg_pool2d(x, 8), (2, 3, 16, 16), None, 64),
    "adaptive_avg_pool2d global": (lambda x, _: MF.adaptive_avg_pool2d(x, 1), lambda x, _: F.adaptive_avg_pool2d(x, 1),
                                   (2, 3, 32, 32), None, 1024),
}


@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(LONG_SUMS))
def test_long_positive_sums_accumulate_in_float32(name, dtype, backend):
    ours, native, x_size, w_size, n = LONG_SUMS[name]
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(x_size, generator=generator).to(dtype)
    w = None if w_size is None else torch.rand(w_size, generator=generator).to(dtype)
    if ours is None:  # ∂J/∂W = x ⋆ δ with δ = 1: sums over the batch and the output plane
        x = x.requires_grad_(False)
        w = w.requires_grad_()
        (result,) = torch.autograd.grad(MF.conv2d(x, w).sum(), w)
        w64 = w.detach().double().requires_grad_()
        (exact,) = torch.autograd.grad(F.conv2d(x.double(), w64).sum(), w64)
    else:
        result, exact = ours(x, w), native(x.double(), None if w is None else w.double())
    assert result.dtype == dtype
    bound = (n * EPS32 + UNIT_ROUNDOFF[dtype]) * exact
    assert ((result.double() - exact).abs() <= bound).all(), \
        f"{name} {dtype}: error {(result.double() - exact).abs().max():.3e} > float32-accumulation bound {bound.max():.3e}"


# The elementwise ops. ReLU: max(z, 0) and its selected delta are exact in any dtype. Sigmoid and
# tanh: the forward is torch's own call; the backward is a product formula in the low dtype, for
# which (Higham, Lemma 3.1) the error after K roundings is ≤ γ_K × the formula evaluated on
# absolute values: δ·y·(1 − y) → γ₃·|δ|·|y|·(1 + |y|);  δ·(1 − y·y) → γ₃·|δ|·(1 + y²).
def _gamma(k: int, dtype) -> float:
    u = UNIT_ROUNDOFF[dtype]
    return k * u / (1 - k * u)


ELEMENTWISE_BACKWARD = {
    "sigmoid": (torch.sigmoid, lambda d, y: d * y * (1 - y), lambda d, y: d.abs() * y.abs() * (1 + y.abs()), 3),
    "tanh": (torch.tanh, lambda d, y: d * (1 - y * y), lambda d, y: d.abs() * (1 + y * y), 3),
}


@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("op", ["relu", "sigmoid", "tanh"])
def test_low_precision_activations(op, dtype):
    z = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(3)).to(dtype) * 3
    z.view(-1)[:7] = 0  # relu's tie point
    delta = torch.randn(z.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    x = z.clone().requires_grad_()
    y = getattr(MF, op)(x)
    (grad,) = torch.autograd.grad(y, x, delta)
    x_native = z.clone().requires_grad_()
    y_native = getattr(torch, op)(x_native)
    (grad_native,) = torch.autograd.grad(y_native, x_native, delta)
    assert y.dtype == grad.dtype == dtype
    assert torch.equal(y, y_native), f"{op} {dtype}: forward differs from torch's"
    if op == "relu":
        assert torch.equal(grad, grad_native), f"relu {dtype}: delta differs from torch's"
        return
    _, formula, magnitude, roundings = ELEMENTWISE_BACKWARD[op]
    d64, y64 = delta.double(), y.double()
    exact = formula(d64, y64)
    bound = _gamma(roundings, dtype) * magnitude(d64, y64)
    assert ((grad.double() - exact).abs() <= bound).all(), f"{op} {dtype}: delta outside γ bound"
    # torch's own delta (one rounding of the same formula) is within the same bound
    assert ((grad_native.double() - exact).abs() <= bound).all(), f"{op} {dtype}: bound does not hold for torch"


@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_low_precision_cross_entropy(reduction, dtype):
    """Softmax cross-entropy on low-precision logits (class-index targets), against float64 on
    the same logits. The log-probabilities l = (z − m) − log Σ exp(z − m) (autograd's
    log_softmax_rows, m = the row max, λ = L − m with L = logsumexp(z)) are computed in the low
    dtype: the shift, the exponentials, the (float32-accumulated) sum, the log and the
    subtraction each round, |l̂ − l| ≤ Δl = u·(2|l| + 2λ + 3) + (C + 4)·ε₃₂ (first order).
    - ℓ_i = −l_iy exactly from l̂ (a one-hot row): |ℓ̂ − ℓ| ≤ Δl; the batch sum accumulates in
      float32 and rounds (n·ε₃₂ + u), the mean divides once more (u);
    - δz = scale·(p − r) with p̂ = exp(l̂) (relative error (e^Δl − 1)(1 + u) + u), scale = 1/n, 1
      or δℓ_i: the scale, p̂·Σ and the difference round once each:
      |Δ| ≤ |scale|·((rel_p + u)·p + 3u·|p − r|)·(1 + u)⁴, plus 4 half-spacings of the
      subnormals (float16's tiny probabilities)."""
    n, classes = 12, 7
    generator = torch.Generator().manual_seed(8)
    logits = (torch.randn(n, classes, generator=generator) * 4).to(dtype)
    target = torch.randint(0, classes, (n,), generator=generator)
    grad = torch.randn(n, generator=generator).to(dtype) if reduction == "none" else torch.ones((), dtype=dtype)
    z = logits.clone().requires_grad_()
    loss = MF.cross_entropy(z, target, reduction=reduction)
    (grad_z,) = torch.autograd.grad(loss, z, grad)
    assert loss.dtype == grad_z.dtype == dtype
    z64 = logits.double().requires_grad_()
    exact = F.cross_entropy(z64, target, reduction=reduction)
    (exact_grad,) = torch.autograd.grad(exact, z64, grad.double())
    u, c = UNIT_ROUNDOFF[dtype], (classes + 4) * EPS32
    eta = torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    with torch.no_grad():
        lse = torch.logsumexp(z64, dim=1, keepdim=True)
        log_p = z64 - lse
        spread = lse - z64.amax(dim=1, keepdim=True)  # λ = log Σ exp(z − m)
        delta_l = u * (2 * log_p.abs() + 2 * spread + 3) + c
        per_sample = delta_l.gather(1, target[:, None])[:, 0]
        losses = F.cross_entropy(z64, target, reduction="none").abs()
        if reduction == "none":
            loss_bound = per_sample
        else:
            total = per_sample.sum() + (n * EPS32 + u) * (losses.sum() + per_sample.sum())
            loss_bound = total if reduction == "sum" else total / n + u * exact.abs()
        p, r = log_p.exp(), F.one_hot(target, classes).double()
        rel_p = torch.expm1(delta_l) * (1 + u) + u
        scale = grad.double()[:, None].abs() if reduction == "none" else torch.tensor(1.0 / n if reduction == "mean" else 1.0)
        grad_bound = scale * ((rel_p + u) * p + 3 * u * (p - r).abs()) * (1 + u) ** 4 + 4 * eta
    assert ((loss.double() - exact).abs() <= loss_bound).all(), f"loss {(loss.double() - exact).abs().max():.3e}"
    assert ((grad_z.double() - exact_grad).abs() <= grad_bound).all(), \
        f"δz {(grad_z.double() - exact_grad).abs().max():.3e} (worst ratio {((grad_z.double() - exact_grad).abs() / grad_bound).max():.2f})"


# ---------------------------------------------------------------------------------------------
# torch.autocast


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1, stride=1), torch.nn.Sigmoid(), torch.nn.AvgPool2d(2),
        torch.nn.ConvTranspose2d(8, 8, 2, stride=2), torch.nn.Tanh(), torch.nn.AdaptiveMaxPool2d(4),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )


def _dtypes_under_autocast(model, x, target, device_type, dtype):
    """Each layer's output dtype, the loss's, and the parameter gradients' under autocast."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, o.dtype))) for m in model]
    cross_entropy = MF.cross_entropy if isinstance(model[0], manualconv.Conv2d) else F.cross_entropy
    with torch.autocast(device_type, dtype=dtype):
        output = model(x)
        loss = cross_entropy(output, target)
    loss.backward()
    for h in hooks:
        h.remove()
    return seen + [("loss", loss.dtype)] + [(n, p.grad.dtype) for n, p in model.named_parameters()], output, loss


@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
def test_autocast_dtypes_match_torch_nn(dtype, backend):
    """Under torch.autocast('cpu', dtype) a convert()ed CNN gives every layer, the loss and every
    gradient torch.nn's dtype (conv/linear in the autocast dtype, loss in float32, pools and
    activations in their input's dtype, gradients in the parameters' float32)."""
    native = small_cnn()
    ours = manualconv.convert(copy.deepcopy(native))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 7])
    native_dtypes, native_out, native_loss = _dtypes_under_autocast(native, x, target, "cpu", dtype)
    our_dtypes, our_out, our_loss = _dtypes_under_autocast(ours, x, target, "cpu", dtype)
    assert [d for _, d in our_dtypes] == [d for _, d in native_dtypes], list(zip(our_dtypes, native_dtypes))
    assert dtype in [d for _, d in native_dtypes] and torch.float32 in [d for _, d in native_dtypes]
    # the same casts on the same values: the outputs differ only where the libraries round
    # differently, at most the 2 roundings (the result, the next layer's input cast) of each of
    # the 4 low-precision layers (3 convs, linear), each carried to the output with a gain below
    # 2 at this initialisation: 16 units of roundoff of the output's scale (measured: about 1)
    scale = native_out.double().abs().max()
    assert (our_out.double() - native_out.double()).abs().max() <= 16 * UNIT_ROUNDOFF[dtype] * scale


def _has_cuda_kernels() -> bool:
    return manualconv.ops.AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("manualconv::conv2d_forward", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("backend_name", ["reference", "cpp"])
def test_autocast_cuda_dtypes_match_torch_nn(backend_name):
    """torch.autocast('cuda') (float16 by default): every layer's dtype as torch.nn's, and the
    operators' own CUDA autocast kernels cast as aten::conv2d does (cpp, where its CUDA kernels
    are built: MANUALCONV_CUDA=1)."""
    if backend_name == "cpp":
        assert _has_cuda_kernels(), "CUDA is available but the extension has no CUDA kernels (build with MANUALCONV_CUDA=1)"
    native = small_cnn().cuda()
    ours = manualconv.convert(copy.deepcopy(native))
    x = torch.randn(2, 3, 16, 16, device="cuda")
    target = torch.tensor([1, 7], device="cuda")
    with manualconv.use_backend(backend_name):
        our_dtypes, _, _ = _dtypes_under_autocast(ours, x, target, "cuda", torch.float16)
        native_dtypes, _, _ = _dtypes_under_autocast(native, x, target, "cuda", torch.float16)
        assert [d for _, d in our_dtypes] == [d for _, d in native_dtypes], list(zip(our_dtypes, native_dtypes))
        if backend_name == "cpp":
            w = torch.randn(3, 3, 3, 3, device="cuda")
            with torch.autocast("cuda"):
                y = torch.ops.manualconv.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1)
            assert y.dtype == torch.float16


def test_autocast_does_not_touch_float64(backend):
    """autocast leaves float64 alone (torch's rule), and casts nothing outside its block."""
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MF.conv2d(x, w).dtype == F.conv2d(x, w).dtype == torch.float64
    assert MF.conv2d(x.float(), w.float()).dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
def test_operators_cast_under_autocast(dtype, cpp):
    """torch.ops.manualconv.* called directly under autocast: the conv operators run in the
    autocast dtype (as aten::conv2d does), the pooling operators in their input's dtype."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    ops = torch.ops.manualconv
    with torch.autocast("cpu", dtype=dtype):
        y = ops.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1)
        assert y.dtype == F.conv2d(x, w).dtype == dtype
        delta = torch.randn(1, 3, 4, 4)
        assert ops.conv2d_grad_input(delta, w, [1, 2, 6, 6], [1, 1], [0, 0], [1, 1], 1).dtype == dtype
        assert ops.conv2d_grad_weight(x, delta, [3, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1).dtype == dtype
        pooled, _ = ops.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        assert pooled.dtype == F.max_pool2d(x, 2).dtype == torch.float32
        assert ops.avg_pool2d_forward(x, [2, 2], [2, 2], [0, 0], False, True, None).dtype == torch.float32


def test_bench_bfloat16_rows(tmp_path, capsys):
    """The benchmark's bfloat16 rows run end to end (tiny batch, one repeat) in bfloat16; timings
    are the benchmark's output, not checked here."""
    from manualconv import bench

    rows = [layer for layer in bench.SUITE if layer.kind == "bfloat16"]
    assert rows and all(layer.dtype == torch.bfloat16 for layer in rows)
    for layer in rows:
        assert all(t.dtype == torch.bfloat16 for t in bench.inputs(layer, batch=2) if t is not None), layer.name
    markdown = tmp_path / "bench.md"
    assert bench.main(["--batch", "2", "--repeat", "1", "--seconds", "0", "--only", "bfloat16", "--markdown", str(markdown)]) == 0
    printed, written = capsys.readouterr().out, markdown.read_text()
    for layer in rows:
        assert f"\n{layer.name} " in printed and f"| {layer.name} |" in written, layer.name
    assert "geomean ratio bfloat16: **" in written
