"""Joint and marginal test log-likelihoods (IWAE estimates) and the poster's Table 1 layout."""
from __future__ import annotations

import torch

from mmfast.data.base import iterate_batches


def _limit(data, max_samples: int):
    if max_samples and max_samples < len(data):
        from mmfast.data.base import MultiModalDataset

        class _Head(MultiModalDataset):
            modality_names = data.modality_names

            def __len__(self):
                return max_samples

            def batch(self, index):
                return data.batch(index)
        return _Head()
    return data


@torch.no_grad()
def log_likelihood_table(model, data, num_samples: int = 1000, batch_size: int = 250,
                         device="cpu", max_samples: int = 0) -> dict[str, float]:
    """Mean IWAE ``log p(x_S)`` over ``data``: ``"joint"`` (S = every observed modality) and one
    entry per modality (S = that modality alone, over the samples that have it).

    ``model.log_likelihood(x, observed, num_samples)`` gives the per-sample estimates.
    """
    data = _limit(data, max_samples)
    names = list(data.modality_names)
    sums = {k: 0.0 for k in ["joint", *names]}
    counts = dict.fromkeys(sums, 0)
    for batch in iterate_batches(data, batch_size, device):
        observed = batch["observed"]
        joint = model.log_likelihood(batch["x"], observed=observed, num_samples=num_samples)
        sums["joint"] += float(joint.double().sum())
        counts["joint"] += len(joint)
        for m, name in enumerate(names):
            has = observed[:, m]
            if not has.any():
                continue
            single = torch.zeros_like(observed)
            single[:, m] = True
            ll = model.log_likelihood(batch["x"], observed=single & observed, num_samples=num_samples)
            sums[name] += float(ll.double()[has].sum())
            counts[name] += int(has.sum())
    return {k: sums[k] / counts[k] for k in sums if counts[k]}


def format_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None,
                 row_label: str = "", digits: int = 2) -> str:
    """A Markdown table: one row per key of ``rows``, one column per metric (missing: "–")."""
    if columns is None:
        columns = []
        for r in rows.values():
            columns += [c for c in r if c not in columns]
    head = f"| {row_label} | " + " | ".join(columns) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    lines = [head, rule]
    for name, r in rows.items():
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1(results: dict[tuple[str, str], dict[str, float]], modalities: list[str]) -> str:
    """The poster's Table 1: rows = aggregators; for each objective the joint and marginal test
    log-likelihoods. ``results[(aggregator, objective)]`` holds ``log_likelihood_table`` output."""
    objectives = [o for o in ("masked", "mixture") if any(k[1] == o for k in results)]
    columns = [f"{o}: {c}" for o in objectives for c in ["joint", *modalities]]
    rows: dict[str, dict[str, float]] = {}
    for (agg, obj), r in results.items():
        row = rows.setdefault(agg, {})
        for c in ["joint", *modalities]:
            if c in r:
                row[f"{obj}: {c}"] = r[c]
    return format_table(rows, columns, row_label="aggregator")
