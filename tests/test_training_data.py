"""cdrl_diffusers.training.data and presets: held-out splits, class labels from columns, seeded crops and flips."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from cdrl_diffusers import EnergyModel, InitializerUNet
from cdrl_diffusers.data import load_shapes_dataset
from cdrl_diffusers.training import (
    Conditioning,
    TrainingImages,
    build_models,
    class_labels_of,
    conditioning_for,
    image_channels,
    load_embedded_dataset,
    split_dataset,
)


def rows(dataset) -> Counter:
    return Counter(
        np.asarray(row["image"]).tobytes() + bytes([row["shape"], row["color"], row["size"]]) for row in dataset
    )


def test_validation_split_is_held_out_of_the_training_data():
    full, name = load_embedded_dataset("shapes", resolution=8)
    assert name == "cdrl-shapes" and len(full) == 4096
    train_rows, validation_rows = split_dataset(full, 0.1, None, seed=0)
    assert len(validation_rows) == round(0.1 * len(full))
    assert rows(train_rows) + rows(validation_rows) == rows(full)  # a partition of the rows

    subset, same_validation = split_dataset(full, 410, 64, seed=0)
    assert len(subset) == 64 and rows(subset) <= rows(train_rows)  # subsets come from the training part only
    assert rows(same_validation) == rows(validation_rows)
    assert split_dataset(full, None, None, seed=0) == (full, None)
    with pytest.raises(ValueError, match="validation_split"):
        split_dataset(full, 4096, None, seed=0)


def test_training_images_are_seeded_by_epoch_and_row():
    dataset = load_shapes_dataset(4, 16, seed=0)
    images = TrainingImages(dataset, "image", ["shape", "color"], 8, 3, center_crop=False, random_flip=True, seed=0)
    first = torch.stack([images[i]["pixel_values"] for i in range(4)])
    assert first.shape == (4, 3, 8, 8) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, torch.stack([images[i]["pixel_values"] for i in range(4)]))  # same epoch, same crops
    images.set_epoch(1)
    assert not torch.equal(first, torch.stack([images[i]["pixel_values"] for i in range(4)]))
    assert images[0]["labels"].tolist() == [dataset[0]["shape"], dataset[0]["color"]]
    assert (
        image_channels(dataset, "image") == 3 and image_channels(load_embedded_dataset("digits", 8)[0], "image") == 1
    )


def test_cached_decoding_gives_the_same_crops_and_flips_as_decoding_every_time():
    # 22x16 images: the shorter side is already 16, so the random 16x16 crops slide along the width.
    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 22, 3), dtype=np.uint8)
    dataset = datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(image) for image in pixels], "label": list(range(6))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    cached = TrainingImages(dataset, "image", ["label"], 16, 3, random_flip=True, seed=3)
    uncached = TrainingImages(dataset, "image", ["label"], 16, 3, random_flip=True, seed=3, cache_bytes=0)
    partly = TrainingImages(
        dataset, "image", ["label"], 16, 3, random_flip=True, seed=3, cache_bytes=2 * pixels[0].nbytes
    )
    for epoch in range(3):
        for images in (cached, uncached, partly):
            images.set_epoch(epoch)
        for index in range(6):
            expected = uncached[index]
            for images in (cached, partly):
                example = images[index]
                assert torch.equal(example["pixel_values"], expected["pixel_values"])
                assert torch.equal(example["labels"], expected["labels"])
    assert len(cached._cache) == 6 and len(partly._cache) == 2 and not uncached._cache
    with pytest.raises(ValueError, match="cache_bytes"):
        TrainingImages(dataset, "image", ["label"], 16, 3, cache_bytes=-1)
    # Independently: epoch 2's example 4 is the seeded crop (and flip) of the stored pixels.
    rng = np.random.default_rng((3, 2, 4))
    left, top = (int(value) for value in rng.integers(0, [7, 1]))
    crop = pixels[4, top : top + 16, left : left + 16].astype(np.float32) / 127.5 - 1.0
    reference = torch.from_numpy(crop).permute(2, 0, 1)
    reference = reference.flip(-1) if rng.random() < 0.5 else reference
    assert torch.equal(cached[4]["pixel_values"], reference)


def test_conditioning_from_a_label_column_or_attribute_columns():
    dataset = load_shapes_dataset(8, 8, seed=0)
    _, labels = conditioning_for(dataset, label_column="shape")
    assert labels == Conditioning(["shape"], ["circle", "square", "triangle"], conditional_initializer=True)
    _, attributes = conditioning_for(dataset, attribute_columns=["shape", "color"])
    assert attributes.class_names == ["shape=circle", "shape=square", "shape=triangle"] + [
        "color=red",
        "color=green",
        "color=blue",
    ]
    assert attributes.offsets == [0, 3] and not attributes.conditional_initializer
    _, composable = conditioning_for(dataset, attribute_columns=["shape", "color"], conditional_initializer=True)
    assert composable == Conditioning(attributes.columns, attributes.class_names, [0, 3], conditional_initializer=True)
    assert conditioning_for(dataset)[1] == Conditioning([])
    with pytest.raises(ValueError, match="exclude each other"):
        conditioning_for(dataset, label_column="shape", attribute_columns=["color"])
    with pytest.raises(ValueError, match="--label_column.*'nope' is not a column"):
        conditioning_for(dataset, label_column="nope")


def test_attribute_classes_pick_one_attribute_per_image():
    conditioning = Conditioning(["shape", "color"], ["s0", "s1", "s2", "c0", "c1", "c2"], offsets=[0, 3])
    batch = {"labels": torch.tensor([[2, 1]] * 200)}
    classes = class_labels_of(batch, conditioning, torch.Generator().manual_seed(0))
    assert set(classes.tolist()) == {2, 3 + 1}  # shape=2 or color=1, each picked about half the time
    assert 60 < (classes == 2).sum() < 140
    labelled = Conditioning(["shape"], ["s0", "s1", "s2"], conditional_initializer=True)
    assert class_labels_of(batch, labelled, torch.Generator()).tolist() == [2] * 200
    assert class_labels_of(batch, Conditioning([]), torch.Generator()) is None


def test_build_models_from_a_preset_with_overrides():
    energy_model, initializer = build_models(
        "cpu", 8, 1, ["a", "b"], conditional_initializer=True, energy_overrides={"block_out_channels": (8, 16)}
    )
    assert isinstance(energy_model, EnergyModel) and isinstance(initializer, InitializerUNet)
    assert tuple(energy_model.config.block_out_channels) == (8, 16)
    assert energy_model.config.embedding_dim == 64 and energy_model.config.class_names == ["a", "b"]
    assert energy_model.config.in_channels == initializer.config.in_channels == 1
    assert energy_model.config.num_class_embeds == initializer.config.num_class_embeds == 2
    assert not energy_model.config.use_spectral_norm  # the CPU recipe's choice; the paper's preset keeps it
    assert build_models("paper32", 32, 3)[0].config.use_spectral_norm
    assert initializer.config.dropout == 0.0 and build_models("paper32", 32, 3)[1].config.dropout == 0.1  # App. A.1
    with_norm, unconditional_initializer = build_models(
        "cpu", 8, 3, ["a", "b"], energy_overrides={"use_spectral_norm": True}
    )
    assert with_norm.config.use_spectral_norm and unconditional_initializer.config.num_class_embeds is None
    with pytest.raises(ValueError, match="preset"):
        build_models("huge", 8, 3)
    with pytest.raises(ValueError, match="embedded_dataset"):
        load_embedded_dataset("cifar", 8)
