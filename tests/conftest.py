"""Tiny models and helpers shared by the tests: every test runs in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from cdrl_diffusers import (
    CDRLPipeline,
    CDRLScheduler,
    EnergyModel,
    EnergyModelOutput,
    InitializerOutput,
    InitializerUNet,
)

torch.set_num_threads(2)

TINY_SIZE = 8


def tiny_energy_model(num_class_embeds: int | None = None, class_names: list[str] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = EnergyModel(
        sample_size=TINY_SIZE,
        in_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        embedding_dim=16,
        num_class_embeds=num_class_embeds,
        class_names=class_names,
    )
    # Non-zero residual scales, so every layer of the tiny model matters in the tests.
    with torch.no_grad():
        for block in model.blocks:
            block.residual_scale.fill_(0.5)
    return model.eval()


def tiny_initializer(num_class_embeds: int | None = None, seed: int = 1):
    torch.manual_seed(seed)
    model = InitializerUNet(
        sample_size=TINY_SIZE,
        in_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        attention_resolutions=(4,),
        attention_head_dim=4,
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )
    with torch.no_grad():  # a non-identity initializer, so proposals depend on the network
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    return model.eval()


def tiny_pipeline(num_class_embeds: int | None = None, class_names: list[str] | None = None, **scheduler_kwargs):
    scheduler_kwargs.setdefault("num_langevin_steps", 3)
    return CDRLPipeline(
        energy_model=tiny_energy_model(num_class_embeds, class_names),
        initializer=tiny_initializer(num_class_embeds),
        scheduler=CDRLScheduler(**scheduler_kwargs),
    )


class QuadraticEnergy(ModelMixin, ConfigMixin):
    """f_hat(y; lambda, c) = -0.5 * a * ||y - mean_c||^2 with a known gradient -a (y - mean_c), for exact tests."""

    @register_to_config
    def __init__(self, data_dim: int = 4, curvature: float = 2.0, num_class_embeds: int | None = None):
        super().__init__()
        rows = 1 if num_class_embeds is None else num_class_embeds + 1
        self.means = torch.nn.Parameter(torch.arange(rows * data_dim, dtype=torch.float32).view(rows, data_dim) / 10)

    def embed_condition(self, logsnr, class_labels=None):
        return None  # nothing of f_hat depends on (log-SNR, class) alone

    def mean_of(self, class_labels):
        if class_labels is None:
            return self.means[-1]
        return self.means[class_labels]

    def forward(self, sample, logsnr, class_labels=None, return_dict=True):
        diff = sample - self.mean_of(class_labels)
        return EnergyModelOutput(neg_energy=-0.5 * self.config.curvature * diff.pow(2).sum(dim=1))


class ShiftInitializer(ModelMixin, ConfigMixin):
    """g(x; lambda, c) = x + shift_c, a known initializer for vectors."""

    @register_to_config
    def __init__(self, data_dim: int = 4, num_class_embeds: int | None = None):
        super().__init__()
        rows = 1 if num_class_embeds is None else num_class_embeds + 1
        self.shifts = torch.nn.Parameter(torch.linspace(-1, 1, rows * data_dim).view(rows, data_dim))

    def forward(self, sample, logsnr, class_labels=None, return_dict=True):
        shift = self.shifts[-1] if class_labels is None else self.shifts[class_labels]
        return InitializerOutput(sample=sample + shift)


class QuadraticImageEnergy(ModelMixin, ConfigMixin):
    """f_hat(y; lambda, c) = -0.5 * a * ||y - mean_c||^2 for images, each class mean a constant image (exact tests)."""

    @register_to_config
    def __init__(
        self,
        class_means: tuple[float, ...] = (0.0,),
        curvature: float = 0.2,
        sample_size: int = TINY_SIZE,
        in_channels: int = 3,
        num_class_embeds: int | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        # One mean per class, the last one for the null class (unconditional term).
        self.means = torch.nn.Parameter(torch.tensor(class_means, dtype=torch.float32))

    def embed_condition(self, logsnr, class_labels=None):
        return None  # nothing of f_hat depends on (log-SNR, class) alone

    def forward(self, sample, logsnr, class_labels=None, return_dict=True):
        mean = self.means[-1] if class_labels is None else self.means[class_labels].view(-1, 1, 1, 1)
        diff = sample - mean
        return EnergyModelOutput(neg_energy=-0.5 * self.config.curvature * diff.pow(2).sum(dim=(1, 2, 3)))


@pytest.fixture
def scheduler():
    return CDRLScheduler()


@pytest.fixture
def pipeline():
    return tiny_pipeline()


@pytest.fixture
def conditional_pipeline():
    return tiny_pipeline(num_class_embeds=3, class_names=["circle", "square", "triangle"])
