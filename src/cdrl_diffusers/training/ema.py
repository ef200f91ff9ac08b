"""Export of the exponential moving average of the weights (App. A.2), for sampling, evaluation and saving.

``diffusers.training_utils.EMAModel`` averages parameters only. Spectral normalisation (App. A.1) keeps its power-
iteration vectors u, v as buffers, estimated for the training weights; after the averaged weights are copied in,
``refresh_spectral_norm`` re-estimates them, so the exported EBM divides each weight by its own spectral norm.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel
from torch import nn
from torch.nn.utils import parametrize

from ..pipelines import CDRLPipeline
from ..schedulers import CDRLScheduler


@torch.no_grad()
def refresh_spectral_norm(model: nn.Module, iterations: int = 20) -> None:
    """Run ``iterations`` power iterations of every spectrally normalised weight of ``model`` for its current weights.

    Reading a parametrised weight in training mode runs one power iteration of
    ``torch.nn.utils.parametrizations.spectral_norm``; the model's training mode is restored afterwards. Models
    without spectral normalisation are left unchanged.
    """
    was_training = model.training
    model.train()
    modules = [module for module in model.modules() if parametrize.is_parametrized(module, "weight")]
    for _ in range(iterations):
        for module in modules:
            module.weight  # noqa: B018 (the read runs the power iteration)
    model.train(was_training)


def ema_copy(model: nn.Module, ema: EMAModel, refresh_iterations: int = 20) -> nn.Module:
    """A fresh copy of ``model`` (a diffusers ``ModelMixin``) in eval mode, holding the weights averaged by ``ema``.

    The training model is left untouched; the copy's spectral-norm vectors are re-estimated for the averaged weights
    (``refresh_spectral_norm``).
    """
    copy = type(model).from_config(model.config).to(model.device)
    copy.load_state_dict(model.state_dict())
    ema.copy_to(copy.parameters())
    refresh_spectral_norm(copy, refresh_iterations)
    return copy.eval()


def ema_pipeline(
    energy_model: nn.Module,
    initializer: nn.Module,
    ema_energy: EMAModel,
    ema_initializer: EMAModel,
    scheduler: CDRLScheduler,
) -> CDRLPipeline:
    """A ``CDRLPipeline`` of EMA copies (``ema_copy``) of the two networks, with its progress bar off."""
    pipeline = CDRLPipeline(
        energy_model=ema_copy(energy_model, ema_energy),
        initializer=ema_copy(initializer, ema_initializer),
        scheduler=scheduler,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
