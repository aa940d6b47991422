"""Metric logging: a long-format CSV (``step,epoch,name,value``) and TensorBoard when installed.

On resume the CSV is cut back to the rows at or before the checkpoint's step, so a run that was
interrupted and resumed has the same file as one that was not.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

FIELDS = ("step", "epoch", "name", "value")


class MetricsLogger:
    """Append metrics to ``<run_dir>/metrics.csv`` (and TensorBoard under ``<run_dir>/tb``).

    Args:
        run_dir: the run folder. tensorboard: "auto" (if installed), True, or False.
        resume_step: drop rows logged after this step (None: start a fresh file).
        enabled: False on non-zero ranks.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard="auto", resume_step: int | None = None,
                 enabled: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and self.path.exists():
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        with open(self.path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(FIELDS)
            for r in rows:
                out.writerow([r[k] for k in FIELDS])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard is True:
                    raise
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            out = csv.writer(f)
            for name, value in values.items():
                out.writerow([step, epoch, name, repr(float(value))])
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics CSV as dicts with int step/epoch and float value."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "name": r["name"],
                 "value": float(r["value"])} for r in csv.DictReader(f)]
