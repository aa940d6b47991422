"""benchmarks/host_overhead.py runs (kernels compiled for sm_90, launches stubbed) and prints a
row per op asked for, so the host-time measurement cannot rot. Its figures are not checked:
speed is a benchmark figure, never a test assertion."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")
def test_host_overhead_script_runs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"),
                          "--calls", "2", "--ops", "sum_pool,categorical"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = re.findall(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", run.stdout, re.M)
    assert [r[0] for r in rows] == ["subset_sum_pool", "categorical_log_prob"], run.stdout
