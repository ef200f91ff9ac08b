"""Hub model cards for CDRL pipelines, built offline with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CITATION = """@inproceedings{zhu2024cdrl,
  title     = {Learning Energy-Based Models by Cooperative Diffusion Recovery Likelihood},
  author    = {Zhu, Yaxuan and Xie, Jianwen and Wu, Ying Nian and Gao, Ruiqi},
  booktitle = {The Twelfth International Conference on Learning Representations, ICLR},
  year      = {2024}
}"""

BASE_TAGS = ("cdrl_diffusers", "energy-based-model", "cdrl", "diffusers", "unconditional-image-generation")


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def create_model_card(
    pipeline: Any,
    *,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    training_details: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    sample_grid: str | None = None,
    license: str = "apache-2.0",
    extra_tags: tuple[str, ...] = (),
) -> ModelCard:
    """A model card (README.md with YAML metadata) describing a CDRL pipeline.

    Args:
        pipeline: a ``CDRLPipeline`` (or one of its subclasses).
        repo_id: the Hub id used in the usage snippet (defaults to a local path placeholder).
        dataset_name: the training data, recorded in the metadata's ``datasets``.
        training_details: hyper-parameters and run facts (steps, batch size, learning rates, time, ...).
        evaluation: metric names and values, when known.
        sample_grid: path of a sample image, relative to the saved folder.
        license: the licence identifier.
        extra_tags: tags added to the defaults.
    """
    energy_config = pipeline.energy_model.config
    scheduler_config = pipeline.scheduler.config
    class_names = getattr(energy_config, "class_names", None)
    conditional = energy_config.num_class_embeds is not None
    tags = list(dict.fromkeys(BASE_TAGS + tuple(extra_tags) + (("class-conditional",) if conditional else ())))
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=tags,
        license=license,
        datasets=[dataset_name] if dataset_name else None,
    )
    model_path = repo_id or "path/to/this/folder"
    call = "pipe(batch_size=4, generator=torch.manual_seed(0))"
    if conditional:
        label = repr(class_names[0]) if class_names else "0"
        call = f"pipe(batch_size=4, class_labels=[{label}], guidance_scale=0.7, generator=torch.manual_seed(0))"

    size = getattr(energy_config, "sample_size", None)
    channels = getattr(energy_config, "in_channels", None)
    architecture = {
        "Resolution": f"{size}x{size}, {channels} channel(s)" if size else "vectors",
        "Noise levels T": scheduler_config.num_noise_levels,
        "Langevin steps K": scheduler_config.num_langevin_steps,
        "Schedule": f"{scheduler_config.schedule}, log-SNR {scheduler_config.logsnr_max} to "
        f"{scheduler_config.logsnr_min}",
        "EBM parameters": f"{sum(p.numel() for p in pipeline.energy_model.parameters()) / 1e6:.2f} M",
        "Initializer parameters": f"{sum(p.numel() for p in pipeline.initializer.parameters()) / 1e6:.2f} M",
        "Classes": (", ".join(class_names) if class_names else energy_config.num_class_embeds)
        if conditional
        else "none",
    }
    sections = [
        f"# CDRL energy-based model{f' trained on {dataset_name}' if dataset_name else ''}",
        "A sequence of energy-based models, one per noise level, each paired with an initializer network, trained by "
        "Cooperative Diffusion Recovery Likelihood (Zhu, Xie, Wu & Gao, ICLR 2024) with "
        "[cdrl_diffusers](https://github.com/cdrl-diffusers/cdrl_diffusers). Sampling starts from Gaussian noise; at "
        "each level the initializer proposes a sample and a few Langevin steps on the energy refine it.",
        "## Usage",
        "```python\nimport torch\nfrom cdrl_diffusers import CDRLPipeline\n\n"
        f'pipe = CDRLPipeline.from_pretrained("{model_path}")\n'
        f"images = {call}.images\n"
        'images[0].save("sample.png")\n'
        "# Unnormalised log-density (higher = more in-distribution), e.g. for OOD detection:\n"
        "scores = pipe.log_density(torch.rand(4, "
        f"{channels or 3}, {size or 32}, {size or 32}) * 2 - 1)\n```",
        "Load it with `CDRLPipeline.from_pretrained` (or `CDRLInpaintPipeline` / `CDRLComposePipeline`) after "
        "`pip install cdrl_diffusers`; `diffusers.DiffusionPipeline.from_pretrained` cannot load it, because the "
        "components live in the `cdrl_diffusers` library.",
        "## Model",
        _table(architecture),
    ]
    if sample_grid:
        sections += ["## Samples", f"![samples]({sample_grid})"]
    if training_details:
        sections += ["## Training", _table(training_details)]
    if evaluation:
        sections += ["## Evaluation", _table(evaluation)]
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
