"""The CDRL initializer for images: a diffusers UNet with a residual output (Sec. 3.2, App. A.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.utils import BaseOutput

from ..hub import SafeLoadingMixin
from ..validation import check_channels, check_positive_int, check_positive_ints, check_sample
from .embeddings import prepare_condition


@dataclass
class InitializerOutput(BaseOutput):
    """Output of an initializer.

    Args:
        sample: g_phi(x_{t+1}), the mean of the proposal for y_t, shaped like the input (Eq. 6).
    """

    sample: torch.Tensor


class InitializerUNet(SafeLoadingMixin, ModelMixin, ConfigMixin):
    r"""g_phi(x_{t+1}; lambda_{t+1}): proposes the alpha-scaled sample y_t directly (Eq. 6, App. A.1).

    A diffusers ``UNet2DModel`` (the improved-DDPM UNet with halved channels: 64 channels at every resolution,
    attention at 16x16 and 8x8, dropout 0.1) conditioned on the log-SNR of its input level, with optional class
    embeddings. The output is residual, g = x + UNet(x), with the UNet's last convolution zero-initialised, so a new
    initializer proposes its input unchanged.

    Args:
        sample_size: height and width of the inputs.
        in_channels: image channels.
        block_out_channels: channels per resolution.
        layers_per_block: residual blocks per resolution.
        attention_resolutions: resolutions (in pixels) whose blocks get self-attention.
        dropout: dropout rate inside the residual blocks.
        attention_head_dim: channels per attention head.
        norm_num_groups: groups of the group normalisations (must divide every entry of ``block_out_channels``).
        num_class_embeds: number of classes of a conditional model (``None``: unconditional). Index
            ``num_class_embeds`` is the null class used when ``class_labels`` is ``None``.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64, 64, 64),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (16, 8),
        dropout: float = 0.1,
        attention_head_dim: int = 8,
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
        if any(channels % norm_num_groups for channels in block_out_channels):
            raise ValueError(
                f"`norm_num_groups` ({norm_num_groups}) must divide every entry of `block_out_channels` "
                f"{tuple(block_out_channels)}."
            )
        downsampling = 2 ** (len(block_out_channels) - 1)
        if sample_size % downsampling:
            raise ValueError(
                f"`sample_size` ({sample_size}) must be divisible by {downsampling} for {len(block_out_channels)} "
                "resolutions."
            )
        resolutions = [sample_size // 2**level for level in range(len(block_out_channels))]
        with_attention = [resolution in attention_resolutions for resolution in resolutions]
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in with_attention),
            up_block_types=tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(with_attention)),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            dropout=dropout,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            num_class_embeds=None if num_class_embeds is None else num_class_embeds + 1,
        )
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
        proposal = sample + self.unet(sample, logsnr, class_labels=class_labels).sample
        if not return_dict:
            return (proposal,)
        return InitializerOutput(sample=proposal)
