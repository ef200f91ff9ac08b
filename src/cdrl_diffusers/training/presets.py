"""Presets of the training script: network sizes and the embedded datasets that need no download."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from ..data import load_digits_dataset, load_shapes_dataset
from ..models import EnergyModel, InitializerUNet

# Network sizes. "cpu" trains in minutes on a laptop CPU; "paper32" is the paper's 32x32 pair (App. A.1, Table 6):
# the defaults of EnergyModel and InitializerUNet.
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        # Three resolutions (16, 8, 4 at 16x16): the spatial sum of the readout then pools features that see the
        # whole image. With two, f_hat was a sum of local patch scores and could not tell a shape from a blob.
        # No spectral norm (App. A.1 has it): without it the shapes scored 0.49 / 0.55 clean at 768 / 1,536 steps,
        # against 0.45 / 0.48 with it, at the same cost per step and the same density (docs/training.md).
        # Channels (16, 32, 64): a training step 1.5 times as fast as with (32, 64, 128); in the same time (48 epochs
        # against 32) the shapes scored 0.922 clean against 0.793, with the same density (docs/training.md).
        "energy_model": {
            "block_out_channels": (16, 32, 64),
            "layers_per_block": 1,
            "embedding_dim": 64,
            "use_spectral_norm": False,
        },
        # No dropout (App. A.1 has 0.1): on a CPU dropout's random masks cost 40 % of the initializer's forward pass
        # and its regularisation is not needed in runs of a few thousand steps (shapes: 0.500 clean at 768 steps and
        # 11 % less time per step, against 0.491 with it). Channels (16, 32): a quarter of the arithmetic of (32, 64)
        # and a training step 38 % cheaper; in the same time (22 epochs against 14) the shapes scored 0.715 / 0.714
        # clean on two seeds, against 0.670 / 0.569 (docs/training.md).
        "initializer": {
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "attention_resolutions": (),
            "norm_num_groups": 8,
            "dropout": 0.0,
        },
    },
    "paper32": {"energy_model": {}, "initializer": {}},
}

# The embedded datasets: a loader of the resolution, and the name recorded in the model card.
EMBEDDED_DATASETS: dict[str, tuple[Callable[[int], datasets.Dataset], str]] = {
    "shapes": (lambda resolution: load_shapes_dataset(resolution=resolution, seed=0), "cdrl-shapes"),
    "digits": (lambda resolution: load_digits_dataset(resolution=resolution), "sklearn-digits"),
}


def load_embedded_dataset(name: str, resolution: int) -> tuple[datasets.Dataset, str]:
    """The embedded dataset ``name`` at ``resolution`` and its name for the model card.

    ``"shapes"``: 4096 procedural coloured shapes (``ClassLabel`` columns shape, color, size); ``"digits"``:
    scikit-learn's 8x8 digits upsampled (1 channel, column label).
    """
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"`embedded_dataset` must be one of {sorted(EMBEDDED_DATASETS)}, got {name!r}.")
    load, card_name = EMBEDDED_DATASETS[name]
    return load(resolution), card_name


def build_models(
    preset: str,
    resolution: int,
    channels: int,
    class_names: list[str] | None = None,
    conditional_initializer: bool = False,
    energy_overrides: dict[str, Any] | None = None,
    initializer_overrides: dict[str, Any] | None = None,
) -> tuple[EnergyModel, InitializerUNet]:
    """The EBM and initializer of ``preset``, with the given entries of ``*_overrides`` replacing the preset's.

    A conditional EBM gets one class per name of ``class_names`` (stored in its config); the initializer is
    conditional too when ``conditional_initializer`` (class-conditional training, Sec. 3.5), unconditional otherwise
    (compositional training, Sec. 4.5).
    """
    if preset not in MODEL_PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(MODEL_PRESETS)}, got {preset!r}.")
    energy_kwargs = {**MODEL_PRESETS[preset]["energy_model"], **(energy_overrides or {})}
    initializer_kwargs = {**MODEL_PRESETS[preset]["initializer"], **(initializer_overrides or {})}
    num_classes = len(class_names) if class_names else None
    energy_model = EnergyModel(
        sample_size=resolution,
        in_channels=channels,
        num_class_embeds=num_classes,
        class_names=class_names,
        **energy_kwargs,
    )
    initializer = InitializerUNet(
        sample_size=resolution,
        in_channels=channels,
        num_class_embeds=num_classes if conditional_initializer else None,
        **initializer_kwargs,
    )
    return energy_model, initializer
