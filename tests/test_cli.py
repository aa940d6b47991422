"""Configs (TOML + flags, unknown keys are errors) and the ``mmfast`` commands end to end."""
import argparse
import copy

import pytest

from mmfast.train.config import (ExperimentConfig, add_config_flags, build_config, config_from_args,
                                 load_toml, to_toml)


def _parse(argv, base=None):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv), base=base)


def test_toml_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\nrun_dir = "r"\n[data]\nnum_samples = 10\n[train]\nlr = 0.5\n'
                    'objective = "mixture"\n[model]\nencoder_hidden = [8, 8]\n')
    cfg = _parse(["--config", str(path), "--train.lr", "0.25", "--model.decoder_hidden", "3,4",
                  "--train.amp", "false", "--run_dir", "elsewhere"])
    assert cfg.name == "x" and cfg.run_dir == "elsewhere"
    assert cfg.data.num_samples == 10 and cfg.train.objective == "mixture"
    assert cfg.train.lr == 0.25 and cfg.train.amp is False
    assert cfg.model.encoder_hidden == [8, 8] and cfg.model.decoder_hidden == [3, 4]
    assert cfg.train.batch_size == ExperimentConfig().train.batch_size


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown option.*'lrate'.*\\[train\\]"):
        build_config({"train": {"lrate": 1.0}})
    with pytest.raises(ValueError, match="unknown config key"):
        build_config({"trian": {}})
    with pytest.raises(ValueError, match="train.epochs: expected an integer"):
        build_config({"train": {"epochs": "many"}})
    with pytest.raises(ValueError, match="expected true or false"):
        build_config({"train": {"amp": "maybe"}})
    with pytest.raises(ValueError, match="data.name"):
        build_config({"data": {"name": "cifar"}})
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--train.lrate", "1"])


def test_caller_dict_untouched_and_toml_round_trip(tmp_path):
    values = {"data": {"num_samples": 7}, "model": {"encoder_hidden": [5]}}
    before = copy.deepcopy(values)
    cfg = build_config(values)
    cfg.model.encoder_hidden.append(9)
    assert values == before
    path = tmp_path / "round.toml"
    path.write_text(to_toml(cfg))
    assert build_config(load_toml(path)) == cfg


def test_shipped_configs_parse():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.toml"))
    assert {f.stem for f in files} >= {"linear_gaussian", "identifiable_bimodal",
                                       "identifiable_multimodal", "mnist_svhn_text"}
    for f in files:
        build_config(load_toml(f))
