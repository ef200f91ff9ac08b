"""CDRLComposePipeline: sampling conjunctions (and negations) of concepts (Sec. 3.6, Eq. 13-14, SPEC §8)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..guidance import ConditionWeights
from ..sampling import CDRLSampler
from .pipeline_cdrl import CDRLPipeline

Concepts = int | str | Sequence[int | str] | torch.Tensor | np.ndarray


class CDRLComposePipeline(CDRLPipeline):
    r"""Compositional generation with a class- or attribute-conditional CDRL model (Sec. 3.6, Sec. 4.5).

    The energy of M concepts is (1 + w) sum_i f(y; c_i) - (M w + M - 1) f(y) (Eq. 14; Eq. 13 at w = 0), built by
    ``ConditionWeights.composition``. ``concept_weights`` sets each concept's weight directly (negative = NOT) and
    ``product_of_experts=True`` gives the baseline without the negative unconditional term (Du et al., 2020). As in
    the paper, the initializer proposes unconditionally unless ``compose_initializer=True``.

    Loads from any folder saved by a CDRL pipeline: ``CDRLComposePipeline.from_pretrained(path)``.
    """

    def _concept_ids(self, concepts: Concepts) -> list[int]:
        if isinstance(concepts, (torch.Tensor, np.ndarray)):
            if concepts.ndim > 1:
                raise ValueError(f"`concepts` must be one-dimensional, got shape {tuple(concepts.shape)}.")
            concepts = concepts.tolist()
        if isinstance(concepts, str) or not isinstance(concepts, Sequence):
            concepts = [concepts]
        if len(concepts) == 0:
            raise ValueError("`concepts` must name at least one concept (a class id or class name).")
        ids = [self.class_id(concept, "concepts") for concept in concepts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"`concepts` must not repeat a concept, got {list(concepts)}; use `concept_weights`.")
        return ids

    @staticmethod
    def _check_concept_weights(concept_weights: Sequence[float] | None, guidance_scale: float) -> None:
        if concept_weights is None:
            return
        if isinstance(concept_weights, (str, bytes)) or not isinstance(concept_weights, Sequence):
            raise TypeError(f"`concept_weights` must be a sequence of numbers, got {type(concept_weights).__name__}.")
        for weight in concept_weights:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"`concept_weights` must hold finite numbers, got {list(concept_weights)}.")
        if guidance_scale != 0:
            raise ValueError(
                "Pass either `guidance_scale` (gamma_i = 1 + w for every concept) or `concept_weights` (the gamma_i "
                "themselves), not both."
            )

    @torch.no_grad()
    def __call__(
        self,
        concepts: Concepts,
        concept_weights: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        batch_size: int = 1,
        num_langevin_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        product_of_experts: bool = False,
        compose_initializer: bool = False,
        precision: str | None = None,
        torch_compile: bool = False,
        cuda_graph: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images that show every concept at once (Eq. 14).

        Args:
            concepts: the concepts c_1..c_M: class ids or class names (one, or a list); every image gets all of them.
            concept_weights: gamma_i per concept, overriding the default 1 + w; a negative weight expresses NOT
                (e.g. ``concepts=["male", "smiling"], concept_weights=[2.0, -1.0]``). The unconditional term gets
                1 - sum_i gamma_i.
            guidance_scale: the strength w of Eq. 14 (gamma_i = 1 + w); 0 gives Eq. 13.
            batch_size: number of images.
            num_langevin_steps: K' Langevin steps per level (Sec. 4.2 sampling adjustment when K' differs from K).
            generator: a ``torch.Generator`` (or one per sample) for reproducible results.
            latents: x_T of shape (batch, channels, size, size); drawn from N(0, I) when omitted.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]) or ``"pt"`` (NCHW in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called after each noise level as ``callback(pipe, index, t, callback_kwargs)``;
                a returned ``"latents"`` replaces x_t.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (only ``"latents"``).
            product_of_experts: drop the missing negative term: sum_i gamma_i f(y; c_i) + sum_i (1 - gamma_i) f(y),
                the baseline of Du et al. (2020), for comparison.
            compose_initializer: combine the initializer's means by the same weights (they then sum to one,
                ``ConditionWeights.for_initializer``); needs a class-conditional initializer. By default the
                initializer is unconditional, as in the paper.
            precision: autocast dtype of the networks, as in ``CDRLPipeline.__call__``.
            torch_compile: run the EBM through a compiled copy, as in ``CDRLPipeline.__call__``.
            cuda_graph: replay the EBM's forward and input gradient from a CUDA graph (CUDA only).
        """
        self._check_count(batch_size, "batch_size")
        self._check_sampling_arguments(
            guidance_scale, num_langevin_steps, output_type, callback_on_step_end_tensor_inputs
        )
        ids = self._concept_ids(concepts)
        self._check_concept_weights(concept_weights, guidance_scale)
        if compose_initializer and self.initializer.config.num_class_embeds is None:
            raise ValueError("`compose_initializer=True` needs a class-conditional initializer; this one is not.")
        device = self._execution_device
        latents = self._latents(batch_size, latents, generator, device)
        concept_labels = [torch.full((batch_size,), concept, dtype=torch.long, device=device) for concept in ids]
        energy_weights = ConditionWeights.composition(
            concept_labels, float(guidance_scale), concept_weights, product_of_experts
        )
        initializer_weights = (
            energy_weights.for_initializer() if compose_initializer else ConditionWeights.unconditional()
        )
        sampler = CDRLSampler(
            self.energy_model,
            self.initializer,
            self.scheduler,
            energy_weights=energy_weights,
            initializer_weights=initializer_weights,
            batch_size=batch_size,
            device=device,
            num_langevin_steps=num_langevin_steps,
            generator=generator,
            precision=precision,
            torch_compile=torch_compile,
            cuda_graph=cuda_graph,
        )
        images = self._sample(sampler, latents, callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self._output(images, output_type, return_dict)
