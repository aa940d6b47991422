"""Modality subsets: enumeration, the training distribution ρ(S), and bitmask codes.

A subset is a bool mask over the M modalities (column m = modality m, in the order of the
model's modality dict). Bitmask codes put modality m at bit m, so ``all_subsets`` lists
subsets in increasing code order.
"""
from __future__ import annotations

import torch

MAX_MODALITIES_FOR_CODES = 63  # codes are int64


def all_subsets(num_modalities: int, include_empty: bool = False,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Every subset of ``num_modalities`` modalities, in bitmask order.

    Returns:
        bool ``[S, M]`` with ``S = 2^M - 1`` (``2^M`` with ``include_empty``); row i is the
        subset whose code is ``i + 1`` (``i`` with the empty set included).
    """
    if not isinstance(num_modalities, int) or num_modalities < 1:
        raise ValueError(f"all_subsets: num_modalities must be a positive int, got {num_modalities!r}")
    if num_modalities > 24:
        raise ValueError(f"all_subsets: 2^{num_modalities} subsets is too many to list; "
                         "sample them with sample_subsets or pass an explicit bank")
    start = 0 if include_empty else 1
    codes = torch.arange(start, 2 ** num_modalities, device=device)
    return decode(codes, num_modalities)


def encode(mask: torch.Tensor) -> torch.Tensor:
    """Bitmask codes of subsets: bool ``[..., M]`` (M <= 63) -> int64 ``[...]``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"encode: mask has dtype {mask.dtype}; expected torch.bool [..., M]")
    M = mask.shape[-1]
    if M > MAX_MODALITIES_FOR_CODES:
        raise ValueError(f"encode: mask has shape {list(mask.shape)}; at most "
                         f"{MAX_MODALITIES_FOR_CODES} modalities fit an int64 code")
    weights = torch.ones((), dtype=torch.int64, device=mask.device) << torch.arange(M, device=mask.device)
    return (mask.to(torch.int64) * weights).sum(dim=-1)


def decode(codes: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """Subsets from bitmask codes: int ``[...]`` -> bool ``[..., M]``."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"decode: codes has dtype {codes.dtype}; expected an integer dtype")
    if not 1 <= num_modalities <= MAX_MODALITIES_FOR_CODES:
        raise ValueError(f"decode: num_modalities must be in [1, {MAX_MODALITIES_FOR_CODES}], "
                         f"got {num_modalities}")
    bits = torch.arange(num_modalities, device=codes.device)
    return ((codes.to(torch.int64).unsqueeze(-1) >> bits) & 1).bool()


def sample_subsets(observed: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one subset per row from ρ(S) of METHOD.md.

    Each observed modality joins independently with probability 1/2, so S is uniform over all
    subsets of the row's observed modalities, the empty and the full set included.

    Args:
        observed: bool ``[B, M]``, which modalities each sample has.
        generator: optional ``torch.Generator`` on observed's device, for reproducible draws.
    Returns:
        bool ``[B, M]``, a subset of ``observed`` in every row.
    """
    if not isinstance(observed, torch.Tensor) or observed.dtype != torch.bool:
        raise TypeError("sample_subsets: observed must be a bool tensor [B, M]")
    if observed.dim() != 2:
        raise ValueError(f"sample_subsets: observed has shape {list(observed.shape)}; expected [B, M]")
    coins = torch.rand(observed.shape, generator=generator, device=observed.device) < 0.5
    return coins & observed
