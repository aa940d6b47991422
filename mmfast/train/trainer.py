"""The training loop: any model with ``objective(x, observed=..., kind=..., num_samples=...,
beta=...)`` returning an output with ``.loss`` (scalar) and ``.value`` (``[B]``).

What it does, in the order a step does it: gather the batch (the data order is a function of
``(seed, epoch)`` only, so a resumed run sees the same batches), forward under bf16 autocast on
CUDA when ``amp``, backward, clip the global gradient norm (after backward: before it there is
nothing to clip), optimiser step. Every ``log_every`` steps the running mean of the objective goes
to the progress bar, the CSV and TensorBoard (the only host synchronisation of the loop).

Checkpoints (``<run_dir>/checkpoints/last.pt``) hold the model, the optimiser, the position in
the data order, the logging accumulators and every rank's RNG state, written atomically; a run
resumed from one follows the same trajectory as an uninterrupted run. Evaluation runs under a
forked RNG with its own seed so that it does not perturb training.

Launched with ``torchrun`` (``WORLD_SIZE > 1``) the objective runs under
DistributedDataParallel; ``batch_size`` is the global batch, split across ranks, and each rank's
loss is weighted so that the averaged gradient is the gradient of the global batch mean.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from mmfast.data.base import batch_to
from mmfast.train import distributed as D
from mmfast.train.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from mmfast.train.metrics import MetricsLogger

# Fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"epochs", "progress", "log_every", "eval_every", "checkpoint_every",
                      "checkpoint_steps", "device", "tensorboard"}


@dataclass
class TrainConfig:
    """Training options (each is also a ``mmfast train`` flag, ``--train.<name>``)."""
    epochs: int = 10
    batch_size: int = 256           # global batch (split across DDP ranks)
    lr: float = 1e-3
    optimizer: str = "adam"         # adam | adamw
    weight_decay: float = 0.0
    grad_clip: float = 0.0          # max global gradient norm; 0 = no clipping
    seed: int = 0
    objective: str = "masked"       # masked | mixture
    num_samples: int = 1            # importance samples K in the objective
    beta: float = 1.0
    log_every: int = 20             # steps between logged running objectives
    eval_every: int = 0             # epochs between evaluations; 0 = at the end only
    checkpoint_every: int = 1       # epochs between checkpoints
    checkpoint_steps: int = 0       # also every this many steps; 0 = off
    amp: bool = True                # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    progress: bool = True
    tensorboard: str = "auto"       # auto | on | off

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"train.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.objective not in ("masked", "mixture"):
            raise ValueError(f"train.objective must be 'masked' or 'mixture', got {self.objective!r}")
        if self.batch_size < 1 or self.epochs < 0 or self.num_samples < 1 or self.log_every < 1:
            raise ValueError("train: batch_size, num_samples and log_every must be >= 1, epochs >= 0")
        if self.tensorboard not in ("auto", "on", "off"):
            raise ValueError(f"train.tensorboard must be auto|on|off, got {self.tensorboard!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


class Trainer:
    """Train ``model`` on ``data`` (a :class:`mmfast.data.MultiModalDataset`).

    Args:
        model: an ``nn.Module`` with ``objective(...)`` (see the module doc).
        data: the training set. config: :class:`TrainConfig`.
        run_dir: where checkpoints and metrics go (None: nowhere, no resume).
        eval_fn: ``eval_fn(model) -> dict[str, float]``, run on rank 0 in eval mode without
            gradients every ``eval_every`` epochs and at the end; logged as ``eval/<name>``.
        extra_state: plain data saved in every checkpoint (e.g. the experiment config).
    """

    def __init__(self, model, data, config: TrainConfig | None = None, run_dir=None, eval_fn=None,
                 extra_state: dict | None = None):
        self.config = config or TrainConfig()
        self.device = resolve_device(self.config.device)
        self.rank, self.world_size = D.setup(self.device)
        self.model = model.to(self.device)
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.eval_fn = eval_fn
        self.extra_state = extra_state or {}
        cfg = self.config
        if cfg.batch_size < self.world_size:
            raise ValueError(f"train.batch_size {cfg.batch_size} is smaller than the "
                             f"{self.world_size} processes")
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step_module = D.ObjectiveModule(self.model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_module = DistributedDataParallel(step_module, device_ids=device_ids,
                                                  find_unused_parameters=True)
        self.step_module = step_module
        self._closed = False
        self.step = self.epoch = self.step_in_epoch = 0
        self._running = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum, count]
        self.history: list[dict] = []
        self.last_eval: dict[str, float] = {}

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints" / "last.pt"

    def state_dict(self) -> dict:
        states = [rng_state()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, rng_state())
        return {"format": 1, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "running": self._running.cpu(),
                "rng": states, "world_size": self.world_size, "train_config": asdict(self.config),
                "extra": self.extra_state, "last_eval": dict(self.last_eval)}

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        state = self.state_dict()  # every rank joins the RNG gather
        if self.rank == 0:
            save_atomic(state, self.checkpoint_path)
        D.barrier()

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state["train_config"].items() if k not in _RESUMABLE_CHANGES}
        now = {k: v for k, v in asdict(self.config).items() if k not in _RESUMABLE_CHANGES}
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
            raise ValueError(f"cannot resume: the training config differs from the checkpoint's "
                             f"(saved, now): {diff}; use another run directory")
        if state["world_size"] != self.world_size:
            raise ValueError(f"cannot resume: checkpoint written by {state['world_size']} processes, "
                             f"now {self.world_size}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self._running = state["running"].to(self.device)
        self.last_eval = dict(state.get("last_eval", {}))
        set_rng_state(state["rng"][self.rank])

    # ----------------------------------------------------------------- training
    def _steps_per_epoch(self) -> int:
        n, B = len(self.data), self.config.batch_size
        full, rest = divmod(n, B)
        return full + (1 if rest >= self.world_size else 0)  # every rank needs a sample

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=gen)

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, index: torch.Tensor) -> None:
        cfg = self.config
        local = index[self.rank::self.world_size]
        batch = batch_to(self.data.batch(local), self.device)
        with self._autocast():
            loss, value = self.step_module(batch["x"], batch["observed"], kind=cfg.objective,
                                           num_samples=cfg.num_samples, beta=cfg.beta)
        # Weight so that DDP's average over ranks is the mean over the global batch.
        loss = loss.float() * (len(local) * self.world_size / len(index))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self._running += torch.stack([value.detach().double().sum(),
                                      torch.tensor(float(len(local)), dtype=torch.float64, device=self.device)])

    def _log_running(self, bar) -> None:
        running = self._running.clone()
        if self.world_size > 1:
            dist.all_reduce(running)
        total, count = running.tolist()
        self._running.zero_()
        if count == 0:
            return
        objective = total / count
        row = {"step": self.step, "epoch": self.epoch, "train/objective": objective}
        self.history.append(row)
        if self.logger is not None:
            self.logger.log(self.step, self.epoch, {"train/objective": objective})
        if bar is not None:
            bar.set_postfix(objective=f"{objective:.4g}", epoch=self.epoch)

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` on rank 0 under a forked RNG; returns (and logs) its metrics."""
        results: dict[str, float] = {}
        if self.eval_fn is not None and self.rank == 0:
            was_training = self.model.training
            self.model.eval()
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(self.config.seed + 12345)
                results = {k: float(v) for k, v in self.eval_fn(self.model).items()}
            self.model.train(was_training)
            if self.logger is not None:
                self.logger.log(self.step, self.epoch, {f"eval/{k}": v for k, v in results.items()})
            self.last_eval = results
        D.barrier()
        return results

    def fit(self, resume: bool = True, max_steps: int | None = None) -> dict:
        """Train to ``config.epochs`` (or stop after global step ``max_steps``, checkpointing
        first), resuming from ``<run_dir>/checkpoints/last.pt`` when it exists and ``resume``.

        Returns a summary: step, epoch, the last logged training objective and last evaluation.
        """
        if self._closed:
            raise RuntimeError("this Trainer was closed (its DistributedDataParallel wrapper was "
                               "released); make a new Trainer to train again")
        cfg = self.config
        resumed = False
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_state_dict(load_checkpoint(self.checkpoint_path, map_location=self.device))
            resumed = True
        else:
            torch.manual_seed(cfg.seed + 7919 * self.rank)
        self.logger = None
        if self.run_dir is not None:
            tb = {"auto": "auto", "on": True, "off": False}[cfg.tensorboard]
            self.logger = MetricsLogger(self.run_dir, tensorboard=tb, enabled=self.rank == 0,
                                        resume_step=self.step if resumed else None)
        steps_per_epoch = self._steps_per_epoch()
        total = steps_per_epoch * cfg.epochs
        bar = None
        if cfg.progress and self.rank == 0 and total > self.step:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True, leave=True)
        self.model.train()
        B = cfg.batch_size
        try:
            while self.epoch < cfg.epochs:
                order = self._epoch_order(self.epoch)
                while self.step_in_epoch < steps_per_epoch:
                    j = self.step_in_epoch
                    self._train_step(order[j * B:(j + 1) * B])
                    self.step += 1
                    self.step_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.log_every == 0:
                        self._log_running(bar)
                    if cfg.checkpoint_steps and self.step % cfg.checkpoint_steps == 0:
                        self.save_checkpoint()
                    if max_steps is not None and self.step >= max_steps:
                        self.save_checkpoint()
                        return self._summary()
                if self.step % cfg.log_every:
                    self._log_running(bar)  # the epoch's last, partial window
                self.epoch += 1
                self.step_in_epoch = 0
                last = self.epoch == cfg.epochs
                if last or (cfg.eval_every and self.epoch % cfg.eval_every == 0):
                    self.evaluate()
                if last or (cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0):
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.close()
        return self._summary()

    def close(self) -> None:
        """Release the DistributedDataParallel wrapper now, while the interpreter is fully alive.

        DDP's reducer holds the process group and tensors with Python references; left to the
        interpreter's finalisation, its destruction can race gloo's worker threads and abort the
        process after a successful run ("terminate called without an active exception"). Call
        this before :func:`mmfast.train.distributed.teardown`. Harmless on one process; the model
        and its weights stay usable, but :meth:`fit` refuses to run afterwards.
        """
        if self._closed:
            return
        self._closed = True
        if self.world_size > 1:
            self.step_module = self.step_module.module  # drop the DDP wrapper and its reducer
            gc.collect()

    def _summary(self) -> dict:
        last = self.history[-1]["train/objective"] if self.history else math.nan
        return {"step": self.step, "epoch": self.epoch, "train/objective": last,
                **{f"eval/{k}": v for k, v in self.last_eval.items()}}


def config_from_dict(values: dict) -> TrainConfig:
    """A :class:`TrainConfig` from a dict; an unknown key is an error."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown train option(s) {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig(**values)
