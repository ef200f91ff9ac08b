"""One cooperative training step of CDRL (Algorithm 1) and the optimisation schedule of App. A.2.

Optimizer stepping stays with the caller (``examples/train_cdrl.py`` uses Accelerate); this module computes the
losses, so every training script, test and benchmark shares one implementation of the algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..acceleration import precision_context
from ..guidance import ConditionWeights, null_label_of
from ..sampling import frozen, langevin_refine
from ..schedulers.scheduling_cdrl import CDRLScheduler
from ..validation import check_generator, check_probability

LEVEL_METRICS = (
    "ebm_loss",
    "initializer_loss",
    "neg_energy_positive",
    "neg_energy_negative",
    "neg_energy_gap",
    "proposal_distance",
)


@dataclass
class CDRLTrainingOutput:
    """Losses and diagnostics of one training step.

    Args:
        ebm_loss: the weighted recovery-likelihood loss of the EBM (Eq. 7), a scalar to minimise.
        initializer_loss: the initializer's regression loss onto the refined samples (Eq. 8), a scalar.
        timesteps: the pair index t drawn for each example, shape (batch,).
        level_metrics: per-pair means of shape (T,), NaN for pairs absent from the batch: ``ebm_loss``,
            ``initializer_loss``, ``neg_energy_positive`` (f_hat of the data y_t^+), ``neg_energy_negative`` (f_hat of
            the refined y_tilde_t), ``neg_energy_gap`` (their difference) and ``proposal_distance`` (the L2 distance
            from the proposal y_hat_t to the refined y_tilde_t).
        level_counts: number of examples per pair in the batch, shape (T,).
    """

    ebm_loss: torch.Tensor
    initializer_loss: torch.Tensor
    timesteps: torch.Tensor
    level_metrics: dict[str, torch.Tensor]
    level_counts: torch.Tensor


def warmup_multiplier(step: int, warmup_steps: int = 10_000, head_start: int = 0) -> float:
    """min(1, (step + head_start) / warmup_steps): the linear learning-rate warm-up of Eq. 15.

    The EBM uses ``head_start=0``; the initializer starts 500 steps ahead (``head_start=500``).
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + head_start) / warmup_steps)


LR_DECAYS = ("constant", "cosine", "linear")


def decay_multiplier(progress: float, decay: str = "constant", final_fraction: float = 0.0) -> float:
    """The learning-rate factor after the warm-up at ``progress`` in [0, 1] through the run (clamped).

    ``"constant"`` keeps the peak rate (App. A.2); ``"cosine"`` falls from 1 to ``final_fraction`` along a half-cosine,
    f + (1 - f) 0.5 (1 + cos(pi progress)), and ``"linear"`` along a line, f + (1 - f) (1 - progress).
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"`decay` must be one of {LR_DECAYS}, got {decay!r}.")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"`final_fraction` must be in [0, 1], got {final_fraction}.")
    if decay == "constant":
        return 1.0
    progress = min(1.0, max(0.0, progress))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return final_fraction + (1.0 - final_fraction) * shape


def create_ema_model(model: nn.Module, decay: float = 0.9999) -> EMAModel:
    """An exponential moving average of ``model`` (App. A.2) with the usual warm-up.

    diffusers' ``EMAModel`` (without ``use_ema_warmup``) copies the weights at its first update and then uses the decay
    min(decay, (1 + n) / (10 + n)) at the n-th (0-based) update; it stores the model class and config so the average
    can be saved with ``save_pretrained``. Its update runs as one multi-tensor operation (``foreach``).
    """
    return EMAModel(model.parameters(), decay=decay, foreach=True, model_cls=type(model), model_config=model.config)


def drop_labels(
    class_labels: torch.Tensor,
    null_label: int,
    probability: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each label by the null class with ``probability`` (classifier-free guidance training, Sec. 3.5)."""
    check_probability(probability, "probability")
    keep = torch.rand(class_labels.shape, generator=generator, device=generator.device if generator else "cpu")
    keep = keep.to(class_labels.device) >= probability
    return torch.where(keep, class_labels, torch.full_like(class_labels, null_label))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (Langevin needs no gradient sync)."""
    return getattr(model, "module", model)


def _per_level_mean(values: torch.Tensor, timesteps: torch.Tensor, num_levels: int) -> torch.Tensor:
    values = values.detach().float()
    sums = torch.zeros(num_levels, device=values.device).index_add_(0, timesteps, values)
    counts = torch.bincount(timesteps, minlength=num_levels).to(values.device)
    return sums / counts


def _level_weights(level_probabilities: torch.Tensor | list[float], num_levels: int) -> torch.Tensor:
    """``level_probabilities`` as a float64 tensor of T non-negative, finite weights with a positive sum."""
    weights = torch.as_tensor(level_probabilities, dtype=torch.float64)
    if (
        weights.shape != (num_levels,)
        or not torch.isfinite(weights).all()
        or (weights < 0).any()
        or weights.sum() <= 0
    ):
        raise ValueError(
            f"`level_probabilities` must hold {num_levels} non-negative finite weights with a positive sum, "
            f"got {level_probabilities}."
        )
    return weights


def cdrl_training_step(
    energy_model: nn.Module,
    initializer: nn.Module,
    scheduler: CDRLScheduler,
    clean_samples: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.1,
    precision: str | None = None,
    initializer_target: str = "refined",
    level_probabilities: torch.Tensor | list[float] | None = None,
    langevin_noise_control: bool = False,
    frozen_initializer: nn.Module | None = None,
    frozen_initializer_share: float = 0.0,
    augmented_negatives: torch.Tensor | None = None,
) -> CDRLTrainingOutput:
    r"""Losses of one CDRL iteration (Algorithm 1) on a batch of clean data in [-1, 1].

    1. Draw a pair t ~ U{0..T-1} (or from ``level_probabilities``) and one noise eps per example; build y_t^+ and
       x_{t+1} from the shared eps (Eq. 9).
    2. Propose y_hat_t = g(x_{t+1}) + sigma_tilde_t eps' (Eq. 6).
    3. Refine it with K Langevin steps on the conditional EBM (Eq. 5), in eval mode and without parameter
       gradients: y_tilde_t (with ``frozen_initializer``, the first chains start from its proposals instead).
    4. EBM loss (Eq. 7 with the level weights w_t): mean_b w_t (f_hat(y_tilde_t) - f_hat(y_t^+)).
    5. Initializer loss (Eq. 8 without the 1 / (2 sigma_tilde^2) factor): mean_b sum (y_tilde_t - y_hat_t)^2, with
       gradients into g through y_hat_t. With ``initializer_target="data"`` the target is y_t^+ instead of y_tilde_t
       (the "CDRL(data)" variant of App. G.2).
    6. With ``augmented_negatives``: noised like the first rows of the batch, they join the EBM loss with logistic
       terms w_t softplus(f_hat(y_t^-) - f_hat(y_t^+)) (negative data augmentation; for a conditional EBM also
       under the null class and by the implicit classifier).

    Args:
        energy_model: the EBM (possibly wrapped by DDP); the EBM loss back-propagates into it.
        initializer: the initializer (possibly wrapped); the initializer loss back-propagates into it.
        scheduler: the ``CDRLScheduler``.
        clean_samples: x_0 of any shape (batch, ...): images or vectors.
        class_labels: integer labels of shape (batch,) for conditional models (``None``: unconditional). They go
            to each model that has class embeddings; with ``label_dropout`` they are replaced by the null class.
        generator: makes the level, noise and dropout draws reproducible.
        label_dropout: probability of dropping a label to the null class (0.1 in the paper, for guidance).
        precision: autocast dtype of the network evaluations (``acceleration.precision_context``): ``None`` keeps the
            caller's setting (e.g. Accelerate's ``--mixed_precision``), or ``"fp32"``, ``"bf16"``, ``"fp16"``. The
            Langevin state, noise and losses are float32 in every mode.
        initializer_target: what the initializer regresses on: ``"refined"`` (y_tilde_t, Eq. 8, cooperative
            training) or ``"data"`` (y_t^+, App. G.2).
        level_probabilities: T non-negative weights, normalised to the probabilities of drawing each pair t
            (``None``: uniform, as in Algorithm 1). Each example's loss is unchanged, so a pair drawn twice as often
            gets twice the weight and half the gradient variance in the EBM and the initializer objectives.
        langevin_noise_control: subtract the noise the Langevin chain injected, sum_k s_t eps_k, from the refined
            target of Eq. 8. Those terms have mean zero given everything the initializer sees, so the expected
            gradient of the initializer is unchanged; only its variance falls (a control variate). Without it, at
            small step sizes the K noise terms dominate y_tilde - y_hat and the initializer mostly random-walks.
        frozen_initializer: an earlier, frozen copy of the initializer (same signature). With the data target, the
            live initializer soon proposes close to the data, and so do the EBM's negatives: the EBM then forgets
            how far-off images score. The frozen copy proposes the starting points of the first
            ``frozen_initializer_share`` of the batch instead (the same proposal noise and Langevin refinement),
            keeping such negatives in the EBM's loss. Their terms are logistic, w_t softplus(f_hat(y_tilde) -
            f_hat(y^+)): chains that start far off cannot reach the data in K steps, and Eq. 7 would lower their
            energy without bound. It runs in eval mode without gradients; only with ``initializer_target="data"``.
        frozen_initializer_share: the share of the batch whose chains start from ``frozen_initializer``, in [0, 1].
        augmented_negatives: clean images known *not* to be data, shape (n, ...) with n <= batch and the batch's
            example shape: transformed copies of the first n clean samples, such as mirrored digits (negative data
            augmentation, Sinha et al., 2021). The EBM's own negatives only come from where its chains go, so it
            cannot learn what data is not in places the chains never visit; these put negatives there. Each is
            noised to its row's level with its row's noise (Eq. 9) and ranked below its row's data with logistic
            terms, as the frozen chains', which fade once the ranking holds: under its row's label and, for a
            conditional EBM, also under the null class (the unconditional energy of ``log_density``, which label
            dropout would otherwise show only a tenth of them) and by the implicit classifier f_hat_c - f_hat_null
            that guidance follows (Eq. 11-12), so that no guidance weight favours them.

    For tight memory, ``energy_model.enable_gradient_checkpointing()`` stops the positive and negative passes of the
    EBM loss from holding their activations until the backward pass (docs/performance.md gives the cost).
    """
    if not isinstance(clean_samples, torch.Tensor) or not clean_samples.is_floating_point():
        raise TypeError("`clean_samples` must be a floating-point torch.Tensor.")
    if clean_samples.ndim < 2 or clean_samples.shape[0] == 0:
        raise ValueError(
            f"`clean_samples` must be a non-empty batch (batch, ...), got shape {tuple(clean_samples.shape)}."
        )
    check_probability(label_dropout, "label_dropout")
    if initializer_target not in ("refined", "data"):
        raise ValueError(f"`initializer_target` must be 'refined' or 'data', got {initializer_target!r}.")
    check_probability(frozen_initializer_share, "frozen_initializer_share")
    check_generator(generator)
    batch, device, num_levels = clean_samples.shape[0], clean_samples.device, scheduler.num_noise_levels
    num_augmented = 0
    if augmented_negatives is not None:
        if not isinstance(augmented_negatives, torch.Tensor) or not augmented_negatives.is_floating_point():
            raise TypeError("`augmented_negatives` must be a floating-point torch.Tensor.")
        num_augmented = augmented_negatives.shape[0] if augmented_negatives.ndim == clean_samples.ndim else 0
        if augmented_negatives.shape[1:] != clean_samples.shape[1:] or not 1 <= num_augmented <= batch:
            raise ValueError(
                f"`augmented_negatives` must have shape (n, {', '.join(map(str, clean_samples.shape[1:]))}) with "
                f"1 <= n <= {batch} (the batch size), got {tuple(augmented_negatives.shape)}."
            )
    num_frozen = round(frozen_initializer_share * batch) if frozen_initializer is not None else 0
    if num_frozen and initializer_target != "data":
        # Eq. 8's target would be a chain the live initializer did not start.
        raise ValueError("`frozen_initializer` needs `initializer_target='data'`.")
    sampling_energy_model = _unwrap(energy_model)
    energy_null = null_label_of(sampling_energy_model)
    initializer_null = null_label_of(_unwrap(initializer))
    if class_labels is not None:
        if energy_null is None and initializer_null is None:
            raise ValueError("`class_labels` were given, but both models are unconditional.")
        class_labels = torch.as_tensor(class_labels, device=device)
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise TypeError(f"`class_labels` must be integers, got dtype {class_labels.dtype}.")
        class_labels = class_labels.long()
        null = energy_null if energy_null is not None else initializer_null
        if class_labels.shape != (batch,) or int(class_labels.min()) < 0 or int(class_labels.max()) >= null:
            raise ValueError(f"`class_labels` must have shape ({batch},) and values in [0, {null - 1}].")
        if label_dropout > 0:
            class_labels = drop_labels(class_labels, null, label_dropout, generator)
    energy_labels = class_labels if energy_null is not None else None
    initializer_labels = class_labels if initializer_null is not None else None
    if energy_labels is not None and initializer_labels is not None and energy_null != initializer_null:
        raise ValueError("A conditional EBM and a conditional initializer must have the same `num_class_embeds`.")

    draw_device = generator.device if generator else "cpu"
    if level_probabilities is None:
        timesteps = torch.randint(0, num_levels, (batch,), generator=generator, device=draw_device)
    else:
        weights = _level_weights(level_probabilities, num_levels).to(draw_device)
        timesteps = torch.multinomial(weights, batch, replacement=True, generator=generator)
    timesteps = timesteps.to(device)
    noise = randn_tensor(clean_samples.shape, generator=generator, device=device, dtype=torch.float32)
    positive, noisier = scheduler.training_pair(clean_samples.float(), timesteps, noise)
    if num_augmented:
        augmented, _ = scheduler.training_pair(
            augmented_negatives.to(device, torch.float32), timesteps[:num_augmented], noise[:num_augmented]
        )

    with precision_context(precision, device):
        mean = initializer(noisier, scheduler.initializer_logsnr(timesteps), class_labels=initializer_labels).sample
        proposal_noise = randn_tensor(clean_samples.shape, generator=generator, device=device, dtype=torch.float32)
        proposal = scheduler.initializer_proposal(mean.float(), timesteps, proposal_noise)
        start = proposal.detach()
        if num_frozen:
            with frozen(frozen_initializer), torch.no_grad():
                frozen_labels = None if initializer_labels is None else initializer_labels[:num_frozen]
                frozen_mean = frozen_initializer(
                    noisier[:num_frozen],
                    scheduler.initializer_logsnr(timesteps[:num_frozen]),
                    class_labels=frozen_labels,
                ).sample
            frozen_proposal = scheduler.initializer_proposal(
                frozen_mean.float(), timesteps[:num_frozen], proposal_noise[:num_frozen]
            )
            start = torch.cat([frozen_proposal, start[num_frozen:]])

        energy_weights = ConditionWeights.unconditional()
        if energy_labels is not None:
            energy_weights = ConditionWeights.conditional(energy_labels)
        terms = energy_weights.stack(energy_null, batch, device)
        with frozen(sampling_energy_model):
            refined, injected_noise = langevin_refine(
                sampling_energy_model,
                scheduler,
                start,
                noisier,
                timesteps,
                terms,
                generator=generator,
                return_injected_noise=True,
            )

        # One EBM pass for the data, the chains' ends and the augmented negatives (the first rows' levels and labels;
        # for a conditional EBM, the augmented negatives and their data again under the null class).
        energy_logsnr = scheduler.energy_logsnr(timesteps)
        every_row = torch.arange(batch, device=device)
        parts = [(positive, every_row, energy_labels), (refined, every_row, energy_labels)]  # (input, row, label)
        if num_augmented:
            first = every_row[:num_augmented]
            parts.append((augmented, first, None if energy_labels is None else energy_labels[:num_augmented]))
            if energy_labels is not None:
                null = torch.full((num_augmented,), energy_null, device=device)
                parts += [(augmented, first, null), (positive[:num_augmented], first, null)]
        inputs, rows, labels = zip(*parts)
        neg_energy = energy_model(
            torch.cat(inputs),
            energy_logsnr[torch.cat(rows)],
            class_labels=None if energy_labels is None else torch.cat(labels),
        ).neg_energy.float()
    neg_energy_positive, neg_energy_negative, *neg_energy_augmented = neg_energy.split([len(x) for x in inputs])
    loss_weight = scheduler.loss_weight.to(device)[timesteps]
    difference = neg_energy_negative - neg_energy_positive
    if num_frozen:
        # Far-off chains cannot reach the data in K steps, so Eq. 7 would lower their energy without bound. Their terms
        # are logistic instead: they rank far-off samples below the data, and stop pushing once they do.
        difference = torch.cat([nn.functional.softplus(difference[:num_frozen]), difference[num_frozen:]])
    ebm_losses = loss_weight * difference
    if num_augmented:
        labelled = neg_energy_augmented[0]
        augmented_losses = nn.functional.softplus(labelled - neg_energy_positive[:num_augmented])
        if energy_labels is not None:
            null_augmented, null_positive = neg_energy_augmented[1:]
            # The null class's ranking, and that of the implicit classifier log p(c | y) = f_hat_c - f_hat_null, which
            # guidance follows (Eq. 11-12): were it more confident on the negatives than on the data, guided chains
            # would be pushed towards them. Rows whose label was dropped have no classifier term.
            classifier = (labelled - null_augmented) - (neg_energy_positive[:num_augmented] - null_positive)
            has_label = energy_labels[:num_augmented] != energy_null
            augmented_losses = augmented_losses + nn.functional.softplus(null_augmented - null_positive)
            augmented_losses = augmented_losses + has_label * nn.functional.softplus(classifier)
        augmented_losses = loss_weight[:num_augmented] * augmented_losses
        ebm_losses = ebm_losses + nn.functional.pad(augmented_losses, (0, batch - num_augmented))
    if initializer_target == "data":
        target = positive
    else:
        target = refined.detach() - injected_noise if langevin_noise_control else refined.detach()
    initializer_losses = (target - proposal).pow(2).flatten(1).sum(dim=1)

    level_values = {
        "ebm_loss": ebm_losses,
        "initializer_loss": initializer_losses,
        "neg_energy_positive": neg_energy_positive,
        "neg_energy_negative": neg_energy_negative,
        "neg_energy_gap": neg_energy_positive - neg_energy_negative,
        "proposal_distance": (refined - start).flatten(1).norm(dim=1),
    }
    return CDRLTrainingOutput(
        ebm_loss=ebm_losses.mean(),
        initializer_loss=initializer_losses.mean(),
        timesteps=timesteps,
        level_metrics={name: _per_level_mean(value, timesteps, num_levels) for name, value in level_values.items()},
        level_counts=torch.bincount(timesteps, minlength=num_levels),
    )
