"""Prompts sampled on the device for interactive training, at fixed shapes.

Masks are (H, W) bool at the resolution the loss uses; a mask pixel (i, j)
of an (H, W) mask in a (T, T) input frame is the input-frame point at the
centre of its T/H x T/W cell. Every function is for one mask; vmap it.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND


def pixel_to_input_frame(index: jax.Array, mask_shape: Tuple[int, int], image_size: int) -> jax.Array:
    """Flat pixel index of an (H, W) mask -> (2,) float32 (x, y) in the (T, T) input frame."""
    h, w = mask_shape
    row, col = index // w, index % w
    sy, sx = image_size / h, image_size / w
    return jnp.stack([(col + 0.5) * sx - 0.5, (row + 0.5) * sy - 0.5]).astype(jnp.float32)


def sample_pixel(key: jax.Array, region: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """A pixel drawn uniformly from `region` (H, W) bool -> (flat index, region non-empty).

    Draws k uniform in [0, count) and finds the k-th True pixel in row-major
    order: one random number per mask, not one per pixel. The search runs in
    two levels (the row by cumulative row counts, then the column within it)
    because XLA lowers a cumulative sum to a windowed reduction costing
    length^2: over a flat 256x256 mask that is 4e9 additions, over its rows
    and one row 1e5. With an empty region the index is 0 and the flag False.
    """
    h, w = region.shape
    row_counts = jnp.sum(region, axis=1, dtype=jnp.int32)
    rows_cumulative = jnp.cumsum(row_counts)
    count = rows_cumulative[-1]
    k = jax.random.randint(key, (), 0, jnp.maximum(count, 1))
    row = jnp.minimum(jnp.searchsorted(rows_cumulative, k + 1, side="left"), h - 1)
    before = rows_cumulative[row] - row_counts[row]
    columns_cumulative = jnp.cumsum(jax.lax.dynamic_index_in_dim(region, row, axis=0, keepdims=False), dtype=jnp.int32)
    col = jnp.minimum(jnp.searchsorted(columns_cumulative, k - before + 1, side="left"), w - 1)
    return jnp.where(count > 0, row * w + col, 0), count > 0


def sample_point_in_mask(key: jax.Array, mask: jax.Array, image_size: int) -> Tuple[jax.Array, jax.Array]:
    """One point uniform over the mask -> ((2,) input-frame (x, y), mask non-empty)."""
    index, found = sample_pixel(key, mask)
    return pixel_to_input_frame(index, mask.shape, image_size), found


def sample_correction(
    key: jax.Array, predicted: jax.Array, target: jax.Array, image_size: int
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """A point uniform over the error region of a prediction, labelled by the error.

    Args:
      predicted, target: (H, W) bool.
    Returns:
      (2,) input-frame (x, y); label FOREGROUND for a false negative (the
      target is there), BACKGROUND for a false positive; and whether the
      prediction had any error (if not, there is no point to add).
    """
    index, found = sample_pixel(key, predicted != target)
    label = jnp.where(target.reshape(-1)[index], FOREGROUND, BACKGROUND)
    return pixel_to_input_frame(index, target.shape, image_size), label, found


def noisy_box(
    key: jax.Array, box: jax.Array, image_hw: jax.Array, fraction: float = 0.1, max_noise: float = 20.0
) -> jax.Array:
    """(4,) XYXY box -> the box with each coordinate moved by N(0, (fraction * side)^2), clipped to
    +-max_noise pixels, then kept inside the (h, w) image with x0 <= x1 and y0 <= y1."""
    width, height = box[2] - box[0], box[3] - box[1]
    std = fraction * jnp.stack([width, height, width, height])
    noise = jnp.clip(jax.random.normal(key, (4,)) * std, -max_noise, max_noise)
    moved = box + noise
    h, w = image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    x = jnp.clip(jnp.sort(moved[0::2]), 0.0, w)
    y = jnp.clip(jnp.sort(moved[1::2]), 0.0, h)
    return jnp.stack([x[0], y[0], x[1], y[1]])
