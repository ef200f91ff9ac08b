"""Checkpoints that resume exactly, written atomically, and the roll-back to the last one when training diverges.

A checkpoint is ``accelerator.save_state`` written into a hidden ``.checkpoint-<step>.tmp`` folder, flushed to disk
and renamed to ``checkpoint-<step>`` in one step, so a folder with that name is always complete and
``resolve_checkpoint("latest", ...)`` never picks a partial one. Resuming loads Accelerate's pickled RNG and sampler
states: only resume from checkpoints you wrote.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# Whether a larger value of a held-out metric is better (``TrainingProgress.improves``).
HIGHER_IS_BETTER = {"frechet_distance": False, "kid": False, "accuracy": True}


@dataclass
class TrainingProgress:
    """Where training stands; saved in every checkpoint through ``accelerator.register_for_checkpointing``.

    Besides the position in the data (step, epoch, batches seen in the epoch) it counts skipped non-finite steps and
    fp16 overflow steps, and records the best value of the held-out metric kept with ``--keep_best_metric``.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    nonfinite_steps: int = 0
    overflow_steps: int = 0
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None

    def state_dict(self) -> dict[str, int | float | str | None]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int | float | str | None]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def improves(self, metric: str, value: float) -> bool:
        """Whether ``value`` of ``metric`` beats the best recorded value (any finite value beats none)."""
        if not math.isfinite(value):
            return False
        if self.best_metric != metric or self.best_value is None:
            return True
        return value > self.best_value if HIGHER_IS_BETTER[metric] else value < self.best_value


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if CHECKPOINT_PATTERN.fullmatch(name)]
    names.sort(key=lambda name: int(CHECKPOINT_PATTERN.fullmatch(name).group(1)))
    return [os.path.join(output_dir, name) for name in names]


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str | None:
    """The folder ``--resume_from_checkpoint`` names: ``"latest"`` (``None`` when there is none) or a folder."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(candidate):
            return candidate
    raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is neither 'latest' nor a folder.")


def fsync_directory(path: str) -> None:
    """Flush a folder's entries (e.g. a rename) to disk where the platform supports it.

    Windows cannot open folders (no ``os.O_DIRECTORY``) and some file systems refuse to flush them; there the
    rename is as durable as the operating system makes it, and this is a no-op.
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """Flush every file and folder under ``path`` to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_directory(root)


def replace_folder_atomically(temporary: str, final: str) -> None:
    """Flush the complete folder ``temporary`` to disk and rename it to ``final``, swapping out an older ``final``."""
    fsync_tree(temporary)
    if os.path.exists(final):  # e.g. re-saving a step after resuming from an older checkpoint
        os.replace(final, final + ".old")
    os.replace(temporary, final)
    fsync_directory(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(final + ".old", ignore_errors=True)


def remove_stale_folders(output_dir: str, patterns: tuple[str, ...] = (r"\.checkpoint-\d+\.tmp",)) -> list[str]:
    """Remove the folders of ``output_dir`` whose names match one of ``patterns``; returns their paths.

    The default removes the temporary folders of saves a crash interrupted. After a successful save,
    ``save_checkpoint`` also removes ``checkpoint-<step>.old`` folders a crash left between the two renames of
    ``replace_folder_atomically``: a newer complete checkpoint exists then.
    """
    if not os.path.isdir(output_dir):
        return []
    stale = [
        os.path.join(output_dir, name)
        for name in sorted(os.listdir(output_dir))
        if any(re.fullmatch(pattern, name) for pattern in patterns) and os.path.isdir(os.path.join(output_dir, name))
    ]
    for path in stale:
        shutil.rmtree(path)
    return stale


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """``accelerator.save_state`` as ``output_dir/checkpoint-<step>``, atomically; keeps the newest ``total_limit``."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process and os.path.exists(temporary):
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder_atomically(temporary, final)
        remove_stale_folders(output_dir, (r"\.checkpoint-\d+\.tmp", r"checkpoint-\d+\.old"))
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None and len(checkpoints) > total_limit:
            for stale in checkpoints[: len(checkpoints) - total_limit]:
                logger.info(f"Removing {stale} (checkpoints total limit {total_limit})")
                shutil.rmtree(stale)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def load_ema(ema: EMAModel, model: nn.Module, folder: str) -> None:
    """Restore ``ema`` (tracking ``model``'s parameters) from a folder written by ``EMAModel.save_pretrained``.

    ``EMAModel.from_pretrained`` would rebuild the model through a deprecated ``from_config(path)`` call and warn about
    the EMA's own keys in ``config.json``; this reads the weights and those keys directly, with the same result.
    """
    config = type(model).load_config(folder)
    weights = load_file(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
    state = {key: config[key] for key in ema.state_dict() if key != "shadow_params"}
    state["shadow_params"] = [weights[name] for name, _ in model.named_parameters()]
    ema.load_state_dict(state)


def register_checkpoint_hooks(
    accelerator: Accelerator, models: dict[str, nn.Module], emas: dict[str, EMAModel], generator: torch.Generator
) -> None:
    """Save and load the networks and their EMAs in diffusers format, and each process's training-noise generator.

    As in diffusers' training examples: ``models`` maps a sub-folder name to an (unwrapped) network passed to
    ``accelerator.prepare``, ``emas`` the same names to their ``EMAModel``. Each process stores its generator in
    ``generator_<rank>.pt``, so a resumed run must use the same number of processes.
    """
    names = {id(model): name for name, model in models.items()}

    def save_hook(prepared: list[nn.Module], weights: list, folder: str) -> None:
        for model in prepared:
            name = names[id(accelerator.unwrap_model(model))]
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(folder, name))
                emas[name].save_pretrained(os.path.join(folder, f"{name}_ema"))
            weights.pop()  # saved above, not again by Accelerate
        torch.save(generator.get_state(), os.path.join(folder, f"generator_{accelerator.process_index}.pt"))

    def load_hook(prepared: list[nn.Module], folder: str) -> None:
        while prepared:
            model = accelerator.unwrap_model(prepared.pop())
            name = names[id(model)]
            model.load_state_dict(type(model).from_pretrained(folder, subfolder=name).state_dict())
            load_ema(emas[name], model, os.path.join(folder, f"{name}_ema"))
            emas[name].to(accelerator.device)
        generator_file = os.path.join(folder, f"generator_{accelerator.process_index}.pt")
        if not os.path.exists(generator_file):
            raise ValueError(
                f"{folder} has no {os.path.basename(generator_file)}: resume with the same number of processes."
            )
        generator.set_state(torch.load(generator_file, weights_only=True))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def training_seed(seed: int, process_index: int, attempt: int = 0) -> int:
    """Seed of the training-noise generator of one process; each roll-back starts a new attempt with fresh noise."""
    return int(np.random.SeedSequence([seed, process_index, attempt]).generate_state(1)[0])


class TrainingDiverged(RuntimeError):
    """Training diverged, and no roll-back is left (or there is no checkpoint to return to)."""


class RollBack:
    """Roll back to the newest checkpoint when training diverges, with fresh training noise; give up eventually.

    Divergence is ``max_consecutive_nonfinite`` skipped (non-finite) steps in a row (``record``), or whatever the
    caller detects (e.g. a ``DivergenceError`` of the health monitor). After ``max_rollbacks`` roll-backs, or with no
    checkpoint in ``output_dir``, calling it raises ``TrainingDiverged``.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str,
        generator: torch.Generator,
        seed: int,
        max_consecutive_nonfinite: int = 5,
        max_rollbacks: int = 3,
    ):
        self.accelerator, self.output_dir, self.generator, self.seed = accelerator, output_dir, generator, seed
        self.max_consecutive_nonfinite, self.max_rollbacks = max_consecutive_nonfinite, max_rollbacks
        self.consecutive_nonfinite, self.rollbacks = 0, 0

    def record(self, finite: bool) -> str | None:
        """Count one finished step; returns why training diverged when too many in a row were not finite."""
        self.consecutive_nonfinite = 0 if finite else self.consecutive_nonfinite + 1
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            return f"{self.consecutive_nonfinite} non-finite steps in a row"
        return None

    def __call__(self, reason: str, progress: TrainingProgress) -> str:
        """Reload the newest checkpoint (keeping the best metric seen) and reseed; returns the checkpoint's path."""
        checkpoint = resolve_checkpoint("latest", self.output_dir)
        if checkpoint is None or self.rollbacks >= self.max_rollbacks:
            if checkpoint is None:
                why, kept = "there is no checkpoint to roll back to", ""
            else:
                step = CHECKPOINT_PATTERN.fullmatch(os.path.basename(checkpoint)).group(1)
                why = f"{self.rollbacks} roll-back(s) to the last checkpoint did not help"
                kept = (
                    f" {checkpoint} holds the model of step {step}: `--resume_from_checkpoint latest "
                    f"--max_train_steps {step}` exports its pipeline without training further."
                )
            raise TrainingDiverged(
                f"Training diverged: {reason} up to step {progress.global_step}, and {why}.{kept} For a new run, try "
                "lower learning rates (halving both held shapes runs that had diverged), an EBM with "
                "spectral norm (`--ebm_spectral_norm`, App. A.1), `--mixed_precision no`, or check the data for "
                "NaN/inf values."
            )
        self.rollbacks += 1
        logger.warning(f"Rolling back to {checkpoint} with fresh noise ({self.rollbacks}/{self.max_rollbacks}).")
        best = (progress.best_metric, progress.best_value, progress.best_step)
        self.accelerator.load_state(checkpoint)
        progress.best_metric, progress.best_value, progress.best_step = best  # best/ may be newer than the checkpoint
        self.generator.manual_seed(training_seed(self.seed, self.accelerator.process_index, self.rollbacks))
        self.consecutive_nonfinite = 0
        return checkpoint
