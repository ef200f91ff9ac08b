"""benchmarks/diffusion_baseline.py: a tiny UNet2DModel trained under a step or time budget, guided DDIM sampling."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

_spec = importlib.util.spec_from_file_location(
    "diffusion_baseline", Path(__file__).parents[1] / "benchmarks" / "diffusion_baseline.py"
)
baseline = sys.modules["diffusion_baseline"] = importlib.util.module_from_spec(_spec)  # for its dataclass
_spec.loader.exec_module(baseline)

SIZE, CLASSES = 8, 3


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return baseline.build_unet(SIZE, 1, CLASSES, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def tiny_data(count: int = 12):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 1, SIZE, SIZE, generator=generator) * 2 - 1, torch.arange(count) % CLASSES


def test_unet_has_a_null_class():
    model = tiny_unet()
    assert model.config.num_class_embeds == CLASSES + 1 and baseline.null_label(model) == CLASSES


def test_training_stops_at_its_step_or_time_limit():
    images, labels = tiny_data()
    model = tiny_unet()
    before = [param.detach().clone() for param in model.parameters()]
    ema, record = baseline.train_with_budget(
        model, DDPMScheduler(), images, labels, seconds=60.0, max_steps=3, batch_size=4, warmup_steps=1
    )
    assert record.steps == 3 and len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses)
    assert record.seconds < 60.0
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))  # it learned
    assert not ema.training and ema is not model
    _, timed = baseline.train_with_budget(tiny_unet(), DDPMScheduler(), images, labels, seconds=0.3, batch_size=4)
    assert timed.steps >= 1 and 0.3 <= timed.seconds < 10.0  # stopped by the clock, within one step of it


def test_train_baseline_is_seeded_and_describes_its_run():
    images, labels = tiny_data()
    runs = [baseline.train_baseline(images, labels, CLASSES, 60.0, max_steps=2, batch_size=4) for _ in range(2)]
    first, second = runs
    assert first.record.losses == second.record.losses and first.record.steps == 2
    for old, new in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(old, new)
    assert first.model.config.num_class_embeds == CLASSES + 1 and first.model.config.in_channels == 1
    assert first.ddim.config.num_train_timesteps == baseline.BASELINE_TRAIN_TIMESTEPS
    description = first.description
    assert description["train_steps"] == 2 and description["parameters"] == first.model.num_parameters()
    assert description["training"]["batch_size"] == 4 and description["training"]["budget_seconds"] == 60.0
    assert description["final_loss_mean_last_100"] == pytest.approx(sum(first.record.losses) / 2)


def test_guided_noise_prediction_is_the_papers_mixing():
    model = tiny_unet().eval()
    sample = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels, timestep = torch.tensor([0, 1, 2, 0]), torch.tensor(500)
    with torch.no_grad():
        conditional = model(sample, timestep, class_labels=labels).sample
        unconditional = model(sample, timestep, class_labels=torch.full_like(labels, CLASSES)).sample
    guided = baseline.guided_noise_prediction(model, sample, timestep, labels, guidance_scale=2.0)
    torch.testing.assert_close(guided, 3.0 * conditional - 2.0 * unconditional)
    assert torch.equal(baseline.guided_noise_prediction(model, sample, timestep, labels, 0.0), conditional)


def test_ddim_sampling_shape_range_determinism_and_w0():
    model = tiny_unet().eval()
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    labels = torch.tensor([0, 1, 2, 1])
    latents = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    def sample(guidance_scale):
        return baseline.ddim_sample(model, scheduler, latents, labels, guidance_scale, num_inference_steps=5)

    guided = sample(1.0)
    assert guided.shape == latents.shape and guided.min() >= -1 and guided.max() <= 1
    assert torch.equal(guided, sample(1.0))  # deterministic given the seeded initial noise
    unguided = sample(0.0)
    with torch.no_grad():  # w = 0 is the conditional model alone: the null class's embedding plays no part
        model.class_embedding.weight[CLASSES].add_(1.0)
    assert torch.equal(sample(0.0), unguided)
    assert not torch.allclose(sample(1.0), guided)


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_ddim_sampling_does_not_depend_on_batching(guidance_scale):
    model = tiny_unet().eval()
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    labels = torch.tensor([0, 1, 2, 1])
    latents = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    whole = baseline.ddim_sample(model, scheduler, latents, labels, guidance_scale, num_inference_steps=3)
    halves = [
        baseline.ddim_sample(model, scheduler, latents[part], labels[part], guidance_scale, num_inference_steps=3)
        for part in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(torch.cat(halves), whole)
