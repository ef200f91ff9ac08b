"""Model cards: metadata the Hub renders correctly, and a usage snippet that runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import TINY_SIZE, QuadraticEnergy, tiny_pipeline
from huggingface_hub import ModelCard

from cdrl_diffusers import (
    CDRLPipeline,
    CDRLScheduler,
    EnergyMLP,
    InitializerMLP,
    create_model_card,
    read_model_card_section,
)

CLASS_NAMES = ["circle", "square", "triangle"]


def python_block(card: ModelCard) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    return code


def test_unconditional_card_metadata():
    card = create_model_card(tiny_pipeline(), folder="outputs/cdrl-shapes", dataset_name="cdrl-shapes")
    # Not "diffusers": the Hub would then show a DiffusionPipeline snippet that cannot load these components.
    assert card.data.library_name == "cdrl_diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers", "cdrl_diffusers", "energy-based-model", "unconditional-image-generation"} <= set(
        card.data.tags
    )
    assert card.data.datasets is None  # a local name, not a Hub dataset id
    assert "trained on cdrl-shapes" in card.text
    assert "| EBM spectral norm | on (App. A.1) |" in card.text
    assert "| Initializer dropout | 0.1 |" in card.text  # InitializerUNet's default, as App. A.1


def test_card_leaves_out_what_a_custom_energy_model_does_not_configure():
    pipeline = tiny_pipeline()
    pipeline.energy_model.register_to_config(use_spectral_norm=False)
    assert "| EBM spectral norm | off |" in create_model_card(pipeline, folder="out").text
    custom = CDRLPipeline(
        energy_model=QuadraticEnergy(data_dim=2),
        initializer=InitializerMLP(data_dim=2, hidden_dim=8),
        scheduler=CDRLScheduler(num_noise_levels=2, num_langevin_steps=1),
    )
    card = create_model_card(custom, folder="out")
    assert "spectral norm" not in card.text and "| EBM parameters |" in card.text
    assert "dropout" not in card.text  # the MLP initializer has none


def test_class_conditional_card_has_no_unconditional_task():
    card = create_model_card(tiny_pipeline(num_class_embeds=3, class_names=CLASS_NAMES), repo_id="org/cdrl-tiny")
    assert card.data.pipeline_tag is None  # the Hub has no class-conditional image generation task
    assert "class-conditional-image-generation" in card.data.tags and "diffusers" in card.data.tags
    assert 'class_labels=["circle"]' in python_block(card)


def test_vector_model_card():
    pipeline = CDRLPipeline(
        energy_model=EnergyMLP(data_dim=2, hidden_dim=8, num_layers=2, embedding_dim=8),
        initializer=InitializerMLP(data_dim=2, hidden_dim=8),
        scheduler=CDRLScheduler(num_noise_levels=2, num_langevin_steps=1),
    )
    card = create_model_card(pipeline, folder="toy")
    assert card.data.pipeline_tag is None and "unconditional-image-generation" not in card.data.tags
    assert "torch.randn(4, 2)" in python_block(card) and "vectors of 2" in card.text


def test_datasets_lists_hub_dataset_ids_only():
    card = create_model_card(tiny_pipeline(), repo_id="org/model", dataset_id="org/shapes")
    assert card.data.datasets == ["org/shapes"]
    assert "[org/shapes](https://huggingface.co/datasets/org/shapes)" in card.text
    for bad in ("./data/shapes", "data/train/shapes", "my shapes"):
        with pytest.raises(ValueError, match="`dataset_id` must be a Hub id"):
            create_model_card(tiny_pipeline(), repo_id="org/model", dataset_id=bad)
    with pytest.raises(ValueError, match="`repo_id` must be a Hub id"):
        create_model_card(tiny_pipeline(), repo_id="outputs/runs/model")
    with pytest.raises(TypeError, match="`repo_id`"):
        create_model_card(tiny_pipeline(), repo_id=3)


def test_install_line_and_snippet_source():
    card = create_model_card(tiny_pipeline(), repo_id="org/cdrl-tiny", folder="outputs/cdrl-tiny")
    assert 'CDRLPipeline.from_pretrained("org/cdrl-tiny")' in python_block(card)  # the repo id wins when known
    assert "pip install cdrl_diffusers" not in card.text and "path/to/this/folder" not in card.text
    assert "pip install ./cdrl_diffusers" in card.text and "not on PyPI" in card.text
    card = create_model_card(tiny_pipeline(), folder="outputs/cdrl-tiny")
    assert 'CDRLPipeline.from_pretrained("outputs/cdrl-tiny")' in python_block(card)


def test_the_usage_snippet_runs_as_written(tmp_path):
    """The card's Python block, run in a fresh interpreter from the folder's parent, loads the saved pipeline."""
    pipeline = tiny_pipeline(num_class_embeds=3, class_names=CLASS_NAMES, num_noise_levels=2, num_langevin_steps=1)
    folder = tmp_path / "cdrl-tiny"
    pipeline.save_pretrained(folder)
    card = create_model_card(pipeline, folder="cdrl-tiny")
    card.save(folder / "README.md")
    code = python_block(ModelCard.load(folder / "README.md"))
    code += f"assert len(images) == 4 and images[0].size == ({TINY_SIZE}, {TINY_SIZE})\n"
    code += "assert scores.shape == (4,) and torch.isfinite(scores).all()\nprint('ok')\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok") and (tmp_path / "sample.png").is_file()


def test_card_sections_read_back_as_written(tmp_path):
    details = {"Optimisation steps": 1792, "Training time": "13.8 min on 1 x cpu", "Odd | value": "a | b"}
    card = create_model_card(tiny_pipeline(), folder="out", training_details=details, evaluation={"FD": 2.41})
    assert read_model_card_section(card, "Training") == {key: str(value) for key, value in details.items()}
    card.save(tmp_path / "README.md")
    assert read_model_card_section(tmp_path, "Evaluation") == {"FD": "2.41"}  # a model folder
    model = read_model_card_section(tmp_path / "README.md", "Model")
    assert model["Noise levels T"] == str(tiny_pipeline().scheduler.config.num_noise_levels)
    with pytest.raises(ValueError, match="no '## Training' table"):
        read_model_card_section(create_model_card(tiny_pipeline(), folder="out"), "Training")
