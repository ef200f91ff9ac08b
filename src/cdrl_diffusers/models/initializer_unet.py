"""The CDRL initializer for images: a diffusers UNet with a residual output (Sec. 3.2, App. A.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.utils import BaseOutput

from ..validation import check_channels, check_positive_int, check_positive_ints, check_sample
from .embeddings import ClassEmbedding, logsnr_to_timestep, prepare_condition
from .loading import ArchitectureCheckingMixin


@dataclass
class InitializerOutput(BaseOutput):
    """Output of an initializer.

    Args:
        sample: g_phi(x_{t+1}), the mean of the proposal for y_t, shaped like the input (Eq. 6).
    """

    sample: torch.Tensor


class InitializerUNet(ArchitectureCheckingMixin, ModelMixin, ConfigMixin):
    r"""g_phi(x_{t+1}; lambda_{t+1}): proposes the alpha-scaled sample y_t directly (Eq. 6, App. A.1).

    The improved-DDPM UNet of Nichol & Dhariwal (2021) with halved channels, built from diffusers' ``UNet2DModel``:
    residual blocks with scale-shift normalisation of the time embedding, resampling inside residual blocks (average
    pooling down, nearest-neighbour up), self-attention with one head by default, group normalisation with eps 1e-6,
    and ``layers_per_block`` blocks per resolution on the way down (one more on the way up). The defaults are the
    paper's 32x32 CIFAR-10 initializer (64 channels at 32, 16 and 8 pixels, 3 blocks per resolution, attention at 16
    and 8, dropout 0.1; 3,769,795 parameters); the ImageNet 32x32 one has 2 blocks per resolution and 1000 classes
    (3,181,443 parameters). The log-SNR enters as ``logsnr_to_timestep`` into sinusoidal features of
    ``block_out_channels[0]`` entries, a class label as ``ClassEmbedding`` (a dense map of its one-hot vector) added
    to the time embedding. The output is residual, g = x + UNet(x); the UNet's last convolution, the second
    convolution of every residual block and the output projection of every attention start at zero (as in the
    authors' code), so a new initializer proposes its input unchanged. These are the authors' networks layer for
    layer: ``cdrl_diffusers.conversion`` loads their released checkpoints.

    Args:
        sample_size: height and width of the inputs.
        in_channels: image channels.
        block_out_channels: channels per resolution.
        layers_per_block: residual blocks per resolution on the way down.
        attention_resolutions: resolutions (in pixels) whose blocks get self-attention (the middle block always has
            it).
        dropout: dropout rate inside the residual blocks.
        attention_head_dim: channels per attention head; ``None`` gives one head per attention, as in the paper.
        norm_num_groups: groups of the group normalisations (must divide every entry of ``block_out_channels``).
        num_class_embeds: number of classes of a conditional model (``None``: unconditional). Label
            ``num_class_embeds`` is the null class used when ``class_labels`` is ``None``.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64, 64, 64),
        layers_per_block: int = 3,
        attention_resolutions: tuple[int, ...] = (16, 8),
        dropout: float = 0.1,
        attention_head_dim: int | None = None,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
    ):
        super().__init__()
        check_positive_ints(
            sample_size=sample_size,
            in_channels=in_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
        )
        check_channels(block_out_channels)
        check_positive_int(num_class_embeds, "num_class_embeds", allow_none=True)
        check_positive_int(attention_head_dim, "attention_head_dim", allow_none=True)
        if any(channels % norm_num_groups for channels in block_out_channels):
            raise ValueError(
                f"`norm_num_groups` ({norm_num_groups}) must divide every entry of `block_out_channels` "
                f"{tuple(block_out_channels)}."
            )
        if attention_head_dim is not None and any(channels % attention_head_dim for channels in block_out_channels):
            raise ValueError(
                f"`attention_head_dim` ({attention_head_dim}) must divide every entry of `block_out_channels` "
                f"{tuple(block_out_channels)} (or be None for one attention head)."
            )
        downsampling = 2 ** (len(block_out_channels) - 1)
        if sample_size % downsampling:
            raise ValueError(
                f"`sample_size` ({sample_size}) must be divisible by {downsampling} for {len(block_out_channels)} "
                "resolutions."
            )
        resolutions = [sample_size // 2**level for level in range(len(block_out_channels))]
        with_attention = [resolution in attention_resolutions for resolution in resolutions]
        down_types = ["AttnDownBlock2D" if attention else "ResnetDownsampleBlock2D" for attention in with_attention]
        up_types = ["AttnUpBlock2D" if attention else "ResnetUpsampleBlock2D" for attention in with_attention]
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            freq_shift=1,
            flip_sin_to_cos=False,
            down_block_types=tuple(down_types),
            up_block_types=tuple(reversed(up_types)),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            downsample_type="resnet",
            upsample_type="resnet",
            dropout=dropout,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=norm_num_groups,
            norm_eps=1e-6,
            resnet_time_scale_shift="scale_shift",
        )
        if num_class_embeds is not None:
            self.unet.class_embedding = ClassEmbedding(num_class_embeds, 4 * block_out_channels[0])
        for module in self.unet.modules():
            if isinstance(module, ResnetBlock2D):
                torch.nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, Attention):
                torch.nn.init.zeros_(module.to_out[0].weight)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)

    def forward(
        self,
        sample: torch.Tensor,
        logsnr: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> InitializerOutput | tuple[torch.Tensor]:
        """g_phi(sample; logsnr, class) = sample + UNet(sample).

        Args:
            sample: x_{t+1} of shape (batch, in_channels, sample_size, sample_size).
            logsnr: lambda_{t+1}, a float or a tensor of shape (batch,).
            class_labels: integer labels of shape (batch,) for conditional models; ``None`` is the null class.
            return_dict: return an ``InitializerOutput`` rather than a tuple.
        """
        size = self.config.sample_size
        check_sample(sample, (self.config.in_channels, size, size))
        num_class_embeds = self.config.num_class_embeds
        logsnr, class_labels = prepare_condition(sample, logsnr, class_labels, num_class_embeds)
        if num_class_embeds is not None and class_labels is None:
            class_labels = torch.full_like(logsnr, num_class_embeds, dtype=torch.long)
        proposal = sample + self.unet(sample, logsnr_to_timestep(logsnr), class_labels=class_labels).sample
        if not return_dict:
            return (proposal,)
        return InitializerOutput(sample=proposal)
