"""FID of the authors' released checkpoints, converted: convert, sample 50k images, compare with the data.

The paper reports FID 4.31 on CIFAR-10 (unconditional, Table 1) and 6.18 on ImageNet 32x32 with guidance w = 0.7
(Sec. 4.3). This script measures the same quantity for the converted models with this library's sampler:

    python benchmarks/paper_fid.py --checkpoint Cifar_10_best.pth.tar --pipeline models/cdrl-cifar10 \
        --reference cifar10_train.npz --inception-weights weights-inception-2015-12-05-6726825d.pth

``--reference`` is an ``.npz`` with one uint8 array of images (N, 32, 32, 3) (e.g. the 50k CIFAR-10 training images;
see docs/checkpoints.md); ``--inception-weights`` the torch-fidelity Inception file (``InceptionFeatures``). Class-
conditional models sample uniformly drawn classes, as the authors' evaluation does. A GPU is needed in practice: the
50k samples take 6 levels x 15 Langevin steps each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cdrl_diffusers import CDRLPipeline
from cdrl_diffusers.conversion import convert_official_checkpoint
from cdrl_diffusers.evaluation import InceptionFeatures, extract_features, frechet_distance
from cdrl_diffusers.validation import cli_non_negative_float, cli_positive_int


def reference_images(path: Path) -> torch.Tensor:
    """The images of an ``.npz`` (one uint8 NHWC array) as NCHW floats in [-1, 1]."""
    with np.load(path, allow_pickle=False) as arrays:
        if len(arrays.files) != 1:
            raise ValueError(f"{path} must hold one array of images, found {arrays.files}.")
        images = arrays[arrays.files[0]]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path} must hold uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}.")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sample_features(
    pipe: CDRLPipeline, features: InceptionFeatures, args: argparse.Namespace
) -> tuple[torch.Tensor, float]:
    """Inception features of ``args.num_samples`` samples, and the sampling time in seconds."""
    num_classes = pipe.energy_model.config.num_class_embeds
    labels = torch.Generator().manual_seed(args.seed)
    chunks, sampling_time = [], 0.0
    for start in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - start)
        kwargs = {"batch_size": count, "guidance_scale": args.guidance_scale}
        if num_classes is not None:
            kwargs["class_labels"] = torch.randint(num_classes, (count,), generator=labels).tolist()
        generator = torch.Generator(args.device).manual_seed(args.seed + start)
        began = time.perf_counter()
        samples = pipe(**kwargs, generator=generator, output_type="latent").images
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        sampling_time += time.perf_counter() - began
        chunks.append(extract_features(features, samples, batch_size=250).cpu())
        print(f"{start + count}/{args.num_samples} samples, {sampling_time:.0f} s of sampling", flush=True)
    return torch.cat(chunks), sampling_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the authors' .pth.tar file")
    parser.add_argument("--pipeline", type=Path, required=True, help="converted folder (converted here if missing)")
    parser.add_argument("--reference", type=Path, required=True, help=".npz of uint8 reference images (N, H, W, 3)")
    parser.add_argument("--inception-weights", type=Path, required=True, help="torch-fidelity Inception weights")
    parser.add_argument("--num-samples", type=cli_positive_int, default=50_000, help="samples (default 50000)")
    parser.add_argument("--batch-size", type=cli_positive_int, default=500, help="samples per pipeline call")
    parser.add_argument("--guidance-scale", type=cli_non_negative_float, default=0.0, help="w (0.7 for ImageNet)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()

    if not (args.pipeline / "model_index.json").is_file():
        convert_official_checkpoint(args.checkpoint, args.pipeline)
    pipe = CDRLPipeline.from_pretrained(args.pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    features = InceptionFeatures(args.inception_weights).to(args.device)
    real = extract_features(features, reference_images(args.reference), batch_size=250).cpu()
    fake, sampling_time = sample_features(pipe, features, args)
    result = {
        "fid": frechet_distance(real, fake),
        "num_samples": args.num_samples,
        "num_reference": real.shape[0],
        "guidance_scale": args.guidance_scale,
        "checkpoint": args.checkpoint.name,
        "sampling_seconds": sampling_time,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
