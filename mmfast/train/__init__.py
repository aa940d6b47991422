"""Training: :class:`Trainer` (Adam/AdamW, clipping, seeding, progress bar, periodic evaluation,
atomic resumable checkpoints, CSV/TensorBoard metrics, bf16 autocast on GPU, DDP under torchrun)."""
from mmfast.train.checkpoint import load_checkpoint, save_atomic
from mmfast.train.metrics import MetricsLogger, read_metrics
from mmfast.train.trainer import TrainConfig, Trainer, config_from_dict, resolve_device

__all__ = ["Trainer", "TrainConfig", "config_from_dict", "resolve_device", "save_atomic",
           "load_checkpoint", "MetricsLogger", "read_metrics"]
