"""From a config to a trained, evaluated run: data, model, training, evaluation, pictures.

A run folder holds ``config.toml`` (what was run), ``checkpoints/last.pt`` (resumable),
``metrics.csv``, ``results.json`` (the evaluation), ``classifiers.pt`` (MNIST-SVHN-Text digit
classifiers for coherence) and pictures when matplotlib is installed.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mmfast as mf
from mmfast import data as mdata
from mmfast.train.config import ExperimentConfig, to_toml
from mmfast.train.trainer import Trainer, resolve_device

AGGREGATORS = {"sumpooling": "SumPooling", "selfattention": "SelfAttention", "poe": "PoE",
               "moe": "MoE", "poe+": "PoEPlus", "moe+": "MoEPlus",
               "sumpooling_mixture": "SumPoolingMixture",
               "selfattention_mixture": "SelfAttentionMixture"}
DISPLAY = {"sumpooling": "SumPooling", "selfattention": "SelfAttention", "poe": "PoE", "moe": "MoE",
           "poe+": "PoE+", "moe+": "MoE+", "sumpooling_mixture": "SumPoolingMixture",
           "selfattention_mixture": "SelfAttentionMixture"}
_EXPERT_AGGREGATORS = {"poe", "moe"}   # features are (mu, logvar) pairs: feature_dim = 2 d


def mlp(sizes: list[int], activation=nn.LeakyReLU) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class LabelEncoder(nn.Module):
    """A categorical modality (int64 ``[B]``) -> features ``[B, E]`` (one-hot, then an MLP)."""

    def __init__(self, num_classes: int, hidden: list[int], out_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.net = mlp([num_classes, *hidden, out_dim])

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.net(nn.functional.one_hot(label.clamp(0, self.num_classes - 1), self.num_classes).float())


def build_data(cfg: ExperimentConfig, split: str):
    d = cfg.data
    n = d.num_samples if split == "train" else d.test_samples
    if d.name == "linear_gaussian":
        return mdata.LinearGaussian(num_samples=n, num_modalities=d.num_modalities,
                                    private_dim=d.private_dim, shared_dim=d.shared_dim,
                                    noise_std=d.noise_std, seed=d.seed, split=split)
    if d.name == "identifiable_bimodal":
        return mdata.IdentifiableBimodal(num_samples=n, latent_dim=d.latent_dim,
                                         num_segments=d.num_segments, obs_dim=d.obs_dim,
                                         noise_std=d.mixing_noise, seed=d.seed, split=split)
    if d.name == "identifiable_multimodal":
        return mdata.IdentifiableMultimodal(num_samples=n, latent_dim=d.latent_dim,
                                            num_segments=d.num_segments,
                                            num_continuous=d.num_continuous, obs_dim=d.obs_dim,
                                            noise_std=d.mixing_noise, missing_prob=d.missing_prob,
                                            seed=d.seed, split=split)
    return mdata.MNISTSVHNText(d.root, split, download=d.download, num_pairings=d.num_pairings,
                               seed=d.seed)


def _options_for(cls, options: dict) -> dict:
    accepted = inspect.signature(cls).parameters
    if any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        return options
    return {k: v for k, v in options.items() if k in accepted}


def build_aggregator(name: str, feature_dim: int, latent_dim: int, cfg: ExperimentConfig) -> nn.Module:
    if name not in AGGREGATORS:
        raise ValueError(f"model.aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")
    cls = getattr(mf.nn, AGGREGATORS[name])
    options = {"num_heads": cfg.model.num_heads, "depth": cfg.model.depth,
               "components": cfg.model.prior_components}
    return cls(feature_dim, latent_dim, **_options_for(cls, options))


@dataclass
class Experiment:
    """Everything a run needs: the model, its parts (for exact diagnostics) and the data."""
    config: ExperimentConfig
    model: nn.Module
    train_data: object
    test_data: object
    encoders: list[nn.Module]
    aggregator: nn.Module
    decoders: list[nn.Module]
    latent_dim: int
    extras: dict = field(default_factory=dict)

    def posterior(self, x: dict, mask: torch.Tensor):
        """``q(z | x_S)`` for a mask ``[B, M]``: encoders, then the aggregator."""
        return self.model.posterior(x, mask)


def build_experiment(cfg: ExperimentConfig, with_data: bool = True) -> Experiment:
    """Seeded model construction (``train.seed``) and the train/test data of ``cfg``."""
    torch.manual_seed(cfg.train.seed)
    train_data = build_data(cfg, "train")
    test_data = build_data(cfg, "test")
    names = list(train_data.modality_names)
    m = cfg.model
    agg_name = m.aggregator
    if cfg.data.name == "mnist_svhn_text":
        d = m.latent_dim or 20
    else:
        d = m.latent_dim or train_data.latent_dim
    E = 2 * d if agg_name in _EXPERT_AGGREGATORS else m.feature_dim
    encoders, decoders, modalities = [], [], {}
    if cfg.data.name == "linear_gaussian":
        for name, D in zip(names, train_data.dims):
            enc = mlp([D, *m.encoder_hidden, E])
            decoder_kind = "linear" if m.decoder == "auto" else m.decoder
            dec = nn.Linear(d, D) if decoder_kind == "linear" else mlp([d, *m.decoder_hidden, D])
            encoders.append(enc)
            decoders.append(dec)
            modalities[name] = mf.Modality(enc, dec, likelihood="normal", scale=cfg.data.noise_std)
    elif cfg.data.name.startswith("identifiable"):
        for name in names:
            if name == "label":
                C = train_data.num_classes
                enc = LabelEncoder(C, m.encoder_hidden, E)
                dec = mlp([d, *m.decoder_hidden, C])
                modality = mf.Modality(enc, dec, likelihood="categorical")
            else:
                D = train_data.x[name].shape[1]
                enc = mlp([D, *m.encoder_hidden, E])
                dec = mlp([d, *m.decoder_hidden, D])
                modality = mf.Modality(enc, dec, likelihood="normal", scale="learned", event_shape=(D,))
            encoders.append(enc)
            decoders.append(dec)
            modalities[name] = modality
    else:
        nets = {"mnist": ("MNISTEncoder", "MNISTDecoder", "laplace"),
                "svhn": ("SVHNEncoder", "SVHNDecoder", "laplace"),
                "text": ("TextEncoder", "TextDecoder", "categorical")}
        from mmfast.data.mnist_svhn_text import ALPHABET
        for name in names:
            enc_name, dec_name, likelihood = nets[name]
            extra = {"num_classes": len(ALPHABET)} if name == "text" else {}
            enc = getattr(mf.nn, enc_name)(E, **extra)
            dec = getattr(mf.nn, dec_name)(d, **extra)
            encoders.append(enc)
            decoders.append(dec)
            scale = "learned" if likelihood == "laplace" else None
            modalities[name] = mf.Modality(enc, dec, likelihood=likelihood, scale=scale)
    aggregator = build_aggregator(agg_name, E, d, cfg)
    use_mixture = m.prior == "mixture" or (m.prior == "auto" and cfg.data.name.startswith("identifiable"))
    prior = (mf.priors.GaussianMixture(d, components=m.prior_components) if use_mixture
             else mf.priors.StandardNormal(d))
    model = mf.MultiModalVAE(modalities=modalities, aggregator=aggregator, prior=prior)
    return Experiment(cfg, model, train_data, test_data, encoders, aggregator, decoders, d)


# ------------------------------------------------------------------------------ evaluation
def evaluate(exp: Experiment, run_dir: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """The experiment's evaluation (see :mod:`mmfast.eval`); pictures go to ``run_dir``."""
    from mmfast import eval as mev

    cfg = exp.config
    device = next(exp.model.parameters()).device
    model = exp.model
    was_training = model.training
    model.eval()
    results: dict = {}
    ev = cfg.eval
    try:
        with torch.no_grad():
            if cfg.data.name == "linear_gaussian":
                results.update(mev.linear_gaussian_report(
                    model, exp.train_data, exp.decoders, cfg.data.noise_std, exp.posterior,
                    kind=cfg.train.objective, batch_size=ev.batch_size, device=device))
            if ev.num_samples > 0:
                llh = mev.log_likelihood_table(model, exp.test_data, num_samples=ev.num_samples,
                                               batch_size=ev.batch_size, device=device,
                                               max_samples=ev.max_samples)
                results.update({f"llh_{k}": v for k, v in llh.items()})
            if cfg.data.name.startswith("identifiable"):
                z_true, z_hat = mev.inferred_latents(exp.posterior, exp.test_data, ev.batch_size, device)
                results["mcc"] = mev.mcc(z_true, z_hat)
                if run_dir is not None and ev.plots:
                    mev.plots.latents_figure(z_true, z_hat, Path(run_dir) / "latents.png")
        if cfg.data.name == "mnist_svhn_text":
            results.update(mev.coherence_report(exp, run_dir, progress=progress))
    finally:
        model.train(was_training)
    return results


def run(cfg: ExperimentConfig, progress: bool = True, resume: bool = True,
        max_steps: int | None = None) -> dict:
    """Train (resuming the run in ``cfg.run_dir`` if it has a checkpoint), evaluate, save
    ``results.json`` and pictures; returns the results."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(cfg)
    cfg.train.progress = cfg.train.progress and progress
    trainer = Trainer(exp.model, exp.train_data, cfg.train, run_dir=run_dir,
                      extra_state={"config_toml": to_toml(cfg)})
    if trainer.rank == 0:
        (run_dir / "config.toml").write_text(to_toml(cfg))
    try:
        summary = trainer.fit(resume=resume, max_steps=max_steps)
    finally:
        trainer.close()
    results: dict = {}
    if trainer.rank == 0 and trainer.epoch >= cfg.train.epochs:
        results = evaluate(exp, run_dir, progress=progress)
        results.update({"steps": summary["step"], "final_train_objective": summary["train/objective"]})
        _save_results(run_dir, cfg, results)
        if cfg.eval.plots:
            from mmfast.eval import plots
            plots.training_curves(run_dir / "metrics.csv", run_dir / "training.png")
    return results


def _save_results(run_dir: Path, cfg: ExperimentConfig, results: dict) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
    payload = {"name": cfg.name, "aggregator": cfg.model.aggregator,
               "objective": cfg.train.objective, "results": clean}
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run_dir / "results.json")


def load_run(run_dir: str | os.PathLike, device: str = "auto") -> Experiment:
    """Rebuild a run's experiment from ``config.toml`` and load ``checkpoints/last.pt``."""
    from mmfast.train.checkpoint import load_checkpoint
    from mmfast.train.config import build_config, load_toml

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.toml: not an mmfast run folder")
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoints/last.pt: train it first "
                                f"(an untrained model is never evaluated in its place)")
    cfg = build_config(load_toml(run_dir / "config.toml"))
    cfg.run_dir = str(run_dir)
    exp = build_experiment(cfg)
    state = load_checkpoint(ckpt)
    exp.model.load_state_dict(state["model"])
    exp.model.to(resolve_device(device))
    return exp
