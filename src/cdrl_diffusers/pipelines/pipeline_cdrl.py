"""CDRLPipeline: unconditional, class-conditional and guided sampling, and log-densities (Algorithm 2, Sec. 3.5)."""

from __future__ import annotations

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from ..guidance import ConditionWeights
from ..schedulers.scheduling_cdrl import CDRLScheduler
from ..validation import check_positive_int
from .common import Callback, CDRLPipelineMixin, ClassLabels, EnergyNetwork, Generator, InitializerNetwork

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from cdrl_diffusers import CDRLPipeline

        >>> pipe = CDRLPipeline.from_pretrained("outputs/cdrl-digits")
        >>> images = pipe(batch_size=4, class_labels=[0, 1, 2, 3], guidance_scale=1.0).images
        >>> initializer_alone = pipe(batch_size=4, num_langevin_steps=0, output_type="pt").images
        >>> langevin_alone = pipe(batch_size=4, use_initializer=False, output_type="pt").images
        >>> scores = pipe.log_density(torch.rand(4, 1, 16, 16) * 2 - 1)
        ```
"""


class CDRLPipeline(CDRLPipelineMixin, DiffusionPipeline):
    r"""Sampling from a CDRL model: initializer proposals refined by Langevin dynamics at each noise level.

    Works for image models (``EnergyModel`` / ``InitializerUNet``) and vector models (``EnergyMLP`` /
    ``InitializerMLP``, samples of shape (batch, data_dim)). The networks are put in eval mode.

    Args:
        energy_model (`EnergyModel` or `EnergyMLP`): the EBM f_hat(y; lambda).
        initializer (`InitializerUNet` or `InitializerMLP`): the initializer g(x; lambda).
        scheduler (`CDRLScheduler`): the noise levels and Langevin constants the models were trained with.
    """

    def __init__(self, energy_model: EnergyNetwork, initializer: InitializerNetwork, scheduler: CDRLScheduler):
        super().__init__()
        self._register_components(energy_model, initializer, scheduler)

    def check_inputs(
        self,
        batch_size: int,
        guidance_scale: float,
        num_langevin_steps: int | None,
        use_initializer: bool,
        output_type: str,
    ) -> None:
        """Check the sampling arguments of ``__call__`` (labels and latents are checked as they are prepared)."""
        check_positive_int(batch_size, "batch_size")
        self.check_sampling_inputs(guidance_scale, num_langevin_steps, use_initializer, output_type)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: ClassLabels | None = None,
        guidance_scale: float = 0.0,
        num_langevin_steps: int | None = None,
        use_initializer: bool = True,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> ImagePipelineOutput | tuple:
        r"""Generate samples (Algorithm 2 and the Tweedie step of Eq. 18).

        Args:
            batch_size (`int`): number of samples (when ``class_labels`` lists several labels, one per label).
            class_labels (`int`, `str`, list of them, or a 1-D tensor/array): for class-conditional models; one label
                is repeated ``batch_size`` times. Omitted labels are drawn uniformly with ``generator``.
            guidance_scale (`float`): the classifier-free guidance strength w (Eq. 11-12); 0 samples the conditional
                model.
            num_langevin_steps (`int`, *optional*): K' Langevin steps per level; ``None`` is the trained K. Other
                values apply the sampling adjustment of Sec. 4.2 (step size scaled by sqrt(K / K')); 0 keeps the
                initializer's proposals (the "initializer alone" ablation).
            use_initializer (`bool`): ``False`` starts each level's Langevin chain at x_{t+1} instead of the
                initializer's proposal (the "Langevin alone" ablation).
            generator (`torch.Generator` or a list of them, one per sample): for reproducible results.
            latents (`torch.Tensor`, *optional*): x_T of shape (batch, *sample_shape); drawn from N(0, I) otherwise.
            output_type (`str`): ``"pil"``, ``"np"`` (NHWC in [0, 1]), ``"pt"`` (NCHW in [0, 1]) or ``"latent"``
                (x_0 in the data's range, [-1, 1]); vector models return (batch, data_dim) for ``"pt"``, ``"np"``
                and ``"latent"``.
            return_dict (`bool`): return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`): called after each noise
                level as ``callback(pipe, index, t, callback_kwargs)`` with ``callback_kwargs["latents"]`` = x_t in
                data space (the per-level samples of the paper's figures); a returned ``"latents"`` replaces x_t.
            callback_on_step_end_tensor_inputs (`list[str]`): tensors passed in ``callback_kwargs`` (``"latents"``).

        Examples:

        Returns:
            `ImagePipelineOutput` with ``images``, or a tuple ``(images,)`` when ``return_dict=False``.
        """
        # 1. Check inputs
        self.check_inputs(batch_size, guidance_scale, num_langevin_steps, use_initializer, output_type)
        self.check_callback_inputs(generator, callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device

        # 2. Class labels and the guided energy (Eq. 11) and initializer (Eq. 12)
        labels, batch_size = self.prepare_class_labels(class_labels, batch_size, generator, device)
        energy_weights = ConditionWeights.unconditional()
        if labels is not None:
            energy_weights = ConditionWeights.classifier_free_guidance(labels, float(guidance_scale))

        # 3. x_T
        latents = self.prepare_latents(batch_size, generator, device, latents)

        # 4. Algorithm 2 and the Tweedie step
        initializer_weights = self.guided_initializer_weights(energy_weights)
        callback = self.step_end_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        samples = self.run_sampler(
            latents, energy_weights, initializer_weights, num_langevin_steps, use_initializer, generator, callback
        )

        # 5. Outputs
        return self.postprocess(samples, output_type, return_dict)
