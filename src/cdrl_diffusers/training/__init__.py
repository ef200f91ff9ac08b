"""Training CDRL: the cooperative step of Algorithm 1 and the optimisation schedule of App. A.2."""

from .health import DivergenceError, TrainingHealthMonitor
from .step import (
    LEVEL_METRICS,
    CDRLTrainingOutput,
    cdrl_training_step,
    create_ema_model,
    drop_labels,
    warmup_multiplier,
)

__all__ = [
    "LEVEL_METRICS",
    "CDRLTrainingOutput",
    "DivergenceError",
    "TrainingHealthMonitor",
    "cdrl_training_step",
    "create_ema_model",
    "drop_labels",
    "warmup_multiplier",
]
