"""Energy model and initializer for vector data of shape (batch, data_dim), e.g. the 2-D toy problems (Fig. 1)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..hub import SafeLoadingMixin
from ..validation import check_positive_int, check_positive_ints, check_sample
from .embeddings import ConditionEmbedding, condition_inputs, maybe_spectral_norm, prepare_condition
from .energy_model import EnergyModelOutput, validate_class_names
from .initializer_unet import InitializerOutput

ACTIVATIONS = ("leaky_relu", "silu")


def _activation(name: str, negative_slope: float) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"`act_fn` must be one of {ACTIVATIONS}, got {name!r}.")
    return nn.LeakyReLU(negative_slope) if name == "leaky_relu" else nn.SiLU()


class EnergyMLPCondition(NamedTuple):
    """The part of f_hat that depends on (log-SNR, class) alone (``EnergyMLP.embed_condition``).

    Args:
        block_biases: each residual layer's embedding term, of shape (batch, hidden_dim).
    """

    block_biases: tuple[torch.Tensor, ...]


class EnergyResidualLayer(nn.Module):
    """act, dense, + embedding term, act, dense, x scale, + input: the vector analogue of Table 5a.

    The embedding term is act(dense(act(embedding))), as in the official 2-D EBM; the per-unit scale starts at one.
    """

    def __init__(self, hidden_dim: int, embedding_dim: int, activation: nn.Module, use_spectral_norm: bool):
        super().__init__()
        self.act = activation
        self.linear1 = maybe_spectral_norm(nn.Linear(hidden_dim, hidden_dim), use_spectral_norm)
        self.embedding_proj = maybe_spectral_norm(nn.Linear(embedding_dim, hidden_dim), use_spectral_norm)
        self.linear2 = maybe_spectral_norm(nn.Linear(hidden_dim, hidden_dim), use_spectral_norm)
        self.residual_scale = nn.Parameter(torch.ones(hidden_dim))

    def embedding_bias(self, embedding: torch.Tensor) -> torch.Tensor:
        """act(dense(embedding)) for an already activated ``embedding`` of shape (batch, embedding_dim)."""
        return self.act(self.embedding_proj(embedding))

    def forward(self, hidden: torch.Tensor, embedding_bias: torch.Tensor) -> torch.Tensor:
        residual = self.linear1(self.act(hidden)) + embedding_bias
        return hidden + self.linear2(self.act(residual)) * self.residual_scale


class EnergyMLP(SafeLoadingMixin, ModelMixin, ConfigMixin):
    r"""f_hat(y; lambda) for vectors: the ``EnergyModel`` design with dense layers instead of convolutions.

    As in the official 2-D EBM: a dense input layer, ``num_layers`` residual layers conditioned on the log-SNR (and
    class) embedding, then ReLU and one bias-free dense readout shared by all levels. Spectral normalisation wraps
    every dense layer except the readout and the per-layer scales, which start at one.

    Args:
        data_dim: dimension of the data vectors.
        hidden_dim: width of the hidden layers (and of the sinusoidal log-SNR features).
        num_layers: number of residual layers.
        embedding_dim: width of the log-SNR/class embedding.
        act_fn: ``"leaky_relu"`` or ``"silu"``.
        negative_slope: slope of the LeakyReLU.
        num_class_embeds: classes of a conditional model (``None``: unconditional); index ``num_class_embeds`` is
            the null class.
        class_names: optional class names.
        use_spectral_norm: apply spectral normalisation.
    """

    @register_to_config
    def __init__(
        self,
        data_dim: int = 2,
        hidden_dim: int = 256,
        num_layers: int = 4,
        embedding_dim: int = 512,
        act_fn: str = "leaky_relu",
        negative_slope: float = 0.2,
        num_class_embeds: int | None = None,
        class_names: list[str] | None = None,
        use_spectral_norm: bool = True,
    ):
        super().__init__()
        validate_class_names(class_names, num_class_embeds)
        check_positive_ints(
            data_dim=data_dim, hidden_dim=hidden_dim, num_layers=num_layers, embedding_dim=embedding_dim
        )
        self.act = _activation(act_fn, negative_slope)
        self.embedding = ConditionEmbedding(
            hidden_dim, embedding_dim, num_class_embeds, negative_slope, use_spectral_norm
        )
        self.linear_in = maybe_spectral_norm(nn.Linear(data_dim, hidden_dim), use_spectral_norm)
        self.layers = nn.ModuleList(
            EnergyResidualLayer(hidden_dim, embedding_dim, self.act, use_spectral_norm) for _ in range(num_layers)
        )
        self.readout = nn.Linear(hidden_dim, 1, bias=False)

    def embed_condition(self, logsnr: torch.Tensor, class_labels: torch.Tensor | None = None) -> EnergyMLPCondition:
        """Each layer's embedding term: the (log-SNR, class) part of f_hat (``EnergyModel.embed_condition``)."""
        logsnr, class_labels = condition_inputs(logsnr, class_labels, self.config.num_class_embeds)
        embedding = self.act(self.embedding(logsnr, class_labels))
        return EnergyMLPCondition(block_biases=tuple(layer.embedding_bias(embedding) for layer in self.layers))

    def forward(
        self,
        sample: torch.Tensor,
        logsnr: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        condition: EnergyMLPCondition | None = None,
    ) -> EnergyModelOutput | tuple[torch.Tensor]:
        """f_hat(sample; logsnr, class) for vectors ``sample`` of shape (batch, data_dim) in the chain space y_t.

        The other arguments are those of ``EnergyModel.forward``.
        """
        check_sample(sample, (self.config.data_dim,))
        logsnr, class_labels = prepare_condition(sample, logsnr, class_labels, self.config.num_class_embeds)
        if condition is None:
            condition = self.embed_condition(logsnr, class_labels)
        elif not isinstance(condition, EnergyMLPCondition):
            raise TypeError(f"`condition` must come from `embed_condition`, got {type(condition).__name__}.")
        hidden = self.linear_in(sample)
        for layer, bias in zip(self.layers, condition.block_biases):
            hidden = layer(hidden, bias)
        neg_energy = self.readout(torch.relu(hidden)).squeeze(1)
        if not return_dict:
            return (neg_energy,)
        return EnergyModelOutput(neg_energy=neg_energy)


class InitializerMLP(SafeLoadingMixin, ModelMixin, ConfigMixin):
    r"""g_phi(x_{t+1}; lambda_{t+1}) for vectors: x + MLP(x, embedding), the last layer zero-initialised (Eq. 6).

    Args:
        data_dim: dimension of the data vectors.
        hidden_dim: width of the hidden layers.
        num_layers: number of hidden layers.
        num_class_embeds: classes of a conditional model (``None``: unconditional); index ``num_class_embeds`` is
            the null class.
    """

    @register_to_config
    def __init__(
        self, data_dim: int = 2, hidden_dim: int = 256, num_layers: int = 3, num_class_embeds: int | None = None
    ):
        super().__init__()
        check_positive_ints(data_dim=data_dim, hidden_dim=hidden_dim, num_layers=num_layers)
        check_positive_int(num_class_embeds, "num_class_embeds", allow_none=True)
        self.sinusoidal = Timesteps(hidden_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden_dim, hidden_dim)
        self.class_embedding = None
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds + 1, hidden_dim)
        self.linear_in = nn.Linear(data_dim, hidden_dim)
        self.hidden = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers - 1))
        self.act = nn.SiLU()
        self.linear_out = nn.Linear(hidden_dim, data_dim)
        nn.init.zeros_(self.linear_out.weight)
        nn.init.zeros_(self.linear_out.bias)

    def forward(
        self,
        sample: torch.Tensor,
        logsnr: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> InitializerOutput | tuple[torch.Tensor]:
        """g_phi(sample; logsnr, class) for ``sample`` of shape (batch, data_dim)."""
        check_sample(sample, (self.config.data_dim,))
        num_class_embeds = self.config.num_class_embeds
        logsnr, class_labels = prepare_condition(sample, logsnr, class_labels, num_class_embeds)
        embedding = self.time_embedding(self.sinusoidal(logsnr).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full_like(logsnr, num_class_embeds, dtype=torch.long)
            embedding = embedding + self.class_embedding(class_labels)
        hidden = self.act(self.linear_in(sample) + embedding)
        for layer in self.hidden:
            hidden = self.act(layer(hidden))
        proposal = sample + self.linear_out(hidden)
        if not return_dict:
            return (proposal,)
        return InitializerOutput(sample=proposal)
