"""LeNet-5 (LeCun et al., 1998) for 28x28 or 32x32 images, with ReLU and max pooling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_image_input

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """``conv(6,5x5) -> pool -> conv(16,5x5) -> pool -> fc 120 -> fc 84 -> fc num_classes``.

    Args:
        num_classes: number of logits.
        in_channels: 1 for Fashion-MNIST/MNIST, 3 for CIFAR-10.
        input_size: 28 (the first convolution pads by 2, as LeNet-5 on MNIST) or 32 (no padding);
            both give the classic 16x5x5 feature map.

    Parameters are named ``features.{0,3}.*`` (convolutions) and ``classifier.{0,2,4}.*``; the last
    linear layer ``classifier.4`` is what ``select_parameters(model, "last_layer")`` picks.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if input_size not in (28, 32):
            raise ValueError(f"LeNet5 supports input_size 28 or 32, got {input_size}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        self.num_classes, self.in_channels, self.input_size = int(num_classes), int(in_channels), int(input_size)
        pad = 2 if input_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        drop = [nn.Dropout(dropout)] if dropout > 0 else []  # MC dropout; none by default (keys unchanged)
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(), *drop, nn.Linear(120, 84), nn.ReLU(), *drop,
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, input_size, input_size)``."""
        check_image_input("LeNet5", x, self.in_channels, size=self.input_size)
        return self.classifier(torch.flatten(self.features(x), 1))
