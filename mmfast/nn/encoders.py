"""Modality encoders ``x_m [B, ...] -> h_m [B, E]``: an MLP for vectors and the MoPoE
benchmark architectures (Sutter et al. 2021) for MNIST, SVHN and the 8-character text.

The MoPoE encoders end in two heads (mu, logvar); here they end in one Linear to ``out_dim``
features, which is the same thing for PoE/MoE (``out_dim = 2 * latent_dim``: ``[mu, logvar]``)
and feeds the pooling aggregators otherwise.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mmfast.nn.mlp import MLP

__all__ = ["MLPEncoder", "MNISTEncoder", "SVHNEncoder", "TextEncoder"]


def _as_shape(shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


class MLPEncoder(nn.Module):
    """Flatten ``[B, *in_shape]`` and apply an MLP: ``-> [B, out_dim]``.

    Args: in_shape (int or shape), out_dim, hidden (widths, default (256, 256)), activation.
    """

    def __init__(self, in_shape, out_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        self.in_shape = _as_shape(in_shape)
        self.out_dim = out_dim
        self.net = MLP(math.prod(self.in_shape), out_dim, hidden, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class MNISTEncoder(nn.Module):
    """MoPoE MNIST encoder: ``[B, 1, 28, 28] -> Linear(784, 400) -> ReLU -> Linear(400, out_dim)``
    (``num_hidden_layers`` Linear(400, 400) + ReLU blocks in all; MoPoE's default is 1)."""

    def __init__(self, out_dim: int, hidden: int = 400, num_hidden_layers: int = 1):
        super().__init__()
        self.out_dim = out_dim
        layers: list[nn.Module] = [nn.Linear(784, hidden), nn.ReLU()]
        for _ in range(num_hidden_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], 784))


class SVHNEncoder(nn.Module):
    """MoPoE SVHN encoder: four 4x4 convolutions ``3 -> 32 -> 64 -> 64 -> 128`` (strides
    2, 2, 2, 1; 32x32 -> 1x1) with ReLU, then ``Linear(128, out_dim)``. ``[B, 3, 32, 32] -> [B, out_dim]``."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=1, padding=0), nn.ReLU(),
            nn.Flatten(), nn.Linear(128, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TextEncoder(nn.Module):
    """MoPoE text encoder: one-hot characters ``[B, length=8, C]`` (or int64 ``[B, 8]`` class
    indices) -> Conv1d(C, 2·dim, 1) -> Conv1d(k4, s2, p1) -> Conv1d(k4, s2, p0), ReLU after each
    (8 -> 4 -> 1 positions) -> ``Linear(2·dim, out_dim)``.

    Args: out_dim, num_classes (alphabet size C, MoPoE: 71), dim (MoPoE DIM_text, 64), length (8).
    """

    def __init__(self, out_dim: int, num_classes: int = 71, dim: int = 64, length: int = 8):
        super().__init__()
        if length != 8:
            raise ValueError(f"TextEncoder: the MoPoE architecture takes 8 characters, got length={length}")
        self.out_dim, self.num_classes = out_dim, num_classes
        self.net = nn.Sequential(
            nn.Conv1d(num_classes, 2 * dim, 1), nn.ReLU(),
            nn.Conv1d(2 * dim, 2 * dim, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(2 * dim, 2 * dim, 4, stride=2, padding=0), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            dtype = self.net[0].weight.dtype
            x = nn.functional.one_hot(x.long(), self.num_classes).to(dtype)
        return self.net(x.transpose(-2, -1))
