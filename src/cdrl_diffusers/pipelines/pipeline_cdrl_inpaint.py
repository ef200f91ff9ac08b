"""CDRLInpaintPipeline: fill a masked region with a trained CDRL model (App. C, SPEC §8)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..guidance import ConditionWeights
from ..models.energy_model import EnergyModel
from ..models.initializer_unet import InitializerUNet
from ..sampling import CDRLSampler
from ..schedulers.scheduling_cdrl import CDRLScheduler
from .pipeline_cdrl import CDRLPipeline, ClassLabels, ImageInput


class CDRLInpaintPipeline(CDRLPipeline):
    r"""Inpainting with a CDRL model: the masked region is generated, the rest of the image is kept (App. C).

    Sampling starts from the observation noised to the last level. After the initializer's proposal and after every
    Langevin step, the known pixels of y_t are reset to the observation noised to level t, input_scale_t
    (alpha_bar_t x_obs + sigma_bar_t eps), with one eps shared by all levels; the output keeps them exactly. The mask
    follows diffusers' inpainting convention: white / 1 = generate, black / 0 = keep.

    Loads from any folder saved by a CDRL pipeline: ``CDRLInpaintPipeline.from_pretrained(path)``.

    Args:
        energy_model: the EBM f_hat(y; lambda) (``EnergyModel``).
        initializer: the initializer g(x; lambda) (``InitializerUNet``).
        scheduler: the ``CDRLScheduler`` the models were trained with.
    """

    def __init__(self, energy_model: EnergyModel, initializer: InitializerUNet, scheduler: CDRLScheduler):
        super().__init__(energy_model=energy_model, initializer=initializer, scheduler=scheduler)
        self.mask_processor = VaeImageProcessor(
            do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def _prepare_mask(self, mask_image: ImageInput, size: tuple[int, int]) -> torch.Tensor:
        """A binary (batch, 1, H, W) float mask, 1 = generate, from PIL / numpy / tensors in [0, 1]."""
        items = mask_image if isinstance(mask_image, list) else [mask_image]
        if len(items) == 0:
            raise ValueError("`mask_image` must not be empty.")
        if not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items):
            kinds = sorted({type(item).__name__ for item in items})
            raise TypeError(f"`mask_image` must be PIL images, numpy arrays or tensors, got {', '.join(kinds)}.")
        arrays = []
        for item in items:
            if isinstance(item, PIL.Image.Image):
                arrays.append(item)
                continue
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
        return mask

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
    def __call__(
        self,
        image: ImageInput,
        mask_image: ImageInput,
        class_labels: ClassLabels | None = None,
        guidance_scale: float = 0.0,
        num_langevin_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        precision: str | None = None,
        torch_compile: bool = False,
        cuda_graph: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""Inpaint the masked region of ``image`` (App. C).

        Args:
            image: the observation: tensors in [-1, 1] (NCHW or CHW), or PIL images / numpy arrays (HWC, NHWC) in
                [0, 1]; one image or a batch. Its pixels under the mask are never read.
            mask_image: white / 1 = generate, black / 0 = keep. PIL images, numpy arrays or tensors in [0, 1] of the
                image's size, (H, W), (batch, H, W) or (batch, 1, H, W); binarised at 0.5 and broadcast over channels.
                A single image or mask is repeated to match the other's batch.
            class_labels: for class-conditional models, a label (int or class name) or one per image; ``None`` uses
                the unconditional (null-class) model.
            guidance_scale: the classifier-free guidance strength w (Eq. 11-12); needs ``class_labels``.
            num_langevin_steps: K' Langevin steps per level (Sec. 4.2 sampling adjustment when K' differs from K).
            generator: a ``torch.Generator`` (or one per image) for reproducible results.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]) or ``"pt"`` (NCHW in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called after each noise level as ``callback(pipe, index, t, callback_kwargs)``;
                a returned ``"latents"`` replaces x_t.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (only ``"latents"``).
            precision: autocast dtype of the networks, as in ``CDRLPipeline.__call__``.
            torch_compile: run the EBM through a compiled copy, as in ``CDRLPipeline.__call__``.
            cuda_graph: replay the EBM's forward and input gradient from a CUDA graph (CUDA only).
        """
        self._check_sampling_arguments(
            guidance_scale, num_langevin_steps, output_type, callback_on_step_end_tensor_inputs
        )
        if guidance_scale > 0 and class_labels is None:
            raise ValueError(f"`guidance_scale={guidance_scale}` needs `class_labels` to guide towards.")
        device = self._execution_device
        observed = self._as_model_input(image, "image")
        if observed.abs().max() > 1:
            raise ValueError(
                f"`image` tensors must lie in [-1, 1], got [{observed.min().item()}, {observed.max().item()}]."
            )
        mask = self._prepare_mask(mask_image, tuple(observed.shape[-2:])).to(device)
        batch_size = max(observed.shape[0], mask.shape[0])
        labels = None
        if class_labels is not None:
            labels, batch_size = self._class_labels(class_labels, batch_size, None, device)
        tensors = self._broadcast({"image": observed, "mask_image": mask}, batch_size)
        observed, generate = tensors["image"], tensors["mask_image"].bool().expand_as(tensors["image"])

        energy_weights = ConditionWeights.unconditional()
        if labels is not None:
            energy_weights = ConditionWeights.classifier_free_guidance(labels, float(guidance_scale))
        # One eps for every level (SPEC §8): x_T and the known pixels of each y_t are noised with it.
        noise = self._latents(batch_size, None, generator, device)
        scheduler = self.scheduler

        def keep_known(sample: torch.Tensor, timestep: int) -> torch.Tensor:
            known = scheduler.to_chain_space(scheduler.add_noise(observed, noise, timestep), timestep)
            return torch.where(generate, sample, known)

        sampler = CDRLSampler(
            self.energy_model,
            self.initializer,
            scheduler,
            energy_weights=energy_weights,
            initializer_weights=self._initializer_weights(energy_weights),
            batch_size=batch_size,
            device=device,
            num_langevin_steps=num_langevin_steps,
            generator=generator,
            precision=precision,
            torch_compile=torch_compile,
            cuda_graph=cuda_graph,
            project=keep_known,
        )
        # The masked pixels of the input are never read: x_T noises the observation with that region zeroed.
        latents = scheduler.add_noise(observed.masked_fill(generate, 0.0), noise, scheduler.num_noise_levels)
        images = self._sample(sampler, latents, callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self._output(torch.where(generate, images, observed), output_type, return_dict)
