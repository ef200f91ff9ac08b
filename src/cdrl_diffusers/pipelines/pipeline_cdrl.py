"""CDRLPipeline: unconditional, class-conditional and guided sampling, and log-densities (Algorithm 2, Sec. 3.5)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard

from ..guidance import ConditionWeights
from ..hub import check_pipeline_folder, download_pipeline
from ..model_card import create_model_card
from ..models.energy_model import EnergyModel
from ..models.initializer_unet import InitializerUNet
from ..sampling import CDRLSampler, LevelSample, frozen
from ..schedulers.scheduling_cdrl import CDRLScheduler
from ..validation import check_finite, check_float_tensor, check_generator, check_positive_int

OUTPUT_TYPES = ("pil", "np", "pt")
ClassLabels = int | str | Sequence[int | str] | torch.Tensor | np.ndarray
ImageInput = (
    PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray] | list[torch.Tensor]
)


class CDRLPipeline(DiffusionPipeline):
    r"""Sampling from a CDRL model: initializer proposals refined by Langevin dynamics at each noise level.

    Args:
        energy_model: the EBM f_hat(y; lambda) (``EnergyModel``).
        initializer: the initializer g(x; lambda) (``InitializerUNet``).
        scheduler: the ``CDRLScheduler`` the models were trained with.
    """

    model_cpu_offload_seq = "initializer->energy_model"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, energy_model: EnergyModel, initializer: InitializerUNet, scheduler: CDRLScheduler):
        super().__init__()
        self.register_modules(energy_model=energy_model, initializer=initializer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # ----------------------------------------------------------------------------------------------------------------
    # Input handling shared by all CDRL pipelines
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return self.energy_model.config.num_class_embeds is not None

    @property
    def class_names(self) -> list[str] | None:
        return self.energy_model.config.class_names

    def class_id(self, label: int | str, name: str = "class_labels") -> int:
        """The class index of ``label`` (an index or one of the model's ``class_names``), validated.

        ``name`` is the argument the label came from, for the error messages.
        """
        num_classes = self.energy_model.config.num_class_embeds
        if num_classes is None:
            raise ValueError(
                f"`{name}` given, but this model is unconditional: it accepts no class labels or concepts."
            )
        if isinstance(label, str):
            if not self.class_names or label not in self.class_names:
                known = (
                    f"one of {self.class_names}" if self.class_names else "an integer (the model has no class names)"
                )
                raise ValueError(f"Unknown class name {label!r} in `{name}`: expected {known}.")
            return self.class_names.index(label)
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"A class label in `{name}` must be an int or a class name, got {type(label).__name__}.")
        if not 0 <= int(label) < num_classes:
            raise ValueError(
                f"Class label {int(label)} in `{name}` is out of range: expected an integer in [0, {num_classes - 1}]."
            )
        return int(label)

    def _class_labels(
        self,
        class_labels: ClassLabels | None,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, int]:
        """Class ids as a (batch,) tensor (drawn uniformly for a conditional model when omitted), and the batch."""
        if class_labels is None:
            if not self.is_conditional:
                return None, batch_size
            first = generator[0] if isinstance(generator, list) else generator
            labels = torch.randint(
                0,
                self.energy_model.config.num_class_embeds,
                (batch_size,),
                generator=first,
                device=first.device if first is not None else "cpu",
            )
            return labels.to(device), batch_size
        if not self.is_conditional:
            raise ValueError("`class_labels` were given, but this model is unconditional.")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if class_labels.ndim > 1:
                raise ValueError(f"`class_labels` must be one-dimensional, got shape {tuple(class_labels.shape)}.")
            class_labels = class_labels.tolist()
        if isinstance(class_labels, str) or not isinstance(class_labels, Sequence):
            class_labels = [class_labels]
        ids = [self.class_id(label) for label in class_labels]
        if len(ids) == 0:
            raise ValueError("`class_labels` must not be empty.")
        if len(ids) == 1:
            ids = ids * batch_size
        elif batch_size not in (1, len(ids)):
            raise ValueError(
                f"Got {len(ids)} class labels for `batch_size={batch_size}`: pass one label, or one per sample."
            )
        return torch.tensor(ids, device=device), len(ids)

    @staticmethod
    def _check_count(value: Any, name: str, allow_none: bool = False) -> None:
        check_positive_int(value, name, allow_none=allow_none)

    def _check_sampling_arguments(
        self,
        guidance_scale: float,
        num_langevin_steps: int | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 (the paper's w), got {guidance_scale}.")
        if guidance_scale > 0 and not self.is_conditional:
            raise ValueError(
                f"`guidance_scale={guidance_scale}` needs a class-conditional model, but this model is unconditional."
            )
        self._check_count(num_langevin_steps, "num_langevin_steps", allow_none=True)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only contain {self._callback_tensor_inputs}, got {unknown}."
            )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        config = self.energy_model.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def _latents(
        self,
        batch_size: int,
        latents: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
    ) -> torch.Tensor:
        """x_T ~ N(0, I), or the given ``latents`` after a shape check."""
        shape = (batch_size, *self.sample_shape)
        check_generator(generator)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators in `generator` for a batch of {batch_size}: pass one per sample."
            )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be a tensor of shape {shape}, got {got}.")
        check_float_tensor(latents, "latents")
        check_finite(latents, "latents")
        return latents.to(device=device, dtype=torch.float32)

    def _initializer_weights(self, energy_weights: ConditionWeights) -> ConditionWeights:
        """Guided initializer means (Eq. 12) for a conditional initializer; its plain mean otherwise."""
        if self.initializer.config.num_class_embeds is None:
            return ConditionWeights.unconditional()
        return energy_weights.for_initializer()

    def _sample(
        self,
        sampler: CDRLSampler,
        latents: torch.Tensor,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """Run every level with a progress bar and the step-end callbacks, then the Tweedie step."""
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress_bar:

            def after_level(index: int, level: LevelSample) -> torch.Tensor | None:
                progress_bar.update()
                if callback_on_step_end is None:
                    return None
                step_kwargs = {"latents": level.sample}
                callback_kwargs = {name: step_kwargs[name] for name in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(self, index, level.timestep, callback_kwargs)
                return outputs.pop("latents", None) if outputs else None

            return sampler.run(latents, callback=after_level)

    def _output(self, images: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _as_model_input(self, images: ImageInput, name: str) -> torch.Tensor:
        """Images in [-1, 1] as a float32 batch on the execution device.

        As in diffusers: tensors are in [-1, 1] (NCHW or CHW, or a list of CHW tensors); PIL images and numpy arrays
        (HWC or NHWC) are in [0, 1] and go through the ``VaeImageProcessor``.
        """
        if isinstance(images, list):
            if len(images) == 0:
                raise ValueError(f"`{name}` must not be empty.")
            if all(isinstance(image, torch.Tensor) for image in images):
                images = torch.stack([image if image.ndim == 3 else image.squeeze(0) for image in images])
        if isinstance(images, torch.Tensor):
            tensor = images.unsqueeze(0) if images.ndim == 3 else images
            if not tensor.is_floating_point():
                raise TypeError(f"`{name}` must be a floating-point tensor in [-1, 1], got dtype {tensor.dtype}.")
        else:
            valid = (PIL.Image.Image, np.ndarray)
            items = images if isinstance(images, list) else [images]
            if not all(isinstance(item, valid) for item in items):
                kinds = sorted({type(item).__name__ for item in items})
                raise TypeError(f"`{name}` must be PIL images, numpy arrays or tensors, got {', '.join(kinds)}.")
            for item in items:
                if isinstance(item, np.ndarray) and not np.issubdtype(item.dtype, np.floating):
                    raise TypeError(
                        f"`{name}` numpy arrays must be floats in [0, 1], got dtype {item.dtype} (divide 8-bit images "
                        "by 255)."
                    )
                if isinstance(item, np.ndarray) and item.size and not (item.min() >= 0 and item.max() <= 1):
                    raise ValueError(f"`{name}` numpy arrays must lie in [0, 1], got [{item.min()}, {item.max()}].")
            if isinstance(items[0], PIL.Image.Image):
                mode = "L" if self.sample_shape[0] == 1 else "RGB"
                images = [item.convert(mode) for item in items]
            elif isinstance(images, np.ndarray) and images.ndim == 2:
                images = images[None, :, :, None]
            elif isinstance(images, np.ndarray) and images.ndim == 3 and self.sample_shape[0] in (1, 3):
                images = images[None] if images.shape[-1] == self.sample_shape[0] else images
            tensor = self.image_processor.preprocess(images)
        tensor = tensor.float()
        expected = self.sample_shape
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"`{name}` must have shape (batch, {shape}), got {tuple(tensor.shape)}.")
        if tensor.shape[0] == 0:
            raise ValueError(f"`{name}` must not be empty.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        return tensor.to(self._execution_device)

    # ----------------------------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: ClassLabels | None = None,
        guidance_scale: float = 0.0,
        num_langevin_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        precision: str | None = None,
        torch_compile: bool = False,
        cuda_graph: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images (Algorithm 2 and the Tweedie step of Eq. 18).

        Args:
            batch_size: number of images (when ``class_labels`` lists several labels, one image per label).
            class_labels: for class-conditional models, an int, a class name or a list of them; one label is
                repeated ``batch_size`` times. Omitted labels are drawn uniformly with ``generator``.
            guidance_scale: the classifier-free guidance strength w (Eq. 11-12); 0 samples the conditional model.
            num_langevin_steps: K' Langevin steps per level. Values other than the trained K apply the sampling
                adjustment of Sec. 4.2 (step size scaled by sqrt(K / K')).
            generator: a ``torch.Generator`` (or one per sample) for reproducible results.
            latents: x_T of shape (batch, channels, size, size); drawn from N(0, I) when omitted.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]) or ``"pt"`` (NCHW in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called after each noise level as ``callback(pipe, index, t, callback_kwargs)``;
                a returned ``"latents"`` replaces x_t.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (only ``"latents"``).
            precision: autocast dtype of the network evaluations: ``None`` (the caller's setting, float32 by default),
                ``"fp32"``, ``"bf16"`` or ``"fp16"``. The Langevin state, quadratic term and noise stay float32. See
                docs/performance.md for speed and quality.
            torch_compile: run the EBM through a ``torch.compile``d copy (the first call compiles).
            cuda_graph: on CUDA, replay the EBM's forward and gradient from a CUDA graph captured once per call.
        """
        self._check_count(batch_size, "batch_size")
        self._check_sampling_arguments(
            guidance_scale, num_langevin_steps, output_type, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device
        labels, batch_size = self._class_labels(class_labels, batch_size, generator, device)
        latents = self._latents(batch_size, latents, generator, device)
        energy_weights = ConditionWeights.unconditional()
        if labels is not None:
            energy_weights = ConditionWeights.classifier_free_guidance(labels, float(guidance_scale))
        sampler = CDRLSampler(
            self.energy_model,
            self.initializer,
            self.scheduler,
            energy_weights=energy_weights,
            initializer_weights=self._initializer_weights(energy_weights),
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

    @torch.no_grad()
    def log_density(
        self,
        images: ImageInput,
        class_labels: ClassLabels | None = None,
        noise_level: int = 0,
        batch_size: int = 256,
    ) -> torch.Tensor:
        r"""Unnormalised log-density f_theta(input_scale_t x; t) = f_hat / s_t^2 of each image (Sec. 4.4).

        Higher means more in-distribution; at ``noise_level=0`` this is the out-of-distribution score of the paper.
        Scores do not depend on how images are batched.

        Args:
            images: tensors in [-1, 1] (batch, C, H, W), or PIL images / numpy arrays in [0, 1].
            class_labels: for conditional models, labels of the class-conditional density; ``None`` scores the
                unconditional (null-class) density.
            noise_level: the pair t whose EBM scores the images (0..T-1).
            batch_size: images per forward pass.

        Returns:
            A float tensor of shape (batch,) on the CPU.
        """
        self._check_count(batch_size, "batch_size")
        if isinstance(noise_level, bool) or not isinstance(noise_level, int):
            raise TypeError(f"`noise_level` must be an int, got {type(noise_level).__name__}.")
        if not 0 <= noise_level < self.scheduler.num_noise_levels:
            raise ValueError(
                f"`noise_level` must lie in [0, {self.scheduler.num_noise_levels - 1}], got {noise_level}."
            )
        samples = self._as_model_input(images, "images")
        labels = None
        if class_labels is not None:
            labels, _ = self._class_labels(class_labels, samples.shape[0], None, samples.device)
            if labels.shape[0] != samples.shape[0]:
                raise ValueError(f"Got {labels.shape[0]} class labels for {samples.shape[0]} images.")
        logsnr = self.scheduler.energy_logsnr(noise_level, device=samples.device)
        scores = []
        with frozen(self.energy_model):
            for start in range(0, samples.shape[0], batch_size):
                chunk = self.scheduler.to_chain_space(samples[start : start + batch_size], noise_level)
                chunk_labels = None if labels is None else labels[start : start + batch_size]
                neg_energy = self.energy_model(chunk, logsnr, class_labels=chunk_labels).neg_energy.float()
                scores.append(self.scheduler.log_density(neg_energy, noise_level))
        return torch.cat(scores).cpu()

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """Fetch a pipeline repo with ``huggingface_hub.snapshot_download`` and return its local folder.

        Replaces diffusers' download step, which refuses components from this library; see ``cdrl_diffusers.hub``.
        """
        return download_pipeline(pretrained_model_name, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> CDRLPipeline:
        """Load a pipeline saved by ``save_pretrained`` from a local folder or a Hub repo id (``"org/name"``).

        Keyword arguments are those of ``DiffusionPipeline.from_pretrained`` (``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``torch_dtype``, ...). Weights are read from safetensors only unless
        ``use_safetensors=False`` is passed; ``custom_pipeline`` and ``trust_remote_code`` are not supported.
        """
        for option in ("custom_pipeline", "trust_remote_code"):
            if kwargs.get(option):
                raise ValueError(f"`{option}` is not supported: CDRL pipelines never run code from a model repo.")
        kwargs.setdefault("use_safetensors", True)
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            folder = cls.download(folder, **kwargs)
        check_pipeline_folder(folder, tuple(sorted(cls._get_signature_keys(cls)[0])))
        return super().from_pretrained(folder, **kwargs)

    def create_model_card(self, **kwargs: Any) -> ModelCard:
        """A Hub model card for this pipeline; keyword arguments go to ``cdrl_diffusers.create_model_card``."""
        return create_model_card(self, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, model_card: ModelCard | None = None, **kwargs: Any
    ) -> None:
        """Save the components (safetensors) as diffusers does, plus a Hub model card ``README.md``.

        Other positional and keyword arguments are passed on to ``DiffusionPipeline.save_pretrained``.

        Args:
            save_directory: the folder to write.
            model_card: the card to write; by default ``create_model_card()`` describes the pipeline.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        card = model_card if model_card is not None else self.create_model_card()
        card.save(os.path.join(save_directory, "README.md"))
