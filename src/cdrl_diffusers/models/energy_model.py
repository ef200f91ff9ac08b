"""The CDRL energy-based model for images (App. A.1, Tables 5-6; the EBM of Gao et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..validation import check_channels, check_positive_int, check_positive_ints, check_sample
from .embeddings import ConditionEmbedding, condition_inputs, maybe_spectral_norm, prepare_condition
from .loading import ArchitectureCheckingMixin


@dataclass
class EnergyModelOutput(BaseOutput):
    """Output of an energy model.

    Args:
        neg_energy: f_hat(y; lambda) of shape (batch,), the network's negative energy (higher = more probable). The
            level's log-density is f_hat / s_t^2 (``CDRLScheduler.log_density``).
    """

    neg_energy: torch.Tensor


def validate_class_names(class_names: list[str] | None, num_class_embeds: int | None) -> None:
    """Class names, when given, name every class of a conditional model exactly once."""
    check_positive_int(num_class_embeds, "num_class_embeds", allow_none=True)
    if class_names is None:
        return
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(name, str) for name in class_names):
        raise TypeError(f"`class_names` must be a list of strings, got {class_names!r}.")
    if num_class_embeds is None or len(class_names) != num_class_embeds:
        raise ValueError(
            f"`class_names` must name each of the `num_class_embeds` ({num_class_embeds}) classes, "
            f"got {len(class_names)} names."
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError("`class_names` must be unique.")


class EnergyCondition(NamedTuple):
    """The part of f_hat that depends on (log-SNR, class) alone (``EnergyModel.embed_condition``).

    Args:
        block_biases: each residual block's embedding term, of shape (batch, channels).
        readout: the weights of the log-SNR dependent readout, of shape (batch, channels).
    """

    block_biases: tuple[torch.Tensor, ...]
    readout: torch.Tensor


class EnergyResBlock(nn.Module):
    """LeakyReLU, 3x3 conv, + embedding term, LeakyReLU, 3x3 conv, x scale, + shortcut (Table 5a).

    The embedding term is LeakyReLU(dense(LeakyReLU(embedding))); the shortcut is a 3x3 convolution when the number
    of channels changes, the identity otherwise; the per-channel ``residual_scale`` (not spectrally normalised)
    starts at one. These are the details of the authors' EBM, so its weights load unchanged. The scale is applied
    to the second convolution's (normalised) weights rather than to its output: the same function, one pass over
    the activations fewer in the forward and in the backward pass.

    With ``gradient_checkpointing`` (set by ``EnergyModel.enable_gradient_checkpointing``) a training-mode forward
    keeps only the block's input for the backward pass and recomputes the rest. The spectrally normalised weights
    are computed once, outside the recomputed region, so recomputation sees exactly the weights of the forward pass.
    """

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, negative_slope: float, use_spectral_norm: bool
    ):
        super().__init__()
        self.act = nn.LeakyReLU(negative_slope)
        self.conv1 = maybe_spectral_norm(nn.Conv2d(in_channels, out_channels, 3, padding=1), use_spectral_norm)
        self.embedding_proj = maybe_spectral_norm(nn.Linear(embedding_dim, out_channels), use_spectral_norm)
        self.conv2 = maybe_spectral_norm(nn.Conv2d(out_channels, out_channels, 3, padding=1), use_spectral_norm)
        self.residual_scale = nn.Parameter(torch.ones(out_channels))
        self.shortcut = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = maybe_spectral_norm(nn.Conv2d(in_channels, out_channels, 3, padding=1), use_spectral_norm)
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor, embedding_bias: torch.Tensor) -> torch.Tensor:
        """The block on ``hidden`` with the ``embedding_bias(embedding)`` term of shape (batch, channels)."""
        scale = self.residual_scale
        weights = [
            self.conv1.weight,
            self.conv1.bias,
            self.conv2.weight * scale[:, None, None, None],
            self.conv2.bias * scale,
        ]
        if not isinstance(self.shortcut, nn.Identity):
            weights += [self.shortcut.weight, self.shortcut.bias]
        bias = embedding_bias[:, :, None, None]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(_residual_block, hidden, bias, self.act.negative_slope, *weights, use_reentrant=False)
        return _residual_block(hidden, bias, self.act.negative_slope, *weights)

    def embedding_bias(self, embedding: torch.Tensor) -> torch.Tensor:
        """LeakyReLU(dense(embedding)) for an already activated ``embedding`` of shape (batch, embedding_dim)."""
        return self.act(self.embedding_proj(embedding))


def _residual_block(
    hidden: torch.Tensor,
    bias: torch.Tensor,
    negative_slope: float,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    shortcut_weight: torch.Tensor | None = None,
    shortcut_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``EnergyResBlock.forward`` on explicit weights (the scale folded into conv2), as checkpointing recomputes it."""
    residual = F.conv2d(F.leaky_relu(hidden, negative_slope), conv1_weight, conv1_bias, padding=1) + bias
    residual = F.conv2d(F.leaky_relu(residual, negative_slope), conv2_weight, conv2_bias, padding=1)
    if shortcut_weight is not None:
        hidden = F.conv2d(hidden, shortcut_weight, shortcut_bias, padding=1)
    return hidden + residual


class EnergyModel(ArchitectureCheckingMixin, ModelMixin, ConfigMixin):
    r"""The negative energy f_hat(y; lambda) of one CDRL level, for images.

    Defaults are the paper's 32x32 EBM (App. A.1, Table 6; 34,833,152 parameters): a 3x3 conv to 128 channels, four
    resolutions with channels (128, 256, 256, 256) and 8 residual blocks each, 2x2 average pooling between
    resolutions, LeakyReLU 0.2, then ReLU, a spatial sum and a bias-free readout whose weights depend on the log-SNR:
    f_hat = sum_c h_c w_c(lambda, class), w = dense(LeakyReLU(embedding)). Spectral normalisation
    (``torch.nn.utils.parametrizations.spectral_norm``) wraps every conv and dense layer except that readout and the
    per-block scales. The log-SNR (not the level index) conditions the network (App. A.3, ``logsnr_to_timestep``);
    the sinusoidal features have ``block_out_channels[0]`` entries. These are the authors' networks layer for layer:
    ``cdrl_diffusers.conversion`` loads their released checkpoints.

    Args:
        sample_size: height and width of the inputs.
        in_channels: image channels.
        block_out_channels: channels per resolution; the resolution halves between consecutive entries.
        layers_per_block: residual blocks per resolution (N in Table 6).
        embedding_dim: width of the log-SNR/class embedding (512 in the paper, four times the first width).
        negative_slope: slope of the LeakyReLU activations.
        num_class_embeds: number of classes of a conditional model (``None``: unconditional). Label
            ``num_class_embeds`` is the null class used when ``class_labels`` is ``None``. The 1000-class model has
            35,346,176 parameters.
        class_names: optional names of the classes, so pipelines accept ``class_labels=["cat"]``.
        use_spectral_norm: apply spectral normalisation (the paper always does).

    ``enable_gradient_checkpointing()`` (diffusers' API) trades compute for memory in training: each residual block
    keeps only its input for the backward pass. It never applies in eval mode, so Langevin sampling is unaffected.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 256),
        layers_per_block: int = 8,
        embedding_dim: int = 512,
        negative_slope: float = 0.2,
        num_class_embeds: int | None = None,
        class_names: list[str] | None = None,
        use_spectral_norm: bool = True,
    ):
        super().__init__()
        check_positive_ints(
            sample_size=sample_size,
            in_channels=in_channels,
            layers_per_block=layers_per_block,
            embedding_dim=embedding_dim,
        )
        check_channels(block_out_channels)
        downsampling = 2 ** (len(block_out_channels) - 1)
        if sample_size % downsampling:
            raise ValueError(
                f"`sample_size` ({sample_size}) must be divisible by {downsampling} for {len(block_out_channels)} "
                "resolutions."
            )
        validate_class_names(class_names, num_class_embeds)

        self.embedding = ConditionEmbedding(
            block_out_channels[0], embedding_dim, num_class_embeds, negative_slope, use_spectral_norm
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.conv_in = maybe_spectral_norm(
            nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1), use_spectral_norm
        )
        self.blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for out_channels in block_out_channels:
            for _ in range(layers_per_block):
                self.blocks.append(
                    EnergyResBlock(channels, out_channels, embedding_dim, negative_slope, use_spectral_norm)
                )
                channels = out_channels
        self.readout = nn.Linear(embedding_dim, block_out_channels[-1], bias=False)

    def embed_condition(self, logsnr: torch.Tensor, class_labels: torch.Tensor | None = None) -> EnergyCondition:
        """Everything in f_hat that depends on (log-SNR, class) alone: each block's embedding bias and the readout.

        Langevin sampling computes it once per level and passes it to the K forward passes as ``condition``.

        Args:
            logsnr: lambda_t of shape (batch,).
            class_labels: integer labels of shape (batch,) for conditional models; ``None`` is the null class.
        """
        logsnr, class_labels = condition_inputs(logsnr, class_labels, self.config.num_class_embeds)
        embedding = self.act(self.embedding(logsnr, class_labels))
        return EnergyCondition(
            block_biases=tuple(block.embedding_bias(embedding) for block in self.blocks),
            readout=self.readout(embedding),
        )

    def forward(
        self,
        sample: torch.Tensor,
        logsnr: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        condition: EnergyCondition | None = None,
    ) -> EnergyModelOutput | tuple[torch.Tensor]:
        """f_hat(sample; logsnr, class).

        Args:
            sample: images of shape (batch, in_channels, sample_size, sample_size), in the chain space y_t.
            logsnr: lambda_t, a float or a tensor of shape (batch,).
            class_labels: integer labels of shape (batch,) for conditional models; ``None`` is the null class.
            return_dict: return an ``EnergyModelOutput`` rather than a tuple.
            condition: ``embed_condition(logsnr, class_labels)`` for these same inputs, computed once and reused.
        """
        self._check_sample(sample)
        logsnr, class_labels = prepare_condition(sample, logsnr, class_labels, self.config.num_class_embeds)
        if condition is None:
            condition = self.embed_condition(logsnr, class_labels)
        elif not isinstance(condition, EnergyCondition):
            raise TypeError(f"`condition` must come from `embed_condition`, got {type(condition).__name__}.")

        hidden = self.conv_in(sample)
        blocks_per_resolution = self.config.layers_per_block
        for index, (block, bias) in enumerate(zip(self.blocks, condition.block_biases)):
            hidden = block(hidden, bias)
            last_of_resolution = (index + 1) % blocks_per_resolution == 0
            if last_of_resolution and index + 1 < len(self.blocks):
                hidden = F.avg_pool2d(hidden, 2)
        features = F.relu(hidden).sum(dim=(2, 3))
        neg_energy = (features * condition.readout).sum(dim=1)

        if not return_dict:
            return (neg_energy,)
        return EnergyModelOutput(neg_energy=neg_energy)

    def _check_sample(self, sample: torch.Tensor) -> None:
        size = self.config.sample_size
        check_sample(sample, (self.config.in_channels, size, size))
