"""The optimizer step of a training iteration: skip non-finite updates, clip per network, fp16 loss scaling; CPU
threads."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator


def cpu_threads_per_process(local_processes: int) -> int:
    """The intra-op threads that give each of ``local_processes`` processes on this machine an equal share of the
    cores this process may run on (its CPU affinity where the platform reports it), at least one.

    ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` for a CPU process unless it is told otherwise, which leaves all
    but one core idle when a single process trains.
    """
    if isinstance(local_processes, bool) or not isinstance(local_processes, int) or local_processes < 1:
        raise ValueError(f"`local_processes` must be a positive integer, got {local_processes!r}.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_processes)


def fused_adamw_options(device: torch.device | str) -> dict[str, bool]:
    """Keyword arguments of ``torch.optim.AdamW`` for its fused kernel where torch has one for ``device`` (CUDA; CPU
    from torch 2.4), else none (torch's default). Same update; on the CPU networks a fused step takes a sixth of the
    time of the per-tensor loop, which torch picks by default on a CPU.
    """
    device_type = torch.device(device).type
    fused_devices = ("cuda", "cpu") if torch.__version__ >= "2.4" else ()
    return {"fused": True} if device_type in fused_devices else {}


def losses_are_finite(accelerator: Accelerator, *losses: torch.Tensor) -> bool:
    """Whether every loss is finite on every process.

    All processes take the same decision (a reduction), so skipping a non-finite update never leaves one process
    waiting for the others' gradients.
    """
    nonfinite = (~torch.isfinite(torch.stack([loss.detach().float() for loss in losses]))).any().float()
    return accelerator.reduce(nonfinite, reduction="sum").item() == 0


@dataclass
class OptimizerStep:
    """What ``clip_and_step`` did.

    Args:
        grad_norms: the gradient norm of each network before clipping (after unscaling).
        stepped: whether the optimizer updated the weights.
        overflow: an fp16 gradient overflow: the ``GradScaler`` skipped the update and lowered its scale.
    """

    grad_norms: dict[str, float]
    stepped: bool
    overflow: bool


def clip_and_step(
    accelerator: Accelerator, optimizer: torch.optim.Optimizer, models: dict[str, nn.Module], max_grad_norm: float
) -> OptimizerStep:
    """Unscale the gradients, clip them per network (App. A.2) and step the prepared ``optimizer`` if they are finite.

    With fp16 loss scaling (``accelerator.scaler``, a ``torch.amp.GradScaler``) the optimizer always steps: the
    scaler skips the update when the gradients overflowed and lowers its scale, which is what loss scaling is for;
    the step is reported as an ``overflow``. Without a scaler, non-finite gradients skip the update.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
    grad_norms = {
        name: torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
        for name, model in models.items()
    }
    finite = all(math.isfinite(norm) for norm in grad_norms.values())
    if finite or scaler is not None:
        optimizer.step()  # a GradScaler skips the update of non-finite gradients and updates its scale
    return OptimizerStep(grad_norms, stepped=finite, overflow=not finite and scaler is not None)
