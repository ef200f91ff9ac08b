"""CDRLComposePipeline: Eq. 14 weights reach the energy terms, guidance equivalence, negation, loading, bad input."""

import json

import pytest
import torch
from conftest import TINY_SIZE, QuadraticImageEnergy, tiny_energy_model, tiny_initializer, tiny_pipeline

import cdrl_diffusers
from cdrl_diffusers import CDRLComposePipeline, CDRLPipeline, CDRLScheduler

NAMES = ["male", "smiling", "young"]
NULL = len(NAMES)


def compose_pipeline(conditional_initializer=True):
    pipe = CDRLComposePipeline(
        energy_model=tiny_energy_model(len(NAMES), NAMES),
        initializer=tiny_initializer(len(NAMES) if conditional_initializer else None),
        scheduler=CDRLScheduler(num_langevin_steps=3),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


class TermSpy:
    """Records, for every forward pass with a graph, each term's class label and d(guided f_hat)/d(term's f_hat).

    ``weighted_model_output`` returns sum_i gamma_i f_hat(y; c_i), so the gradient reaching the energy model's
    output for term i is exactly gamma_i: the weights are read off numerically.
    """

    def __init__(self, model):
        self.weights = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        labels = kwargs["class_labels"]
        if output.neg_energy.requires_grad:
            output.neg_energy.register_hook(lambda grad: self.weights.append(self.per_label(labels, grad)))

    @staticmethod
    def per_label(labels, grad):
        if labels is None:
            labels = torch.full_like(grad, NULL, dtype=torch.long)
        weights = {}
        for label in labels.unique().tolist():
            values = grad[labels == label]
            assert torch.all(values == values[0])  # one weight per term, the same for every image
            weights[label] = values[0].item()
        return weights


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # Eq. 14, M = 2, w = 1.5: gamma_i = 1 + w, unconditional -(M w + M - 1).
        ({"concepts": ["male", "young"], "guidance_scale": 1.5}, {0: 2.5, 2: 2.5, NULL: -4.0}),
        # Eq. 13 (w = 0), M = 3: the unconditional term gets -(M - 1).
        ({"concepts": [0, 1, 2]}, {0: 1.0, 1: 1.0, 2: 1.0, NULL: -2.0}),
        # Product of experts (Du et al. 2020): no (M - 1) log p(x) term, -M w on the unconditional model.
        ({"concepts": [0, 1], "guidance_scale": 1.5, "product_of_experts": True}, {0: 2.5, 1: 2.5, NULL: -3.0}),
        ({"concepts": [0, 1], "product_of_experts": True}, {0: 1.0, 1: 1.0}),
        # Negation: male AND NOT smiling.
        ({"concepts": ["male", "smiling"], "concept_weights": [2.0, -1.0]}, {0: 2.0, 1: -1.0}),
        ({"concepts": ["smiling"], "concept_weights": [-1.0]}, {1: -1.0, NULL: 2.0}),
    ],
)
def test_energy_terms_get_the_composition_weights(kwargs, expected):
    pipe = compose_pipeline()
    spy = TermSpy(pipe.energy_model)
    generate(pipe, batch_size=2, num_langevin_steps=1, **kwargs)
    # One Langevin step per level and the Tweedie step: every gradient evaluation sees the same weights.
    assert len(spy.weights) == pipe.scheduler.num_noise_levels + 1
    for weights in spy.weights:
        assert weights.keys() == expected.keys()
        for label, weight in expected.items():
            assert weights[label] == pytest.approx(weight, abs=1e-6)


def test_a_class_conditional_initializer_is_composed_unless_told_otherwise():
    pipe = compose_pipeline()
    seen = []
    pipe.initializer.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["class_labels"]), with_kwargs=True
    )
    for compose_initializer in (None, True):
        seen.clear()
        generate(pipe, concepts=["male", "young"], guidance_scale=1.0, compose_initializer=compose_initializer)
        assert seen and all(labels.tolist() == [0, 2, NULL] for labels in seen)
    seen.clear()
    generate(pipe, concepts=["male", "young"], guidance_scale=1.0, compose_initializer=False)
    assert seen and all(labels.tolist() == [NULL] for labels in seen)
    unconditional = compose_pipeline(conditional_initializer=False)  # the paper's: proposes without classes
    default = generate(unconditional, concepts=["male", "young"], guidance_scale=1.0)
    assert torch.equal(
        default, generate(unconditional, concepts=["male", "young"], guidance_scale=1.0, compose_initializer=False)
    )


@pytest.mark.parametrize("conditional_initializer", [False, True])
def test_one_concept_equals_classifier_free_guidance(conditional_initializer):
    pipe = compose_pipeline(conditional_initializer)
    guided = CDRLPipeline(**pipe.components)
    guided.set_progress_bar_config(disable=True)
    expected = generate(guided, seed=5, batch_size=2, class_labels="smiling", guidance_scale=2.0)
    composed = generate(
        pipe, seed=5, batch_size=2, concepts="smiling", guidance_scale=2.0, compose_initializer=conditional_initializer
    )
    assert torch.equal(composed, expected)
    assert torch.equal(
        generate(
            pipe, seed=5, batch_size=2, concepts=[1], guidance_scale=2.0, compose_initializer=conditional_initializer
        ),
        expected,
    )


def test_negation_moves_samples_away_from_the_concept():
    """With quadratic energies around constant images, NOT c pulls samples to the opposite side of c's mean."""
    pipe = CDRLComposePipeline(
        energy_model=QuadraticImageEnergy(class_means=(0.6, -0.2, 0.0), num_class_embeds=2, class_names=["a", "b"]),
        initializer=tiny_initializer(),
        scheduler=CDRLScheduler(num_langevin_steps=3),
    )
    pipe.set_progress_bar_config(disable=True)

    def mean(**kwargs):
        return generate(pipe, batch_size=4, **kwargs).mean().item() * 2 - 1  # back to [-1, 1]

    # The composed quadratic's centre: a alone 0.6; NOT a (2 f(y) - f(y; a)) -0.6; a AND b by Eq. 13
    # (f(y; a) + f(y; b) - f(y)) 0.6 - 0.2 - 0 = 0.4; product of experts (f(y; a) + f(y; b)) (0.6 - 0.2) / 2 = 0.2.
    assert mean(concepts="a") == pytest.approx(0.6, abs=0.15)
    assert mean(concepts="a", concept_weights=[-1.0]) == pytest.approx(-0.6, abs=0.15)
    assert mean(concepts=["a", "b"]) == pytest.approx(0.4, abs=0.15)
    assert mean(concepts=["a", "b"], product_of_experts=True) == pytest.approx(0.2, abs=0.1)


def test_generator_and_latents(tmp_path):
    pipe = compose_pipeline()
    first = generate(pipe, seed=1, batch_size=2, concepts=[0, 2], guidance_scale=1.0)
    assert torch.equal(first, generate(pipe, seed=1, batch_size=2, concepts=[0, 2], guidance_scale=1.0))
    assert not torch.allclose(first, generate(pipe, seed=2, batch_size=2, concepts=[0, 2], guidance_scale=1.0))
    latents = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with_latents = generate(pipe, batch_size=2, concepts=[0, 2], latents=latents)
    assert not torch.allclose(with_latents, generate(pipe, batch_size=2, concepts=[0, 2], latents=latents + 1))
    pil = pipe(concepts="young", batch_size=2, generator=torch.manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (TINY_SIZE, TINY_SIZE)


def test_loads_from_a_cdrl_pipeline_folder_and_round_trips(tmp_path):
    base = tiny_pipeline(num_class_embeds=3, class_names=NAMES)
    base.save_pretrained(tmp_path / "base")
    pipe = CDRLComposePipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"concepts": ["male", "smiling"], "guidance_scale": 1.0, "batch_size": 2}
    expected = generate(pipe, **kwargs)
    torch.testing.assert_close(generate(CDRLComposePipeline(**base.components), **kwargs), expected, rtol=0, atol=1e-5)
    pipe.save_pretrained(tmp_path / "compose")
    assert json.loads((tmp_path / "compose" / "model_index.json").read_text())["_class_name"] == "CDRLComposePipeline"
    loaded = CDRLComposePipeline.from_pretrained(tmp_path / "compose")
    torch.testing.assert_close(generate(loaded, **kwargs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pipeline_class", ["CDRLComposePipeline", "CDRLInpaintPipeline"])
def test_every_pipeline_scores_log_densities_like_cdrl_pipeline(pipeline_class):
    reference = tiny_pipeline(len(NAMES), NAMES)
    other = getattr(cdrl_diffusers, pipeline_class)(**reference.components)
    images = torch.rand(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for labels in (None, ["smiling"]):
        expected = reference.log_density(images, class_labels=labels)
        torch.testing.assert_close(other.log_density(images, class_labels=labels), expected)
    with pytest.raises(ValueError, match="images"):
        other.log_density(images * 255)
