"""Inferred latents for identifiability: posterior means given every observed modality."""
from __future__ import annotations

import torch

from mmfast.data.base import iterate_batches


@torch.no_grad()
def inferred_latents(posterior_fn, data, batch_size: int = 500, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_true [N, d], E[z | x_observed] [N, d'])`` over ``data`` (which must carry ``"z"``);
    ``posterior_fn(x, mask)`` gives ``q(z|x_S)`` with a ``mean``."""
    truth, inferred = [], []
    for batch in iterate_batches(data, batch_size, device):
        q = posterior_fn(batch["x"], batch["observed"])
        inferred.append(q.mean.detach().float().cpu())
        truth.append(batch["z"].float().cpu())
    return torch.cat(truth), torch.cat(inferred)
