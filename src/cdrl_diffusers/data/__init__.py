"""Data that needs no download: 2-D toy distributions and procedural image datasets."""

from .digits import load_digits_dataset  # noqa: F401
from .shapes import (  # noqa: F401
    ATTRIBUTES,
    BACKGROUND,
    COLORS,
    SHAPES,
    SIZES,
    box_size,
    load_shapes_dataset,
    render_shape,
    shape_mask,
)
from .toy2d import (  # noqa: F401
    TOY_BOUND,
    TOY_DATASETS,
    checkerboard,
    eight_gaussians,
    has_density,
    sample_toy,
    toy_log_density,
    toy_support,
    two_spirals,
)
