"""Shared helpers of bench_sampling.py and bench_training.py: models, timing, memory and FLOPs."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdrl_diffusers import EnergyModel, InitializerUNet

# The paper's 32x32 EBM and initializer are the library defaults; "small" is a quick stand-in of the same design.
ARCHITECTURES = {
    "paper": ({}, {}),
    "small": (
        {"block_out_channels": (32, 64, 64), "layers_per_block": 2, "embedding_dim": 128},
        {"block_out_channels": (32, 32, 32), "layers_per_block": 1},
    ),
    "tiny": (
        {"sample_size": 8, "block_out_channels": (8, 16), "layers_per_block": 1, "embedding_dim": 16},
        {
            "sample_size": 8,
            "block_out_channels": (8, 8),
            "layers_per_block": 1,
            "attention_resolutions": (4,),
            "attention_head_dim": 4,
            "norm_num_groups": 4,
        },
    ),
}


def build_models(
    arch: str, num_class_embeds: int | None, device: torch.device, seed: int = 0, initializer_dropout: float = 0.1
):
    """Random-weight EBM and initializer of ``arch``, with every layer active (non-zero residual/output scales)."""
    energy_kwargs, initializer_kwargs = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    energy = EnergyModel(num_class_embeds=num_class_embeds, **energy_kwargs)
    initializer = InitializerUNet(num_class_embeds=num_class_embeds, dropout=initializer_dropout, **initializer_kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Fresh models start as identities (zero residual scales, zero last conv); timings do not care, but the
        # precision checks would then see a nearly linear network.
        for block in energy.blocks:
            block.residual_scale.copy_(torch.rand(block.residual_scale.shape, generator=generator) * 0.2 + 0.05)
        conv_out = initializer.unet.conv_out.weight
        conv_out.copy_(torch.randn(conv_out.shape, generator=generator) * 0.01)
    return energy.to(device).eval(), initializer.to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _heap_in_use() -> Callable[[], int]:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2), or the resident set size elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2
        mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):

        def resident() -> int:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        return resident

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class PeakMemory:
    """Peak memory of a block above its start: CUDA's allocator peak, or on CPU the peak of malloc's bytes in use
    (PyTorch's CPU tensors come from malloc), sampled every millisecond by a thread."""

    _in_use = staticmethod(_heap_in_use())

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._in_use())
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = self._in_use()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._in_use()) - self._start


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int, object]:
    """(seconds, peak memory in bytes, result) of one call."""
    synchronize(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory.peak_bytes, result


def summary(seconds: list[float]) -> dict[str, float]:
    """Median and spread (min, max, and the relative interquartile range) of repeated timings."""
    ordered = sorted(seconds)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    median = statistics.median(ordered)
    return {
        "median_s": median,
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_rel": (quartiles[2] - quartiles[0]) / median,
        "repeats": len(ordered),
    }


class _GlobalScope:
    """Stands in for FlopCounterMode's module tracker, whose hooks fail on ``autograd.grad`` of a leaf input."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalScope:
        return self

    def __exit__(self, *exc) -> None:
        return None


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (2 per multiply-add) of convolutions and matrix products in ``fn``, incl. backward."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalScope()
    with counter:
        fn()
    return counter.get_total_flops()


def environment(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                flags = next(line for line in cpuinfo if line.startswith("flags")).split()
            info["amx_in_cpuinfo"] = any(flag.startswith("amx") for flag in flags)
            info["avx512_bf16"] = "avx512_bf16" in flags
        except (OSError, StopIteration):
            pass
    return info


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags bench_sampling.py and bench_training.py share: models, repeats, device, seed, output."""
    parser.add_argument("--arch", nargs="+", default=["paper", "small"], choices=["paper", "small", "tiny"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--allow-tf32", action="store_true", help="CUDA: let fp32 convolutions use TF32 (PyTorch's default for cuDNN)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; stop adding repeats")
    parser.add_argument("--json", default=None, help="write the results here")


def run_architectures(args: argparse.Namespace, runs: Callable[[argparse.Namespace, str, torch.device], dict]) -> dict:
    """Apply the device settings, then ``runs(args, arch, device)`` per architecture, rewriting the JSON after each."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    payload = {"command": " ".join(sys.argv), "environment": environment(device), "results": []}
    print(f"environment: {payload['environment']}", flush=True)
    for arch in args.arch:
        payload["results"].append(runs(args, arch, device))
        write_json(args.json, payload)
    return payload


def fmt_bytes(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"
