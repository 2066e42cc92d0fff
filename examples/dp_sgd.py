"""DP-SGD on CIFAR-10 with manualconv layers and Opacus.

    .venv/bin/python examples/dp_sgd.py --data-dir DIR [--epochs 1] [--limit 10000] [--backend manual|native]

Loads CIFAR-10 as train.py does (cifar10.load_cifar10: an ImageFolder tree of JPEGs, e.g. this
workplace's offline copy unpacked with `make data`, or torchvision's pickled batches), builds
ResNet-20 with GroupNorm in place of BatchNorm (Opacus's ModuleValidator.fix: per-sample
gradients need layers that don't mix samples), converted to manualconv layers, and trains it
with Opacus's PrivacyEngine.make_private: Poisson-sampled batches, per-sample gradients from
manualconv's grad samplers (manualconv.per_sample: ∂J/∂W_n = x_n ⋆ δ_n, one grouped grad-weight
kernel call per layer), clipped to --max-grad-norm, Gaussian noise σ = --noise-multiplier.
Prints the loss, test accuracy and the privacy spent ε (at δ = --delta) after each epoch.
``--backend native`` trains the identical torch.nn model (Opacus's own samplers) for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import manualconv  # noqa: E402
import manualconv.per_sample  # noqa: E402,F401  (registers manualconv's grad samplers with Opacus)
from cifar10 import load_cifar10, normalize, take_train_subset  # noqa: E402
from manualconv.models import resnet20  # noqa: E402


def build(backend: str, seed: int) -> torch.nn.Module:
    from opacus.validators import ModuleValidator
    torch.manual_seed(seed)
    model = ModuleValidator.fix(resnet20())  # BatchNorm → GroupNorm
    return manualconv.convert(model) if backend == "manual" else model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(normalize(x_uint8[i:i + batch])).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--backend", choices=["manual", "native"], default="manual")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=10000, help="train on this many images (0: all 50,000)")
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size (Poisson sampling)")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from opacus import PrivacyEngine

    data = load_cifar10(args.data_dir, download=False)
    if args.limit:
        data = take_train_subset(data, args.limit, args.seed)
    train = torch.utils.data.TensorDataset(normalize(data["train_x"]), data["train_y"])
    model = build(args.backend, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=torch.utils.data.DataLoader(train, batch_size=args.batch_size),
        noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm)
    print(f"DP-SGD, {args.backend}: ResNet-20 (GroupNorm), {len(train)} training images, expected batch "
          f"{args.batch_size}, σ = {args.noise_multiplier}, clip {args.max_grad_norm}, lr {args.lr}, "
          f"{torch.get_num_threads()} threads")
    loss_fn = manualconv.CrossEntropyLoss() if args.backend == "manual" else torch.nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        start, total, count = time.time(), 0.0, 0
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling may draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        seconds = time.time() - start
        acc = accuracy(model._module, data["test_x"], data["test_y"])
        print(f"epoch {epoch}: train loss {total / max(count, 1):.4f}, test accuracy {100 * acc:.2f} %, "
              f"ε = {engine.get_epsilon(args.delta):.2f} (δ = {args.delta}), {seconds:.0f} s "
              f"({count / seconds:.0f} images/s)")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
