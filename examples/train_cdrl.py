#!/usr/bin/env python
"""Train a CDRL energy-based model (Cooperative Diffusion Recovery Likelihood, Zhu et al., ICLR 2024) with Accelerate.

The command line mirrors diffusers' ``examples/unconditional_image_generation/train_unconditional.py``. With no flags
it trains a small model on the embedded coloured-shapes dataset in a few minutes on a CPU:

    accelerate launch examples/train_cdrl.py            # or: python examples/train_cdrl.py
    accelerate launch examples/train_cdrl.py --train_data_dir my_images --resolution 32 --model_config paper32
    accelerate launch examples/train_cdrl.py --embedded_dataset digits --label_column label   # class-conditional
    accelerate launch examples/train_cdrl.py --attribute_columns shape color                  # compositional
    torchrun --nproc_per_node 2 examples/train_cdrl.py                                         # CPU data parallel
    accelerate launch examples/train_cdrl.py --eval_steps 500 --keep_best_metric frechet_distance  # held-out metrics

Every iteration calls ``cdrl_training_step`` (Algorithm 1); this script adds data loading, optimisation (App. A.2),
EMA, checkpoints that resume exactly, training-health checks, sample grids, optional held-out evaluation with the
offline metrics of ``cdrl_diffusers.evaluation`` and the export of a ``CDRLPipeline``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import diffusers
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, is_wandb_available, set_seed
from datasets import ClassLabel, load_dataset
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, upload_folder
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from cdrl_diffusers import (
    CDRLPipeline,
    CDRLSampler,
    CDRLScheduler,
    ConditionWeights,
    EnergyModel,
    InitializerUNet,
    cdrl_training_step,
    create_ema_model,
    warmup_multiplier,
)
from cdrl_diffusers.data import load_digits_dataset, load_shapes_dataset
from cdrl_diffusers.evaluation import (
    ClassifierFeatures,
    classifier_accuracy,
    extract_features,
    frechet_distance,
    kernel_distance,
    train_classifier,
)
from cdrl_diffusers.training import LEVEL_METRICS

logger = get_logger(__name__, log_level="INFO")

# Network sizes. "cpu" trains in minutes on a laptop CPU; "paper32" is the paper's 32x32 pair (App. A.1, Table 6):
# the defaults of EnergyModel and InitializerUNet. Explicit --ebm_* / --initializer_* flags override a preset.
MODEL_CONFIGS = {
    "cpu": {
        "energy_model": {"block_out_channels": (32, 64), "layers_per_block": 1, "embedding_dim": 64},
        "initializer": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "attention_resolutions": (),
            "norm_num_groups": 8,
        },
    },
    "paper32": {"energy_model": {}, "initializer": {}},
}
# Sub-folders of a checkpoint and of the exported pipeline.
ENERGY_MODEL, INITIALIZER = "energy_model", "initializer"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# The held-out metrics of --eval_steps, and whether a larger value is better (the choices of --keep_best_metric).
HIGHER_IS_BETTER = {"frechet_distance": False, "kid": False, "accuracy": True}
# The evaluation classifier trains for this many epochs on at most this many training images (a seeded subset of
# larger datasets): a minute or two on a CPU, once per dataset (it is cached).
CLASSIFIER_EPOCHS, CLASSIFIER_MAX_IMAGES = 10, 5_000


def int_list(text: str) -> tuple[int, ...]:
    """Parse "32,64" (or "") into a tuple of ints."""
    return tuple(int(value) for value in text.split(",") if value.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a CDRL energy-based model with Accelerate.")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A dataset of the Hub or a local dataset folder/script, loaded with `datasets.load_dataset`.",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of the dataset, if any.")
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images loaded with the `imagefolder` builder (class sub-folders give a `label` column).",
    )
    data.add_argument(
        "--embedded_dataset",
        type=str,
        default=None,
        choices=["shapes", "digits"],
        help="Data that needs no download: procedural coloured shapes (the default when no dataset is given; "
        "ClassLabel columns shape, color, size) or scikit-learn's 8x8 digits upsampled (1 channel, column label).",
    )
    data.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloaded data.")
    data.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    data.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="Train a class-conditional model (EBM and initializer) on this column, with label dropout for "
        "classifier-free guidance. ClassLabel names are stored in the model, so `class_labels=['cat']` works.",
    )
    data.add_argument(
        "--attribute_columns",
        type=str,
        nargs="+",
        default=None,
        help="Compositional training (Sec. 4.5): each image is assigned to the class of one randomly picked "
        "attribute's value (classes named like 'shape=circle'); conditional EBM, unconditional initializer.",
    )
    data.add_argument("--resolution", type=int, default=16, help="Images are resized and cropped to this size.")
    data.add_argument(
        "--center_crop", action="store_true", help="Crop the centre (default: a random crop) after resizing."
    )
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on a random subset of this size.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config",
        type=str,
        default="cpu",
        choices=sorted(MODEL_CONFIGS),
        help="Network sizes: 'cpu' (small, the default) or 'paper32' (the paper's 32x32 EBM and initializer).",
    )
    model.add_argument("--ebm_channels", type=int_list, default=None, help="EBM channels per resolution, e.g. 32,64.")
    model.add_argument("--ebm_layers_per_block", type=int, default=None, help="EBM residual blocks per resolution.")
    model.add_argument("--ebm_embedding_dim", type=int, default=None, help="Width of the EBM's log-SNR embedding.")
    model.add_argument(
        "--initializer_channels", type=int_list, default=None, help="Initializer UNet channels per resolution."
    )
    model.add_argument(
        "--initializer_layers_per_block", type=int, default=None, help="Initializer UNet blocks per resolution."
    )
    model.add_argument(
        "--initializer_attention_resolutions",
        type=int_list,
        default=None,
        help="Resolutions (pixels) with self-attention in the initializer, e.g. 16,8 ('' for none).",
    )
    model.add_argument(
        "--initializer_norm_num_groups", type=int, default=None, help="Group-norm groups of the initializer."
    )
    model.add_argument("--num_noise_levels", type=int, default=6, help="T, the number of noise levels (paper: 6).")
    model.add_argument(
        "--num_langevin_steps", type=int, default=8, help="K, Langevin steps per training iteration (paper: 15)."
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=32, help="Batch size per device.")
    optim.add_argument("--num_epochs", type=int, default=20, help="Passes over the data (20 x 128 steps on shapes).")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Optimisation steps; overrides --num_epochs.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    optim.add_argument("--ebm_learning_rate", type=float, default=5e-4, help="EBM Adam learning rate (paper: 1e-4).")
    optim.add_argument(
        "--initializer_learning_rate", type=float, default=1e-3, help="Initializer AdamW learning rate (paper: 1e-5)."
    )
    optim.add_argument(
        "--lr_warmup_steps", type=int, default=200, help="Linear warm-up of Eq. 15 (paper: 10000 steps)."
    )
    optim.add_argument(
        "--initializer_warmup_head_start", type=int, default=500, help="The initializer's warm-up runs ahead (Eq. 15)."
    )
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--initializer_weight_decay", type=float, default=0.0, help="AdamW weight decay (paper: 0).")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip, per network.")
    optim.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay of both networks.")
    optim.add_argument("--label_dropout", type=float, default=0.1, help="Probability of training a label as null.")
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    optim.add_argument("--seed", type=int, default=0, help="Seed of the models, the data order and all noise.")

    health = parser.add_argument_group("training health")
    health.add_argument(
        "--max_consecutive_nonfinite",
        type=int,
        default=5,
        help="This many skipped (non-finite) steps in a row count as divergence: roll back to the last checkpoint.",
    )
    health.add_argument("--max_rollbacks", type=int, default=3, help="Give up after this many roll-backs.")
    # Test hook: make the batches of these (1-based) steps non-finite, to exercise the skip and roll-back logic.
    health.add_argument("--debug_nonfinite_steps", type=int_list, default=(), help=argparse.SUPPRESS)

    output = parser.add_argument_group("checkpoints, logging and output")
    output.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="Where everything is written (default: outputs/cdrl-<data>, e.g. outputs/cdrl-shapes).",
    )
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable state this often.")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    output.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (the newest complete checkpoint in --output_dir) or a checkpoint folder.",
    )
    output.add_argument("--logger", type=str, default="tensorboard", choices=["tensorboard", "wandb"])
    output.add_argument("--logging_dir", type=str, default="logs", help="Log folder, relative to --output_dir.")
    output.add_argument("--save_images_steps", type=int, default=500, help="Write a sample grid this often.")
    output.add_argument(
        "--eval_batch_size", type=int, default=32, help="Images in each sample grid; sampling batch of --eval_steps."
    )
    output.add_argument("--save_model_steps", type=int, default=None, help="Export the EMA pipeline this often.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hub.")
    output.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: --output_dir's name).")
    output.add_argument("--hub_token", type=str, default=None, help="Token for the upload.")
    output.add_argument("--hub_private_repo", action="store_true", help="Create a private repository.")

    evaluation = parser.add_argument_group("held-out evaluation (docs/training.md)")
    evaluation.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help="Score EMA samples against the held-out split this often and at the end: Fréchet distance and KID in a "
        "classifier's feature space, and the accuracy of guided samples for class-conditional models.",
    )
    evaluation.add_argument(
        "--validation_split",
        type=float,
        default=None,
        help="Hold out this fraction (e.g. 0.1) or number (e.g. 256) of images, drawn with --seed, never trained on "
        "(default with --eval_steps: 0.1).",
    )
    evaluation.add_argument("--eval_num_samples", type=int, default=256, help="Samples generated per evaluation.")
    evaluation.add_argument(
        "--eval_guidance_scale",
        type=float,
        default=1.0,
        help="Guidance weight w of the evaluation samples of class-conditional models (the classes in turn).",
    )
    evaluation.add_argument(
        "--keep_best_metric",
        type=str,
        default=None,
        choices=sorted(HIGHER_IS_BETTER),
        help="Export the EMA pipeline with the best value of this metric to OUTPUT_DIR/best.",
    )

    args = parser.parse_args(argv)
    sources = [flag for flag in ("dataset_name", "train_data_dir", "embedded_dataset") if getattr(args, flag)]
    if len(sources) > 1:
        raise ValueError(f"Pass at most one data source, got {', '.join('--' + flag for flag in sources)}.")
    if args.label_column and args.attribute_columns:
        raise ValueError(
            "`--label_column` (class-conditional) and `--attribute_columns` (compositional) exclude each other."
        )
    positive = ("resolution", "train_batch_size", "num_epochs", "gradient_accumulation_steps", "num_noise_levels")
    positive += ("num_langevin_steps", "checkpointing_steps", "save_images_steps", "eval_batch_size")
    for flag in (*positive, "max_consecutive_nonfinite"):
        if getattr(args, flag) < 1:
            raise ValueError(f"`--{flag}` must be a positive integer, got {getattr(args, flag)}.")
    for flag in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "save_model_steps", "eval_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"`--{flag}` must be a positive integer, got {getattr(args, flag)}.")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"`--label_dropout` must lie in [0, 1), got {args.label_dropout}.")
    if args.validation_split is None and args.eval_steps is not None:
        args.validation_split = 0.1
    if args.validation_split is not None:
        split = args.validation_split
        if not (0 < split < 1 or (split >= 2 and split.is_integer())):
            raise ValueError(
                f"`--validation_split` must be a fraction in (0, 1) or a number of images >= 2, got {split}."
            )
        args.validation_split = split if split < 1 else int(split)
    if args.eval_num_samples < 2:
        raise ValueError(f"`--eval_num_samples` must be at least 2, got {args.eval_num_samples}.")
    if not (math.isfinite(args.eval_guidance_scale) and args.eval_guidance_scale >= 0):
        raise ValueError(f"`--eval_guidance_scale` must be a finite number >= 0, got {args.eval_guidance_scale}.")
    if args.keep_best_metric is not None and args.eval_steps is None:
        raise ValueError("`--keep_best_metric` needs `--eval_steps`: the metric is computed by the evaluation.")
    if args.keep_best_metric == "accuracy" and not args.label_column:
        raise ValueError("`--keep_best_metric accuracy` needs a class-conditional model (`--label_column`).")
    if args.output_dir is None:
        source = args.dataset_name or args.train_data_dir or args.embedded_dataset or "shapes"
        args.output_dir = os.path.join("outputs", f"cdrl-{Path(source.rstrip('/')).name}")
    if args.logger == "wandb" and not is_wandb_available():
        raise ImportError("`--logger wandb` needs wandb: `pip install wandb`.")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Data: every source becomes a `datasets.Dataset`, then one code path turns rows into training tensors.
# --------------------------------------------------------------------------------------------------------------------
def load_training_dataset(args: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    """The training split, the held-out split (``--validation_split``, else ``None``) and a name for the model card.

    The held-out images are taken out before ``--max_train_samples`` picks its subset: they are never trained on.
    """
    if args.dataset_name:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        name = args.dataset_name
    elif args.train_data_dir:
        dataset = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train")
        name = Path(args.train_data_dir).name
    elif args.embedded_dataset == "digits":
        dataset, name = load_digits_dataset(resolution=args.resolution), "sklearn-digits"
    else:
        dataset, name = load_shapes_dataset(resolution=args.resolution, seed=0), "cdrl-shapes"
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"`--image_column` {args.image_column!r} is not a column of the dataset: {dataset.column_names}."
        )
    validation = None
    if args.validation_split is not None:
        if isinstance(args.validation_split, int) and args.validation_split >= len(dataset):
            raise ValueError(
                f"`--validation_split` {args.validation_split} leaves no training images of the {len(dataset)}."
            )
        split = dataset.train_test_split(test_size=args.validation_split, seed=args.seed)
        dataset, validation = split["train"], split["test"]
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    return dataset, validation, name


def as_class_label(dataset: datasets.Dataset, column: str, flag: str) -> datasets.Dataset:
    """Make ``column`` a ``ClassLabel`` (strings or integers are encoded in sorted order)."""
    if column not in dataset.column_names:
        raise ValueError(f"`{flag}` {column!r} is not a column of the dataset: {dataset.column_names}.")
    if not isinstance(dataset.features[column], ClassLabel):
        dataset = dataset.class_encode_column(column)
    return dataset


@dataclass
class Conditioning:
    """Which columns become class labels, and the names of the classes.

    Args:
        columns: the label column, or the attribute columns (compositional training).
        class_names: one name per class of the EBM (``None``: unconditional).
        offsets: for attributes, the first class index of each attribute.
        conditional_initializer: whether the initializer takes the class too (not for attributes, Sec. 4.5).
    """

    columns: list[str]
    class_names: list[str] | None = None
    offsets: list[int] | None = None
    conditional_initializer: bool = False


def conditioning_for(dataset: datasets.Dataset, args: argparse.Namespace) -> tuple[datasets.Dataset, Conditioning]:
    if args.label_column:
        dataset = as_class_label(dataset, args.label_column, "--label_column")
        names = [str(name) for name in dataset.features[args.label_column].names]
        return dataset, Conditioning([args.label_column], names, conditional_initializer=True)
    if args.attribute_columns:
        names, offsets = [], []
        for column in args.attribute_columns:
            dataset = as_class_label(dataset, column, "--attribute_columns")
            offsets.append(len(names))
            names += [f"{column}={value}" for value in dataset.features[column].names]
        return dataset, Conditioning(list(args.attribute_columns), names, offsets)
    return dataset, Conditioning([])


def image_channels(dataset: datasets.Dataset, image_column: str) -> int:
    """1 for grey-scale data (PIL modes "1", "L", "I", "F"), else 3 (RGB)."""
    return 1 if dataset[0][image_column].mode in ("1", "L", "I", "I;16", "F") else 3


class TrainingImages(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` as {"pixel_values" in [-1, 1], "labels"}.

    Random crops and flips draw from a generator seeded by (seed, epoch, row), not from a global RNG, so a resumed
    run sees exactly the images the interrupted one would have seen, in any worker.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        image_column: str,
        label_columns: list[str],
        resolution: int,
        channels: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
    ):
        self.rows = rows.select_columns([image_column, *label_columns])
        self.image_column, self.label_columns = image_column, label_columns
        self.resolution, self.mode = resolution, "L" if channels == 1 else "RGB"
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = row[self.image_column].convert(self.mode)
        scale = self.resolution / min(image.size)
        if scale != 1:  # shorter side to the resolution, as diffusers' Resize(resolution)
            size = (
                max(self.resolution, round(image.width * scale)),
                max(self.resolution, round(image.height * scale)),
            )
            image = image.resize(size, PIL.Image.Resampling.BILINEAR)
        spare_x, spare_y = image.width - self.resolution, image.height - self.resolution
        left, top = (spare_x // 2, spare_y // 2) if self.center_crop else rng.integers(0, [spare_x + 1, spare_y + 1])
        image = image.crop((int(left), int(top), int(left) + self.resolution, int(top) + self.resolution))
        pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        example = {"pixel_values": pixels.contiguous()}
        if self.label_columns:
            example["labels"] = torch.tensor([row[column] for column in self.label_columns])
        return example


def class_labels_of(
    batch: dict[str, torch.Tensor], conditioning: Conditioning, generator: torch.Generator
) -> torch.Tensor | None:
    """The class of each example: its label, or (compositional training) one randomly picked attribute's value."""
    if not conditioning.columns:
        return None
    labels = batch["labels"]
    if conditioning.offsets is None:
        return labels[:, 0]
    picked = torch.randint(len(conditioning.columns), (labels.shape[0],), generator=generator, device=generator.device)
    picked = picked.to(labels.device)
    offsets = torch.tensor(conditioning.offsets, device=labels.device)
    return offsets[picked] + labels.gather(1, picked[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
def build_models(
    args: argparse.Namespace, channels: int, conditioning: Conditioning
) -> tuple[EnergyModel, InitializerUNet]:
    energy_kwargs = dict(MODEL_CONFIGS[args.model_config]["energy_model"])
    initializer_kwargs = dict(MODEL_CONFIGS[args.model_config]["initializer"])
    overrides = [
        (energy_kwargs, "block_out_channels", args.ebm_channels),
        (energy_kwargs, "layers_per_block", args.ebm_layers_per_block),
        (energy_kwargs, "embedding_dim", args.ebm_embedding_dim),
        (initializer_kwargs, "block_out_channels", args.initializer_channels),
        (initializer_kwargs, "layers_per_block", args.initializer_layers_per_block),
        (initializer_kwargs, "attention_resolutions", args.initializer_attention_resolutions),
        (initializer_kwargs, "norm_num_groups", args.initializer_norm_num_groups),
    ]
    for kwargs, name, value in overrides:
        if value is not None:
            kwargs[name] = value
    num_classes = len(conditioning.class_names) if conditioning.class_names else None
    energy_model = EnergyModel(
        sample_size=args.resolution,
        in_channels=channels,
        num_class_embeds=num_classes,
        class_names=conditioning.class_names,
        **energy_kwargs,
    )
    initializer = InitializerUNet(
        sample_size=args.resolution,
        in_channels=channels,
        num_class_embeds=num_classes if conditioning.conditional_initializer else None,
        **initializer_kwargs,
    )
    return energy_model, initializer


@torch.no_grad()
def refresh_spectral_norm(energy_model: EnergyModel, iterations: int = 20) -> None:
    """Re-estimate the spectral norms after new weights were copied in (e.g. the EMA average).

    The power-iteration vectors of spectral normalisation are buffers that the EMA does not average; each forward
    pass in training mode runs one more iteration for the current weights.
    """
    config = energy_model.config
    probe = torch.zeros(1, config.in_channels, config.sample_size, config.sample_size, device=energy_model.device)
    energy_model.train()
    for _ in range(iterations):
        energy_model(probe, 0.0)
    energy_model.eval()


def ema_pipeline(
    energy_model: torch.nn.Module,
    initializer: torch.nn.Module,
    ema_energy: EMAModel,
    ema_initializer: EMAModel,
    scheduler: CDRLScheduler,
) -> CDRLPipeline:
    """A ``CDRLPipeline`` of fresh models holding the EMA weights (the training models are left untouched)."""
    copies = []
    for model, ema in ((energy_model, ema_energy), (initializer, ema_initializer)):
        copy = type(model).from_config(model.config).to(model.device)
        copy.load_state_dict(model.state_dict())
        ema.copy_to(copy.parameters())
        copies.append(copy.eval())
    refresh_spectral_norm(copies[0])
    pipeline = CDRLPipeline(energy_model=copies[0], initializer=copies[1], scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: `accelerator.save_state` into a hidden temporary folder, fsync, then an atomic rename, so a folder
# named checkpoint-<step> is always complete and `--resume_from_checkpoint latest` never picks a partial one.
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingProgress:
    """Where training stands; saved in every checkpoint (``accelerator.register_for_checkpointing``).

    With ``--keep_best_metric`` it also records the best value seen and its step, so a resumed run keeps it.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    nonfinite_steps: int = 0
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None

    def state_dict(self) -> dict[str, int | float | str | None]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int | float | str | None]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def improves(self, metric: str, value: float) -> bool:
        """Whether ``value`` of ``metric`` beats the best recorded value (any finite value beats none)."""
        if not math.isfinite(value):
            return False
        if self.best_metric != metric or self.best_value is None:
            return True
        return value > self.best_value if HIGHER_IS_BETTER[metric] else value < self.best_value


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if CHECKPOINT_PATTERN.fullmatch(name)]
    names.sort(key=lambda name: int(CHECKPOINT_PATTERN.fullmatch(name).group(1)))
    return [os.path.join(output_dir, name) for name in names]


def fsync_folder(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """Flush every file and folder under ``path`` to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_folder(root)


def replace_folder_atomically(temporary: str, final: str) -> None:
    """Flush the complete folder ``temporary`` to disk and rename it to ``final``, swapping out an older ``final``."""
    fsync_tree(temporary)
    if os.path.exists(final):  # e.g. re-saving a step after resuming from an older checkpoint
        os.replace(final, final + ".old")
    os.replace(temporary, final)
    fsync_folder(os.path.dirname(final))
    shutil.rmtree(final + ".old", ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process and os.path.exists(temporary):
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder_atomically(temporary, final)
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None and len(checkpoints) > total_limit:
            for stale in checkpoints[: len(checkpoints) - total_limit]:
                logger.info(f"Removing {stale} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(stale)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str | None:
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(candidate):
            return candidate
    raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is neither 'latest' nor a folder.")


def training_seed(seed: int, process_index: int, attempt: int) -> int:
    """Seed of the noise generator of one process; a roll-back starts a new attempt with fresh noise."""
    return int(np.random.SeedSequence([seed, process_index, attempt]).generate_state(1)[0])


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row, and no roll-back left."""


# --------------------------------------------------------------------------------------------------------------------
# Logging helpers
# --------------------------------------------------------------------------------------------------------------------
class StepMetrics:
    """Per-level sums of the training-step diagnostics over the micro-batches of one update, for logging."""

    def __init__(self, num_levels: int, device: torch.device):
        self.sums = torch.zeros(len(LEVEL_METRICS), num_levels, device=device)
        self.counts = torch.zeros(num_levels, device=device)

    def add(self, output) -> None:
        counts = output.level_counts.float()
        values = torch.stack([torch.nan_to_num(output.level_metrics[name]) for name in LEVEL_METRICS])
        self.sums += values * counts
        self.counts += counts

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over all examples of all processes: overall (``train/...``) and per noise level (``level_t/...``)."""
        totals = accelerator.reduce(torch.cat([self.sums.flatten(), self.counts]), reduction="sum")
        sums, counts = totals[: self.sums.numel()].view_as(self.sums), totals[self.sums.numel() :]
        logs = {f"train/{name}": (sums[i].sum() / counts.sum()).item() for i, name in enumerate(LEVEL_METRICS)}
        for level in torch.nonzero(counts).flatten().tolist():
            for i, name in enumerate(LEVEL_METRICS):
                logs[f"level_{level}/{name}"] = (sums[i, level] / counts[level]).item()
        self.sums.zero_()
        self.counts.zero_()
        return logs


@torch.no_grad()
def sample_grid(pipeline: CDRLPipeline, num_images: int, seed: int) -> PIL.Image.Image:
    """Initializer-only proposals (left) next to the full CDRL samples (right) from the same x_T (the paper's Fig. 8).

    A conditional model gets one class per column.
    """
    device = pipeline.device
    names = pipeline.class_names
    num_classes = pipeline.energy_model.config.num_class_embeds
    columns = num_classes if num_classes is not None and num_classes <= 12 else min(8, num_images)
    batch = math.ceil(num_images / columns) * columns
    labels = None if num_classes is None else torch.arange(batch, device=device) % num_classes
    latents = randn_tensor(
        (batch, *pipeline.sample_shape), generator=torch.Generator().manual_seed(seed), device=device
    )
    samples = pipeline(
        batch_size=batch,
        class_labels=labels,
        latents=latents,
        generator=torch.Generator(device).manual_seed(seed + 1),
        output_type="pt",
    ).images
    energy_weights = ConditionWeights.unconditional() if labels is None else ConditionWeights.conditional(labels)
    initializer_only = CDRLSampler(
        pipeline.energy_model,
        pipeline.initializer,
        pipeline.scheduler,
        energy_weights=energy_weights,
        initializer_weights=pipeline._initializer_weights(energy_weights),
        batch_size=batch,
        device=device,
        num_langevin_steps=0,
        generator=torch.Generator(device).manual_seed(seed + 1),
    )
    proposals = (initializer_only.run(latents, denoise=False).clamp(-1, 1) + 1) / 2
    upscale = max(1, 64 // pipeline.sample_shape[-1])
    panels = []
    for images in (proposals, samples):
        pil = pipeline.image_processor.numpy_to_pil(pipeline.image_processor.pt_to_numpy(images.float().cpu()))
        pil = [image.resize((image.width * upscale, image.height * upscale), PIL.Image.NEAREST) for image in pil]
        panels.append(make_image_grid(pil, rows=batch // columns, cols=columns))
    gap = 8 * upscale // 2
    grid = PIL.Image.new("RGB", (panels[0].width * 2 + gap, panels[0].height), "white")
    grid.paste(panels[0].convert("RGB"), (0, 0))
    grid.paste(panels[1].convert("RGB"), (panels[0].width + gap, 0))
    if names:
        logger.info(f"Sample grid columns: {', '.join(names[i] for i in range(columns))}")
    return grid


def log_image(accelerator: Accelerator, args: argparse.Namespace, grid: PIL.Image.Image, step: int) -> None:
    if args.logger == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    else:
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({"samples": wandb.Image(grid)}, step=step)


def export_pipeline(
    pipeline: CDRLPipeline,
    output_dir: str,
    dataset_name: str,
    training_details: dict,
    grid: PIL.Image.Image,
    hub_model_id: str | None,
) -> None:
    """``save_pretrained`` into ``output_dir``, with the sample grid and a model card that shows it."""
    os.makedirs(output_dir, exist_ok=True)
    grid.save(os.path.join(output_dir, "samples.png"))
    card = pipeline.create_model_card(
        repo_id=hub_model_id, dataset_name=dataset_name, training_details=training_details, sample_grid="samples.png"
    )
    pipeline.save_pretrained(output_dir, model_card=card)
    logger.info(f"Saved the EMA pipeline to {output_dir}")


def push_to_hub(args: argparse.Namespace) -> None:
    """Upload the exported pipeline (not checkpoints, logs or intermediate grids) with ``upload_folder``."""
    repo_name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token, private=args.hub_private_repo).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=[
                "checkpoint-*",
                ".checkpoint-*",
                f"{args.logging_dir}/*",
                "samples/*",
                "best/*",
                ".best.tmp/*",
                "evaluation/*",
            ],
            token=args.hub_token,
        )
    except Exception as error:  # no network, no token, no permission: say so, the local copy is complete
        raise RuntimeError(
            f"Uploading to the Hub repository {repo_name!r} failed ({type(error).__name__}: {error}). The trained "
            f"pipeline is saved in {args.output_dir}; upload it later with "
            f"`huggingface_hub.upload_folder(repo_id=..., folder_path={args.output_dir!r})`."
        ) from error
    logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}")


# --------------------------------------------------------------------------------------------------------------------
# Held-out evaluation (--eval_steps): the offline metrics of cdrl_diffusers.evaluation on samples of the EMA pipeline
# --------------------------------------------------------------------------------------------------------------------
def image_tensors(
    rows: datasets.Dataset, args: argparse.Namespace, channels: int, label_column: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows as one batch of images in [-1, 1] (centre crops, no flips) and, with ``label_column``, their labels."""
    label_columns = [label_column] if label_column else []
    images = TrainingImages(
        rows, args.image_column, label_columns, args.resolution, channels, center_crop=True, random_flip=False, seed=0
    )
    examples = [images[index] for index in range(len(images))]
    labels = torch.stack([example["labels"][0] for example in examples]) if label_column else None
    return torch.stack([example["pixel_values"] for example in examples]), labels


def evaluation_label_column(rows: datasets.Dataset, args: argparse.Namespace) -> str | None:
    """The classes of the evaluation classifier: --label_column, else the first attribute, else any ClassLabel."""
    if args.label_column:
        return args.label_column
    if args.attribute_columns:
        return args.attribute_columns[0]
    return next((name for name, feature in rows.features.items() if isinstance(feature, ClassLabel)), None)


class HeldOutEvaluator:
    """Scores samples of a pipeline against the held-out images (see docs/evaluation.md).

    Metrics: the Fréchet distance and KID between the features of ``--eval_num_samples`` samples and of the held-out
    images and, for class-conditional models, the accuracy of samples generated for each class in turn with guidance
    weight ``--eval_guidance_scale``. The feature space is the penultimate layer of a small classifier of the data's
    labels (``train_classifier`` on the training split, seeded and cached in OUTPUT_DIR/evaluation); data without a
    label column is compared in pixel space. Samples are drawn with the same seed at every evaluation.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        train_rows: datasets.Dataset,
        validation_rows: datasets.Dataset,
        channels: int,
        device: torch.device,
    ):
        self.num_samples, self.batch_size, self.seed = args.eval_num_samples, args.eval_batch_size, args.seed
        self.class_conditional = args.label_column is not None
        self.guidance_scale = args.eval_guidance_scale if self.class_conditional else 0.0
        reference, _ = image_tensors(validation_rows, args, channels)
        label_column = evaluation_label_column(train_rows, args)
        num_classes = train_rows.features[label_column].num_classes if label_column else 0
        self.classifier = None
        if num_classes < 2 or args.resolution % 4:
            reason = "no label column" if num_classes < 2 else f"resolution {args.resolution} not divisible by 4"
            self.features, self.description = torch.nn.Flatten(), f"raw pixels ({reason} for a classifier)"
        else:
            if len(train_rows) > CLASSIFIER_MAX_IMAGES:
                train_rows = train_rows.shuffle(seed=args.seed).select(range(CLASSIFIER_MAX_IMAGES))
            images, labels = image_tensors(train_rows, args, channels, label_column)
            cache_dir = os.path.join(args.output_dir, "evaluation")
            self.classifier = train_classifier(
                images, labels, num_classes=num_classes, cache_dir=cache_dir, seed=args.seed, epochs=CLASSIFIER_EPOCHS
            ).to(device)
            self.features = ClassifierFeatures(self.classifier)
            self.description = (
                f"penultimate features of a {label_column!r} classifier trained on {len(images)} training images"
            )
        self.reference_features = extract_features(self.features, reference)

    def summary(self, metrics: dict[str, float]) -> str:
        values = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        guidance = f" (guidance w = {self.guidance_scale})" if self.class_conditional else ""
        return (
            f"{values}; {self.num_samples} samples{guidance} vs {len(self.reference_features)} held-out images, "
            f"{self.description}"
        )

    @torch.no_grad()
    def __call__(self, pipeline: CDRLPipeline) -> dict[str, float] | None:
        """The metrics of the pipeline's samples (``None`` when some samples are not finite)."""
        num_classes = pipeline.energy_model.config.num_class_embeds if self.class_conditional else None
        labels = None if num_classes is None else torch.arange(self.num_samples) % num_classes
        generator = torch.Generator(pipeline.device).manual_seed(self.seed)
        batches = []
        for start in range(0, self.num_samples, self.batch_size):
            stop = min(start + self.batch_size, self.num_samples)
            images = pipeline(
                batch_size=stop - start,
                class_labels=None if labels is None else labels[start:stop],
                guidance_scale=self.guidance_scale,
                generator=generator,
                output_type="pt",
            ).images
            batches.append(images.float().cpu() * 2 - 1)
        samples = torch.cat(batches)
        if not torch.isfinite(samples).all():
            return None
        features = extract_features(self.features, samples)
        kid, kid_std = kernel_distance(self.reference_features, features, seed=self.seed)
        metrics = {"frechet_distance": frechet_distance(self.reference_features, features), "kid": kid}
        metrics["kid_std"] = kid_std
        if labels is not None and self.classifier is not None:
            metrics["accuracy"] = classifier_accuracy(self.classifier, samples, labels)
        return metrics


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def launched_on_cpus_only() -> bool:
    """Several processes (torchrun, accelerate launch) and no accelerator: Accelerate then needs ``cpu=True`` to
    set up a gloo process group (MULTI_CPU) instead of running each process on its own."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def main(args: argparse.Namespace) -> CDRLPipeline:
    """Train, export the EMA pipeline to --output_dir and return it (on every process)."""
    start_time = time.time()
    accelerator = Accelerator(
        cpu=launched_on_cpus_only(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # The data order is a function of (seed, epoch), so a resumed run can skip to the same position.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # the same initial weights on every process

    # Data
    with accelerator.main_process_first():
        dataset, validation_rows, dataset_name = load_training_dataset(args)
        dataset, conditioning = conditioning_for(dataset, args)
    channels = image_channels(dataset, args.image_column)
    train_images = TrainingImages(
        dataset,
        args.image_column,
        conditioning.columns,
        args.resolution,
        channels,
        args.center_crop,
        args.random_flip,
        args.seed,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_images,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch must not draw from the global RNG (dropout uses that one).
        generator=torch.Generator().manual_seed(args.seed),
    )

    # Models, noise schedule, EMA (App. A.2)
    energy_model, initializer = build_models(args, channels, conditioning)
    scheduler = CDRLScheduler(num_noise_levels=args.num_noise_levels, num_langevin_steps=args.num_langevin_steps)
    ema_energy = create_ema_model(energy_model, decay=args.ema_max_decay)
    ema_initializer = create_ema_model(initializer, decay=args.ema_max_decay)
    ema_energy.to(accelerator.device)
    ema_initializer.to(accelerator.device)

    # One optimizer with a parameter group per network: EBM Adam (AdamW with no weight decay is Adam) and initializer
    # AdamW. A single optimizer keeps fp16 loss scaling (one GradScaler per Accelerator) to one step per update.
    optimizer = torch.optim.AdamW(
        [
            {"params": energy_model.parameters(), "lr": args.ebm_learning_rate, "weight_decay": 0.0},
            {
                "params": initializer.parameters(),
                "lr": args.initializer_learning_rate,
                "weight_decay": args.initializer_weight_decay,
            },
        ],
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    # Eq. 15, in optimisation steps. Stepped by hand once per update (a prepared scheduler would step once per
    # process), and checkpointed with `register_for_checkpointing`.
    lr_scheduler = LambdaLR(
        optimizer,
        [
            lambda step: warmup_multiplier(step, args.lr_warmup_steps),
            lambda step: warmup_multiplier(step, args.lr_warmup_steps, args.initializer_warmup_head_start),
        ],
    )
    energy_model, initializer, optimizer, train_dataloader = accelerator.prepare(
        energy_model, initializer, optimizer, train_dataloader
    )
    unwrapped_energy, unwrapped_initializer = (
        accelerator.unwrap_model(energy_model),
        accelerator.unwrap_model(initializer),
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The dataset has {len(dataset)} images, fewer than one batch per process "
            f"({args.train_batch_size} x {accelerator.num_processes}); lower `--train_batch_size`."
        )
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * updates_per_epoch

    # The noise of the training step (levels, Langevin, label dropout, attribute picks): one generator per process.
    generator = torch.Generator(accelerator.device).manual_seed(training_seed(args.seed, accelerator.process_index, 0))
    progress = TrainingProgress()

    # Checkpoint contents, as in diffusers' examples: models and EMAs in diffusers format through the hooks, the
    # optimizer, RNG states and `register_for_checkpointing` objects through Accelerate, plus this process's generator.
    components = {id(unwrapped_energy): ENERGY_MODEL, id(unwrapped_initializer): INITIALIZER}
    emas = {ENERGY_MODEL: (ema_energy, EnergyModel), INITIALIZER: (ema_initializer, InitializerUNet)}

    def save_model_hook(models, weights, output_dir):
        for model in models:
            name = components[id(accelerator.unwrap_model(model))]
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, name))
                emas[name][0].save_pretrained(os.path.join(output_dir, f"{name}_ema"))
            weights.pop()  # saved above, not again by Accelerate
        torch.save(generator.get_state(), os.path.join(output_dir, f"generator_{accelerator.process_index}.pt"))

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            name = components[id(model)]
            model.load_state_dict(type(model).from_pretrained(input_dir, subfolder=name).state_dict())
            ema, model_cls = emas[name]
            ema.load_state_dict(
                EMAModel.from_pretrained(os.path.join(input_dir, f"{name}_ema"), model_cls).state_dict()
            )
            ema.to(accelerator.device)
        generator_file = os.path.join(input_dir, f"generator_{accelerator.process_index}.pt")
        if not os.path.exists(generator_file):
            raise ValueError(
                f"{input_dir} has no {os.path.basename(generator_file)}: resume with the same number of processes."
            )
        generator.set_state(torch.load(generator_file, weights_only=True))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    accelerator.register_for_checkpointing(lr_scheduler, progress)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for stale in Path(args.output_dir).glob(".checkpoint-*.tmp"):  # left by a crash while saving
            shutil.rmtree(stale)
        config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()
        }
        accelerator.init_trackers("train_cdrl", config=config)
    evaluator, last_evaluation = None, {}
    if args.eval_steps is not None and accelerator.is_main_process:
        logger.info(f"Held out {len(validation_rows)} images for evaluation every {args.eval_steps} steps")
        with torch.random.fork_rng(devices=[]):  # the evaluation classifier must not move the training RNG
            evaluator = HeldOutEvaluator(args, dataset, validation_rows, channels, accelerator.device)
        logger.info(f"Evaluation features: {evaluator.description}")
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if checkpoint is None:
            logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")
        else:
            logger.info(f"Resuming from {checkpoint}")
            accelerator.load_state(checkpoint)
            if progress.best_step is not None:
                best = f"{progress.best_metric} so far: {progress.best_value:.6g} at step {progress.best_step}"
                logger.info(f"Best {best}")

    batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Examples = {len(dataset)} ({dataset_name}), resolution {args.resolution}, {channels} channel(s)")
    if validation_rows is not None:
        logger.info(f"  Held-out examples (never trained on) = {len(validation_rows)}")
    logger.info(f"  Classes = {conditioning.class_names or 'none (unconditional)'}")
    logger.info(
        f"  Batch size per device = {args.train_batch_size}, total (data parallel x accumulation) = {batch_size}"
    )
    for name, model in ((ENERGY_MODEL, unwrapped_energy), (INITIALIZER, unwrapped_initializer)):
        logger.info(f"  {name} parameters = {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    logger.info(f"  Optimisation steps = {max_train_steps}, starting at {progress.global_step}")

    def training_details() -> dict[str, str | int | float]:
        """Facts of the run for the model card."""
        conditioning_text = "none (unconditional)"
        if conditioning.columns:
            kind = "attributes (compositional)" if conditioning.offsets is not None else "class label"
            conditioning_text = f"{kind}: {', '.join(conditioning.columns)}; label dropout {args.label_dropout}"
        details = {
            "Dataset": f"{dataset_name} ({len(dataset)} images)",
            "Resolution": f"{args.resolution}x{args.resolution}, {channels} channel(s)",
            "Conditioning": conditioning_text,
            "Optimisation steps": progress.global_step,
            "Batch size": f"{batch_size} ({args.train_batch_size} per device x {accelerator.num_processes} "
            f"process(es) x {args.gradient_accumulation_steps} accumulation step(s))",
            "EBM optimiser": f"Adam, lr {args.ebm_learning_rate}, betas ({args.adam_beta1}, {args.adam_beta2}), "
            f"linear warm-up over {args.lr_warmup_steps} steps (Eq. 15)",
            "Initializer optimiser": f"AdamW, lr {args.initializer_learning_rate}, weight decay "
            f"{args.initializer_weight_decay}, warm-up {args.initializer_warmup_head_start} steps ahead (Eq. 15)",
            "Gradient clipping": f"{args.max_grad_norm} per network",
            "EMA decay": args.ema_max_decay,
            "Langevin steps K": args.num_langevin_steps,
            "Mixed precision": accelerator.mixed_precision,
            "Seed": args.seed,
            "Skipped non-finite steps": progress.nonfinite_steps,
            "Training time": f"{(time.time() - start_time) / 60:.1f} min on {accelerator.num_processes} x "
            f"{accelerator.device.type}",
        }
        if last_evaluation:
            details[f"Held-out evaluation (step {last_evaluation['step']})"] = last_evaluation["summary"]
        if progress.best_step is not None:
            details[f"Best {progress.best_metric}"] = f"{progress.best_value:.6g} at step {progress.best_step}"
        return details

    def sample_and_log(pipeline: CDRLPipeline) -> PIL.Image.Image:
        """A sample grid of ``pipeline``, written to samples/ and to the logger."""
        grid = sample_grid(pipeline, args.eval_batch_size, args.seed)
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
        grid.save(os.path.join(args.output_dir, "samples", f"step_{progress.global_step:07d}.png"))
        log_image(accelerator, args, grid, progress.global_step)
        return grid

    def export(pipeline: CDRLPipeline) -> None:
        grid = sample_and_log(pipeline)
        export_pipeline(pipeline, args.output_dir, dataset_name, training_details(), grid, args.hub_model_id)

    def evaluate(pipeline: CDRLPipeline) -> None:
        """Held-out metrics of ``pipeline``, logged as eval/*; a new best is exported atomically to OUTPUT_DIR/best."""
        started = time.time()
        metrics = evaluator(pipeline)
        if metrics is None:
            logger.warning(f"Step {progress.global_step}: non-finite evaluation samples, no metrics.")
            return
        accelerator.log(
            {**{f"eval/{name}": value for name, value in metrics.items()}, "eval/seconds": time.time() - started},
            step=progress.global_step,
        )
        last_evaluation.update(step=progress.global_step, summary=evaluator.summary(metrics))
        logger.info(f"Step {progress.global_step}, held-out evaluation: {last_evaluation['summary']}")
        metric = args.keep_best_metric
        if metric is not None and progress.improves(metric, metrics[metric]):
            progress.best_metric, progress.best_value = metric, metrics[metric]
            progress.best_step = progress.global_step
            temporary, best = os.path.join(args.output_dir, ".best.tmp"), os.path.join(args.output_dir, "best")
            shutil.rmtree(temporary, ignore_errors=True)
            grid = sample_grid(pipeline, args.eval_batch_size, args.seed)
            export_pipeline(pipeline, temporary, dataset_name, training_details(), grid, args.hub_model_id)
            replace_folder_atomically(temporary, best)
            logger.info(f"New best {metric} {metrics[metric]:.6g}: exported to {best}")

    def epoch_batches():
        """The rest of the current epoch, in the epoch's seeded order (skipping what a resumed run already saw)."""
        if progress.batches_in_epoch >= len(train_dataloader):
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
        train_dataloader.set_epoch(progress.epoch)
        train_images.set_epoch(progress.epoch)
        return accelerator.skip_first_batches(train_dataloader, progress.batches_in_epoch)

    metrics = StepMetrics(args.num_noise_levels, accelerator.device)
    rng_devices = [] if accelerator.device.type == "cpu" else [accelerator.device]
    progress_bar = tqdm(
        total=max_train_steps, initial=progress.global_step, disable=not accelerator.is_local_main_process
    )
    progress_bar.set_description("Steps")
    update_is_finite, consecutive_nonfinite, rollbacks = True, 0, 0
    energy_model.train()
    initializer.train()
    while progress.global_step < max_train_steps:
        for batch in epoch_batches():
            progress.batches_in_epoch += 1
            with accelerator.accumulate(energy_model, initializer):
                clean_images = batch["pixel_values"]
                if progress.global_step + 1 in args.debug_nonfinite_steps:
                    clean_images = torch.full_like(clean_images, float("nan"))
                with accelerator.autocast():
                    output = cdrl_training_step(
                        energy_model,
                        initializer,
                        scheduler,
                        clean_images,
                        class_labels=class_labels_of(batch, conditioning, generator),
                        generator=generator,
                        label_dropout=args.label_dropout,
                    )
                # Every process must take the same decision, or gradient synchronisation would hang.
                nonfinite = ~torch.isfinite(torch.stack([output.ebm_loss, output.initializer_loss])).all()
                if accelerator.reduce(nonfinite.float(), reduction="sum").item() > 0:
                    update_is_finite = False
                else:
                    accelerator.backward(output.ebm_loss + output.initializer_loss)
                    metrics.add(output)
                if accelerator.sync_gradients and update_is_finite:
                    accelerator.unscale_gradients()
                    grad_norms = {
                        name: torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        for name, model in ((ENERGY_MODEL, unwrapped_energy), (INITIALIZER, unwrapped_initializer))
                    }
                    update_is_finite = all(torch.isfinite(norm) for norm in grad_norms.values())
                    if update_is_finite:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            # One optimisation step (or one skipped step) is complete.
            lr_scheduler.step()
            progress.global_step += 1
            progress_bar.update(1)
            logs = {f"lr/{name}": lr for name, lr in zip((ENERGY_MODEL, INITIALIZER), lr_scheduler.get_last_lr())}
            if update_is_finite:
                ema_energy.step(unwrapped_energy.parameters())
                ema_initializer.step(unwrapped_initializer.parameters())
                consecutive_nonfinite = 0
                logs.update(metrics.reduce(accelerator))
                logs.update({f"grad_norm/{name}": norm.item() for name, norm in grad_norms.items()})
                logs["ema_decay"] = ema_energy.cur_decay_value
                progress_bar.set_postfix(
                    ebm_loss=f"{logs['train/ebm_loss']:.4g}", initializer_loss=f"{logs['train/initializer_loss']:.4g}"
                )
            else:
                progress.nonfinite_steps += 1
                consecutive_nonfinite += 1
                metrics.reduce(accelerator)  # discard the partial sums of the skipped update
                logger.warning(f"Step {progress.global_step}: non-finite loss or gradient, update skipped.")
            logs["train/nonfinite_steps"] = progress.nonfinite_steps
            logs["train/skipped_step"] = int(not update_is_finite)
            accelerator.log(logs, step=progress.global_step)

            # Periodic actions after the update: held-out evaluation (first, so a checkpoint of this step records
            # its best metric), checkpoints, sample grids, exported pipelines.
            if args.eval_steps is not None and (
                progress.global_step % args.eval_steps == 0 or progress.global_step >= max_train_steps
            ):
                if accelerator.is_main_process:  # sampling must not move the training RNG
                    with torch.random.fork_rng(devices=rng_devices, device_type=accelerator.device.type):
                        pipeline = ema_pipeline(
                            unwrapped_energy, unwrapped_initializer, ema_energy, ema_initializer, scheduler
                        )
                        evaluate(pipeline)
                accelerator.wait_for_everyone()  # the other processes wait for the main process's evaluation
            if progress.global_step % args.checkpointing_steps == 0 and update_is_finite:
                save_checkpoint(accelerator, args.output_dir, progress.global_step, args.checkpoints_total_limit)
            sample_now = progress.global_step % args.save_images_steps == 0
            export_now = args.save_model_steps is not None and progress.global_step % args.save_model_steps == 0
            if accelerator.is_main_process and (sample_now or export_now) and progress.global_step < max_train_steps:
                # Building and sampling the models must not move the training RNG, or resuming would not be exact.
                with torch.random.fork_rng(devices=rng_devices, device_type=accelerator.device.type):
                    pipeline = ema_pipeline(
                        unwrapped_energy, unwrapped_initializer, ema_energy, ema_initializer, scheduler
                    )
                    export(pipeline) if export_now else sample_and_log(pipeline)

            # Divergence: roll back to the last checkpoint and retry with fresh noise, or give up.
            if consecutive_nonfinite >= args.max_consecutive_nonfinite:
                checkpoint = resolve_checkpoint("latest", args.output_dir)
                if checkpoint is None or rollbacks >= args.max_rollbacks:
                    reason = (
                        "there is no checkpoint to roll back to"
                        if checkpoint is None
                        else (f"{rollbacks} roll-back(s) to the last checkpoint did not help")
                    )
                    raise TrainingDiverged(
                        f"Training diverged: {consecutive_nonfinite} non-finite steps in a row up to step "
                        f"{progress.global_step}, and {reason}. Try lower learning rates, `--mixed_precision no`, "
                        "or check the data for NaN/inf values."
                    )
                rollbacks += 1
                logger.warning(f"Rolling back to {checkpoint} with fresh noise ({rollbacks}/{args.max_rollbacks}).")
                best = (progress.best_metric, progress.best_value, progress.best_step)
                accelerator.load_state(checkpoint)
                progress.best_metric, progress.best_value, progress.best_step = best  # best/ may be newer than it
                generator.manual_seed(training_seed(args.seed, accelerator.process_index, rollbacks))
                accelerator.log({"train/rollbacks": rollbacks}, step=progress.global_step)
                progress_bar.n = progress.global_step
                progress_bar.refresh()
                consecutive_nonfinite, update_is_finite = 0, True
                break  # continue from the checkpoint's data position
            update_is_finite = True
            if progress.global_step >= max_train_steps:
                break

    progress_bar.close()
    accelerator.wait_for_everyone()
    pipeline = ema_pipeline(unwrapped_energy, unwrapped_initializer, ema_energy, ema_initializer, scheduler)
    if accelerator.is_main_process:
        export(pipeline)
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        push_to_hub(args)
    return pipeline


if __name__ == "__main__":
    main(parse_args())
