"""Cross-modal coherence on MNIST-SVHN-Text with per-modality digit classifiers.

mmfast trains one digit classifier per modality on the run's training data and saves them with
the run (``classifiers.pt``); evaluation loads them, and only trains them when the file is
absent (saying so). Coherence of target modality t given subset S is the fraction of test
samples whose t, decoded from ``z ~ q(z|x_S)`` by ``model.reconstruct``, is classified as the
sample's digit.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mmfast.data.base import batch_to, iterate_batches
from mmfast.subsets import all_subsets
from mmfast.train.checkpoint import load_checkpoint, save_atomic

NUM_DIGITS = 10


def _image_classifier(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        nn.Linear(128, NUM_DIGITS))


class TextClassifier(nn.Module):
    """Digit from text given as int64 indices ``[B, L]`` or soft one-hot ``[B, L, C]``."""

    def __init__(self, alphabet_size: int, length: int = 8):
        super().__init__()
        self.alphabet_size = alphabet_size
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(alphabet_size * length, 128), nn.ReLU(),
                                 nn.Linear(128, NUM_DIGITS))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if not text.dtype.is_floating_point:
            text = nn.functional.one_hot(text, self.alphabet_size).float()
        return self.net(text)


def make_classifiers(alphabet_size: int) -> nn.ModuleDict:
    return nn.ModuleDict({"mnist": _image_classifier(1), "svhn": _image_classifier(3),
                          "text": TextClassifier(alphabet_size)})


def train_classifiers(data, epochs: int = 2, batch_size: int = 256, lr: float = 1e-3,
                      device="cpu", seed: int = 0, max_steps: int | None = None,
                      progress: bool = False) -> nn.ModuleDict:
    """Train the three digit classifiers on ``data`` (MNIST-SVHN-Text batches with labels)."""
    from mmfast.data.mnist_svhn_text import ALPHABET
    torch.manual_seed(seed)
    classifiers = make_classifiers(len(ALPHABET)).to(device)
    opt = torch.optim.Adam(classifiers.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch_size):
            batch = batch_to(data.batch(order[start:start + batch_size]), device)
            loss = sum(nn.functional.cross_entropy(net(batch["x"][name]), batch["label"])
                       for name, net in classifiers.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return classifiers.eval()
    return classifiers.eval()


def load_or_train_classifiers(path: str | os.PathLike, data, epochs: int, device="cpu",
                              progress: bool = False) -> nn.ModuleDict:
    from mmfast.data.mnist_svhn_text import ALPHABET
    path = Path(path)
    classifiers = make_classifiers(len(ALPHABET))
    if path.exists():
        classifiers.load_state_dict(load_checkpoint(path)["state_dict"])
        return classifiers.to(device).eval()
    if progress:
        print(f"training digit classifiers for coherence ({epochs} epochs); saving to {path}")
    classifiers = train_classifiers(data, epochs=epochs, device=device)
    save_atomic({"state_dict": classifiers.state_dict(), "epochs": epochs}, path)
    return classifiers


@torch.no_grad()
def classifier_accuracy(classifiers, data, batch_size: int = 500, device="cpu") -> dict[str, float]:
    correct = dict.fromkeys(classifiers.keys(), 0)
    n = 0
    for batch in iterate_batches(data, batch_size, device):
        for name, net in classifiers.items():
            correct[name] += int((net(batch["x"][name]).argmax(-1) == batch["label"]).sum())
        n += len(batch["label"])
    return {name: c / n for name, c in correct.items()}


@torch.no_grad()
def coherence(model, classifiers, data, batch_size: int = 250, device="cpu",
              max_samples: int = 0) -> dict[str, float]:
    """``{"<target>|<given,...>": accuracy}`` for every non-empty proper subset as given."""
    names = list(data.modality_names)
    M = len(names)
    subsets = [s for s in all_subsets(M) if not s.all()]
    hits: dict[str, int] = {}
    n = 0
    limit = max_samples or len(data)
    for batch in iterate_batches(data, batch_size, device):
        if n >= limit:
            break
        B = len(batch["label"])
        for subset in subsets:
            given = subset.to(device).expand(B, M)
            recon = model.reconstruct(batch["x"], given)
            label = "+".join(n_ for n_, s in zip(names, subset.tolist()) if s)
            for m, target in enumerate(names):
                if subset[m]:
                    continue
                pred = classifiers[target](recon[target]).argmax(-1)
                key = f"{target}|{label}"
                hits[key] = hits.get(key, 0) + int((pred == batch["label"]).sum())
        n += B
    return {k: v / n for k, v in hits.items()}


def coherence_report(exp, run_dir=None, progress: bool = False) -> dict[str, float]:
    """Classifier accuracy on real test data and the coherence table of ``exp`` (a run's
    :class:`mmfast.train.experiment.Experiment`); saves the cross-generation grid."""
    cfg = exp.config
    device = next(exp.model.parameters()).device
    path = Path(run_dir or cfg.run_dir) / "classifiers.pt"
    classifiers = load_or_train_classifiers(path, exp.train_data, cfg.eval.classifier_epochs,
                                            device=device, progress=progress)
    out = {f"classifier_{k}": v for k, v in classifier_accuracy(classifiers, exp.test_data,
                                                                device=device).items()}
    was_training = exp.model.training
    exp.model.eval()
    try:
        out.update({f"coherence_{k}": v for k, v in coherence(
            exp.model, classifiers, exp.test_data, cfg.eval.batch_size, device,
            cfg.eval.max_samples).items()})
        if run_dir is not None and cfg.eval.plots:
            from mmfast.eval import plots
            plots.cross_generation_grid(exp.model, exp.test_data, Path(run_dir) / "cross_generation.png")
    finally:
        exp.model.train(was_training)
    return out
