"""Sampling speed of CDRLPipeline against the naive Algorithm 2 (benchmarks/naive.py), in one process.

Both paths use the same weights, latents, labels and generator seed, so their samples must agree: the fp32 modes
are checked against the naive samples with a stated tolerance; the reduced-precision modes report their deviation
(their effect on sample quality is measured on trained models, see docs/performance.md).

Modes: ``naive``, or ``fp32`` / ``bf16`` / ``fp16`` (the networks under ``torch.autocast`` of that dtype) with
optional suffixes ``_cl`` (channels_last models), ``_compile`` (``fold_spectral_norm`` then ``torch.compile`` on the
EBM) and ``_graph`` (``pipe.enable_cuda_graph()``, CUDA only).
The repeats of all modes are interleaved, so a load change on a shared machine hits every mode alike.

    flock /tmp/cdrl_heavy.lock python benchmarks/bench_sampling.py --arch paper --batch-size 8 --levels 2 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).parent))
from naive import _guided, naive_sample, textbook_blocks  # noqa: E402
from perf_utils import (  # noqa: E402
    add_run_arguments,
    build_models,
    count_flops,
    fmt_bytes,
    run_architectures,
    summary,
    timed,
)

from cdrl_diffusers import CDRLPipeline, CDRLScheduler, ConditionWeights, fold_spectral_norm  # noqa: E402
from cdrl_diffusers.acceleration import precision_context  # noqa: E402
from cdrl_diffusers.guidance import embed_terms, weighted_model_output  # noqa: E402
from cdrl_diffusers.sampling import energy_gradient, frozen  # noqa: E402

NUM_CLASSES = 10
FP32_TOLERANCE = 1e-4  # max |x_0 difference| between the fp32 modes and the naive baseline, data in [-1, 1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_mode(name: str) -> dict:
    if name == "naive":
        flags = {"channels_last": False, "torch_compile": False, "cuda_graph": False}
        return {"naive": True, "precision": "fp32", **flags}
    precision, *flags = name.split("_")
    unknown = set(flags) - {"cl", "compile", "graph"}
    if precision not in DTYPES or unknown:
        raise SystemExit(f"Unknown mode {name!r}: expected naive or fp32|bf16|fp16 with _cl, _compile, _graph.")
    return {
        "naive": False,
        "precision": precision,
        "channels_last": "cl" in flags,
        "torch_compile": "compile" in flags,
        "cuda_graph": "graph" in flags,
    }


def build_pipeline(energy, initializer, scheduler, spec: dict) -> CDRLPipeline:
    """The pipeline of one mode: channels_last copies, a folded and compiled EBM, CUDA graphs, as a user sets them."""
    if spec["channels_last"]:
        energy = copy.deepcopy(energy).to(memory_format=torch.channels_last)
        initializer = copy.deepcopy(initializer).to(memory_format=torch.channels_last)
    if spec["torch_compile"]:
        energy = fold_spectral_norm(energy)
        energy.compile(dynamic=False)
    pipe = CDRLPipeline(energy, initializer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    if spec["cuda_graph"]:
        pipe.enable_cuda_graph()
    return pipe


def sampling_runs(args, arch: str, device: torch.device) -> dict:
    energy, initializer = build_models(arch, NUM_CLASSES, device)
    scheduler = CDRLScheduler(num_noise_levels=args.levels, num_langevin_steps=args.steps)
    pipelines = {
        mode: build_pipeline(energy, initializer, scheduler, parse_mode(mode))
        for mode in args.modes
        if not parse_mode(mode)["naive"]
    }
    batch = args.batch_size
    inputs = torch.Generator().manual_seed(args.seed)
    size = energy.config.sample_size
    latents = torch.randn(batch, energy.config.in_channels, size, size, generator=inputs).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=inputs).to(device)

    def runner(mode: str, guidance_scale: float):
        spec = parse_mode(mode)

        def run() -> torch.Tensor:
            generator = torch.Generator(device).manual_seed(args.seed)
            if spec["naive"]:
                return naive_sample(energy, initializer, scheduler, latents, labels, guidance_scale, None, generator)
            with precision_context(spec["precision"], device):
                return pipelines[mode](
                    batch_size=batch,
                    class_labels=labels,
                    guidance_scale=guidance_scale,
                    latents=latents,
                    generator=generator,
                    output_type="latent",
                ).images

        return run

    # FLOPs: one guided gradient evaluation and one initializer pass, times the number of each per sampling call.
    gradient_evaluations = args.levels * args.steps + 1
    results: dict = {"arch": arch, "batch_size": batch, "levels": args.levels, "steps": args.steps, "cases": {}}
    start = time.perf_counter()
    for case, guidance_scale in (("guided", args.guidance_scale), ("unguided", 0.0)):
        if case not in args.cases:
            continue
        weights = ConditionWeights.classifier_free_guidance(labels, guidance_scale)
        terms = weights.stack(NUM_CLASSES, batch, device)
        initializer_terms = weights.for_initializer().stack(NUM_CLASSES, batch, device)
        gradient_flops, initializer_flops = measure_work(
            energy, initializer, latents, scheduler.energy_logsnr(0, device=device), terms, initializer_terms
        )
        flops = gradient_evaluations * gradient_flops + args.levels * initializer_flops
        runs = {mode: runner(mode, guidance_scale) for mode in args.modes}
        outputs, seconds, memory = {}, {mode: [] for mode in runs}, {}
        for mode, run in runs.items():  # warm-up (and compilation), and the samples compared below
            compile_start = time.perf_counter()
            outputs[mode] = run()
            seconds[mode] = []
            memory[mode] = 0
            if parse_mode(mode)["torch_compile"]:
                results.setdefault("compile_s", {})[f"{case}/{mode}"] = time.perf_counter() - compile_start
        for repeat in range(args.repeats):
            if repeat > 0 and time.perf_counter() - start > args.time_budget:
                print(f"  time budget reached: {repeat} repeats of {case}", flush=True)
                break
            for mode, run in runs.items():
                elapsed, peak, _ = timed(run, device)
                seconds[mode].append(elapsed)
                memory[mode] = max(memory[mode], peak)
        reference = outputs.get("naive")
        naive_median = summary(seconds["naive"])["median_s"] if "naive" in seconds else None
        case_result = {"guidance_scale": guidance_scale, "flops_per_call": flops, "modes": {}}
        for mode in runs:
            stats = summary(seconds[mode])
            spec = parse_mode(mode)
            entry = {
                **stats,
                "images_per_s": batch / stats["median_s"],
                "peak_memory_bytes": memory[mode],
                "achieved_flop_per_s": flops / stats["median_s"],
            }
            if naive_median:
                entry["speedup_vs_naive"] = naive_median / stats["median_s"]
            if reference is not None and mode != "naive":
                error = (outputs[mode].float() - reference.float()).abs()
                entry["max_abs_diff_vs_naive"] = error.max().item()
                entry["mean_abs_diff_vs_naive"] = error.mean().item()
                if spec["precision"] == "fp32":
                    entry["matches_naive"] = bool(entry["max_abs_diff_vs_naive"] <= FP32_TOLERANCE)
            case_result["modes"][mode] = entry
        results["cases"][case] = case_result
        print_case(arch, case, batch, args, case_result)
    if args.ablation:
        results["ablation"] = ablation(args, energy, scheduler, latents, labels, device)
    return results


def measure_work(energy, initializer, latents, logsnr, terms, initializer_terms):
    """FLOPs of one guided gradient evaluation and one initializer pass."""

    def gradient():
        return energy_gradient(energy, latents, logsnr, terms, embed_terms(energy, logsnr, terms, latents.shape[0]))

    with frozen(energy, initializer):
        gradient_flops = count_flops(gradient)
        initializer_flops = count_flops(lambda: weighted_model_output(initializer, latents, logsnr, initializer_terms))
    return gradient_flops, initializer_flops


def ablation(args, energy, scheduler, latents, labels, device) -> dict:
    """One guided energy-gradient evaluation (the Langevin inner step) with the optimisations added one by one.

    Each configuration runs two evaluations per timing (the second sees the caches primed, as Langevin steps 2..K
    do) and reports their mean.
    """
    logsnr = scheduler.energy_logsnr(0, device=device)
    weights = ConditionWeights.classifier_free_guidance(labels, args.guidance_scale)
    terms = weights.stack(NUM_CLASSES, latents.shape[0], device)
    energy_cl = copy.deepcopy(energy).to(memory_format=torch.channels_last).eval()
    energy.eval()

    def two_passes(model):
        y = latents.detach().requires_grad_(True)
        neg_energy = _guided(model, y, logsnr.item(), labels, args.guidance_scale, "neg_energy")
        return torch.autograd.grad(neg_energy.sum(), y)[0]

    def batched(model, cached):
        condition = embed_terms(model, logsnr, terms, latents.shape[0]) if cached else None
        return [energy_gradient(model, latents, logsnr, terms, condition) for _ in range(2)][-1]

    def two_passes_each(model, cached):
        return [two_passes(model) for _ in range(2)][-1]

    def configuration(gradient, frozen_params=True, cached=True, textbook=False, model=energy, precision="fp32"):
        def run():
            flags = [(p, p.requires_grad) for p in model.parameters()]
            model.requires_grad_(not frozen_params)
            caches = parametrize.cached() if cached else nullcontext()
            try:
                with caches, textbook_blocks() if textbook else nullcontext(), precision_context(precision, device):
                    return gradient(model, cached)
            finally:
                for param, flag in flags:
                    param.requires_grad_(flag)

        return run

    steps = {
        "naive: params require grad, 2 passes": configuration(two_passes_each, False, False, True),
        "+ no parameter gradients": configuration(two_passes_each, True, False, True),
        "+ SN weights cached": configuration(two_passes_each, True, True, True),
        "+ terms batched, conditioning embedded once": configuration(batched, True, True, True),
        "+ residual scale folded (library fp32)": configuration(batched),
        "+ channels_last": configuration(batched, model=energy_cl),
        "bf16 autocast": configuration(batched, precision="bf16"),
        "bf16 autocast + channels_last": configuration(batched, model=energy_cl, precision="bf16"),
        "fp16 autocast + channels_last": configuration(batched, model=energy_cl, precision="fp16"),
    }
    seconds = {name: [] for name in steps}
    reference = None
    errors = {}
    for name, run in steps.items():
        gradient = run()
        reference = gradient if reference is None else reference
        errors[name] = ((gradient.float() - reference).norm() / reference.norm()).item()
    for _ in range(args.repeats):
        for name, run in steps.items():
            seconds[name].append(timed(run, device)[0] / 2)
    base = summary(seconds[next(iter(steps))])["median_s"]
    result = {}
    batch = latents.shape[0]
    print(f"\n  Ablation: one guided gradient evaluation, batch {batch} x 2 terms (median of {args.repeats})")
    print(f"    {'configuration':<44s}{'time':>11s}{'speedup':>9s}{'rel. gradient error':>21s}")
    for name in steps:
        stats = summary(seconds[name])
        result[name] = {**stats, "speedup_vs_naive": base / stats["median_s"], "relative_gradient_error": errors[name]}
        print(
            f"    {name:<44s}{stats['median_s'] * 1e3:9.0f}ms{base / stats['median_s']:8.2f}x{errors[name]:21.1e}",
            flush=True,
        )
    return result


def print_case(arch: str, case: str, batch: int, args, result: dict) -> None:
    evaluations = args.levels * args.steps + 1
    print(
        f"\n[{arch}] {case} sampling (w={result['guidance_scale']}), batch {batch}, {args.levels} levels x "
        f"{args.steps} Langevin steps + Tweedie = {evaluations} gradient evaluations per call"
        + ("" if (args.levels, args.steps) == (6, 15) else " (reduced from the paper's 6 x 15)"),
        flush=True,
    )
    header = (
        f"  {'mode':<18s}{'median':>9s}{'min':>8s}{'max':>8s}{'IQR':>6s}{'img/s':>8s}{'speedup':>8s}{'GFLOP/s':>9s}"
        f"{'peak mem':>10s}{'max|dx| vs naive':>18s}"
    )
    print(header)
    for mode, entry in result["modes"].items():
        diff = entry.get("max_abs_diff_vs_naive")
        verdict = ""
        if "matches_naive" in entry:
            verdict = " ok" if entry["matches_naive"] else f" FAIL (> {FP32_TOLERANCE})"
        print(
            f"  {mode:<18s}{entry['median_s']:8.2f}s{entry['min_s']:7.2f}s{entry['max_s']:7.2f}s"
            f"{entry['iqr_rel']:6.0%}{entry['images_per_s']:8.2f}"
            f"{entry.get('speedup_vs_naive', float('nan')):7.2f}x{entry['achieved_flop_per_s'] / 1e9:9.1f}"
            f"{fmt_bytes(entry['peak_memory_bytes']):>10s}"
            f"{'' if diff is None else f'{diff:.1e}':>14s}{verdict}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--levels", type=int, default=6, help="noise levels T (the paper: 6)")
    parser.add_argument("--steps", type=int, default=15, help="Langevin steps K per level (the paper: 15)")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--cases", nargs="+", default=["guided", "unguided"], choices=["guided", "unguided"])
    parser.add_argument("--modes", nargs="+", default=["naive", "fp32", "fp32_cl", "bf16", "bf16_cl"])
    parser.add_argument("--ablation", action="store_true", help="also time each optimisation on one evaluation")
    args = parser.parse_args(argv)
    for mode in args.modes:
        parse_mode(mode)
    return run_architectures(args, sampling_runs)


if __name__ == "__main__":
    main()
