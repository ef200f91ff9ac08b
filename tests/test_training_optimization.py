"""cdrl_diffusers.training.optimization: skipping non-finite updates, per-network clipping, fp16 loss scaling."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from cdrl_diffusers.training import clip_and_step, fused_adamw_options, losses_are_finite


def prepared(scaler: torch.amp.GradScaler | None = None, adamw: dict | None = None):
    """Two one-weight "networks" and an optimizer prepared by an Accelerator with (optionally) a real GradScaler;
    SGD at 0.1, or AdamW with the keyword arguments ``adamw``."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = scaler  # what Accelerate sets up for `--mixed_precision fp16` on a GPU
    models = {"energy_model": torch.nn.Linear(1, 1, bias=False), "initializer": torch.nn.Linear(1, 1, bias=False)}
    for model in models.values():
        torch.nn.init.ones_(model.weight)
    parameters = [p for model in models.values() for p in model.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.1) if adamw is None else torch.optim.AdamW(parameters, **adamw)
    *_, optimizer = accelerator.prepare(*models.values(), optimizer)
    return accelerator, models, optimizer


def backward(accelerator, models, gradient: float) -> None:
    """Gradients d loss / d w = ``gradient`` for both weights (times the loss scale, through ``accelerator``)."""
    loss = sum(gradient * model.weight.sum() for model in models.values())
    accelerator.backward(loss)


def weights(models):
    return [model.weight.item() for model in models.values()]


def test_fp16_overflow_is_skipped_by_the_grad_scaler_and_training_continues():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    accelerator, models, optimizer = prepared(scaler)
    backward(accelerator, models, 2.0)  # 2 x 2^127 overflows float32: the scale is too large
    step = clip_and_step(accelerator, optimizer, models, max_grad_norm=100.0)
    optimizer.zero_grad()
    assert step.overflow and not step.stepped
    assert not all(torch.isfinite(torch.tensor(norm)) for norm in step.grad_norms.values())
    assert weights(models) == [1.0, 1.0]  # no update
    assert scaler.get_scale() == 2.0**126  # the scale was lowered (the scaler's step and update ran)

    # The next step unscales again (no "unscale_() has already been called" error) and updates the weights.
    backward(accelerator, models, 2.0)
    step = clip_and_step(accelerator, optimizer, models, max_grad_norm=100.0)
    assert step.stepped and not step.overflow
    assert step.grad_norms == pytest.approx({"energy_model": 2.0, "initializer": 2.0})  # unscaled
    assert weights(models) == pytest.approx([0.8, 0.8])


def test_clip_and_step_clips_each_network_and_skips_non_finite_gradients_without_a_scaler():
    accelerator, models, optimizer = prepared()
    backward(accelerator, models, 3.0)
    step = clip_and_step(accelerator, optimizer, models, max_grad_norm=1.0)
    optimizer.zero_grad()
    assert (
        step.stepped
        and not step.overflow
        and step.grad_norms == pytest.approx({"energy_model": 3.0, "initializer": 3.0})
    )
    assert weights(models) == pytest.approx([0.9, 0.9])  # clipped to norm 1, learning rate 0.1

    backward(accelerator, models, float("inf"))
    step = clip_and_step(accelerator, optimizer, models, max_grad_norm=1.0)
    assert not step.stepped and not step.overflow
    assert weights(models) == pytest.approx([0.9, 0.9])


def test_losses_are_finite():
    accelerator = Accelerator(cpu=True)
    assert losses_are_finite(accelerator, torch.tensor(1.0), torch.tensor(-2.0))
    assert not losses_are_finite(accelerator, torch.tensor(1.0), torch.tensor(float("nan")))
    assert not losses_are_finite(accelerator, torch.tensor(float("inf")))


def test_cpu_threads_per_process_shares_the_cores_this_process_may_use(monkeypatch):
    import os

    from cdrl_diffusers.training import cpu_threads_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert [cpu_threads_per_process(n) for n in (1, 2, 3, 5, 8)] == [5, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="`local_processes` must be a positive integer, got 0"):
        cpu_threads_per_process(0)
    with pytest.raises(ValueError, match="`local_processes`"):
        cpu_threads_per_process(True)


def test_fused_adamw_options_pick_the_fused_kernel_where_torch_has_one():
    expected = {"fused": True} if torch.__version__ >= "2.4" else {}
    assert fused_adamw_options("cpu") == expected == fused_adamw_options(torch.device("cpu"))
    assert fused_adamw_options("meta") == {}
    # The same update as torch's default AdamW, over steps with different gradients.
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]
    gradients = [[torch.randn_like(weight, generator=generator) for weight in start] for _ in range(5)]
    finals = []
    for options in ({}, fused_adamw_options("cpu")):
        weights_ = [torch.nn.Parameter(weight.clone()) for weight in start]
        optimizer = torch.optim.AdamW(weights_, lr=1e-2, weight_decay=0.1, **options)
        for step_gradients in gradients:
            for weight, gradient in zip(weights_, step_gradients):
                weight.grad = gradient.clone()
            optimizer.step()
        finals.append(torch.cat([weight.detach().flatten() for weight in weights_]))
    assert not torch.equal(finals[0], torch.cat([weight.flatten() for weight in start]))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)


def test_fp16_overflow_with_the_fused_adamw_is_skipped_and_training_continues():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    accelerator, models, optimizer = prepared(
        scaler, adamw={"lr": 0.1, "weight_decay": 0.0, **fused_adamw_options("cpu")}
    )
    backward(accelerator, models, 2.0)
    step = clip_and_step(accelerator, optimizer, models, max_grad_norm=100.0)
    optimizer.zero_grad()
    assert step.overflow and weights(models) == [1.0, 1.0] and scaler.get_scale() == 2.0**126
    backward(accelerator, models, 2.0)
    step = clip_and_step(accelerator, optimizer, models, max_grad_norm=100.0)
    assert step.stepped and not step.overflow
    assert weights(models) == pytest.approx([0.9, 0.9], abs=1e-4)  # Adam's first step: lr x sign(gradient)
