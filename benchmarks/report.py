"""Render a pytest-benchmark JSON of this suite as Markdown tables, with the issues' targets.

    python benchmarks/report.py benchmarks/results/<device>.json              # print
    python benchmarks/report.py benchmarks/results/<device>.json --readme README.md
    python benchmarks/report.py run1.json run2.json ...                      # several, merged

With ``--readme`` the text between the ``<!-- benchmarks:start -->`` and
``<!-- benchmarks:end -->`` markers of the README is replaced (the rest is kept byte for byte).

Every figure comes from the JSON: the mean time of each provider per benchmark group (one
group = one op, shape and mode), mmfast's speed-up over each baseline (baseline time / mmfast
time), and mmfast's achieved bandwidth as a fraction of the measured device copy
(``extra_info.copy_ratio``, written by ``benchmarks/conftest.py``). A target whose cases were
not run (no GPU, so no ``mmfast`` provider) is reported as not measured, never as met.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
BASELINES = ("eager", "compile", "sdpa")
PROVIDER_ORDER = BASELINES + ("mmfast",)


@dataclass(frozen=True)
class Target:
    """A target of an issue, judged on every benchmark group whose name matches ``pattern``
    (the worst matching group decides).

    ``metric``: ``"speedup"`` (the best of ``baselines`` over mmfast's time) or
    ``"copy_ratio"`` (mmfast's bandwidth over the measured copy)."""
    issue: int
    text: str
    pattern: str
    metric: str
    threshold: float
    baselines: tuple[str, ...] = ()


BANK_8 = r"all-subsets B=4096 M=8 S=255"
TARGETS = (
    Target(4, "subset_sum_pool fwd+bwd, 255-subset bank, D=512: ≥3x eager",
           rf"^subset_sum_pool {BANK_8} D=512 forward\+backward$", "speedup", 3.0, ("eager",)),
    Target(4, "subset_sum_pool fwd+bwd, 255-subset bank, D=512: ≥1.5x compile",
           rf"^subset_sum_pool {BANK_8} D=512 forward\+backward$", "speedup", 1.5, ("compile",)),
    Target(4, "gaussian_poe fwd+bwd, 255-subset bank, d=512: ≥3x eager",
           rf"^gaussian_poe {BANK_8} d=512 forward\+backward$", "speedup", 3.0, ("eager",)),
    Target(4, "gaussian_poe fwd+bwd, 255-subset bank, d=512: ≥1.5x compile",
           rf"^gaussian_poe {BANK_8} d=512 forward\+backward$", "speedup", 1.5, ("compile",)),
    Target(4, "subset_sum_pool per-sample B=4096 M=8 D=512: ≥70% of copy bandwidth (each mode)",
           r"^subset_sum_pool per-sample B=4096 M=8 S=1 D=512 ", "copy_ratio", 0.7),
    Target(4, "gaussian_poe per-sample B=4096 M=8 d=512: ≥70% of copy bandwidth (each mode)",
           r"^gaussian_poe per-sample B=4096 M=8 S=1 d=512 ", "copy_ratio", 0.7),
    Target(5, "subset_attention fwd+bwd, 255-subset bank, E=256: ≥3x best of eager/compile/SDPA",
           rf"^subset_attention {BANK_8} E=256 H=\d+ float32 forward\+backward$", "speedup", 3.0,
           BASELINES),
    Target(5, "subset_attention per-sample masks: no slower than the best baseline (every case)",
           r"^subset_attention per-sample .* float32 ", "speedup", 1.0, BASELINES),
    Target(6, "gaussian_terms fwd+bwd: ≥2x compile (every case)",
           r"^gaussian_terms .* forward\+backward$", "speedup", 2.0, ("compile",)),
    Target(6, "likelihood reductions: ≥80% of copy bandwidth (every case and mode)",
           r"^(bernoulli|categorical|normal|laplace)_log_prob ", "copy_ratio", 0.8),
)


@dataclass
class Group:
    name: str
    times: dict[str, float]           # provider -> mean seconds
    info: dict[str, dict]             # provider -> extra_info

    def speedup(self, baselines: tuple[str, ...]) -> float | None:
        """Best (fastest) of ``baselines`` over mmfast's time; None if either is missing."""
        base = [self.times[b] for b in baselines if b in self.times]
        if "mmfast" not in self.times or not base:
            return None
        return min(base) / self.times["mmfast"]

    def copy_ratio(self) -> float | None:
        return self.info.get("mmfast", {}).get("copy_ratio")

    def device_copy_ratio(self) -> float | None:
        """mmfast's bandwidth over the copy's, from its kernels' own time (CUDA profiler)."""
        return self.info.get("mmfast", {}).get("device_copy_ratio")


def load_groups(data: dict) -> list[Group]:
    """Benchmarks of a pytest-benchmark JSON, grouped; the provider comes from extra_info."""
    groups: dict[str, Group] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        provider = info.get("provider")
        stats = bench.get("stats") or {}
        if provider is None or "mean" not in stats:
            continue
        name = bench.get("group") or bench.get("name")
        group = groups.setdefault(name, Group(name, {}, {}))
        if provider in group.times:
            raise ValueError(f"benchmark group {name!r} has two results for provider {provider!r}")
        group.times[provider] = float(stats["mean"])
        group.info[provider] = info
    return list(groups.values())


def judge(target: Target, groups: list[Group]) -> tuple[str, str]:
    """(verdict, measured text) of one target over the matching groups."""
    rx = re.compile(target.pattern)
    matching = [g for g in groups if rx.search(g.name)]
    values = []
    for g in matching:
        v = g.speedup(target.baselines) if target.metric == "speedup" else g.copy_ratio()
        if v is not None:
            values.append((v, g.name))
    if not values:
        return "not measured", "—"
    worst, where = min(values)
    verdict = "met" if worst >= target.threshold else "not met"
    shown = f"{worst:.2f}x" if target.metric == "speedup" else f"{100 * worst:.0f}%"
    if len(values) > 1:
        shown += f" (worst of {len(values)}: {where})"
    if target.metric == "copy_ratio":
        kernels = [g.device_copy_ratio() for g in matching]
        if kernels and None not in kernels:
            shown += f"; kernels alone (CUDA profiler): worst {100 * min(kernels):.0f}%"
    return verdict, shown


def _fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def group_table(groups: list[Group]) -> list[str]:
    providers = [p for p in PROVIDER_ORDER if any(p in g.times for g in groups)]
    baselines = [p for p in providers if p in BASELINES]
    has_mmfast = "mmfast" in providers
    head = ["case"] + [f"{p} (µs)" for p in providers]
    if has_mmfast:
        head += [f"vs {b}" for b in baselines] + ["mmfast GB/s", "% of copy",
                                                  "kernels µs", "kernels % of copy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        row = [g.name.split(" ", 1)[-1]] + [_fmt_time(g.times[p]) if p in g.times else "—" for p in providers]
        if has_mmfast:
            for b in baselines:
                s = g.speedup((b,))
                row.append("—" if s is None else f"{s:.2f}x")
            info = g.info.get("mmfast", {})
            row.append(f"{info['achieved_gbs']:.0f}" if "achieved_gbs" in info else "—")
            ratio = g.copy_ratio()
            row.append("—" if ratio is None else f"{100 * ratio:.0f}%")
            row.append(_fmt_time(info["device_us"] * 1e-6) if "device_us" in info else "—")
            ratio = g.device_copy_ratio()
            row.append("—" if ratio is None else f"{100 * ratio:.0f}%")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(data: dict, source: str = "") -> str:
    groups = load_groups(data)
    if not groups:
        raise ValueError("no benchmark results with a provider in extra_info: is this a JSON "
                         "written by `make bench`?")
    devices = sorted({i.get("device", "?") for g in groups for i in g.info.values()})
    copy = sorted({i["copy_gbs"] for g in groups for i in g.info.values() if "copy_gbs" in i})
    when = data.get("datetime", "")[:19].replace("T", " ")
    out = [f"Device: {', '.join(devices)}" + (f"; run {when}" if when else "")
           + (f"; measured copy bandwidth {copy[0]:.0f} GB/s" if len(copy) == 1 else "")
           + (f"; source `{source}`" if source else "") + ".",
           "Times are wall-clock means per call over the timed rounds (warm-up excluded), "
           "host overhead included; a speed-up is the baseline's time over mmfast's. "
           "\"kernels\" columns: mmfast's GPU time per call from the CUDA profiler (the sum "
           "of its kernels' durations, host overhead and idle gaps left out).", "",
           "| issue | target | measured | verdict |", "|---|---|---|---|"]
    for t in TARGETS:
        verdict, shown = judge(t, groups)
        out.append(f"| #{t.issue} | {t.text} | {shown} | {verdict} |")
    families: dict[str, list[Group]] = {}
    for g in sorted(groups, key=lambda g: g.name):
        families.setdefault(g.name.split(" ")[0], []).append(g)
    for family, members in families.items():
        out += ["", f"**{family}**", ""] + group_table(members)
    return "\n".join(out) + "\n"


def merge(runs: list[dict]) -> dict:
    """One pytest-benchmark document holding the benchmarks of several runs (the earliest
    run's date is kept)."""
    if len(runs) == 1:
        return runs[0]
    dates = sorted(r.get("datetime", "") for r in runs if r.get("datetime"))
    return {"datetime": dates[0] if dates else "",
            "benchmarks": [b for r in runs for b in r.get("benchmarks", [])]}


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers replaced by ``section``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected exactly one {START} ... {END} section")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{section}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="pytest-benchmark JSON file(s) (make bench), rendered together")
    parser.add_argument("--readme", type=Path, help="update this file's benchmarks section")
    args = parser.parse_args(argv)
    try:
        data = merge([json.loads(p.read_text()) for p in args.json])
        section = render(data, source=", ".join(p.as_posix() for p in args.json))
        if args.readme is None:
            sys.stdout.write(section)
            return 0
        text = args.readme.read_text()
        new = replace_section(text, section)
        tmp = args.readme.with_name(args.readme.name + ".tmp")
        tmp.write_text(new)
        tmp.replace(args.readme)
    except (OSError, ValueError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(f"updated {args.readme} from {', '.join(map(str, args.json))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
