"""kernels/_launch.py: the fast launch path reuses a compiled kernel only where Triton would, and
hands its launcher what Triton would. The comparison with Triton runs in a fresh interpreter
(tests/_launch_check.py, real JIT functions compiled for sm_90); the key's own properties are
checked here."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from mmfast.kernels import _launch  # noqa: E402
from mmfast.kernels._launch import FastLauncher, launch_key  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SCRIPT = Path(__file__).with_name("_launch_check.py")


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")
def test_fast_launches_match_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"launch check: (\d+) argument variants .*?, (\d+) fast-path launches "
                        r"compared with Triton's; 0 failure", out)
    assert summary and int(summary.group(1)) > 100 and int(summary.group(2)) >= 16, out[-3000:]


def _offset(dtype, elements):
    base = torch.empty(64, dtype=dtype)
    return base[elements:]


def test_key_separates_what_triton_specialises():
    x = torch.empty(8)
    assert launch_key(0, (x, 3), {}) == launch_key(0, (torch.empty(8), 3), {})
    assert launch_key(0, (x, 3), {}) != launch_key(1, (x, 3), {})            # device
    assert launch_key(0, (x,), {}) != launch_key(0, (x.double(),), {})       # dtype
    aligned = next(t for t in (_offset(torch.float32, i) for i in range(4))
                   if t.data_ptr() % 16 == 0)
    off = next(t for t in (_offset(torch.float32, i) for i in range(4)) if t.data_ptr() % 16)
    assert launch_key(0, (aligned,), {}) != launch_key(0, (off,), {})        # alignment
    for a, b in ((1, 2), (16, 17), (16, 32), (2 ** 31, 2 ** 31 + 16), (True, False)):
        assert launch_key(0, (a,), {}) != launch_key(0, (b,), {})
    assert launch_key(0, (None,), {}) != launch_key(0, (x,), {})
    assert launch_key(0, (1.0,), {}) == launch_key(0, (-2.5,), {})          # floats: fp32, unspecialised
    assert launch_key(0, (), {"BLOCK": 16}) != launch_key(0, (), {"BLOCK": 32})
    assert launch_key(0, (), {"num_warps": 4}) != launch_key(0, (), {"num_warps": 8})


def test_interpreted_kernels_take_tritons_path():
    """Under the interpreter (how this suite runs without a GPU) the wrapper hands every launch
    to Triton unchanged."""
    calls = []

    class Interpreted:                     # not a JITFunction, like the interpreter's kernels
        __name__ = "k"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    launcher = FastLauncher(Interpreted())
    launcher[(3,)](1, 2, BLOCK=4)
    launcher[(3,)](1, 2, BLOCK=4)
    assert calls == [((3,), (1, 2), {"BLOCK": 4})] * 2 and not launcher._known


def test_key_table_is_bounded(monkeypatch):
    monkeypatch.setattr(_launch, "MAX_KEYS", 3)
    launcher = FastLauncher.__new__(FastLauncher)
    launcher._known, launcher._names = {}, ["a", "B"]

    class Compiled:
        function = 1
    for i in range(7):
        launcher._remember((i,), Compiled(), 1)
        assert len(launcher._known) <= 3
    assert launcher._known[(6,)][1] == ("B",)
