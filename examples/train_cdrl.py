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

Every iteration calls ``cdrl_training_step`` (Algorithm 1). The machinery around it (checkpoints, roll-back, EMA
export, held-out evaluation, sample grids) lives in ``cdrl_diffusers.training``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time
from pathlib import Path

import datasets
import diffusers
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from datasets import Dataset, load_dataset
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from cdrl_diffusers import CDRLPipeline, CDRLScheduler, training
from cdrl_diffusers.evaluation import OOD_SHIFTS
from cdrl_diffusers.validation import (
    cli_fraction,
    cli_fraction_or_count,
    cli_non_negative_float,
    cli_non_negative_int,
    cli_positive_float,
    cli_positive_int,
    cli_positive_int_list,
)

logger = get_logger(__name__, log_level="INFO")
# The two networks: sub-folders of checkpoints and of the exported pipeline, prefixes of logged values.
NAMES = ("energy_model", "initializer")
# With the data target (App. G.2), this share of the EBM's negatives starts from the initializer as it was when that
# target began: far-off negatives that keep the density away from the data (docs/training.md).
DEFAULT_FROZEN_INITIALIZER_SHARE = 0.25


def step_or_none(text: str) -> int | None:
    """A step number, or ``none``."""
    return None if text.strip().lower() == "none" else cli_non_negative_int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a CDRL energy-based model with Accelerate.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, help="A Hub dataset or local dataset folder (`load_dataset`).")
    data.add_argument("--dataset_config_name", type=str, help="The config of the dataset, if any.")
    data.add_argument("--train_data_dir", type=str, help="A folder of images (class sub-folders give `label`).")
    data.add_argument("--embedded_dataset", choices=sorted(training.EMBEDDED_DATASETS), help="Default: shapes.")
    data.add_argument("--cache_dir", type=str, help="Where `datasets` caches downloaded data.")
    data.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    data.add_argument("--label_column", type=str, help="Train a class-conditional model on this column (Sec. 3.5).")
    data.add_argument("--attribute_columns", nargs="+", help="Compositional training on these columns (Sec. 4.5).")
    data.add_argument(
        "--conditional_initializer",
        action=argparse.BooleanOptionalAction,
        help="With --attribute_columns: a class-conditional initializer, composable at sampling (default; the "
        "paper's, Sec. 4.5: --no-conditional_initializer).",
    )
    data.add_argument("--resolution", type=cli_positive_int, default=16, help="Images are resized and cropped to it.")
    data.add_argument("--center_crop", action="store_true", help="Crop the centre (default: a random crop).")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument(
        "--negative_shifts",
        nargs="+",
        choices=OOD_SHIFTS,
        help="Negative data augmentation: training images turned by these shifts are scored below the data.",
    )
    data.add_argument(
        "--negative_share", type=cli_fraction, default=0.25, help="Share of each batch that --negative_shifts turn."
    )
    data.add_argument("--max_train_samples", type=cli_positive_int, help="Train on a random subset of this size.")
    data.add_argument("--dataloader_num_workers", type=cli_non_negative_int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--model_config", choices=sorted(training.MODEL_PRESETS), default="cpu", help="Network sizes.")
    model.add_argument("--ebm_channels", type=cli_positive_int_list, help="EBM channels per resolution, e.g. 32,64.")
    model.add_argument("--ebm_layers_per_block", type=cli_positive_int, help="EBM residual blocks per resolution.")
    model.add_argument("--ebm_embedding_dim", type=cli_positive_int, help="Width of the EBM's log-SNR embedding.")
    model.add_argument(
        "--ebm_spectral_norm",
        action=argparse.BooleanOptionalAction,
        help="Spectral norm in the EBM (App. A.1: on; the cpu preset: off, which learned faster there).",
    )
    model.add_argument(
        "--initializer_channels", type=cli_positive_int_list, help="Initializer channels per resolution."
    )
    model.add_argument("--initializer_layers_per_block", type=cli_positive_int, help="Initializer blocks per level.")
    model.add_argument(
        "--initializer_attention_resolutions", type=cli_positive_int_list, help="e.g. 16,8 ('' for none)."
    )
    model.add_argument("--initializer_norm_num_groups", type=cli_positive_int, help="Initializer group-norm groups.")
    model.add_argument("--initializer_dropout", type=cli_fraction, help="Dropout in the initializer's blocks.")
    model.add_argument("--num_noise_levels", type=cli_positive_int, default=6, help="T (paper: 6).")
    model.add_argument("--num_langevin_steps", type=cli_positive_int, default=2, help="K (paper: 15).")
    model.add_argument(
        "--langevin_step_size_scale", type=cli_positive_float, default=4e-4, help="c of s_t (App. A.2; paper: 4e-4)."
    )

    optim = parser.add_argument_group("optimisation (App. A.2)")
    optim.add_argument("--train_batch_size", type=cli_positive_int, default=32, help="Batch size per device.")
    optim.add_argument("--num_epochs", type=cli_positive_int, default=50, help="Passes over the data.")
    optim.add_argument("--max_train_steps", type=cli_positive_int, help="Optimisation steps; overrides --num_epochs.")
    optim.add_argument("--max_train_minutes", type=cli_positive_float, help="Also stop after this much training.")
    optim.add_argument("--gradient_accumulation_steps", type=cli_positive_int, default=1)
    optim.add_argument("--ebm_learning_rate", type=cli_positive_float, default=1.25e-4, help="EBM Adam (paper: 1e-4).")
    optim.add_argument("--initializer_learning_rate", type=cli_positive_float, default=5e-4, help="(paper: 1e-5).")
    optim.add_argument("--lr_warmup_steps", type=cli_non_negative_int, default=200, help="Eq. 15 (paper: 10000).")
    optim.add_argument("--initializer_warmup_head_start", type=cli_non_negative_int, default=500, help="Eq. 15.")
    optim.add_argument(
        "--lr_decay", choices=training.LR_DECAYS, default="cosine", help="After the warm-up (paper: constant)."
    )
    optim.add_argument("--adam_beta1", type=cli_fraction, default=0.9)
    optim.add_argument("--adam_beta2", type=cli_fraction, default=0.999)
    optim.add_argument("--adam_epsilon", type=cli_positive_float, default=1e-8)
    optim.add_argument("--initializer_weight_decay", type=cli_non_negative_float, default=0.0, help="(paper: 0).")
    optim.add_argument("--max_grad_norm", type=cli_positive_float, default=1.0, help="Gradient clip, per network.")
    optim.add_argument("--ema_max_decay", type=cli_fraction, default=0.9999, help="EMA decay of both networks.")
    optim.add_argument("--label_dropout", type=cli_fraction, default=0.1, help="Probability of the null label.")
    optim.add_argument(
        "--initializer_target", choices=["refined", "data"], default="data", help="Eq. 8 (paper) or App. G.2 (CPU)."
    )
    optim.add_argument(
        "--data_target_from_step", type=step_or_none, help="With 'refined': switch to the data at this step."
    )
    optim.add_argument(
        "--frozen_initializer_share",
        type=cli_fraction,
        help="Share of the EBM's chains started by the initializer as the data target began (default 0.25 then).",
    )
    optim.add_argument(
        "--langevin_noise_control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Subtract the chains' injected noise from Eq. 8's target (same expected gradient, less variance).",
    )
    optim.add_argument(
        "--level_sampling_weights",
        type=cli_non_negative_float,
        nargs="+",
        help="T weights of the pair draw (uniform).",
    )
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    optim.add_argument(
        "--cpu_threads",
        type=cli_positive_int,
        help="Threads per process when training on CPUs (default: the cores, shared among this machine's processes).",
    )
    optim.add_argument("--seed", type=cli_non_negative_int, default=0, help="Seeds weights, data order, noise.")

    health = parser.add_argument_group("training health")
    health.add_argument("--max_consecutive_nonfinite", type=cli_positive_int, default=5, help="Then roll back.")
    health.add_argument("--max_rollbacks", type=cli_non_negative_int, default=3, help="Then give up.")
    health.add_argument("--max_neg_energy_gap", type=cli_positive_float, default=50.0, help="Per-level |f_hat gap|.")
    health.add_argument(
        "--health_warmup_steps", type=cli_positive_int, default=1000, help="Growth tests start after these steps."
    )

    output = parser.add_argument_group("checkpoints, logging and output")
    output.add_argument("--output_dir", type=str, help="Default: outputs/cdrl-<data>, e.g. outputs/cdrl-shapes.")
    output.add_argument("--checkpointing_steps", type=cli_positive_int, default=500, help="Save a resumable state.")
    output.add_argument("--checkpoints_total_limit", type=cli_positive_int, help="Keep at most this many.")
    # Resuming unpickles Accelerate's RNG and sampler states: only resume from checkpoints you wrote.
    output.add_argument("--resume_from_checkpoint", type=str, help="'latest' or a folder (only ones you wrote).")
    output.add_argument("--logger", choices=["tensorboard", "wandb"], default="tensorboard")
    output.add_argument("--logging_dir", type=str, default="logs", help="Log folder, relative to --output_dir.")
    output.add_argument("--save_images_steps", type=cli_positive_int, default=500, help="Write a sample grid.")
    output.add_argument("--eval_batch_size", type=cli_positive_int, default=32, help="Sample grid and eval batch.")
    output.add_argument("--save_model_steps", type=cli_positive_int, help="Export the EMA pipeline this often.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hub.")
    output.add_argument("--hub_model_id", type=str, help="Repository id (default: --output_dir's name).")
    output.add_argument("--hub_token", type=str, help="Token for the upload.")
    output.add_argument("--hub_private_repo", action="store_true", help="Create a private repository.")

    evaluation = parser.add_argument_group("held-out evaluation (docs/training.md)")
    evaluation.add_argument("--eval_steps", type=cli_positive_int, help="Score EMA samples on held-out images.")
    evaluation.add_argument("--validation_split", type=cli_fraction_or_count, help="Fraction or count held out.")
    evaluation.add_argument("--eval_num_samples", type=cli_positive_int, default=256, help="Samples per evaluation.")
    evaluation.add_argument("--eval_guidance_scale", type=cli_non_negative_float, default=1.0, help="Guidance w.")
    evaluation.add_argument(
        "--keep_best_metric", choices=sorted(training.HIGHER_IS_BETTER), help="Export the best to best/."
    )

    args = parser.parse_args(argv)
    sources = [flag for flag in ("dataset_name", "train_data_dir", "embedded_dataset") if getattr(args, flag)]
    if len(sources) > 1:
        parser.error(f"pass at most one data source, got {', '.join('--' + flag for flag in sources)}")
    weights = args.level_sampling_weights
    if weights is not None and (len(weights) != args.num_noise_levels or sum(weights) <= 0):
        parser.error(
            f"--level_sampling_weights: expected {args.num_noise_levels} weights with a positive sum, got {weights}"
        )
    if args.frozen_initializer_share is None:
        args.frozen_initializer_share = 0.0 if data_phase_start(args) is None else DEFAULT_FROZEN_INITIALIZER_SHARE
    elif args.frozen_initializer_share > 0 and data_phase_start(args) is None:
        parser.error("--frozen_initializer_share needs a data target (--data_target_from_step, --initializer_target)")
    if args.random_flip and "flipped" in (args.negative_shifts or ()):
        parser.error("--negative_shifts flipped contradicts --random_flip (flipped images would be data and not data)")
    if args.eval_num_samples < 2:
        parser.error(f"argument --eval_num_samples: expected at least 2, got {args.eval_num_samples}")
    if args.keep_best_metric is not None and args.eval_steps is None:
        parser.error("--keep_best_metric needs --eval_steps: the metric is computed by the evaluation")
    if args.conditional_initializer is None:
        args.conditional_initializer = bool(args.attribute_columns)
    elif not args.attribute_columns:
        parser.error(
            "--[no-]conditional_initializer is for --attribute_columns (a --label_column model's initializer is "
            "always conditional)"
        )
    if args.keep_best_metric == "accuracy" and not args.label_column:
        parser.error("--keep_best_metric accuracy needs a class-conditional model (--label_column)")
    if args.validation_split is None and args.eval_steps is not None:
        args.validation_split = 0.1
    if args.output_dir is None:
        source = args.dataset_name or args.train_data_dir or args.embedded_dataset or "shapes"
        args.output_dir = os.path.join("outputs", f"cdrl-{Path(source.rstrip('/')).name}")
    training.check_tracker_available(args.logger)
    return args


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset | None, str, training.Conditioning]:
    """The training rows, the held-out rows (``--validation_split``), a name for the model card, the conditioning."""
    if args.dataset_name:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        name = args.dataset_name
    elif args.train_data_dir:
        dataset = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train")
        name = Path(args.train_data_dir).name
    else:
        dataset, name = training.load_embedded_dataset(args.embedded_dataset or "shapes", args.resolution)
    training.check_column(dataset, args.image_column, "--image_column")
    dataset, conditioning = training.conditioning_for(
        dataset, args.label_column, args.attribute_columns, args.conditional_initializer
    )
    dataset, validation = training.split_dataset(dataset, args.validation_split, args.max_train_samples, args.seed)
    return dataset, validation, name, conditioning


def network_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """The --ebm_* and --initializer_* flags that were given, as keyword arguments of the two networks."""
    energy = dict(block_out_channels=args.ebm_channels, layers_per_block=args.ebm_layers_per_block)
    energy["embedding_dim"] = args.ebm_embedding_dim
    energy["use_spectral_norm"] = args.ebm_spectral_norm
    initializer = dict(block_out_channels=args.initializer_channels, norm_num_groups=args.initializer_norm_num_groups)
    initializer["layers_per_block"] = args.initializer_layers_per_block
    initializer["attention_resolutions"] = args.initializer_attention_resolutions
    initializer["dropout"] = args.initializer_dropout
    given = ({key: value for key, value in kwargs.items() if value is not None} for kwargs in (energy, initializer))
    return tuple(given)


def data_phase_start(args: argparse.Namespace) -> int | None:
    """The first optimisation step (0-based) whose initializer regresses on the data (App. G.2), or ``None``:
    0 with ``--initializer_target data``, else ``--data_target_from_step``."""
    return 0 if args.initializer_target == "data" else args.data_target_from_step


def initializer_target_description(args: argparse.Namespace) -> str:
    start = data_phase_start(args)
    if start is None:
        return "refined samples (Eq. 8)"
    text = "data (App. G.2)" if start == 0 else f"refined samples (Eq. 8) for {start} steps, then data (App. G.2)"
    if args.frozen_initializer_share > 0:
        text += f"; {args.frozen_initializer_share:.0%} of the EBM's chains start from the initializer of step {start}"
    return text


def launched_on_cpus_only() -> bool:
    """Several processes (torchrun, accelerate launch) and no accelerator: Accelerate then needs ``cpu=True`` to
    set up a gloo process group (MULTI_CPU) instead of running each process on its own."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def run_facts(
    args, accelerator, progress, dataset, channels, conditioning, started, max_train_steps
) -> dict[str, object]:
    """Facts of the run for the model card."""
    kind = "attributes (compositional)" if conditioning.offsets is not None else "class label"
    initializer = "conditional" if conditioning.conditional_initializer else "unconditional"
    columns = (
        f"{kind}: {', '.join(conditioning.columns)}; label dropout {args.label_dropout}; {initializer} initializer"
    )
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    decay = "constant" if args.lr_decay == "constant" else f"a {args.lr_decay} decay to 0 at step {max_train_steps}"
    facts = {
        "Dataset": dataset,
        "Resolution": f"{args.resolution}x{args.resolution}, {channels} channel(s)",
        "Conditioning": columns if conditioning.columns else "none (unconditional)",
        "Optimisation steps": progress.global_step,
        "Batch size": f"{args.train_batch_size * processes * accumulation} ({args.train_batch_size} per device x "
        f"{processes} process(es) x {accumulation} accumulation step(s))",
        "EBM optimiser": f"Adam, lr {args.ebm_learning_rate}, betas ({args.adam_beta1}, {args.adam_beta2}), "
        f"linear warm-up over {args.lr_warmup_steps} steps (Eq. 15), then {decay}",
        "Initializer optimiser": f"AdamW, lr {args.initializer_learning_rate}, weight decay "
        f"{args.initializer_weight_decay}, warm-up {args.initializer_warmup_head_start} steps ahead (Eq. 15), "
        f"then {decay}",
        "Gradient clipping": f"{args.max_grad_norm} per network",
        "EMA decay": args.ema_max_decay,
        "Langevin steps K": args.num_langevin_steps,
        "Langevin step size scale c": args.langevin_step_size_scale,
        "Pair sampling weights": "uniform (Algorithm 1)"
        if args.level_sampling_weights is None
        else ", ".join(f"{weight:g}" for weight in args.level_sampling_weights),
        "Initializer target": initializer_target_description(args),
        "Langevin noise control of the target": "on" if args.langevin_noise_control else "off",
        "Negative data augmentation": "none"
        if not args.negative_shifts
        else f"{args.negative_share:.0%} of each batch turned {' or '.join(args.negative_shifts)}, scored below the "
        "data (logistic terms)",
        "Mixed precision": accelerator.mixed_precision,
        "Seed": args.seed,
        "Skipped non-finite steps": progress.nonfinite_steps,
        "Training time": f"{(time.time() - started) / 60:.1f} min on {processes} x {accelerator.device.type}",
    }
    if accelerator.device.type == "cpu":
        facts["CPU threads per process"] = torch.get_num_threads()
    if accelerator.mixed_precision == "fp16":
        facts["fp16 overflow steps (skipped by the loss scaler)"] = progress.overflow_steps
    if progress.best_step is not None:
        facts[f"Best {progress.best_metric}"] = f"{progress.best_value:.6g} at step {progress.best_step}"
    return facts


def evaluate(pipeline, evaluator, outputs, args, progress, facts) -> dict[str, str]:
    """Log held-out metrics as eval/*, export a new best of --keep_best_metric to best/; returns the card line."""
    started, step = time.time(), progress.global_step
    metrics = evaluator(pipeline)
    if metrics is None:
        logger.warning(f"Step {step}: non-finite evaluation samples, no metrics.")
        return {}
    logs = {f"eval/{name}": value for name, value in metrics.items()}
    outputs.accelerator.log({**logs, "eval/seconds": time.time() - started}, step=step)
    summary = {f"Held-out evaluation (step {step})": evaluator.summary(metrics)}
    logger.info(f"Step {step}, held-out evaluation: {evaluator.summary(metrics)}")
    metric = args.keep_best_metric
    if metric is not None and progress.improves(metric, metrics[metric]):
        progress.best_metric, progress.best_value, progress.best_step = metric, metrics[metric], step
        best = outputs.export_best(pipeline, {**facts(), **summary})
        logger.info(f"New best {metric} {metrics[metric]:.6g}: exported to {best}")
    return summary


def main(args: argparse.Namespace) -> CDRLPipeline:
    """Train, export the EMA pipeline to --output_dir and return it (on every process)."""
    started = time.time()
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
    if accelerator.device.type == "cpu":  # `accelerate launch` alone would leave each CPU process one thread
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.cpu_threads or training.cpu_threads_per_process(local_processes))
    logger.info(accelerator.state, main_process_only=False)
    verbosity = "warning" if accelerator.is_local_main_process else "error"
    for library in (datasets, diffusers):
        getattr(library.utils.logging, f"set_verbosity_{verbosity}")()
    set_seed(args.seed)  # the same initial weights on every process

    # 1. Data: every source becomes a `datasets.Dataset`; crops and flips are seeded by (seed, epoch, row).
    with accelerator.main_process_first():
        dataset, validation_rows, dataset_name, conditioning = load_data(args)
    channels = training.image_channels(dataset, args.image_column)
    columns = conditioning.columns
    train_images = training.TrainingImages(
        dataset, args.image_column, columns, args.resolution, channels, args.center_crop, args.random_flip, args.seed
    )
    # Its own generator: starting an epoch must not draw from the global RNG (dropout uses that one).
    train_dataloader = torch.utils.data.DataLoader(
        train_images,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )

    # 2. Models, noise schedule and EMA (App. A.1, A.2).
    energy_overrides, initializer_overrides = network_overrides(args)
    energy_model, initializer = training.build_models(
        args.model_config,
        args.resolution,
        channels,
        conditioning.class_names,
        conditioning.conditional_initializer,
        energy_overrides,
        initializer_overrides,
    )
    scheduler = CDRLScheduler(
        num_noise_levels=args.num_noise_levels,
        num_langevin_steps=args.num_langevin_steps,
        langevin_step_size_scale=args.langevin_step_size_scale,
    )
    emas = {
        name: training.create_ema_model(model, args.ema_max_decay)
        for name, model in zip(NAMES, (energy_model, initializer))
    }
    for ema in emas.values():
        ema.to(accelerator.device)
    # Far-off negatives for the data phase: the initializer as it was when its target switched to the data.
    data_start, frozen_initializer = data_phase_start(args), None
    if args.frozen_initializer_share > 0:
        frozen_initializer = copy.deepcopy(initializer).requires_grad_(False).eval().to(accelerator.device)

    # 3. One optimizer with a parameter group per network (EBM Adam = AdamW without weight decay, initializer AdamW),
    # so fp16 loss scaling steps once per update; the warm-ups of Eq. 15, stepped once per optimisation step.
    optimizer = torch.optim.AdamW(
        [
            {"params": energy_model.parameters(), "lr": args.ebm_learning_rate, "weight_decay": 0.0},
            {"params": initializer.parameters(), "lr": args.initializer_learning_rate},
        ],
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.initializer_weight_decay,
        **training.fused_adamw_options(accelerator.device),
    )
    energy_model, initializer, optimizer, train_dataloader = accelerator.prepare(
        energy_model, initializer, optimizer, train_dataloader
    )
    networks = {name: accelerator.unwrap_model(model) for name, model in zip(NAMES, (energy_model, initializer))}
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The dataset has {len(dataset)} images, fewer than one batch per process "
            f"({args.train_batch_size} x {accelerator.num_processes}); lower `--train_batch_size`."
        )
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * updates_per_epoch
    lr_scheduler = LambdaLR(
        optimizer,
        [
            lambda step, head_start=head_start: (
                training.warmup_multiplier(step, args.lr_warmup_steps, head_start)
                * training.decay_multiplier(step / max_train_steps, args.lr_decay)
            )
            for head_start in (0, args.initializer_warmup_head_start)
        ],
    )

    # 4. Checkpoint contents (networks and EMAs in diffusers format, the optimizer, RNG states, the learning-rate
    # schedule, the training position, the health monitor and this process's noise generator); trackers; resume.
    seed = training.training_seed(args.seed, accelerator.process_index)  # fresh noise per process
    generator = torch.Generator(accelerator.device).manual_seed(seed)
    progress = training.TrainingProgress()
    # The growth tests compare with the smallest level seen after `--health_warmup_steps`: before that, the chains'
    # moves (and the initializer loss) grow as the EBM learns, which is health, not divergence.
    monitor = training.TrainingHealthMonitor(
        args.num_noise_levels, max_neg_energy_gap=args.max_neg_energy_gap, warmup_updates=args.health_warmup_steps
    )
    training.register_checkpoint_hooks(accelerator, networks, emas, generator)
    accelerator.register_for_checkpointing(lr_scheduler, progress, monitor)
    if frozen_initializer is not None:
        accelerator.register_for_checkpointing(frozen_initializer)
    roll_back = training.RollBack(
        accelerator, args.output_dir, generator, args.seed, args.max_consecutive_nonfinite, args.max_rollbacks
    )
    # The model card lists Hub datasets in its metadata (a --dataset_name that is not a local folder).
    dataset_id = args.dataset_name if args.dataset_name and not os.path.exists(args.dataset_name) else None
    card = dict(repo_id=args.hub_model_id, dataset_name=dataset_name, dataset_id=dataset_id)
    # The model card shows the samples beside training images (one class per column for a conditional model).
    reference_rows = dataset.select(range(min(len(dataset), 1024)))
    real_data = training.image_tensors(reference_rows, args.image_column, args.resolution, channels, args.label_column)
    outputs = training.RunOutputs(
        accelerator, args.output_dir, args.logger, args.eval_batch_size, args.seed, real_data=real_data, **card
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        training.remove_stale_folders(args.output_dir)  # temporary folders of a save that a crash interrupted
        accelerator.init_trackers("train_cdrl", config={key: str(value) for key, value in vars(args).items()})
    evaluator, last_evaluation = None, {}
    if args.eval_steps is not None and accelerator.is_main_process:
        logger.info(f"Held out {len(validation_rows)} images for evaluation every {args.eval_steps} steps")
        evaluator = training.HeldOutEvaluator(
            dataset,
            validation_rows,
            args.image_column,
            args.resolution,
            channels,
            conditioning.columns,
            class_conditional=args.label_column is not None,
            num_samples=args.eval_num_samples,
            batch_size=args.eval_batch_size,
            guidance_scale=args.eval_guidance_scale,
            seed=args.seed,
            cache_dir=os.path.join(args.output_dir, "evaluation"),
            device=accelerator.device,
        )
        logger.info(f"Evaluation features: {evaluator.description}")
    if args.resume_from_checkpoint is not None:
        checkpoint = training.resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        logger.info(f"Resuming from {checkpoint}" if checkpoint else f"No checkpoint in {args.output_dir}: a new run.")
        if checkpoint is not None:
            accelerator.load_state(checkpoint)
        if progress.best_step is not None:
            logger.info(f"Best {progress.best_metric} so far: {progress.best_value:.6g} at step {progress.best_step}")

    def facts() -> dict[str, object]:
        data = f"{dataset_name} ({len(dataset)} images)"
        return run_facts(args, accelerator, progress, data, channels, conditioning, started, max_train_steps)

    logger.info(f"***** Training on {len(dataset)} images ({dataset_name}), classes: {conditioning.class_names} *****")
    sizes = {name: f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M" for name, net in networks.items()}
    logger.info(f"  Parameters: {sizes}; optimisation steps = {max_train_steps}, starting at {progress.global_step}")

    # 5. Training (Algorithm 1), one update per `gradient_accumulation_steps` batches.
    metrics = training.StepMetrics(args.num_noise_levels, accelerator.device)
    rng_devices = [] if accelerator.device.type == "cpu" else [accelerator.device]
    bar = tqdm(total=max_train_steps, initial=progress.global_step, disable=not accelerator.is_local_main_process)
    update_is_finite, finished = True, False
    deadline = None if args.max_train_minutes is None else time.time() + 60 * args.max_train_minutes

    def past_deadline() -> bool:
        """Whether the time budget is spent, agreed by all processes (the main process's clock decides)."""
        if deadline is None:
            return False
        late = torch.tensor(float(time.time() > deadline), device=accelerator.device)
        return bool(accelerator.reduce(late, reduction="max").item())

    energy_model.train()
    initializer.train()
    while progress.global_step < max_train_steps and not finished:
        # The rest of the current epoch in its seeded order (skipping what a resumed run already saw).
        if progress.batches_in_epoch >= len(train_dataloader):
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
        train_dataloader.set_epoch(progress.epoch)
        train_images.set_epoch(progress.epoch)
        for batch in accelerator.skip_first_batches(train_dataloader, progress.batches_in_epoch):
            progress.batches_in_epoch += 1
            with accelerator.accumulate(energy_model, initializer):
                class_labels = training.class_labels_of(batch, conditioning, generator)
                data_phase = data_start is not None and progress.global_step >= data_start
                if frozen_initializer is not None and progress.global_step == data_start:
                    frozen_initializer.load_state_dict(networks["initializer"].state_dict())
                negatives = None
                if args.negative_shifts:
                    negatives = training.shifted_negatives(
                        batch["pixel_values"], args.negative_shifts, args.negative_share, generator
                    )
                with accelerator.autocast():
                    output = training.cdrl_training_step(
                        energy_model,
                        initializer,
                        scheduler,
                        batch["pixel_values"],
                        class_labels=class_labels,
                        generator=generator,
                        label_dropout=args.label_dropout,
                        initializer_target="data" if data_phase else "refined",
                        level_probabilities=args.level_sampling_weights,
                        langevin_noise_control=args.langevin_noise_control,
                        frozen_initializer=frozen_initializer if data_phase else None,
                        frozen_initializer_share=args.frozen_initializer_share,
                        augmented_negatives=negatives,
                    )
                if training.losses_are_finite(accelerator, output.ebm_loss, output.initializer_loss):
                    accelerator.backward(output.ebm_loss + output.initializer_loss)
                    metrics.add(output)
                else:
                    update_is_finite = False
                if accelerator.sync_gradients and update_is_finite:
                    result = training.clip_and_step(accelerator, optimizer, networks, args.max_grad_norm)
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            # One optimisation step (taken, skipped as non-finite, or skipped by the fp16 loss scaler) is complete.
            lr_scheduler.step()
            progress.global_step += 1
            bar.update(1)
            step = progress.global_step
            finished = step >= max_train_steps or past_deadline()
            if data_start and step - 1 == data_start:
                # This update's losses are the first with the data target: its loss has a new healthy level.
                monitor.forget("initializer_loss")
            logs, level_metrics = metrics.reduce(accelerator)
            stepped, overflow = update_is_finite and result.stepped, update_is_finite and result.overflow
            diverged = roll_back.record(finite=stepped or overflow)
            if stepped:
                for name, ema in emas.items():
                    ema.step(networks[name].parameters())
                logs.update({f"grad_norm/{name}": norm for name, norm in result.grad_norms.items()})
                logs["ema_decay"] = emas["energy_model"].cur_decay_value
                try:  # the f_hat gap and initializer loss of each level, the gradient norms
                    monitor.update(step, level_metrics, result.grad_norms)
                except training.DivergenceError as error:
                    diverged = str(error)
                logs.update({f"health/{name}": value for name, value in monitor.summary().items()})
                bar.set_postfix(ebm_loss=logs["train/ebm_loss"], initializer_loss=logs["train/initializer_loss"])
            elif overflow:
                progress.overflow_steps += 1
                logger.info(f"Step {step}: fp16 gradient overflow, update skipped and loss scale lowered.")
            else:
                progress.nonfinite_steps += 1
                logs = {}
                logger.warning(f"Step {step}: non-finite loss or gradient, update skipped.")
            logs.update({f"lr/{name}": lr for name, lr in zip(NAMES, lr_scheduler.get_last_lr())})
            logs.update({"train/nonfinite_steps": progress.nonfinite_steps, "train/skipped_step": int(not stepped)})
            logs["train/overflow_steps"] = progress.overflow_steps
            accelerator.log(logs, step=step)

            # Held-out evaluation (first, so a checkpoint of this step records its best), checkpoint, sample grid,
            # export. Sampling runs on the main process under a forked RNG: resuming stays exact.
            evaluate_now = args.eval_steps is not None and (step % args.eval_steps == 0 or finished)
            export_now = args.save_model_steps is not None and step % args.save_model_steps == 0
            sample_now = (step % args.save_images_steps == 0 or export_now) and not finished
            if accelerator.is_main_process and (evaluate_now or sample_now):
                with torch.random.fork_rng(devices=rng_devices, device_type=accelerator.device.type):
                    pipeline = training.ema_pipeline(*networks.values(), *emas.values(), scheduler)
                    if evaluate_now:
                        last_evaluation = (
                            evaluate(pipeline, evaluator, outputs, args, progress, facts) or last_evaluation
                        )
                    if sample_now:
                        grid = outputs.samples(pipeline, step)
                    if export_now:
                        outputs.export(pipeline, facts(), grid)
            accelerator.wait_for_everyone()  # the other processes wait for the main process's evaluation
            if step % args.checkpointing_steps == 0 and stepped:
                training.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)

            if diverged:  # roll back to the last checkpoint with fresh noise (or give up: TrainingDiverged)
                roll_back(diverged, progress)
                accelerator.log({"train/rollbacks": roll_back.rollbacks}, step=progress.global_step)
                bar.n = progress.global_step
                bar.refresh()
                update_is_finite = True
                break  # continue from the checkpoint's data position
            update_is_finite = True
            if finished:
                break

    # 6. Export the EMA pipeline with its sample grid and model card, and upload it.
    bar.close()
    accelerator.wait_for_everyone()
    pipeline = training.ema_pipeline(*networks.values(), *emas.values(), scheduler)
    if accelerator.is_main_process:
        outputs.export(pipeline, {**facts(), **last_evaluation}, outputs.samples(pipeline, progress.global_step))
        logger.info(f"Saved the EMA pipeline to {args.output_dir}")
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        repo_name = args.hub_model_id or Path(args.output_dir).resolve().name
        ignore = (f"{args.logging_dir}/*", *training.UPLOAD_IGNORE_PATTERNS)
        repo_id = training.push_to_hub(args.output_dir, repo_name, args.hub_token, args.hub_private_repo, ignore)
        logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}")
    return pipeline


if __name__ == "__main__":
    main(parse_args())
