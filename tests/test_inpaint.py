"""CDRLInpaintPipeline: known pixels kept exactly, one shared noise, input formats, loading and bad input (App. C)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SIZE, tiny_pipeline

from cdrl_diffusers import CDRLInpaintPipeline, CDRLPipeline


@pytest.fixture
def inpaint():
    pipe = CDRLInpaintPipeline(**tiny_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def conditional_inpaint():
    pipe = CDRLInpaintPipeline(
        **tiny_pipeline(num_class_embeds=3, class_names=["circle", "square", "triangle"]).components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def square_mask():
    mask = torch.zeros(TINY_SIZE, TINY_SIZE)
    mask[2:6, 3:7] = 1.0
    return mask


def images(batch=2, seed=0):
    return torch.rand(batch, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(pipe, image, mask, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(image, mask, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_known_pixels_are_kept_exactly_and_masked_ones_change(inpaint):
    image, mask = images(), square_mask()
    out = run(inpaint, image, mask)
    keep = ~mask.bool().expand_as(out)
    expected = image * 0.5 + 0.5  # the output's [0, 1] range
    assert torch.equal(out[keep], expected[keep])
    assert (out[~keep] - expected[~keep]).abs().min() > 0
    assert out.min() >= 0 and out.max() <= 1


def test_bf16_pipeline_keeps_known_pixels_exactly(inpaint):
    image, mask = images(), square_mask()
    full_precision = run(inpaint, image, mask)
    out = run(inpaint.to(torch.bfloat16), image, mask)
    keep = ~mask.bool().expand_as(out)
    assert torch.equal(out[keep], (image * 0.5 + 0.5)[keep])
    assert not torch.equal(out, full_precision)


def test_generator_makes_results_reproducible(inpaint):
    image, mask = images(), square_mask()
    assert torch.equal(run(inpaint, image, mask, seed=3), run(inpaint, image, mask, seed=3))
    assert not torch.allclose(run(inpaint, image, mask, seed=3), run(inpaint, image, mask, seed=4))


def test_masked_input_pixels_are_never_read(inpaint):
    image, mask = images(), square_mask()
    altered = image.clone()
    altered[:, :, mask.bool()] = -image[:, :, mask.bool()]
    assert torch.equal(run(inpaint, image, mask), run(inpaint, altered, mask))


def test_known_pixels_follow_the_noisy_observation_with_one_shared_noise(inpaint):
    """x_t's known pixels are alpha_bar_t x_obs + sigma_bar_t eps at every level, with the same eps (SPEC §8)."""
    image, mask = images(), square_mask()
    keep = ~mask.bool().expand_as(image)
    scheduler = inpaint.scheduler
    noises = []

    def record(pipe, index, timestep, callback_kwargs):
        sample = callback_kwargs["latents"]
        noises.append((sample - scheduler.alpha_bar[timestep] * image) / scheduler.sigma_bar[timestep])
        return callback_kwargs

    run(inpaint, image, mask, callback_on_step_end=record)
    assert len(noises) == scheduler.num_noise_levels
    for noise in noises[1:]:
        torch.testing.assert_close(noise[keep], noises[0][keep], atol=1e-3, rtol=0)
    assert noises[0][keep].std() > 0.5  # a real Gaussian draw, not zeros


def test_pil_numpy_and_tensor_inputs_agree(inpaint):
    pixels = np.random.default_rng(0).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    mask = (square_mask().numpy() * 255).astype(np.uint8)
    array = pixels.astype(np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0
    outputs = [
        run(inpaint, PIL.Image.fromarray(pixels), PIL.Image.fromarray(mask), output_type="np"),
        run(inpaint, array, mask.astype(np.float32) / 255.0, output_type="np"),
        run(inpaint, tensor, torch.from_numpy(mask / 255.0)[None, None], output_type="np"),
        run(inpaint, [array], [mask.astype(bool)], output_type="np"),
    ]
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])
    # PIL in, PIL out: the kept pixels are the input's bytes.
    pil = inpaint(PIL.Image.fromarray(pixels), PIL.Image.fromarray(mask), generator=torch.manual_seed(0)).images[0]
    keep = mask == 0
    np.testing.assert_array_equal(np.asarray(pil)[keep], pixels[keep])


def test_masks_and_images_broadcast_over_the_batch(inpaint):
    image, mask = images(batch=3), square_mask()
    one_mask = run(inpaint, image, mask)
    assert one_mask.shape == (3, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(run(inpaint, image, mask[None].expand(3, -1, -1)), one_mask)
    masks = torch.stack([mask, 1 - mask])[:, None]
    out = run(inpaint, image[:1], masks)
    assert out.shape == (2, 3, TINY_SIZE, TINY_SIZE)
    keep_second = mask.bool().expand(3, -1, -1)
    assert torch.equal(out[1][keep_second], (image[0] * 0.5 + 0.5)[keep_second])


def test_class_conditional_inpainting_with_guidance(conditional_inpaint):
    image, mask = images(batch=1), square_mask()
    out = run(conditional_inpaint, image, mask, class_labels=["circle", "triangle"], guidance_scale=2.0)
    assert out.shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert not torch.allclose(out[0], out[1])
    unconditional = run(conditional_inpaint, image, mask)
    assert not torch.allclose(unconditional, run(conditional_inpaint, image, mask, class_labels=1))


def test_loads_from_a_cdrl_pipeline_folder_and_round_trips(tmp_path):
    base = tiny_pipeline()
    base.save_pretrained(tmp_path / "base")
    pipe = CDRLInpaintPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    image, mask = images(), square_mask()
    expected = run(pipe, image, mask)
    torch.testing.assert_close(run(CDRLInpaintPipeline(**base.components), image, mask), expected, rtol=0, atol=1e-5)
    pipe.save_pretrained(tmp_path / "inpaint")
    assert json.loads((tmp_path / "inpaint" / "model_index.json").read_text())["_class_name"] == "CDRLInpaintPipeline"
    loaded = CDRLInpaintPipeline.from_pretrained(tmp_path / "inpaint")
    torch.testing.assert_close(run(loaded, image, mask), expected, rtol=0, atol=1e-5)
    assert isinstance(CDRLPipeline.from_pretrained(tmp_path / "inpaint"), CDRLPipeline)
    torch.testing.assert_close(run(CDRLInpaintPipeline.from_pipe(base), image, mask), expected, rtol=0, atol=1e-5)
