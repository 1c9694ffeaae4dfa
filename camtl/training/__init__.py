"""Multi-task training: samplers (proportional, uniform, MT-Uncertainty) and the Trainer."""

from camtl.training.samplers import SAMPLING, MultiTaskBatchSampler, mt_uncertainty_select
from camtl.training.trainer import (CheckpointError, NonFiniteLossError, OutputDirInUseError, Trainer,
                                    TrainingArguments, TrainingInterrupted, freeze_encoder_layers)

__all__ = ["SAMPLING", "MultiTaskBatchSampler", "mt_uncertainty_select", "Trainer", "TrainingArguments",
           "TrainingInterrupted", "NonFiniteLossError", "CheckpointError", "OutputDirInUseError",
           "freeze_encoder_layers"]
