"""Hub model cards for CDRL pipelines, built offline with ``huggingface_hub.ModelCard``.

The metadata is what the Hub renders: ``library_name: cdrl_diffusers``, because a ``diffusers`` library name would
make the Hub show a ``DiffusionPipeline.from_pretrained`` snippet that cannot load these components (the ``diffusers``
tag still lists the model with diffusers models); ``pipeline_tag: unconditional-image-generation`` for unconditional
image models only (the Hub has no task for class-conditional or compositional image generation, so those cards, and
those of vector models, carry no task rather than a wrong one); ``datasets`` only for Hub dataset ids.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from . import __version__

CITATION = """@inproceedings{zhu2024cdrl,
  title     = {Learning Energy-Based Models by Cooperative Diffusion Recovery Likelihood},
  author    = {Zhu, Yaxuan and Xie, Jianwen and Wu, Ying Nian and Gao, Ruiqi},
  booktitle = {The Twelfth International Conference on Learning Representations, ICLR},
  year      = {2024}
}"""
PAPER_URL = "https://openreview.net/forum?id=AyzkDpuqcl"
LIBRARY_NAME = "cdrl_diffusers"
BASE_TAGS = ("diffusers", "cdrl_diffusers", "energy-based-model", "cdrl")


def _table(rows: Mapping[str, Any]) -> str:
    """A two-column Markdown table of ``rows``; rows whose value is ``None`` (not applicable) are left out."""
    lines = ["| | |", "|---|---|"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows.items() if value is not None]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A table cell: pipes escaped, so that a value never splits its row."""
    return str(value).replace("|", "\\|")


def _hub_id(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a Hub id string, got {type(value).__name__}.")
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ValueError(f"`{name}` must be a Hub id such as 'org/name', got {value!r} ({error}).") from error
    return value


def create_model_card(
    pipeline: Any,
    *,
    repo_id: str | None = None,
    folder: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    training_details: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    sample_grid: str | None = None,
    data_grid: str | None = None,
    license: str = "apache-2.0",
    extra_tags: tuple[str, ...] = (),
    description: str | None = None,
) -> ModelCard:
    """A model card (README.md with YAML metadata) describing a CDRL pipeline.

    Args:
        pipeline: a ``CDRLPipeline`` (or ``CDRLInpaintPipeline`` / ``CDRLComposePipeline``).
        repo_id: the Hub repo the card goes to (``"org/name"``); the usage snippet loads from it.
        folder: the local folder the card is saved in, used by the usage snippet when ``repo_id`` is not given.
        dataset_name: a name for the training data, shown in the title (e.g. an embedded or local dataset).
        dataset_id: the Hub dataset id of the training data, recorded in the metadata's ``datasets`` (which the
            Hub links); leave it out for data that is not on the Hub.
        training_details: hyper-parameters and run facts (steps, batch size, learning rates, time, ...).
        evaluation: metric names and values, when known.
        sample_grid: path of a sample image, relative to the saved folder.
        data_grid: path of a grid of training images, relative to the saved folder, shown beside ``sample_grid``.
        license: the licence identifier.
        extra_tags: tags added to the defaults.
        description: the paragraph under the title, replacing the default one (e.g. for converted checkpoints).
    """
    repo_id = _hub_id(repo_id, "repo_id")
    dataset_id = _hub_id(dataset_id, "dataset_id")
    energy_config = pipeline.energy_model.config
    scheduler_config = pipeline.scheduler.config
    class_names = getattr(energy_config, "class_names", None)
    conditional = energy_config.num_class_embeds is not None
    size = getattr(energy_config, "sample_size", None)
    channels = getattr(energy_config, "in_channels", None)
    images = size is not None

    if images:
        task = "class-conditional-image-generation" if conditional else "unconditional-image-generation"
        tags = BASE_TAGS + (task,)
    else:
        tags = BASE_TAGS
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="unconditional-image-generation" if images and not conditional else None,
        tags=list(dict.fromkeys(tags + tuple(extra_tags))),
        license=license,
        datasets=[dataset_id] if dataset_id else None,
    )

    if repo_id is not None:
        source = repo_id
    elif folder is not None:
        source = os.fspath(folder)
    else:
        source = getattr(pipeline, "name_or_path", None) or "."
    arguments = "batch_size=4, generator=torch.manual_seed(0)"
    if conditional:
        label = json.dumps(class_names[0]) if class_names else "0"
        arguments = f"batch_size=4, class_labels=[{label}], guidance_scale=0.7, generator=torch.manual_seed(0)"
    if images:
        sample_lines = f'images = pipe({arguments}).images\nimages[0].save("sample.png")\n'
        scored = f"torch.rand(4, {channels}, {size}, {size}) * 2 - 1"
    else:
        sample_lines = f'samples = pipe({arguments}, output_type="latent").images\n'
        scored = f"torch.randn(4, {energy_config.data_dim})"
    usage = (
        "```python\nimport torch\nfrom cdrl_diffusers import CDRLPipeline\n\n"
        f"pipe = CDRLPipeline.from_pretrained({json.dumps(source)})\n"
        f"{sample_lines}"
        "# Unnormalised log-density (higher = more in-distribution), e.g. for OOD detection:\n"
        f"scores = pipe.log_density({scored})\n```"
    )

    architecture = {
        "Resolution": f"{size}x{size}, {channels} channel(s)" if images else f"vectors of {energy_config.data_dim}",
        "Noise levels T": scheduler_config.num_noise_levels,
        "Langevin steps K": scheduler_config.num_langevin_steps,
        "Schedule": f"{scheduler_config.schedule}, log-SNR {scheduler_config.logsnr_max} to "
        f"{scheduler_config.logsnr_min}",
        "EBM parameters": f"{sum(p.numel() for p in pipeline.energy_model.parameters()) / 1e6:.2f} M",
        "EBM spectral norm": {True: "on (App. A.1)", False: "off"}.get(energy_config.get("use_spectral_norm")),
        "Initializer parameters": f"{sum(p.numel() for p in pipeline.initializer.parameters()) / 1e6:.2f} M",
        "Initializer dropout": pipeline.initializer.config.get("dropout"),
        "Classes": (", ".join(class_names) if class_names else energy_config.num_class_embeds)
        if conditional
        else "none",
    }
    title = "# CDRL energy-based model"
    if dataset_id:
        title += f" trained on [{dataset_name or dataset_id}](https://huggingface.co/datasets/{dataset_id})"
    elif dataset_name:
        title += f" trained on {dataset_name}"
    sections = [
        title,
        description
        or "A sequence of energy-based models, one per noise level, each paired with an initializer network, trained "
        f"by [Cooperative Diffusion Recovery Likelihood]({PAPER_URL}) (Zhu, Xie, Wu & Gao, ICLR 2024) with the "
        "`cdrl_diffusers` library. Sampling starts from Gaussian noise; at each level the initializer proposes a "
        "sample and a few Langevin steps on the energy refine it.",
        "## Usage",
        f"Install `cdrl_diffusers` (version {__version__} wrote this card) from a checkout of its source repository; "
        "it is not on PyPI, and `diffusers.DiffusionPipeline.from_pretrained` cannot load this model, because its "
        "components are classes of `cdrl_diffusers`.",
        "```bash\npip install ./cdrl_diffusers  # the folder of the checkout\n```",
        usage,
        "`CDRLInpaintPipeline` and `CDRLComposePipeline` load the same folder or repo.",
        "## Model",
        _table(architecture),
    ]
    if sample_grid and data_grid:
        panels = "| samples: the initializer alone (left), CDRL (right) | training data |\n| --- | --- |\n"
        sections += ["## Samples", panels + f"| ![samples]({sample_grid}) | ![training data]({data_grid}) |"]
    elif sample_grid:
        sections += ["## Samples", f"![samples]({sample_grid})"]
    if training_details:
        sections += ["## Training", _table(training_details)]
    if evaluation:
        sections += ["## Evaluation", _table(evaluation)]
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def read_model_card_section(card: ModelCard | str | os.PathLike, section: str) -> dict[str, str]:
    """The two-column table under ``## {section}`` of a card written by :func:`create_model_card`, as strings.

    ``card`` is a ``ModelCard``, or the path of a model folder or of its README.md. Sections: "Model", "Training"
    (the ``training_details`` a training run recorded, e.g. "Optimisation steps") and "Evaluation". Raises
    ``ValueError`` when the card has no such section.
    """
    if isinstance(card, ModelCard):
        text = card.text
    else:
        path = Path(card)
        text = (path / "README.md" if path.is_dir() else path).read_text(encoding="utf-8")
    header = rf"^## {re.escape(section)}\n\n\| \| \|\n\|---\|---\|\n"
    match = re.search(header + r"((?:\|.*\|(?:\n|$))*)", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"`card` has no '## {section}' table.")
    rows = {}
    for line in match.group(1).splitlines():
        key, value = re.split(r"(?<!\\)\|", line)[1:3]
        rows[key.strip().replace("\\|", "|")] = value.strip().replace("\\|", "|")
    return rows
