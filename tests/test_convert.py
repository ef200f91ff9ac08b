"""Converting checkpoints of the authors' code: the converted networks compute what theirs compute.

The reference networks below restate the authors' EBM and UNet (AlvinZhuyx/CDRL, models/ebm*.py, models/unet*.py)
independently of the library: their parameter names and order, old-style spectral normalisation (weight_orig,
weight_u, weight_v), one-hot class maps with label 0 the null class. Checkpoints are built in the layout their
training scripts save (DistributedDataParallel prefix, torch_ema states, optimizer and LR-scheduler states).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdrl_diffusers import CDRLPipeline
from cdrl_diffusers.cli import main
from cdrl_diffusers.conversion import convert_official_checkpoint, convert_official_state, load_official_checkpoint

LOGSNR = torch.tensor([9.8, 2.688820, 1.196880, 0.141071, -0.876073, -2.172388, -5.1])


def _maybe_sn(module: nn.Module, use_sn: bool) -> nn.Module:
    return torch.nn.utils.spectral_norm(module) if use_sn else module


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _network_time(logsnr: torch.Tensor) -> torch.Tensor:
    return torch.arctan(torch.exp(-0.5 * torch.clamp(logsnr, -20.0, 20.0))) / (0.5 * np.pi) * 1000.0


class RefEBMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, use_sn: bool):
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(cin, cout, 3, padding=1), use_sn)
        self.conv2 = _maybe_sn(nn.Conv2d(cout, cout, 3, padding=1), use_sn)
        self.temb_map = _maybe_sn(nn.Linear(emb, cout), use_sn)
        self.g = nn.Parameter(torch.ones(1, cout, 1, 1))
        self.short_cut = _maybe_sn(nn.Conv2d(cin, cout, 3, padding=1), use_sn) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(_lrelu(x)) + _lrelu(self.temb_map(_lrelu(temb)))[:, :, None, None]
        return self.conv2(_lrelu(h)) * self.g + self.short_cut(x)


class RefEBM(nn.Module):
    def __init__(self, temb_dim, ch_mult, n_blocks, n_class=None, use_sn=True):
        super().__init__()
        self.temb_dim, self.n_class = temb_dim, n_class
        self.temb_map1 = _maybe_sn(nn.Linear(temb_dim, 4 * temb_dim), use_sn)
        self.temb_map2 = _maybe_sn(nn.Linear(4 * temb_dim, 4 * temb_dim), use_sn)
        if n_class is not None:
            self.y_map = _maybe_sn(nn.Linear(n_class + 1, 4 * temb_dim), use_sn)
        layers, cin = [_maybe_sn(nn.Conv2d(3, temb_dim, 3, padding=1), use_sn)], temb_dim
        for level, mult in enumerate(ch_mult):
            for _ in range(n_blocks):
                layers.append(RefEBMBlock(cin, temb_dim * mult, 4 * temb_dim, use_sn))
                cin = temb_dim * mult
            if level < len(ch_mult) - 1:
                layers.append(nn.AvgPool2d(2, 2))
        self.module_list = nn.ModuleList(layers)
        self.temb_final = nn.Linear(4 * temb_dim, cin, bias=False)

    def forward(self, x, logsnr, y=None):
        half = self.temb_dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -np.log(10000) / (half - 1))
        phases = _network_time(logsnr)[:, None] * freqs[None]
        temb = self.temb_map2(_lrelu(self.temb_map1(torch.cat([phases.sin(), phases.cos()], 1))))
        if self.n_class is not None:
            temb = temb + self.y_map(F.one_hot(y, self.n_class + 1).float())
        h = self.module_list[0](x)
        for layer in self.module_list[1:]:
            h = layer(h, temb) if isinstance(layer, RefEBMBlock) else layer(h)
        return (F.relu(h).sum(dim=(2, 3)) * self.temb_final(_lrelu(temb))).sum(dim=1)


class RefResBlock(nn.Module):
    def __init__(self, cin, cout, temb, resample=None):
        super().__init__()
        self.resample = resample
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout_layer = nn.Dropout(0.1)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(temb, 2 * cout))
        self.res_conv = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = F.silu(self.norm1(x))
        if self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        scale, shift = self.mlp(temb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(self.conv1(h)) * (1 + scale) + shift)
        return self.conv2(self.dropout_layer(h)) + self.res_conv(x)


class RefAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, height, width = x.shape
        q, k, v = (part.reshape(b, c, -1) for part in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        attention = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=-1)  # (b, query position, key position)
        return self.to_out((v @ attention.transpose(1, 2)).reshape(b, c, height, width)) + x


class RefSinusoid(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
        phases = t[:, None] * freqs[None]
        return torch.cat([phases.sin(), phases.cos()], dim=-1)


class RefUNet(nn.Module):
    def __init__(self, dim, levels, n_blocks, attn_resolutions, im_sz, n_class=None):
        super().__init__()
        self.n_class, self.attn_resolutions, self.n_blocks = n_class, attn_resolutions, n_blocks
        self.init_conv = nn.Conv2d(3, dim, 3, padding=1)
        self.time_mlp = nn.Sequential(
            RefSinusoid(dim), nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim)
        )
        if n_class is not None:
            self.y_mlp = nn.Sequential(nn.Linear(n_class + 1, 4 * dim))
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        size = im_sz
        for level in range(levels):
            modules = []
            for _ in range(n_blocks):
                modules.append(RefResBlock(dim, dim, 4 * dim))
                if size in attn_resolutions:
                    modules.append(RefAttention(dim))
            if level < levels - 1:
                modules.append(RefResBlock(dim, dim, 4 * dim, "down"))
                size //= 2
            self.downs.append(nn.ModuleList(modules))
        self.mid_block1 = RefResBlock(dim, dim, 4 * dim)
        self.mid_attn = RefAttention(dim)
        self.mid_block2 = RefResBlock(dim, dim, 4 * dim)
        for level in range(levels):
            modules = []
            for _ in range(n_blocks + 1):
                modules.append(RefResBlock(2 * dim, dim, 4 * dim))
                if size in attn_resolutions:
                    modules.append(RefAttention(dim))
            if level < levels - 1:
                modules.append(RefResBlock(dim, dim, 4 * dim, "up"))
                size *= 2
            self.ups.append(nn.ModuleList(modules))
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.final_conv = nn.Conv2d(dim, 3, 3, padding=1)

    def forward(self, x, logsnr, y=None):
        t = self.time_mlp(_network_time(logsnr))
        if self.n_class is not None:
            t = t + self.y_mlp(F.one_hot(y, self.n_class + 1).float())
        skips = [self.init_conv(x)]
        for modules in self.downs:
            for module in modules:  # attention replaces the output of the block before it
                skips.append(module(skips.pop()) if isinstance(module, RefAttention) else module(skips[-1], t))
        h = self.mid_block2(self.mid_attn(self.mid_block1(skips[-1], t)), t)
        for modules in self.ups:
            for module in modules:
                if isinstance(module, RefAttention):
                    h = module(h)
                elif module.resample == "up":
                    h = module(h, t)
                else:
                    h = module(torch.cat([h, skips.pop()], dim=1), t)
        assert not skips
        return x + self.final_conv(F.silu(self.norm(h)))


class DDP(nn.Module):
    """What DistributedDataParallel adds to the names: ``module.``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _perturb(model: nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def official_checkpoint(ebm: nn.Module, unet: nn.Module, seed: int = 0, ebm_scale: float = 0.02) -> dict:
    """The dict main_uncond.py / main_cond.py save, with random weights, moved SN vectors and EMA != raw."""
    generator = torch.Generator().manual_seed(seed)
    _perturb(ebm, generator, ebm_scale)
    _perturb(unet, generator, 0.05)  # the zero-initialised convolutions become non-zero
    pi, p = DDP(ebm), DDP(unet)
    with torch.no_grad():  # training-mode passes run the power iteration: u, v leave their initial values
        pi.train()
        x = torch.randn(2, 3, 8, 8, generator=generator)
        labels = (torch.tensor([0, 1]),) if ebm.n_class is not None else ()
        for _ in range(2):
            ebm(x, torch.tensor([1.0, -1.0]), *labels)
    optimizers = {"pi_optimizer": torch.optim.Adam(pi.parameters(), lr=1e-4)}
    optimizers["p_optimizer"] = torch.optim.AdamW(p.parameters(), lr=1e-5, weight_decay=0.0)
    schedulers = {
        "pi_lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizers["pi_optimizer"], lambda n: min(1.0, n / 1e4)),
        "p_lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizers["p_optimizer"], lambda n: min(1.0, n / 1e4)),
    }
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for scheduler in schedulers.values():
        scheduler.step()

    def ema(model):
        shadow = [
            param.detach() + torch.randn(param.shape, generator=generator) * 0.01 for param in model.parameters()
        ]
        return {"decay": 0.9999, "num_updates": 1234, "shadow_params": shadow, "collected_params": None}

    state = {"pi_state_dict": pi.state_dict(), "p_state_dict": p.state_dict()}
    state.update({"pi_ema_state_dict": ema(pi), "p_ema_state_dict": ema(p)})
    state.update({name: value.state_dict() for name, value in {**optimizers, **schedulers}.items()})
    return state


def reference_with(model: nn.Module, checkpoint: dict, network: str, use_ema: bool) -> nn.Module:
    """The reference network in eval mode with the raw weights, or the EMA parameters swapped in (buffers kept)."""
    model.eval()
    if use_ema:
        with torch.no_grad():
            for param, shadow in zip(model.parameters(), checkpoint[f"{network}_ema_state_dict"]["shadow_params"]):
                param.copy_(shadow)
    return model


def small_networks(conditional: bool):
    torch.manual_seed(0)
    n_class = 3 if conditional else None
    ebm = RefEBM(temb_dim=8, ch_mult=(1, 2, 2), n_blocks=2, n_class=n_class)
    unet = RefUNet(dim=32, levels=3, n_blocks=1, attn_resolutions=[4], im_sz=8, n_class=n_class)
    return ebm, unet


@pytest.fixture(scope="module", params=[False, True], ids=["unconditional", "conditional"])
def small_checkpoint(request, tmp_path_factory):
    conditional = request.param
    ebm, unet = small_networks(conditional)
    checkpoint = official_checkpoint(ebm, unet)
    path = tmp_path_factory.mktemp("checkpoints") / "best.pth.tar"
    torch.save(checkpoint, path)
    return conditional, path, checkpoint


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-4 relative to the size of the reference output.

    The two forwards compute attention with different float32 kernels (PyTorch's fused attention against an explicit
    softmax), which round differently by up to about 2e-5 of the output's size here; a wrong mapping of any converted
    tensor shows up at the size of the output itself.
    """
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "raw"])
def test_converted_networks_match_the_authors_forward_at_every_level(small_checkpoint, use_ema):
    conditional, path, checkpoint = small_checkpoint
    converted = convert_official_state(load_official_checkpoint(path), use_ema=use_ema, sample_size=8)
    pipe = converted.pipeline
    assert not pipe.energy_model.training and not pipe.initializer.training
    ebm, unet = small_networks(conditional)
    for network, model in (("pi", ebm), ("p", unet)):
        DDP(model).load_state_dict(checkpoint[f"{network}_state_dict"])
        reference_with(model, checkpoint, network, use_ema)

    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 3, 8, 8, generator=generator)
    # Library labels (class i, None = null class) and the authors' labels (i + 1, 0 = null class).
    label_cases = [(torch.tensor([0, 2, 1, 0]), torch.tensor([1, 3, 2, 1])), (None, torch.zeros(4, dtype=torch.long))]
    for labels, official_labels in label_cases if conditional else [(None, None)]:
        for level in range(6):
            energy_logsnr, initializer_logsnr = LOGSNR[level].expand(4), LOGSNR[level + 1].expand(4)
            with torch.no_grad():
                got = pipe.energy_model(sample, energy_logsnr, labels).neg_energy
                expected = ebm(sample, energy_logsnr.clone(), official_labels)
                _close(got, expected)
                got = pipe.initializer(sample, initializer_logsnr, labels).sample
                _close(got, unet(sample, initializer_logsnr.clone(), official_labels))
    if conditional:  # the class matters
        with torch.no_grad():
            assert not torch.allclose(pipe.energy_model(sample, 1.0, torch.tensor([0] * 4)).neg_energy, expected)


def test_an_ebm_trained_without_spectral_norm_converts_too():
    torch.manual_seed(0)
    ebm = RefEBM(temb_dim=8, ch_mult=(1, 2), n_blocks=1, use_sn=False)
    unet = RefUNet(dim=32, levels=2, n_blocks=1, attn_resolutions=[], im_sz=8)
    checkpoint = official_checkpoint(ebm, unet)
    pipe = convert_official_state(checkpoint, sample_size=8).pipeline
    assert not pipe.energy_model.config.use_spectral_norm
    reference_with(ebm, checkpoint, "pi", True)
    reference_with(unet, checkpoint, "p", True)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(pipe.energy_model(sample, LOGSNR[1:3]).neg_energy, ebm(sample, LOGSNR[1:3].clone()))
        _close(pipe.initializer(sample, LOGSNR[2:4]).sample, unet(sample, LOGSNR[2:4].clone()))


def test_converted_folder_samples_with_guidance_and_has_a_model_card(small_checkpoint, tmp_path):
    conditional, path, _ = small_checkpoint
    out = tmp_path / "converted"
    names = ["cat", "dog", "fish"] if conditional else None
    convert_official_checkpoint(path, out, class_names=names, sample_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no partial folder left
    pipe = CDRLPipeline.from_pretrained(out)
    config = pipe.scheduler.config
    assert (config.num_noise_levels, config.num_langevin_steps, config.logsnr_max, config.logsnr_min) == (
        6,
        15,
        9.8,
        -5.1,
    )
    assert config.langevin_step_size_scale == 4e-4
    kwargs = {"class_labels": [0, "fish"], "guidance_scale": 0.7} if conditional else {"batch_size": 2}
    images = pipe(**kwargs, num_langevin_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "best.pth.tar" in card and "exponential moving average" in card
    assert ("guidance_scale=0.7" in card) == conditional


def test_paper_size_conversions_have_the_papers_parameter_counts():
    counts = {
        None: (34_833_152, 3_769_795, 3, "4.31", "CIFAR-10", "Cifar_10_best.pth.tar"),
        1000: (35_346_176, 3_181_443, 2, "6.18", "ImageNet 32x32", "cond_best.pth.tar"),
    }
    for n_class, (ebm_count, unet_count, blocks, fid, dataset, file_name) in counts.items():
        torch.manual_seed(0)
        ebm = RefEBM(temb_dim=128, ch_mult=(1, 2, 2, 2), n_blocks=8, n_class=n_class)
        unet = RefUNet(dim=64, levels=3, n_blocks=blocks, attn_resolutions=[16, 8], im_sz=32, n_class=n_class)
        checkpoint = official_checkpoint(ebm, unet, ebm_scale=0.002)
        converted = convert_official_state(checkpoint)
        pipe = converted.pipeline
        assert sum(p.numel() for p in pipe.energy_model.parameters()) == ebm_count
        assert sum(p.numel() for p in pipe.initializer.parameters()) == unet_count
        reference_with(ebm, checkpoint, "pi", True)
        reference_with(unet, checkpoint, "p", True)
        sample = torch.randn(1, 3, 32, 32)
        labels, official_labels = (torch.tensor([7]), torch.tensor([8])) if n_class else (None, None)
        with torch.no_grad():
            _close(
                pipe.energy_model(sample, LOGSNR[2:3], labels).neg_energy, ebm(sample, LOGSNR[2:3], official_labels)
            )
            _close(pipe.initializer(sample, LOGSNR[3:4], labels).sample, unet(sample, LOGSNR[3:4], official_labels))
        card = str(converted.model_card(file_name))
        assert f"| {fid} |" in card and "reported by the paper" in card and "not measured here" in card
        assert dataset in card


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, checkpoint: dict, name: str = "edited.pth.tar") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_not_a_checkpoint_and_truncated_files_are_clear_errors(small_checkpoint, tmp_path):
    _, path, _ = small_checkpoint
    text = tmp_path / "notes.pth.tar"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="PyTorch checkpoint"):
        load_official_checkpoint(text)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_official_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pth.tar")
    with pytest.raises(ValueError, match="pi_state_dict"):
        load_official_checkpoint(_saved(tmp_path, {"state_dict": {"w": torch.zeros(1)}}))


class SideEffect:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_pickled_code_runs(small_checkpoint, tmp_path):
    _, _, checkpoint = small_checkpoint
    marker = tmp_path / "code-ran"
    path = _saved(tmp_path, {**checkpoint, "extra": SideEffect(marker)})
    with pytest.raises(ValueError, match="could run code"):
        convert_official_checkpoint(path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_unexpected_and_unsupported_tensors_are_named(small_checkpoint, tmp_path):
    _, _, checkpoint = small_checkpoint
    missing = {**checkpoint, "pi_state_dict": dict(checkpoint["pi_state_dict"])}
    del missing["pi_state_dict"]["module.temb_final.weight"]
    with pytest.raises(ValueError, match="shadow parameters"):  # the EMA no longer fits either
        convert_official_state(missing)
    with pytest.raises(ValueError, match=r"EBM.*missing.*readout.weight"):
        convert_official_state(missing, use_ema=False)
    unexpected = {**checkpoint, "p_state_dict": {**checkpoint["p_state_dict"], "module.extra.weight": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"initializer.*unexpected.*extra.weight"):
        convert_official_state(unexpected, use_ema=False)
    uneven = {**checkpoint, "pi_state_dict": dict(checkpoint["pi_state_dict"])}
    for key in [key for key in uneven["pi_state_dict"] if key.startswith("module.module_list.2.")]:
        del uneven["pi_state_dict"][key]
    with pytest.raises(ValueError, match="Unsupported configuration of the EBM"):
        convert_official_state(uneven, use_ema=False)
    no_ema = {key: value for key, value in checkpoint.items() if "ema" not in key}
    with pytest.raises(ValueError, match="no-ema"):
        convert_official_state(no_ema)
    assert convert_official_state(no_ema, use_ema=False).use_ema is False


def test_output_folder_and_class_names_are_checked(small_checkpoint, tmp_path):
    conditional, path, _ = small_checkpoint
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="output_dir"):
        convert_official_checkpoint(path, occupied)
    assert os.listdir(occupied) == ["keep.txt"]
    with pytest.raises(ValueError, match="class_names"):
        convert_official_checkpoint(path, tmp_path / "out", class_names=["a", "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_cli_convert(small_checkpoint, tmp_path, capsys):
    conditional, path, _ = small_checkpoint
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nfish\n")
    args = ["convert", str(path), str(tmp_path / "out")] + (["--class-names", str(names)] if conditional else [])
    assert main([*args, "--no-ema"]) == 0
    assert "Wrote" in capsys.readouterr().out
    pipe = CDRLPipeline.from_pretrained(tmp_path / "out")
    assert pipe.class_names == (["cat", "dog", "fish"] if conditional else None)
    assert main(["convert", str(names), str(tmp_path / "other")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_cli_convert_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cdrl-diffusers convert") and "CHECKPOINT" in out and "OUTPUT_DIR" in out
    assert "--no-ema" in out and "--class-names" in out
