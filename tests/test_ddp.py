"""DistributedDataParallel under torchrun: 2 CPU processes with gloo train exactly like one
process on the same global batches (batch 15 splits 8/7: the loss weighting makes it exact)."""
import os
import subprocess
import sys

import torch

from _toy_model import ToyModel, toy_data
from mmfast.train import TrainConfig, Trainer, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def test_torchrun_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["ddp"] == "DistributedDataParallel" and r0["world"] == 2
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)                       # ranks stay in sync

    torch.manual_seed(0)
    single = Trainer(ToyModel(stochastic=False), toy_data(n=45),
                     TrainConfig(epochs=2, batch_size=15, lr=1e-2, progress=False, log_every=1,
                                 tensorboard="off", grad_clip=0.5))
    single.fit()
    for p, q in zip(single.model.parameters(), r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    # the logged objective is the global-batch mean, as in one process
    rows = [r["value"] for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["name"] == "train/objective"]
    expected = [h["train/objective"] for h in single.history]
    assert len(rows) == len(expected) == 6
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
