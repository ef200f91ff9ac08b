"""EnergyModel, InitializerUNet and the vector models: sizes, conditioning, finiteness, save/load, bad input."""

import pytest
import safetensors.torch
import torch
from conftest import TINY_SIZE, tiny_energy_model, tiny_initializer

from cdrl_diffusers import EnergyMLP, EnergyModel, InitializerMLP, InitializerUNet


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_default_energy_model_is_the_papers_size():
    # The parameter counts of the authors' CIFAR-10 and ImageNet 32x32 (1000 classes) EBMs.
    model = EnergyModel()
    assert count(model) == 34_833_152
    assert model.config.block_out_channels == (128, 256, 256, 256)
    assert model.config.layers_per_block == 8
    assert count(EnergyModel(num_class_embeds=1000)) == 35_346_176


def test_default_initializer_is_the_papers_size():
    # The authors' CIFAR-10 initializer (3 blocks per resolution) and ImageNet 32x32 one (2 blocks, 1000 classes).
    assert count(InitializerUNet()) == 3_769_795
    assert count(InitializerUNet(layers_per_block=2, num_class_embeds=1000)) == 3_181_443


def test_embed_condition_is_what_forward_computes():
    model = tiny_energy_model(num_class_embeds=3)
    sample = torch.randn(3, 3, TINY_SIZE, TINY_SIZE)
    logsnr, labels = torch.tensor([9.8, 0.0, -5.1]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        condition = model.embed_condition(logsnr, labels)
        expected = model(sample, logsnr, labels).neg_energy
        torch.testing.assert_close(model(sample, logsnr, labels, condition=condition).neg_energy, expected)
        other = model.embed_condition(logsnr, torch.tensor([1, 1, 1]))
        assert not torch.allclose(model(sample, logsnr, labels, condition=other).neg_energy, expected)
    with pytest.raises(TypeError, match="condition"):
        model(sample, logsnr, labels, condition=(condition.readout,))
    with pytest.raises(TypeError, match="logsnr"):
        model.embed_condition(1.0)


def test_spectral_norm_everywhere_but_the_readout_and_scales():
    model = tiny_energy_model()
    normalised = {
        name.split(".parametrizations")[0] for name, _ in model.named_parameters() if "parametrizations" in name
    }
    layers = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))
    }
    assert layers - normalised == {"readout"}
    scales = [name for name, _ in model.named_parameters() if "residual_scale" in name]
    assert scales and not any("parametrizations" in name for name in scales)


def test_fresh_energy_model_gives_finite_outputs_in_eval_mode():
    model = EnergyModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=2).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 16, 16), torch.tensor([9.8, 2.0, -1.0, -5.1]))
    assert out.neg_energy.shape == (4,)
    assert torch.isfinite(out.neg_energy).all()


@pytest.mark.parametrize("factory", [tiny_energy_model, tiny_initializer])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, factory):
    model = factory(num_class_embeds=4)
    sample = torch.randn(3, 3, TINY_SIZE, TINY_SIZE)
    logsnr = torch.tensor([1.0, -2.0, 5.0])
    labels = torch.tensor([0, 3, 4])  # 4 is the null class
    with torch.no_grad():
        expected = model(sample, logsnr, labels, return_dict=False)[0]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = loaded(sample, logsnr, labels, return_dict=False)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


def test_energy_model_is_finite_after_from_pretrained(tmp_path):
    EnergyModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1).save_pretrained(tmp_path)
    loaded = EnergyModel.from_pretrained(tmp_path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randn(2, 3, 16, 16), 0.0).neg_energy).all()


def test_class_conditioning_and_null_class():
    model = tiny_energy_model(num_class_embeds=3)
    sample = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        unconditional = model(sample, 1.0).neg_energy
        null = model(sample, 1.0, torch.tensor([3, 3])).neg_energy
        class_0 = model(sample, 1.0, torch.tensor([0, 0])).neg_energy
        class_1 = model(sample, 1.0, torch.tensor([1, 1])).neg_energy
    torch.testing.assert_close(unconditional, null)
    assert not torch.allclose(class_0, class_1)


def test_logsnr_conditions_the_energy():
    model = tiny_energy_model()
    sample = torch.randn(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        assert not torch.allclose(model(sample, 9.8).neg_energy, model(sample, -5.1).neg_energy)


def test_initializer_starts_at_the_identity():
    model = InitializerUNet(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    sample = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(sample, 0.5).sample, sample)


@pytest.mark.parametrize("factory", [tiny_energy_model, tiny_initializer])
@pytest.mark.parametrize(
    "shape, message",
    [((2, 1, TINY_SIZE, TINY_SIZE), "shape"), ((2, 3, 16, 16), "shape"), ((2, 3, TINY_SIZE), "shape")],
)
def test_wrong_channels_or_size_are_rejected(factory, shape, message):
    with pytest.raises(ValueError, match=message):
        factory()(torch.randn(*shape), 0.0)


@pytest.mark.parametrize("factory", [tiny_energy_model, tiny_initializer])
def test_bad_labels_and_logsnr(factory):
    conditional = factory(num_class_embeds=3)
    sample = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with pytest.raises(ValueError, match="class_labels"):
        conditional(sample, 0.0, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="class_labels"):
        conditional(sample, 0.0, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="class_labels"):
        conditional(sample, 0.0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        factory()(sample, 0.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logsnr"):
        conditional(sample, torch.zeros(3))
    with pytest.raises(TypeError, match="sample"):
        conditional(sample.long(), 0.0)


def test_bad_model_configurations():
    with pytest.raises(ValueError, match="sample_size"):
        EnergyModel(sample_size=30)
    with pytest.raises(ValueError, match="class_names"):
        EnergyModel(sample_size=8, block_out_channels=(8,), num_class_embeds=2, class_names=["a"])
    with pytest.raises(ValueError, match="norm_num_groups"):
        InitializerUNet(block_out_channels=(48, 48), norm_num_groups=32)
    with pytest.raises(ValueError, match="attention_head_dim"):  # a width below the head size
        InitializerUNet(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, attention_head_dim=16)


@pytest.mark.parametrize("factory", [tiny_energy_model, tiny_initializer])
def test_folder_with_other_tensors_is_refused_with_a_clear_message(tmp_path, factory):
    # Folders of earlier versions describe the same configuration with other tensors (here: one more, one reshaped).
    factory().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    name = next(key for key in tensors if key.endswith("bias"))
    tensors[name] = tensors[name][:-1]
    tensors["readout.bias"] = torch.zeros(4)
    safetensors.torch.save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"1 tensor\(s\) unexpected \(e.g. readout.bias\).*another shape.*Retrain"):
        type(factory()).from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Vector models
# ---------------------------------------------------------------------------------------------------------------------
def tiny_mlps(num_class_embeds=None):
    torch.manual_seed(0)
    energy = EnergyMLP(data_dim=2, hidden_dim=16, num_layers=2, embedding_dim=16, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        for layer in energy.layers:
            layer.residual_scale.fill_(0.5)
    initializer = InitializerMLP(data_dim=2, hidden_dim=16, num_layers=2, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        torch.nn.init.normal_(initializer.linear_out.weight, std=0.1)
    return energy.eval(), initializer.eval()


def test_mlp_shapes_and_finiteness():
    energy, initializer = tiny_mlps()
    sample = torch.randn(5, 2)
    assert energy(sample, 1.0).neg_energy.shape == (5,)
    assert initializer(sample, 1.0).sample.shape == (5, 2)
    assert torch.isfinite(energy(sample * 100, 1.0).neg_energy).all()


def test_mlp_initializer_starts_at_the_identity():
    sample = torch.randn(4, 2)
    torch.testing.assert_close(InitializerMLP(data_dim=2)(sample, 0.0).sample, sample)


@pytest.mark.parametrize("index", [0, 1])
def test_mlp_save_load_round_trip(tmp_path, index):
    model = tiny_mlps(num_class_embeds=2)[index]
    sample, labels = torch.randn(3, 2), torch.tensor([0, 1, 2])
    expected = model(sample, 0.3, labels, return_dict=False)[0]
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(sample, 0.3, labels, return_dict=False)[0], expected)


@pytest.mark.parametrize("index", [0, 1])
def test_mlp_class_conditioning(index):
    model = tiny_mlps(num_class_embeds=2)[index]
    sample = torch.randn(3, 2)
    out = [model(sample, 0.0, torch.full((3,), c), return_dict=False)[0] for c in range(3)]
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(model(sample, 0.0, return_dict=False)[0], out[2])  # None = null class
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(3, 3), 0.0)


def test_mlp_condition_is_computed_once_and_reused():
    energy = tiny_mlps(num_class_embeds=2)[0]
    sample, logsnr, labels = torch.randn(4, 2), torch.tensor([9.8, 2.7, 2.7, -5.1]), torch.tensor([0, 1, 2, 0])
    condition = energy.embed_condition(logsnr, labels)
    assert len(condition.block_biases) == energy.config.num_layers
    expected = energy(sample, logsnr, labels).neg_energy
    torch.testing.assert_close(energy(sample, logsnr, labels, condition=condition).neg_energy, expected)
    with pytest.raises(TypeError, match="condition"):
        energy(sample, logsnr, labels, condition=(condition.block_biases,))
    with pytest.raises(TypeError, match="logsnr"):
        energy.embed_condition(9.8)


def test_mlp_energy_has_one_bias_free_readout_shared_by_all_levels():
    energy = EnergyMLP(data_dim=2, hidden_dim=8, num_layers=2, embedding_dim=8)
    assert energy.readout.weight.shape == (1, 8) and energy.readout.bias is None
    assert all(torch.equal(layer.residual_scale, torch.ones(8)) for layer in energy.layers)
    # f_hat is linear in the readout at every level: doubling it doubles the output.
    sample, logsnr = torch.randn(3, 2), torch.tensor([9.8, 0.1, -5.1])
    before = energy.eval()(sample, logsnr).neg_energy
    with torch.no_grad():
        energy.readout.weight.mul_(2)
    torch.testing.assert_close(energy(sample, logsnr).neg_energy, 2 * before)
