"""Training: decoder-norm-constrained Adam, schedules, dead-latent resampling, checkpoints, and the trainer that
trains many SAEs from one activation stream."""

from saeforge.training.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                         load_newest_good_checkpoint, save_checkpoint)
from saeforge.training.optim import ConstrainedAdam
from saeforge.training.schedules import CoeffSchedule, LRSchedule
from saeforge.training.synthetic import SyntheticStream
from saeforge.training.trainer import Trainer, TrainingError, TrainResult

__all__ = ["CheckpointError", "CoeffSchedule", "ConstrainedAdam", "LRSchedule", "SyntheticStream", "TrainResult",
           "Trainer", "TrainingError", "latest_checkpoint", "load_checkpoint",
           "load_newest_good_checkpoint", "save_checkpoint"]
