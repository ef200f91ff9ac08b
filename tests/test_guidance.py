"""The one guidance/composition rule (SPEC §8) and its batched evaluation."""

import pytest
import torch
from conftest import QuadraticEnergy, ShiftInitializer, tiny_energy_model

from cdrl_diffusers import ConditionWeights
from cdrl_diffusers.guidance import embed_terms, weighted_model_output


def labels(value, batch=2):
    return torch.full((batch,), value, dtype=torch.long)


@pytest.mark.parametrize("w", [0.0, 0.7, 3.0])
def test_classifier_free_guidance_weights_are_eq_11_12(w):
    weights = ConditionWeights.classifier_free_guidance(labels(1), w)
    assert weights.weights == (1 + w,)
    assert weights.unconditional_weight == -w
    assert weights.for_initializer().weights == (1 + w,)
    assert weights.for_initializer().unconditional_weight == pytest.approx(-w)


@pytest.mark.parametrize("num_concepts", [1, 2, 3])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_composition_weights_are_eq_14(num_concepts, w):
    concepts = [labels(i) for i in range(num_concepts)]
    weights = ConditionWeights.composition(concepts, guidance_scale=w)
    assert weights.weights == tuple([1 + w] * num_concepts)
    assert weights.unconditional_weight == pytest.approx(-(num_concepts * w + num_concepts - 1))


def test_composition_without_guidance_is_eq_13():
    weights = ConditionWeights.composition([labels(0), labels(1), labels(2)], guidance_scale=0.0)
    assert weights.weights == (1.0, 1.0, 1.0)
    assert weights.unconditional_weight == pytest.approx(-2.0)  # -(M - 1) log p(x)


def test_product_of_experts_lacks_the_negative_term():
    poe = ConditionWeights.composition([labels(0), labels(1)], guidance_scale=0.0, product_of_experts=True)
    assert poe.unconditional_weight == 0.0  # Du et al. (2020): f(x; c1) + f(x; c2)
    poe_guided = ConditionWeights.composition([labels(0), labels(1)], guidance_scale=2.0, product_of_experts=True)
    eq14 = ConditionWeights.composition([labels(0), labels(1)], guidance_scale=2.0)
    assert poe_guided.unconditional_weight - eq14.unconditional_weight == pytest.approx(1.0)  # the missing M - 1


def test_negation_and_explicit_weights():
    weights = ConditionWeights.composition([labels(0), labels(1)], concept_weights=[2.0, -1.0])
    assert weights.weights == (2.0, -1.0)
    assert weights.unconditional_weight == pytest.approx(0.0)


def test_one_concept_composition_equals_guidance():
    composed = ConditionWeights.composition([labels(2)], guidance_scale=1.5)
    guided = ConditionWeights.classifier_free_guidance(labels(2), 1.5)
    assert composed.weights == guided.weights
    assert composed.unconditional_weight == pytest.approx(guided.unconditional_weight)


def test_weighted_output_is_the_weighted_sum_of_separate_forwards():
    model = QuadraticEnergy(data_dim=4, num_class_embeds=3)
    sample = torch.randn(2, 4)
    weights = ConditionWeights.composition([labels(0), labels(2)], guidance_scale=1.0)
    got = weighted_model_output(model, sample, torch.tensor(0.0), weights.stack(3, 2, sample.device))
    separate = (
        2.0 * model(sample, 0.0, labels(0)).neg_energy
        + 2.0 * model(sample, 0.0, labels(2)).neg_energy
        - 3.0 * model(sample, 0.0, None).neg_energy
    )
    torch.testing.assert_close(got, separate)


def test_weighted_output_batches_all_terms_into_one_forward():
    model = tiny_energy_model(num_class_embeds=3)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    sample = torch.randn(2, 3, 8, 8)
    weights = ConditionWeights.classifier_free_guidance(labels(1), 2.0)
    with torch.no_grad():
        got = weighted_model_output(model, sample, torch.tensor(1.0), weights.stack(3, 2, sample.device))
        expected = 3.0 * model(sample, 1.0, labels(1)).neg_energy - 2.0 * model(sample, 1.0).neg_energy
    assert calls[0] == 4  # conditional and unconditional terms in one batch of 2 x 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_initializer_means_combine_by_eq_12():
    model = ShiftInitializer(data_dim=3, num_class_embeds=2)
    sample = torch.randn(2, 3)
    weights = ConditionWeights.classifier_free_guidance(labels(0), 0.5).for_initializer()
    got = weighted_model_output(model, sample, torch.tensor(0.0), weights.stack(2, 2, sample.device))
    expected = 1.5 * model(sample, 0.0, labels(0)).sample - 0.5 * model(sample, 0.0).sample
    torch.testing.assert_close(got, expected)


def test_an_unconditional_model_gets_one_unlabelled_term():
    stacked = ConditionWeights.unconditional().stack(None, 2, torch.device("cpu"))
    assert stacked.labels is None and stacked.is_single


def test_zero_weight_terms_are_skipped():
    stacked = ConditionWeights.classifier_free_guidance(labels(1), 0.0).stack(3, 2, torch.device("cpu"))
    assert stacked.num_terms == 1 and stacked.is_single
    assert stacked.labels.tolist() == [1, 1]


def test_the_condition_embedded_once_gives_the_same_guided_energy():
    """Algorithm 2 embeds (log-SNR, class) once per level (``embed_terms``) and reuses it for the K steps."""
    model = tiny_energy_model(num_class_embeds=3)
    sample, logsnr = torch.randn(2, 3, 8, 8), torch.tensor(1.0)
    terms = ConditionWeights.classifier_free_guidance(labels(1), 2.0).stack(3, 2, sample.device)
    with torch.no_grad():
        condition = embed_terms(model, logsnr, terms, batch=2)
        torch.testing.assert_close(
            weighted_model_output(model, sample, logsnr, terms, condition),
            weighted_model_output(model, sample, logsnr, terms),
        )
