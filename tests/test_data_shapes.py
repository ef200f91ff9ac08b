"""The embedded datasets: coloured shapes rendered exactly as documented, and the upsampled scikit-learn digits."""

import numpy as np
import pytest
from datasets import ClassLabel

from cdrl_diffusers.data import (
    BACKGROUND,
    COLORS,
    SHAPES,
    SIZES,
    box_size,
    load_digits_dataset,
    load_shapes_dataset,
    render_shape,
    shape_mask,
)


def test_shapes_are_deterministic_and_labelled():
    first, again, other = (load_shapes_dataset(24, 16, seed=seed) for seed in (0, 0, 1))
    assert first.column_names == ["image", "shape", "color", "size"]
    assert [first.features[name].names for name in ("shape", "color", "size")] == [
        list(SHAPES),
        list(COLORS),
        list(SIZES),
    ]
    assert all(isinstance(first.features[name], ClassLabel) for name in ("shape", "color", "size"))
    pixels = lambda dataset: np.stack([np.asarray(image) for image in dataset["image"]])  # noqa: E731
    assert np.array_equal(pixels(first), pixels(again)) and first["shape"] == again["shape"]
    assert not np.array_equal(pixels(first), pixels(other))
    assert pixels(first).shape == (24, 16, 16, 3)


def measured(image: np.ndarray) -> dict:
    """Attributes read back from pixels with the documented rules (colour, fill ratio of the bounding box, size)."""
    foreground = np.any(image != BACKGROUND, axis=-1)
    rows, cols = np.nonzero(foreground)
    colors = {tuple(int(v) for v in pixel) for pixel in image[foreground]}
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return {
        "colors": colors,
        "fill": foreground.sum() / box,
        "width": cols.max() - cols.min() + 1,
        "margin": min(rows.min(), cols.min(), image.shape[0] - 1 - rows.max(), image.shape[1] - 1 - cols.max()),
    }


@pytest.mark.parametrize("resolution", [16, 32])
def test_attributes_can_be_measured_from_pixels(resolution):
    dataset = load_shapes_dataset(60, resolution, seed=3)
    fill_ranges = {"square": (1.0, 1.0), "circle": (0.75, 0.85), "triangle": (0.5, 0.6)}
    for example in dataset:
        shape = SHAPES[example["shape"]]
        color = list(COLORS)[example["color"]]
        size = list(SIZES)[example["size"]]
        reading = measured(np.asarray(example["image"]))
        assert reading["colors"] == {COLORS[color]}  # flat colour, no anti-aliasing
        low, high = fill_ranges[shape]
        assert low <= reading["fill"] <= high, (shape, reading["fill"])
        assert reading["width"] == box_size(size, resolution)
        assert reading["margin"] >= 1


def test_render_matches_mask_and_rejects_bad_input():
    mask = shape_mask("circle", "large", 16, 2, 1)
    image = render_shape("circle", "green", "large", 16, 2, 1)
    assert np.array_equal(np.all(image == COLORS["green"], axis=-1), mask)
    assert np.all(image[~mask] == BACKGROUND)
    assert box_size("small", 16) == 8 and box_size("large", 32) == 24
    with pytest.raises(ValueError, match="shape"):
        shape_mask("star", "small", 16, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        shape_mask("square", "large", 16, 6, 0)
    # A side in pixels: the named sizes are sides 8 and 12 at 16x16; other sides render by the same rules.
    assert np.array_equal(shape_mask("triangle", 12, 16, 2, 1), shape_mask("triangle", "large", 16, 2, 1))
    assert shape_mask("square", 10, 16, 3, 3).sum() == 100 and shape_mask("square", 10, 16, 3, 3)[3:13, 3:13].all()
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="`size` must be one of"):
            shape_mask("square", bad, 16, 0, 0)
    with pytest.raises(ValueError, match="color"):
        render_shape("square", "pink", "small", 16, 0, 0)


def test_exclude_holds_combinations_out():
    dataset = load_shapes_dataset(200, 16, seed=0, exclude=[{"shape": "triangle", "color": "red"}])
    pairs = set(zip(dataset["shape"], dataset["color"]))
    assert (SHAPES.index("triangle"), list(COLORS).index("red")) not in pairs
    assert len(pairs) == 8  # every other (shape, colour) pair still appears
    with pytest.raises(ValueError, match="every combination"):
        load_shapes_dataset(4, 16, exclude=[{"size": "small"}, {"size": "large"}])
    with pytest.raises(ValueError, match="exclude"):
        load_shapes_dataset(4, 16, exclude=[{"hue": "red"}])


def test_digits_are_upsampled_grey_images_with_class_names():
    dataset = load_digits_dataset(16)
    assert len(dataset) == 1797
    assert dataset.features["label"].names == [str(digit) for digit in range(10)]
    image = dataset[0]["image"]
    assert image.mode == "L" and image.size == (16, 16)
    pixels = np.asarray(image)
    assert pixels.max() > 200 and pixels.min() == 0  # white strokes on black
