"""Run under ``torchrun --nproc_per_node 2``: train the deterministic toy model with the Trainer
and save each rank's final parameters (and whether DDP was used) to ``<out>/rank<r>.pt``."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _toy_model import ToyModel, toy_data  # noqa: E402
from mmfast.train import TrainConfig, Trainer  # noqa: E402
from mmfast.train.distributed import teardown  # noqa: E402

out = sys.argv[1]
torch.manual_seed(0)
trainer = Trainer(ToyModel(stochastic=False), toy_data(n=45),
                  TrainConfig(epochs=2, batch_size=15, lr=1e-2, progress=False, log_every=1,
                              tensorboard="off", grad_clip=0.5),
                  run_dir=os.path.join(out, "run"))
summary = trainer.fit()
wrapper = type(trainer.step_module).__name__
trainer.close()  # release DDP's reducer before the process group goes (see Trainer.close)
torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()],
            "ddp": wrapper, "world": trainer.world_size,
            "summary": summary}, os.path.join(out, f"rank{trainer.rank}.pt"))
teardown()
