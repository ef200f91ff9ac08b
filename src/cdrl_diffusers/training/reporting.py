"""What a training run reports: per-level diagnostics, sample grids, trackers, the exported pipeline and its upload."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
from accelerate.utils import is_tensorboard_available, is_wandb_available
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, upload_folder

from ..pipelines import CDRLPipeline
from .checkpointing import replace_folder_atomically
from .step import LEVEL_METRICS, CDRLTrainingOutput

if TYPE_CHECKING:
    from accelerate import Accelerator

# The trackers the training script logs to, and the package each needs.
TRACKERS = {"tensorboard": (is_tensorboard_available, "tensorboard"), "wandb": (is_wandb_available, "wandb")}


def check_tracker_available(name: str) -> None:
    """Fail before training when the tracker ``name`` cannot be imported (Accelerate would drop it silently)."""
    if name not in TRACKERS:
        raise ValueError(f"`--logger` must be one of {sorted(TRACKERS)}, got {name!r}.")
    available, package = TRACKERS[name]
    if not available():
        raise ImportError(f"`--logger {name}` needs {package}: `pip install {package}`, or choose another `--logger`.")


class StepMetrics:
    """Per-level sums of the training-step diagnostics over the micro-batches of one update.

    ``reduce`` averages them over all examples of all processes, for logging and for the health monitor.
    """

    def __init__(self, num_levels: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(len(LEVEL_METRICS), num_levels, device=device)
        self.counts = torch.zeros(num_levels, device=device)

    def add(self, output: CDRLTrainingOutput) -> None:
        counts = output.level_counts.float().to(self.counts.device)
        values = torch.stack([torch.nan_to_num(output.level_metrics[name]) for name in LEVEL_METRICS])
        self.sums += values.to(self.sums.device) * counts
        self.counts += counts

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """``(logs, level_metrics)``, then start over.

        ``logs``: overall means (``train/<name>``) and the means of each level present (``level_<t>/<name>``);
        ``level_metrics``: per-level means of shape (T,), NaN for levels absent from the update, on the CPU.
        """
        totals = accelerator.reduce(torch.cat([self.sums.flatten(), self.counts]), reduction="sum").cpu()
        sums, counts = totals[: self.sums.numel()].view_as(self.sums), totals[self.sums.numel() :]
        logs = {f"train/{name}": (sums[i].sum() / counts.sum()).item() for i, name in enumerate(LEVEL_METRICS)}
        means = torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)
        level_metrics = {name: means[i] for i, name in enumerate(LEVEL_METRICS)}
        for level in torch.nonzero(counts).flatten().tolist():
            logs.update({f"level_{level}/{name}": means[i, level].item() for i, name in enumerate(LEVEL_METRICS)})
        self.sums.zero_()
        self.counts.zero_()
        return logs, level_metrics


def _to_pil(pipeline: CDRLPipeline, images: torch.Tensor, upscale: int) -> list[PIL.Image.Image]:
    pil = pipeline.image_processor.numpy_to_pil(pipeline.image_processor.pt_to_numpy(images.float().cpu()))
    return [image.resize((image.width * upscale, image.height * upscale), PIL.Image.NEAREST) for image in pil]


@torch.no_grad()
def sample_grid(pipeline: CDRLPipeline, num_images: int, seed: int = 0) -> PIL.Image.Image:
    """The initializer's proposals alone (left) next to the full CDRL samples (right) from the same x_T (Fig. 8).

    Both panels come from ``pipeline``: the left one with ``num_langevin_steps=0``. A conditional model gets one
    class per column (in the order of ``pipeline.class_names``) when it has at most 12 classes.
    """
    device = pipeline.device
    columns, batch, num_classes = _grid_layout(pipeline, num_images)
    labels = None if num_classes is None else torch.arange(batch, device=device) % num_classes
    latents = randn_tensor(
        (batch, *pipeline.sample_shape), generator=torch.Generator().manual_seed(seed), device=device
    )
    upscale = max(1, 64 // pipeline.sample_shape[-1])
    panels = []
    for num_langevin_steps in (0, None):
        images = pipeline(
            batch_size=batch,
            class_labels=labels,
            latents=latents.clone(),
            num_langevin_steps=num_langevin_steps,
            generator=torch.Generator(device).manual_seed(seed + 1),
            output_type="pt",
        ).images
        grid = make_image_grid(_to_pil(pipeline, images, upscale), rows=batch // columns, cols=columns)
        panels.append(grid.convert("RGB"))
    gap = 8 * upscale // 2
    grid = PIL.Image.new("RGB", (panels[0].width * 2 + gap, panels[0].height), "white")
    grid.paste(panels[0], (0, 0))
    grid.paste(panels[1], (panels[0].width + gap, 0))
    return grid


def _grid_layout(pipeline: CDRLPipeline, num_images: int) -> tuple[int, int, int | None]:
    """(columns, batch, classes): one class per column for a conditional model with at most 12 classes."""
    num_classes = pipeline.energy_model.config.num_class_embeds
    columns = num_classes if num_classes is not None and num_classes <= 12 else min(8, num_images)
    return columns, math.ceil(num_images / columns) * columns, num_classes


def data_grid(
    pipeline: CDRLPipeline, images: torch.Tensor, labels: torch.Tensor | None, num_images: int
) -> PIL.Image.Image:
    """Training images (in [-1, 1]) laid out like one panel of ``sample_grid``, the reference for the samples.

    For a conditional model with at most 12 classes, column c holds images of class c (``labels``); otherwise the
    images come in order. A class with fewer images than rows repeats its images; a class without any is left black.
    """
    columns, batch, num_classes = _grid_layout(pipeline, num_images)
    if num_classes is not None and num_classes <= 12 and labels is not None:
        picked = []
        for index in range(batch):
            of_class = torch.nonzero(labels == index % columns).flatten()
            row = index // columns
            picked.append(images[of_class[row % len(of_class)]] if len(of_class) else torch.full_like(images[0], -1))
        picked = torch.stack(picked)
    else:
        picked = images[torch.arange(batch) % len(images)]
    upscale = max(1, 64 // pipeline.sample_shape[-1])
    pil = _to_pil(pipeline, (picked + 1) / 2, upscale)
    return make_image_grid(pil, rows=batch // columns, cols=columns).convert("RGB")


def log_image(accelerator: Accelerator, tracker: str, grid: PIL.Image.Image, step: int, tag: str = "samples") -> None:
    """Log ``grid`` to the tracker ``tracker`` (``"tensorboard"`` or ``"wandb"``) of ``accelerator``."""
    if tracker == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
    else:
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({tag: wandb.Image(grid)}, step=step)


def export_pipeline(
    pipeline: CDRLPipeline,
    output_dir: str,
    grid: PIL.Image.Image,
    training_details: Mapping[str, Any] | None = None,
    card_folder: str | None = None,
    real_grid: PIL.Image.Image | None = None,
    **card_kwargs: Any,
) -> None:
    """``save_pretrained`` into ``output_dir``, with the sample grid ``samples.png`` and a model card showing it.

    ``card_folder`` is the folder the card's usage snippet names (default ``output_dir``; differs when the export is
    renamed afterwards); ``real_grid`` (``data_grid``) is saved as ``data.png`` and shown beside the samples;
    ``card_kwargs`` (``repo_id``, ``dataset_name``, ``dataset_id``) go to the card.
    """
    os.makedirs(output_dir, exist_ok=True)
    grid.save(os.path.join(output_dir, "samples.png"))
    if real_grid is not None:
        real_grid.save(os.path.join(output_dir, "data.png"))
    card = pipeline.create_model_card(
        folder=output_dir if card_folder is None else card_folder,
        training_details=training_details,
        sample_grid="samples.png",
        data_grid=None if real_grid is None else "data.png",
        **card_kwargs,
    )
    pipeline.save_pretrained(output_dir, model_card=card)


# What ``push_to_hub`` leaves out of the upload: checkpoints, logs, intermediate grids, the best model, caches.
UPLOAD_IGNORE_PATTERNS = ("checkpoint-*", ".checkpoint-*", "samples/*", "best/*", ".best.tmp/*", "evaluation/*")


def push_to_hub(
    output_dir: str,
    repo_name: str,
    token: str | None = None,
    private: bool = False,
    ignore_patterns: tuple[str, ...] = UPLOAD_IGNORE_PATTERNS,
) -> str:
    """Upload the exported pipeline in ``output_dir`` (with its model card) to the Hub repository ``repo_name``.

    Returns the repository id. Any failure (no network, no token, no permission) raises a ``RuntimeError`` saying
    that the local copy is complete and how to upload it later.
    """
    try:
        repo_id = create_repo(repo_name, exist_ok=True, token=token, private=private).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message="End of training",
            ignore_patterns=list(ignore_patterns),
            token=token,
        )
    except Exception as error:  # no network, no token, no permission: say so, the local copy is complete
        raise RuntimeError(
            f"Uploading to the Hub repository {repo_name!r} failed ({type(error).__name__}: {error}). The trained "
            f"pipeline is saved in {output_dir}; upload it later with "
            f"`huggingface_hub.upload_folder(repo_id=..., folder_path={output_dir!r})`."
        ) from error
    return repo_id


class RunOutputs:
    """What a training run writes into ``output_dir``: sample grids, exported pipelines, the best pipeline.

    Args:
        accelerator: the run's ``Accelerator`` (its tracker gets the grids).
        output_dir: the run's folder.
        tracker: ``"tensorboard"`` or ``"wandb"``.
        num_images: images per sample grid (``sample_grid``), drawn from ``seed``.
        real_data: training images in [-1, 1] and their class labels (or ``None``), shown beside the samples in the
            model card (``data_grid``).
        card_kwargs: for the model card of exported pipelines (``repo_id``, ``dataset_name``, ``dataset_id``).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str,
        tracker: str,
        num_images: int,
        seed: int = 0,
        real_data: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        **card_kwargs: Any,
    ):
        self.accelerator, self.output_dir, self.tracker = accelerator, output_dir, tracker
        self.num_images, self.seed, self.card_kwargs = num_images, seed, card_kwargs
        self.real_data = real_data

    def _real_grid(self, pipeline: CDRLPipeline) -> PIL.Image.Image | None:
        return None if self.real_data is None else data_grid(pipeline, *self.real_data, self.num_images)

    def samples(self, pipeline: CDRLPipeline, step: int) -> PIL.Image.Image:
        """A sample grid of ``pipeline``, written to ``samples/step_<step>.png`` and logged to the tracker."""
        grid = sample_grid(pipeline, self.num_images, self.seed)
        os.makedirs(os.path.join(self.output_dir, "samples"), exist_ok=True)
        grid.save(os.path.join(self.output_dir, "samples", f"step_{step:07d}.png"))
        log_image(self.accelerator, self.tracker, grid, step)
        return grid

    def export(self, pipeline: CDRLPipeline, details: Mapping[str, Any], grid: PIL.Image.Image) -> None:
        """``export_pipeline`` into ``output_dir`` with the model card facts ``details``."""
        export_pipeline(
            pipeline, self.output_dir, grid, details, real_grid=self._real_grid(pipeline), **self.card_kwargs
        )

    def export_best(self, pipeline: CDRLPipeline, details: Mapping[str, Any]) -> str:
        """Export ``pipeline`` to ``output_dir/best`` atomically (a hidden ``.best.tmp`` renamed); returns the path."""
        temporary, best = os.path.join(self.output_dir, ".best.tmp"), os.path.join(self.output_dir, "best")
        shutil.rmtree(temporary, ignore_errors=True)
        grid = sample_grid(pipeline, self.num_images, self.seed)
        real_grid = self._real_grid(pipeline)
        export_pipeline(pipeline, temporary, grid, details, card_folder=best, real_grid=real_grid, **self.card_kwargs)
        replace_folder_atomically(temporary, best)
        return best
