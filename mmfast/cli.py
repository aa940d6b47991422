"""The ``mmfast`` command line: ``train``, ``eval``, ``sweep`` and ``demo``.

Configs are TOML files (``configs/`` has the paper-scale ones); every option is also a flag,
``--<table>.<option>`` (``mmfast train --help`` lists them). Runs live in folders that can be
resumed: run the same command again after an interruption.

``mmfast demo`` is the README's main job: on the built-in LinearGaussian problem it trains
SumPooling, SelfAttention, PoE and MoE with the masked and the mixture objective and prints the
table of relative LLH gaps and posterior KLs (a plot too, when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The demo: M = 5 modalities of 30-59 dims, private 5-dim blocks and a shared 5-dim block (d = 30).
DEMO_CONFIG = {
    "name": "demo", "run_dir": "runs/demo",
    "data": {"name": "linear_gaussian", "num_samples": 2000, "test_samples": 500,
             "num_modalities": 5, "private_dim": 5, "shared_dim": 5, "seed": 0},
    "model": {"feature_dim": 64, "encoder_hidden": [128]},
    "train": {"epochs": 60, "batch_size": 250, "lr": 2e-3, "log_every": 8, "eval_every": 0,
              "checkpoint_every": 10},
    "eval": {"num_samples": 0, "batch_size": 500},
}
DEMO_QUICK = {"data": {"num_samples": 200, "test_samples": 100},
              "train": {"epochs": 2, "batch_size": 100, "log_every": 1}}
DEMO_AGGREGATORS = ["sumpooling", "selfattention", "poe", "moe"]
OBJECTIVES = ["masked", "mixture"]


def _cmd_train(args) -> int:
    from mmfast.train.config import config_from_args
    from mmfast.train.experiment import run

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    results = run(cfg, progress=not args.quiet, max_steps=args.max_steps)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if results:
        _print_results(cfg.name, results, time.perf_counter() - t0)
    else:
        print(f"{cfg.name}: stopped early and checkpointed in {cfg.run_dir}; "
              f"run the same command again to continue")
    return 0


def _cmd_eval(args) -> int:
    from mmfast.train.config import config_from_args, load_toml
    from mmfast.train.experiment import _save_results, evaluate, load_run

    given = [k for k, v in vars(args).items() if k.startswith("cfg__") and v is not None]
    other = [k for k in given if not k.startswith("cfg__eval__")]
    if other or args.config:
        raise ValueError("mmfast eval takes the run's own config; only --eval.<option> flags "
                         f"may change it (got {['--' + k[5:].replace('__', '.') for k in other] or '--config'})")
    exp = load_run(args.run, device=args.device)
    if given:
        saved = load_toml(Path(args.run) / "config.toml")
        exp.config.eval = config_from_args(args, base=saved).eval
    t0 = time.perf_counter()
    results = evaluate(exp, args.run, progress=not args.quiet)
    _save_results(Path(args.run), exp.config, results)
    _print_results(exp.config.name, results, time.perf_counter() - t0)
    return 0


def _print_results(name: str, results: dict, seconds: float) -> None:
    print(f"\n{name}: done in {seconds:.1f} s")
    for key, value in results.items():
        print(f"  {key:32s} {value:.6g}" if isinstance(value, float) else f"  {key:32s} {value}")


# ------------------------------------------------------------------------------ sweeps
def sweep(base, aggregators: list[str], objectives: list[str], progress: bool = True,
          out=None) -> tuple[str, dict]:
    """Train and evaluate every (aggregator, objective) into ``<run_dir>/<agg>-<objective>``;
    finished runs are read back, interrupted ones resume. Returns the table and the results."""
    import copy

    from mmfast.train.experiment import DISPLAY, run

    out = out or sys.stdout
    root = Path(base.run_dir)
    results: dict[tuple[str, str], dict] = {}
    for agg in aggregators:
        for obj in objectives:
            cfg = copy.deepcopy(base)
            cfg.model.aggregator, cfg.train.objective = agg, obj
            cfg.name = f"{base.name}/{agg}-{obj}"
            cfg.run_dir = str(root / f"{agg.replace('+', 'plus')}-{obj}")
            done = Path(cfg.run_dir) / "results.json"
            if done.exists():
                results[(agg, obj)] = json.loads(done.read_text())["results"]
                print(f"[sweep] {agg:>14} {obj:>7}: finished earlier, read back", file=out)
                continue
            t0 = time.perf_counter()
            print(f"[sweep] {agg:>14} {obj:>7}: training", file=out, flush=True)
            results[(agg, obj)] = run(cfg, progress=progress)
            print(f"[sweep] {agg:>14} {obj:>7}: {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    table, rows = sweep_table(base, results)
    (root / "sweep.md").write_text(table + "\n")
    (root / "sweep.json").write_text(json.dumps(
        {f"{a}/{o}": r for (a, o), r in results.items()}, indent=2))
    if base.data.name == "linear_gaussian" and base.eval.plots:
        from mmfast.eval import plots
        plots.gap_kl_figure({DISPLAY[a]: r for a, r in rows.items()}, root / "sweep.png")
    if base.eval.plots:
        from mmfast.eval import plots
        plots.training_curves(None, root / "training.png", runs={
            f"{a}-{o}": root / f"{a.replace('+', 'plus')}-{o}" / "metrics.csv" for a, o in results})
    return table, results


def sweep_table(base, results: dict) -> tuple[str, dict]:
    from mmfast.eval import format_table, table1
    from mmfast.train.experiment import DISPLAY

    if base.data.name == "linear_gaussian":
        columns = [f"{o}: {c}" for o in OBJECTIVES for c in ("gap", "KL full", "KL single")
                   if any(k[1] == o for k in results)]
        rows: dict[str, dict] = {}
        for (agg, obj), r in results.items():
            row = rows.setdefault(agg, {})
            row[f"{obj}: gap"] = r["gap"]
            row[f"{obj}: KL full"] = r["kl_full"]
            row[f"{obj}: KL single"] = r["kl_single"]
        shown = {DISPLAY[a]: {k: (f"{100 * v:.3f}%" if k.endswith("gap") else f"{v:.3f}")
                              for k, v in r.items()} for a, r in rows.items()}
        notes = ""
        if any(not r.get("kl_exact", 1.0) for r in results.values()):
            notes = "\nKL of mixture posteriors (MoE) is a Monte Carlo estimate (256 draws)."
        return format_table(shown, columns, row_label="aggregator") + notes, rows
    names = [k[4:] for k in next(iter(results.values())) if k.startswith("llh_") and k != "llh_joint"]
    table = table1({(DISPLAY[a], o): {k[4:]: v for k, v in r.items() if k.startswith("llh_")}
                    for (a, o), r in results.items()}, names)
    extra_keys = [k for k in next(iter(results.values())) if k == "mcc" or k.startswith("coherence_")]
    if extra_keys:
        extra = {f"{DISPLAY[a]} ({o})": {k: r.get(k) for k in extra_keys} for (a, o), r in results.items()}
        table += "\n\n" + format_table(extra, extra_keys, row_label="run", digits=3)
    return table, results


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _cmd_sweep(args) -> int:
    from mmfast.train.config import config_from_args

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    table, _ = sweep(cfg, _list(args.aggregators), _list(args.objectives), progress=not args.quiet)
    print(f"\n{cfg.name}: {len(_list(args.aggregators)) * len(_list(args.objectives))} runs in "
          f"{time.perf_counter() - t0:.1f} s; table in {Path(cfg.run_dir) / 'sweep.md'}\n")
    print(table)
    return 0


def _cmd_demo(args) -> int:
    from mmfast.train.config import config_from_args, merge

    base = merge(DEMO_CONFIG, DEMO_QUICK) if args.quick else DEMO_CONFIG
    if args.quick:
        base = merge(base, {"run_dir": "runs/demo-quick"})
    cfg = config_from_args(args, base=base)
    t0 = time.perf_counter()
    print(f"mmfast demo: LinearGaussian, M = {cfg.data.num_modalities}, "
          f"d = {cfg.data.num_modalities * cfg.data.private_dim + cfg.data.shared_dim}, "
          f"N = {cfg.data.num_samples}; {len(DEMO_AGGREGATORS)} aggregators x 2 objectives, "
          f"{cfg.train.epochs} epochs each; runs in {cfg.run_dir}", flush=True)
    table, _ = sweep(cfg, DEMO_AGGREGATORS, OBJECTIVES, progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    print("\nRelative LLH gap (exact log p(X) - objective) / |exact log p(X)| on the training data,")
    print("and KL(q(z|x_S) || p(z|x_S)) for the full set and (mean) single modalities:\n")
    print(table)
    plot = Path(cfg.run_dir) / "sweep.png"
    print(f"\ntotal {elapsed:.1f} s" + (f"; plot: {plot}" if plot.exists() else
                                       "; install matplotlib (pip install 'mmfast[plot]') for a plot"))
    return 0


def main(argv: list[str] | None = None) -> int:
    from mmfast.train.config import add_config_flags

    parser = argparse.ArgumentParser(prog="mmfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train and evaluate one run (resumes its run folder)")
    add_config_flags(train)
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many steps (checkpointed; run again to go on)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained run folder")
    ev.add_argument("run", help="the run folder (with config.toml and checkpoints/last.pt)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quiet", action="store_true")
    add_config_flags(ev)
    ev.set_defaults(func=_cmd_eval)

    sw = sub.add_parser("sweep", help="several aggregators x objectives, one table (resumable)")
    add_config_flags(sw)
    sw.add_argument("--aggregators", default=",".join(DEMO_AGGREGATORS))
    sw.add_argument("--objectives", default=",".join(OBJECTIVES))
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)

    demo = sub.add_parser("demo", help="the LinearGaussian demonstration (README main job)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    demo.add_argument("--quiet", action="store_true")
    add_config_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    for name, command in (("train", train), ("eval", ev), ("sweep", sw), ("demo", demo)):
        command.add_argument("--threads", type=int, default=1 if name == "demo" else 0,
                             help="CPU threads for torch (0: torch's default). The demo's models "
                                  "are small: one thread avoids contention and is about as fast")
    args = parser.parse_args(argv)
    import torch
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (tests)
        from mmfast.train.distributed import teardown
        teardown()


if __name__ == "__main__":
    sys.exit(main())
