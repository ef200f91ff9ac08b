"""The fast paths against the naive baselines of benchmarks/naive.py, and what sampling must leave behind."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import TINY_SIZE, tiny_energy_model, tiny_initializer, tiny_pipeline

from cdrl_diffusers import CDRLScheduler, cdrl_training_step, fold_spectral_norm
from cdrl_diffusers.acceleration import precision_context
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


def _sample(pipe, latents, precision="fp32", **kwargs):
    """x_0 from ``latents``, with the networks under bf16 autocast for ``precision="bf16"``."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        return pipe(
            batch_size=latents.shape[0],
            latents=latents,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **kwargs,
        ).images


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_leaves_no_gradients_or_graphs(precision):
    pipe = tiny_pipeline()
    pipe.energy_model.train()
    models = [pipe.energy_model, pipe.initializer]
    for param in [p for model in models for p in model.parameters()]:
        param.requires_grad_(True)
    with torch.enable_grad():
        sample = _sample(pipe, torch.randn(2, 3, TINY_SIZE, TINY_SIZE), precision)
    assert sample.dtype == torch.float32 and sample.grad_fn is None and not sample.requires_grad
    assert all(p.grad is None and p.requires_grad for model in models for p in model.parameters())
    assert pipe.energy_model.training and not pipe.initializer.training  # modes restored


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
    full = _sample(pipe, latents)
    reduced = _sample(pipe, latents, "bf16")
    assert seen and all(dtypes == {torch.float32} for dtypes in seen)
    difference = (full - reduced).abs().max().item()
    assert 0 < difference < 0.05  # bf16 is really used, and stays close to fp32 on this tiny model


def test_conditioning_is_embedded_once_per_level(monkeypatch):
    pipe = tiny_pipeline(num_class_embeds=3)
    model_class = type(pipe.energy_model)
    embedded, forwards = [], []
    embed = model_class.embed_condition

    def counted(self, logsnr, class_labels=None):
        embedded.append(logsnr.shape)
        return embed(self, logsnr, class_labels)

    monkeypatch.setattr(model_class, "embed_condition", counted)
    pipe.energy_model.register_forward_hook(
        lambda module, args, kwargs, output: forwards.append(kwargs), with_kwargs=True
    )
    _sample(pipe, torch.randn(2, 3, TINY_SIZE, TINY_SIZE), class_labels=[0, 1], guidance_scale=1.0)
    levels, steps = pipe.scheduler.num_noise_levels, pipe.scheduler.config.num_langevin_steps
    # Once per level and once for the Tweedie step, for both guidance terms at once, instead of once per step.
    assert embedded == [(4,)] * (levels + 1)
    assert len(forwards) == levels * steps + 1 and all(kwargs["condition"] is not None for kwargs in forwards)


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


def test_folded_spectral_norm_computes_the_same_energy():
    """The copy to ``torch.compile``: plain weights W / sigma(W) instead of a parametrisation, a snapshot."""
    model = tiny_energy_model()
    sample = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    folded = fold_spectral_norm(model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in folded.modules())
    assert not folded.config.use_spectral_norm and fold_spectral_norm(folded) is folded
    with torch.no_grad():
        torch.testing.assert_close(folded(sample, 1.0).neg_energy, model(sample, 1.0).neg_energy, rtol=1e-5, atol=1e-5)
        model.readout.weight.mul_(2)
        assert not torch.allclose(folded(sample, 1.0).neg_energy, model(sample, 1.0).neg_energy)


def test_bad_performance_options():
    with pytest.raises(ValueError, match="precision"):
        precision_context("int8", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        tiny_pipeline().enable_cuda_graph()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_sampling_matches_eager_sampling():
    pipe = tiny_pipeline(num_class_embeds=3).to("cuda")
    latents = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, device="cuda")
    kwargs = {"class_labels": [0, 2], "guidance_scale": 1.0}
    eager = _sample(pipe, latents, **kwargs)
    pipe.enable_cuda_graph()
    torch.testing.assert_close(_sample(pipe, latents, **kwargs), eager, rtol=0, atol=1e-4)
