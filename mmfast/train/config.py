"""Experiment configuration: TOML files (read with the standard library) and command-line flags.

A config has top-level keys ``name`` and ``run_dir`` and the tables ``[data]``, ``[model]``,
``[train]``, ``[eval]``. Every option is also a flag named ``--<table>.<option>`` (e.g.
``--train.lr 3e-4``, ``--model.encoder_hidden 256,256``); flags override the file. An unknown
key, in the file or as a flag, is an error that lists the known ones.
"""
from __future__ import annotations

import argparse
import copy
import sys
import typing
from dataclasses import asdict, dataclass, field, fields

from mmfast.train.trainer import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    """Which data set and its options (each data set reads the options that concern it)."""
    name: str = "linear_gaussian"   # linear_gaussian | identifiable_bimodal | identifiable_multimodal | mnist_svhn_text
    seed: int = 0
    num_samples: int = 5000         # training samples (simulations)
    test_samples: int = 1000        # test samples (simulations)
    # linear_gaussian
    num_modalities: int = 5
    private_dim: int = 5
    shared_dim: int = 5
    noise_std: float = 1.0
    # identifiable_*
    latent_dim: int = 2
    num_segments: int = 5
    num_continuous: int = 4
    obs_dim: int = 5
    missing_prob: float = 0.5
    mixing_noise: float = 0.1
    # mnist_svhn_text
    root: str = "data"
    download: bool = False
    num_pairings: int = 20

    def __post_init__(self):
        names = ("linear_gaussian", "identifiable_bimodal", "identifiable_multimodal", "mnist_svhn_text")
        if self.name not in names:
            raise ValueError(f"data.name must be one of {names}, got {self.name!r}")


@dataclass
class ModelConfig:
    """The multi-modal VAE: aggregator, encoder/decoder sizes, prior."""
    aggregator: str = "sumpooling"  # sumpooling | selfattention | poe | moe | poe+ | moe+ | sumpooling_mixture | selfattention_mixture
    latent_dim: int = 0             # 0: the data's true latent size (simulations) or 20 (images)
    feature_dim: int = 64           # encoder output size E (PoE/MoE use 2 * latent_dim)
    encoder_hidden: list[int] = field(default_factory=lambda: [128])
    decoder: str = "auto"           # auto | linear | mlp (auto: linear for linear_gaussian)
    decoder_hidden: list[int] = field(default_factory=lambda: [128])
    prior: str = "auto"             # auto | standard | mixture (auto: mixture for identifiable_*)
    prior_components: int = 5
    num_heads: int = 4
    depth: int = 1


@dataclass
class EvalConfig:
    """Evaluation after training."""
    num_samples: int = 1000         # importance samples of the log-likelihood estimate
    batch_size: int = 250
    max_samples: int = 0            # evaluate on at most this many test samples; 0 = all
    classifier_epochs: int = 2      # MNIST-SVHN-Text: digit classifiers for coherence
    plots: bool = True              # save pictures when matplotlib is installed


@dataclass
class ExperimentConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
TOP_LEVEL = ("name", "run_dir")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(kind, value, where: str):
    """Check/convert a TOML or flag value to the field's type."""
    origin = typing.get_origin(kind)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(kind)
        return [_coerce(inner, v, where) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported option type {kind}")


def build_config(values: dict) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from nested plain values; unknown keys are errors."""
    values = copy.deepcopy(values)  # never mutate the caller's dict
    known = set(TOP_LEVEL) | set(SECTIONS)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for key in TOP_LEVEL:
        if key in values:
            kwargs[key] = _coerce(str, values[key], key)
    for section, cls in SECTIONS.items():
        table = values.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"[{section}] must be a table")
        hints = _hints(cls)
        bad = set(table) - set(hints)
        if bad:
            raise ValueError(f"unknown option(s) {sorted(bad)} in [{section}]; known: {sorted(hints)}")
        kwargs[section] = cls(**{k: _coerce(hints[k], v, f"{section}.{k}") for k, v in table.items()})
    return ExperimentConfig(**kwargs)


def load_toml(path: str) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one ``--<table>.<option>`` flag per option (default: unset)."""
    parser.add_argument("--config", help="TOML config file (flags override it)")
    parser.add_argument("--name", dest="cfg__name", default=None, help="run name")
    parser.add_argument("--run_dir", "--run-dir", dest="cfg__run_dir", default=None,
                        help="run folder (checkpoints, metrics, results)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}] options")
        defaults = cls()
        for f in fields(cls):
            default = getattr(defaults, f.name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg__{section}__{f.name}",
                               default=None, metavar="V", help=f"default: {shown}")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> ExperimentConfig:
    """Merge ``--config`` (or ``base``), then the flags that were given."""
    values = copy.deepcopy(base) if base is not None else {}
    if getattr(args, "config", None):
        values = merge(values, load_toml(args.config))
    for key, value in vars(args).items():
        if not key.startswith("cfg__") or value is None:
            continue
        parts = key.split("__")[1:]
        if len(parts) == 1:
            values[parts[0]] = value
        else:
            values.setdefault(parts[0], {})[parts[1]] = value
    return build_config(values)


def merge(base: dict, override: dict) -> dict:
    """Nested dict merge (a new dict; neither input is changed)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_toml(config: ExperimentConfig) -> str:
    """The config as TOML text (saved with every run as ``config.toml``)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)
    d = config.to_dict()
    lines = [f"{k} = {fmt(d[k])}" for k in TOP_LEVEL]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in d[section].items()]
    return "\n".join(lines) + "\n"
