"""benchmarks/host_overhead.py runs (kernels compiled for sm_90, launches stubbed; on a GPU also
for real with --cuda) and prints a row per op asked for, so the host-time measurement cannot
rot. Its figures are not checked: speed is a benchmark figure, never a test assertion."""
import re
from pathlib import Path

import pytest

from _jit_scripts import needs_ptxas, run_jit_script

ROOT = Path(__file__).resolve().parents[1]


@needs_ptxas
def test_host_overhead_script_runs():
    # Without TRITON_DEFAULT_FP_FUSION, Triton 3.9 warns at every compile that leaves FMA
    # contraction to its default; mmfast's launches choose it (kernels/_launch.py).
    run = run_jit_script(ROOT / "benchmarks" / "host_overhead.py", "--calls", "2",
                         "--ops", "sum_pool,categorical", cwd=ROOT,
                         env={"TRITON_DEFAULT_FP_FUSION": None})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "TRITON_DEFAULT_FP_FUSION is unset" not in run.stderr, run.stderr[-2000:]
    rows = re.findall(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", run.stdout, re.M)
    assert [r[0] for r in rows] == ["subset_sum_pool", "categorical_log_prob"], run.stdout


@pytest.mark.cuda
def test_host_overhead_script_runs_on_cuda():
    run = run_jit_script(ROOT / "benchmarks" / "host_overhead.py", "--cuda", "--calls", "2",
                         "--ops", "sum_pool,terms", cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = re.findall(r"^(\w+)[ (a-z)]*\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", run.stdout,
                      re.M)
    assert [r[0] for r in rows] == ["subset_sum_pool", "gaussian_terms"], run.stdout
