"""Loading the image networks: a saved folder must hold the weights of the architecture its config describes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..hub import WEIGHTS_NAME, SafeLoadingMixin, check_model_folder, download_model


def saved_shapes(folder: Path, variant: str | None = None) -> dict[str, tuple[int, ...]] | None:
    """Name and shape of every tensor of a saved model's safetensors weights (headers only); ``None`` without any."""
    stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
    files = [folder / f"{stem}.safetensors"]
    index = folder / f"{stem}.safetensors.index.json"
    if not files[0].is_file():
        if not index.is_file():
            return None
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


class ArchitectureCheckingMixin(SafeLoadingMixin):
    """``from_pretrained`` that refuses a folder whose weights do not fit the architecture of its config.

    Folders saved before the networks became the authors' ones (3x3 shortcuts, bias-free readout, scale-shift UNet
    blocks, one-hot class maps) describe the same configuration with other tensors; diffusers would fail on the
    first shape it compares, or load part of the weights. This names the difference and what to do instead.

    The model is built on the CPU (``low_cpu_mem_usage=False`` unless a ``device_map`` is given): building it on the
    meta device, diffusers' default, runs the spectral-norm power iterations through slow meta kernels (about ten
    times slower for the paper's EBM).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a model saved by ``save_pretrained`` from a folder or a Hub repo id; see ``SafeLoadingMixin``."""
        kwargs.setdefault("use_safetensors", True)
        if kwargs.get("device_map") is None:
            kwargs.setdefault("low_cpu_mem_usage", False)
        source = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(source):
            source = download_model(source, **kwargs)
        folder = Path(source, kwargs.get("subfolder") or "")
        check_model_folder(folder, kwargs["use_safetensors"], kwargs.get("variant"))
        shapes = saved_shapes(folder, kwargs.get("variant"))
        if shapes is not None:
            cls._check_saved_shapes(folder, shapes)
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def _check_saved_shapes(cls, folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        model = cls.from_config(cls.load_config(folder))
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        mismatched = [
            f"{key} {shapes[key]} instead of {expected[key]}"
            for key in expected
            if key in shapes and shapes[key] != expected[key]
        ]
        if not (missing or unexpected or mismatched):
            return
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
            if items:
                problems.append(f"{len(items)} tensor(s) {title} (e.g. {', '.join(items[:3])})")
        raise ValueError(
            f"{folder} does not hold the weights of the {cls.__name__} its config.json describes: "
            f"{'; '.join(problems)}. It was probably saved by an earlier cdrl_diffusers, whose networks differed "
            "from the authors' (1x1 shortcuts, a readout with a bias, other UNet blocks); those weights cannot be "
            "converted to the current networks. Retrain the model (examples/train_cdrl.py), or convert the authors' "
            "released checkpoints with `cdrl-diffusers convert`."
        )
