"""CDRLPipeline: outputs, determinism, guidance, callbacks, save/load with a model card, and bad input."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SIZE
from huggingface_hub import ModelCard

from cdrl_diffusers import CDRLPipeline, CDRLSampler, ConditionWeights


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_types(pipeline, output_type):
    images = pipeline(batch_size=2, output_type=output_type, generator=torch.manual_seed(0)).images
    if output_type == "pil":
        assert len(images) == 2 and all(isinstance(image, PIL.Image.Image) for image in images)
        assert images[0].size == (TINY_SIZE, TINY_SIZE)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (2, TINY_SIZE, TINY_SIZE, 3)
        assert images.min() >= 0 and images.max() <= 1
    else:
        assert isinstance(images, torch.Tensor) and images.shape == (2, 3, TINY_SIZE, TINY_SIZE)
        assert images.min() >= 0 and images.max() <= 1


def test_return_dict_false(pipeline):
    output = pipeline(output_type="np", return_dict=False, generator=torch.manual_seed(0))
    assert isinstance(output, tuple) and output[0].shape == (1, TINY_SIZE, TINY_SIZE, 3)


def test_generator_makes_results_reproducible(pipeline):
    first, second = generate(pipeline, seed=1, batch_size=2), generate(pipeline, seed=1, batch_size=2)
    assert torch.equal(first, second)
    assert not torch.allclose(first, generate(pipeline, seed=2, batch_size=2))


def test_per_sample_generators(pipeline):
    generators = [torch.Generator().manual_seed(seed) for seed in (4, 5)]
    batched = pipeline(batch_size=2, generator=generators, output_type="pt").images
    assert batched.shape[0] == 2
    assert not torch.allclose(batched[0], batched[1])


def test_latents_are_used(pipeline):
    latents = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    first = generate(pipeline, seed=0, batch_size=2, latents=latents)
    second = generate(pipeline, seed=0, batch_size=2, latents=latents + 1)
    assert not torch.allclose(first, second)


def test_no_gradients_or_graph_after_sampling(pipeline):
    for param in pipeline.energy_model.parameters():
        param.requires_grad_(True)
    images = generate(pipeline, batch_size=2)
    assert images.grad_fn is None and not images.requires_grad
    assert all(p.grad is None for p in pipeline.energy_model.parameters())
    assert all(p.requires_grad for p in pipeline.energy_model.parameters())  # restored


def test_sampling_adjustment_changes_the_chain(pipeline):
    default = generate(pipeline, batch_size=1)
    assert torch.equal(default, generate(pipeline, batch_size=1, num_langevin_steps=3))  # K' = K
    assert not torch.allclose(default, generate(pipeline, batch_size=1, num_langevin_steps=1))


def test_class_conditional_sampling(conditional_pipeline):
    by_name = generate(conditional_pipeline, batch_size=2, class_labels="square", guidance_scale=0.7)
    by_id = generate(conditional_pipeline, batch_size=2, class_labels=[1], guidance_scale=0.7)
    assert torch.equal(by_name, by_id)
    assert not torch.allclose(by_id, generate(conditional_pipeline, batch_size=2, class_labels=2, guidance_scale=0.7))
    assert generate(conditional_pipeline, class_labels=["circle", "square", 2]).shape[0] == 3
    assert generate(conditional_pipeline, batch_size=3).shape[0] == 3  # labels drawn with the generator
    unguided = generate(conditional_pipeline, class_labels=1)
    assert not torch.allclose(unguided, generate(conditional_pipeline, class_labels=1, guidance_scale=2.0))


def test_callback_on_step_end_sees_every_level_and_can_replace_latents(pipeline):
    seen = []

    def callback(pipe, index, timestep, callback_kwargs):
        seen.append((index, timestep, callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if index == 5 else {}

    images = generate(pipeline, batch_size=2, callback_on_step_end=callback)
    assert [(i, t) for i, t, _ in seen] == [(i, 5 - i) for i in range(6)]
    assert all(shape == (2, 3, TINY_SIZE, TINY_SIZE) for _, _, shape in seen)
    # x_0 was replaced by zeros, so the output is the Tweedie step (Eq. 18) applied to an all-zero image.
    sampler = CDRLSampler(
        pipeline.energy_model,
        pipeline.initializer,
        pipeline.scheduler,
        ConditionWeights.unconditional(),
        ConditionWeights.unconditional(),
        batch_size=2,
        device=torch.device("cpu"),
    )
    expected = (sampler.denoise(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE)) + 1) / 2
    torch.testing.assert_close(images, expected)


def test_save_load_round_trip_with_model_card(tmp_path, conditional_pipeline):
    conditional_pipeline.save_pretrained(tmp_path)
    for name in ("model_index.json", "README.md", "scheduler/scheduler_config.json"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "energy_model" / "diffusion_pytorch_model.safetensors").exists()
    loaded = CDRLPipeline.from_pretrained(tmp_path)
    kwargs = {"batch_size": 2, "class_labels": "triangle", "guidance_scale": 1.0}
    assert torch.equal(generate(loaded, **kwargs), generate(conditional_pipeline, **kwargs))
    images = torch.rand(3, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
    torch.testing.assert_close(loaded.log_density(images), conditional_pipeline.log_density(images))

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "cdrl_diffusers" and "diffusers" in card.data.tags
    assert card.data.pipeline_tag is None  # class-conditional: no Hub task fits (tests/test_model_card.py)
    assert {"cdrl_diffusers", "energy-based-model"} <= set(card.data.tags)
    assert "CDRLPipeline.from_pretrained" in card.text
    assert "@inproceedings{zhu2024cdrl" in card.text


def test_custom_model_card(tmp_path, pipeline):
    card = pipeline.create_model_card(
        dataset_name="shapes", training_details={"steps": 10}, evaluation={"FD": 1.5}, sample_grid="samples.png"
    )
    pipeline.save_pretrained(tmp_path, model_card=card)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.datasets is None  # a name, not a Hub dataset id
    assert "| steps | 10 |" in loaded.text and "| FD | 1.5 |" in loaded.text and "samples.png" in loaded.text


def test_log_density(pipeline):
    images = torch.rand(5, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
    scores = pipeline.log_density(images)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    # Independent of batching and of the other images in the batch.
    torch.testing.assert_close(pipeline.log_density(images, batch_size=2), scores)
    torch.testing.assert_close(pipeline.log_density(images[2:4]), scores[2:4])
    # The score is f_hat / s_t^2 at input_scale_t x.
    scheduler = pipeline.scheduler
    with torch.no_grad():
        f_hat = pipeline.energy_model(images * scheduler.input_scale[1], scheduler.logsnr[1]).neg_energy
    torch.testing.assert_close(
        pipeline.log_density(images, noise_level=1), f_hat / scheduler.langevin_step_size[1] ** 2
    )
    # PIL images and numpy arrays in [0, 1] give the same scores as tensors in [-1, 1].
    array = ((images[0].permute(1, 2, 0) + 1) / 2).numpy()
    torch.testing.assert_close(pipeline.log_density(array), scores[:1], rtol=1e-4, atol=1e-2)
    pil = PIL.Image.fromarray((array * 255).round().astype(np.uint8))
    assert pipeline.log_density([pil, pil]).shape == (2,)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
        ({"num_langevin_steps": 0}, ValueError, "num_langevin_steps"),
        ({"num_langevin_steps": -2}, ValueError, "num_langevin_steps"),
        ({"guidance_scale": 1.0}, ValueError, "unconditional"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"guidance_scale": "strong"}, TypeError, "guidance_scale"),
        ({"class_labels": 0}, ValueError, "unconditional"),
        ({"output_type": "latent"}, ValueError, "output_type"),
        ({"latents": torch.randn(1, 1, TINY_SIZE, TINY_SIZE)}, ValueError, "latents"),
        ({"batch_size": 2, "generator": [torch.Generator()]}, ValueError, "generators"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_sampling_arguments(pipeline, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipeline(**kwargs)


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (3, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        ("hexagon", ValueError, "Unknown class name"),
        ([0, 1], ValueError, "batch_size"),
        ([], ValueError, "empty"),
        (1.5, TypeError, "class label"),
    ],
)
def test_bad_class_labels(conditional_pipeline, labels, error, message):
    with pytest.raises(error, match=message):
        conditional_pipeline(batch_size=3, class_labels=labels)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.rand(2, 1, TINY_SIZE, TINY_SIZE), ValueError, "shape"),
        (torch.rand(2, 3, 16, 16), ValueError, "shape"),
        (torch.full((1, 3, TINY_SIZE, TINY_SIZE), float("nan")), ValueError, "NaN"),
        (torch.zeros(0, 3, TINY_SIZE, TINY_SIZE), ValueError, "shape|empty"),
        (torch.zeros(1, 3, TINY_SIZE, TINY_SIZE, dtype=torch.long), TypeError, "floating"),
        ("image.png", TypeError, "PIL images"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_log_density_inputs(pipeline, images, error, message):
    with pytest.raises(error, match=message):
        pipeline.log_density(images)


def test_bad_noise_level(pipeline):
    with pytest.raises(ValueError, match="noise_level"):
        pipeline.log_density(torch.zeros(1, 3, TINY_SIZE, TINY_SIZE), noise_level=6)
