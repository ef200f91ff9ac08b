"""cdrl_diffusers.training.checkpointing: atomic checkpoints, exact state round trips, roll-back on divergence."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_energy_model, tiny_initializer

from cdrl_diffusers.training import (
    RollBack,
    TrainingDiverged,
    TrainingProgress,
    create_ema_model,
    fsync_directory,
    list_checkpoints,
    register_checkpoint_hooks,
    replace_folder_atomically,
    resolve_checkpoint,
    save_checkpoint,
    training_seed,
)


def test_latest_checkpoint_ignores_partial_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp", "checkpoint-10.old", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-10")]
    assert resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint("checkpoint-2", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert resolve_checkpoint("latest", str(tmp_path / "missing")) is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_checkpoint("checkpoint-3", str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoint-10")
    assert resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_fsync_directory_is_skipped_where_folders_cannot_be_flushed(tmp_path, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs))
    fsync_directory(str(tmp_path))  # POSIX: opened as a folder and flushed
    assert len(opened) == 1 and opened[0][1] & os.O_DIRECTORY

    def refuse(descriptor):  # e.g. a network file system that cannot flush folders
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    fsync_directory(str(tmp_path))
    monkeypatch.delattr(os, "O_DIRECTORY")  # Windows: folders cannot be opened at all
    opened.clear()
    fsync_directory(str(tmp_path))
    assert opened == []


def test_replace_folder_atomically_swaps_out_an_older_folder(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    replace_folder_atomically(str(tmp_path / "new"), str(tmp_path / "final"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]
    assert [path.name for path in (tmp_path / "final").iterdir()] == ["new.txt"]


class Networks:
    """A tiny EBM and initializer prepared by an Accelerator, with EMAs, progress and hooks (a script's state)."""

    def __init__(self, output_dir, max_consecutive_nonfinite=2, max_rollbacks=1):
        self.accelerator = Accelerator(cpu=True)
        self.networks = {"energy_model": tiny_energy_model(), "initializer": tiny_initializer()}
        self.emas = {name: create_ema_model(model) for name, model in self.networks.items()}
        self.optimizer = torch.optim.AdamW([p for model in self.networks.values() for p in model.parameters()])
        *prepared, self.optimizer = self.accelerator.prepare(*self.networks.values(), self.optimizer)
        self.generator = torch.Generator().manual_seed(training_seed(0, 0))
        self.progress = TrainingProgress()
        register_checkpoint_hooks(self.accelerator, self.networks, self.emas, self.generator)
        self.accelerator.register_for_checkpointing(self.progress)
        self.roll_back = RollBack(
            self.accelerator, str(output_dir), self.generator, 0, max_consecutive_nonfinite, max_rollbacks
        )

    def train_a_step(self):
        for model in self.networks.values():
            loss = sum(p.sum() for p in model.parameters())
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for name, ema in self.emas.items():
            ema.step(self.networks[name].parameters())
        self.progress.global_step += 1
        torch.randn(3, generator=self.generator)

    def state(self):
        weights = {}
        for name, model in self.networks.items():
            weights.update({f"{name}.{key}": value.clone() for key, value in model.state_dict().items()})
        emas = {name: [p.clone() for p in ema.shadow_params] for name, ema in self.emas.items()}
        return weights, emas, self.generator.get_state().clone(), self.progress.state_dict()


def assert_same_state(first, second):
    assert first[0].keys() == second[0].keys()
    assert all(torch.equal(first[0][key], second[0][key]) for key in first[0])
    assert all(all(map(torch.equal, first[1][name], second[1][name])) for name in first[1])
    assert torch.equal(first[2], second[2]) and first[3] == second[3]


def test_save_checkpoint_round_trips_the_state_and_removes_stale_folders(tmp_path):
    run = Networks(tmp_path)
    run.train_a_step()
    (tmp_path / "checkpoint-1.old").mkdir()  # left by a crash between the two renames of an earlier save
    (tmp_path / ".checkpoint-7.tmp").mkdir()  # left by a crash while writing
    path = save_checkpoint(run.accelerator, str(tmp_path), 1)
    saved = run.state()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    for name in ("energy_model", "initializer", "energy_model_ema", "initializer_ema"):
        assert (tmp_path / "checkpoint-1" / name / "config.json").exists(), name
    assert (tmp_path / "checkpoint-1" / "generator_0.pt").exists()

    run.train_a_step()
    with pytest.raises(AssertionError):
        assert_same_state(run.state(), saved)
    run.accelerator.load_state(path)
    assert_same_state(run.state(), saved)

    run.train_a_step()
    save_checkpoint(run.accelerator, str(tmp_path), 2)
    run.train_a_step()
    save_checkpoint(run.accelerator, str(tmp_path), 3, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_roll_back_reloads_the_last_checkpoint_with_fresh_noise_then_gives_up(tmp_path):
    run = Networks(tmp_path, max_consecutive_nonfinite=2, max_rollbacks=1)
    with pytest.raises(TrainingDiverged, match="there is no checkpoint to roll back to"):
        run.roll_back("2 non-finite steps in a row", run.progress)

    run.train_a_step()
    save_checkpoint(run.accelerator, str(tmp_path), 1)
    saved = run.state()
    run.train_a_step()
    run.progress.best_metric, run.progress.best_value, run.progress.best_step = "kid", 0.5, 2
    assert run.roll_back.record(finite=False) is None
    assert run.roll_back.record(finite=True) is None  # a finite step resets the count
    assert run.roll_back.record(finite=False) is None
    reason = run.roll_back.record(finite=False)
    assert reason == "2 non-finite steps in a row"

    assert run.roll_back(reason, run.progress) == str(tmp_path / "checkpoint-1")
    weights, emas, generator_state, progress = run.state()
    best = {"best_metric": None, "best_value": None, "best_step": None}
    assert_same_state((weights, emas, saved[2], {**progress, **best}), saved)
    assert (run.progress.best_metric, run.progress.best_value, run.progress.best_step) == ("kid", 0.5, 2)
    assert not torch.equal(generator_state, saved[2])  # fresh noise: a new attempt
    assert run.roll_back.consecutive_nonfinite == 0

    with pytest.raises(TrainingDiverged, match="1 roll-back\\(s\\) to the last checkpoint did not help") as error:
        run.roll_back("a DivergenceError", run.progress)
    # The way to the newest checkpoint's pipeline, and the remedy measured on long runs first.
    assert "`--resume_from_checkpoint latest --max_train_steps" in str(error.value)
    assert "For a new run, try lower learning rates" in str(error.value)


def test_training_progress_keeps_the_best_metric():
    progress = TrainingProgress()
    assert progress.improves("frechet_distance", 3.0) and not progress.improves("kid", float("nan"))
    progress.best_metric, progress.best_value = "frechet_distance", 3.0
    assert progress.improves("frechet_distance", 2.0) and not progress.improves("frechet_distance", 4.0)
    progress.best_metric, progress.best_value = "accuracy", 0.5
    assert progress.improves("accuracy", 0.6) and not progress.improves("accuracy", 0.4)
    restored = TrainingProgress()
    restored.load_state_dict(progress.state_dict())
    assert restored == progress
