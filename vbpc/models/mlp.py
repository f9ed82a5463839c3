"""A plain multilayer perceptron, the standard small benchmark network (e.g. for Fashion-MNIST)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Fully connected network ``in -> hidden[0] -> ... -> out`` that flattens its input.

    Args:
        in_features: size of the flattened input (784 for 28x28 images).
        hidden: widths of the hidden layers (may be empty: then a linear model).
        out_features: number of outputs (logits).
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``, after every hidden layer.
        dropout: dropout probability after every hidden activation (0 disables it).

    Inputs of shape ``(N, *)`` are flattened to ``(N, in_features)``.  The layers live in
    ``self.layers`` (an ``nn.Sequential``), so the parameter names are ``layers.<i>.weight``
    and the last linear layer is the one ``select_parameters(model, "last_layer")`` picks.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (500, 300),
        out_features: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"invalid dropout={dropout!r}: must be in [0, 1)")
        widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
        if any(w < 1 for w in widths):
            raise ValueError(f"layer widths must be positive, got {widths}")
        self.in_features = widths[0]
        self.hidden = tuple(widths[1:-1])
        self.out_features = widths[-1]
        self.activation = activation
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, out_features)`` for inputs ``(N, *)`` with ``in_features`` elements each."""
        if x.dim() < 2:
            raise ValueError(f"MLP expects a batch of shape (N, *), got shape {tuple(x.shape)}")
        x = torch.flatten(x, 1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features per example, got {x.shape[-1]}")
        return self.layers(x)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"
