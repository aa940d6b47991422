"""Input checks shared by the public ops: every message names the argument, its shape and
the shape expected, so a caller can see at once which tensor is wrong."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def tensor(op: str, name: str, value, *, ndim: int | Sequence[int] | None = None,
           min_ndim: int | None = None, floating: bool = True, expected: str = "") -> torch.Tensor:
    """Check that ``value`` is a tensor with an allowed rank and a supported float dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    hint = f" (expected {expected})" if expected else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(f"{op}: {name} has shape {_shape(value)}, rank {value.dim()}; "
                             f"expected rank {' or '.join(map(str, allowed))}{hint}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: {name} has shape {_shape(value)}; expected at least "
                         f"{min_ndim} dimensions{hint}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {value.dtype}; expected one of "
                        f"float16, bfloat16, float32, float64")
    return value


def mask(op: str, name: str, value, batch: int, modalities: int) -> torch.Tensor:
    """A subset mask: bool, ``[B, M]`` (one subset per row) or ``[B, S, M]`` (a bank)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a bool torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"{op}: {name} has dtype {value.dtype}; expected torch.bool "
                        f"(shape [B, M] or [B, S, M])")
    if value.dim() not in (2, 3) or value.shape[0] != batch or value.shape[-1] != modalities:
        raise ValueError(f"{op}: {name} has shape {_shape(value)}; expected [{batch}, {modalities}] "
                         f"or [{batch}, S, {modalities}]")
    return value


def same_shape(op: str, name: str, value: torch.Tensor, expected: Sequence[int],
               expected_str: str | None = None) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {_shape(value)}; expected "
                         f"{expected_str or list(expected)}")


def broadcastable(op: str, name: str, value: torch.Tensor, target: Sequence[int],
                  target_name: str) -> None:
    # Plain Python: torch.broadcast_shapes costs tens of microseconds a call on the host.
    shape, target = tuple(value.shape), tuple(target)
    ok = len(shape) <= len(target) and all(
        s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(f"{op}: {name} has shape {_shape(value)}; expected a shape that "
                         f"broadcasts to {target_name} {list(target)}")


def same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors are on different devices ({listing}); expected one device")


def same_dtype(op: str, **tensors) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: floating inputs have different dtypes ({listing}); expected one dtype")
