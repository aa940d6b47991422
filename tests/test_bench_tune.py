"""benchmarks/tune.py's dry run: every tile configuration of every sweep launches under the
interpreter and matches the shipped heuristic's outputs, so the GPU sweep cannot rot (a wrong
configuration would fail there, costing device time)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_every_configuration(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune.py"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "tune.json").read_text())
    cases = {r["case"].split(",")[0] for r in rows}
    assert cases == {"subset_pool backward", "subset_pool forward", "gaussian_poe forward",
                     "gaussian_poe backward", "subset_attention forward (small kernel)",
                     "subset_attention backward (small kernel)",
                     "gaussian_terms forward+backward (4 kernels)"}
    assert all("error" not in r and r["max_rel_diff"] < 1e-5 for r in rows), rows
    # Each sweep starts from the shipped heuristic and tries at least three others.
    for case in {r["case"] for r in rows}:
        configs = [r["config"] for r in rows if r["case"] == case]
        assert configs[0] == "shipped" and len(set(configs)) >= 4
    assert "| config | kernel µs |" in (tmp_path / "tune.md").read_text()
