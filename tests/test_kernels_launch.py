"""kernels/_launch.py: the fast launch path reuses a compiled kernel only where Triton would, and
hands its launcher what Triton would. The comparison with Triton runs in a fresh interpreter
(tests/_launch_check.py, real JIT functions compiled for sm_90); the key's own properties are
checked here."""
import re
from pathlib import Path

import pytest
import torch

from _jit_scripts import needs_ptxas, run_jit_script

pytest.importorskip("triton")
from mmfast.kernels import _launch  # noqa: E402
from mmfast.kernels._launch import FastLauncher, launch_key  # noqa: E402

SCRIPT = Path(__file__).with_name("_launch_check.py")


@needs_ptxas
def test_fast_launches_match_triton():
    proc = run_jit_script(SCRIPT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"launch check: (\d+) argument variants .*?, (\d+) fast-path launches "
                        r"compared with Triton's; 0 failure", out)
    assert summary and int(summary.group(1)) > 150 and int(summary.group(2)) >= 30, out[-3000:]


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
    for a, b in ((1, 2), (16, 17), (16, 32), (2 ** 31, 2 ** 31 + 16), (True, False), (True, 1),
                 (False, 0)):
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


class _Compiled:
    function = 1


class _Jit:
    """What FastLauncher reads of a JITFunction: its per-device caches."""
    device_caches = {0: ({}, {}, None, None, None)}


def _bare_launcher(names=("a", "B"), first_constexpr=1):
    launcher = FastLauncher.__new__(FastLauncher)
    launcher.fn, launcher._known = _Jit(), {}
    launcher._names, launcher._first_constexpr = list(names), first_constexpr
    return launcher


def test_key_table_is_bounded_oldest_first(monkeypatch):
    monkeypatch.setattr(_launch, "MAX_KEYS", 3)
    launcher = _bare_launcher()
    for i in range(7):
        launcher._remember((i,), _Compiled(), (1,), {"B": 2}, 0)
        assert len(launcher._known) <= 3
    assert list(launcher._known) == [(4,), (5,), (6,)]
    assert launcher._known[(6,)][1] == ("B",)


def test_calls_outside_the_key_are_not_remembered():
    """A tensor passed by keyword, or a constexpr passed positionally, is not keyed the way
    Triton keys it: such calls keep Triton's path."""
    launcher = _bare_launcher()
    launcher._remember((0,), _Compiled(), (1,), {"B": torch.empty(2)}, 0)
    launcher._remember((1,), _Compiled(), (1, 2), {}, 0)
    launcher._remember((2,), None, (1,), {"B": 2}, 0)       # nothing launched (compile only)
    assert not launcher._known
