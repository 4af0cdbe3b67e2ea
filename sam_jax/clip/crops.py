"""The crop a CLIP prompt of a mask is made from (SAM appendix D.5): the mask's box expanded and
squared, resampled to CLIP's input size, with the mask over the same pixels (the `region` of
`CLIP.encode_image`). Training (`sam_jax.training.text_prompts`), the tiny CLIP of the
demonstration (`experiments.train_clip`) and the evaluation's crop embedding share it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CROP_STREAM = 0  # folded into a mask's key for its expansion factor


def crop_windows(keys: jax.Array, boxes: jax.Array, expand_range: tuple[float, float]) -> jax.Array:
    """(K,) keys, (K, 4) XYXY boxes -> (K, 3) square windows (x0, y0, side) in the boxes' frame:
    each box expanded about its centre by a factor uniform in `expand_range`, squared on its
    longer side."""
    factor = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, CROP_STREAM), (), jnp.float32,
                                                     *expand_range))(keys)
    boxes = boxes.astype(jnp.float32)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = jnp.maximum(jnp.max(boxes[:, 2:] - boxes[:, :2], axis=1), 1.0) * factor
    return jnp.concatenate([centre - side[:, None] / 2, side[:, None]], axis=1)


def sample_crop(image: jax.Array, mask: jax.Array, window: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """One crop: image (S, S, 3) float, mask (L, L) bool over the same frame, window (x0, y0, side)
    -> (size, size, 3) bilinear samples at the crop's pixel centres (0 outside the image) and the
    (size, size) mask there (nearest low-res cell; False outside)."""
    s, l = image.shape[0], mask.shape[0]
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (window[2] / size)
    x, y = window[0] + centres, window[1] + centres  # input-frame coordinates
    yy, xx = jnp.meshgrid(y - 0.5, x - 0.5, indexing="ij")  # pixel i's centre is at i + 0.5
    channels = [jax.scipy.ndimage.map_coordinates(image[..., c], [yy, xx], order=1, mode="constant", cval=0.0)
                for c in range(3)]
    cells = lambda v: jnp.floor(v * (l / s)).astype(jnp.int32)
    row, col = cells(y)[:, None], cells(x)[None, :]
    inside = (row >= 0) & (row < l) & (col >= 0) & (col < l)
    region = inside & mask[jnp.clip(row, 0, l - 1), jnp.clip(col, 0, l - 1)]
    return jnp.stack(channels, axis=-1), region
