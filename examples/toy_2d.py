#!/usr/bin/env python
"""Figure 1 of the CDRL paper on a CPU: fit a 2-D checkerboard and measure the density the EBMs learn.

    python examples/toy_2d.py                        # at most 20 minutes of training on one CPU thread
    python examples/toy_2d.py --seeds 0 1 2          # three seeds, mean ± spread (docs/toy_2d.md)
    python examples/toy_2d.py --dataset 8gaussians --max_train_minutes 8

It trains an ``EnergyMLP`` and an ``InitializerMLP`` with the library's ``cdrl_training_step`` (Algorithm 1), samples
with ``CDRLPipeline`` (Algorithm 2), saves both models and the scheduler with ``save_pretrained``, draws the figure
(rows: data, fitted density exp(f_theta) normalised on a grid, and generated samples, one column per noise level)
and writes the metrics as JSON: KL(true || model) on the grid and the fraction of samples on the black squares
(checkerboard), and MMD / sliced Wasserstein distances to held-out data.

``train_toy`` and ``evaluate_toy`` can be imported (``sys.path.insert(0, "examples"); import toy_2d``) to reuse this
set-up, e.g. to compare precisions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from tqdm.auto import tqdm

from cdrl_diffusers import (
    CDRLPipeline,
    CDRLScheduler,
    EnergyMLP,
    InitializerMLP,
    cdrl_training_step,
    create_ema_model,
    decay_multiplier,
    warmup_multiplier,
)
from cdrl_diffusers.data import TOY_BOUND, TOY_DATASETS, has_density, sample_toy, toy_log_density
from cdrl_diffusers.evaluation import (
    density_grid,
    energy_log_density,
    fraction_in_support,
    grid_log_probabilities,
    kl_divergence_on_grid,
    mmd_rbf,
    sliced_wasserstein_distance,
)
from cdrl_diffusers.training import LR_DECAYS, DivergenceError, TrainingHealthMonitor

MIXED_PRECISION = ("no", "bf16")


@dataclass
class ToyConfig:
    """Everything that defines a toy run; the defaults are the CPU setting of docs/toy_2d.md."""

    dataset: str = "checkerboard"
    # The official toy's unit checkerboard scaled by 4 (data in [-8, 8]^2), with its step-size rule (c = 2e-3 below).
    data_scale: float = 4.0
    num_train_steps: int = 16_000
    batch_size: int = 256
    ebm_learning_rate: float = 5e-4
    initializer_learning_rate: float = 1e-3
    warmup_steps: int = 500
    # Training stops after ``num_train_steps`` or ``max_train_minutes``, whichever comes first; the learning-rate
    # decay follows the larger of the two fractions used, so a slower machine runs the whole schedule in fewer steps.
    max_train_minutes: float = 20.0
    # "cosine" (or "linear") multiplies the Eq. 15 warm-up by a decay from 1 to ``final_lr_fraction`` over the run;
    # "constant" is the paper's.
    lr_decay: str = "cosine"
    final_lr_fraction: float = 0.1
    max_grad_norm: float = 1.0
    # The health monitor's absolute limit on a level's |f_hat gap|: healthy runs stay below ~0.3, and runs that blew
    # up (finite but exploding energies) jumped to hundreds; its growth tests usually stop such runs earlier.
    max_neg_energy_gap: float = 10.0
    ema_decay: float = 0.999
    energy_hidden_dim: int = 128
    energy_num_layers: int = 4
    energy_embedding_dim: int = 128
    energy_act_fn: str = "leaky_relu"
    initializer_hidden_dim: int = 128
    initializer_num_layers: int = 3
    num_noise_levels: int = 6
    num_langevin_steps: int = 15
    langevin_step_size_scale: float = 2e-3
    # c of pair 0 alone. The level-0 density is f_hat / s_0^2, so a small s_0 magnifies every error of f_hat there;
    # the authors' c gives s_0 = 0.59 s_1, 1.5x c gives s_0 = 0.72 s_1 (docs/toy_2d.md).
    level0_langevin_step_size_scale: float = 3e-3
    # How often pair 0 is drawn relative to each other pair (1: uniform, as in Algorithm 1): level 0 is the slowest
    # to learn, and three times its share of each batch averages out the noise that f_hat / s_0^2 magnifies.
    level0_sampling_weight: float = 3.0
    # K' of the evaluation samples: the sampling adjustment of Sec. 4.2 (step size s_t sqrt(K / K')), which trades
    # sampling time for the sampler's own blur of the sharp level-0 density.
    sampling_langevin_steps: int = 90
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 250
    num_eval_samples: int = 10_000
    grid_resolution: int = 200
    # Half-width of the plotting/KL grid in units of ``data_scale``: half a square of margin around the data box.
    grid_bound: float = TOY_BOUND + 0.5

    def __post_init__(self) -> None:
        if self.dataset not in TOY_DATASETS:
            raise ValueError(f"`dataset` must be one of {TOY_DATASETS}, got {self.dataset!r}.")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"`lr_decay` must be one of {LR_DECAYS}, got {self.lr_decay!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        positive = ("num_train_steps", "batch_size", "log_every", "num_eval_samples", "num_noise_levels")
        positive += ("num_langevin_steps", "energy_hidden_dim", "energy_num_layers", "energy_embedding_dim")
        positive += ("initializer_hidden_dim", "initializer_num_layers", "grid_resolution", "data_scale", "grid_bound")
        positive += ("ebm_learning_rate", "initializer_learning_rate", "max_grad_norm", "langevin_step_size_scale")
        positive += ("max_train_minutes", "level0_langevin_step_size_scale", "sampling_langevin_steps")
        positive += ("level0_sampling_weight",)
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"`--{name}` must be positive, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`--warmup_steps` must be >= 0, got {self.warmup_steps}.")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"`--final_lr_fraction` must lie in [0, 1], got {self.final_lr_fraction}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`--ema_decay` must lie in [0, 1), got {self.ema_decay}.")


@dataclass
class ToyModels:
    """The trained EBM and initializer (EMA weights, eval mode) and their scheduler."""

    energy_model: EnergyMLP
    initializer: InitializerMLP
    scheduler: CDRLScheduler

    def save_pretrained(self, output_dir: str) -> None:
        for name in ("energy_model", "initializer", "scheduler"):
            getattr(self, name).save_pretrained(os.path.join(output_dir, name))


@dataclass
class TrainingLog:
    """Per-interval means of the losses and of the per-level diagnostics of ``cdrl_training_step``."""

    steps: list[int] = field(default_factory=list)
    ebm_loss: list[float] = field(default_factory=list)
    initializer_loss: list[float] = field(default_factory=list)
    # f_hat(y+) - f_hat(y~) per level: the EBM's margin between data and its own samples.
    neg_energy_gap: list[list[float]] = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0


def build_models(config: ToyConfig) -> ToyModels:
    """Fresh models and the toy scheduler: s_t^2 = (c / sigma_bar_0) sigma_{t+1}^2 as in the authors' 2-D script."""
    torch.manual_seed(config.seed)
    energy_model = EnergyMLP(
        data_dim=2,
        hidden_dim=config.energy_hidden_dim,
        num_layers=config.energy_num_layers,
        embedding_dim=config.energy_embedding_dim,
        act_fn=config.energy_act_fn,
    )
    initializer = InitializerMLP(
        data_dim=2, hidden_dim=config.initializer_hidden_dim, num_layers=config.initializer_num_layers
    )
    scheduler = CDRLScheduler(
        num_noise_levels=config.num_noise_levels,
        num_langevin_steps=config.num_langevin_steps,
        langevin_step_size_rule="toy",
        langevin_step_size_scale=[config.level0_langevin_step_size_scale]
        + [config.langevin_step_size_scale] * (config.num_noise_levels - 1),
        clip_sample=False,
    )
    return ToyModels(energy_model, initializer, scheduler)


def _autocast(mixed_precision: str) -> contextlib.AbstractContextManager:
    if mixed_precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _format_gaps(gaps: list[float]) -> str:
    return " ".join(f"{gap:+.3g}" for gap in gaps)


def train_toy(
    config: ToyConfig, models: ToyModels | None = None, progress: bool = True, log: bool = True
) -> tuple[ToyModels, TrainingLog]:
    """Train with Algorithm 1 and the App. A.2 optimisation; returns the EMA models and the training log.

    Stabilisers: spectral normalisation in the EBM, the Eq. 15 warm-up of both learning rates, gradient-norm
    clipping and EMA. A non-finite loss or gradient norm stops training with a ``DivergenceError`` naming the step and
    the last per-level f_hat gaps, instead of letting NaNs propagate silently.
    """
    models = build_models(config) if models is None else models
    energy_model, initializer, scheduler = models.energy_model, models.initializer, models.scheduler
    energy_model.train()
    initializer.train()
    generator = torch.Generator().manual_seed(config.seed)
    levels = None
    if config.level0_sampling_weight != 1.0:
        levels = [config.level0_sampling_weight] + [1.0] * (scheduler.num_noise_levels - 1)
    ebm_optimizer = torch.optim.Adam(energy_model.parameters(), lr=config.ebm_learning_rate, betas=(0.9, 0.999))
    initializer_optimizer = torch.optim.AdamW(
        initializer.parameters(), lr=config.initializer_learning_rate, betas=(0.9, 0.999), weight_decay=0.0
    )

    ema_energy = create_ema_model(energy_model, decay=config.ema_decay)
    ema_initializer = create_ema_model(initializer, decay=config.ema_decay)
    monitor = TrainingHealthMonitor(scheduler.num_noise_levels, max_neg_energy_gap=config.max_neg_energy_gap)
    # (optimizer, peak rate, warm-up head start): the initializer starts 500 steps ahead (Eq. 15).
    optimizers = (
        (ebm_optimizer, config.ebm_learning_rate, 0),
        (initializer_optimizer, config.initializer_learning_rate, 500),
    )

    history = TrainingLog()
    sums = {"ebm_loss": 0.0, "initializer_loss": 0.0}
    gap_sum = torch.zeros(scheduler.num_noise_levels, dtype=torch.float64)
    gap_count = torch.zeros(scheduler.num_noise_levels, dtype=torch.float64)
    interval = 0
    last_gaps = "none yet"
    start = time.perf_counter()
    budget = 60.0 * config.max_train_minutes
    bar = tqdm(total=config.num_train_steps, desc="CDRL toy", disable=not progress, mininterval=1.0)
    step = 0
    while True:
        # Training progress in [0, 1]: the share of the steps or of the time budget used, whichever is larger.
        progress_fraction = max(step / config.num_train_steps, (time.perf_counter() - start) / budget)
        if progress_fraction >= 1.0:
            break
        step += 1
        for optimizer, learning_rate, head_start in optimizers:
            rate = learning_rate * warmup_multiplier(step - 1, config.warmup_steps, head_start)
            for group in optimizer.param_groups:
                group["lr"] = rate * decay_multiplier(progress_fraction, config.lr_decay, config.final_lr_fraction)
        clean = sample_toy(config.dataset, config.batch_size, generator=generator, scale=config.data_scale)
        with _autocast(config.mixed_precision):
            output = cdrl_training_step(
                energy_model, initializer, scheduler, clean, generator=generator, level_probabilities=levels
            )
        losses = torch.stack([output.ebm_loss, output.initializer_loss]).detach()
        if not torch.isfinite(losses).all():
            raise DivergenceError(
                f"Step {step}: non-finite loss (EBM {losses[0].item()}, initializer {losses[1].item()}); "
                f"last per-level f_hat gaps: {last_gaps}. Lower the learning rates or lengthen the warm-up."
            )
        ebm_optimizer.zero_grad(set_to_none=True)
        initializer_optimizer.zero_grad(set_to_none=True)
        (output.ebm_loss + output.initializer_loss).backward()
        grad_norms = {
            name: torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm).item()
            for name, model in (("ebm", energy_model), ("initializer", initializer))
        }
        monitor.update(step, output.level_metrics, grad_norms)
        ebm_optimizer.step()
        initializer_optimizer.step()
        ema_energy.step(energy_model.parameters())
        ema_initializer.step(initializer.parameters())
        bar.update()

        sums["ebm_loss"] += losses[0].item()
        sums["initializer_loss"] += losses[1].item()
        gaps = output.level_metrics["neg_energy_gap"].double()
        present = torch.isfinite(gaps)
        gap_sum += torch.where(present, gaps, 0.0)
        gap_count += present.double()
        interval += 1
        if step % config.log_every == 0:
            level_gaps = torch.where(gap_count > 0, gap_sum / gap_count.clamp_min(1), math.nan).tolist()
            history.steps.append(step)
            history.ebm_loss.append(sums["ebm_loss"] / interval)
            history.initializer_loss.append(sums["initializer_loss"] / interval)
            history.neg_energy_gap.append(level_gaps)
            last_gaps = _format_gaps(level_gaps)
            bar.set_postfix(ebm=f"{history.ebm_loss[-1]:.3g}", init=f"{history.initializer_loss[-1]:.3g}")
            if log:
                tqdm.write(
                    f"step {step:6d}  ebm_loss {history.ebm_loss[-1]:+.4f}  init_loss "
                    f"{history.initializer_loss[-1]:.4f}  f_hat gap per level t=0..{len(level_gaps) - 1}: {last_gaps}",
                    file=sys.stdout,
                )
            sums = dict.fromkeys(sums, 0.0)
            gap_sum.zero_()
            gap_count.zero_()
            interval = 0
    bar.close()
    history.num_steps = step
    history.seconds = time.perf_counter() - start

    trained = ToyModels(copy.deepcopy(energy_model).eval(), copy.deepcopy(initializer).eval(), scheduler)
    ema_energy.copy_to(trained.energy_model.parameters())
    ema_initializer.copy_to(trained.initializer.parameters())
    return trained, history


@dataclass
class ToyEvaluation:
    """Metrics (JSON-ready) and the arrays the figure needs."""

    metrics: dict
    grid_bound: float
    observed: list[torch.Tensor]
    densities: list[torch.Tensor]
    generated: list[torch.Tensor]
    # The exact density of each level normalised on the grid (empty for data sets without a closed form).
    true_densities: list[torch.Tensor] = field(default_factory=list)


def sample_levels(
    models: ToyModels, num_samples: int, generator: torch.Generator, num_langevin_steps: int | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Algorithm 2 from x_T ~ N(0, I) through ``CDRLPipeline`` with K' = ``num_langevin_steps`` (``None``: the
    trained K): the final (Tweedie-denoised) samples and x_t, t < T."""
    pipeline = CDRLPipeline(models.energy_model, models.initializer, models.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    levels: dict[int, torch.Tensor] = {}

    def keep(pipe: CDRLPipeline, index: int, timestep: int, tensors: dict) -> dict:
        levels[int(timestep)] = tensors["latents"].detach().clone()
        return {}

    latents = torch.randn(num_samples, 2, generator=generator)
    final = pipeline(
        batch_size=num_samples,
        generator=generator,
        latents=latents,
        num_langevin_steps=num_langevin_steps,
        output_type="pt",
        callback_on_step_end=keep,
    ).images
    return final.detach(), [levels[t] for t in range(models.scheduler.num_noise_levels)]


def evaluate_toy(models: ToyModels, config: ToyConfig, seed: int = 1234) -> ToyEvaluation:
    """Level densities on the grid, samples per level and the metrics (level 0 is the paper's density, Sec. 4.4).

    KL(true || model) compares the level-0 EBM density with the exact density of x_0 = alpha_bar_0 x + sigma_bar_0 eps,
    both normalised over the grid; ``kl_per_level`` does the same at every level. The sample metrics compare the
    final samples with held-out data; ``*_reference`` is the same distance between two held-out sets (its noise
    floor).
    """
    scheduler = models.scheduler
    generator = torch.Generator().manual_seed(seed)
    bound = config.grid_bound * config.data_scale
    grid = density_grid(bound, config.grid_resolution)
    num_levels = scheduler.num_noise_levels
    start = time.perf_counter()

    clean = sample_toy(config.dataset, config.num_eval_samples, generator=generator, scale=config.data_scale)
    reference = sample_toy(config.dataset, config.num_eval_samples, generator=generator, scale=config.data_scale)
    observed = [
        scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), level) for level in range(num_levels)
    ]
    energy_model = models.energy_model
    model_log_densities = [energy_log_density(energy_model, scheduler, grid.points, t) for t in range(num_levels)]
    densities = [grid.as_image(grid_log_probabilities(values).exp()).float() for values in model_log_densities]
    final, generated = sample_levels(models, config.num_eval_samples, generator, config.sampling_langevin_steps)
    generated[0] = final
    trained_k = sample_levels(models, config.num_eval_samples, generator)[0]

    metrics: dict = {
        "dataset": config.dataset,
        "num_samples": config.num_eval_samples,
        "grid": {"bound": bound, "resolution": config.grid_resolution},
        "finite_sample_fraction": float(torch.isfinite(final).all(1).float().mean()),
    }
    finite = final[torch.isfinite(final).all(1)]
    true_densities = []
    if has_density(config.dataset):
        kls = []
        for t in range(num_levels):
            alpha_bar, sigma_bar = scheduler.alpha_bar[t].item(), scheduler.sigma_bar[t].item()
            true = toy_log_density(config.dataset, grid.points, config.data_scale, alpha_bar, sigma_bar)
            kls.append(kl_divergence_on_grid(true, model_log_densities[t]))
            true_densities.append(grid.as_image(grid_log_probabilities(true).exp()).float())
        metrics["kl_true_model"] = kls[0]
        metrics["kl_per_level"] = kls
        metrics["in_support_fraction"] = fraction_in_support(final, config.dataset, config.data_scale)
        # The same with the K Langevin steps the models were trained with (no sampling adjustment).
        metrics["in_support_fraction_trained_k"] = fraction_in_support(trained_k, config.dataset, config.data_scale)
        metrics["in_support_fraction_data"] = fraction_in_support(reference, config.dataset, config.data_scale)
    metrics["mmd"] = mmd_rbf(finite, clean) if finite.shape[0] > 1 else math.inf
    metrics["mmd_reference"] = mmd_rbf(reference, clean)
    projections = torch.Generator().manual_seed(seed + 1)
    metrics["sliced_wasserstein"] = (
        sliced_wasserstein_distance(finite, clean, generator=projections) if finite.shape[0] > 1 else math.inf
    )
    metrics["sliced_wasserstein_reference"] = sliced_wasserstein_distance(reference, clean, generator=projections)
    metrics["evaluation_seconds"] = time.perf_counter() - start
    return ToyEvaluation(metrics, bound, observed, densities, generated, true_densities)


def plot_figure(evaluation: ToyEvaluation, scheduler: CDRLScheduler, path: str, max_points: int = 5000) -> None:
    """Figure 1 layout: observed x_t, the true density (where known), the fitted density exp(f_theta) normalised on
    the grid, and generated x_t, one column per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_levels = len(evaluation.densities)
    bound = evaluation.grid_bound
    rows = [("observed", evaluation.observed)]
    if evaluation.true_densities:
        rows.append(("true density", evaluation.true_densities))
    rows += [("fitted density", evaluation.densities), ("generated", evaluation.generated)]
    fig, axes = plt.subplots(len(rows), num_levels, figsize=(2.2 * num_levels, 2.27 * len(rows)), squeeze=False)
    for t in range(num_levels):
        axes[0, t].set_title(f"t = {t}  (λ = {scheduler.logsnr[t].item():.2f})", fontsize=8)
        for row, (label, values) in enumerate(rows):
            axis = axes[row, t]
            if label.endswith("density"):
                axis.imshow(values[t].numpy(), origin="lower", extent=(-bound, bound, -bound, bound), cmap="viridis")
            else:
                points = values[t][:max_points].numpy()
                axis.scatter(points[:, 0], points[:, 1], s=0.2, alpha=0.5, color="black", rasterized=True)
            axis.set_xlim(-bound, bound)
            axis.set_ylim(-bound, bound)
            axis.set_aspect("equal")
            axis.set_xticks([])
            axis.set_yticks([])
    for row, (label, _) in enumerate(rows):
        axes[row, 0].set_ylabel(label, fontsize=9)
    axes[-1, 0].set_xlabel("level 0: after the Tweedie step", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[ToyConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/toy_2d", help="Where the models, figure and metrics go.")
    parser.add_argument("--figure_path", default=None, help="PNG path (default: OUTPUT_DIR/toy_2d.png).")
    parser.add_argument("--metrics_path", default=None, help="JSON path (default: OUTPUT_DIR/metrics.json).")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="Run once per seed (e.g. --seeds 0 1 2) into OUTPUT_DIR/seed_N and report mean ± spread.",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="CPU threads. The toy networks are so small that one thread is fastest: more threads only add "
        "synchronisation, and collapse when another job shares the cores.",
    )
    for item in fields(ToyConfig):
        choices = {"dataset": TOY_DATASETS, "mixed_precision": MIXED_PRECISION, "lr_decay": LR_DECAYS}.get(item.name)
        parser.add_argument(f"--{item.name}", type=type(item.default), default=None, choices=choices)
    args = parser.parse_args(argv)
    overrides = {item.name: getattr(args, item.name) for item in fields(ToyConfig)}
    config = replace(ToyConfig(), **{name: value for name, value in overrides.items() if value is not None})
    return config, args


def run_one(config: ToyConfig, output_dir: str, figure_path: str, progress: bool) -> dict:
    """Train, save, evaluate and plot one run; returns its JSON-ready result (without the command)."""
    print(f"Config: {json.dumps(asdict(config))}")
    models, history = train_toy(config, progress=progress)
    print(f"Training took {history.seconds:.0f} s ({history.num_steps} steps).")
    models.save_pretrained(output_dir)
    evaluation = evaluate_toy(models, config)
    plot_figure(evaluation, models.scheduler, figure_path)
    summary = {key: value for key, value in evaluation.metrics.items() if key not in ("grid", "kl_per_level")}
    print(json.dumps(summary, indent=2))
    return {
        "config": asdict(config),
        "train_seconds": history.seconds,
        "metrics": evaluation.metrics,
        "training_log": asdict(history),
    }


SEED_SUMMARY = ("kl_true_model", "in_support_fraction", "in_support_fraction_trained_k", "sliced_wasserstein", "mmd")


def summarize_seeds(results: dict[int, dict]) -> dict[str, dict]:
    """Mean, standard deviation, minimum and maximum over seeds of the main metrics and the training time."""
    summary = {}
    rows = {name: [result["metrics"][name] for result in results.values()] for name in SEED_SUMMARY}
    rows = {name: values for name, values in rows.items() if all(isinstance(value, float) for value in values)}
    rows["train_minutes"] = [result["train_seconds"] / 60 for result in results.values()]
    levels = [result["metrics"].get("kl_per_level") for result in results.values()]
    if all(levels):
        rows.update({f"kl_level_{t}": [kls[t] for kls in levels] for t in range(len(levels[0]))})
    for name, values in rows.items():
        tensor = torch.tensor(values, dtype=torch.float64)
        spread = tensor.std().item() if len(values) > 1 else 0.0
        summary[name] = {"mean": tensor.mean().item(), "std": spread, "min": min(values), "max": max(values)}
    return summary


def main(argv: list[str] | None = None) -> dict:
    config, args = parse_args(argv)
    if args.num_threads < 1:
        raise ValueError(f"`--num_threads` must be positive, got {args.num_threads}.")
    torch.set_num_threads(args.num_threads)
    command = "python examples/toy_2d.py " + " ".join(sys.argv[1:] if argv is None else argv)
    metrics_path = args.metrics_path or os.path.join(args.output_dir, "metrics.json")
    if args.seeds is None:
        figure_path = args.figure_path or os.path.join(args.output_dir, "toy_2d.png")
        result = {"command": command, **run_one(config, args.output_dir, figure_path, not args.no_progress)}
        saved = f"the models to {args.output_dir}, the figure to {figure_path}"
    else:
        runs = {}
        for seed in args.seeds:
            seed_dir = os.path.join(args.output_dir, f"seed_{seed}")
            runs[seed] = run_one(
                replace(config, seed=seed), seed_dir, os.path.join(seed_dir, "toy_2d.png"), not args.no_progress
            )
        result = {"command": command, "seeds": args.seeds, "summary": summarize_seeds(runs), "runs": runs}
        for name, stats in result["summary"].items():
            spread = f"min {stats['min']:.4g}, max {stats['max']:.4g}"
            print(f"{name:>22s}: {stats['mean']:.4g} ± {stats['std']:.2g}  ({spread})")
        saved = f"the models and figures to {args.output_dir}/seed_*"
    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
    with open(metrics_path, "w") as file:
        json.dump(result, file, indent=2)
    print(f"Saved {saved} and the metrics to {metrics_path}.")
    return result


if __name__ == "__main__":
    main()
