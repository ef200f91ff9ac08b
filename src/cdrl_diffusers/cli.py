"""The ``cdrl-diffusers`` command line: sample, inpaint, compose and score with a trained CDRL pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .validation import cli_device, cli_non_negative_float, cli_non_negative_int, cli_positive_int

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}

DESCRIPTION = """\
Sample from, inpaint with, compose and score images with a trained CDRL energy-based model.

MODEL is a folder written by `CDRLPipeline.save_pretrained` (e.g. the output of examples/train_cdrl.py) or a Hugging
Face Hub repo id. Weights are read from safetensors only.

examples:
  cdrl-diffusers sample outputs/cdrl-shapes --num-images 16 --output samples.png
  cdrl-diffusers sample outputs/cdrl-digits --class-label 3 --guidance-scale 1.0 --output threes.png
  cdrl-diffusers inpaint outputs/cdrl-shapes --image photo.png --mask mask.png --num-samples 4 --output filled.png
  cdrl-diffusers compose outputs/cdrl-attributes --concept shape=circle --concept color=red --guidance-scale 1
  cdrl-diffusers score outputs/cdrl-shapes test_images/ --out-of-distribution other_images/ --output scores.json
  cdrl-diffusers convert Cifar_10_best.pth.tar models/cdrl-cifar10
"""


def _label(text: str) -> int | str:
    """Class labels are ids when they look like integers, class names otherwise."""
    return int(text) if text.lstrip("-").isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdrl-diffusers", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description)
        sub.add_argument("model", metavar="MODEL", help="a saved pipeline folder or a Hub repo id")
        sub.add_argument(
            "--device", type=cli_device, default=None, help="torch device (default: cuda if available, else cpu)"
        )
        sub.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL")
        sub.add_argument("--local-files-only", action="store_true", help="never contact the Hub; use the cache")
        return sub

    def add_sampling(sub: argparse.ArgumentParser, count_name: str, count_help: str) -> None:
        sub.add_argument(count_name, type=cli_positive_int, default=8, help=count_help)
        sub.add_argument(
            "--batch-size", type=cli_positive_int, default=16, help="images per pipeline call (default 16)"
        )
        sub.add_argument(
            "--num-langevin-steps",
            type=cli_non_negative_int,
            default=None,
            help="Langevin steps per level; other values than the trained K apply the sampling adjustment, 0 keeps "
            "the initializer's proposals",
        )
        sub.add_argument(
            "--guidance-scale", type=cli_non_negative_float, default=0.0, help="classifier-free guidance w (default 0)"
        )
        sub.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sub.add_argument("--output", type=Path, required=True, help="PNG file for the image grid")
        sub.add_argument("--save-individual", action="store_true", help="also write each image next to the grid")

    sample = add_command("sample", "generate images", "Generate images (Algorithm 2, optional guidance).")
    add_sampling(sample, "--num-images", "number of images (default 8)")
    sample.add_argument(
        "--class-label", type=_label, action="append", help="class id or name (repeat for several; cycled)"
    )

    inpaint = add_command("inpaint", "fill the masked region of an image", "Inpaint: white mask pixels are generated.")
    add_sampling(inpaint, "--num-samples", "inpaintings of the image, with different seeds (default 8)")
    inpaint.add_argument("--image", type=Path, required=True, help="the image to complete")
    inpaint.add_argument("--mask", type=Path, required=True, help="mask image: white = generate, black = keep")
    inpaint.add_argument("--class-label", type=_label, default=None, help="class id or name for conditional models")
    inpaint.add_argument("--resize", action="store_true", help="resize image and mask to the model's resolution")

    compose = add_command(
        "compose",
        "generate images with several concepts at once",
        "Compose concepts (Eq. 14); negative --concept-weight values express NOT.",
    )
    add_sampling(compose, "--num-images", "number of images (default 8)")
    compose.add_argument("--concept", type=_label, action="append", required=True, help="class id or name (repeat)")
    compose.add_argument("--concept-weight", type=float, action="append", help="weight per concept (default 1 + w)")
    compose.add_argument(
        "--product-of-experts", action="store_true", help="the Du et al. (2020) baseline without the negative term"
    )
    compose.add_argument(
        "--compose-initializer",
        action=argparse.BooleanOptionalAction,
        help="compose the initializer's means too (default: when the initializer is class-conditional)",
    )

    score = add_command(
        "score",
        "log-density / out-of-distribution scores",
        "Score images by the level-0 log-density (higher = more in-distribution, Sec. 4.4).",
    )
    score.add_argument("images", nargs="+", type=Path, help="image files or folders (in-distribution set)")
    score.add_argument(
        "--out-of-distribution",
        nargs="+",
        type=Path,
        default=None,
        help="files or folders of a shifted set: also report the AUROC of separating it from IMAGES",
    )
    score.add_argument("--class-label", type=_label, default=None, help="score the class-conditional density")
    score.add_argument(
        "--noise-level", type=cli_non_negative_int, default=0, help="pair t whose EBM scores the images (default 0)"
    )
    score.add_argument("--resize", action="store_true", help="resize images to the model's resolution")
    score.add_argument("--batch-size", type=cli_positive_int, default=256, help="images per forward pass")
    score.add_argument("--output", type=Path, default=None, help="write the scores (and AUROC) as JSON")
    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint of the authors' code into a pipeline folder",
        description="Convert a checkpoint of the authors' CDRL code (e.g. Cifar_10_best.pth.tar, cond_best.pth.tar) "
        "into a CDRLPipeline folder. The file is read with torch.load(weights_only=True): no code in it runs.",
    )
    convert.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="the .pth.tar file")
    convert.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="the folder to create (new or empty)")
    convert.add_argument("--no-ema", action="store_true", help="convert the raw weights instead of their EMA")
    convert.add_argument(
        "--class-names", type=Path, default=None, help="text file with one class name per line, in label order"
    )
    return parser


def _load(pipeline_class: type, args: argparse.Namespace):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = pipeline_class.from_pretrained(args.model, revision=args.revision, local_files_only=args.local_files_only)
    pipe.set_progress_bar_config(desc="noise levels", leave=False)
    return pipe.to(device)


def _image_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image file or folder: {path}")
    if not files:
        raise FileNotFoundError(
            f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}"
        )
    return files


def _open_images(files: Sequence[Path], pipe, resize: bool = False) -> list:
    import PIL.Image

    channels, size = pipe.sample_shape[0], pipe.sample_shape[1]
    images = []
    for file in files:
        image = PIL.Image.open(file).convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            if not resize:
                raise ValueError(
                    f"{file} is {image.size[0]}x{image.size[1]}, the model expects {size}x{size}; use --resize."
                )
            image = image.resize((size, size), PIL.Image.BICUBIC)
        images.append(image)
    return images


def _batched(pipe, total: int, batch_size: int, seed: int, call_kwargs: Callable[[int, int], dict]) -> list:
    """``total`` images in calls of at most ``batch_size``; image i always uses the seed ``seed + i``."""
    images = []
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
        images.extend(pipe(generator=generators, output_type="pil", **call_kwargs(count, start)).images)
    return images


def _save(images: list, args: argparse.Namespace, leading: list | None = None) -> None:
    """A grid of ``leading + images`` at ``--output``; with ``--save-individual`` also ``<stem>_<i>.png`` per image."""
    from diffusers.utils import make_image_grid

    args.output.parent.mkdir(parents=True, exist_ok=True)
    cells = (leading or []) + images
    columns = min(len(cells), 8)
    rows = -(-len(cells) // columns)
    blank = cells[0].copy()
    blank.paste(0, (0, 0, *blank.size))
    make_image_grid(cells + [blank] * (rows * columns - len(cells)), rows=rows, cols=columns).save(args.output)
    print(f"Wrote a grid of {len(cells)} image(s) to {args.output}")
    if args.save_individual:
        for index, image in enumerate(images):
            image.save(args.output.with_name(f"{args.output.stem}_{index:04d}.png"))
        print(f"Wrote {len(images)} image(s) to {args.output.parent / (args.output.stem + '_*.png')}")


def run_sample(args: argparse.Namespace) -> None:
    from .pipelines import CDRLPipeline

    pipe = _load(CDRLPipeline, args)
    labels = args.class_label

    def call_kwargs(count: int, start: int) -> dict:
        kwargs = {"batch_size": count, "guidance_scale": args.guidance_scale}
        kwargs["num_langevin_steps"] = args.num_langevin_steps
        if labels:
            kwargs["class_labels"] = [labels[(start + i) % len(labels)] for i in range(count)]
        return kwargs

    _save(_batched(pipe, args.num_images, args.batch_size, args.seed, call_kwargs), args)


def run_inpaint(args: argparse.Namespace) -> None:
    import PIL.Image

    from .pipelines import CDRLInpaintPipeline

    pipe = _load(CDRLInpaintPipeline, args)
    image = _open_images([args.image], pipe, args.resize)[0]
    if not args.mask.is_file():
        raise FileNotFoundError(f"No such mask file: {args.mask}")
    mask = PIL.Image.open(args.mask).convert("L")
    if mask.size != image.size:
        if not args.resize:
            raise ValueError(
                f"{args.mask} is {mask.size[0]}x{mask.size[1]}, the image is {image.size[0]}x"
                f"{image.size[1]}; use --resize."
            )
        mask = mask.resize(image.size, PIL.Image.NEAREST)

    def call_kwargs(count: int, start: int) -> dict:
        return {
            "image": [image] * count,
            "mask_image": [mask] * count,
            "class_labels": args.class_label,
            "guidance_scale": args.guidance_scale,
            "num_langevin_steps": args.num_langevin_steps,
        }

    _save(_batched(pipe, args.num_samples, args.batch_size, args.seed, call_kwargs), args, leading=[image])


def run_compose(args: argparse.Namespace) -> None:
    from .pipelines import CDRLComposePipeline

    pipe = _load(CDRLComposePipeline, args)

    def call_kwargs(count: int, start: int) -> dict:
        return {
            "concepts": args.concept,
            "concept_weights": args.concept_weight,
            "guidance_scale": args.guidance_scale,
            "batch_size": count,
            "num_langevin_steps": args.num_langevin_steps,
            "product_of_experts": args.product_of_experts,
            "compose_initializer": args.compose_initializer,
        }

    _save(_batched(pipe, args.num_images, args.batch_size, args.seed, call_kwargs), args)


def run_score(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .pipelines import CDRLPipeline

    pipe = _load(CDRLPipeline, args)

    def scores_of(paths: Sequence[Path], name: str) -> tuple[list[Path], torch.Tensor]:
        files = _image_files(paths)
        scores = []
        for start in tqdm(range(0, len(files), args.batch_size), desc=f"scoring {name}", unit="batch"):
            chunk = _open_images(files[start : start + args.batch_size], pipe, args.resize)
            scores.append(pipe.log_density(chunk, class_labels=args.class_label, noise_level=args.noise_level))
        return files, torch.cat(scores)

    files, scores = scores_of(args.images, "images")
    report = {"scores": {str(file): float(score) for file, score in zip(files, scores)}}
    print(
        f"{len(files)} image(s): mean log-density {scores.mean():.6g} (min {scores.min():.6g}, max {scores.max():.6g})"
    )
    if args.out_of_distribution:
        from .evaluation import ood_auroc

        ood_files, ood_scores = scores_of(args.out_of_distribution, "out-of-distribution images")
        auroc = ood_auroc(scores, ood_scores)
        report["out_of_distribution_scores"] = {str(f): float(s) for f, s in zip(ood_files, ood_scores)}
        report["auroc"] = auroc
        print(
            f"{len(ood_files)} out-of-distribution image(s): mean log-density {ood_scores.mean():.6g}; "
            f"AUROC {auroc:.4f}"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"Wrote {args.output}")


def run_convert(args: argparse.Namespace) -> None:
    from .conversion import convert_official_checkpoint

    class_names = None
    if args.class_names is not None:
        if not args.class_names.is_file():
            raise FileNotFoundError(f"No such class-names file: {args.class_names}")
        class_names = [line.strip() for line in args.class_names.read_text(encoding="utf-8").splitlines()]
        while class_names and not class_names[-1]:
            class_names.pop()
    pipe = convert_official_checkpoint(
        args.checkpoint, args.output_dir, use_ema=not args.no_ema, class_names=class_names
    )
    classes = pipe.energy_model.config.num_class_embeds
    kind = f"class-conditional, {classes} classes" if classes else "unconditional"
    print(f"Wrote a CDRLPipeline ({kind}, {'raw' if args.no_ema else 'EMA'} weights) to {args.output_dir}")


COMMANDS = {
    "sample": run_sample,
    "inpaint": run_inpaint,
    "compose": run_compose,
    "score": run_score,
    "convert": run_convert,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cdrl-diffusers`` console script."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"cdrl-diffusers {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
