"""CDRLComposePipeline: sampling conjunctions (and negations) of concepts (Sec. 3.6, Eq. 13-14)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from ..guidance import ConditionWeights
from ..schedulers.scheduling_cdrl import CDRLScheduler
from ..validation import check_positive_int
from .common import Callback, CDRLPipelineMixin, EnergyNetwork, Generator, InitializerNetwork

Concepts = int | str | Sequence[int | str] | torch.Tensor | np.ndarray

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from cdrl_diffusers import CDRLComposePipeline

        >>> pipe = CDRLComposePipeline.from_pretrained("outputs/cdrl-shapes")
        >>> both = pipe(concepts=["circle", "red"], guidance_scale=1.0, batch_size=4).images
        >>> circle_not_red = pipe(concepts=["circle", "red"], concept_weights=[2.0, -1.0], batch_size=4).images
        ```
"""


class CDRLComposePipeline(CDRLPipelineMixin, DiffusionPipeline):
    r"""Compositional generation with a class- or attribute-conditional CDRL model (Sec. 3.6, Sec. 4.5).

    The energy of M concepts is (1 + w) sum_i f(y; c_i) - (M w + M - 1) f(y) (Eq. 14; Eq. 13 at w = 0), built by
    ``ConditionWeights.composition``. ``concept_weights`` sets each concept's weight directly (negative = NOT) and
    ``product_of_experts=True`` gives the baseline without the negative unconditional term (Du et al., 2020). As in
    the paper, the initializer proposes unconditionally when it does not know the classes; a class-conditional one
    (``examples/train_cdrl.py --attribute_columns ...`` trains one by default) has its proposals composed by the same
    weights unless ``compose_initializer=False``.

    Its components are those of ``CDRLPipeline``, with a class-conditional energy model. It loads from any folder
    saved by a CDRL pipeline: ``CDRLComposePipeline.from_pretrained(path)``.
    """

    def __init__(self, energy_model: EnergyNetwork, initializer: InitializerNetwork, scheduler: CDRLScheduler):
        super().__init__()
        self._register_components(energy_model, initializer, scheduler)

    def check_inputs(
        self,
        concepts: Concepts,
        concept_weights: Sequence[float] | None,
        guidance_scale: float,
        batch_size: int,
        compose_initializer: bool | None,
    ) -> list[int]:
        """Check the concepts, their weights and the batch; returns the concepts as class indices."""
        check_positive_int(batch_size, "batch_size")
        ids = self.class_ids(concepts, "concepts")
        if len(set(ids)) != len(ids):
            raise ValueError(f"`concepts` must not repeat a concept, got {concepts}; use `concept_weights`.")
        if concept_weights is not None:
            if isinstance(concept_weights, (str, bytes)) or not isinstance(concept_weights, Sequence):
                raise TypeError(
                    f"`concept_weights` must be a sequence of numbers, got {type(concept_weights).__name__}."
                )
            if len(concept_weights) != len(ids):
                raise ValueError(
                    f"`concept_weights` must have one weight per concept ({len(ids)}), got {len(concept_weights)}."
                )
            for weight in concept_weights:
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise ValueError(f"`concept_weights` must hold finite numbers, got {list(concept_weights)}.")
            if guidance_scale != 0:
                raise ValueError(
                    "Pass either `guidance_scale` (gamma_i = 1 + w for every concept) or `concept_weights` (the "
                    "gamma_i themselves), not both."
                )
        if compose_initializer is not None and not isinstance(compose_initializer, bool):
            raise TypeError(f"`compose_initializer` must be a bool or None, got {type(compose_initializer).__name__}.")
        if compose_initializer and self.initializer.config.num_class_embeds is None:
            raise ValueError("`compose_initializer=True` needs a class-conditional initializer; this one is not.")
        return ids

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        concepts: Concepts,
        concept_weights: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        batch_size: int = 1,
        num_langevin_steps: int | None = None,
        use_initializer: bool = True,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        product_of_experts: bool = False,
        compose_initializer: bool | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate samples that show every concept at once (Eq. 14).

        ``num_langevin_steps``, ``use_initializer``, ``generator``, ``output_type``, ``return_dict``,
        ``callback_on_step_end`` and ``callback_on_step_end_tensor_inputs`` are those of ``CDRLPipeline.__call__``.

        Args:
            concepts (`int`, `str` or a list of them): the concepts c_1..c_M, class ids or class names; every sample
                gets all of them.
            concept_weights (`list[float]`, *optional*): gamma_i per concept, overriding the default 1 + w; a negative
                weight expresses NOT (e.g. ``concepts=["male", "smiling"], concept_weights=[2.0, -1.0]``). The
                unconditional term gets 1 - sum_i gamma_i.
            guidance_scale (`float`): the strength w of Eq. 14 (gamma_i = 1 + w); 0 gives Eq. 13.
            batch_size (`int`): number of samples.
            latents (`torch.Tensor`, *optional*): x_T of shape (batch, *sample_shape); drawn from N(0, I) otherwise.
            product_of_experts (`bool`): drop the missing negative term: sum_i gamma_i f(y; c_i) + sum_i (1 - gamma_i)
                f(y), the baseline of Du et al. (2020), for comparison.
            compose_initializer (`bool`, *optional*): combine the initializer's means by the same weights (they then
                sum to one, ``ConditionWeights.for_initializer``); needs a class-conditional initializer. ``None``
                (default) composes them when the initializer is class-conditional; ``False`` proposes
                unconditionally, as the paper does.

        Examples:

        Returns:
            `ImagePipelineOutput` with ``images``, or a tuple ``(images,)`` when ``return_dict=False``.
        """
        # 1. Check inputs
        self.check_sampling_inputs(guidance_scale, num_langevin_steps, use_initializer, output_type)
        self.check_callback_inputs(generator, callback_on_step_end, callback_on_step_end_tensor_inputs)
        ids = self.check_inputs(concepts, concept_weights, guidance_scale, batch_size, compose_initializer)
        device = self._execution_device

        # 2. The composed energy (Eq. 13-14) and initializer
        concept_labels = [torch.full((batch_size,), concept, dtype=torch.long, device=device) for concept in ids]
        energy_weights = ConditionWeights.composition(
            concept_labels, float(guidance_scale), concept_weights, product_of_experts
        )
        if compose_initializer is None:
            compose_initializer = self.initializer.config.num_class_embeds is not None
        initializer_weights = (
            energy_weights.for_initializer() if compose_initializer else ConditionWeights.unconditional()
        )

        # 3. x_T
        latents = self.prepare_latents(batch_size, generator, device, latents)

        # 4. Algorithm 2 and the Tweedie step
        callback = self.step_end_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        samples = self.run_sampler(
            latents, energy_weights, initializer_weights, num_langevin_steps, use_initializer, generator, callback
        )

        # 5. Outputs
        return self.postprocess(samples, output_type, return_dict)
