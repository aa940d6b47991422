"""A modality of a multi-modal VAE: its encoder, its decoder and its likelihood p(x_m | z)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmfast import ops

__all__ = ["Modality", "LIKELIHOODS"]

LIKELIHOODS = ("normal", "laplace", "bernoulli", "categorical")


class Modality(nn.Module):
    """Encoder, decoder and observation model of one modality.

    Args:
        encoder: ``x_m [B, ...] -> h_m [B, E]``.
        decoder: ``z [N, d] ->`` loc ``[N, *event]`` (normal, laplace with a fixed or learned
            scale), ``(loc, log_scale)`` (normal, laplace with ``scale=None``), logits
            ``[N, *event]`` (bernoulli) or logits ``[N, *event, C]`` (categorical).
        likelihood: ``"normal"``, ``"laplace"``, ``"bernoulli"`` or ``"categorical"``.
        scale: normal / laplace only. A positive float: a fixed scale, used as is. ``"learned"``:
            a learned per-dimension log-scale, ``scale = min_scale + exp(log_scale)``, of shape
            ``event_shape``. None: the decoder returns ``(loc, log_scale)`` and
            ``scale = min_scale + exp(log_scale)``.
        min_scale: floor added to learned or decoded scales.
        event_shape: shape of one data point, needed with ``scale="learned"`` unless the
            decoder has an ``event_shape`` attribute (mmfast's decoders do).

    Data: normal / laplace / bernoulli take float ``[B, *event]`` (bernoulli in [0, 1]);
    categorical takes int64 class indices ``[B, *event]`` or one-hot floats ``[B, *event, C]``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: str, scale=None,
                 min_scale: float = 1e-3, event_shape=None):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"Modality: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.min_scale = float(min_scale)
        if not self.min_scale >= 0.0:
            raise ValueError(f"Modality: min_scale must be >= 0, got {min_scale!r}")
        self.fixed_scale: float | None = None
        self.log_scale: nn.Parameter | None = None
        self.scale_mode = "decoded"
        if likelihood in ("bernoulli", "categorical"):
            if scale is not None:
                raise ValueError(f"Modality: a {likelihood} likelihood has no scale; got scale={scale!r}")
            self.scale_mode = "none"
        elif isinstance(scale, str):
            if scale != "learned":
                raise ValueError(f"Modality: scale must be a float, 'learned' or None, got {scale!r}")
            shape = event_shape if event_shape is not None else getattr(decoder, "event_shape", None)
            if shape is None:
                raise ValueError("Modality: scale='learned' needs event_shape (the decoder has no "
                                 "event_shape attribute)")
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            self.log_scale = nn.Parameter(torch.zeros(shape))
            self.scale_mode = "learned"
        elif scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
                raise ValueError(f"Modality: a fixed scale must be a positive float, got {scale!r}")
            self.fixed_scale = float(scale)
            self.scale_mode = "fixed"

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor):
        """Decoder output for latents ``z [..., d]`` (leading axes flattened for the decoder and
        restored): a tensor, or ``(loc, log_scale)`` for ``scale=None``."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, z.shape[-1]))
        restore = (lambda t: t.reshape(*lead, *t.shape[1:]))
        if isinstance(out, (tuple, list)):
            if self.scale_mode != "decoded":
                raise ValueError(f"Modality: the decoder returned a pair but scale is {self.scale_mode}")
            return tuple(restore(t) for t in out)
        if self.scale_mode == "decoded":
            raise ValueError("Modality: scale=None needs a decoder that returns (loc, log_scale)")
        return restore(out)

    def _location_scale(self, out) -> tuple[Tensor, Tensor, float]:
        if self.scale_mode == "decoded":
            loc, log_scale = out
            return loc, log_scale.to(loc.dtype), self.min_scale
        loc = out
        if self.scale_mode == "learned":
            return loc, self.log_scale.to(loc.dtype), self.min_scale
        log_scale = torch.full((), math.log(self.fixed_scale), dtype=loc.dtype, device=loc.device)
        return loc, log_scale, 0.0

    def target(self, x: Tensor) -> Tensor:
        """The data as the likelihood op wants it (class indices for categorical)."""
        if self.likelihood == "categorical" and x.is_floating_point():
            return x.argmax(dim=-1)
        return x

    def log_prob(self, z: Tensor, x: Tensor) -> Tensor:
        """``log p(x | z)`` summed over the event: z ``[K, n, d]``, x ``[n, *event]`` ->
        ``[K, n]`` (float32, float64 for float64 decoders)."""
        out = self.decode(z)
        if self.likelihood == "bernoulli":
            return ops.bernoulli_log_prob(out, x.to(out.dtype))
        if self.likelihood == "categorical":
            return ops.categorical_log_prob(out, self.target(x).long())
        loc, log_scale, min_scale = self._location_scale(out)
        fn = ops.normal_log_prob if self.likelihood == "normal" else ops.laplace_log_prob
        return fn(loc, log_scale, x.to(loc.dtype), min_scale)

    def mean(self, z: Tensor) -> Tensor:
        """Mean of p(x | z) for z ``[N, d]``: locations, Bernoulli probabilities, or class
        probabilities ``[N, *event, C]``."""
        out = self.decode(z)
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out)
        if self.likelihood == "categorical":
            return torch.softmax(out, dim=-1)
        return out[0] if isinstance(out, tuple) else out

    def extra_repr(self) -> str:
        scale = {"fixed": f"scale={self.fixed_scale}", "learned": "scale='learned'",
                 "decoded": "scale=decoded", "none": ""}[self.scale_mode]
        return f"likelihood={self.likelihood!r}" + (f", {scale}" if scale else "")
