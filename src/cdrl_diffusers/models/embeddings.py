"""Conditioning shared by the CDRL networks: log-SNR and class embeddings, and spectral normalisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def maybe_spectral_norm(module: nn.Module, enabled: bool) -> nn.Module:
    """Wrap ``module``'s weight with ``torch.nn.utils.parametrizations.spectral_norm`` when ``enabled``."""
    return spectral_norm(module) if enabled else module


def logsnr_to_timestep(logsnr: torch.Tensor) -> torch.Tensor:
    """The network input for a log-SNR lambda (App. A.3): 1000 arctan(exp(-lambda / 2)) / (pi / 2).

    arctan(exp(-lambda / 2)) inverts the cosine schedule lambda = -2 log(tan(u)) (Eq. 19-20), so the input is the
    schedule's time rescaled from (0, pi / 2) to (0, 1000), the range the sinusoidal embeddings are made for. As in
    the authors' networks, lambda is first clamped to [-20, 20].
    """
    return torch.arctan(torch.exp(-0.5 * logsnr.clamp(-20.0, 20.0))) / (0.5 * math.pi) * 1000.0


class ClassEmbedding(nn.Linear):
    """A dense map of the one-hot label over ``num_class_embeds + 1`` entries (App. A.1).

    Entry 0 of the one-hot vector is the null class, entry ``i + 1`` class ``i``: the layout of the authors' networks,
    so that their weights load unchanged. ``forward`` takes the library's labels, in which ``num_class_embeds`` is the
    null class, and picks the weight column instead of multiplying by a one-hot vector (the same numbers).
    """

    def __init__(self, num_class_embeds: int, embedding_dim: int):
        super().__init__(num_class_embeds + 1, embedding_dim)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        one_hot_index = (class_labels + 1) % self.in_features
        return F.embedding(one_hot_index, self.weight.t()) + self.bias


class ConditionEmbedding(nn.Module):
    """Embeds the log-SNR (App. A.3) and, for conditional models, the class label (App. A.1).

    The log-SNR enters as ``logsnr_to_timestep`` through diffusers' sinusoidal ``Timesteps`` (sines first, frequencies
    10000^(-i / (d/2 - 1))) and a two-layer ``TimestepEmbedding`` with a LeakyReLU (Table 5c: sinusoidal, dense,
    leakyReLU, dense). A class label is embedded to the same width by ``ClassEmbedding`` and added;
    ``class_labels=None`` is the null class (classifier-free guidance).
    """

    def __init__(
        self,
        sinusoidal_channels: int,
        embedding_dim: int,
        num_class_embeds: int | None,
        negative_slope: float,
        use_spectral_norm: bool,
    ):
        super().__init__()
        self.num_class_embeds = num_class_embeds
        self.sinusoidal = Timesteps(sinusoidal_channels, flip_sin_to_cos=False, downscale_freq_shift=1)
        self.mlp = TimestepEmbedding(sinusoidal_channels, embedding_dim)
        self.mlp.act = nn.LeakyReLU(negative_slope)
        self.mlp.linear_1 = maybe_spectral_norm(self.mlp.linear_1, use_spectral_norm)
        self.mlp.linear_2 = maybe_spectral_norm(self.mlp.linear_2, use_spectral_norm)
        self.class_embedding = None
        if num_class_embeds is not None:
            self.class_embedding = maybe_spectral_norm(
                ClassEmbedding(num_class_embeds, embedding_dim), use_spectral_norm
            )

    def forward(self, logsnr: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        embedding = self.mlp(self.sinusoidal(logsnr_to_timestep(logsnr)).to(self.mlp.linear_1.bias.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full_like(logsnr, self.num_class_embeds, dtype=torch.long)
            embedding = embedding + self.class_embedding(class_labels)
        return embedding


def prepare_condition(
    sample: torch.Tensor,
    logsnr: float | torch.Tensor,
    class_labels: torch.Tensor | None,
    num_class_embeds: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate and broadcast ``logsnr`` and ``class_labels`` to the batch of ``sample`` (shared by all models)."""
    batch = sample.shape[0]
    if isinstance(logsnr, bool) or not isinstance(logsnr, (int, float, torch.Tensor)):
        raise TypeError(f"`logsnr` must be a float or a tensor, got {type(logsnr).__name__}.")
    logsnr = torch.as_tensor(logsnr, dtype=torch.float32, device=sample.device)
    if logsnr.ndim == 0:
        logsnr = logsnr.expand(batch)
    elif logsnr.shape != (batch,):
        raise ValueError(f"`logsnr` must be a scalar or have shape ({batch},), got {tuple(logsnr.shape)}.")
    checks_values = _can_check_values(sample)
    if checks_values and not torch.isfinite(logsnr).all():
        raise ValueError("`logsnr` must be finite.")
    if class_labels is None:
        return logsnr, None
    if num_class_embeds is None:
        raise ValueError("`class_labels` were given, but the model is unconditional (`num_class_embeds` is None).")
    class_labels = torch.as_tensor(class_labels, device=sample.device)
    if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
        raise TypeError(f"`class_labels` must be integers, got dtype {class_labels.dtype}.")
    if class_labels.ndim == 0:
        class_labels = class_labels.expand(batch)
    if class_labels.shape != (batch,):
        raise ValueError(f"`class_labels` must have shape ({batch},), got {tuple(class_labels.shape)}.")
    if checks_values and batch and (int(class_labels.min()) < 0 or int(class_labels.max()) > num_class_embeds):
        raise ValueError(
            f"`class_labels` must lie in [0, {num_class_embeds - 1}] (or {num_class_embeds} for the null class), "
            f"got values in [{int(class_labels.min())}, {int(class_labels.max())}]."
        )
    return logsnr, class_labels.long()


def condition_inputs(
    logsnr: torch.Tensor, class_labels: torch.Tensor | None, num_class_embeds: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check and normalise the (batch,) log-SNR and class labels given to an energy model's ``embed_condition``."""
    if not isinstance(logsnr, torch.Tensor) or logsnr.ndim != 1:
        raise TypeError("`logsnr` must be a tensor of shape (batch,).")
    return prepare_condition(logsnr.new_empty((logsnr.shape[0], 0)), logsnr, class_labels, num_class_embeds)


def _can_check_values(sample: torch.Tensor) -> bool:
    """Value checks read tensors on the host: skipped while ``torch.compile`` traces or a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return False
    return not (sample.is_cuda and torch.cuda.is_current_stream_capturing())
