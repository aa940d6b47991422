"""Pictures (need matplotlib, the ``plot`` extra; every function returns None without it).

* :func:`gap_kl_figure`: the demo's table of relative LLH gaps and KLs as bars.
* :func:`training_curves`: the running objective (and evaluations) from ``metrics.csv``.
* :func:`latents_figure`: true vs inferred latents (identifiable simulations), matched by MCC.
* :func:`cross_generation_grid`: MNIST-SVHN-Text generated from each single modality.
"""
from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def gap_kl_figure(rows: dict[str, dict[str, float]], path: str | os.PathLike):
    """``rows[aggregator] = {"masked: gap": ..., "mixture: gap": ..., "masked: KL full": ...}``."""
    plt = _pyplot()
    if plt is None:
        return None
    metrics = [("gap", "relative LLH gap (%)"), ("KL full", "KL(q(z|x) ‖ p(z|x))"),
               ("KL single", "KL(q(z|x_m) ‖ p(z|x_m)), mean over m")]
    aggs = list(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    width = 0.38
    for ax, (key, title) in zip(axes, metrics):
        for i, obj in enumerate(("masked", "mixture")):
            vals = [rows[a].get(f"{obj}: {key}", float("nan")) for a in aggs]
            if key == "gap":
                vals = [100 * v for v in vals]
            ax.bar([j + (i - 0.5) * width for j in range(len(aggs))], vals, width, label=obj)
        ax.set_xticks(range(len(aggs)), aggs, rotation=20)
        ax.set_title(title, fontsize=10)
        if key != "gap":
            ax.set_yscale("log")
        ax.axhline(0, color="black", lw=0.6)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike, runs: dict | None = None):
    """Running training objective against step; ``runs`` maps labels to several CSVs."""
    plt = _pyplot()
    if plt is None:
        return None
    from mmfast.train.metrics import read_metrics
    runs = runs or {"train": metrics_csv}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = []
    for label, csv_path in runs.items():
        if not Path(csv_path).exists():
            continue
        rows = [r for r in read_metrics(csv_path) if r["name"] == "train/objective"]
        ax.plot([r["step"] for r in rows], [r["value"] for r in rows], label=label, lw=1)
        values += [r["value"] for r in rows]
    ax.set_xlabel("step")
    ax.set_ylabel("objective (per sample)")
    if len(values) > 10:  # the first steps dwarf the rest: show the upper 90% of the values
        values.sort()
        low, high = values[len(values) // 10], values[-1]
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def latents_figure(z_true, z_inferred, path: str | os.PathLike, max_points: int = 2000):
    """One scatter per true latent against its matched inferred latent (Hungarian on |corr|)."""
    plt = _pyplot()
    if plt is None:
        return None
    from mmfast.eval.mcc import correlation_matrix, linear_assignment
    corr = correlation_matrix(z_true, z_inferred)
    pairs = linear_assignment((-corr.abs()).tolist())
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        ax.scatter(z_true[:max_points, i], z_inferred[:max_points, j], s=2, alpha=0.4)
        ax.set_xlabel(f"true z{i}")
        ax.set_ylabel(f"inferred z{j}")
        ax.set_title(f"|corr| = {abs(float(corr[i, j])):.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def cross_generation_grid(model, data, path: str | os.PathLike, num: int = 8):
    """Rows: the real samples, then every modality generated from each single given modality
    (MNIST and SVHN as image strips, the text as the row's caption)."""
    plt = _pyplot()
    if plt is None:
        return None
    import torch

    from mmfast.data.base import batch_to
    from mmfast.data.mnist_svhn_text import decode_text

    device = next(model.parameters()).device
    batch = batch_to(data.batch(torch.arange(min(num, len(data)))), device)
    names = list(data.modality_names)
    rows = [("real", batch["x"])]
    with torch.no_grad():
        for m, name in enumerate(names):
            given = torch.zeros(len(batch["label"]), len(names), dtype=torch.bool, device=device)
            given[:, m] = True
            rows.append((f"given {name}", model.reconstruct(batch["x"], given)))

    def strip(images):  # [n, C, H, W] -> [H, n * W, 3]
        images = images.detach().float().cpu().clamp(0, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return torch.cat(list(images.permute(0, 2, 3, 1)), dim=1).numpy()

    def text(values):
        values = values.detach().cpu()
        if values.is_floating_point():  # class probabilities [n, 8, C]
            values = values.argmax(-1)
        return "  ".join(f"'{t}'" for t in decode_text(values.long()))

    fig, axes = plt.subplots(len(rows), 2, figsize=(2 * num, 1.6 * len(rows)), squeeze=False)
    for r, (label, xs) in enumerate(rows):
        for c, name in enumerate(("mnist", "svhn")):
            axes[r, c].imshow(strip(xs[name]))
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            axes[r, c].set_title(f"{label}: {name}", fontsize=8, loc="left")
        axes[r, 0].set_xlabel("text: " + text(xs["text"]), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
