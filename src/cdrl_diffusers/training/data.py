"""Image datasets for training: a held-out split, class labels from columns, and seeded crops and flips.

Every data source becomes a ``datasets.Dataset``; ``TrainingImages`` then turns its rows into training tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel

from ..evaluation import OOD_SHIFTS, shift_images
from ..validation import check_positive_int, check_probability

GREYSCALE_MODES = ("1", "L", "I", "I;16", "F")


def check_column(dataset: datasets.Dataset, column: str, flag: str) -> None:
    """``column`` is a column of ``dataset``; otherwise a ``ValueError`` naming ``flag`` and the columns."""
    if column not in dataset.column_names:
        raise ValueError(f"`{flag}` {column!r} is not a column of the dataset: {dataset.column_names}.")


def split_dataset(
    dataset: datasets.Dataset, validation_split: float | int | None, max_train_samples: int | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training rows and the held-out rows (``None`` without ``validation_split``).

    ``validation_split`` is a fraction in (0, 1) or a number of rows, drawn with ``seed``. The held-out rows are
    taken out before ``max_train_samples`` picks a random subset of the rest, so they are never trained on.
    """
    validation = None
    if validation_split is not None:
        if isinstance(validation_split, int) and validation_split >= len(dataset):
            raise ValueError(
                f"`--validation_split` {validation_split} leaves no training images of the {len(dataset)}."
            )
        split = dataset.train_test_split(test_size=validation_split, seed=seed)
        dataset, validation = split["train"], split["test"]
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    return dataset, validation


@dataclass
class Conditioning:
    """Which columns become class labels, and the names of the classes.

    Args:
        columns: the label column, or the attribute columns (compositional training, Sec. 4.5).
        class_names: one name per class of the EBM (``None``: unconditional).
        offsets: for attributes, the first class index of each attribute.
        conditional_initializer: whether the initializer takes the class too (not for attributes, Sec. 4.5).
    """

    columns: list[str]
    class_names: list[str] | None = None
    offsets: list[int] | None = None
    conditional_initializer: bool = False


def _as_class_label(dataset: datasets.Dataset, column: str, flag: str) -> datasets.Dataset:
    """Make ``column`` a ``ClassLabel`` (strings or integers are encoded in sorted order)."""
    check_column(dataset, column, flag)
    if not isinstance(dataset.features[column], ClassLabel):
        dataset = dataset.class_encode_column(column)
    return dataset


def conditioning_for(
    dataset: datasets.Dataset,
    label_column: str | None = None,
    attribute_columns: list[str] | None = None,
    conditional_initializer: bool = False,
) -> tuple[datasets.Dataset, Conditioning]:
    """Class-conditional training on ``label_column`` (Sec. 3.5), compositional training on ``attribute_columns``
    (each value of each attribute a class named like ``shape=circle``, Sec. 4.5), or neither (unconditional).

    With attributes the initializer is unconditional, as in the paper, unless ``conditional_initializer``: it then
    takes the same class as the EBM, so that ``CDRLComposePipeline(..., compose_initializer=True)`` can compose its
    proposals too. A class-conditional initializer is the default for ``label_column``.
    """
    if label_column and attribute_columns:
        raise ValueError(
            "`label_column` (class-conditional) and `attribute_columns` (compositional) exclude each other."
        )
    if label_column:
        dataset = _as_class_label(dataset, label_column, "--label_column")
        names = [str(name) for name in dataset.features[label_column].names]
        return dataset, Conditioning([label_column], names, conditional_initializer=True)
    if attribute_columns:
        names, offsets = [], []
        for column in attribute_columns:
            dataset = _as_class_label(dataset, column, "--attribute_columns")
            offsets.append(len(names))
            names += [f"{column}={value}" for value in dataset.features[column].names]
        return dataset, Conditioning(list(attribute_columns), names, offsets, conditional_initializer)
    return dataset, Conditioning([])


def class_labels_of(
    batch: dict[str, torch.Tensor], conditioning: Conditioning, generator: torch.Generator
) -> torch.Tensor | None:
    """The class of each example: its label, or (compositional training) one randomly picked attribute's value."""
    if not conditioning.columns:
        return None
    labels = batch["labels"]
    if conditioning.offsets is None:
        return labels[:, 0]
    picked = torch.randint(len(conditioning.columns), (labels.shape[0],), generator=generator, device=generator.device)
    picked = picked.to(labels.device)
    offsets = torch.tensor(conditioning.offsets, device=labels.device)
    return offsets[picked] + labels.gather(1, picked[:, None]).squeeze(1)


def image_channels(dataset: datasets.Dataset, image_column: str) -> int:
    """1 for grey-scale data (PIL modes "1", "L", "I", "F"), else 3 (RGB)."""
    return 1 if dataset[0][image_column].mode in GREYSCALE_MODES else 3


class TrainingImages(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` as {"pixel_values" in [-1, 1], "labels"}.

    Images are resized so that their shorter side is ``resolution`` (as diffusers' ``Resize``), cropped (centre or
    random) and optionally flipped. Random crops and flips draw from a generator seeded by (seed, epoch, row), not
    from a global RNG, so a resumed run sees exactly the images the interrupted one would have seen, in any worker.

    Decoding and resizing do not change between epochs, so the first ``cache_bytes`` of resized pixels (and their
    labels) are kept in memory: the embedded 16x16 datasets then decode each image once, instead of once per epoch,
    which was a tenth of a CPU training step. ``cache_bytes=0`` decodes every time.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        image_column: str,
        label_columns: list[str],
        resolution: int,
        channels: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        cache_bytes: int = 2**30,
    ):
        self.rows = rows.select_columns([image_column, *label_columns])
        self.image_column, self.label_columns = image_column, label_columns
        self.resolution, self.mode = resolution, "L" if channels == 1 else "RGB"
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.epoch = 0
        check_positive_int(cache_bytes, "cache_bytes", minimum=0)
        self.cache_bytes, self._cached_bytes = cache_bytes, 0
        self._cache: dict[int, tuple[np.ndarray, list[int]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _resized(self, image: PIL.Image.Image) -> PIL.Image.Image:
        scale = self.resolution / min(image.size)
        if scale == 1:
            return image
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        return image.resize(size, PIL.Image.Resampling.BILINEAR)

    def _decoded(self, index: int) -> tuple[np.ndarray, list[int]]:
        """Row ``index`` resized, as uint8 pixels (height, width[, channels]), and its labels; cached while it fits."""
        if index in self._cache:
            return self._cache[index]
        row = self.rows[index]
        decoded = (
            np.asarray(self._resized(row[self.image_column].convert(self.mode))),
            [row[column] for column in self.label_columns],
        )
        if self._cached_bytes + decoded[0].nbytes <= self.cache_bytes:
            self._cache[index] = decoded
            self._cached_bytes += decoded[0].nbytes
        return decoded

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, labels = self._decoded(index)
        spare_y, spare_x = image.shape[0] - self.resolution, image.shape[1] - self.resolution
        random_crop = not self.center_crop and (spare_x or spare_y)
        rng = np.random.default_rng((self.seed, self.epoch, index)) if random_crop or self.random_flip else None
        left, top = rng.integers(0, [spare_x + 1, spare_y + 1]) if random_crop else (spare_x // 2, spare_y // 2)
        image = image[int(top) : int(top) + self.resolution, int(left) : int(left) + self.resolution]
        pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        example = {"pixel_values": pixels.contiguous()}
        if self.label_columns:
            example["labels"] = torch.tensor(labels)
        return example


def image_tensors(
    rows: datasets.Dataset, image_column: str, resolution: int, channels: int, label_column: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows as one batch of images in [-1, 1] (centre crops, no flips) and, with ``label_column``, their labels."""
    images = TrainingImages(rows, image_column, [label_column] if label_column else [], resolution, channels, True)
    examples = [images[index] for index in range(len(images))]
    labels = torch.stack([example["labels"][0] for example in examples]) if label_column else None
    return torch.stack([example["pixel_values"] for example in examples]), labels


def shifted_negatives(
    images: torch.Tensor, shifts: Sequence[str], share: float, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """Negatives for ``cdrl_training_step(augmented_negatives=...)``: the first ``round(share * batch)`` images, each
    turned by one of ``shifts`` (``evaluation.shift_images``, drawn uniformly per image), or ``None`` if that is none.

    Negative data augmentation (Sinha et al., 2021): the shifts are what the user knows the data is *not*, for
    example ``"flipped"`` for handwriting, which has a handedness. A shift used here is no longer an unseen test of
    the density.
    """
    check_probability(share, "share")
    if isinstance(shifts, str) or not shifts or any(shift not in OOD_SHIFTS for shift in shifts):
        raise ValueError(f"`shifts` must be a non-empty list of {OOD_SHIFTS}, got {shifts!r}.")
    count = round(share * images.shape[0])
    if count == 0:
        return None
    choice = torch.zeros(count, dtype=torch.long, device=images.device)
    if len(shifts) > 1:  # one shift needs no draw
        draw_device = generator.device if generator is not None else "cpu"
        choice = torch.randint(0, len(shifts), (count,), generator=generator, device=draw_device).to(images.device)
    negatives = images[:count].clone()
    for index, shift in enumerate(shifts):
        rows = torch.nonzero(choice == index).flatten()
        if len(rows):
            negatives[rows] = shift_images(images[rows], shift, generator)
    return negatives
