"""Loading by Hub repo id from a Hub cache in the standard layout, offline; safe-loading rules; clear errors for
mistyped local folders and damaged weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import TINY_SIZE, tiny_pipeline
from huggingface_hub.errors import RepositoryNotFoundError

import cdrl_diffusers.hub
from cdrl_diffusers import (
    CDRLComposePipeline,
    CDRLInpaintPipeline,
    CDRLPipeline,
    EnergyMLP,
    EnergyModel,
    InitializerMLP,
    InitializerUNet,
)
from cdrl_diffusers.hub import check_model_folder, check_pipeline_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CLASS_NAMES = ["circle", "square", "triangle"]


def add_to_cache(cache: Path, repo_id: str, commit: str, save) -> Path:
    """Write a repo snapshot in the Hub cache layout (models--org--name/snapshots/<commit>, refs/main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    save(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub_cache")
    pipe = tiny_pipeline(num_class_embeds=3, class_names=CLASS_NAMES, num_noise_levels=2, num_langevin_steps=2)
    add_to_cache(cache, "org/cdrl-tiny", COMMIT, pipe.save_pretrained)
    mlps = {"energy": EnergyMLP(hidden_dim=16, num_layers=2, embedding_dim=8), "init": InitializerMLP(hidden_dim=16)}
    torch.nn.init.normal_(mlps["energy"].layers[0].residual_scale)
    for name, model in mlps.items():
        add_to_cache(cache, f"org/toy-{name}", COMMIT, model.save_pretrained)
    # A repo with legacy pickled weights only.
    add_to_cache(cache, "org/legacy", COMMIT, lambda path: pipe.save_pretrained(path, safe_serialization=False))
    return cache, pipe, mlps


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    expected = saved.state_dict()
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


def generators(count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(count)]


@pytest.mark.parametrize("pipeline_class", [CDRLPipeline, CDRLInpaintPipeline, CDRLComposePipeline])
def test_pipelines_load_by_repo_id_offline_from_the_cache(hub_cache, offline, pipeline_class):
    cache, saved, _ = hub_cache
    pipe = pipeline_class.from_pretrained("org/cdrl-tiny", cache_dir=cache)
    assert type(pipe) is pipeline_class
    assert_same_weights(pipe.energy_model, saved.energy_model)
    assert_same_weights(pipe.initializer, saved.initializer)
    assert pipe.scheduler.config.num_noise_levels == 2 and pipe.class_names == CLASS_NAMES
    pipe.set_progress_bar_config(disable=True)
    if pipeline_class is CDRLPipeline:
        images = pipe(batch_size=2, class_labels="square", generator=generators(2), output_type="pt").images
        reference = saved(batch_size=2, class_labels="square", generator=generators(2), output_type="pt").images
        torch.testing.assert_close(images, reference)
    elif pipeline_class is CDRLInpaintPipeline:
        image = torch.rand(1, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
        mask = torch.zeros(1, 1, TINY_SIZE, TINY_SIZE)
        mask[..., TINY_SIZE // 2 :] = 1
        images = pipe(image=image, mask_image=mask, generator=generators(1), output_type="pt").images
        known = (image[..., : TINY_SIZE // 2] + 1) / 2
        torch.testing.assert_close(images[..., : TINY_SIZE // 2], known, atol=1e-6, rtol=0)
    else:
        images = pipe(concepts=["circle", "square"], batch_size=2, generator=generators(2), output_type="pt").images
    assert images.shape[1:] == (3, TINY_SIZE, TINY_SIZE) and torch.isfinite(images).all()


def test_pipeline_loads_by_commit_and_through_the_hf_hub_cache_variable(hub_cache, offline, monkeypatch):
    cache, saved, _ = hub_cache
    pipe = CDRLPipeline.from_pretrained("org/cdrl-tiny", cache_dir=cache, revision=COMMIT)
    assert_same_weights(pipe.energy_model, saved.energy_model)
    with pytest.raises(FileNotFoundError, match=f"'org/cdrl-tiny' at revision '{OTHER_COMMIT}'"):
        CDRLPipeline.from_pretrained("org/cdrl-tiny", cache_dir=cache, revision=OTHER_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pipe = CDRLPipeline.from_pretrained("org/cdrl-tiny", local_files_only=True)
    assert_same_weights(pipe.initializer, saved.initializer)


def test_models_load_by_repo_id_offline(hub_cache, offline):
    cache, saved, mlps = hub_cache
    for model_class, subfolder, reference in [
        (EnergyModel, "energy_model", saved.energy_model),
        (InitializerUNet, "initializer", saved.initializer),
    ]:
        model = model_class.from_pretrained("org/cdrl-tiny", subfolder=subfolder, cache_dir=cache, revision=COMMIT)
        assert type(model) is model_class
        assert_same_weights(model, reference)
    energy = EnergyMLP.from_pretrained("org/toy-energy", cache_dir=cache)
    initializer = InitializerMLP.from_pretrained("org/toy-init", cache_dir=cache)
    assert_same_weights(energy, mlps["energy"])
    assert_same_weights(initializer, mlps["init"])
    vectors, logsnr = torch.randn(4, 2), torch.zeros(4)
    # Equal weights; outputs equal up to float rounding, which may differ between kernels and CPUs.
    torch.testing.assert_close(
        energy(vectors, logsnr).neg_energy, mlps["energy"].eval()(vectors, logsnr).neg_energy, rtol=1e-5, atol=1e-6
    )


def test_a_repo_missing_from_the_cache_is_a_clear_error(hub_cache, offline):
    cache, _, _ = hub_cache
    with pytest.raises(FileNotFoundError, match="'org/absent'.*No such local folder.*not in the Hub cache"):
        CDRLPipeline.from_pretrained("org/absent", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="'org/absent'"):
        EnergyModel.from_pretrained("org/absent", subfolder="energy_model", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="No such local folder: './no/such/folder'"):
        CDRLPipeline.from_pretrained("./no/such/folder", cache_dir=cache)


class HubSays:
    """Stands in for ``snapshot_download`` online: the Hub answers that the repo does not exist."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, repo_id, **kwargs):
        self.calls.append(repo_id)
        response = type("Response", (), {"headers": {}, "request": None})()
        raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {repo_id}", response=response)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with outputs/cdrl-shapes (a saved pipeline) and outputs/cdrl-digits folders."""
    (tmp_path / "outputs" / "cdrl-digits").mkdir(parents=True)
    tiny_pipeline().save_pretrained(tmp_path / "outputs" / "cdrl-shapes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("online", [True, False])
def test_a_mistyped_local_folder_is_reported_as_a_missing_folder(workdir, hub_cache, monkeypatch, online):
    """``outputs/cdrl-shapse`` has the form of a repo id: the error names the missing folder and its near miss,
    online (where the Hub answers "Repository Not Found") as well as offline (where the cache lacks it)."""
    cache, _, _ = hub_cache
    hub = HubSays()
    if online:
        monkeypatch.setattr(cdrl_diffusers.hub, "snapshot_download", hub)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = r"No such local folder: 'outputs/cdrl-shapse' \(.*\); .*outputs has 'cdrl-shapes'"
    with pytest.raises(FileNotFoundError, match=expected):
        CDRLPipeline.from_pretrained("outputs/cdrl-shapse", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=expected):
        EnergyModel.from_pretrained("outputs/cdrl-shapse", subfolder="energy_model", cache_dir=cache)
    assert hub.calls == (["outputs/cdrl-shapse"] * 2 if online else [])
    # The correctly typed folder loads.
    assert type(CDRLPipeline.from_pretrained("outputs/cdrl-shapes")) is CDRLPipeline


@pytest.mark.parametrize(
    "name", ["./outputs/cdrl-shapse", "outputs/cdrl-shapse/", "outputs/runs/cdrl-shapse", "~/cdrl-shapse", "a b/c"]
)
def test_names_that_cannot_be_repo_ids_never_reach_the_hub(workdir, monkeypatch, name):
    hub = HubSays()
    monkeypatch.setattr(cdrl_diffusers.hub, "snapshot_download", hub)
    with pytest.raises(FileNotFoundError, match=f"No such local folder: {re.escape(repr(name))}.*not a Hub repo id"):
        CDRLPipeline.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="No such local folder"):
        EnergyModel.from_pretrained(name)
    assert hub.calls == []


def test_a_file_is_not_taken_for_a_folder_or_a_repo_id(workdir, monkeypatch):
    hub = HubSays()
    monkeypatch.setattr(cdrl_diffusers.hub, "snapshot_download", hub)
    (workdir / "model").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="'model' is a file, not a folder"):
        CDRLPipeline.from_pretrained("model")
    assert hub.calls == []


def test_an_unknown_repo_id_online_says_so(workdir, monkeypatch):
    monkeypatch.setattr(cdrl_diffusers.hub, "snapshot_download", HubSays())
    with pytest.raises(FileNotFoundError, match="the Hub has no repo 'org/absent' that you can access") as error:
        CDRLPipeline.from_pretrained("org/absent")
    assert isinstance(error.value.__cause__, RepositoryNotFoundError)


def test_legacy_bin_weights_are_refused_unless_asked_for(hub_cache, offline):
    cache, saved, _ = hub_cache
    with pytest.raises(FileNotFoundError, match=r"only legacy PyTorch \.bin weights.*use_safetensors=False"):
        CDRLPipeline.from_pretrained("org/legacy", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        EnergyModel.from_pretrained("org/legacy", subfolder="energy_model", cache_dir=cache)
    # Explicitly allowed: read with torch.load(weights_only=True) by diffusers.
    pipe = CDRLPipeline.from_pretrained("org/legacy", cache_dir=cache, use_safetensors=False)
    assert_same_weights(pipe.energy_model, saved.energy_model)


def test_remote_code_is_never_run(hub_cache, offline):
    cache, _, _ = hub_cache
    for option in ({"trust_remote_code": True}, {"custom_pipeline": "org/evil"}):
        with pytest.raises(ValueError, match="never run code"):
            CDRLPipeline.from_pretrained("org/cdrl-tiny", cache_dir=cache, **option)


@pytest.fixture(scope="module")
def saved_folder(hub_cache, tmp_path_factory):
    _, pipe, _ = hub_cache
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    return folder


def damaged(folder: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


WEIGHTS = "energy_model/diffusion_pytorch_model.safetensors"
DAMAGES = {
    "no model_index": (lambda p: (p / "model_index.json").unlink(), FileNotFoundError, "model_index.json"),
    "damaged model_index": (lambda p: (p / "model_index.json").write_text("{"), ValueError, "model_index.json"),
    "missing component": (lambda p: shutil.rmtree(p / "initializer"), FileNotFoundError, "initializer/"),
    "foreign library": (
        lambda p: (p / "model_index.json").write_text(
            json.dumps({**json.loads((p / "model_index.json").read_text()), "scheduler": ["os", "system"]})
        ),
        ValueError,
        "component 'scheduler'",
    ),
    "damaged scheduler config": (
        lambda p: (p / "scheduler/scheduler_config.json").write_text("[1, 2"),
        ValueError,
        "scheduler_config.json",
    ),
    "damaged model config": (lambda p: (p / "energy_model/config.json").write_text("x"), ValueError, "config.json"),
    "no weights": (lambda p: (p / WEIGHTS).unlink(), FileNotFoundError, "has no weights"),
    "truncated weights": (
        lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:200]),
        ValueError,
        "not a valid safetensors file",
    ),
}


def corrupt_tensor(path: Path, value: float) -> str:
    """Overwrite the first element of the largest float32 tensor of a safetensors file, header untouched."""
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    name = max(
        (key for key, entry in header.items() if key != "__metadata__" and entry["dtype"] == "F32"),
        key=lambda key: header[key]["data_offsets"][1] - header[key]["data_offsets"][0],
    )
    start = 8 + header_size + header[name]["data_offsets"][0]
    data[start : start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(saved_folder, tmp_path, value):
    folder = damaged(saved_folder, tmp_path, lambda p: None)
    tensor = corrupt_tensor(folder / WEIGHTS, value)
    expected = re.escape(f"{folder / WEIGHTS}: tensor {tensor!r} holds 1 NaN or infinite value(s)")
    with pytest.raises(ValueError, match=expected):
        CDRLPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=expected):
        EnergyModel.from_pretrained(folder, subfolder="energy_model")


def test_non_finite_weights_in_a_shard_are_refused(tmp_path):
    model = EnergyMLP(hidden_dim=16, num_layers=2, embedding_dim=8)
    model.save_pretrained(tmp_path, max_shard_size="2KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_weights(EnergyMLP.from_pretrained(tmp_path), model)
    tensor = corrupt_tensor(shards[-1], float("nan"))
    with pytest.raises(ValueError, match=re.escape(f"{shards[-1]}: tensor {tensor!r}")):
        EnergyMLP.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_folders_give_errors_naming_the_file(saved_folder, tmp_path, damage):
    change, error, message = DAMAGES[damage]
    folder = damaged(saved_folder, tmp_path, change)
    with pytest.raises(error, match=re.escape(message)):
        CDRLPipeline.from_pretrained(folder)
    if damage in ("damaged model config", "no weights", "truncated weights"):
        with pytest.raises(error, match=re.escape(message)):
            EnergyModel.from_pretrained(folder, subfolder="energy_model")
        with pytest.raises(error, match=re.escape(message)):
            check_model_folder(folder / "energy_model")


def test_check_functions_accept_a_saved_folder(saved_folder):
    check_pipeline_folder(saved_folder, ("energy_model", "initializer", "scheduler"))
    for name in ("energy_model", "initializer"):
        check_model_folder(saved_folder / name)


def python_sources() -> list[Path]:
    return sorted(path for top in ("src", "examples", "benchmarks") for path in (REPO_ROOT / top).rglob("*.py"))


def test_every_torch_load_is_weights_only_and_no_remote_code_is_trusted():
    calls = 0
    for path in python_sources():
        text = path.read_text(encoding="utf-8")
        assert "trust_remote_code=True" not in text, path
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:  # the call's full argument list, up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls += 1
            assert "weights_only=True" in text[match.end() : end], f"{path}: {text[match.start() : end]}"
    assert calls >= 1  # examples/train_cdrl.py restores generator states with torch.load


NO_NETWORK = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access in a test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import cdrl_diffusers
assert not attempts, f"importing cdrl_diffusers opened connections: {attempts}"
pipe = cdrl_diffusers.CDRLPipeline.from_pretrained("org/cdrl-tiny")
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=1, class_labels="circle", output_type="np").images
assert images.shape == (1, %d, %d, 3), images.shape
assert not attempts, attempts
print("ok")
"""


def test_import_and_cached_loading_make_no_network_call(hub_cache):
    """In a fresh interpreter with sockets disabled: import, then load by repo id via HF_HUB_CACHE, offline."""
    cache, _, _ = hub_cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK % (TINY_SIZE, TINY_SIZE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
