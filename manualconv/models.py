"""Networks built only from manualconv layers."""

from __future__ import annotations

import torch

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
