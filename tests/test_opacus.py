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
