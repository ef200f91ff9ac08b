"""cdrl_diffusers: energy-based models trained by Cooperative Diffusion Recovery Likelihood, the diffusers way.

Every public class is imported eagerly: diffusers resolves the components recorded in ``model_index.json`` by
looking them up in this module, so ``CDRLPipeline.from_pretrained`` needs them importable from here.
"""

__version__ = "0.1.0"

from .acceleration import fold_spectral_norm
from .guidance import ConditionWeights
from .model_card import create_model_card, read_model_card_section
from .models import EnergyMLP, EnergyModel, EnergyModelOutput, InitializerMLP, InitializerOutput, InitializerUNet
from .pipelines import CDRLComposePipeline, CDRLInpaintPipeline, CDRLPipeline
from .schedulers import CDRLScheduler, LangevinCoefficients
from .training import (
    CDRLTrainingOutput,
    cdrl_training_step,
    create_ema_model,
    decay_multiplier,
    drop_labels,
    warmup_multiplier,
)

__all__ = [
    "CDRLComposePipeline",
    "CDRLInpaintPipeline",
    "CDRLPipeline",
    "CDRLScheduler",
    "CDRLTrainingOutput",
    "ConditionWeights",
    "EnergyMLP",
    "EnergyModel",
    "EnergyModelOutput",
    "InitializerMLP",
    "InitializerOutput",
    "InitializerUNet",
    "LangevinCoefficients",
    "cdrl_training_step",
    "create_ema_model",
    "create_model_card",
    "read_model_card_section",
    "drop_labels",
    "fold_spectral_norm",
    "decay_multiplier",
    "warmup_multiplier",
]
