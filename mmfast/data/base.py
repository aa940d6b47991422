"""The data protocol the trainer and the evaluators read: batches gathered by index.

A multi-modal data set is a ``torch.utils.data.Dataset`` that also gathers whole batches with
one indexing operation (``batch(index)``), which is what the trainer calls: a per-item Python
loop plus collation would dominate the step time of the small simulation models.

A batch is a dict::

    {"x": {name: tensor [B, ...] for each modality, in the model's modality order},
     "observed": bool [B, M],
     ...extras, e.g. "z" (true latents [B, d]) or "label" (int64 [B])}

Values of unobserved modalities are stored as zeros (their content is never meaningful).
"""
from __future__ import annotations

import torch
from torch import Tensor


class MultiModalDataset(torch.utils.data.Dataset):
    """What every mmfast data set provides: ``modality_names``, ``len`` and ``batch(index)``."""

    modality_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, index: Tensor) -> dict:
        """Gather the rows ``index`` (int64 ``[B]``) into a batch dict (see the module doc)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        b = self.batch(torch.tensor([int(i)]))
        return {"x": {k: v[0] for k, v in b["x"].items()},
                **{k: v[0] for k, v in b.items() if k != "x"}}


class MultiModalData(MultiModalDataset):
    """In-memory multi-modal data: modality tensors, the observed mask, and extra tensors.

    Args:
        x: dict name -> tensor ``[N, ...]``; its order is the modality order.
        observed: bool ``[N, M]`` or None (every modality observed).
        extras: dict name -> tensor ``[N, ...]`` carried along in batches (true latents, labels).
    """

    def __init__(self, x: dict[str, Tensor], observed: Tensor | None = None,
                 extras: dict[str, Tensor] | None = None):
        if not x:
            raise ValueError("MultiModalData: x must name at least one modality")
        sizes = {name: t.shape[0] for name, t in x.items()}
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()):
            raise ValueError(f"MultiModalData: modalities have different lengths {sizes}")
        M = len(x)
        if observed is None:
            observed = torch.ones(n, M, dtype=torch.bool)
        if observed.dtype != torch.bool or tuple(observed.shape) != (n, M):
            raise ValueError(f"MultiModalData: observed has shape {list(observed.shape)} and dtype "
                             f"{observed.dtype}; expected bool [{n}, {M}]")
        self.x = dict(x)
        self.observed = observed
        self.extras = dict(extras or {})
        for name, t in self.extras.items():
            if t.shape[0] != n:
                raise ValueError(f"MultiModalData: extra {name!r} has {t.shape[0]} rows; expected {n}")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(self.x)

    def __len__(self) -> int:
        return self.observed.shape[0]

    def batch(self, index: Tensor) -> dict:
        """Gather the rows ``index`` (int64 ``[B]``) into a batch dict (see the module doc)."""
        out = {"x": {name: t[index] for name, t in self.x.items()},
               "observed": self.observed[index]}
        for name, t in self.extras.items():
            out[name] = t[index]
        return out


def batch_to(batch: dict, device: torch.device | str) -> dict:
    """Move every tensor of a batch dict (nested one level for ``x``) to ``device``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        elif isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def iterate_batches(data, batch_size: int, device: torch.device | str = "cpu"):
    """Yield consecutive batches of ``data`` in order (for evaluation)."""
    n = len(data)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        yield batch_to(data.batch(index), device)
