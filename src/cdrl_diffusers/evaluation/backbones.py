"""Image features from pretrained vision backbones of 🤗 transformers, for Fréchet distance and KID.

FID uses Inception-v3 features (``InceptionFeatures``). Stein et al. (NeurIPS 2023, "Exposing flaws of generative
model evaluation metrics") found the Fréchet distance on DINOv2 ViT features to agree better with human judgement;
``TransformersFeatures("facebook/dinov2-base")`` gives those features, and any other backbone that ``AutoModel`` loads
(a Hub id, or a local folder saved with ``save_pretrained``) works the same way, with its own preprocessing from
``AutoImageProcessor``. Needs ``pip install transformers`` (the ``backbones`` extra of this package).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .features import _check_images

POOLINGS = ("pooler", "cls", "mean")


class TransformersFeatures(nn.Module):
    """A feature extractor for ``extract_features`` / ``feature_distances``: a transformers vision backbone.

    Images in [-1, 1] of shape (batch, C, H, W) are quantised to uint8 RGB (grey-scale repeated to three channels),
    as saved image files are, and then preprocessed by the backbone's ``AutoImageProcessor`` (resize, crop and
    normalisation of its pretraining), so that features match those of the published model.

    Args:
        model_name_or_path: a Hub id (``"facebook/dinov2-base"``) or a local folder holding the model's
            ``config.json``, weights and ``preprocessor_config.json``. Offline, a Hub id loads from the Hub cache.
        pooling: how the backbone's output becomes one vector per image: ``"pooler"`` (the model's
            ``pooler_output``; for DINOv2 the layer-normed CLS token, the features of Stein et al.), ``"cls"`` (the
            first token of ``last_hidden_state``) or ``"mean"`` (the mean over tokens or spatial positions).
        **kwargs: passed to both ``from_pretrained`` calls (``revision``, ``cache_dir``, ``token``,
            ``local_files_only``, ...). Weights are read from safetensors unless ``use_safetensors=False``;
            ``trust_remote_code`` is refused.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, pooling: str = "pooler", **kwargs: Any):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")
        if kwargs.get("trust_remote_code"):
            raise ValueError("`trust_remote_code` is not supported: only backbones that transformers ships load.")
        try:
            from transformers import AutoImageProcessor, AutoModel
        except ImportError as error:
            raise ImportError(
                "TransformersFeatures needs transformers: `pip install transformers` (or this package's "
                "`backbones` extra)."
            ) from error
        self.pooling = pooling
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path, **kwargs)
        self.model = AutoModel.from_pretrained(model_name_or_path, **{"use_safetensors": True, **kwargs})
        self.num_channels = getattr(self.model.config, "num_channels", 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "images")
        if images.shape[1] == 1 and self.num_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != self.num_channels:
            raise ValueError(f"The backbone takes {self.num_channels}-channel images, got {images.shape[1]} channels.")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        inputs = self.processor(images=list(pixels), return_tensors="pt")
        parameter = next(self.model.parameters())
        output = self.model(pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype))
        if self.pooling == "pooler":
            pooled = getattr(output, "pooler_output", None)
            if pooled is None:
                raise ValueError(f"{type(self.model).__name__} has no pooler output: use pooling='cls' or 'mean'.")
            return pooled.flatten(1)
        hidden = output.last_hidden_state
        if self.pooling == "cls":
            if hidden.ndim != 3:
                raise ValueError(f"{type(self.model).__name__} has no tokens (a convolutional backbone): use 'mean'.")
            return hidden[:, 0]
        return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)
