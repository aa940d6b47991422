"""Trainer: learning, clipping after backward, data order, evaluation, metrics."""
import pytest
import torch

from _toy_model import ToyModel, toy_data
from mmfast.data import MultiModalData
from mmfast.train import TrainConfig, Trainer, read_metrics


def _trainer(tmp_path=None, seed=0, **options):
    torch.manual_seed(seed)
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 1e-2, "progress": False,
                         "tensorboard": "off", "log_every": 2, **options})
    return Trainer(ToyModel(), toy_data(), cfg, run_dir=tmp_path)


def test_training_raises_the_objective():
    trainer = _trainer(epochs=30)
    data = trainer.data.batch(torch.arange(len(trainer.data)))
    before = -((trainer.model.net(data["x"]["a"]) - data["x"]["b"]) ** 2).sum(-1).mean()
    trainer.fit()
    after = -((trainer.model.net(data["x"]["a"]) - data["x"]["b"]) ** 2).sum(-1).mean()
    assert after > before + 0.2 * abs(before)
    assert trainer.step == 30 * 4  # ceil(50 / 16)
    assert trainer.history[-1]["train/objective"] > trainer.history[0]["train/objective"]


def test_clipping_happens_after_backward():
    seen = []
    for clip in (0.0, 1e-3):
        trainer = _trainer(epochs=1, grad_clip=clip)
        norms = []
        original = trainer.optimizer.step

        def step(*args, _orig=original, _norms=norms, _t=trainer, **kw):
            grads = [p.grad.norm() for p in _t.model.parameters() if p.grad is not None]
            _norms.append(torch.stack(grads).norm().item())
            return _orig(*args, **kw)

        trainer.optimizer.step = step
        trainer.fit()
        seen.append(norms)
    assert min(seen[0]) > 1e-3                      # unclipped gradients are larger
    assert max(seen[1]) <= 1e-3 * (1 + 1e-4)         # the optimiser only ever saw clipped ones


def test_data_order_covers_every_sample_and_is_seeded():
    class Recording(MultiModalData):
        def batch(self, index):
            self.seen.append(index.clone())
            return super().batch(index)

    orders = []
    for seed in (1, 1, 2):
        data = Recording(toy_data().x)
        data.seen = []
        torch.manual_seed(0)
        Trainer(ToyModel(), data, TrainConfig(epochs=2, batch_size=16, progress=False, seed=seed,
                                               tensorboard="off")).fit()
        epoch0 = torch.cat(data.seen[:4])
        assert sorted(epoch0.tolist()) == list(range(50))
        assert not torch.equal(epoch0, torch.cat(data.seen[4:]))   # reshuffled each epoch
        orders.append(torch.cat(data.seen))
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_evaluation_is_logged_and_does_not_perturb_training(tmp_path):
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        torch.randn(100)  # consumes RNG: must not shift the training trajectory
        return {"score": float(len(calls))}

    plain = _trainer(epochs=4)
    plain.fit()
    torch.manual_seed(0)
    evaluated = Trainer(ToyModel(), toy_data(), TrainConfig(epochs=4, batch_size=16, lr=1e-2,
                                                            progress=False, log_every=2, eval_every=2,
                                                            tensorboard="off"),
                        run_dir=tmp_path, eval_fn=eval_fn)
    summary = evaluated.fit()
    assert calls == [False, False]                     # epochs 2 and 4, in eval mode
    assert summary["eval/score"] == 2.0
    for p, q in zip(plain.model.parameters(), evaluated.model.parameters()):
        assert torch.equal(p, q)
    rows = read_metrics(tmp_path / "metrics.csv")
    evals = [(r["epoch"], r["value"]) for r in rows if r["name"] == "eval/score"]
    assert evals == [(2, 1.0), (4, 2.0)]
    train_rows = [r for r in rows if r["name"] == "train/objective"]
    assert [r["step"] for r in train_rows] == list(range(2, 17, 2))


def test_adamw_and_options_validated():
    trainer = _trainer(optimizer="adamw", weight_decay=0.1)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    import pytest
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="elbo")


def test_closed_trainer_keeps_its_model_and_refuses_to_train():
    trainer = Trainer(ToyModel(stochastic=False), toy_data(n=30),
                      TrainConfig(epochs=1, batch_size=10, progress=False, tensorboard="off"))
    trainer.fit()
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.close()
    trainer.close()  # idempotent
    for p, q in zip(trainer.model.parameters(), weights):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="closed"):
        trainer.fit()
