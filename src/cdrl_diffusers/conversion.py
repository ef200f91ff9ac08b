"""Convert checkpoints of the authors' CDRL code (AlvinZhuyx/CDRL) into ``CDRLPipeline`` folders.

The authors released ``Cifar_10_best.pth.tar`` (unconditional CIFAR-10, ``main_uncond.py``) and ``cond_best.pth.tar``
(class-conditional ImageNet 32x32, ``main_cond.py``). Each is a ``torch.save`` dict with the raw weights of the EBM
(``pi_state_dict``) and of the initializer (``p_state_dict``) as saved from ``DistributedDataParallel`` (a
``module.`` prefix), their exponential moving averages (``pi_ema_state_dict`` / ``p_ema_state_dict``, ``torch_ema``
states whose ``shadow_params`` follow the order of the network's parameters), and optimizer and learning-rate
scheduler states, which are not needed for sampling.

``EnergyModel`` and ``InitializerUNet`` are the same networks layer for layer, so the conversion only renames
tensors (and splits the initializer's fused attention projection into diffusers' query, key and value maps). The
spectral-norm vectors ``u`` and ``v`` are kept: in eval mode the converted EBM computes exactly what the authors'
EBM computes in eval mode with its EMA weights (their code swaps in the EMA parameters and keeps the vectors of the
raw model). The architecture (widths, blocks per resolution, attention resolutions, classes) is read from the
tensors, so checkpoints of other configurations of that code convert too. Files are read with
``torch.load(weights_only=True)``: no code stored in a checkpoint is ever run.

Details the tensors cannot show are those of the authors' training scripts: 32x32 images, LeakyReLU 0.2 in the EBM,
one attention head and 32 normalisation groups in the initializer, a residual initializer output without tanh, and
the sampler settings of ``official_scheduler``.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard

from .model_card import PAPER_URL
from .models import EnergyModel, InitializerUNet
from .pipelines import CDRLPipeline
from .schedulers import CDRLScheduler

SN_BUFFERS = {"weight_u": "parametrizations.weight.0._u", "weight_v": "parametrizations.weight.0._v"}
SN_WEIGHT = {"weight_orig": "parametrizations.weight.original"}
REQUIRED_KEYS = ("pi_state_dict", "p_state_dict")
EMA_KEYS = ("pi_ema_state_dict", "p_ema_state_dict")
SOURCE_REPOSITORY = "https://github.com/AlvinZhuyx/CDRL"


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """What the paper reports for one of the authors' released checkpoints, recognised by its architecture."""

    file_name: str
    training_script: str
    dataset: str
    evaluation: dict[str, str]
    energy_config: dict[str, Any]
    initializer_config: dict[str, Any]


PAPER_EBM = {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 8, "embedding_dim": 512}
PAPER_INITIALIZER = {"block_out_channels": (64, 64, 64), "attention_resolutions": (16, 8)}
RELEASED_CHECKPOINTS = (
    ReleasedCheckpoint(
        file_name="Cifar_10_best.pth.tar",
        training_script="main_uncond.py",
        dataset="CIFAR-10",
        evaluation={"FID of the released checkpoint (reported by the paper, Table 1; not measured here)": "4.31"},
        energy_config={**PAPER_EBM, "num_class_embeds": None},
        initializer_config={**PAPER_INITIALIZER, "layers_per_block": 3, "num_class_embeds": None},
    ),
    ReleasedCheckpoint(
        file_name="cond_best.pth.tar",
        training_script="main_cond.py",
        dataset="ImageNet 32x32",
        evaluation={
            "FID of the released checkpoint at guidance_scale 0.7 (reported by the paper, Sec. 4.3 and Fig. 3c; "
            "not measured here)": "6.18"
        },
        energy_config={**PAPER_EBM, "num_class_embeds": 1000},
        initializer_config={**PAPER_INITIALIZER, "layers_per_block": 2, "num_class_embeds": 1000},
    ),
)


def official_scheduler() -> CDRLScheduler:
    """The sampler settings of the authors' scripts: T = 6, K = 15, log-SNR 9.8 to -5.1, c = 4e-4 (App. A.2-A.3)."""
    return CDRLScheduler(
        num_noise_levels=6,
        logsnr_max=9.8,
        logsnr_min=-5.1,
        num_langevin_steps=15,
        schedule="cosine",
        langevin_step_size_rule="image",
        langevin_step_size_scale=4e-4,
        tweedie_coefficient=2.0,
        clip_sample=True,
    )


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint of the authors' code with ``torch.load(weights_only=True)`` and check its layout.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PyTorch checkpoint, is truncated or damaged, holds Python objects other than
            tensors and containers (whose unpickling could run code, so it is refused), or lacks the entries the
            authors' scripts save.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such checkpoint file: {path}")
    with path.open("rb") as file:
        magic = file.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise ValueError(f"{path} is not a PyTorch checkpoint (it is neither a torch.save archive nor a pickle).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise ValueError(
                f"{path} holds Python objects other than tensors and plain containers (e.g. {refused[1]}); it is not "
                "loaded, since unpickling them could run code. The authors' checkpoints hold none."
            ) from error
        raise ValueError(f"{path} is not a PyTorch checkpoint (the file cannot be unpickled as one).") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint: it is truncated, damaged or of another format ({error})."
        ) from error
    if not isinstance(checkpoint, Mapping) or not all(isinstance(key, str) for key in checkpoint):
        raise ValueError(f"{path} is not a checkpoint of the authors' CDRL code: it does not hold a dict of entries.")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"{path} is not a checkpoint of the authors' CDRL code (main_uncond.py / main_cond.py): it lacks "
            f"{', '.join(missing)}; its entries are {sorted(checkpoint)[:10]}."
        )
    return dict(checkpoint)


def _strip_ddp(state: Any, name: str) -> dict[str, torch.Tensor]:
    """The state dict without ``DistributedDataParallel``'s ``module.`` prefix (present on all keys or none)."""
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"The checkpoint's `{name}` is not a state dict of tensors.")
    keys = list(state)
    if keys and all(key.startswith("module.") for key in keys):
        return {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def _with_ema(state: dict[str, torch.Tensor], ema_state: Any, name: str) -> dict[str, torch.Tensor]:
    """``state`` with its parameters replaced by the ``torch_ema`` shadow parameters, matched by order.

    A state dict lists each module's parameters before its buffers, in the order of ``parameters()``; the only
    buffers of the authors' networks are the spectral-norm vectors, which stay those of the raw model.
    """
    if not isinstance(ema_state, Mapping) or not isinstance(ema_state.get("shadow_params"), Sequence):
        raise ValueError(f"The checkpoint's `{name}` is not a torch_ema state (with a `shadow_params` list).")
    shadow = list(ema_state["shadow_params"])
    parameters = [key for key in state if key.rsplit(".", 1)[-1] not in SN_BUFFERS]
    if len(shadow) != len(parameters):
        raise ValueError(
            f"The checkpoint's `{name}` has {len(shadow)} shadow parameters, but its network has {len(parameters)} "
            "parameters: they do not belong together."
        )
    averaged = dict(state)
    for key, value in zip(parameters, shadow):
        if not isinstance(value, torch.Tensor) or value.shape != state[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"The checkpoint's `{name}` does not match its network: the shadow parameter of {key} has shape "
                f"{shape}, the parameter {tuple(state[key].shape)}."
            )
        averaged[key] = value
    return averaged


def _unsupported(network: str, detail: str) -> ValueError:
    return ValueError(f"Unsupported configuration of the {network}: {detail}.")


def _weight(state: Mapping[str, torch.Tensor], prefix: str, network: str) -> torch.Tensor:
    for leaf in ("weight_orig", "weight"):
        if f"{prefix}.{leaf}" in state:
            return state[f"{prefix}.{leaf}"]
    raise ValueError(f"The {network} state dict lacks {prefix}.weight (or {prefix}.weight_orig).")


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted integers."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _energy_layout(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[int, int]]:
    """The ``EnergyModel`` config of an EBM state dict of the authors' code, and the block of each module index.

    Their ``module_list`` holds the stem convolution, then per resolution the residual blocks followed by an
    (parameter-free) average pooling, except after the last resolution.
    """
    network = "EBM (pi_state_dict)"
    stem = _weight(state, "module_list.0", network)
    time_map = _weight(state, "temb_map1", network)
    if stem.ndim != 4 or time_map.ndim != 2:
        raise _unsupported(network, "module_list.0 is not a convolution or temb_map1 not a dense layer")
    normalised = [key for key in state if key.endswith(".weight_orig")]
    plain = [key for key in state if key.endswith(".weight") and key != "temb_final.weight"]
    if normalised and plain:
        raise _unsupported(network, f"spectral normalisation on some layers only (not on {plain[0]})")
    blocks = sorted(
        {int(match[1]) for key in state if (match := re.fullmatch(r"module_list\.(\d+)\.conv1\.\w+", key))}
    )
    runs = _runs(blocks)
    if not blocks or runs[0][0] != 1 or any(b[0] != a[-1] + 2 for a, b in zip(runs, runs[1:])):
        raise _unsupported(network, f"residual blocks at module_list indices {blocks} are not grouped by resolution")
    if len({len(run) for run in runs}) != 1:
        raise _unsupported(network, f"the resolutions have {[len(run) for run in runs]} blocks, not the same number")
    widths = []
    for run in runs:
        run_widths = {_weight(state, f"module_list.{index}.conv1", network).shape[0] for index in run}
        if len(run_widths) != 1:
            raise _unsupported(network, f"the blocks of one resolution have widths {sorted(run_widths)}")
        widths.append(run_widths.pop())
    if widths[0] != stem.shape[0] or time_map.shape[1] != stem.shape[0]:
        raise _unsupported(
            network,
            f"the stem width {stem.shape[0]}, the first resolution's width {widths[0]} and the sinusoidal features "
            f"{time_map.shape[1]} differ (EnergyModel uses one number for all three)",
        )
    num_classes = None
    if "y_map.bias" in state:
        num_classes = _weight(state, "y_map", network).shape[1] - 1
    config = {
        "in_channels": stem.shape[1],
        "block_out_channels": tuple(widths),
        "layers_per_block": len(runs[0]),
        "embedding_dim": time_map.shape[0],
        "num_class_embeds": num_classes,
        "use_spectral_norm": bool(normalised),
    }
    return config, {index: number for number, index in enumerate(blocks)}


def _module_kinds(state: Mapping[str, torch.Tensor], prefix: str, network: str) -> list[str]:
    """``"resnet"`` or ``"attention"`` for each submodule ``{prefix}.{k}``, k = 0, 1, ... of the authors' UNet."""
    indices = sorted({int(match[1]) for key in state if (match := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))})
    if indices != list(range(len(indices))):
        raise _unsupported(network, f"{prefix} has submodules {indices}")
    kinds = []
    for index in indices:
        if f"{prefix}.{index}.to_qkv.weight" in state:
            kinds.append("attention")
        elif f"{prefix}.{index}.conv1.weight" in state:
            kinds.append("resnet")
        else:
            raise _unsupported(network, f"{prefix}.{index} is neither a residual block nor an attention block")
    return kinds


def _level_pattern(blocks: int, attention: bool, resample: bool) -> list[str]:
    return (["resnet", "attention"] if attention else ["resnet"]) * blocks + (["resnet"] if resample else [])


def _initializer_layout(state: Mapping[str, torch.Tensor], sample_size: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``InitializerUNet`` config of a UNet state dict of the authors' code, and where each submodule goes.

    Their UNet has per resolution on the way down ``num_res_blocks`` residual blocks (each followed by attention at
    the attention resolutions) and a downsampling residual block except at the last resolution; on the way up one
    block more and an upsampling residual block; all widths are the same.
    """
    network = "initializer (p_state_dict)"
    stem = _weight(state, "init_conv", network)
    width = stem.shape[0]
    levels = len({key.split(".")[1] for key in state if key.startswith("downs.")})
    if levels == 0 or levels != len({key.split(".")[1] for key in state if key.startswith("ups.")}):
        raise _unsupported(network, "the down and up paths do not have the same number of resolutions")
    targets = {
        "init_conv": "unet.conv_in",
        "time_mlp.1": "unet.time_embedding.linear_1",
        "time_mlp.3": "unet.time_embedding.linear_2",
        "y_mlp.0": "unet.class_embedding",
        "mid_block1": "unet.mid_block.resnets.0",
        "mid_attn": "unet.mid_block.attentions.0",
        "mid_block2": "unet.mid_block.resnets.1",
        "norm": "unet.conv_norm_out",
        "final_conv": "unet.conv_out",
    }
    attention_levels, blocks_per_level = [], set()
    for level in range(levels):
        kinds = _module_kinds(state, f"downs.{level}", network)
        last = level == levels - 1
        attention = "attention" in kinds
        blocks = kinds.count("resnet") - (0 if last else 1)
        if kinds != _level_pattern(blocks, attention, not last):
            raise _unsupported(network, f"resolution {level} of the down path has the submodules {kinds}")
        attention_levels.append(attention)
        blocks_per_level.add(blocks)
        for kind, indices in (("resnet", range(blocks)), ("attention", range(blocks if attention else 0))):
            positions = [k for k, name in enumerate(kinds) if name == kind]
            for number, position in zip(indices, positions):
                targets[f"downs.{level}.{position}"] = f"unet.down_blocks.{level}.{kind}s.{number}"
        if not last:
            targets[f"downs.{level}.{len(kinds) - 1}"] = f"unet.down_blocks.{level}.downsamplers.0"
    if len(blocks_per_level) != 1 or min(blocks_per_level) < 1:
        raise _unsupported(network, f"the resolutions have {sorted(blocks_per_level)} residual blocks")
    blocks = blocks_per_level.pop()
    for level in range(levels):
        kinds = _module_kinds(state, f"ups.{level}", network)
        last = level == levels - 1
        attention = attention_levels[levels - 1 - level]
        if kinds != _level_pattern(blocks + 1, attention, not last):
            raise _unsupported(network, f"resolution {level} of the up path has the submodules {kinds}")
        for kind, count in (("resnet", blocks + 1), ("attention", blocks + 1 if attention else 0)):
            positions = [k for k, name in enumerate(kinds) if name == kind]
            for number, position in zip(range(count), positions):
                targets[f"ups.{level}.{position}"] = f"unet.up_blocks.{level}.{kind}s.{number}"
        if not last:
            targets[f"ups.{level}.{len(kinds) - 1}"] = f"unet.up_blocks.{level}.upsamplers.0"
    widths = {value.shape[0] for key, value in state.items() if re.search(r"\.conv1\.weight$", key)}
    if widths != {width}:
        raise _unsupported(network, f"residual blocks of widths {sorted(widths)}; the authors' UNet has one width")
    if width % 32:
        raise _unsupported(network, f"width {width} is not a multiple of the 32 normalisation groups")
    if sample_size % 2 ** (levels - 1):
        raise _unsupported(network, f"{levels} resolutions do not fit {sample_size}x{sample_size} images")
    num_classes = state["y_mlp.0.weight"].shape[1] - 1 if "y_mlp.0.weight" in state else None
    config = {
        "in_channels": stem.shape[1],
        "block_out_channels": (width,) * levels,
        "layers_per_block": blocks,
        "attention_resolutions": tuple(sample_size // 2**level for level in range(levels) if attention_levels[level]),
        "norm_num_groups": 32,
        "num_class_embeds": num_classes,
    }
    return config, targets


def _spectral_leaf(leaf: str) -> str:
    return SN_WEIGHT.get(leaf) or SN_BUFFERS.get(leaf) or leaf


ENERGY_BLOCK_PARTS = {"conv1": "conv1", "conv2": "conv2", "temb_map": "embedding_proj", "short_cut": "shortcut"}
ENERGY_PARTS = {
    "temb_map1": "embedding.mlp.linear_1",
    "temb_map2": "embedding.mlp.linear_2",
    "y_map": "embedding.class_embedding",
    "temb_final": "readout",
}
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "mlp.1": "time_emb_proj"}
RESNET_PARTS["res_conv"] = "conv_shortcut"


def _energy_tensors(state: Mapping[str, torch.Tensor], block_numbers: Mapping[int, int]) -> _Renamed:
    renamed = _Renamed("EBM (pi_state_dict)")
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if match := re.fullmatch(r"module_list\.(\d+)(?:\.(\w+))?", module):
            index, part = int(match[1]), match[2]
            if index == 0 and part is None:
                renamed.add(f"conv_in.{_spectral_leaf(leaf)}", value)
            elif index in block_numbers and part is None and leaf == "g":
                renamed.add(f"blocks.{block_numbers[index]}.residual_scale", value.reshape(-1))
            elif index in block_numbers and part in ENERGY_BLOCK_PARTS:
                target = f"blocks.{block_numbers[index]}.{ENERGY_BLOCK_PARTS[part]}"
                renamed.add(f"{target}.{_spectral_leaf(leaf)}", value)
            else:
                renamed.unexpected.append(key)
        elif module in ENERGY_PARTS:
            renamed.add(f"{ENERGY_PARTS[module]}.{_spectral_leaf(leaf)}", value)
        else:
            renamed.unexpected.append(key)
    return renamed


def _initializer_tensors(state: Mapping[str, torch.Tensor], targets: Mapping[str, str]) -> _Renamed:
    renamed = _Renamed("initializer (p_state_dict)")
    for key, value in state.items():
        prefix = next((p for p in targets if key.startswith(p + ".")), None)
        if prefix is None:
            renamed.unexpected.append(key)
            continue
        target, rest = targets[prefix], key[len(prefix) + 1 :]
        if ".attentions." in target:
            if rest in ("to_qkv.weight", "to_qkv.bias"):
                leaf = rest.split(".")[1]
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    renamed.add(f"{target}.{name}.{leaf}", part.flatten(1) if leaf == "weight" else part)
            elif rest in ("to_out.weight", "to_out.bias"):
                leaf = rest.split(".")[1]
                renamed.add(f"{target}.to_out.0.{leaf}", value.flatten(1) if leaf == "weight" else value)
            elif rest in ("norm.weight", "norm.bias"):
                renamed.add(f"{target}.group_norm.{rest.split('.')[1]}", value)
            else:
                renamed.unexpected.append(key)
        elif ".resnets." in target or "samplers." in target:
            part, leaf = rest.rsplit(".", 1)
            if part in RESNET_PARTS:
                renamed.add(f"{target}.{RESNET_PARTS[part]}.{leaf}", value)
            else:
                renamed.unexpected.append(key)
        else:
            renamed.add(f"{target}.{rest}", value)
    return renamed


class _Renamed:
    """Tensors of one network under the library's names, and the keys of the checkpoint that have no place."""

    def __init__(self, network: str):
        self.network = network
        self.tensors: dict[str, torch.Tensor] = {}
        self.unexpected: list[str] = []

    def add(self, target: str, value: torch.Tensor) -> None:
        self.tensors[target] = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype)

    def load_into(self, model: torch.nn.Module) -> None:
        """Load every tensor into ``model``; a missing, unexpected or reshaped tensor is an error naming it."""
        expected = model.state_dict()
        missing = [key for key in expected if key not in self.tensors]
        unexpected = self.unexpected + [key for key in self.tensors if key not in expected]
        reshaped = [
            f"{key} {tuple(value.shape)} instead of {tuple(expected[key].shape)}"
            for key, value in self.tensors.items()
            if key in expected and value.shape != expected[key].shape
        ]
        problems = []
        for title, items in (
            ("missing (library names)", missing),
            ("unexpected", unexpected),
            ("of the wrong shape (library names)", reshaped),
        ):
            if items:
                listed = ", ".join(items[:4]) + (", ..." if len(items) > 4 else "")
                problems.append(f"{len(items)} tensor(s) {title}: {listed}")
        if problems:
            raise ValueError(
                f"The {self.network} does not match the architecture read from its tensors: {'; '.join(problems)}. "
                "The checkpoint is damaged or comes from a modified version of the authors' code."
            )
        model.load_state_dict(self.tensors)


def _released(energy_config: Mapping[str, Any], initializer_config: Mapping[str, Any]) -> ReleasedCheckpoint | None:
    """The released checkpoint whose architecture this is, if any."""
    for release in RELEASED_CHECKPOINTS:
        if all(energy_config[key] == value for key, value in release.energy_config.items()) and all(
            initializer_config[key] == value for key, value in release.initializer_config.items()
        ):
            return release
    return None


@dataclass
class ConvertedCheckpoint:
    """A converted checkpoint: the pipeline, and what its model card says about the source.

    Args:
        pipeline: the ``CDRLPipeline`` (networks in eval mode).
        release: the released checkpoint of the paper with this architecture, or ``None`` for other configurations.
        use_ema: whether the networks hold the EMA weights.
    """

    pipeline: CDRLPipeline
    release: ReleasedCheckpoint | None
    use_ema: bool

    def model_card(self, checkpoint_name: str, folder: str | os.PathLike | None = None) -> ModelCard:
        """The Hub model card: the source checkpoint, the weights used, and for the paper's released architectures
        the dataset and the FID the paper reports (labelled as such: it is not measured by this library).

        Args:
            checkpoint_name: the file name of the source checkpoint.
            folder: where the pipeline is saved, for the usage snippet.
        """
        release = self.release
        details = {
            "Source checkpoint": f"`{checkpoint_name}`, trained by the authors' code ({SOURCE_REPOSITORY})",
            "Weights": "exponential moving average (decay 0.9999)" if self.use_ema else "raw (not averaged)",
            "Converted with": "`cdrl-diffusers convert`",
        }
        if release is not None:
            details["Architecture of the paper's release"] = f"`{release.file_name}` ({release.training_script})"
        description = (
            f"A model of [Cooperative Diffusion Recovery Likelihood]({PAPER_URL}) (Zhu, Xie, Wu & Gao, ICLR 2024) "
            "trained with the authors' code and converted to `cdrl_diffusers`: a sequence of energy-based models, one "
            "per noise level, each paired with an initializer network; in eval mode the networks compute what the "
            "authors' networks compute. Sampling starts from Gaussian noise; at each level the initializer proposes a "
            "sample and 15 Langevin steps on the energy refine it."
        )
        return self.pipeline.create_model_card(
            folder=folder,
            dataset_name=release.dataset if release else None,
            training_details=details,
            evaluation=release.evaluation if release else None,
            description=description,
        )


def convert_official_state(
    checkpoint: Mapping[str, Any],
    use_ema: bool = True,
    class_names: Sequence[str] | None = None,
    sample_size: int = 32,
) -> ConvertedCheckpoint:
    """The ``CDRLPipeline`` of an in-memory checkpoint of the authors' code (``load_official_checkpoint``).

    Args:
        checkpoint: the dict saved by ``main_uncond.py`` / ``main_cond.py``.
        use_ema: use the exponential moving averages of the weights (as the authors sample and report FID), rather
            than the raw weights.
        class_names: one name per class of a conditional model, in the order of its labels: library class ``i`` is
            the authors' label ``i + 1`` (their label 0 is the null class), e.g. the ImageNet class index ``i``.
        sample_size: the image size the networks were trained at (32 in the authors' scripts).
    """
    if not isinstance(use_ema, bool):
        raise TypeError(f"`use_ema` must be True or False, got {use_ema!r}.")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
        raise ValueError(f"`sample_size` must be a positive integer, got {sample_size!r}.")
    missing = [key for key in REQUIRED_KEYS + (EMA_KEYS if use_ema else ()) if key not in checkpoint]
    if missing:
        extra = " (or convert the raw weights with use_ema=False / --no-ema)" if set(missing) <= set(EMA_KEYS) else ""
        raise ValueError(f"The checkpoint lacks {', '.join(missing)}{extra}.")
    energy_state = _strip_ddp(checkpoint["pi_state_dict"], "pi_state_dict")
    initializer_state = _strip_ddp(checkpoint["p_state_dict"], "p_state_dict")
    if use_ema:
        energy_state = _with_ema(energy_state, checkpoint["pi_ema_state_dict"], "pi_ema_state_dict")
        initializer_state = _with_ema(initializer_state, checkpoint["p_ema_state_dict"], "p_ema_state_dict")

    energy_config, block_numbers = _energy_layout(energy_state)
    initializer_config, targets = _initializer_layout(initializer_state, sample_size)
    if energy_config["in_channels"] != initializer_config["in_channels"]:
        raise ValueError("The EBM and the initializer of the checkpoint take images of different channels.")
    classes = {energy_config["num_class_embeds"], initializer_config["num_class_embeds"]} - {None}
    if len(classes) > 1:
        raise ValueError(f"The EBM and the initializer of the checkpoint have different classes: {sorted(classes)}.")
    if class_names is not None:
        class_names = list(class_names)
        if energy_config["num_class_embeds"] is None:
            raise ValueError("`class_names` were given, but the checkpoint's EBM is unconditional.")
        if len(class_names) != energy_config["num_class_embeds"]:
            raise ValueError(
                f"`class_names` has {len(class_names)} names, but the checkpoint has "
                f"{energy_config['num_class_embeds']} classes."
            )

    energy_model = EnergyModel(sample_size=sample_size, class_names=class_names, **energy_config)
    _energy_tensors(energy_state, block_numbers).load_into(energy_model)
    initializer = InitializerUNet(sample_size=sample_size, dropout=0.1, **initializer_config)
    _initializer_tensors(initializer_state, targets).load_into(initializer)
    pipeline = CDRLPipeline(
        energy_model=energy_model.eval(), initializer=initializer.eval(), scheduler=official_scheduler()
    )
    return ConvertedCheckpoint(pipeline, _released(energy_config, initializer_config), use_ema)


def convert_official_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    use_ema: bool = True,
    class_names: Sequence[str] | None = None,
    sample_size: int = 32,
) -> CDRLPipeline:
    """Convert a checkpoint of the authors' code into a ``CDRLPipeline`` folder and return the pipeline.

    The folder (safetensors weights, the scheduler of ``official_scheduler`` and a model card naming the source,
    the dataset and the paper's reported FID for the released checkpoints) is written to a temporary folder next to
    ``output_dir`` and renamed into place at the end, so a failure leaves nothing behind. ``output_dir`` must not
    exist, or be empty.

    Args:
        checkpoint_path: the ``.pth.tar`` file (e.g. ``Cifar_10_best.pth.tar`` or ``cond_best.pth.tar``).
        output_dir: the folder to create; load it with ``CDRLPipeline.from_pretrained(output_dir)``.
        use_ema: convert the EMA weights (default) rather than the raw ones.
        class_names: names of the classes of a conditional model (see ``convert_official_state``).
        sample_size: the image size the networks were trained at (32 in the authors' scripts).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"`output_dir` {output_dir} exists and is not an empty folder; choose a new folder.")
    checkpoint_path = Path(checkpoint_path)
    converted = convert_official_state(load_official_checkpoint(checkpoint_path), use_ema, class_names, sample_size)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        card = converted.model_card(checkpoint_path.name, output_dir)
        converted.pipeline.save_pretrained(partial, model_card=card)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return converted.pipeline
