"""Modality decoders ``z [N, d] -> parameters of p(x_m | z)``: an MLP for vectors and the MoPoE
benchmark architectures for MNIST, SVHN and the 8-character text.

Each decoder has an ``event_shape`` (the shape of one data point, which a Modality with a
learned scale uses for its per-dimension log-scale). Location decoders return ``loc``
``[N, *event]`` (or ``(loc, log_scale)`` with ``output="loc_scale"``); the text decoder returns
logits ``[N, 8, C]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mmfast.nn.mlp import MLP

__all__ = ["MLPDecoder", "MNISTDecoder", "SVHNDecoder", "TextDecoder"]


class MLPDecoder(nn.Module):
    """MLP from z to ``[N, *event_shape]``.

    Args:
        latent_dim: d; event_shape: int or shape of one data point.
        hidden: hidden widths (default (256, 256)).
        output: ``"loc"`` (locations or logits) or ``"loc_scale"`` (a pair (loc, log_scale),
            for a Modality with ``scale=None``).
    """

    def __init__(self, latent_dim: int, event_shape, hidden: Sequence[int] = (256, 256),
                 output: str = "loc", activation: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        if output not in ("loc", "loc_scale"):
            raise ValueError(f"MLPDecoder: output must be 'loc' or 'loc_scale', got {output!r}")
        self.event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        self.output = output
        width = math.prod(self.event_shape)
        self.net = MLP(latent_dim, width * (2 if output == "loc_scale" else 1), hidden, activation)

    def forward(self, z: Tensor):
        out = self.net(z)
        if self.output == "loc":
            return out.reshape(z.shape[0], *self.event_shape)
        loc, log_scale = out.chunk(2, dim=-1)
        return loc.reshape(z.shape[0], *self.event_shape), log_scale.reshape(z.shape[0], *self.event_shape)


class MNISTDecoder(nn.Module):
    """MoPoE MNIST decoder: ``Linear(d, 400) -> ReLU -> Linear(400, 784) -> sigmoid``, reshaped
    to ``[N, 1, 28, 28]``. MoPoE pairs it with a Laplace likelihood of fixed scale 0.75."""
    event_shape = (1, 28, 28)

    def __init__(self, latent_dim: int, hidden: int = 400, num_hidden_layers: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(latent_dim, hidden), nn.ReLU()]
        for _ in range(num_hidden_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 784), nn.Sigmoid())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).reshape(z.shape[0], *self.event_shape)


class SVHNDecoder(nn.Module):
    """MoPoE SVHN decoder: ``Linear(d, 128)``, then transposed 4x4 convolutions
    ``128 -> 64 -> 64 -> 32 -> 3`` (1x1 -> 4 -> 8 -> 16 -> 32) with ReLU between:
    ``[N, 3, 32, 32]`` locations (MoPoE: Laplace, fixed scale 0.75)."""
    event_shape = (3, 32, 32)

    def __init__(self, latent_dim: int):
        super().__init__()
        self.linear = nn.Linear(latent_dim, 128)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, stride=1, padding=0), nn.ReLU(),
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.linear(z).reshape(z.shape[0], 128, 1, 1))


class TextDecoder(nn.Module):
    """MoPoE text decoder: ``Linear(d, 2·dim)``, ConvTranspose1d(k4, s1) and (k4, s2, p1) with
    ReLU (1 -> 4 -> 8 positions), Conv1d(2·dim, C, 1): logits ``[N, 8, C]`` (categorical)."""

    def __init__(self, latent_dim: int, num_classes: int = 71, dim: int = 64, length: int = 8):
        super().__init__()
        if length != 8:
            raise ValueError(f"TextDecoder: the MoPoE architecture emits 8 characters, got length={length}")
        self.event_shape = (length,)
        self.num_classes = num_classes
        self.linear = nn.Linear(latent_dim, 2 * dim)
        self.net = nn.Sequential(
            nn.ConvTranspose1d(2 * dim, 2 * dim, 4, stride=1, padding=0), nn.ReLU(),
            nn.ConvTranspose1d(2 * dim, 2 * dim, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(2 * dim, num_classes, 1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.linear(z).reshape(z.shape[0], -1, 1)
        return self.net(h).transpose(-2, -1)
