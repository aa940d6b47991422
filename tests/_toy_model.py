"""A small model with the ``objective`` interface of MultiModalVAE, for trainer tests.

``value`` is minus a squared error of predicting modality "b" from "a"; with ``stochastic`` it
also draws a random subset per sample and multiplicative noise from the global RNG, so that a
resumed run only matches an uninterrupted one if the RNG state is restored.
"""
from typing import NamedTuple

import torch
from torch import nn

import mmfast
from mmfast.data import MultiModalData


class ToyOutput(NamedTuple):
    value: torch.Tensor
    loss: torch.Tensor


class ToyModel(nn.Module):
    def __init__(self, dim_a=3, dim_b=2, stochastic=True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_a, 8), nn.Tanh(), nn.Linear(8, dim_b))
        self.stochastic = stochastic

    def objective(self, x, observed=None, kind="masked", num_samples=1, beta=1.0):
        err = ((self.net(x["a"]) - x["b"]) ** 2).sum(-1)
        if self.stochastic:
            subset = mmfast.subsets.sample_subsets(observed)
            weight = 1.0 + 0.1 * torch.randn(err.shape) + 0.05 * subset.sum(-1)
            err = err * weight
        value = -beta * err
        return ToyOutput(value, -value.mean())


def toy_data(n=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, generator=gen)
    b = torch.stack([a[:, 0] * a[:, 1], torch.sin(a[:, 2])], -1) + 0.01 * torch.randn(n, 2, generator=gen)
    return MultiModalData({"a": a, "b": b})
