"""Which conditions enter the energy and the initializer, and with which weights (Sec. 3.5-3.6, Eq. 11-14).

One rule covers classifier-free guidance and composition: conditional terms with weights gamma_i and an
unconditional (null-class) term with weight gamma_0, applied to f_hat inside Langevin and the Tweedie step and to
the initializer mean g. All terms are evaluated in one batched forward pass (``weighted_model_output``).
The pipelines check the user's labels and weights in ``check_inputs``; nothing here checks them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ConditionWeights:
    """A weighted sum of conditional terms and one unconditional term.

    Args:
        class_labels: one integer tensor of shape (batch,) per conditional term.
        weights: gamma_i, one float per conditional term.
        unconditional_weight: gamma_0, the weight of the null-class term.
    """

    class_labels: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]
    unconditional_weight: float

    @classmethod
    def unconditional(cls) -> ConditionWeights:
        """The unconditional model alone."""
        return cls((), (), 1.0)

    @classmethod
    def conditional(cls, class_labels: torch.Tensor) -> ConditionWeights:
        """The conditional model alone (no guidance)."""
        return cls((class_labels,), (1.0,), 0.0)

    @classmethod
    def classifier_free_guidance(cls, class_labels: torch.Tensor, guidance_scale: float) -> ConditionWeights:
        """(1 + w) f(y; c) - w f(y) for the energy (Eq. 11) and (1 + w) g(x; c) - w g(x) for the initializer (Eq. 12).

        ``guidance_scale`` is the paper's w; w = 0 gives the conditional model.
        """
        return cls((class_labels,), (1.0 + guidance_scale,), -guidance_scale)

    @classmethod
    def composition(
        cls,
        concept_labels: Sequence[torch.Tensor],
        guidance_scale: float = 0.0,
        concept_weights: Sequence[float] | None = None,
        product_of_experts: bool = False,
    ) -> ConditionWeights:
        """Composition of M concepts (Sec. 3.6).

        By default gamma_i = 1 + w for every concept and the unconditional term gets 1 - sum_i gamma_i
        = -(M w + M - 1): Eq. 14, and Eq. 13 at w = 0. ``concept_weights`` sets the gamma_i directly (a negative
        weight expresses NOT). ``product_of_experts=True`` gives the baseline of Du et al. (2020) that lacks the
        (M - 1) log p(x) term: each concept is guided on its own and the guided experts are multiplied, so the
        unconditional weight is sum_i (1 - gamma_i), -M w by default, and the sum of f(x; c_i) at w = 0.
        """
        if concept_weights is None:
            concept_weights = [1.0 + guidance_scale] * len(concept_labels)
        weights = tuple(float(weight) for weight in concept_weights)
        if product_of_experts:
            unconditional_weight = sum(1.0 - weight for weight in weights)
        else:
            unconditional_weight = 1.0 - sum(weights)
        return cls(tuple(concept_labels), weights, unconditional_weight)

    def for_initializer(self) -> ConditionWeights:
        """The same conditional terms with the unconditional weight 1 - sum_i gamma_i.

        A combination of initializer means stays in the data's scale only when its weights sum to one; this is
        Eq. 12 for guidance and the composition rule applied to g.
        """
        return ConditionWeights(self.class_labels, self.weights, 1.0 - sum(self.weights))

    def stack(self, null_label: int | None, batch_size: int, device: torch.device) -> StackedTerms:
        """All non-zero terms stacked into one batch, ready for ``weighted_model_output``.

        Args:
            null_label: the model's null-class index, or ``None`` for an unconditional model (which accepts only the
                unconditional term).
            batch_size: the batch of each term.
            device: where the labels and weights go.
        """
        labels = [label.to(device) for label, weight in zip(self.class_labels, self.weights) if weight != 0.0]
        weights = [weight for weight in self.weights if weight != 0.0]
        if null_label is None:
            return StackedTerms(labels=None, weights=torch.ones(1, device=device), is_single=True)
        if self.unconditional_weight != 0.0:
            labels.append(torch.full((batch_size,), null_label, dtype=torch.long, device=device))
            weights.append(self.unconditional_weight)
        return StackedTerms(
            labels=torch.cat(labels),
            weights=torch.tensor(weights, dtype=torch.float32, device=device),
            is_single=weights == [1.0],
        )


@dataclass(frozen=True)
class StackedTerms:
    """The terms of ``ConditionWeights`` as one batch: ``labels`` (num_terms * batch,) and ``weights`` (num_terms,)."""

    labels: torch.Tensor | None
    weights: torch.Tensor
    is_single: bool

    @property
    def num_terms(self) -> int:
        return self.weights.shape[0]


def null_label_of(model: nn.Module) -> int | None:
    """The null-class index of a model (``num_class_embeds``), or ``None`` for an unconditional model."""
    return model.config.num_class_embeds


def _terms_logsnr(logsnr: torch.Tensor, terms: StackedTerms, batch: int) -> torch.Tensor:
    """lambda (a scalar, or one per example) repeated for the stacked batch of all terms: (num_terms * batch,)."""
    return logsnr.expand(batch).repeat(terms.num_terms) if logsnr.ndim == 0 else logsnr.repeat(terms.num_terms)


def embed_terms(energy_model: nn.Module, logsnr: torch.Tensor, terms: StackedTerms, batch: int) -> object:
    """``energy_model.embed_condition`` for the stacked batch of all terms: the part of f_hat that depends on
    (log-SNR, class) alone, which Algorithm 2 computes once per level and reuses for its K Langevin steps."""
    return energy_model.embed_condition(_terms_logsnr(logsnr, terms, batch), terms.labels)


def weighted_model_output(
    model: nn.Module, sample: torch.Tensor, logsnr: torch.Tensor, terms: StackedTerms, condition: object = None
) -> torch.Tensor:
    """sum_i gamma_i model(sample; logsnr, c_i), all terms in one batched forward pass (Eq. 11-14).

    The output is f_hat of shape (batch,) for an energy model and the proposal mean shaped like ``sample`` for an
    initializer. ``condition`` (energy models only) is ``embed_terms`` for the same log-SNR and terms.
    """
    num_terms = terms.num_terms
    if num_terms > 1:
        sample = sample.repeat(num_terms, *([1] * (sample.ndim - 1)))
    logsnr = _terms_logsnr(logsnr, terms, sample.shape[0] // num_terms)
    if condition is None:
        output = model(sample, logsnr, class_labels=terms.labels)
    else:
        output = model(sample, logsnr, class_labels=terms.labels, condition=condition)
    output = output.neg_energy if hasattr(output, "neg_energy") else output.sample
    if terms.is_single:
        return output
    output = output.view(num_terms, -1, *output.shape[1:])
    return torch.tensordot(terms.weights.to(output.dtype), output, dims=1)
