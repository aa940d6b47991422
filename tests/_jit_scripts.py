"""Scripts that need Triton's real JIT functions rather than the interpreter (compiling for
sm_90 with the bundled ptxas, launching nothing): run in a fresh interpreter with
TRITON_INTERPRET unset, and skipped where the Triton build has no ptxas."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")


def run_jit_script(*args, timeout: int = 600, cwd: Path | None = None,
                   env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``python *args`` with TRITON_INTERPRET unset and the variables of ``env`` set (unset
    where None); output captured as text."""
    env = {k: v for k, v in {**os.environ, "TRITON_INTERPRET": None, **(env or {})}.items()
           if v is not None}
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
