"""Backend selection: ``reference`` (plain PyTorch) or ``triton`` (fused kernels).

The choice comes from, in order: the innermost active :func:`use_backend`, else the
``MMFAST_BACKEND`` environment variable (read on every call), else ``auto``.

``auto`` uses the Triton kernel of an op when one exists and can run on the tensors' device:
CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before mmfast was imported
(Triton reads it when kernels are decorated). Otherwise it uses the reference. Asking for
``triton`` explicitly never falls back: a missing kernel raises ``NotImplementedError`` naming
the op, and a device Triton cannot run on raises ``RuntimeError``. A kernel that fails is never
hidden by ``auto`` either: its error propagates.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")

# TRITON_INTERPRET only takes effect if set before the kernels are decorated, i.e. before
# mmfast (and so mmfast.kernels) is imported: capture it once.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"
_stack: list[str] = []


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown mmfast backend {name!r}; expected one of {BACKENDS}")
    return name


def current_backend() -> str:
    """The backend name in force now: ``auto``, ``triton`` or ``reference``."""
    if _stack:
        return _stack[-1]
    env = os.environ.get("MMFAST_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"MMFAST_BACKEND={env!r} is not one of {BACKENDS}")
    return env


class use_backend:
    """Select a backend: ``mmfast.use_backend("reference")`` sets it for the rest of the
    process; ``with mmfast.use_backend("triton"): ...`` sets it for the block only."""

    def __init__(self, name: str):
        self.name = _check_name(name)
        self._depth = len(_stack)
        _stack.append(self.name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        del _stack[self._depth:]

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET_AT_IMPORT


def triton_can_run(device: torch.device) -> bool:
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _INTERPRET_AT_IMPORT


def _find_kernel(op: str, module: str) -> ModuleType | None:
    """``mmfast.kernels.<module>`` if it exists and defines ``<op>_forward``, else None.
    Import errors of an existing module propagate: ``auto`` never hides a broken kernel."""
    name = f"mmfast.kernels.{module}"
    loaded = sys.modules.get(name)   # after the first call: skips the import system's lookups
    if loaded is not None:
        return loaded if hasattr(loaded, f"{op}_forward") else None
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:
        return None
    kernel = importlib.import_module(name)
    return kernel if hasattr(kernel, f"{op}_forward") else None


def select_kernel(op: str, module: str, device: torch.device) -> ModuleType | None:
    """The kernel module to run ``op`` with, or ``None`` for the reference.

    A kernel module ``mmfast.kernels.<module>`` serves ``op`` by defining ``<op>_forward`` and
    ``<op>_backward``. Raises when ``triton`` is forced but cannot serve the op on ``device``.
    """
    name = current_backend()
    if name == "reference":
        return None
    if name == "auto":
        return _find_kernel(op, module) if triton_can_run(device) else None
    if not triton_can_run(device):
        why = "Triton is not installed" if not triton_installed() else (
            "CPU tensors need TRITON_INTERPRET=1 set before mmfast is imported"
            if device.type == "cpu" else f"Triton cannot run on {device.type} tensors"
        )
        raise RuntimeError(f"mmfast.ops.{op}: backend 'triton' was forced but {why}")
    kernel = _find_kernel(op, module)
    if kernel is None:
        raise NotImplementedError(
            f"mmfast.ops.{op}: no Triton kernel exists yet; use the 'reference' or 'auto' backend"
        )
    return kernel
