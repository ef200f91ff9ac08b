"""A class-conditional DDPM/DDIM baseline built from diffusers' classes, trained under a wall-clock budget.

The model a user would pick instead of CDRL: a ``UNet2DModel`` predicting the noise (epsilon) with the MSE loss of
``DDPMScheduler``'s forward process, classifier-free guidance through one extra null class in ``num_class_embeds``
(labels dropped with a probability, as CDRL's ``--label_dropout``), an EMA of the weights as CDRL's training script
keeps, and deterministic ``DDIMScheduler`` sampling. Guidance follows CDRL's convention (the paper's Eq. 11-12):
(1 + w) eps(x_t, c) - w eps(x_t), so w = 0 is the conditional model and the same w means the same mixing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup

from cdrl_diffusers.training import create_ema_model, drop_labels, ema_copy

# The benchmarks' baseline: a convolutional UNet2DModel whose (32, 64) channels with two ResNet blocks per level give
# about as many parameters as the CPU recipe's EBM and initializer together (both counts are printed and recorded), and
# the usual diffusers training choices; the label dropout (0.1), warm-up (200 steps) and EMA decay are CDRL's.
BASELINE_UNET = {"block_out_channels": (32, 64), "layers_per_block": 2, "norm_num_groups": 8}
BASELINE_TRAINING = {
    "batch_size": 64,
    "learning_rate": 1e-3,
    "warmup_steps": 200,
    "label_dropout": 0.1,
    "ema_decay": 0.9999,
}
BASELINE_TRAIN_TIMESTEPS = 1000


def build_unet(
    sample_size: int,
    in_channels: int,
    num_classes: int,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 2,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A convolutional ``UNet2DModel`` (no attention) with ``num_classes + 1`` class embeddings; the last is null."""
    levels = len(block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_classes + 1,
    )


def null_label(model: UNet2DModel) -> int:
    """The index of the null (unconditional) class: the last class embedding."""
    return model.config.num_class_embeds - 1


@dataclass
class BudgetedTraining:
    """What ``train_with_budget`` did: optimisation steps, wall-clock seconds of its loop, the loss of each step."""

    steps: int
    seconds: float
    losses: list[float]


def train_with_budget(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    seconds: float,
    max_steps: int | None = None,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    warmup_steps: int = 200,
    label_dropout: float = 0.1,
    ema_decay: float = 0.9999,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> tuple[UNet2DModel, BudgetedTraining]:
    """Train ``model`` to predict the noise that ``scheduler.add_noise`` mixed in, until ``seconds`` or ``max_steps``.

    Each step draws a batch of ``images`` (in [-1, 1], (N, C, H, W)) from a seeded reshuffle per epoch, replaces
    labels by the null class with probability ``label_dropout``, draws timesteps uniformly over the training
    schedule and takes an AdamW step on the MSE between the predicted and the true noise (learning rate warmed up
    linearly over ``warmup_steps``, gradient norm clipped to ``max_grad_norm``). The clock is checked before every
    step, so the loop ends within one step of the budget.

    Returns:
        An EMA copy of the trained weights (diffusers' ``EMAModel``, decay ``ema_decay``) in eval mode, and the record.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    ema = create_ema_model(model, ema_decay)
    null = null_label(model)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    start = time.perf_counter()
    while (max_steps is None or len(losses) < max_steps) and time.perf_counter() - start < seconds:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        clean = images[batch]
        class_labels = drop_labels(labels[batch], null, label_dropout, generator)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        prediction = model(scheduler.add_noise(clean, noise, timesteps), timesteps, class_labels=class_labels).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        ema.step(model.parameters())
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    model.eval()
    return ema_copy(model, ema), BudgetedTraining(steps=len(losses), seconds=elapsed, losses=losses)


@dataclass
class TrainedBaseline:
    """The EMA model of ``train_baseline``, its DDIM sampler, the training record and its description for a report."""

    model: UNet2DModel
    ddim: DDIMScheduler
    record: BudgetedTraining
    description: dict


def train_baseline(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, seconds: float, **training_overrides
) -> TrainedBaseline:
    """The benchmarks' baseline (``BASELINE_UNET``, ``BASELINE_TRAINING`` with ``training_overrides``), trained on
    ``images`` (N, C, H, W) in [-1, 1] with ``labels`` in [0, num_classes) for ``seconds``; seeded."""
    torch.manual_seed(0)
    model = build_unet(images.shape[-1], images.shape[1], num_classes, **BASELINE_UNET)
    print(f"Diffusion baseline: {model.num_parameters():,} parameters; training for {seconds:.0f} s", flush=True)
    ddpm = DDPMScheduler(num_train_timesteps=BASELINE_TRAIN_TIMESTEPS)
    training = {**BASELINE_TRAINING, **training_overrides}
    model, record = train_with_budget(model, ddpm, images, labels, seconds=seconds, **training)
    final_loss = float(sum(record.losses[-100:]) / len(record.losses[-100:])) if record.losses else None
    print(f"Diffusion baseline: {record.steps} steps in {record.seconds:.0f} s, final loss {final_loss}", flush=True)
    description = {
        "model": {"class": "UNet2DModel", **BASELINE_UNET, "num_class_embeds": model.config.num_class_embeds},
        "parameters": model.num_parameters(),
        "training": {
            **training,
            "optimizer": "AdamW",
            "loss": "epsilon MSE",
            "scheduler": f"DDPMScheduler({BASELINE_TRAIN_TIMESTEPS} steps)",
            "budget_seconds": seconds,
        },
        "train_seconds": record.seconds,
        "train_steps": record.steps,
        "final_loss_mean_last_100": final_loss,
    }
    return TrainedBaseline(model, DDIMScheduler.from_config(ddpm.config), record, description)


@torch.no_grad()
def guided_noise_prediction(
    model: UNet2DModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    class_labels: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """(1 + w) eps(x_t, c) - w eps(x_t, null): classifier-free guidance in the convention of the paper's Eq. 11-12.

    Both terms run in one batched forward pass; at w = 0 only the conditional one runs (as CDRL's sampler skips
    terms of weight zero).
    """
    if guidance_scale == 0:
        return model(sample, timestep, class_labels=class_labels).sample
    null = torch.full_like(class_labels, null_label(model))
    both = model(torch.cat([sample, sample]), timestep, class_labels=torch.cat([class_labels, null])).sample
    conditional, unconditional = both.chunk(2)
    return (1 + guidance_scale) * conditional - guidance_scale * unconditional


@torch.no_grad()
def ddim_sample(
    model: UNet2DModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    guidance_scale: float = 0.0,
    num_inference_steps: int = 50,
) -> torch.Tensor:
    """Guided DDIM sampling (eta = 0, deterministic given ``latents``) for one class label per sample.

    ``scheduler`` is typically ``DDIMScheduler.from_config(ddpm_scheduler.config)``; with its default
    ``clip_sample=True`` and ``set_alpha_to_one=True`` the last step returns the clipped x_0 prediction, in [-1, 1].
    """
    scheduler.set_timesteps(num_inference_steps)
    sample = latents * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        noise = guided_noise_prediction(model, sample, timestep, class_labels, guidance_scale)
        sample = scheduler.step(noise, timestep, sample, eta=0.0).prev_sample
    return sample
