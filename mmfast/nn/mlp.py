"""Multi-layer perceptrons, the building block of the aggregators and the vector encoders."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """``Linear -> act -> ... -> Linear``: ``[..., in_dim] -> [..., out_dim]``.

    Args:
        in_dim, out_dim: input and output widths.
        hidden: widths of the hidden layers (empty: a single Linear).
        activation: module class for the nonlinearity (the paper's code: leaky ReLU).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: type[nn.Module] = nn.LeakyReLU):
        widths = [in_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(activation())
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
