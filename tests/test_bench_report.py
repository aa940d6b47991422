"""benchmarks/report.py: speed-ups, bandwidth fractions and target verdicts come out of the
benchmark JSON as computed by hand here; the README section is replaced and nothing else."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
spec = importlib.util.spec_from_file_location("bench_report", PATH)
report = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = report   # dataclasses look their module up while the file executes
spec.loader.exec_module(report)

POOL = "subset_sum_pool all-subsets B=4096 M=8 S=255 D=512 forward+backward"
ATTN = "subset_attention per-sample B={B} M=8 S=1 E=128 H=4 float32 forward"


def bench(group, provider, mean, **info):
    return {"group": group, "name": f"test[{provider}]", "stats": {"mean": mean},
            "extra_info": {"provider": provider, "device": "NVIDIA H100", "copy_gbs": 3000.0,
                           **info}}


def data():
    return {"datetime": "2026-11-24T12:00:00", "benchmarks": [
        bench(POOL, "eager", 8e-3), bench(POOL, "compile", 3e-3),
        bench(POOL, "mmfast", 2e-3, achieved_gbs=2100.0, copy_ratio=0.7, device_us=1750.0,
              device_copy_ratio=0.8),
        # attention per-sample: faster than the best baseline at B=256, slower at B=4096
        bench(ATTN.format(B=256), "eager", 4e-4), bench(ATTN.format(B=256), "sdpa", 1e-4),
        bench(ATTN.format(B=256), "mmfast", 5e-5),
        bench(ATTN.format(B=4096), "compile", 1e-3), bench(ATTN.format(B=4096), "sdpa", 9e-4),
        bench(ATTN.format(B=4096), "mmfast", 1.2e-3),
        {"group": "unrelated", "name": "no provider", "stats": {"mean": 1.0}, "extra_info": {}},
    ]}


def target(text_start):
    return next(t for t in report.TARGETS if t.text.startswith(text_start))


def test_speedups_and_verdicts():
    groups = report.load_groups(data())
    pool = next(g for g in groups if g.name == POOL)
    assert pool.speedup(("eager",)) == pytest.approx(4.0)
    assert pool.speedup(("compile",)) == pytest.approx(1.5)
    assert pool.speedup(("eager", "compile")) == pytest.approx(1.5)   # the best baseline
    assert report.judge(target("subset_sum_pool fwd+bwd, 255-subset bank, D=512: ≥3x eager"),
                        groups) == ("met", "4.00x")
    assert report.judge(target("subset_sum_pool fwd+bwd, 255-subset bank, D=512: ≥1.5x compile"),
                        groups)[0] == "met"
    # per-sample attention: the worst case (B=4096, 0.9 / 1.2) decides
    verdict, shown = report.judge(target("subset_attention per-sample"), groups)
    assert verdict == "not met" and shown.startswith("0.75x (worst of 2: ")
    assert "B=4096" in shown
    # no mmfast result for these: not measured, never met
    assert report.judge(target("gaussian_terms"), groups) == ("not measured", "—")
    assert report.judge(target("likelihood reductions"), groups) == ("not measured", "—")


def test_render_lists_targets_and_tables():
    text = report.render(data())
    assert "Device: NVIDIA H100; run 2026-11-24 12:00:00; measured copy bandwidth 3000 GB/s" in text
    assert "| #4 | subset_sum_pool fwd+bwd, 255-subset bank, D=512: ≥3x eager | 4.00x | met |" in text
    row = next(line for line in text.splitlines() if line.startswith("| all-subsets B=4096"))
    # eager 8 ms, compile 3 ms, mmfast 2 ms: 4x and 1.5x, 2100 GB/s, 70 % of copy; the
    # kernels alone 1.75 ms, 80 % of copy
    assert row.split(" | ")[1:] == ["8,000", "3,000", "2,000", "4.00x", "1.50x", "2100", "70%",
                                    "1,750", "80% |"]


def test_copy_ratio_targets_show_the_kernels_figure_beside_the_wall_clock():
    pool = report.Target(4, "t", r"^subset_sum_pool ", "copy_ratio", 0.75)
    assert report.judge(pool, report.load_groups(data())) == (
        "not met", "70%; kernels alone (CUDA profiler): worst 80%")


def test_several_runs_are_merged(tmp_path):
    first, second = data(), data()
    first["benchmarks"] = first["benchmarks"][:3]            # the pool group
    second["benchmarks"] = second["benchmarks"][3:]          # the attention groups
    second["datetime"] = "2026-11-25T08:00:00"
    paths = []
    for i, run in enumerate((first, second)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    merged = report.merge([first, second])
    assert merged["datetime"] == "2026-11-24T12:00:00"
    assert report.render(merged) == report.render(data())
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    assert report.main([*map(str, paths), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert report.render(data()).split("\n", 1)[1] in text       # all but the source line
    assert f"source `{paths[0]}, {paths[1]}`" in text


def test_readme_section_replaced_and_the_rest_kept(tmp_path):
    json_path = tmp_path / "gpu.json"
    json_path.write_text(json.dumps(data()))
    readme = tmp_path / "README.md"
    before, after = "# title\n\ntext before\n", "\ntext after\n"
    readme.write_text(f"{before}{report.START}\nold table\n{report.END}{after}")
    assert report.main([str(json_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before + report.START + "\nDevice: NVIDIA H100")
    assert text.endswith(report.END + after) and "old table" not in text


def test_errors_are_clear_and_change_nothing(tmp_path, capsys):
    json_path = tmp_path / "gpu.json"
    json_path.write_text(json.dumps(data()))
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert report.main([str(json_path), "--readme", str(readme)]) == 2
    assert "expected exactly one" in capsys.readouterr().err
    assert readme.read_text() == "no markers here\n"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(empty)]) == 2
    assert "no benchmark results" in capsys.readouterr().err
    twice = data()
    twice["benchmarks"].append(bench(POOL, "eager", 1.0))
    with pytest.raises(ValueError, match="two results for provider 'eager'"):
        report.load_groups(twice)
