"""Procedural coloured shapes: the embedded default dataset of ``examples/train_cdrl.py`` (no download).

Every image shows one flat-coloured shape on a black background. Its three attributes are independent and uniform:

- ``shape``: ``circle``, ``square`` or ``triangle``;
- ``color``: ``red`` (230, 40, 40), ``green`` (40, 200, 40) or ``blue`` (40, 80, 230) in 8-bit RGB (``COLORS``);
- ``size``: ``small`` or ``large``, the side of the shape's square bounding box: ``round(0.5 * resolution)`` and
  ``round(0.75 * resolution)`` pixels (``SIZES``), i.e. 8 and 12 pixels at 16x16, 16 and 24 at 32x32.

The box's top-left corner is drawn uniformly so that the box keeps a one-pixel margin to every border. Rendering is
exact and hard-edged, so attributes can be measured from pixels: a pixel is foreground, and has exactly the shape's
colour, iff its centre lies inside the shape; every other pixel is ``BACKGROUND`` (0, 0, 0). With (u, v) the pixel
centre's position inside the box, scaled to [0, 1] (u to the right, v downwards):

- ``square``: the whole box;
- ``circle``: the inscribed disc, (u - 1/2)^2 + (v - 1/2)^2 <= 1/4;
- ``triangle``: apex at the top centre, base along the bottom edge, |u - 1/2| <= v / 2. Its top pixel row is empty,
  so its foreground's bounding box is one pixel shorter than the box.

Foreground pixels over the area of the foreground's own bounding box (a scale-free shape cue), and foreground pixel
counts (a size cue):

| resolution, size | square | circle | triangle |
|---|---|---|---|
| 16, small (8 px) | 1.00, 64 | 0.81, 52 | 0.57, 32 |
| 16, large (12 px) | 1.00, 144 | 0.78, 112 | 0.55, 72 |
| 32, small (16 px) | 1.00, 256 | 0.81, 208 | 0.53, 128 |
| 32, large (24 px) | 1.00, 576 | 0.78, 448 | 0.52, 288 |

``shape_mask`` and ``render_shape`` expose the rendering; ``load_shapes_dataset`` returns a ``datasets.Dataset``
with an ``image`` column and ``ClassLabel`` columns ``shape``, ``color`` and ``size``, generated deterministically
from a seed. Its ``exclude`` argument holds attribute combinations out (compositional generalisation, OOD tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 230)}
SIZES: dict[str, float] = {"small": 0.5, "large": 0.75}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES)}


def _check_choice(value: str, name: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"`resolution` must be an integer >= 8, got {resolution!r}.")


def box_size(size: str, resolution: int) -> int:
    """Side in pixels of the bounding box of a ``size`` ("small" or "large") shape at ``resolution``."""
    _check_choice(size, "size", SIZES)
    _check_resolution(resolution)
    return round(SIZES[size] * resolution)


def shape_mask(shape: str, size: str | int, resolution: int, top: int, left: int) -> np.ndarray:
    """Boolean (resolution, resolution) mask of the pixels whose centres lie inside the shape.

    Args:
        shape: ``"circle"``, ``"square"`` or ``"triangle"``.
        size: ``"small"`` or ``"large"`` (see ``box_size``), or the box's side in pixels (shapes of other sizes,
            e.g. templates to recognise generated ones).
        resolution: height and width of the image.
        top, left: the pixel row and column of the bounding box's top-left corner.
    """
    _check_choice(shape, "shape", SHAPES)
    if isinstance(size, str):
        side = box_size(size, resolution)
    elif isinstance(size, int) and not isinstance(size, bool) and size >= 1:
        _check_resolution(resolution)
        side = size
    else:
        raise ValueError(f"`size` must be one of {tuple(SIZES)} or a side in pixels >= 1, got {size!r}.")
    if not (0 <= top <= resolution - side and 0 <= left <= resolution - side):
        raise ValueError(
            f"A {size} shape ({side} px) at (top={top}, left={left}) does not fit in a "
            f"{resolution}x{resolution} image."
        )
    centres = np.arange(resolution) + 0.5
    v = ((centres - top) / side)[:, None]
    u = ((centres - left) / side)[None, :]
    inside_box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside_box
    if shape == "circle":
        return inside_box & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)
    return inside_box & (np.abs(u - 0.5) <= v / 2)


def render_shape(shape: str, color: str, size: str, resolution: int, top: int, left: int) -> np.ndarray:
    """One image as a (resolution, resolution, 3) uint8 RGB array: the shape in ``COLORS[color]`` on black."""
    _check_choice(color, "color", COLORS)
    mask = shape_mask(shape, size, resolution, top, left)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[mask] = COLORS[color]
    return image


def _is_excluded(attributes: Mapping[str, str], exclude: list[Mapping[str, str]]) -> bool:
    return any(all(attributes[key] == value for key, value in rule.items()) for rule in exclude)


def _check_exclude(exclude: Iterable[Mapping[str, str]] | None) -> list[Mapping[str, str]]:
    rules = list(exclude or [])
    for rule in rules:
        if not isinstance(rule, Mapping) or not rule:
            raise ValueError(
                f"Each `exclude` entry must be a non-empty dict such as {{'shape': 'circle'}}, got {rule!r}."
            )
        for key, value in rule.items():
            _check_choice(key, "exclude key", ATTRIBUTES)
            _check_choice(value, f"exclude[{key!r}]", ATTRIBUTES[key])
    combinations = [
        {"shape": shape, "color": color, "size": size} for shape in SHAPES for color in COLORS for size in SIZES
    ]
    if all(_is_excluded(combination, rules) for combination in combinations):
        raise ValueError("`exclude` removes every combination of attributes; nothing is left to generate.")
    return rules


def load_shapes_dataset(
    num_samples: int = 4096,
    resolution: int = 16,
    seed: int = 0,
    exclude: Iterable[Mapping[str, str]] | None = None,
) -> Dataset:
    """The coloured-shapes dataset (see the module docstring for the exact rendering).

    Args:
        num_samples: number of images.
        resolution: height and width (16 and 32 are the intended sizes; any value >= 8 works).
        seed: the same seed gives the same images and attributes.
        exclude: attribute combinations to leave out, each a dict of attribute values, e.g.
            ``[{"shape": "triangle", "color": "red"}]`` removes red triangles of both sizes. Attributes are drawn
            uniformly and independently, and excluded combinations are redrawn.

    Returns:
        A ``datasets.Dataset`` with columns ``image`` (PIL RGB), ``shape``, ``color`` and ``size`` (``ClassLabel``).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    _check_resolution(resolution)
    rules = _check_exclude(exclude)
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {"image": [], "shape": [], "color": [], "size": []}
    while len(columns["image"]) < num_samples:
        attributes = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
        if _is_excluded(attributes, rules):
            continue
        side = box_size(attributes["size"], resolution)
        top, left = (int(value) for value in rng.integers(1, resolution - side - 1, size=2, endpoint=True))
        pixels = render_shape(attributes["shape"], attributes["color"], attributes["size"], resolution, top, left)
        columns["image"].append(PIL.Image.fromarray(pixels))
        for name, values in ATTRIBUTES.items():
            columns[name].append(values.index(attributes[name]))
    features = Features(
        {
            "image": ImageFeature(),
            **{name: ClassLabel(names=list(values)) for name, values in ATTRIBUTES.items()},
        }
    )
    return Dataset.from_dict(columns, features=features)
