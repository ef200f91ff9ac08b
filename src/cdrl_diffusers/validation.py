"""Argument checks shared by the public entry points: each raises a ``ValueError``/``TypeError`` naming the argument.

The checks here only read Python values or tensor metadata, except ``check_finite``, which reads the tensor once;
none of them runs inside the Langevin loop.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def check_positive_int(value: Any, name: str, allow_none: bool = False, minimum: int = 1) -> None:
    """``value`` is an integer >= ``minimum`` (1: a positive count); ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {expected}{' or None' if allow_none else ''}, got {value!r}.")


def check_number(value: Any, name: str, minimum: float | None = None) -> float:
    """``value`` is a finite real number (>= ``minimum`` when given); returns it as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value}.")
    return float(value)


def check_probability(value: Any, name: str) -> float:
    """``value`` is a number in [0, 1]."""
    value = check_number(value, name, minimum=0.0)
    if value > 1:
        raise ValueError(f"`{name}` must lie in [0, 1], got {value}.")
    return value


def check_generator(generator: Any, name: str = "generator") -> None:
    """``generator`` is ``None``, a ``torch.Generator`` or a list of them."""
    items = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(item, torch.Generator) for item in items):
        kinds = sorted({type(item).__name__ for item in items})
        raise TypeError(f"`{name}` must be a torch.Generator or a list of them, got {', '.join(kinds)}.")


def check_float_tensor(tensor: Any, name: str) -> None:
    """``tensor`` is a real floating-point ``torch.Tensor`` (not an integer, boolean or complex one)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {tensor.dtype}.")


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """``tensor`` holds no NaN or infinite value."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


def _cli_int(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def cli_positive_int(text: str) -> int:
    """An argparse ``type``: a positive integer (argparse then names the flag in its error message)."""
    return _cli_int(text, 1, "a positive integer")


def cli_non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _cli_int(text, 0, "an integer >= 0")


def _cli_float(text: str, accept: Callable[[float], bool], expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def cli_non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _cli_float(text, lambda value: value >= 0, "a finite number >= 0")


def cli_positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a learning rate, a clipping norm)."""
    return _cli_float(text, lambda value: value > 0, "a finite number > 0")


def cli_fraction(text: str) -> float:
    """An argparse ``type``: a number in [0, 1) (a probability that is not certainty, an Adam beta, a decay)."""
    return _cli_float(text, lambda value: 0 <= value < 1, "a number in [0, 1)")


def cli_positive_int_list(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated positive integers such as "32,64" ("" gives an empty tuple)."""
    return tuple(cli_positive_int(value) for value in text.split(",") if value.strip())


def cli_fraction_or_count(text: str) -> float | int:
    """An argparse ``type``: a fraction in (0, 1) or a whole count >= 2 (e.g. of held-out images)."""
    value = _cli_float(
        text,
        lambda value: 0 < value < 1 or (value >= 2 and value.is_integer()),
        "a fraction in (0, 1) or a count >= 2",
    )
    return value if value < 1 else int(value)


def cli_device(text: str) -> str:
    """An argparse ``type``: a device string that ``torch.device`` accepts."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device: expected e.g. 'cpu', 'cuda' or 'cuda:0'"
        ) from None
    return text


def check_positive_ints(**values: Any) -> None:
    """``check_positive_int`` on each keyword argument, named by its keyword."""
    for name, value in values.items():
        check_positive_int(value, name)


def check_channels(channels: Any, name: str = "block_out_channels") -> None:
    """A non-empty sequence of positive channel counts, one per resolution."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, (list, tuple)) or len(channels) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of positive integers, got {channels!r}.")
    for value in channels:
        check_positive_int(value, name)


def check_sample(sample: Any, shape: tuple[int, ...], name: str = "sample") -> None:
    """A non-empty floating-point batch of shape (batch, *shape): the input check of every model."""
    check_float_tensor(sample, name)
    if sample.ndim != len(shape) + 1 or tuple(sample.shape[1:]) != tuple(shape):
        expected = ", ".join(map(str, ("batch", *shape)))
        raise ValueError(f"`{name}` must have shape ({expected}), got {tuple(sample.shape)}.")
    if sample.shape[0] == 0:
        raise ValueError(f"`{name}` must not be an empty batch.")
