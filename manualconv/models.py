"""Networks used by train.py and the benchmark.

``airbench``, ``resnet20``, ``tiny`` and ``lenet5`` are built from a layer namespace ``L``
holding Conv2d, MaxPool2d and AvgPool2d: ``torch.nn`` (the default) or manualconv's drop-in
subclasses; ``layers(backend)`` gives the one for 'native' or 'manual'. ``LeNet5`` is built only
from manualconv layers (its subsampling and squashing layers have no torch.nn twin)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import modules
from .convert import revert
from .modules import Conv2d, Linear, ScaledTanh, Subsampling2d


class LeNet5(torch.nn.Module):
    """LeCun et al. (1998), for 32×32 inputs: C1 conv 5×5 → 6 maps, S2 trainable subsampling,
    C3 conv 5×5 → 16 maps, S4 subsampling, then fully connected 400 → 120 → 84 → classes, each
    hidden layer followed by the squashing function 1.7159·tanh(2a/3). Differences from the
    paper: C3 connects to all 6 S2 maps (the paper's sparse table is dropped), C5 is the
    equivalent fully connected 400 → 120 layer, and the RBF output layer is a linear one for
    use with cross-entropy."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"LeNet5: in_channels must be 1 or 3, but got {in_channels}")
        self.features = torch.nn.Sequential(
            Conv2d(in_channels, 6, 5), ScaledTanh(),  # C1: 32×32 → 28×28
            Subsampling2d(6, 2), ScaledTanh(),        # S2: → 14×14
            Conv2d(6, 16, 5), ScaledTanh(),           # C3: → 10×10
            Subsampling2d(16, 2), ScaledTanh(),       # S4: → 5×5
        )
        self.classifier = torch.nn.Sequential(
            Linear(16 * 5 * 5, 120), ScaledTanh(),    # C5
            Linear(120, 84), ScaledTanh(),            # F6
            Linear(84, num_classes),                  # output
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"LeNet5 expects 32×32 images, but got input of size {list(x.shape)}")
        return self.classifier(self.features(x).flatten(1))


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def airbench_bn(channels, momentum):
    # airbench: eps 1e-12, running-stat momentum 1 - 0.6, the scale frozen at 1, only the shift trained
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    bn.weight.requires_grad = False
    return bn


class ConvGroup(nn.Module):
    def __init__(self, L, cin, cout, bn_momentum):
        super().__init__()
        self.conv1, self.pool = L.Conv2d(cin, cout, 3, padding=1, bias=False), L.MaxPool2d(2)
        self.norm1, self.conv2 = airbench_bn(cout, bn_momentum), L.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2, self.activ = airbench_bn(cout, bn_momentum), nn.GELU()
        for conv in (self.conv1, self.conv2):  # identity-initialise the first in_channels filters
            nn.init.dirac_(conv.weight.data[:conv.in_channels])

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def airbench(L=nn, widths=(32, 64, 128), num_classes=10, bn_momentum=0.6):
    whiten = L.Conv2d(3, 24, 2, padding=0, bias=True)  # 2 x 3*2*2: +/- the patch eigenvectors
    whiten.weight.requires_grad = False
    return nn.Sequential(whiten, nn.GELU(), ConvGroup(L, 24, widths[0], bn_momentum),
                         ConvGroup(L, widths[0], widths[1], bn_momentum),
                         ConvGroup(L, widths[1], widths[2], bn_momentum),
                         L.MaxPool2d(3), nn.Flatten(), nn.Linear(widths[2], num_classes, bias=False), Mul(1 / 9))

class BasicBlock(nn.Module):
    """He et al. (2016) CIFAR block with option-A shortcuts: identity, or stride-2 subsampling with
    the new channels zero-padded (parameter-free, as in the paper's ResNet-20)."""

    def __init__(self, L, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = L.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = L.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.stride != 1 or self.extra:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + x)


def resnet20(L=nn, width=16, num_classes=10):
    layers, cin = [L.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            layers.append(BasicBlock(L, cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    model = nn.Sequential(*layers, L.AvgPool2d(8), nn.Flatten(), nn.Linear(cin, num_classes))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def tiny(L=nn, width=8, num_classes=10):
    """Batch-norm free (so a data-parallel run equals a single-process one): conv-maxpool-conv-avgpool."""
    return nn.Sequential(L.Conv2d(3, width, 3, padding=1), nn.ReLU(), L.MaxPool2d(2),
                         L.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), L.AvgPool2d(2),
                         L.AvgPool2d(8), nn.Flatten(), nn.Linear(2 * width, num_classes))


# ------------------------------------------------------------------- layer namespace, LeNet-5

BACKENDS = ("manual", "native")


def layers(backend: str = "native"):
    """The layer namespace ``L`` of the builders here: torch.nn for 'native', manualconv's drop-in
    modules for 'manual' (the same constructors, parameters and initialisation)."""
    if backend not in BACKENDS:
        raise ValueError(f"layers: backend must be one of {BACKENDS}, but got backend={backend!r}")
    return nn if backend == "native" else modules


def lenet5(L=nn, num_classes: int = 10) -> nn.Module:
    """LeNet5 for 3-channel 32×32 images; with ``L = torch.nn`` its convolutions and linear layers
    are torch.nn's (``revert``), its subsampling and squashing layers stay manualconv's."""
    model = LeNet5(in_channels=3, num_classes=num_classes)
    return revert(model, inplace=True) if L is nn else model
