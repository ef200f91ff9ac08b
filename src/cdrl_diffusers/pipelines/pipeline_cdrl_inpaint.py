"""CDRLInpaintPipeline: fill a masked region with a trained CDRL model (App. C)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from ..guidance import ConditionWeights
from ..schedulers.scheduling_cdrl import CDRLScheduler
from .common import Callback, CDRLPipelineMixin, ClassLabels, EnergyNetwork, Generator, ImageInput, InitializerNetwork

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from cdrl_diffusers import CDRLInpaintPipeline

        >>> image = torch.zeros(1, 3, 16, 16)  # an observation in [-1, 1]
        >>> mask = torch.zeros(16, 16)
        >>> mask[4:12, 4:12] = 1  # 1 = generate, 0 = keep
        >>> pipe = CDRLInpaintPipeline.from_pretrained("outputs/cdrl-shapes")
        >>> filled = pipe(image, mask, generator=torch.Generator().manual_seed(0)).images[0]
        ```
"""


class CDRLInpaintPipeline(CDRLPipelineMixin, DiffusionPipeline):
    r"""Inpainting with a CDRL model: the masked region is generated, the rest of the image is kept (App. C).

    Sampling starts from the observation noised to the last level. After the initializer's proposal and after every
    Langevin step, the known pixels of y_t are reset to the observation noised to level t, input_scale_t
    (alpha_bar_t x_obs + sigma_bar_t eps), with one eps shared by all levels; the output keeps them exactly. The mask
    follows diffusers' inpainting convention: white / 1 = generate, black / 0 = keep.

    Its components are those of ``CDRLPipeline``, with image models. It loads from any folder saved by a CDRL
    pipeline: ``CDRLInpaintPipeline.from_pretrained(path)``.
    """

    def __init__(self, energy_model: EnergyNetwork, initializer: InitializerNetwork, scheduler: CDRLScheduler):
        super().__init__()
        self._register_components(energy_model, initializer, scheduler)
        self.mask_processor = VaeImageProcessor(
            do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def check_inputs(self, class_labels: ClassLabels | None, guidance_scale: float) -> None:
        """Guidance needs labels (the image, mask and labels themselves are checked as they are prepared)."""
        if guidance_scale > 0 and class_labels is None:
            raise ValueError(f"`guidance_scale={guidance_scale}` needs `class_labels` to guide towards.")

    def prepare_mask(self, mask_image: ImageInput, size: tuple[int, int]) -> torch.Tensor:
        """A binary (batch, 1, H, W) float mask, 1 = generate, from PIL / numpy / tensors in [0, 1], checked."""
        items = mask_image if isinstance(mask_image, list) else [mask_image]
        if len(items) == 0:
            raise ValueError("`mask_image` must not be empty.")
        if not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items):
            kinds = sorted({type(item).__name__ for item in items})
            raise TypeError(f"`mask_image` must be PIL images, numpy arrays or tensors, got {', '.join(kinds)}.")
        arrays = []
        for item in items:
            if not isinstance(item, PIL.Image.Image):
                item = item.float() if isinstance(item, torch.Tensor) else item.astype(np.float32)
                if (item.numel() if isinstance(item, torch.Tensor) else item.size) == 0:
                    raise ValueError("`mask_image` must not be empty.")
                if not (item.min() >= 0 and item.max() <= 1):  # also rejects NaN
                    raise ValueError(
                        f"`mask_image` values must lie in [0, 1] (1 = generate, 0 = keep), got [{item.min()}, "
                        f"{item.max()}]."
                    )
            arrays.append(item)
        mask = self.mask_processor.preprocess(arrays if isinstance(mask_image, list) else arrays[0]).float()
        if mask.ndim != 4 or tuple(mask.shape[1:]) != (1, *size) or mask.shape[0] == 0:
            raise ValueError(
                f"`mask_image` must hold one grayscale mask of the image's size {size[0]}x{size[1]} per image, "
                f"i.e. (H, W), (batch, H, W) or (batch, 1, H, W); it became shape {tuple(mask.shape)}."
            )
        return mask.to(self._execution_device)

    @staticmethod
    def _broadcast(tensors: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
        """Repeat batch-1 tensors to ``batch_size``; other batch sizes must match it."""
        out = {}
        for name, tensor in tensors.items():
            if tensor.shape[0] == batch_size:
                out[name] = tensor
            elif tensor.shape[0] == 1:
                out[name] = tensor.expand(batch_size, *tensor.shape[1:])
            else:
                sizes = ", ".join(f"{key}: {value.shape[0]}" for key, value in tensors.items())
                raise ValueError(f"Batch sizes do not match ({sizes}); each must be 1 or {batch_size}.")
        return out

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        mask_image: ImageInput,
        class_labels: ClassLabels | None = None,
        guidance_scale: float = 0.0,
        num_langevin_steps: int | None = None,
        use_initializer: bool = True,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> ImagePipelineOutput | tuple:
        r"""Inpaint the masked region of ``image`` (App. C).

        ``num_langevin_steps``, ``use_initializer``, ``generator``, ``output_type``, ``return_dict``,
        ``callback_on_step_end`` and ``callback_on_step_end_tensor_inputs`` are those of ``CDRLPipeline.__call__``.

        Args:
            image (`torch.Tensor`, `PIL.Image.Image`, `np.ndarray` or a list of them): the observation: tensors in
                [-1, 1] (NCHW or CHW), or PIL images / numpy arrays (HWC, NHWC) in [0, 1]; one image or a batch. Its
                pixels under the mask are never read.
            mask_image (same types as ``image``): white / 1 = generate, black / 0 = keep, in [0, 1], of the image's
                size: (H, W), (batch, H, W) or (batch, 1, H, W); binarised at 0.5 and broadcast over channels. A
                single image or mask is repeated to match the other's batch.
            class_labels (`int`, `str` or a list of them, *optional*): for class-conditional models, a label or one
                per image; ``None`` uses the unconditional (null-class) model.
            guidance_scale (`float`): the classifier-free guidance strength w (Eq. 11-12); needs ``class_labels``.

        Examples:

        Returns:
            `ImagePipelineOutput` with ``images``, or a tuple ``(images,)`` when ``return_dict=False``.
        """
        # 1. Check inputs
        self.check_sampling_inputs(guidance_scale, num_langevin_steps, use_initializer, output_type)
        self.check_callback_inputs(generator, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(class_labels, guidance_scale)
        device = self._execution_device

        # 2. Observation, mask and labels, broadcast to one batch
        observed = self.preprocess(image, "image")
        mask = self.prepare_mask(mask_image, tuple(observed.shape[-2:]))
        batch_size = max(observed.shape[0], mask.shape[0])
        labels = None
        if class_labels is not None:
            labels, batch_size = self.prepare_class_labels(class_labels, batch_size, None, device)
        tensors = self._broadcast({"image": observed, "mask_image": mask}, batch_size)
        observed, generate = tensors["image"], tensors["mask_image"].bool().expand_as(tensors["image"])
        energy_weights = ConditionWeights.unconditional()
        if labels is not None:
            energy_weights = ConditionWeights.classifier_free_guidance(labels, float(guidance_scale))

        # 3. One eps for every level: x_T and the known pixels of each y_t are noised with it. The masked pixels of
        #    the input are never read: x_T noises the observation with that region zeroed.
        noise = self.prepare_latents(batch_size, generator, device)
        scheduler = self.scheduler
        latents = scheduler.add_noise(observed.masked_fill(generate, 0.0), noise, scheduler.num_noise_levels)

        def keep_known(sample: torch.Tensor, timestep: int) -> torch.Tensor:
            known = scheduler.to_chain_space(scheduler.add_noise(observed, noise, timestep), timestep)
            return torch.where(generate, sample, known)

        # 4. Algorithm 2 with the known pixels projected after every step, and the Tweedie step
        initializer_weights = self.guided_initializer_weights(energy_weights)
        callback = self.step_end_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        samples = self.run_sampler(
            latents,
            energy_weights,
            initializer_weights,
            num_langevin_steps,
            use_initializer,
            generator,
            callback,
            keep_known,
        )

        # 5. Outputs: the known pixels exactly as observed
        return self.postprocess(torch.where(generate, samples, observed), output_type, return_dict)
