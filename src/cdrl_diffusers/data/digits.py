"""scikit-learn's bundled 8x8 handwritten digits, upsampled, as a ``datasets.Dataset`` (no download)."""

from __future__ import annotations

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature

DIGIT_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(10))


def load_digits_dataset(resolution: int = 16) -> Dataset:
    """The 1797 digits of ``sklearn.datasets.load_digits``, bilinearly upsampled to ``resolution`` (1 channel).

    The 17 grey levels (0-16, white strokes on black) are mapped to 0-255 before resizing.

    Returns:
        A ``datasets.Dataset`` with columns ``image`` (PIL mode "L") and ``label`` (``ClassLabel`` "0".."9").
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"`resolution` must be an integer >= 8, got {resolution!r}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The digits dataset needs scikit-learn (it ships the data): `pip install scikit-learn`."
        ) from error
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [
        PIL.Image.fromarray(image).resize((resolution, resolution), PIL.Image.Resampling.BILINEAR) for image in pixels
    ]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(DIGIT_NAMES))})
    return Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
