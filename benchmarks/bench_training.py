"""Training-step speed of cdrl_training_step against the naive Algorithm 1 (benchmarks/naive.py), in one process.

One step = the losses of Algorithm 1 (initializer proposal, K Langevin steps, EBM and initializer losses) and their
backward pass; optimizers are not stepped, so every repeat sees the same weights. Each mode works on its own copy of
the same weights; the first step of each mode uses the same seeds, and the fp32 modes must reproduce the naive
losses and gradients within the stated tolerance.

Modes: ``naive``, or ``fp32`` / ``bf16`` / ``fp16`` (the step's ``precision``) with optional suffixes ``_cl``
(channels_last models) and ``_ckpt`` (``energy_model.enable_gradient_checkpointing()``, the memory-lean option).

    flock /tmp/cdrl_heavy.lock python benchmarks/bench_training.py --arch paper --batch-size 8 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from naive import naive_training_step  # noqa: E402
from perf_utils import (  # noqa: E402
    add_run_arguments,
    build_models,
    count_flops,
    fmt_bytes,
    run_architectures,
    summary,
    timed,
)

from cdrl_diffusers import CDRLScheduler, cdrl_training_step  # noqa: E402

LOSS_TOLERANCE = 1e-4  # relative difference of the fp32 losses from the naive ones
GRAD_TOLERANCE = 1e-3  # relative L2 difference of the fp32 EBM gradient from the naive one
PRECISIONS = ("fp32", "bf16", "fp16")


def parse_mode(name: str) -> dict:
    if name == "naive":
        return {"naive": True, "precision": "fp32", "channels_last": False, "checkpointing": False}
    precision, *flags = name.split("_")
    if precision not in PRECISIONS or set(flags) - {"cl", "ckpt"}:
        raise SystemExit(f"Unknown mode {name!r}: expected naive or fp32|bf16|fp16 with _cl and/or _ckpt.")
    return {"naive": False, "precision": precision, "channels_last": "cl" in flags, "checkpointing": "ckpt" in flags}


def training_runs(args, arch: str, device: torch.device) -> dict:
    energy, initializer = build_models(arch, None, device, initializer_dropout=args.dropout)
    scheduler = CDRLScheduler(num_langevin_steps=args.steps)
    clean = torch.rand(args.batch_size, *energy_shape(energy), generator=torch.Generator().manual_seed(args.seed))
    clean = (clean * 2 - 1).to(device)

    def runner(mode: str):
        spec = parse_mode(mode)
        models = copy.deepcopy(energy).train(), copy.deepcopy(initializer).train()
        if spec["channels_last"]:
            for model in models:
                model.to(memory_format=torch.channels_last)
        if spec["checkpointing"]:
            models[0].enable_gradient_checkpointing()

        def run():
            for model in models:
                model.zero_grad(set_to_none=True)
            torch.manual_seed(args.seed)  # the initializer's dropout
            generator = torch.Generator(device).manual_seed(args.seed)
            if spec["naive"]:
                ebm_loss, initializer_loss = naive_training_step(*models, scheduler, clean, generator)
            else:
                out = cdrl_training_step(*models, scheduler, clean, generator=generator, precision=spec["precision"])
                ebm_loss, initializer_loss = out.ebm_loss, out.initializer_loss
            (ebm_loss + initializer_loss).backward()
            grad = torch.cat([p.grad.flatten() for p in models[0].parameters() if p.grad is not None])
            return ebm_loss.item(), initializer_loss.item(), grad.float()

        return run

    runs = {mode: runner(mode) for mode in args.modes}
    first = {mode: run() for mode, run in runs.items()}  # warm-up, and the results compared below
    flop_run = runner("fp32")
    flops = count_flops(flop_run)
    seconds = {mode: [] for mode in runs}
    memory = dict.fromkeys(runs, 0)
    start = time.perf_counter()
    for repeat in range(args.repeats):
        if repeat > 0 and time.perf_counter() - start > args.time_budget:
            print(f"  time budget reached after {repeat} repeats", flush=True)
            break
        for mode, run in runs.items():
            elapsed, peak, _ = timed(run, device)
            seconds[mode].append(elapsed)
            memory[mode] = max(memory[mode], peak)
    result = {
        "arch": arch,
        "batch_size": args.batch_size,
        "langevin_steps": args.steps,
        "flops_per_step": flops,
        "modes": {},
    }
    naive_median = summary(seconds["naive"])["median_s"] if "naive" in runs else None
    for mode in runs:
        stats = summary(seconds[mode])
        entry = {
            **stats,
            "images_per_s": args.batch_size / stats["median_s"],
            "peak_memory_bytes": memory[mode],
            "achieved_flop_per_s": flops / stats["median_s"],
            "ebm_loss": first[mode][0],
            "initializer_loss": first[mode][1],
        }
        if naive_median:
            entry["speedup_vs_naive"] = naive_median / stats["median_s"]
        if "naive" in first and mode != "naive":
            reference = first["naive"]
            entry["ebm_loss_rel_diff"] = abs(first[mode][0] - reference[0]) / max(abs(reference[0]), 1e-12)
            entry["initializer_loss_rel_diff"] = abs(first[mode][1] - reference[1]) / max(abs(reference[1]), 1e-12)
            entry["ebm_grad_rel_diff"] = ((first[mode][2] - reference[2]).norm() / reference[2].norm()).item()
            if parse_mode(mode)["precision"] == "fp32":
                entry["matches_naive"] = bool(
                    max(entry["ebm_loss_rel_diff"], entry["initializer_loss_rel_diff"]) <= LOSS_TOLERANCE
                    and entry["ebm_grad_rel_diff"] <= GRAD_TOLERANCE
                )
        result["modes"][mode] = entry
    print_result(result, args)
    return result


def energy_shape(energy) -> tuple[int, int, int]:
    return (energy.config.in_channels, energy.config.sample_size, energy.config.sample_size)


def print_result(result: dict, args) -> None:
    steps = args.steps
    print(
        f"\n[{result['arch']}] training step (losses + backward), batch {result['batch_size']}, K = {steps} Langevin "
        f"steps" + ("" if steps == 15 else " (reduced from the paper's 15)"),
        flush=True,
    )
    print(
        f"  {'mode':<14s}{'median':>9s}{'min':>8s}{'max':>8s}{'IQR':>6s}{'img/s':>8s}{'speedup':>8s}{'GFLOP/s':>9s}"
        f"{'peak mem':>10s}{'loss rel.diff':>15s}{'grad rel.diff':>15s}"
    )
    for mode, entry in result["modes"].items():
        verdict = ""
        if "matches_naive" in entry:
            verdict = " ok" if entry["matches_naive"] else " FAIL"
        loss_diff = max(entry.get("ebm_loss_rel_diff", 0.0), entry.get("initializer_loss_rel_diff", 0.0))
        print(
            f"  {mode:<14s}{entry['median_s']:8.2f}s{entry['min_s']:7.2f}s{entry['max_s']:7.2f}s"
            f"{entry['iqr_rel']:6.0%}{entry['images_per_s']:8.2f}{entry.get('speedup_vs_naive', float('nan')):7.2f}x"
            f"{entry['achieved_flop_per_s'] / 1e9:9.1f}{fmt_bytes(entry['peak_memory_bytes']):>10s}"
            + ("" if mode == "naive" else f"{loss_diff:15.1e}{entry['ebm_grad_rel_diff']:15.1e}{verdict}"),
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=15, help="Langevin steps K (the paper: 15)")
    parser.add_argument("--modes", nargs="+", default=["naive", "fp32", "fp32_cl", "fp32_ckpt", "bf16", "bf16_cl"])
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="initializer dropout (the paper: 0.1). 0 by default: a channels_last tensor draws its dropout mask in "
        "memory order, so _cl modes would not reproduce the naive step's mask; the cost of dropout is negligible",
    )
    args = parser.parse_args(argv)
    for mode in args.modes:
        parse_mode(mode)
    return run_architectures(args, training_runs)


if __name__ == "__main__":
    main()
