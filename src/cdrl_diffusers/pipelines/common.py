"""What the CDRL pipelines share: input checks, class labels, latents, the sampling loop, outputs and the Hub.

``CDRLPipeline``, ``CDRLInpaintPipeline`` and ``CDRLComposePipeline`` are siblings: each is a ``DiffusionPipeline``
with this mixin and its own ``check_inputs`` and ``__call__``. The mixin's helpers check each user argument once,
at the pipeline's door; the sampler (``sampling.CDRLSampler``, Algorithm 2) trusts them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import huggingface_hub
import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard

from ..acceleration import CUDAGraphEnergyGradient
from ..guidance import ConditionWeights, StackedTerms
from ..hub import check_pipeline_folder, download_pipeline
from ..model_card import create_model_card
from ..models import EnergyMLP, EnergyModel, InitializerMLP, InitializerUNet
from ..sampling import CDRLSampler, LevelSample, frozen, model_dtype, model_input
from ..schedulers.scheduling_cdrl import CDRLScheduler
from ..validation import check_finite, check_float_tensor, check_generator, check_number, check_positive_int

logger = logging.get_logger(__name__)

# The networks a pipeline takes: image models, or vector models (data of shape (batch, data_dim)).
EnergyNetwork = EnergyModel | EnergyMLP
InitializerNetwork = InitializerUNet | InitializerMLP
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
Callback = Callable | PipelineCallback | MultiPipelineCallbacks
Generator = torch.Generator | list[torch.Generator] | None
ClassLabels = int | str | Sequence[int | str] | torch.Tensor | np.ndarray
ImageInput = (
    PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray] | list[torch.Tensor]
)


class CDRLPipelineMixin:
    """Shared by the CDRL pipelines (``energy_model``, ``initializer`` and ``scheduler`` components)."""

    model_cpu_offload_seq = "initializer->energy_model"
    _callback_tensor_inputs = ["latents"]
    _use_cuda_graph = False
    energy_model: EnergyNetwork
    initializer: InitializerNetwork
    scheduler: CDRLScheduler

    def _register_components(
        self, energy_model: EnergyNetwork, initializer: InitializerNetwork, scheduler: CDRLScheduler
    ) -> None:
        """Register the components and put the networks in eval mode, as ``from_pretrained`` does.

        So a pipeline built from components computes what the same pipeline loaded from disk computes. A training
        loop that shares its networks with a pipeline puts them back in train mode itself.
        """
        self.register_modules(energy_model=energy_model, initializer=initializer, scheduler=scheduler)
        energy_model.eval()
        initializer.eval()
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # ----------------------------------------------------------------------------------------------------------------
    # The model's data and classes
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (channels, size, size) for images, (data_dim,) for vector models."""
        config = self.energy_model.config
        if "data_dim" in config:
            return (config.data_dim,)
        return (config.in_channels, config.sample_size, config.sample_size)

    @property
    def is_conditional(self) -> bool:
        return self.energy_model.config.num_class_embeds is not None

    @property
    def class_names(self) -> list[str] | None:
        return self.energy_model.config.get("class_names")

    def class_id(self, label: int | str, name: str = "class_labels") -> int:
        """The class index of ``label`` (an index or one of the model's ``class_names``), checked.

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

    def class_ids(self, labels: ClassLabels, name: str = "class_labels") -> list[int]:
        """One or several labels (ints, class names, a 1-D tensor or array) as a non-empty list of class indices."""
        if isinstance(labels, (torch.Tensor, np.ndarray)):
            if labels.ndim > 1:
                raise ValueError(f"`{name}` must be one-dimensional, got shape {tuple(labels.shape)}.")
            labels = labels.tolist()
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            labels = [labels]
        if len(labels) == 0:
            raise ValueError(f"`{name}` must not be empty.")
        return [self.class_id(label, name) for label in labels]

    def prepare_class_labels(
        self, class_labels: ClassLabels | None, batch_size: int, generator: Generator, device: torch.device
    ) -> tuple[torch.Tensor | None, int]:
        """Class ids as a (batch,) tensor, and the batch size they imply.

        One label is repeated ``batch_size`` times; several give one sample each. Omitted labels of a conditional
        model are drawn uniformly with ``generator``; an unconditional model gets ``None``.
        """
        if class_labels is None:
            if not self.is_conditional:
                return None, batch_size
            first = generator[0] if isinstance(generator, list) else generator
            num_classes = self.energy_model.config.num_class_embeds
            labels = torch.randint(
                0, num_classes, (batch_size,), generator=first, device=getattr(first, "device", None)
            )
            return labels.to(device), batch_size
        ids = self.class_ids(class_labels)
        if len(ids) == 1:
            ids = ids * batch_size
        elif batch_size not in (1, len(ids)):
            raise ValueError(
                f"Got {len(ids)} class labels for `batch_size={batch_size}`: pass one label, or one per sample."
            )
        return torch.tensor(ids, device=device), len(ids)

    # ----------------------------------------------------------------------------------------------------------------
    # Checks shared by every pipeline's check_inputs
    # ----------------------------------------------------------------------------------------------------------------
    def check_sampling_inputs(
        self, guidance_scale: float, num_langevin_steps: int | None, use_initializer: bool, output_type: str
    ) -> None:
        """The sampling arguments every CDRL pipeline's ``__call__`` takes, each checked by one rule."""
        check_number(guidance_scale, "guidance_scale", minimum=0.0)
        if guidance_scale > 0 and not self.is_conditional:
            raise ValueError(
                f"`guidance_scale={guidance_scale}` needs a class-conditional model, but this model is unconditional."
            )
        check_positive_int(num_langevin_steps, "num_langevin_steps", allow_none=True, minimum=0)
        if not isinstance(use_initializer, bool):
            raise TypeError(f"`use_initializer` must be True or False, got {use_initializer!r}.")
        if num_langevin_steps == 0 and not use_initializer:
            raise ValueError(
                "`num_langevin_steps=0` with `use_initializer=False` would not sample: allow one of them."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if len(self.sample_shape) == 1 and output_type == "pil":
            raise ValueError("`output_type='pil'` needs an image model; vector models return 'pt', 'np' or 'latent'.")

    def check_callback_inputs(
        self,
        generator: Generator,
        callback_on_step_end: Callback | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        """diffusers' common arguments: the generator(s) and the step-end callback."""
        check_generator(generator)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only contain {self._callback_tensor_inputs}, got {unknown}."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------------------------
    def prepare_latents(
        self,
        batch_size: int,
        generator: Generator,
        device: torch.device,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, I) of shape (batch_size, *sample_shape) in float32, or the given ``latents`` after checks."""
        shape = (batch_size, *self.sample_shape)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators in `generator` for a batch of {batch_size}: pass one per sample."
            )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        check_float_tensor(latents, "latents")
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        check_finite(latents, "latents")
        return latents.to(device=device, dtype=torch.float32)

    def preprocess(self, images: ImageInput, name: str = "images") -> torch.Tensor:
        """Images in [-1, 1] as a float32 batch on the execution device, checked.

        As in diffusers: tensors are in [-1, 1] (NCHW or CHW, or a list of CHW tensors; (batch, D) or (D,) for vector
        models); PIL images and numpy arrays (HWC or NHWC) are in [0, 1] and go through the ``VaeImageProcessor``.
        """
        if isinstance(images, list):
            if len(images) == 0:
                raise ValueError(f"`{name}` must not be empty.")
            if all(isinstance(image, torch.Tensor) for image in images):
                images = torch.stack([image.squeeze(0) if image.ndim == 4 else image for image in images])
        if isinstance(images, torch.Tensor):
            tensor = images.unsqueeze(0) if images.ndim == len(self.sample_shape) else images
            if not tensor.is_floating_point():
                raise TypeError(f"`{name}` must be a floating-point tensor in [-1, 1], got dtype {tensor.dtype}.")
        else:
            tensor = self._preprocess_pil_or_numpy(images, name)
        tensor = tensor.float()
        if tensor.ndim != len(self.sample_shape) + 1 or tuple(tensor.shape[1:]) != self.sample_shape:
            shape = ", ".join(map(str, ("batch", *self.sample_shape)))
            raise ValueError(f"`{name}` must have shape ({shape}), got {tuple(tensor.shape)}.")
        if tensor.shape[0] == 0:
            raise ValueError(f"`{name}` must not be empty.")
        check_finite(tensor, name)
        if tensor.abs().max() > 1:
            raise ValueError(
                f"`{name}` tensors must lie in [-1, 1], got [{tensor.min().item():g}, {tensor.max().item():g}]: map "
                "8-bit images with x / 127.5 - 1."
            )
        return tensor.to(self._execution_device)

    def _preprocess_pil_or_numpy(self, images: ImageInput, name: str) -> torch.Tensor:
        items = images if isinstance(images, list) else [images]
        if not all(isinstance(item, (PIL.Image.Image, np.ndarray)) for item in items):
            kinds = sorted({type(item).__name__ for item in items})
            raise TypeError(f"`{name}` must be PIL images, numpy arrays or tensors, got {', '.join(kinds)}.")
        for item in items:
            if isinstance(item, np.ndarray) and not np.issubdtype(item.dtype, np.floating):
                raise TypeError(
                    f"`{name}` numpy arrays must be floats in [0, 1], got dtype {item.dtype} (divide 8-bit images by "
                    "255)."
                )
            if isinstance(item, np.ndarray) and item.size and not (item.min() >= 0 and item.max() <= 1):
                raise ValueError(f"`{name}` numpy arrays must lie in [0, 1], got [{item.min()}, {item.max()}].")
        channels = self.sample_shape[0]
        if isinstance(items[0], PIL.Image.Image):
            images = [item.convert("L" if channels == 1 else "RGB") for item in items]
        elif isinstance(images, np.ndarray) and images.ndim == 2:
            images = images[None, :, :, None]
        elif isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] == channels:
            images = images[None]
        return self.image_processor.preprocess(images)

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling and outputs
    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_density(
        self,
        images: ImageInput,
        class_labels: ClassLabels | None = None,
        noise_level: int = 0,
        batch_size: int = 256,
    ) -> torch.Tensor:
        r"""Unnormalised log-density f_theta(input_scale_t x; t) = f_hat / s_t^2 of each sample (Sec. 4.4).

        Higher means more in-distribution; at ``noise_level=0`` this is the out-of-distribution score of the paper.
        Scores do not depend on how the samples are batched.

        Args:
            images: tensors in [-1, 1] (batch, C, H, W), or PIL images / numpy arrays in [0, 1]; (batch, data_dim)
                tensors for vector models.
            class_labels: for conditional models, labels of the class-conditional density (one, or one per sample);
                ``None`` scores the unconditional (null-class) density.
            noise_level: the pair t whose EBM scores the samples (0..T-1).
            batch_size: samples per forward pass.

        Returns:
            A float tensor of shape (batch,) on the CPU.
        """
        # 1. Check inputs
        check_positive_int(batch_size, "batch_size")
        if isinstance(noise_level, bool) or not isinstance(noise_level, int):
            raise TypeError(f"`noise_level` must be an int, got {type(noise_level).__name__}.")
        if not 0 <= noise_level < self.scheduler.num_noise_levels:
            raise ValueError(
                f"`noise_level` must lie in [0, {self.scheduler.num_noise_levels - 1}], got {noise_level}."
            )
        samples = self.preprocess(images, "images")

        # 2. Class labels
        labels = None
        if class_labels is not None:
            labels, count = self.prepare_class_labels(class_labels, samples.shape[0], None, samples.device)
            if count != samples.shape[0]:
                raise ValueError(f"Got {count} class labels for {samples.shape[0]} images.")

        # 3. f_hat / s_t^2 in chunks
        logsnr = self.scheduler.energy_logsnr(noise_level, device=samples.device)
        scores = []
        with frozen(self.energy_model):
            for start in range(0, samples.shape[0], batch_size):
                chunk = self.scheduler.to_chain_space(samples[start : start + batch_size], noise_level)
                chunk_labels = None if labels is None else labels[start : start + batch_size]
                output = self.energy_model(
                    model_input(chunk, model_dtype(self.energy_model)), logsnr, class_labels=chunk_labels
                )
                scores.append(self.scheduler.log_density(output.neg_energy.float(), noise_level))
        return torch.cat(scores).cpu()

    def guided_initializer_weights(self, energy_weights: ConditionWeights) -> ConditionWeights:
        """Guided initializer means (Eq. 12) for a conditional initializer; its plain mean otherwise."""
        if self.initializer.config.num_class_embeds is None:
            return ConditionWeights.unconditional()
        return energy_weights.for_initializer()

    def enable_cuda_graph(self) -> None:
        """Replay the EBM's forward and input-gradient pass from a CUDA graph, captured once per call (CUDA only)."""
        if self._execution_device.type != "cuda":
            raise ValueError(f"CUDA graphs need the pipeline on a CUDA device, it is on {self._execution_device}.")
        self._use_cuda_graph = True

    def disable_cuda_graph(self) -> None:
        """Evaluate the EBM eagerly again (the default)."""
        self._use_cuda_graph = False

    def step_end_callback(
        self, callback_on_step_end: Callback | None, callback_on_step_end_tensor_inputs: list[str]
    ) -> Callable[[int, LevelSample], torch.Tensor | None]:
        """The sampler's per-level callback: diffusers' ``callback_on_step_end`` with x_t as ``latents``.

        Latents the user's callback returns replace x_t after a check (a finite float tensor shaped like x_t).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        def after_level(index: int, level: LevelSample) -> torch.Tensor | None:
            if callback_on_step_end is None:
                return None
            step_kwargs = {"latents": level.sample}
            callback_kwargs = {name: step_kwargs[name] for name in callback_on_step_end_tensor_inputs}
            outputs = callback_on_step_end(self, index, level.timestep, callback_kwargs)
            replaced = outputs.pop("latents", None) if outputs else None
            return None if replaced is None else self._check_callback_latents(replaced, level.sample)

        return after_level

    def run_sampler(
        self,
        latents: torch.Tensor,
        energy_weights: ConditionWeights,
        initializer_weights: ConditionWeights,
        num_langevin_steps: int | None,
        use_initializer: bool,
        generator: Generator,
        callback: Callable[[int, LevelSample], torch.Tensor | None],
        project: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Algorithm 2 from x_T = ``latents`` with a progress bar and ``callback`` after each level, then the
        Tweedie step; ``project`` (inpainting) is applied to y_t after the proposal and every Langevin step."""
        batch, device = latents.shape[0], latents.device
        energy_terms = energy_weights.stack(self.energy_model.config.num_class_embeds, batch, device)
        initializer_terms = initializer_weights.stack(self.initializer.config.num_class_embeds, batch, device)
        if num_langevin_steps not in (None, self.scheduler.config.num_langevin_steps):
            logger.info(
                f"{num_langevin_steps} Langevin steps per level instead of the trained "
                f"{self.scheduler.config.num_langevin_steps}: the step size is scaled by the sampling adjustment "
                "(Sec. 4.2)."
            )
        sampler = CDRLSampler(
            self.energy_model,
            self.initializer,
            self.scheduler,
            energy_terms,
            initializer_terms,
            num_langevin_steps=num_langevin_steps,
            use_initializer=use_initializer,
            generator=generator,
            project=project,
            gradient=self._cuda_graph(energy_terms, latents),
        )
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress_bar:

            def after_level(index: int, level: LevelSample) -> torch.Tensor | None:
                progress_bar.update()
                return callback(index, level)

            return sampler.run(latents, callback=after_level)

    def _cuda_graph(self, energy_terms: StackedTerms, latents: torch.Tensor) -> CUDAGraphEnergyGradient | None:
        if not self._use_cuda_graph:
            return None
        return CUDAGraphEnergyGradient(self.energy_model, energy_terms, latents)

    @staticmethod
    def _check_callback_latents(latents: Any, like: torch.Tensor) -> torch.Tensor:
        """The ``latents`` a step-end callback returned: a finite float tensor shaped like x_t."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            kind = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise TypeError(f"`callback_on_step_end` must return `latents` as a floating-point tensor, got {kind}.")
        if latents.shape != like.shape:
            raise ValueError(
                f"`callback_on_step_end` returned `latents` of shape {tuple(latents.shape)}; x_t has shape "
                f"{tuple(like.shape)}."
            )
        if not torch.isfinite(latents).all():
            raise ValueError("`callback_on_step_end` returned `latents` with NaN or infinite values.")
        return latents.to(device=like.device, dtype=torch.float32)

    def postprocess(
        self, samples: torch.Tensor, output_type: str, return_dict: bool
    ) -> ImagePipelineOutput | tuple[Any]:
        """x_0 as PIL images, a numpy array or a tensor in [0, 1], or as it is (``"latent"``, and vector models)."""
        if output_type == "latent" or len(self.sample_shape) == 1:
            samples = samples.float()
            samples = samples.cpu().numpy() if output_type == "np" else samples
        else:
            samples = self.image_processor.postprocess(samples.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

    # ----------------------------------------------------------------------------------------------------------------
    # Saving, loading and the Hub
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """Fetch a pipeline repo with ``huggingface_hub.snapshot_download`` and return its local folder.

        Replaces diffusers' download step, which refuses components from this library; see ``cdrl_diffusers.hub``.
        """
        return download_pipeline(pretrained_model_name, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a pipeline saved by ``save_pretrained`` from a local folder or a Hub repo id (``"org/name"``).

        Keyword arguments are those of ``DiffusionPipeline.from_pretrained`` (``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``torch_dtype``, ...). Weights are read from safetensors only unless
        ``use_safetensors=False`` is passed; ``custom_pipeline`` and ``trust_remote_code`` are not supported. Any
        CDRL pipeline class loads a folder saved by any other.
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
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        model_card: ModelCard | None = None,
        **kwargs: Any,
    ) -> None:
        """Save the components (safetensors) as diffusers does, plus the CDRL model card as ``README.md``.

        Args:
            save_directory: the folder to write.
            safe_serialization: save weights as safetensors (the default; ``from_pretrained`` reads only those).
            variant: a weights variant name such as ``"fp16"``.
            push_to_hub: then upload the folder to the Hub repo ``repo_id`` (keyword; default: the folder's name),
                with ``token``, ``private``, ``commit_message`` and ``create_pr`` as in diffusers.
            model_card: the card to write; by default ``create_model_card`` describes the pipeline, with the repo id
                (when pushing) or the folder in its usage snippet.
        """
        hub = {key: kwargs.pop(key) for key in ("token", "private", "commit_message", "create_pr") if key in kwargs}
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        if push_to_hub:
            repo_id = self._create_repo(repo_id, hub.get("private"), hub.get("token"))
        if model_card is None:
            model_card = self.create_model_card(repo_id=repo_id if push_to_hub else None, folder=save_directory)
        model_card.save(os.path.join(save_directory, "README.md"))
        if push_to_hub:
            self._upload(save_directory, repo_id, hub.get("commit_message"), hub.get("token"), hub.get("create_pr"))

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        model_card: ModelCard | None = None,
    ) -> str:
        """Upload the pipeline, with the CDRL model card as ``README.md``, to the Hub repo ``repo_id``.

        As ``DiffusionPipeline.push_to_hub``, except for the card: diffusers would upload its empty template.
        ``model_card`` replaces the default ``create_model_card(repo_id=repo_id)``.
        """
        repo_id = self._create_repo(repo_id, private, token)
        card = model_card if model_card is not None else self.create_model_card(repo_id=repo_id)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant, model_card=card)
            return self._upload(folder, repo_id, commit_message, token, create_pr)

    @staticmethod
    def _create_repo(repo_id: str, private: bool | None, token: str | None) -> str:
        return huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id

    def _upload(
        self, folder: str | os.PathLike, repo_id: str, commit_message: str | None, token: str | None, create_pr: bool
    ) -> str:
        logger.info(f"Uploading {folder} to the Hub repo {repo_id}.")
        return huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            token=token,
            commit_message=commit_message or f"Upload {type(self).__name__}",
            create_pr=bool(create_pr),
        )
