"""Checkpoints: atomic writes, weights_only loading, and resume == uninterrupted."""
import os

import pytest
import torch

from _toy_model import ToyModel, toy_data
from mmfast.train import TrainConfig, Trainer, save_atomic
from mmfast.train.checkpoint import load_checkpoint


def _cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 1e-2, "progress": False,
                          "log_every": 3, "tensorboard": "off", **kw})


def _run(run_dir, model_seed, max_steps=None, **kw):
    torch.manual_seed(model_seed)
    trainer = Trainer(ToyModel(), toy_data(), _cfg(**kw), run_dir=run_dir,
                      eval_fn=lambda m: {"w": float(m.net[0].weight.sum())})
    trainer.fit(max_steps=max_steps)
    return trainer


@pytest.mark.parametrize("stop_at", [5, 8])   # mid-epoch and at an epoch boundary
def test_resume_follows_the_uninterrupted_trajectory(tmp_path, stop_at):
    full = _run(tmp_path / "full", model_seed=0)
    part = _run(tmp_path / "part", model_seed=0, max_steps=stop_at)
    assert part.step == stop_at
    # A fresh process: different initial weights and RNG, all restored from the checkpoint.
    torch.manual_seed(999)
    resumed = _run(tmp_path / "part", model_seed=123)
    assert resumed.step == full.step == 12
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    s_full, s_res = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in s_full:
        assert torch.equal(s_full[k]["exp_avg_sq"], s_res[k]["exp_avg_sq"])
    assert (tmp_path / "full" / "metrics.csv").read_text() == (tmp_path / "part" / "metrics.csv").read_text()


def test_checkpoint_loads_weights_only_and_has_the_state(tmp_path):
    trainer = _run(tmp_path, model_seed=0, epochs=1)
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and state["epoch"] == 1
    assert torch.equal(state["model"]["net.0.weight"], trainer.model.net[0].weight)
    assert state["rng"][0]["cpu"].dtype == torch.uint8
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]   # no temporary files left


def test_save_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_atomic({"bad": lambda: 0}, path)         # not picklable: fails mid-write
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_resume_refuses_a_different_config(tmp_path):
    _run(tmp_path, model_seed=0, max_steps=2)
    with pytest.raises(ValueError, match="lr"):
        _run(tmp_path, model_seed=0, lr=0.5)
    # more epochs is allowed: the run is extended
    extended = _run(tmp_path, model_seed=0, epochs=4)
    assert extended.step == 16
