"""The fast paths against the naive baselines of benchmarks/naive.py, and what sampling must leave behind."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import TINY_SIZE, tiny_energy_model, tiny_initializer, tiny_pipeline

from cdrl_diffusers import CDRLScheduler, ConditionWeights, cdrl_training_step
from cdrl_diffusers.models.embeddings import ConditionEmbedding
from cdrl_diffusers.sampling import CDRLSampler, compiled_for_sampling, frozen, precision_context
from cdrl_diffusers.schedulers.scheduling_cdrl import LangevinCoefficients

_spec = importlib.util.spec_from_file_location("naive", Path(__file__).parents[1] / "benchmarks" / "naive.py")
naive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(naive)

TOLERANCE = 1e-5  # fp32 optimised vs naive, on [-1, 1] samples (the benchmarks use the same bound)


def _library_and_naive(pipe, class_labels=None, guidance_scale=0.0, seed=0, **kwargs):
    latents = torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(100 + seed))
    images = pipe(
        batch_size=3,
        class_labels=class_labels,
        guidance_scale=guidance_scale,
        latents=latents,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images
    labels = None if class_labels is None else torch.as_tensor(class_labels)
    reference = naive.naive_sample(
        pipe.energy_model,
        pipe.initializer,
        pipe.scheduler,
        latents,
        labels,
        guidance_scale,
        generator=torch.Generator().manual_seed(seed),
    )
    return images * 2 - 1, reference


@pytest.mark.parametrize("guided", [False, True])
def test_fp32_sampling_matches_the_naive_baseline(guided):
    if guided:
        pipe = tiny_pipeline(num_class_embeds=3)
        library, reference = _library_and_naive(pipe, class_labels=[0, 2, 1], guidance_scale=2.0)
    else:
        pipe = tiny_pipeline()
        library, reference = _library_and_naive(pipe)
    assert (library - reference).abs().max() < TOLERANCE
    assert reference.std() > 0.1  # a non-trivial sample


def test_channels_last_matches_the_naive_baseline():
    pipe = tiny_pipeline(num_class_embeds=3)
    reference_pipe = copy.deepcopy(pipe)
    pipe.energy_model.to(memory_format=torch.channels_last)
    library, _ = _library_and_naive(pipe, class_labels=[1, 1, 0], guidance_scale=1.0)
    _, reference = _library_and_naive(reference_pipe, class_labels=[1, 1, 0], guidance_scale=1.0)
    assert (library - reference).abs().max() < 1e-4


def test_fp32_training_step_matches_the_naive_baseline():
    scheduler = CDRLScheduler(num_langevin_steps=3)
    clean = torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    models = [(tiny_energy_model().train(), tiny_initializer().train()) for _ in range(2)]
    torch.manual_seed(0)  # the initializer's dropout draws from the global generator
    out = cdrl_training_step(*models[0], scheduler, clean, generator=torch.Generator().manual_seed(0))
    (out.ebm_loss + out.initializer_loss).backward()
    torch.manual_seed(0)
    ebm_loss, initializer_loss = naive.naive_training_step(
        *models[1], scheduler, clean, generator=torch.Generator().manual_seed(0)
    )
    (ebm_loss + initializer_loss).backward()
    assert out.ebm_loss.item() == pytest.approx(ebm_loss.item(), rel=1e-5, abs=1e-6)
    assert out.initializer_loss.item() == pytest.approx(initializer_loss.item(), rel=1e-5)
    for (name, fast), (_, slow) in zip(
        [*models[0][0].named_parameters(), *models[0][1].named_parameters()],
        [*models[1][0].named_parameters(), *models[1][1].named_parameters()],
    ):
        assert torch.allclose(fast.grad, slow.grad, rtol=1e-4, atol=1e-6), name


def _sampler(pipe, labels=None, **kwargs):
    weights = ConditionWeights.unconditional() if labels is None else ConditionWeights.conditional(labels)
    return CDRLSampler(
        pipe.energy_model,
        pipe.initializer,
        pipe.scheduler,
        energy_weights=weights,
        initializer_weights=ConditionWeights.unconditional(),
        batch_size=2,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_sampling_leaves_no_gradients_graphs_or_caches(precision):
    pipe = tiny_pipeline()
    pipe.energy_model.train()
    models = [pipe.energy_model, pipe.initializer]
    for param in [p for model in models for p in model.parameters()]:
        param.requires_grad_(True)
    with torch.enable_grad():
        sample = _sampler(pipe, precision=precision).run(torch.randn(2, 3, TINY_SIZE, TINY_SIZE))
    assert sample.dtype == torch.float32 and sample.grad_fn is None and not sample.requires_grad
    assert all(p.grad is None and p.requires_grad for model in models for p in model.parameters())
    assert pipe.energy_model.training and not pipe.initializer.training  # modes restored
    assert all(m._cache is None for m in pipe.energy_model.modules() if isinstance(m, ConditionEmbedding))


def test_reduced_precision_keeps_the_langevin_state_in_float32(monkeypatch):
    """Under bf16 autocast the network runs in bf16, but every input of the Langevin update (Eq. 5) is float32."""
    pipe = tiny_pipeline()
    seen = []
    step = LangevinCoefficients.step

    def checked_step(self, sample, neg_energy_grad, noisier, noise):
        seen.append({t.dtype for t in (sample, neg_energy_grad, noisier, noise, self.recovery_scale)})
        return step(self, sample, neg_energy_grad, noisier, noise)

    monkeypatch.setattr(LangevinCoefficients, "step", checked_step)
    latents = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))
    full = _sampler(pipe).run(latents)
    reduced = _sampler(pipe, precision="bf16").run(latents)
    assert seen and all(dtypes == {torch.float32} for dtypes in seen)
    difference = (full - reduced).abs().max().item()
    assert 0 < difference < 0.05  # bf16 is really used, and stays close to fp32 on this tiny model


def test_conditioning_is_embedded_once_per_level(monkeypatch):
    pipe = tiny_pipeline(num_class_embeds=3)
    calls = []
    embed = ConditionEmbedding._embed

    def counted(self, logsnr, class_labels):
        calls.append(logsnr.shape)
        return embed(self, logsnr, class_labels)

    monkeypatch.setattr(ConditionEmbedding, "_embed", counted)
    sampler = _sampler(pipe, labels=torch.tensor([0, 1]))
    sampler.run(torch.randn(2, 3, TINY_SIZE, TINY_SIZE))
    # One embedding per level (the Tweedie step reuses level 0's), instead of one per Langevin step.
    assert len(calls) == pipe.scheduler.num_noise_levels
    calls.clear()
    with frozen(pipe.energy_model):
        pipe.energy_model(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE), 1.0)
        pipe.energy_model(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE), 2.0)  # another log-SNR: a new embedding
        pipe.energy_model(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE), 1.0, class_labels=torch.tensor([0, 1]))
    assert len(calls) == 3


def test_gradient_checkpointing_gives_the_same_gradients():
    clean = torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    grads = []
    for checkpointing in (False, True):
        energy, initializer = tiny_energy_model().train(), tiny_initializer().train()
        if checkpointing:
            energy.enable_gradient_checkpointing()
        torch.manual_seed(0)
        out = cdrl_training_step(
            energy, initializer, CDRLScheduler(num_langevin_steps=2), clean, generator=torch.Generator().manual_seed(0)
        )
        out.ebm_loss.backward()
        grads.append([p.grad.clone() for p in energy.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_reduced_precision_training_step():
    clean = torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    outputs = []
    for precision in ("fp32", "bf16"):
        energy, initializer = tiny_energy_model().train(), tiny_initializer().train()
        torch.manual_seed(0)
        out = cdrl_training_step(
            energy,
            initializer,
            CDRLScheduler(num_langevin_steps=2),
            clean,
            generator=torch.Generator().manual_seed(0),
            precision=precision,
        )
        (out.ebm_loss + out.initializer_loss).backward()
        assert out.ebm_loss.dtype == out.initializer_loss.dtype == torch.float32
        assert all(torch.isfinite(p.grad).all() for p in energy.parameters())
        outputs.append(out)
    assert outputs[1].initializer_loss.item() == pytest.approx(outputs[0].initializer_loss.item(), rel=0.05)


def test_compiled_copy_folds_spectral_norm_and_follows_the_weights(monkeypatch):
    """The inference copy behind ``torch_compile=True`` (the compiler itself is stubbed: it is slow on a CPU)."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    model = tiny_energy_model()
    sample = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with frozen(model):
        copied = compiled_for_sampling(model)
        assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in copied.modules())
        assert torch.allclose(copied(sample, 1.0).neg_energy, model(sample, 1.0).neg_energy, atol=1e-5)
    with torch.no_grad():
        model.blocks[0].residual_scale.add_(0.3)
        model.readout.weight.mul_(2)
    with frozen(model):
        assert compiled_for_sampling(model) is copied  # compiled once, refreshed in place
        assert torch.allclose(copied(sample, 1.0).neg_energy, model(sample, 1.0).neg_energy, atol=1e-5)


def test_bad_performance_options():
    with pytest.raises(ValueError, match="precision"):
        precision_context("int8", "cpu")
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="precision"):
        pipe(precision="half", output_type="pt")
    with pytest.raises(ValueError, match="CUDA"):
        pipe(cuda_graph=True, output_type="pt")
