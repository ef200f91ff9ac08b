"""The bad-input matrix: every public entry point fails clearly on bad input.

Each case calls one entry point with one bad argument and expects a ``ValueError``, ``TypeError`` or
``FileNotFoundError`` whose message names the argument: never a deep torch error, never a silent wrong result.
"""

from __future__ import annotations

import json
import math
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SIZE, tiny_pipeline

from cdrl_diffusers import (
    CDRLComposePipeline,
    CDRLInpaintPipeline,
    CDRLPipeline,
    CDRLScheduler,
    EnergyMLP,
    EnergyModel,
    InitializerMLP,
    InitializerUNet,
    cdrl_training_step,
    drop_labels,
)
from cdrl_diffusers.data import (
    box_size,
    load_digits_dataset,
    load_shapes_dataset,
    render_shape,
    sample_toy,
    shape_mask,
    toy_log_density,
    toy_support,
)
from cdrl_diffusers.evaluation import (
    ImageClassifier,
    classifier_accuracy,
    density_grid,
    energy_log_density,
    extract_features,
    feature_distances,
    fraction_in_support,
    frechet_distance,
    grid_log_probabilities,
    kernel_distance,
    kl_divergence_on_grid,
    mmd_rbf,
    ood_auroc,
    score_samples,
    shift_images,
    sliced_wasserstein_distance,
)

S = TINY_SIZE
NAN, INF = math.nan, math.inf
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def images(batch=2, channels=3, size=S, dtype=torch.float32, fill=0.0):
    return torch.full((batch, channels, size, size), fill, dtype=dtype)


def vectors(batch=4, dim=2, dtype=torch.float32, fill=0.0):
    return torch.full((batch, dim), fill, dtype=dtype)


def labels(*values):
    return torch.tensor(values, dtype=torch.long)


@pytest.fixture(scope="module")
def m():
    """Tiny models shared by all cases; every bad call must fail before it changes or samples anything."""
    names = ["circle", "square", "triangle"]
    pipe, cpipe = tiny_pipeline(), tiny_pipeline(3, names)
    cond_energy_plain_initializer = {
        "energy_model": cpipe.energy_model,
        "initializer": pipe.initializer,
        "scheduler": cpipe.scheduler,
    }
    return SimpleNamespace(
        pipe=pipe,
        cpipe=cpipe,
        inpaint=CDRLInpaintPipeline(**pipe.components),
        cinpaint=CDRLInpaintPipeline(**cpipe.components),
        compose=CDRLComposePipeline(**cpipe.components),
        ucompose=CDRLComposePipeline(**pipe.components),
        compose_plain_initializer=CDRLComposePipeline(**cond_energy_plain_initializer),
        vpipe=CDRLPipeline(
            EnergyMLP(data_dim=2, hidden_dim=8, num_layers=1, embedding_dim=8),
            InitializerMLP(data_dim=2, hidden_dim=8, num_layers=1),
            CDRLScheduler(num_noise_levels=2, num_langevin_steps=1),
        ),
        energy=pipe.energy_model,
        cenergy=cpipe.energy_model,
        init=pipe.initializer,
        cinit=cpipe.initializer,
        emlp=EnergyMLP(data_dim=2, hidden_dim=8, num_layers=1, embedding_dim=8),
        imlp=InitializerMLP(data_dim=2, hidden_dim=8, num_layers=1),
        sched=CDRLScheduler(num_langevin_steps=2),
        classifier=ImageClassifier(
            sample_size=S, in_channels=3, num_classes=3, block_out_channels=(4, 4), feature_dim=8
        ).eval(),
    )


def case(case_id, call, error, match):
    return pytest.param(call, error, match, id=case_id)


def run_case(m, call, error, match):
    with pytest.raises(error, match=match):
        call(m)


# ---------------------------------------------------------------------------------------------------------------------
# CDRLPipeline.__call__
# ---------------------------------------------------------------------------------------------------------------------
PIPELINE_CALL = [
    case("batch_size-zero", lambda m: m.pipe(batch_size=0), ValueError, "batch_size"),
    case("batch_size-negative", lambda m: m.pipe(batch_size=-3), ValueError, "batch_size"),
    case("batch_size-float", lambda m: m.pipe(batch_size=2.0), ValueError, "batch_size"),
    case("batch_size-str", lambda m: m.pipe(batch_size="4"), ValueError, "batch_size"),
    case("num_langevin_steps-negative", lambda m: m.pipe(num_langevin_steps=-1), ValueError, "num_langevin_steps"),
    case("num_langevin_steps-float", lambda m: m.pipe(num_langevin_steps=2.5), ValueError, "num_langevin_steps"),
    case("guidance-on-unconditional", lambda m: m.pipe(guidance_scale=1.0), ValueError, "guidance_scale"),
    case("guidance-negative", lambda m: m.cpipe(guidance_scale=-1.0), ValueError, "guidance_scale"),
    case("guidance-nan", lambda m: m.cpipe(guidance_scale=NAN), ValueError, "guidance_scale"),
    case("guidance-inf", lambda m: m.cpipe(guidance_scale=INF), ValueError, "guidance_scale"),
    case("guidance-str", lambda m: m.cpipe(guidance_scale="2"), TypeError, "guidance_scale"),
    case("guidance-tensor", lambda m: m.cpipe(guidance_scale=torch.tensor(1.0)), TypeError, "guidance_scale"),
    case("labels-on-unconditional", lambda m: m.pipe(class_labels=0), ValueError, "class_labels"),
    case("labels-out-of-range", lambda m: m.cpipe(class_labels=3), ValueError, "class_labels"),
    case("labels-negative", lambda m: m.cpipe(class_labels=[-1]), ValueError, "class_labels"),
    case("labels-unknown-name", lambda m: m.cpipe(class_labels="hexagon"), ValueError, "class_labels"),
    case("labels-float", lambda m: m.cpipe(class_labels=1.0), TypeError, "class_labels"),
    case("labels-float-tensor", lambda m: m.cpipe(class_labels=torch.tensor([0.5])), TypeError, "class_labels"),
    case("labels-bool", lambda m: m.cpipe(class_labels=True), TypeError, "class_labels"),
    case("labels-empty", lambda m: m.cpipe(class_labels=[]), ValueError, "class_labels"),
    case("labels-2d", lambda m: m.cpipe(class_labels=torch.zeros(1, 2, dtype=torch.long)), ValueError, "class_labels"),
    case("labels-count-mismatch", lambda m: m.cpipe(batch_size=2, class_labels=[0, 1, 2]), ValueError, "batch_size"),
    case("latents-wrong-channels", lambda m: m.pipe(latents=images(1, 1)), ValueError, "latents"),
    case("latents-wrong-size", lambda m: m.pipe(latents=images(1, size=2 * S)), ValueError, "latents"),
    case("latents-batch-mismatch", lambda m: m.pipe(batch_size=2, latents=images(1)), ValueError, "latents"),
    case("latents-numpy", lambda m: m.pipe(latents=np.zeros((1, 3, S, S))), TypeError, "latents"),
    case("latents-int", lambda m: m.pipe(latents=images(1, dtype=torch.long)), TypeError, "latents"),
    case("latents-complex", lambda m: m.pipe(latents=images(1, dtype=torch.complex64)), TypeError, "latents"),
    case("latents-nan", lambda m: m.pipe(latents=images(1, fill=NAN)), ValueError, "latents"),
    case("generator-str", lambda m: m.pipe(generator="seed"), TypeError, "generator"),
    case("generator-count", lambda m: m.pipe(batch_size=2, generator=[torch.Generator()]), ValueError, "generator"),
    case("output_type-unknown", lambda m: m.pipe(output_type="jpg"), ValueError, "output_type"),
    case("callback-not-callable", lambda m: m.pipe(callback_on_step_end=3), TypeError, "callback_on_step_end"),
    case(
        "callback-inputs-unknown",
        lambda m: m.pipe(callback_on_step_end_tensor_inputs=["noise"]),
        ValueError,
        "callback_on_step_end_tensor_inputs",
    ),
    case("use_initializer-str", lambda m: m.pipe(use_initializer="no"), TypeError, "use_initializer"),
    case(
        "nothing-to-sample",
        lambda m: m.pipe(num_langevin_steps=0, use_initializer=False),
        ValueError,
        "num_langevin_steps",
    ),
    case("output_type-pil-for-vectors", lambda m: m.vpipe(output_type="pil"), ValueError, "output_type"),
    case(
        "callback-latents-shape",
        lambda m: m.pipe(callback_on_step_end=lambda *args: {"latents": images(3)}),
        ValueError,
        "callback_on_step_end",
    ),
    case(
        "callback-latents-nan",
        lambda m: m.pipe(callback_on_step_end=lambda *args: {"latents": images(1, fill=NAN)}),
        ValueError,
        "callback_on_step_end",
    ),
    case("cuda_graph-on-cpu", lambda m: m.pipe.enable_cuda_graph(), ValueError, "CUDA"),
]


@pytest.mark.parametrize("call, error, match", PIPELINE_CALL)
def test_pipeline_call(m, call, error, match):
    run_case(m, call, error, match)


LOG_DENSITY = [
    case("images-empty-list", lambda m: m.pipe.log_density([]), ValueError, "images"),
    case("images-empty-batch", lambda m: m.pipe.log_density(images(0)), ValueError, "images"),
    case("images-wrong-channels", lambda m: m.pipe.log_density(images(2, 1)), ValueError, "images"),
    case("images-wrong-size", lambda m: m.pipe.log_density(images(2, size=2 * S)), ValueError, "images"),
    case("images-no-channels", lambda m: m.pipe.log_density(torch.zeros(S, S)), ValueError, "images"),
    case("images-int", lambda m: m.pipe.log_density(images(dtype=torch.int64)), TypeError, "images"),
    case("images-complex", lambda m: m.pipe.log_density(images(dtype=torch.complex64)), TypeError, "images"),
    case("images-nan", lambda m: m.pipe.log_density(images(fill=NAN)), ValueError, "images"),
    case("images-inf", lambda m: m.pipe.log_density(images(fill=INF)), ValueError, "images"),
    case("images-str", lambda m: m.pipe.log_density("cat.png"), TypeError, "images"),
    case("images-none", lambda m: m.pipe.log_density(None), TypeError, "images"),
    case("images-mixed-list", lambda m: m.pipe.log_density([images(1)[0], "x"]), TypeError, "images"),
    case(
        "images-pil-wrong-size",
        lambda m: m.pipe.log_density(PIL.Image.new("RGB", (2 * S, 2 * S))),
        ValueError,
        "images",
    ),
    case(
        "images-numpy-uint8",
        lambda m: m.pipe.log_density(np.full((S, S, 3), 200, dtype=np.uint8)),
        TypeError,
        "images",
    ),
    case(
        "images-numpy-out-of-range",
        lambda m: m.pipe.log_density(np.full((S, S, 3), 3.0, dtype=np.float32)),
        ValueError,
        "images",
    ),
    case(
        "images-numpy-wrong-channels",
        lambda m: m.pipe.log_density(np.zeros((S, S, 2), dtype=np.float32)),
        ValueError,
        "images",
    ),
    case(
        "labels-on-unconditional", lambda m: m.pipe.log_density(images(), class_labels=0), ValueError, "class_labels"
    ),
    case(
        "labels-count-mismatch",
        lambda m: m.cpipe.log_density(images(2), class_labels=[0, 1, 2]),
        ValueError,
        "class labels",
    ),
    case("labels-unknown", lambda m: m.cpipe.log_density(images(), class_labels="dog"), ValueError, "class_labels"),
    case("noise_level-too-large", lambda m: m.pipe.log_density(images(), noise_level=6), ValueError, "noise_level"),
    case("noise_level-negative", lambda m: m.pipe.log_density(images(), noise_level=-1), ValueError, "noise_level"),
    case("noise_level-float", lambda m: m.pipe.log_density(images(), noise_level=1.0), TypeError, "noise_level"),
    case("noise_level-bool", lambda m: m.pipe.log_density(images(), noise_level=True), TypeError, "noise_level"),
    case("batch_size-zero", lambda m: m.pipe.log_density(images(), batch_size=0), ValueError, "batch_size"),
    case("images-0-255", lambda m: m.pipe.log_density(images(fill=200.0)), ValueError, r"images.*\[-1, 1\]"),
]


@pytest.mark.parametrize("call, error, match", LOG_DENSITY)
def test_log_density(m, call, error, match):
    run_case(m, call, error, match)


def inpaint(pipe, image=None, mask=None, **kwargs):
    image = images(1) if image is None else image
    mask = torch.ones(S, S) if mask is None else mask
    return pipe(image, mask, **kwargs)


INPAINT = [
    case("image-wrong-channels", lambda m: inpaint(m.inpaint, image=images(1, 1)), ValueError, "image"),
    case("image-wrong-size", lambda m: inpaint(m.inpaint, image=images(1, size=4)), ValueError, "image"),
    case("image-out-of-range", lambda m: inpaint(m.inpaint, image=images(1, fill=2.0)), ValueError, "image"),
    case("image-nan", lambda m: inpaint(m.inpaint, image=images(1, fill=NAN)), ValueError, "image"),
    case("image-int", lambda m: inpaint(m.inpaint, image=images(1, dtype=torch.uint8)), TypeError, "image"),
    case("image-empty", lambda m: inpaint(m.inpaint, image=[]), ValueError, "image"),
    case("image-str", lambda m: inpaint(m.inpaint, image="photo.png"), TypeError, "image"),
    case("mask-wrong-size", lambda m: inpaint(m.inpaint, mask=torch.ones(4, 4)), ValueError, "mask_image"),
    case("mask-above-one", lambda m: inpaint(m.inpaint, mask=torch.full((S, S), 2.0)), ValueError, "mask_image"),
    case("mask-negative", lambda m: inpaint(m.inpaint, mask=-torch.ones(S, S)), ValueError, "mask_image"),
    case("mask-nan", lambda m: inpaint(m.inpaint, mask=torch.full((S, S), NAN)), ValueError, "mask_image"),
    case("mask-empty-tensor", lambda m: inpaint(m.inpaint, mask=torch.zeros(0, S, S)), ValueError, "mask_image"),
    case("mask-empty-list", lambda m: inpaint(m.inpaint, mask=[]), ValueError, "mask_image"),
    case("mask-str", lambda m: inpaint(m.inpaint, mask="mask.png"), TypeError, "mask_image"),
    case(
        "mask-batch-mismatch",
        lambda m: inpaint(m.inpaint, image=images(2), mask=torch.ones(3, S, S)),
        ValueError,
        "mask_image",
    ),
    case("labels-on-unconditional", lambda m: inpaint(m.inpaint, class_labels=0), ValueError, "class_labels"),
    case("labels-out-of-range", lambda m: inpaint(m.cinpaint, class_labels=7), ValueError, "class_labels"),
    case(
        "labels-count-mismatch",
        lambda m: inpaint(m.cinpaint, image=images(2), class_labels=[0, 1, 2]),
        ValueError,
        "class labels",
    ),
    case("guidance-without-labels", lambda m: inpaint(m.cinpaint, guidance_scale=1.0), ValueError, "guidance_scale"),
    case("guidance-on-unconditional", lambda m: inpaint(m.inpaint, guidance_scale=1.0), ValueError, "guidance_scale"),
    case(
        "guidance-negative",
        lambda m: inpaint(m.cinpaint, class_labels=0, guidance_scale=-0.5),
        ValueError,
        "guidance_scale",
    ),
    case("num_langevin_steps-negative", lambda m: inpaint(m.inpaint, num_langevin_steps=-1), ValueError, "num_lang"),
    case("output_type-unknown", lambda m: inpaint(m.inpaint, output_type="tensor"), ValueError, "output_type"),
    case(
        "generator-count",
        lambda m: inpaint(m.inpaint, image=images(2), generator=[torch.Generator()] * 3),
        ValueError,
        "generator",
    ),
    case("generator-int", lambda m: inpaint(m.inpaint, generator=0), TypeError, "generator"),
]


@pytest.mark.parametrize("call, error, match", INPAINT)
def test_inpaint_pipeline(m, call, error, match):
    run_case(m, call, error, match)


COMPOSE = [
    case("concepts-empty", lambda m: m.compose([]), ValueError, "concepts"),
    case("concepts-on-unconditional", lambda m: m.ucompose([0]), ValueError, "concepts"),
    case("concepts-unknown-name", lambda m: m.compose(["circle", "hexagon"]), ValueError, "concepts"),
    case("concepts-out-of-range", lambda m: m.compose([0, 3]), ValueError, "concepts"),
    case("concepts-repeated", lambda m: m.compose(["circle", 0]), ValueError, "concepts"),
    case("concepts-float", lambda m: m.compose([0.0]), TypeError, "concepts"),
    case("concepts-2d", lambda m: m.compose(torch.zeros(2, 2, dtype=torch.long)), ValueError, "concepts"),
    case("weights-count", lambda m: m.compose([0, 1], concept_weights=[1.0]), ValueError, "concept_weights"),
    case("weights-nan", lambda m: m.compose([0, 1], concept_weights=[1.0, NAN]), ValueError, "concept_weights"),
    case("weights-str", lambda m: m.compose([0], concept_weights="1"), TypeError, "concept_weights"),
    case(
        "weights-and-guidance",
        lambda m: m.compose([0], concept_weights=[2.0], guidance_scale=1.0),
        ValueError,
        "concept_weights",
    ),
    case("guidance-negative", lambda m: m.compose([0, 1], guidance_scale=-1.0), ValueError, "guidance_scale"),
    case("batch_size-zero", lambda m: m.compose([0], batch_size=0), ValueError, "batch_size"),
    case("latents-wrong-shape", lambda m: m.compose([0], latents=images(1, 1)), ValueError, "latents"),
    case("latents-nan", lambda m: m.compose([0], latents=images(1, fill=NAN)), ValueError, "latents"),
    case(
        "compose_initializer-str",
        lambda m: m.compose([0], compose_initializer="yes"),
        TypeError,
        "compose_initializer",
    ),
    case(
        "compose_initializer-unconditional",
        lambda m: m.compose_plain_initializer([0], compose_initializer=True),
        ValueError,
        "compose_initializer",
    ),
    case(
        "nothing-to-sample",
        lambda m: m.compose([0], num_langevin_steps=0, use_initializer=False),
        ValueError,
        "num_langevin",
    ),
    case("output_type-unknown", lambda m: m.compose([0], output_type="png"), ValueError, "output_type"),
]


@pytest.mark.parametrize("call, error, match", COMPOSE)
def test_compose_pipeline(m, call, error, match):
    run_case(m, call, error, match)


# ---------------------------------------------------------------------------------------------------------------------
# Models: constructors and forward
# ---------------------------------------------------------------------------------------------------------------------
ENERGY = {"sample_size": S, "block_out_channels": (8,), "layers_per_block": 1, "embedding_dim": 8}
UNET = {"sample_size": S, "block_out_channels": (8, 8), "layers_per_block": 1, "attention_resolutions": ()}
UNET["norm_num_groups"] = 4
MLP = {"data_dim": 2, "hidden_dim": 8, "num_layers": 1}

CONSTRUCTORS = [
    case("energy-sample_size-zero", lambda: EnergyModel(**{**ENERGY, "sample_size": 0}), ValueError, "sample_size"),
    case("energy-sample_size-neg", lambda: EnergyModel(**{**ENERGY, "sample_size": -8}), ValueError, "sample_size"),
    case(
        "energy-sample_size-indivisible",
        lambda: EnergyModel(**{**ENERGY, "sample_size": 9, "block_out_channels": (8, 8)}),
        ValueError,
        "sample_size",
    ),
    case("energy-in_channels-zero", lambda: EnergyModel(**{**ENERGY, "in_channels": 0}), ValueError, "in_channels"),
    case(
        "energy-channels-empty",
        lambda: EnergyModel(**{**ENERGY, "block_out_channels": ()}),
        ValueError,
        "block_out_channels",
    ),
    case(
        "energy-channels-zero",
        lambda: EnergyModel(**{**ENERGY, "block_out_channels": (8, 0)}),
        ValueError,
        "block_out_channels",
    ),
    case("energy-layers-zero", lambda: EnergyModel(**{**ENERGY, "layers_per_block": 0}), ValueError, "layers_per"),
    case("energy-embedding-zero", lambda: EnergyModel(**{**ENERGY, "embedding_dim": 0}), ValueError, "embedding_dim"),
    case("energy-classes-zero", lambda: EnergyModel(**ENERGY, num_class_embeds=0), ValueError, "num_class_embeds"),
    case("energy-classes-float", lambda: EnergyModel(**ENERGY, num_class_embeds=2.5), ValueError, "num_class_embeds"),
    case(
        "energy-names-count",
        lambda: EnergyModel(**ENERGY, num_class_embeds=3, class_names=["a", "b"]),
        ValueError,
        "class_names",
    ),
    case(
        "energy-names-duplicate",
        lambda: EnergyModel(**ENERGY, num_class_embeds=2, class_names=["a", "a"]),
        ValueError,
        "class_names",
    ),
    case(
        "energy-names-str",
        lambda: EnergyModel(**ENERGY, num_class_embeds=3, class_names="abc"),
        TypeError,
        "class_names",
    ),
    case(
        "energy-names-not-str",
        lambda: EnergyModel(**ENERGY, num_class_embeds=2, class_names=[0, 1]),
        TypeError,
        "class_names",
    ),
    case("energy-names-unconditional", lambda: EnergyModel(**ENERGY, class_names=["a"]), ValueError, "class_names"),
    case("unet-sample_size-zero", lambda: InitializerUNet(**{**UNET, "sample_size": 0}), ValueError, "sample_size"),
    case("unet-sample_size-odd", lambda: InitializerUNet(**{**UNET, "sample_size": 7}), ValueError, "sample_size"),
    case("unet-in_channels-zero", lambda: InitializerUNet(**{**UNET, "in_channels": 0}), ValueError, "in_channels"),
    case(
        "unet-channels-empty",
        lambda: InitializerUNet(**{**UNET, "block_out_channels": ()}),
        ValueError,
        "block_out_channels",
    ),
    case("unet-groups", lambda: InitializerUNet(**{**UNET, "norm_num_groups": 3}), ValueError, "norm_num_groups"),
    case("unet-layers-zero", lambda: InitializerUNet(**{**UNET, "layers_per_block": 0}), ValueError, "layers_per"),
    case("unet-classes-zero", lambda: InitializerUNet(**UNET, num_class_embeds=0), ValueError, "num_class_embeds"),
    case("unet-classes-float", lambda: InitializerUNet(**UNET, num_class_embeds=1.5), ValueError, "num_class_embeds"),
    case("energy_mlp-data_dim-zero", lambda: EnergyMLP(**{**MLP, "data_dim": 0}), ValueError, "data_dim"),
    case("energy_mlp-data_dim-float", lambda: EnergyMLP(**{**MLP, "data_dim": 2.5}), ValueError, "data_dim"),
    case("energy_mlp-hidden-zero", lambda: EnergyMLP(**{**MLP, "hidden_dim": 0}), ValueError, "hidden_dim"),
    case("energy_mlp-layers-zero", lambda: EnergyMLP(**{**MLP, "num_layers": 0}), ValueError, "num_layers"),
    case("energy_mlp-act_fn", lambda: EnergyMLP(**MLP, act_fn="relu"), ValueError, "act_fn"),
    case("energy_mlp-classes-zero", lambda: EnergyMLP(**MLP, num_class_embeds=0), ValueError, "num_class_embeds"),
    case(
        "energy_mlp-names-count",
        lambda: EnergyMLP(**MLP, num_class_embeds=2, class_names=["a"]),
        ValueError,
        "class_names",
    ),
    case("init_mlp-data_dim-zero", lambda: InitializerMLP(**{**MLP, "data_dim": 0}), ValueError, "data_dim"),
    case("init_mlp-data_dim-float", lambda: InitializerMLP(**{**MLP, "data_dim": 2.5}), ValueError, "data_dim"),
    case("init_mlp-layers-zero", lambda: InitializerMLP(**{**MLP, "num_layers": 0}), ValueError, "num_layers"),
    case("init_mlp-classes-zero", lambda: InitializerMLP(**MLP, num_class_embeds=0), ValueError, "num_class_embeds"),
]


@pytest.mark.parametrize("call, error, match", CONSTRUCTORS)
def test_model_constructor(call, error, match):
    with pytest.raises(error, match=match):
        call()


def image_model_cases(model_name):
    def forward(sample=None, logsnr=1.0, **kwargs):
        return lambda m: getattr(m, model_name)(images() if sample is None else sample, logsnr, **kwargs)

    cond_name = "c" + model_name
    return [
        case(f"{model_name}-sample-list", forward([[0.0]]), TypeError, "sample"),
        case(f"{model_name}-sample-int", forward(images(dtype=torch.int32)), TypeError, "sample"),
        case(f"{model_name}-sample-complex", forward(images(dtype=torch.complex64)), TypeError, "sample"),
        case(f"{model_name}-sample-channels", forward(images(channels=1)), ValueError, "sample"),
        case(f"{model_name}-sample-size", forward(images(size=2 * S)), ValueError, "sample"),
        case(f"{model_name}-sample-unbatched", forward(images()[0]), ValueError, "sample"),
        case(f"{model_name}-sample-empty", forward(images(0)), ValueError, "sample"),
        case(f"{model_name}-logsnr-str", forward(logsnr="high"), TypeError, "logsnr"),
        case(f"{model_name}-logsnr-shape", forward(logsnr=torch.zeros(3)), ValueError, "logsnr"),
        case(f"{model_name}-logsnr-nan", forward(logsnr=NAN), ValueError, "logsnr"),
        case(f"{model_name}-labels-unconditional", forward(class_labels=labels(0, 1)), ValueError, "class_labels"),
        case(
            f"{cond_name}-labels-out-of-range",
            lambda m: getattr(m, cond_name)(images(), 1.0, class_labels=labels(0, 4)),
            ValueError,
            "class_labels",
        ),
        case(
            f"{cond_name}-labels-negative",
            lambda m: getattr(m, cond_name)(images(), 1.0, class_labels=labels(-1, 0)),
            ValueError,
            "class_labels",
        ),
        case(
            f"{cond_name}-labels-float",
            lambda m: getattr(m, cond_name)(images(), 1.0, class_labels=torch.tensor([0.0, 1.0])),
            TypeError,
            "class_labels",
        ),
        case(
            f"{cond_name}-labels-count",
            lambda m: getattr(m, cond_name)(images(), 1.0, class_labels=labels(0, 1, 2)),
            ValueError,
            "class_labels",
        ),
    ]


def vector_model_cases(model_name):
    def forward(sample=None, logsnr=1.0, **kwargs):
        return lambda m: getattr(m, model_name)(vectors() if sample is None else sample, logsnr, **kwargs)

    return [
        case(f"{model_name}-sample-dim", forward(vectors(dim=3)), ValueError, "sample"),
        case(f"{model_name}-sample-images", forward(images()), ValueError, "sample"),
        case(f"{model_name}-sample-int", forward(vectors(dtype=torch.int64)), TypeError, "sample"),
        case(f"{model_name}-sample-empty", forward(vectors(0)), ValueError, "sample"),
        case(f"{model_name}-logsnr-shape", forward(logsnr=torch.zeros(2, 2)), ValueError, "logsnr"),
        case(f"{model_name}-labels-unconditional", forward(class_labels=labels(0, 0, 0, 0)), ValueError, "class_lab"),
    ]


MODEL_FORWARD = image_model_cases("energy") + image_model_cases("init")
MODEL_FORWARD += vector_model_cases("emlp") + vector_model_cases("imlp")


@pytest.mark.parametrize("call, error, match", MODEL_FORWARD)
def test_model_forward(m, call, error, match):
    run_case(m, call, error, match)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------------------------------
SCHEDULER_CONFIG = [
    case("num_noise_levels-zero", {"num_noise_levels": 0}, ValueError, "num_noise_levels"),
    case("num_noise_levels-bool", {"num_noise_levels": True}, ValueError, "num_noise_levels"),
    case("num_noise_levels-float", {"num_noise_levels": 2.5}, ValueError, "num_noise_levels"),
    case("logsnr-order", {"logsnr_max": -6.0}, ValueError, "logsnr_max"),
    case("logsnr_max-inf", {"logsnr_max": INF}, ValueError, "logsnr_max"),
    case("logsnr_min-nan", {"logsnr_min": NAN}, ValueError, "logsnr_min"),
    case("logsnr_max-str", {"logsnr_max": "9.8"}, TypeError, "logsnr_max"),
    case("num_langevin_steps-zero", {"num_langevin_steps": 0}, ValueError, "num_langevin_steps"),
    case("num_langevin_steps-negative", {"num_langevin_steps": -1}, ValueError, "num_langevin_steps"),
    case("schedule-unknown", {"schedule": "linear"}, ValueError, "schedule"),
    case("step_size_rule-unknown", {"langevin_step_size_rule": "video"}, ValueError, "langevin_step_size_rule"),
    case("step_size_scale-zero", {"langevin_step_size_scale": 0.0}, ValueError, "langevin_step_size_scale"),
    case("step_size_scale-nan", {"langevin_step_size_scale": NAN}, ValueError, "langevin_step_size_scale"),
    case("tweedie-nan", {"tweedie_coefficient": NAN}, ValueError, "tweedie_coefficient"),
    case("tweedie-str", {"tweedie_coefficient": "2"}, TypeError, "tweedie_coefficient"),
    case("clip_sample-str", {"clip_sample": "yes"}, TypeError, "clip_sample"),
]


@pytest.mark.parametrize("config, error, match", SCHEDULER_CONFIG)
def test_scheduler_config(config, error, match):
    with pytest.raises(error, match=match):
        CDRLScheduler(**config)


# ---------------------------------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------------------------------
def train(m, conditional=False, samples=None, **kwargs):
    energy, init = (m.cenergy, m.cinit) if conditional else (m.energy, m.init)
    samples = images() if samples is None else samples
    return cdrl_training_step(energy, init, m.sched, samples, **kwargs)


TRAINING_STEP = [
    case("samples-list", lambda m: train(m, samples=[[0.0]]), TypeError, "clean_samples"),
    case("samples-int", lambda m: train(m, samples=images(dtype=torch.uint8)), TypeError, "clean_samples"),
    case("samples-empty", lambda m: train(m, samples=images(0)), ValueError, "clean_samples"),
    case("samples-1d", lambda m: train(m, samples=torch.zeros(3)), ValueError, "clean_samples"),
    case("samples-channels", lambda m: train(m, samples=images(channels=1)), ValueError, "sample"),
    case("labels-unconditional", lambda m: train(m, class_labels=labels(0, 1)), ValueError, "class_labels"),
    case("labels-out-of-range", lambda m: train(m, True, class_labels=labels(0, 3)), ValueError, "class_labels"),
    case("labels-count", lambda m: train(m, True, class_labels=labels(0)), ValueError, "class_labels"),
    case(
        "labels-float",
        lambda m: train(m, True, class_labels=torch.tensor([0.7, 1.2])),
        TypeError,
        "class_labels",
    ),
    case(
        "label_dropout-above-one",
        lambda m: train(m, True, class_labels=labels(0, 1), label_dropout=1.5),
        ValueError,
        "label_dropout",
    ),
    case("label_dropout-negative", lambda m: train(m, label_dropout=-0.1), ValueError, "label_dropout"),
    case("precision-unknown", lambda m: train(m, precision="int8"), ValueError, "precision"),
    case("generator-int", lambda m: train(m, generator=0), TypeError, "generator"),
    case("levels-length", lambda m: train(m, level_probabilities=[1.0] * 5), ValueError, "level_probabilities"),
    case("levels-negative", lambda m: train(m, level_probabilities=[2.0] + [-0.1] * 5), ValueError, "level_proba"),
    case("levels-nan", lambda m: train(m, level_probabilities=[NAN] + [1.0] * 5), ValueError, "level_probabilities"),
    case("levels-zero-sum", lambda m: train(m, level_probabilities=[0.0] * 6), ValueError, "level_probabilities"),
    case("drop_labels-probability", lambda m: drop_labels(labels(0, 1), 3, probability=2.0), ValueError, "probabili"),
]


@pytest.mark.parametrize("call, error, match", TRAINING_STEP)
def test_training_step(m, call, error, match):
    run_case(m, call, error, match)


def test_training_step_reports_non_finite_data_as_non_finite_losses(m):
    """NaN data is not checked inside the hot training step (no host sync per step): it shows in the losses, which
    the training script checks every step before it updates (and rolls back on)."""
    output = cdrl_training_step(m.emlp, m.imlp, m.sched, vectors(fill=NAN), generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(output.ebm_loss) and not torch.isfinite(output.initializer_loss)


# ---------------------------------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------------------------------
DATA = [
    case("shapes-num_samples-zero", lambda: load_shapes_dataset(num_samples=0), ValueError, "num_samples"),
    case("shapes-num_samples-float", lambda: load_shapes_dataset(num_samples=2.0), ValueError, "num_samples"),
    case("shapes-resolution-small", lambda: load_shapes_dataset(4, resolution=4), ValueError, "resolution"),
    case("shapes-exclude-key", lambda: load_shapes_dataset(4, exclude=[{"texture": "x"}]), ValueError, "exclude"),
    case("shapes-exclude-value", lambda: load_shapes_dataset(4, exclude=[{"shape": "hexagon"}]), ValueError, "excl"),
    case("shapes-exclude-str", lambda: load_shapes_dataset(4, exclude="circle"), ValueError, "exclude"),
    case(
        "shapes-exclude-everything",
        lambda: load_shapes_dataset(4, exclude=[{"size": "small"}, {"size": "large"}]),
        ValueError,
        "exclude",
    ),
    case("shapes-render-color", lambda: render_shape("circle", "pink", "small", 16, 1, 1), ValueError, "color"),
    case("shapes-mask-outside", lambda: shape_mask("square", "large", 16, 10, 0), ValueError, "does not fit"),
    case("shapes-box-size", lambda: box_size("huge", 16), ValueError, "size"),
    case("digits-resolution-small", lambda: load_digits_dataset(resolution=4), ValueError, "resolution"),
    case("digits-resolution-str", lambda: load_digits_dataset(resolution="16"), ValueError, "resolution"),
    case("toy-name-unknown", lambda: sample_toy("moons", 4), ValueError, "name"),
    case("toy-num_samples-zero", lambda: sample_toy("checkerboard", 0), ValueError, "num_samples"),
    case("toy-num_samples-negative", lambda: sample_toy("8gaussians", -5), ValueError, "num_samples"),
    case("toy-scale-zero", lambda: sample_toy("2spirals", 4, scale=0.0), ValueError, "scale"),
    case("toy-scale-nan", lambda: sample_toy("2spirals", 4, scale=NAN), ValueError, "scale"),
    case("toy-scale-str", lambda: sample_toy("checkerboard", 4, scale="4"), TypeError, "scale"),
    case("toy-density-spirals", lambda: toy_log_density("2spirals", vectors()), ValueError, "2spirals"),
    case("toy-density-int", lambda: toy_log_density("checkerboard", vectors(dtype=torch.long)), TypeError, "points"),
    case("toy-density-dim", lambda: toy_log_density("8gaussians", vectors(dim=3)), ValueError, "points"),
    case("toy-density-alpha", lambda: toy_log_density("8gaussians", vectors(), alpha_bar=0.0), ValueError, "alpha_"),
    case("toy-support-spirals", lambda: toy_support("2spirals", vectors()), ValueError, "spirals"),
]


@pytest.mark.parametrize("call, error, match", DATA)
def test_data_helpers(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------------------------------
FEATURES = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
EVALUATION = [
    case("fd-one-sample", lambda m: frechet_distance(FEATURES[:1], FEATURES), ValueError, "real_features"),
    case("fd-width", lambda m: frechet_distance(FEATURES, FEATURES[:, :3]), ValueError, "width"),
    case("fd-nan", lambda m: frechet_distance(FEATURES, torch.full((6, 4), NAN)), ValueError, "fake_features"),
    case("fd-int", lambda m: frechet_distance(FEATURES.long(), FEATURES), TypeError, "real_features"),
    case("fd-list", lambda m: frechet_distance(FEATURES, [[0.0]]), TypeError, "fake_features"),
    case("kid-subsets-zero", lambda m: kernel_distance(FEATURES, FEATURES, subsets=0), ValueError, "subsets"),
    case("kid-subset_size-one", lambda m: kernel_distance(FEATURES, FEATURES, subset_size=1), ValueError, "subset_s"),
    case(
        "kid-subset_size-float", lambda m: kernel_distance(FEATURES, FEATURES, subset_size=2.5), ValueError, "subset"
    ),
    case(
        "feature_distances-real-int",
        lambda m: feature_distances(images(dtype=torch.long), images(), m.classifier),
        TypeError,
        "real_images",
    ),
    case(
        "feature_distances-fake-3d",
        lambda m: feature_distances(images(), images()[0], m.classifier),
        ValueError,
        "fake_images",
    ),
    case(
        "feature_distances-batch_size",
        lambda m: feature_distances(images(), images(), m.classifier, batch_size=0),
        ValueError,
        "batch_size",
    ),
    case("extract-images-nan", lambda m: extract_features(m.classifier, images(fill=NAN)), ValueError, "images"),
    case(
        "accuracy-labels-count",
        lambda m: classifier_accuracy(m.classifier, images(2), labels(0, 1, 2)),
        ValueError,
        "labels",
    ),
    case(
        "accuracy-labels-float",
        lambda m: classifier_accuracy(m.classifier, images(2), torch.zeros(2)),
        ValueError,
        "labels",
    ),
    case(
        "accuracy-images-nan",
        lambda m: classifier_accuracy(m.classifier, images(2, fill=NAN), labels(0, 1)),
        ValueError,
        "images",
    ),
    case(
        "accuracy-images-channels",
        lambda m: classifier_accuracy(m.classifier, images(2, 1), labels(0, 1)),
        ValueError,
        "images",
    ),
    case(
        "score_samples-reference-int",
        lambda m: score_samples(m.classifier, images(), None, images(dtype=torch.long), labels(0, 1)),
        TypeError,
        "reference_images",
    ),
    case(
        "score_samples-labels-count",
        lambda m: score_samples(m.classifier, images(), labels(0), images(), labels(0, 1)),
        ValueError,
        "sample_labels",
    ),
    case("auroc-empty", lambda m: ood_auroc([], [1.0]), ValueError, "in_scores"),
    case("auroc-nan", lambda m: ood_auroc([1.0], [NAN]), ValueError, "out_scores"),
    case("auroc-2d", lambda m: ood_auroc(torch.zeros(2, 2), [1.0]), ValueError, "in_scores"),
    case("auroc-strings", lambda m: ood_auroc(["high"], [1.0]), TypeError, "in_scores"),
    case("shift-unknown", lambda m: shift_images(images(), "blur"), ValueError, "shift"),
    case("shift-not-tensor", lambda m: shift_images(np.zeros((2, 3, S, S)), "inverted"), TypeError, "images"),
    case("shift-int", lambda m: shift_images(images(dtype=torch.long), "uniform"), TypeError, "images"),
    case("shift-3d", lambda m: shift_images(images()[0], "inverted"), ValueError, "images"),
    case("shift-interpolated-one", lambda m: shift_images(images(1), "interpolated"), ValueError, "two images"),
    case("grid-bound-zero", lambda m: density_grid(0.0), ValueError, "bound"),
    case("grid-resolution-one", lambda m: density_grid(1.0, resolution=1), ValueError, "resolution"),
    case(
        "energy-density-int", lambda m: energy_log_density(m.emlp, m.sched, vectors(dtype=torch.long)), TypeError, "p"
    ),
    case("energy-density-nan", lambda m: energy_log_density(m.emlp, m.sched, vectors(fill=NAN)), ValueError, "points"),
    case(
        "energy-density-noise_level",
        lambda m: energy_log_density(m.emlp, m.sched, vectors(), noise_level=6),
        ValueError,
        "noise_level",
    ),
    case(
        "energy-density-batch_size",
        lambda m: energy_log_density(m.emlp, m.sched, vectors(), batch_size=0),
        ValueError,
        "batch_size",
    ),
    case("grid-probabilities-empty", lambda m: grid_log_probabilities(torch.full((4,), -INF)), ValueError, "log_dens"),
    case("kl-shape", lambda m: kl_divergence_on_grid(torch.zeros(4), torch.zeros(5)), ValueError, "same grid"),
    case("swd-projections", lambda m: sliced_wasserstein_distance(vectors(), vectors(), 0), ValueError, "num_proj"),
    case("swd-one-sample", lambda m: sliced_wasserstein_distance(vectors(1), vectors()), ValueError, "first"),
    case("swd-dim", lambda m: sliced_wasserstein_distance(vectors(), vectors(dim=3)), ValueError, "dimension"),
    case("mmd-bandwidth", lambda m: mmd_rbf(vectors(), vectors(), bandwidths=[0.0]), ValueError, "bandwidths"),
    case("mmd-max_samples", lambda m: mmd_rbf(vectors(), vectors(), max_samples=1), ValueError, "max_samples"),
    case("support-spirals", lambda m: fraction_in_support(vectors(), "2spirals"), ValueError, "spirals"),
]


@pytest.mark.parametrize("call, error, match", EVALUATION)
def test_evaluation_helpers(m, call, error, match):
    run_case(m, call, error, match)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: missing or corrupted files
# ---------------------------------------------------------------------------------------------------------------------
WEIGHTS = "diffusion_pytorch_model.safetensors"


def write(path, text):
    Path(path).write_text(text)
    return None


def set_config(path, **values):
    config = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps({**config, **values}))


LOADING = [
    case("missing-folder", lambda d: d / "absent", FileNotFoundError, "absent"),
    case("model_index-missing", lambda d: (d / "model_index.json").unlink(), FileNotFoundError, "model_index.json"),
    case("model_index-corrupt", lambda d: write(d / "model_index.json", "{oops"), ValueError, "model_index.json"),
    case("weights-missing", lambda d: (d / "energy_model" / WEIGHTS).unlink(), FileNotFoundError, "energy_model"),
    case("weights-corrupt", lambda d: write(d / "initializer" / WEIGHTS, "garbage"), ValueError, "safetensors"),
    case("config-corrupt", lambda d: write(d / "energy_model" / "config.json", "[1, 2"), ValueError, "config.json"),
    case(
        "scheduler-config-corrupt",
        lambda d: write(d / "scheduler" / "scheduler_config.json", "{"),
        ValueError,
        "scheduler_config.json",
    ),
    case(
        "scheduler-config-invalid-value",
        lambda d: set_config(d / "scheduler" / "scheduler_config.json", num_noise_levels=0),
        ValueError,
        "num_noise_levels",
    ),
    case(
        "config-invalid-value",
        lambda d: set_config(d / "energy_model" / "config.json", sample_size=0),
        ValueError,
        "sample_size",
    ),
]


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipeline"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage, error, match", LOADING)
def test_pipeline_loading(saved_pipeline, tmp_path, damage, error, match):
    folder = tmp_path / "pipeline"
    shutil.copytree(saved_pipeline, folder)
    target = damage(folder)  # a damaging step returns another path to load, or None
    with pytest.raises(error, match=match):
        CDRLPipeline.from_pretrained(folder if target is None else target)


@pytest.mark.parametrize(
    "model_class, damage, error, match",
    [
        pytest.param(EnergyModel, lambda d: (d / WEIGHTS).unlink(), FileNotFoundError, WEIGHTS, id="weights-missing"),
        pytest.param(InitializerUNet, lambda d: write(d / WEIGHTS, "x"), ValueError, "safetensors", id="weights-bad"),
        pytest.param(
            EnergyModel, lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json", id="config"
        ),
        pytest.param(
            InitializerUNet, lambda d: write(d / "config.json", "{"), ValueError, "config.json", id="config-bad"
        ),
    ],
)
def test_model_loading(saved_pipeline, tmp_path, model_class, damage, error, match):
    component = "energy_model" if model_class is EnergyModel else "initializer"
    folder = tmp_path / component
    shutil.copytree(saved_pipeline / component, folder)
    damage(folder)
    with pytest.raises(error, match=match):
        model_class.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Example command lines: invalid values exit non-zero with a message naming the flag (nothing trains)
# ---------------------------------------------------------------------------------------------------------------------
def run_example(name, argv, monkeypatch):
    """Run ``examples/NAME.py ARGV`` the way a user does (as ``__main__``), in this process to save the imports."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")


MODEL = ["--model", "outputs/model"]
EXAMPLE_ARGS = [
    ("train_cdrl", ["--train_batch_size=0"], "--train_batch_size"),
    ("train_cdrl", ["--num_noise_levels=0"], "--num_noise_levels"),
    ("train_cdrl", ["--num_langevin_steps=-1"], "--num_langevin_steps"),
    ("train_cdrl", ["--label_dropout=1.5"], "--label_dropout"),
    ("train_cdrl", ["--resolution=big"], "--resolution"),
    ("train_cdrl", ["--mixed_precision=fp8"], "--mixed_precision"),
    ("train_cdrl", ["--max_train_steps=0"], "--max_train_steps"),
    ("train_cdrl", ["--ebm_channels=a,b"], "--ebm_channels"),
    ("toy_2d", ["--dataset=moons"], "--dataset"),
    ("toy_2d", ["--batch_size=0"], "batch_size"),
    ("toy_2d", ["--num_noise_levels=0"], "num_noise_levels"),
    ("toy_2d", ["--num_langevin_steps=-3"], "num_langevin_steps"),
    ("toy_2d", ["--ema_decay=1.5"], "ema_decay"),
    ("toy_2d", ["--ebm_learning_rate=-1e-3"], "ebm_learning_rate"),
    ("toy_2d", ["--num_train_steps=many"], "--num_train_steps"),
    ("inpaint", [], "--model"),
    ("inpaint", [*MODEL, "--num_images=0"], "--num_images"),
    ("inpaint", [*MODEL, "--num_seeds=-1"], "--num_seeds"),
    ("inpaint", [*MODEL, "--guidance_scale=-1"], "--guidance_scale"),
    ("inpaint", [*MODEL, "--num_langevin_steps=-2"], "--num_langevin_steps"),
    ("inpaint", [*MODEL, "--upscale=0"], "--upscale"),
    ("inpaint", [*MODEL, "--mask=circle"], "--mask"),
    ("inpaint", [*MODEL, "--device=gpu"], "--device"),
    ("compose", [*MODEL, "--num_samples=0"], "--num_samples"),
    ("compose", [*MODEL, "--guidance_scales", "1", "-1"], "--guidance_scales"),
    ("compose", [*MODEL, "--guidance_scales", "nan"], "--guidance_scales"),
    ("compose", [*MODEL, "--upscale=0"], "--upscale"),
    ("compose", [*MODEL, "--num_langevin_steps=-1"], "--num_langevin_steps"),
    ("compose", [*MODEL, "--device=tpu:x"], "--device"),
    ("ood_detection", [*MODEL, "--num_images=0"], "--num_images"),
    ("ood_detection", [*MODEL, "--batch_size=0"], "--batch_size"),
    ("ood_detection", [*MODEL, "--noise_level=-1"], "--noise_level"),
    ("ood_detection", [*MODEL, "--embedded_dataset=cifar"], "--embedded_dataset"),
    ("ood_detection", [*MODEL, "--device=gpu"], "--device"),
]


@pytest.mark.parametrize(
    "script, argv, flag", [pytest.param(*args, id=f"{args[0]}-{args[2].lstrip('-')}") for args in EXAMPLE_ARGS]
)
def test_example_arguments(script, argv, flag, capsys, monkeypatch):
    with pytest.raises((SystemExit, ValueError)) as info:
        run_example(script, argv, monkeypatch)
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None)
        message = capsys.readouterr().err
    else:
        message = str(info.value)
    assert flag in message
