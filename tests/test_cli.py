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


# ------------------------------------------------------------------ the commands, end to end
import json  # noqa: E402

from _mst_files import make_mnist_svhn  # noqa: E402
from mmfast.cli import main  # noqa: E402

# The end-to-end runs use the reference backend: the kernels have their own tests, and under the
# Triton interpreter (set by conftest on CPU machines) training even tiny models takes minutes.
pytestmark_e2e = pytest.mark.usefixtures("reference_backend")

TINY_LG = ["--data.num_samples", "64", "--data.test_samples", "32", "--train.epochs", "1",
           "--train.batch_size", "32", "--model.encoder_hidden", "16", "--model.feature_dim", "16",
           "--eval.plots", "false"]


@pytestmark_e2e
def test_demo_quick_prints_the_table_and_sweeps_resume(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--run_dir", str(run_dir), *TINY_LG]) == 0
    out = capsys.readouterr().out
    for name in ("SumPooling", "SelfAttention", "PoE", "MoE"):
        assert f"| {name} |" in out
    assert "masked: gap" in out and "mixture: KL full" in out
    results = json.loads((run_dir / "sweep.json").read_text())
    assert set(results) == {f"{a}/{o}" for a in ("sumpooling", "selfattention", "poe", "moe")
                            for o in ("masked", "mixture")}
    for r in results.values():
        assert abs(r["gap"]) < 1 and r["kl_full"] >= 0 and r["kl_single"] >= 0
    # a second sweep reads the finished runs back instead of training them again
    assert main(["demo", "--quick", "--quiet", "--run_dir", str(run_dir), *TINY_LG]) == 0
    assert capsys.readouterr().out.count("finished earlier, read back") == 8


@pytestmark_e2e
def test_train_interrupt_resume_then_eval_identifiable(tmp_path, capsys):
    run_dir = tmp_path / "ident"
    flags = ["--data.name", "identifiable_multimodal", "--data.num_samples", "120",
             "--data.test_samples", "40", "--train.epochs", "2", "--train.batch_size", "40",
             "--model.encoder_hidden", "16", "--model.decoder_hidden", "16",
             "--model.feature_dim", "16", "--eval.num_samples", "8", "--run_dir", str(run_dir),
             "--quiet", "--model.aggregator", "selfattention"]
    assert main(["train", *flags, "--max-steps", "4"]) == 0
    assert not (run_dir / "results.json").exists()          # stopped before the end
    state = __import__("torch").load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert main(["train", *flags]) == 0                      # resumes and finishes
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert results["steps"] == 6
    assert 0 <= results["mcc"] <= 1
    assert {"llh_joint", "llh_x0", "llh_label"} <= set(results)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--eval.num_samples", "4", "--quiet"]) == 0
    assert "mcc" in capsys.readouterr().out
    # eval refuses options that would change the trained model
    assert main(["eval", str(run_dir), "--train.lr", "1"]) == 2


def test_eval_without_checkpoint_is_an_error(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("[data]\nnum_samples = 10\n")
    assert main(["eval", str(tmp_path)]) == 2
    assert "untrained model is never evaluated" in capsys.readouterr().err


@pytestmark_e2e
def test_sweep_mnist_svhn_text_table1_and_coherence(tmp_path, capsys):
    make_mnist_svhn(tmp_path / "files", n_mnist=(20, 10), n_svhn=(20, 10))
    run_dir = tmp_path / "mst"
    flags = ["--data.name", "mnist_svhn_text", "--data.root", str(tmp_path / "files"),
             "--data.num_pairings", "2", "--train.epochs", "1", "--train.batch_size", "40",
             "--model.feature_dim", "16", "--model.latent_dim", "4", "--eval.num_samples", "3",
             "--eval.classifier_epochs", "1", "--run_dir", str(run_dir), "--quiet"]
    assert main(["sweep", *flags, "--aggregators", "poe", "--objectives", "masked,mixture"]) == 0
    out = capsys.readouterr().out
    assert "masked: joint" in out and "mixture: text" in out and "| PoE |" in out
    assert "coherence_mnist|svhn" in out
    for sub in ("poe-masked", "poe-mixture"):
        assert (run_dir / sub / "classifiers.pt").exists()
        results = json.loads((run_dir / sub / "results.json").read_text())["results"]
        assert 0 <= results["coherence_text|mnist+svhn"] <= 1
