"""Does reduced-precision sampling change sample quality? fp32 against bf16 autocast on trained models.

Two trained models, each scored by the metrics of its own benchmark (their code is reused, not copied):

- the 2-D checkerboard of examples/toy_2d.py: KL(true || model) of the level-0 density on a grid, the fraction of
  samples on the black squares, MMD and sliced Wasserstein distance to held-out data (``toy_2d.evaluate_toy``);
- class-conditional 16x16 digits of benchmarks/digits_guidance.py, guided (w = 1): classifier accuracy, Fréchet
  classifier distance, KID and diversity (``digits_guidance.generate`` and ``score_samples``).

Each precision is run with several sampling seeds. The verdict compares the fp32-bf16 difference of each metric's
mean with the noise of that mean: the seed-to-seed standard deviation, pooled over both precisions, divided by
sqrt(seeds) and multiplied by sqrt(2) for a difference of two means. bf16 means ``torch.autocast(bfloat16)`` around
sampling, which the pipelines follow: the networks run in bf16, while the Langevin state, the quadratic term and the
noise stay float32.

    flock /tmp/cdrl_heavy.lock python benchmarks/precision_quality.py --toy_dir outputs/toy_2d \\
        --digits_dir outputs/digits_cdrl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def compare(per_precision: dict[str, list[dict]], metrics: list[str]) -> dict:
    """Mean and std per precision, the difference of means, its noise and |difference| / noise per metric."""
    result = {}
    for metric in metrics:
        values = {p: [run[metric] for run in runs] for p, runs in per_precision.items()}
        seeds = min(len(v) for v in values.values())
        stds = [statistics.stdev(v) for v in values.values() if len(v) > 1]
        pooled = math.sqrt(sum(s * s for s in stds) / len(stds)) if stds else float("nan")
        noise = pooled * math.sqrt(2 / seeds)
        difference = statistics.mean(values["bf16"]) - statistics.mean(values["fp32"])
        result[metric] = {
            **{f"{p}_mean": statistics.mean(v) for p, v in values.items()},
            **{f"{p}_std": statistics.stdev(v) if len(v) > 1 else 0.0 for p, v in values.items()},
            "difference": difference,
            "noise_of_difference": noise,
            "difference_over_noise": abs(difference) / noise if noise > 0 else float("inf"),
        }
    return result


def print_comparison(title: str, comparison: dict) -> None:
    print(f"\n{title}")
    print(f"  {'metric':<22s}{'fp32 mean±std':>22s}{'bf16 mean±std':>22s}{'diff':>11s}{'noise':>10s}{'|d|/n':>7s}")
    for metric, row in comparison.items():
        print(
            f"  {metric:<22s}{row['fp32_mean']:>13.4g} ± {row['fp32_std']:<7.2g}{row['bf16_mean']:>13.4g} ± "
            f"{row['bf16_std']:<7.2g}{row['difference']:>+11.3g}{row['noise_of_difference']:>10.3g}"
            f"{row['difference_over_noise']:>7.2f}",
            flush=True,
        )


def toy_quality(args) -> dict:
    import toy_2d

    from cdrl_diffusers import CDRLScheduler, EnergyMLP, InitializerMLP

    scale = {} if args.toy_scale is None else {"data_scale": args.toy_scale}
    config = toy_2d.ToyConfig(num_eval_samples=args.toy_samples, **scale)
    if args.toy_dir is not None:
        models = toy_2d.ToyModels(
            EnergyMLP.from_pretrained(args.toy_dir / "energy_model").eval(),
            InitializerMLP.from_pretrained(args.toy_dir / "initializer").eval(),
            CDRLScheduler.from_pretrained(args.toy_dir / "scheduler"),
        )
        trained_for = f"loaded from {args.toy_dir}"
    else:
        start = time.perf_counter()
        models, _ = toy_2d.train_toy(config, progress=False, log=False)
        trained_for = f"trained here with toy_2d.ToyConfig() defaults in {time.perf_counter() - start:.0f} s"
    print(f"toy model: {trained_for}", flush=True)
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    seconds: dict[str, float] = dict.fromkeys(PRECISIONS, 0.0)
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            start = time.perf_counter()
            with autocast(precision):
                evaluation = toy_2d.evaluate_toy(models, config, seed=1234 + seed)
            seconds[precision] += time.perf_counter() - start
            runs[precision].append(evaluation.metrics)
    metrics = ["kl_true_model", "in_support_fraction", "mmd", "sliced_wasserstein"]
    comparison = compare(runs, metrics)
    print_comparison(f"2-D checkerboard, {args.seeds} seeds x {args.toy_samples} samples", comparison)
    return {"model": trained_for, "seconds": seconds, "comparison": comparison, "runs": runs}


def digits_quality(args) -> dict:
    import digits_guidance

    from cdrl_diffusers.evaluation import score_samples

    pipeline = digits_guidance.load_pipeline(args.digits_dir)
    splits = digits_guidance.digit_splits()
    classifier, _ = digits_guidance.evaluation_classifier(splits, args.classifier_cache)
    labels = torch.arange(10 * args.samples_per_class) % 10
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    seconds: dict[str, float] = dict.fromkeys(PRECISIONS, 0.0)
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            with autocast(precision):
                samples, elapsed = digits_guidance.generate(
                    pipeline, labels, guidance_scale=args.guidance_scale, seed=1000 * seed
                )
            seconds[precision] += elapsed
            scores = score_samples(classifier, samples.float(), labels, *splits.reference)
            runs[precision].append(scores.to_dict())
            print(f"  digits seed {seed} {precision}: {scores.to_dict()} ({elapsed:.0f} s)", flush=True)
    metrics = ["accuracy", "frechet_distance", "kid_mean", "diversity"]
    comparison = compare(runs, metrics)
    print_comparison(
        f"digits (w = {args.guidance_scale}), {args.seeds} seeds x {len(labels)} samples, model {args.digits_dir}",
        comparison,
    )
    return {"model": str(args.digits_dir), "seconds": seconds, "comparison": comparison, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy_dir", type=Path, default=None, help="a saved toy_2d run (default: train one here)")
    parser.add_argument("--toy_scale", type=float, default=None, help="data_scale of that run (default: the toy's)")
    parser.add_argument("--toy_samples", type=int, default=10_000)
    parser.add_argument("--digits_dir", type=Path, default=REPO / "outputs" / "digits_cdrl")
    parser.add_argument("--classifier_cache", type=Path, default=REPO / "outputs" / "classifier_cache")
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["toy", "digits"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "precision_quality.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(sys.argv), "threads": args.threads, "seeds": args.seeds, "torch": torch.__version__}
    if "toy" not in args.skip:
        results["toy_2d"] = toy_quality(args)
    if "digits" not in args.skip:
        results["digits"] = digits_quality(args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nWrote {args.results}")
    return results


if __name__ == "__main__":
    main()
