"""The nonlinear identifiable simulations of the paper (METHOD.md, experiment 2).

Latents come from a Gaussian mixture over ``num_segments`` segments:
``u ~ Uniform{0..C-1}``, ``z | u ~ N(μ_u, diag σ_u²)``, with ``μ_u ~ U(-3, 3)^d`` and
``σ_u ~ U(0.3, 1)^d``. Each continuous modality is ``x_m = f_m(z) + N(0, noise_std²)``, where
``f_m`` is a random leaky-ReLU MLP (slope 0.2, layers ``d -> hidden -> hidden -> D_m``, Gaussian
weights scaled by 1/sqrt(fan-in), non-decreasing widths so the map is injective almost surely).
The segment label ``u`` is a categorical modality (int64). The true latents ``z`` and the label
are kept in the batch extras (``"z"``, ``"label"``) for MCC.

* :class:`IdentifiableBimodal`: one continuous modality ``"x"`` and ``"label"``.
* :class:`IdentifiableMultimodal`: ``num_continuous`` continuous modalities ``"x0".."x{k-1}"``
  plus ``"label"`` (optional); each modality is missing independently with probability
  ``missing_prob`` (default 1/2), at least one modality kept per sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast.data.base import MultiModalData

_SPLITS = {"train": 0, "test": 1, "valid": 2}


def _mixing_mlp(d: int, hidden: int, out_dim: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    widths = [d, max(hidden, d), max(hidden, d), out_dim]
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        W = torch.randn(fan_out, fan_in, generator=gen, dtype=torch.float64) / fan_in ** 0.5
        b = 0.1 * torch.randn(fan_out, generator=gen, dtype=torch.float64)
        layers.append((W, b))
    return layers


def apply_mixing(layers: list[tuple[Tensor, Tensor]], z: Tensor, slope: float = 0.2) -> Tensor:
    """``f(z)``: the leaky-ReLU MLP ``layers`` applied to ``z [N, d]`` (no activation last)."""
    h = z
    for i, (W, b) in enumerate(layers):
        h = h @ W.T + b
        if i < len(layers) - 1:
            h = torch.nn.functional.leaky_relu(h, slope)
    return h


class _SegmentLatents:
    """Mixture parameters drawn once from the seed; the samples of each split drawn after."""

    def __init__(self, latent_dim: int, num_segments: int, gen: torch.Generator):
        self.means = 6.0 * torch.rand(num_segments, latent_dim, generator=gen, dtype=torch.float64) - 3.0
        self.stds = 0.3 + 0.7 * torch.rand(num_segments, latent_dim, generator=gen, dtype=torch.float64)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        label = torch.randint(0, self.means.shape[0], (n,), generator=gen)
        eps = torch.randn(n, self.means.shape[1], generator=gen, dtype=torch.float64)
        return self.means[label] + self.stds[label] * eps, label


class IdentifiableMultimodal(MultiModalData):
    """``num_continuous`` nonlinear views of mixture latents plus the segment label; about half
    of the modalities missing per sample.

    Args:
        num_samples, latent_dim (d), num_segments (C), num_continuous, obs_dim (``D_m``, an int
        or one per continuous modality), hidden (mixing MLP width), noise_std, with_label,
        missing_prob (0 = every modality observed), seed, split ("train" | "test" | "valid").

    Attributes: ``mixing`` (per modality: list of ``(W, b)``), ``segment_means``,
    ``segment_stds``, ``num_classes``, ``latent_dim``; batches carry ``"z"`` and ``"label"``.
    """

    def __init__(self, num_samples: int = 10000, latent_dim: int = 2, num_segments: int = 5,
                 num_continuous: int = 4, obs_dim=5, hidden: int = 32, noise_std: float = 0.1,
                 with_label: bool = True, missing_prob: float = 0.5, seed: int = 0,
                 split: str = "train", names: list[str] | None = None):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 0.0 <= missing_prob < 1.0:
            raise ValueError(f"missing_prob must be in [0, 1), got {missing_prob}")
        dims = [obs_dim] * num_continuous if isinstance(obs_dim, int) else list(obs_dim)
        if len(dims) != num_continuous:
            raise ValueError(f"obs_dim gives {len(dims)} sizes; expected {num_continuous}")
        names = names or [f"x{m}" for m in range(num_continuous)]
        gen = torch.Generator().manual_seed(seed)
        self.latents = _SegmentLatents(latent_dim, num_segments, gen)
        self.mixing = [_mixing_mlp(latent_dim, hidden, D, gen) for D in dims]
        self.segment_means, self.segment_stds = self.latents.means, self.latents.stds
        self.latent_dim, self.num_classes, self.noise_std = latent_dim, num_segments, noise_std
        self.obs_dims = dims

        sample_gen = torch.Generator().manual_seed(seed * 1009 + 7919 * (_SPLITS[split] + 1))
        z, label = self.latents.sample(num_samples, sample_gen)
        x = {}
        for name, layers in zip(names, self.mixing):
            clean = apply_mixing(layers, z)
            noise = torch.randn(clean.shape, generator=sample_gen, dtype=torch.float64)
            x[name] = (clean + noise_std * noise).to(torch.float32)
        if with_label:
            x["label"] = label.clone()
        M = len(x)
        observed = torch.rand(num_samples, M, generator=sample_gen) >= missing_prob
        # A sample with nothing observed carries no information: keep one modality at random.
        keep = torch.randint(0, M, (num_samples,), generator=sample_gen)
        empty = ~observed.any(-1)
        observed[empty, keep[empty]] = True
        for m, name in enumerate(x):
            x[name] = torch.where(observed[:, m].view(-1, *([1] * (x[name].dim() - 1))),
                                  x[name], torch.zeros_like(x[name]))
        super().__init__(x, observed, extras={"z": z.to(torch.float32), "label": label})


class IdentifiableBimodal(IdentifiableMultimodal):
    """One continuous modality ``"x"`` and the segment label ``"label"``, both always observed."""

    def __init__(self, num_samples: int = 10000, latent_dim: int = 2, num_segments: int = 5,
                 obs_dim: int = 5, hidden: int = 32, noise_std: float = 0.1, seed: int = 0,
                 split: str = "train"):
        super().__init__(num_samples=num_samples, latent_dim=latent_dim, num_segments=num_segments,
                         num_continuous=1, obs_dim=obs_dim, hidden=hidden, noise_std=noise_std,
                         with_label=True, missing_prob=0.0, seed=seed, split=split, names=["x"])
