"""Every Python block of the README, the quickstart and the docs' home page runs as written.

The blocks load the models that the documented training commands write (``outputs/cdrl-shapes`` from ``make train``,
``outputs/cdrl-attributes`` from ``make train ARGS="--attribute_columns shape color ..."``). Tiny untrained models
with the same resolution and classes are saved at those paths in a temporary working directory, and each file's
blocks run there in order, in one namespace, as a reader pasting them into one Python session would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cdrl_diffusers import CDRLPipeline, CDRLScheduler, EnergyModel, InitializerUNet
from cdrl_diffusers.data.shapes import ATTRIBUTES

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/quickstart.md", "docs/index.md")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
LOADED = re.compile(r"from_pretrained\(\s*\"([^\"]+)\"")
ATTRIBUTE_NAMES = [f"{column}={value}" for column in ("shape", "color") for value in ATTRIBUTES[column]]


def tiny_shapes_pipeline(class_names: list[str] | None = None) -> CDRLPipeline:
    """A 16x16 RGB pipeline like the training script's output, small enough to sample in milliseconds."""
    torch.manual_seed(0)
    num_classes = len(class_names) if class_names else None
    energy = EnergyModel(
        sample_size=16,
        block_out_channels=(8, 16),
        layers_per_block=1,
        embedding_dim=16,
        num_class_embeds=num_classes,
        class_names=class_names,
    )
    initializer = InitializerUNet(
        sample_size=16,
        block_out_channels=(8, 8),
        layers_per_block=1,
        attention_resolutions=(),
        norm_num_groups=4,
        num_class_embeds=num_classes,
    )
    scheduler = CDRLScheduler(num_noise_levels=2, num_langevin_steps=1)
    return CDRLPipeline(energy_model=energy, initializer=initializer, scheduler=scheduler)


MODELS = {"outputs/cdrl-shapes": None, "outputs/cdrl-attributes": ATTRIBUTE_NAMES}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for path, class_names in MODELS.items():
        tiny_shapes_pipeline(class_names).save_pretrained(root / path)
    return root


def python_blocks(document: str) -> list[str]:
    return PYTHON_BLOCK.findall((REPO_ROOT / document).read_text(encoding="utf-8"))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_python_blocks_run_as_written(document, workdir, monkeypatch):
    blocks = python_blocks(document)
    assert blocks, f"{document} has no Python block"
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__main__"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"{document}, Python block {number}", "exec"), namespace)  # noqa: S102


def test_blocks_load_only_models_that_a_documented_command_writes():
    """A block loading another path would fail for readers (and would not be covered by the test above)."""
    written = set(MODELS) | {"my-cdrl-model"}  # saved by the quickstart's own block before it is loaded
    for document in DOCUMENTS:
        for block in python_blocks(document):
            assert set(LOADED.findall(block)) <= written, (document, LOADED.findall(block))
