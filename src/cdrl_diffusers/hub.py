"""Loading CDRL models and pipelines from local folders and the Hugging Face Hub, safely.

Use ``CDRLPipeline.from_pretrained`` (or ``CDRLInpaintPipeline`` / ``CDRLComposePipeline``, which read the same
folders) and ``EnergyModel.from_pretrained`` etc., with a local folder or a Hub repo id such as ``"org/name"``.
``DiffusionPipeline.from_pretrained("org/name")`` cannot load this format: diffusers 0.42 refuses, at its download
step, pipeline repos whose components live in a library other than diffusers or transformers. CDRL pipelines fetch
the repo with ``huggingface_hub.snapshot_download`` instead (``revision``, ``cache_dir``, ``token``,
``local_files_only``, ``force_download`` and ``HF_HUB_OFFLINE`` honoured, so a cached repo loads offline) and then
load it as a local folder.

Safety:

- Weights are read from safetensors only. Legacy ``.bin`` weights are refused unless a caller explicitly passes
  ``use_safetensors=False``; diffusers then reads them with ``torch.load(weights_only=True)``.
- No ``trust_remote_code`` or ``custom_pipeline`` path exists: components are always classes of this library (or
  diffusers), and ``model_index.json`` files naming anything else are refused.
- A missing or damaged ``model_index.json``, component folder, ``config.json`` or weight file raises a
  ``FileNotFoundError`` or ``ValueError`` that names the file, before diffusers reads it; so does a weight tensor
  holding NaN or infinite values (bytes damaged inside a file whose header is intact).

Local folder or repo id: a name that exists as a folder is loaded from disk. Anything else is a Hub repo id only if
it has that form (``"name"`` or ``"org/name"``, no ``./``, ``~``, leading ``/``, trailing separator or second
``/``); otherwise it is reported as a missing local folder, with no network call. A name of the repo-id form that the
Hub does not know (or, offline, that the cache lacks) is reported as both a missing folder and an unknown repo,
naming the closest existing folders when its parent folder exists (``outputs/cdrl-shapse`` next to
``outputs/cdrl-shapes``).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

PIPELINE_FILES = (
    "model_index.json",
    "README.md",
    "*/config.json",
    "*/scheduler_config.json",
    "*/*.safetensors",
    "*/*.safetensors.index.json",
    "*.png",
)
LEGACY_WEIGHT_FILES = ("*/*.bin", "*/*.bin.index.json")
COMPONENT_LIBRARIES = ("cdrl_diffusers", "diffusers")
WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAMES = ("config.json", "scheduler_config.json")


def _allows_pickle(kwargs: dict[str, Any]) -> bool:
    """Legacy ``.bin`` weights only when the caller asked for them (``use_safetensors`` other than True)."""
    return kwargs.get("use_safetensors", True) is not True


def _looks_like_a_path(name: str) -> bool:
    """True when ``name`` cannot be a Hub repo id, so it can only mean a local folder."""
    if name.startswith((".", "~")) or os.path.isabs(name) or name.endswith(("/", os.sep)) or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _missing_folder(name: str) -> str:
    """'No such local folder' and, when the parent folder exists, its entries closest to the name."""
    path = Path(name).expanduser()
    message = f"No such local folder: {name!r} ({path.absolute()})"
    parent = path.absolute().parent
    if path.exists() and not path.is_dir():
        return f"{name!r} is a file, not a folder"
    if parent.is_dir():
        siblings = [entry.name for entry in parent.iterdir() if entry.is_dir()]
        close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
        if close:
            message += f"; {parent} has {', '.join(repr(entry) for entry in close)}"
    return message


def _snapshot(repo_id: str, allow_patterns: list[str], kwargs: dict[str, Any]) -> str:
    if not isinstance(repo_id, str):
        raise TypeError(f"Expected a folder or a Hub repo id as a string, got {type(repo_id).__name__}.")
    if _looks_like_a_path(repo_id) or os.path.exists(repo_id):
        raise FileNotFoundError(f"{_missing_folder(repo_id)} (and it is not a Hub repo id of the form 'org/name').")
    revision = kwargs.get("revision")
    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")),
            proxies=kwargs.get("proxies"),
            allow_patterns=allow_patterns,
        )
    except GatedRepoError:
        raise
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"Cannot load {repo_id!r}: {_missing_folder(repo_id)}, and the Hub has no repo {repo_id!r} that you can "
            "access (private repos need `token=` or `huggingface-cli login`)."
        ) from error
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"Cannot load {repo_id!r}{at}: {_missing_folder(repo_id)}, and it is not in the Hub cache while the Hub "
            f"cannot be reached (offline, HF_HUB_OFFLINE=1 or `local_files_only=True`). ({error})"
        ) from error


def download_pipeline(repo_id: str, **kwargs: Any) -> str:
    """Fetch a CDRL pipeline repo into the Hub cache (or find it there) and return its local folder.

    Args:
        repo_id: ``"org/name"`` on the Hub.
        **kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies`` as in
            ``from_pretrained``; ``use_safetensors=False`` also fetches legacy ``.bin`` weights. Other loading
            arguments are ignored here.
    """
    patterns = list(PIPELINE_FILES) + (list(LEGACY_WEIGHT_FILES) if _allows_pickle(kwargs) else [])
    return _snapshot(repo_id, patterns, kwargs)


def download_model(repo_id: str, subfolder: str | None = None, **kwargs: Any) -> str:
    """Fetch one model (``subfolder`` of a repo, or its root) into the Hub cache and return the repo's local folder.

    Keyword arguments as in ``download_pipeline``.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}config.json", f"{prefix}*.safetensors", f"{prefix}*.safetensors.index.json"]
    if _allows_pickle(kwargs):
        patterns += [f"{prefix}*.bin", f"{prefix}*.bin.index.json"]
    return _snapshot(repo_id, patterns, kwargs)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); the file is damaged, save or download it again."
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}.")
    return content


def check_pipeline_folder(folder: str | os.PathLike, expected: tuple[str, ...]) -> None:
    """Clear errors for a missing or damaged ``model_index.json`` or component folder before diffusers reads it.

    Args:
        folder: a folder written by ``CDRLPipeline.save_pretrained``.
        expected: the component names the pipeline needs (e.g. ``("energy_model", "initializer", "scheduler")``).
    """
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: it is not a saved pipeline folder.")
    config = _read_json(index)
    if not isinstance(config.get("_class_name"), str):
        raise ValueError(f"{index}: `_class_name` must name a pipeline class; custom pipeline code is not supported.")
    missing = [name for name in expected if name not in config]
    if missing:
        raise ValueError(f"{index} lacks the components {missing}; expected {list(expected)}.")
    for name in expected:
        entry = config[name]
        library = entry[0] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) else None
        if library is None or library.split(".")[0] not in COMPONENT_LIBRARIES:
            raise ValueError(
                f"{index}: component {name!r} is {entry!r}; expected [library, class] with library one of "
                f"{list(COMPONENT_LIBRARIES)} (no code is loaded from elsewhere)."
            )
        component = folder / name
        if not component.is_dir():
            raise FileNotFoundError(f"{folder} has no {name}/ folder, which model_index.json lists.")
        configs = [component / config_name for config_name in CONFIG_NAMES if (component / config_name).is_file()]
        if not configs:
            raise FileNotFoundError(f"{component} has no {' or '.join(CONFIG_NAMES)}.")
        _read_json(configs[0])


def check_model_folder(folder: str | os.PathLike, use_safetensors: bool | None = True, variant: str | None = None):
    """Clear errors for a missing or damaged ``config.json`` or weight file of one saved model.

    Args:
        folder: the model's folder (the one holding ``config.json``).
        use_safetensors: ``True`` (the default) accepts safetensors weights only; anything else also accepts legacy
            ``.bin`` weights, which diffusers reads with ``torch.load(weights_only=True)``.
        variant: the weights variant (``diffusion_pytorch_model.<variant>.safetensors``), as in diffusers.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such model folder: {folder}.")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a saved model folder.")
    _read_json(config)
    stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
    weights, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if weights.is_file():
        check_safetensors_file(weights)
        return
    if index.is_file():
        shards = _read_json(index).get("weight_map", {})
        for shard in sorted(set(shards.values()) if isinstance(shards, dict) else ()):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard} is missing: {index.name} lists it.")
            check_safetensors_file(folder / shard)
        return
    legacy = [folder / f"{stem}.bin", folder / f"{stem}.bin.index.json"]
    if any(path.is_file() for path in legacy):
        if use_safetensors is not True:
            return
        raise FileNotFoundError(
            f"{folder} has no {weights.name}, only legacy PyTorch .bin weights, which are not loaded by default. "
            "Convert them to safetensors, or pass `use_safetensors=False` if you trust their source (they are then "
            "read with torch.load(weights_only=True))."
        )
    raise FileNotFoundError(f"{folder} has no weights: expected {weights.name} (or {index.name}).")


def check_safetensors_file(path: str | os.PathLike) -> None:
    """A ``ValueError`` naming the file and the tensor when ``path`` is not a readable safetensors file or one of its
    floating-point tensors holds NaN or infinite values (bytes damaged inside a tensor leave the header intact, and
    the model would otherwise load and produce black images)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(
                        f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the file "
                        "is damaged (or was saved from a diverged model): download or save it again."
                    )
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file ({error}); download or save it again.") from error


class SafeLoadingMixin:
    """``from_pretrained`` for the models of this library: a local folder or a Hub repo id, safetensors only.

    Put it before ``ModelMixin`` in the bases. Hub repos are fetched (or found in the cache, offline) with
    ``download_model``; the folder is checked with ``check_model_folder``; then diffusers loads it.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a model saved by ``save_pretrained`` from a folder or a Hub repo id (``subfolder`` selects one model
        of a pipeline repo); the keyword arguments of diffusers' ``ModelMixin.from_pretrained`` apply, with
        ``use_safetensors=True`` by default."""
        kwargs.setdefault("use_safetensors", True)
        source = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(source):
            source = download_model(source, **kwargs)
        check_model_folder(
            os.path.join(source, kwargs.get("subfolder") or ""), kwargs["use_safetensors"], kwargs.get("variant")
        )
        return super().from_pretrained(source, **kwargs)
