"""Opacus on converted models: GradSampleModule's per-sample gradients equal those of the native
model (manualconv's registered grad samplers, and Opacus's functorch route through the vmap
rules), equal each sample's gradient alone, and a short DP-SGD run (PrivacyEngine.make_private)
on synthetic CIFAR-shaped data follows the native run step for step."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule, PrivacyEngine

import manualconv
import manualconv.per_sample  # noqa: F401  (registers manualconv's grad samplers with Opacus)

# float64: the per-sample gradients of both models are the same sums in different orders
# (manualconv's grouped GEMMs against Opacus's unfold + einsum), so they differ by rounding:
# each entry sums ≤ a few thousand products of size ≤ 10, error < n·ε·Σ|terms| ≈ 1e-9 at most.
assert_close = functools.partial(torch.testing.assert_close, rtol=1e-9, atol=1e-9)


def cnn():
    """conv (bias) → GroupNorm → ReLU → max pool → grouped 'same' conv → avg pool → linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding="same", groups=2), nn.ReLU(), nn.AvgPool2d(4),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 10),
    ).double()


def grad_samples(model, x, labels, loss_fn, **options):
    """p.grad_sample of every parameter after one backward through GradSampleModule."""
    wrapped = GradSampleModule(model, **options)
    loss_fn(wrapped(x), labels).backward()
    samples = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    wrapped._close()
    return samples


def each_sample_alone(model, x, labels, loss_fn):
    """{name: (N, *shape)}: ∂J_n/∂θ of each sample alone, by manualconv's backward (what Opacus's
    grad_sample holds for loss_reduction='mean': it multiplies the deltas back by N)."""
    grads = {name: [] for name, _ in model.named_parameters()}
    for n in range(x.shape[0]):
        alone = torch.autograd.grad(loss_fn(model(x[n:n + 1]), labels[n:n + 1]), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), alone):
            grads[name].append(g)
    return {name: torch.stack(g) for name, g in grads.items()}


def data(n=5):
    torch.manual_seed(1)
    return torch.randn(n, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("route", ["samplers", "functorch"])
def test_grad_sample_module_equals_native(backend, route):
    native = cnn()
    manual = manualconv.convert(native)
    x, labels = data()
    expected = grad_samples(native, x, labels, nn.CrossEntropyLoss())
    got = grad_samples(manual, x, labels, manualconv.CrossEntropyLoss(), force_functorch=route == "functorch")
    assert_close(got, expected)
    assert_close(got, each_sample_alone(manual, x, labels, manualconv.CrossEntropyLoss()))


def test_samplers_registered_for_manualconv_layers():
    from opacus.grad_sample import GradSampleModule as GSM
    for layer_class, sampler in manualconv.per_sample.SAMPLERS.items():
        assert GSM.GRAD_SAMPLERS[layer_class] is sampler, layer_class


def test_grad_sample_module_channels_last_float32(backend):
    """Channels-last float32 (the benchmark's case: csrc's per-sample kernel reads x and δ in place),
    against torch's gradient of each sample alone. (Not against Opacus on the native model: its own
    conv sampler is wrong for a channels-last conv weight here, opacus as pinned in requirements:
    its conv grad_samples differ from each sample's gradient by up to 0.26 on this model.)"""
    native = cnn().float().to(memory_format=torch.channels_last)
    manual = manualconv.convert(native)
    x, labels = data(n=6)
    x = x.float().contiguous(memory_format=torch.channels_last)
    expected = each_sample_alone(native, x, labels, nn.CrossEntropyLoss())
    got = grad_samples(manual, x, labels, manualconv.CrossEntropyLoss())
    # float32: the same sums of ≤ 8·9·64 products in different orders (GEMM against einsum),
    # each within n·ε·Σ|terms|; the per-sample gradients are O(1), so 1e-4 absolute and relative
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# (N, C, H, W), O, kernel, stride, padding, dilation, groups: per-sample weight gradients of the kernel
PER_SAMPLE_KERNEL_CASES = [
    ((5, 4, 9, 9), 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 9, 9), 6, (3, 3), (1, 1), (1, 1), (1, 1), 2),   # one sample: fewer (sample, group) pairs than threads
    ((3, 6, 10, 8), 4, (3, 2), (2, 1), (2, 0), (2, 1), 2),  # strided, dilated, asymmetric, grouped
    ((4, 8, 5, 5), 8, (1, 1), (1, 1), (0, 0), (1, 1), 4),   # pointwise: x itself is the column matrix
    ((0, 4, 5, 5), 2, (3, 3), (1, 1), (1, 1), (1, 1), 1),   # no samples
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", PER_SAMPLE_KERNEL_CASES, ids=[str(c[0]) + f"-g{c[6]}" for c in PER_SAMPLE_KERNEL_CASES])
def test_per_sample_grad_weight_kernel(cpp, case, layout):
    """torch.ops.manualconv.conv2d_grad_weight_per_sample equals, for each sample alone, torch's
    weight gradient of F.conv2d (float64), whatever the layouts of x and δ."""
    shape, out_channels, kernel, stride, padding, dilation, groups = case
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn((out_channels, shape[1] // groups) + kernel, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    delta = torch.randn_like(y)
    got = torch.ops.manualconv.conv2d_grad_weight_per_sample(
        x.contiguous(memory_format=memory_format), delta.contiguous(memory_format=memory_format),
        list(weight.shape), list(stride), list(padding), list(dilation), groups)
    expected = [torch.autograd.grad(torch.nn.functional.conv2d(x[n:n + 1], weight, None, stride, padding, dilation,
                                                               groups), weight, delta[n:n + 1])[0]
                for n in range(shape[0])]
    expected = torch.stack(expected) if expected else weight.new_zeros((0,) + tuple(weight.shape))
    assert got.shape == expected.shape
    assert_close(got, expected)


def test_per_sample_grad_weight_kernel_opcheck(cpp):
    """The per-sample operator's schema and fake kernel (sizes and strides) agree with the kernel."""
    torch.manual_seed(0)
    x, delta = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randn(3, 6, 3, 3, dtype=torch.float64)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.library.opcheck(torch.ops.manualconv.conv2d_grad_weight_per_sample,
                              (x.contiguous(memory_format=memory_format), delta.contiguous(memory_format=memory_format),
                               [6, 2, 3, 3], [2, 2], [1, 1], [1, 1], 2), test_utils=("test_schema", "test_faketensor"))


def test_per_sample_grad_weight_kernel_bfloat16_in_float32(cpp):
    """bfloat16 x and δ: computed in float32 and rounded once (InFloat32)."""
    torch.manual_seed(0)
    x, delta = torch.randn(3, 4, 6, 6).bfloat16(), torch.randn(3, 6, 6, 6).bfloat16()
    args = ([6, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1)
    got = torch.ops.manualconv.conv2d_grad_weight_per_sample(x, delta, *args)
    wide = torch.ops.manualconv.conv2d_grad_weight_per_sample(x.float(), delta.float(), *args)
    assert got.dtype == torch.bfloat16 and torch.equal(got, wide.bfloat16())


class MixedNet(nn.Module):
    """LeNet-5's subsampling and squashing, manualconv's GroupNorm, a Conv1d ('same', even kernel), a transposed conv
    (Opacus's functorch route) and a strided, dilated, reflect-padded conv, checked against each
    sample's gradient alone (Opacus's own Conv2d sampler zero-pads, so for padding_mode='reflect'
    the native model's grad_sample is wrong and can't be the oracle)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = manualconv.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.sub = manualconv.Subsampling2d(6, 2)
        self.norm = manualconv.GroupNorm(3, 6)
        self.up = manualconv.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.conv1d = manualconv.Conv1d(4, 4, 4, padding="same")
        self.act = manualconv.ScaledTanh()
        self.fc = manualconv.Linear(4 * 64, 10)

    def forward(self, x):
        y = self.act(self.sub(self.act(self.norm(self.conv(x)))))  # (N, 6, 4, 4)
        y = self.act(self.up(y)).flatten(2)                    # (N, 4, 64)
        return self.fc(self.act(self.conv1d(y)).flatten(1))


def test_grad_sample_module_layers_without_native_twin(backend):
    model = MixedNet().double()
    x, labels = data(n=4)
    expected = each_sample_alone(model, x, labels, manualconv.CrossEntropyLoss())
    for force_functorch in (False, True):
        assert_close(grad_samples(model, x, labels, manualconv.CrossEntropyLoss(), force_functorch=force_functorch),
                     expected)


def dp_sgd(model, loss_fn, steps=3):
    """A few DP-SGD steps (Poisson sampling, clipping to norm 1, noise σ = 1) on synthetic
    CIFAR-shaped data, seeded; returns the parameters, the losses and ε."""
    torch.manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (64,)))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=torch.utils.data.DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    losses = []
    for step, (x, y) in zip(range(steps), loader):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses, engine.get_epsilon(delta=1e-5)


def small_cifar_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).double()


def test_dp_sgd_make_private_follows_native(cpp):
    """Same seed → same Poisson batches and the same noise: the converted model's DP-SGD run
    follows the native one step for step (per-sample gradients and clipping equal to rounding)."""
    params_native, losses_native, eps_native = dp_sgd(small_cifar_net(), nn.CrossEntropyLoss())
    params_manual, losses_manual, eps_manual = dp_sgd(manualconv.convert(small_cifar_net()), manualconv.CrossEntropyLoss())
    start = [p.detach() for p in small_cifar_net().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(params_manual, start)), "DP-SGD changed no parameter"
    assert_close(losses_manual, losses_native)
    assert_close(params_manual, params_native)
    assert eps_manual == eps_native and 0 < eps_manual < float("inf")


def test_bench_per_sample_row(tmp_path, capsys):
    """The benchmark's per-sample-gradient row runs end to end (tiny batch, one repeat; its
    timings are the benchmark's output, never asserted)."""
    from manualconv import bench
    markdown = tmp_path / "bench.md"
    assert bench.main(["--only", "per_sample", "--per-sample-batch", "2", "--repeat", "1", "--markdown", str(markdown)]) == 0
    assert f"\n{bench.PER_SAMPLE.name} b2 " in capsys.readouterr().out
    written = markdown.read_text()
    assert f"| {bench.PER_SAMPLE.name}, batch 2 |" in written
    assert written.count(" sampler b2 |") == len(bench.SAMPLER_LAYERS)
