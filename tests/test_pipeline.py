"""CDRLPipeline: outputs, determinism, guidance, ablations, callbacks, vector models, save/load and the Hub."""

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SIZE, tiny_energy_model, tiny_initializer
from huggingface_hub import ModelCard

from cdrl_diffusers import CDRLPipeline, CDRLScheduler, ConditionWeights, EnergyMLP, InitializerMLP
from cdrl_diffusers.sampling import CDRLSampler


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


def count_calls(model):
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def test_initializer_alone_runs_the_energy_model_only_for_the_tweedie_step(pipeline):
    energy_calls, initializer_calls = count_calls(pipeline.energy_model), count_calls(pipeline.initializer)
    alone = generate(pipeline, batch_size=2, num_langevin_steps=0)
    assert len(energy_calls) == 1 and len(initializer_calls) == 6  # Eq. 18 once; one proposal per level
    assert not torch.allclose(alone, generate(pipeline, batch_size=2))


def test_langevin_alone_never_calls_the_initializer(pipeline):
    initializer_calls = count_calls(pipeline.initializer)
    alone = generate(pipeline, batch_size=2, use_initializer=False)
    assert initializer_calls == [] and alone.shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert not torch.allclose(alone, generate(pipeline, batch_size=2))


def test_per_level_samples_through_the_callback(pipeline):
    """The callback gets x_t after each level; with 0 Langevin steps, x_t is the proposal made from x_{t+1}."""
    levels = []
    generate(pipeline, batch_size=2, num_langevin_steps=0, callback_on_step_end=lambda *a: levels.append(a[3]) or {})
    assert len(levels) == 6
    scheduler, noise = pipeline.scheduler, torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=noise)
    with torch.no_grad():
        mean = pipeline.initializer(x_T, scheduler.initializer_logsnr(5)).sample
    proposal = scheduler.initializer_proposal(mean, 5, torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=noise))
    torch.testing.assert_close(levels[0]["latents"], scheduler.from_chain_space(proposal, 5))


def test_callback_on_step_end_sees_every_level_and_can_replace_latents(pipeline):
    seen = []

    def callback(pipe, index, timestep, callback_kwargs):
        seen.append((index, timestep, callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if index == 5 else {}

    images = generate(pipeline, batch_size=2, callback_on_step_end=callback)
    assert [(i, t) for i, t, _ in seen] == [(i, 5 - i) for i in range(6)]
    assert all(shape == (2, 3, TINY_SIZE, TINY_SIZE) for _, _, shape in seen)
    # x_0 was replaced by zeros, so the output is the Tweedie step (Eq. 18) applied to an all-zero image.
    terms = ConditionWeights.unconditional().stack(None, 2, torch.device("cpu"))
    sampler = CDRLSampler(pipeline.energy_model, pipeline.initializer, pipeline.scheduler, terms, terms)
    expected = (sampler.denoise(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE)) + 1) / 2
    torch.testing.assert_close(images, expected)


@pytest.mark.parametrize(
    "returned, error, message",
    [
        (torch.zeros(1, 3, TINY_SIZE, TINY_SIZE), ValueError, "shape"),
        (torch.full((2, 3, TINY_SIZE, TINY_SIZE), float("nan")), ValueError, "NaN"),
        (torch.zeros(2, 3, TINY_SIZE, TINY_SIZE, dtype=torch.long), TypeError, "floating"),
        ([0.0], TypeError, "floating"),
    ],
)
def test_callback_latents_are_checked(pipeline, returned, error, message):
    with pytest.raises(error, match=f"callback_on_step_end.*{message}|{message}.*callback_on_step_end"):
        generate(pipeline, batch_size=2, callback_on_step_end=lambda *args: {"latents": returned})


def vector_pipeline():
    torch.manual_seed(0)
    energy = EnergyMLP(data_dim=2, hidden_dim=16, num_layers=1, embedding_dim=16)
    initializer = InitializerMLP(data_dim=2, hidden_dim=16, num_layers=1)
    scheduler = CDRLScheduler(num_noise_levels=3, num_langevin_steps=2, langevin_step_size_rule="toy")
    pipe = CDRLPipeline(energy, initializer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vector_models_sample_vectors():
    pipe = vector_pipeline()
    latent = generate(pipe, batch_size=5, output_type="latent")
    assert latent.shape == (5, 2) and torch.isfinite(latent).all()
    torch.testing.assert_close(generate(pipe, batch_size=5, output_type="pt"), latent)
    assert np.allclose(generate(pipe, batch_size=5, output_type="np"), latent.numpy())
    levels = []
    generate(pipe, batch_size=5, callback_on_step_end=lambda *args: levels.append(args[3]["latents"]) or {})
    assert [level.shape for level in levels] == [(5, 2)] * 3
    assert pipe.log_density(latent).shape == (5,)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=2, output_type="pil")


def test_latent_output_is_x0_in_the_data_range(pipeline):
    latent = generate(pipeline, batch_size=2, output_type="latent")
    torch.testing.assert_close((latent + 1) / 2, generate(pipeline, batch_size=2))


def test_bf16_pipeline_keeps_the_chain_in_float32(pipeline):
    reference = generate(pipeline, batch_size=2, output_type="latent")
    pipeline.to(torch.bfloat16)
    seen = []
    reduced = generate(pipeline, batch_size=2, output_type="latent", callback_on_step_end=lambda *a: seen.append(a[3]))
    assert all(kwargs["latents"].dtype == torch.float32 for kwargs in seen) and reduced.dtype == torch.float32
    assert (reduced - reference).abs().max() < 0.2


def test_pipeline_puts_its_models_in_eval_mode_and_matches_a_loaded_copy(tmp_path):
    """Built from components in train mode or loaded from disk (eval mode), a pipeline computes the same thing."""
    built = CDRLPipeline(
        tiny_energy_model(3).train(), tiny_initializer(3).train(), CDRLScheduler(num_langevin_steps=2)
    )
    assert not built.energy_model.training and not built.initializer.training
    built.save_pretrained(tmp_path)
    loaded = CDRLPipeline.from_pretrained(tmp_path)
    kwargs = {"batch_size": 2, "class_labels": 1, "guidance_scale": 1.0}
    torch.testing.assert_close(generate(loaded, **kwargs), generate(built, **kwargs), rtol=0, atol=1e-5)


def test_custom_model_card(tmp_path, pipeline):
    card = pipeline.create_model_card(
        dataset_name="shapes", training_details={"steps": 10}, evaluation={"FD": 1.5}, sample_grid="samples.png"
    )
    pipeline.save_pretrained(tmp_path, model_card=card)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.datasets is None  # a name, not a Hub dataset id
    assert "| steps | 10 |" in loaded.text and "| FD | 1.5 |" in loaded.text and "samples.png" in loaded.text


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's repo creation and upload, mocked: records the README.md of every uploaded folder."""
    uploads = []

    def create_repo(repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(repo_id, folder_path, **kwargs):
        uploads.append((repo_id, ModelCard.load(f"{folder_path}/README.md"), kwargs))
        return "commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return uploads


def assert_cdrl_card(card, repo_id):
    assert "More Information Needed" not in card.text  # diffusers' empty template
    assert "CDRLPipeline.from_pretrained" in card.text and repo_id in card.text
    assert "cdrl_diffusers" in card.data.tags


def test_push_to_hub_uploads_the_cdrl_model_card(pipeline, hub):
    pipeline.push_to_hub("org/cdrl-tiny", commit_message="first")
    (repo_id, card, kwargs) = hub[0]
    assert repo_id == "org/cdrl-tiny" and kwargs["commit_message"] == "first"
    assert_cdrl_card(card, "org/cdrl-tiny")


def test_save_pretrained_push_to_hub_uploads_the_cdrl_model_card(pipeline, hub, tmp_path):
    pipeline.save_pretrained(tmp_path / "cdrl-tiny", push_to_hub=True, repo_id="org/cdrl-tiny")
    (repo_id, card, _) = hub[0]
    assert repo_id == "org/cdrl-tiny"
    assert_cdrl_card(card, "org/cdrl-tiny")
    assert_cdrl_card(ModelCard.load(tmp_path / "cdrl-tiny" / "README.md"), "org/cdrl-tiny")


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


def test_log_density_rejects_tensors_outside_minus_one_one(pipeline):
    with pytest.raises(ValueError, match=r"images.*\[-1, 1\]"):
        pipeline.log_density(torch.full((2, 3, TINY_SIZE, TINY_SIZE), 200.0))
