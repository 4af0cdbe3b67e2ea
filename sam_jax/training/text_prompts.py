"""The paper's text-prompt training (appendix D.5): a mask's first prompt is the CLIP image
embedding of a crop around it, computed on the device by a frozen CLIP image tower.

Per mask, from its own key (the crop: `sam_jax.clip.crops`): its box is expanded about its centre by a factor drawn
uniformly from `expand_range`, made square on its longer side (the aspect ratio of the
image is kept) and resampled bilinearly to CLIP's input size (pixels outside the image are
black); with probability `zero_outside_probability` the pixels outside the mask are zeroed;
CLIP's last layer lets the class token attend only to patches the mask touches. The
L2-normalised embedding is the prompt. At inference the CLIP *text* embedding of a phrase
takes its place: the model never sees text in training.

Masks drawn for a text prompt (`probability`, among masks of at least `min_area` input-frame
pixels) start the interactive loop with that prompt alone, then get the usual corrective
clicks; the others start with a point or a box as before, their text row zero (no prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_jax.clip import CLIP
from sam_jax.clip.crops import crop_windows, sample_crop
from sam_jax.clip.model import preprocess as clip_preprocess

ZERO_OUTSIDE_STREAM, USE_TEXT_STREAM = 1, 2  # folded into a mask's text-prompt key (0: crop_windows)


@dataclasses.dataclass(frozen=True)
class TextPromptConfig:
    """Which masks get a CLIP crop-embedding prompt, and how the crop is made."""

    probability: float = 0.0  # share of the eligible masks whose first prompt is their crop embedding
    min_area: int = 0  # input-frame pixels; smaller masks keep point / box prompts (paper: 100^2 at 1024)
    expand_range: tuple[float, float] = (1.0, 2.0)  # box side multiplier, uniform
    zero_outside_probability: float = 0.5  # black out the pixels outside the mask

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"text.probability must be in [0, 1], got {self.probability}")
        if not 0.0 <= self.zero_outside_probability <= 1.0:
            raise ValueError(f"text.zero_outside_probability must be in [0, 1], got {self.zero_outside_probability}")
        low, high = self.expand_range
        if not 1.0 <= low <= high:
            raise ValueError(f"text.expand_range must be (low, high) with 1 <= low <= high, got {self.expand_range}")
        if self.min_area < 0:
            raise ValueError(f"text.min_area must be >= 0, got {self.min_area}")


def chosen_for_text(keys: jax.Array, areas: jax.Array, valid: jax.Array, config: TextPromptConfig) -> jax.Array:
    """(K,) bool: the masks whose first prompt is their crop embedding."""
    draw = jax.vmap(lambda key: jax.random.bernoulli(jax.random.fold_in(key, USE_TEXT_STREAM), config.probability))(keys)
    return draw & valid & (areas >= config.min_area)


def crop_embedder(clip: CLIP, clip_params: Any, images: jax.Array, masks: jax.Array, boxes: jax.Array,
                  mask_valid: jax.Array, config: TextPromptConfig) -> Callable[[jax.Array], jax.Array]:
    """The text prompts of a batch as `interactive_loss` takes them: the masks' text-prompt keys
    (B * M,) -> (B * M, E) crop embeddings, zero rows for masks without a text prompt.

    images (B, S, S, 3) in [0, 255] (the input frame, before SAM's normalisation), masks
    (B, M, L, L) bool over the same frame, boxes (B, M, 4) XYXY, mask_valid (B, M). CLIP's
    params are frozen (`stop_gradient`)."""
    b, m, l = masks.shape[:3]
    s = images.shape[1]
    size = clip.config.vision.image_size
    pixels_per_cell = (s / l) ** 2

    def embed(keys: jax.Array) -> jax.Array:
        flat_masks = masks.reshape(b * m, l, l).astype(bool)
        areas = jnp.sum(flat_masks, axis=(1, 2)) * pixels_per_cell
        use = chosen_for_text(keys, areas, mask_valid.reshape(-1), config)
        windows = crop_windows(keys, boxes.reshape(b * m, 4), config.expand_range)
        owner = jnp.repeat(jnp.arange(b), m)
        crops, regions = jax.vmap(lambda i, mask, window: sample_crop(images[i].astype(jnp.float32), mask, window,
                                                                       size))(owner, flat_masks, windows)
        zero = jax.vmap(lambda key: jax.random.bernoulli(jax.random.fold_in(key, ZERO_OUTSIDE_STREAM),
                                                         config.zero_outside_probability))(keys)
        crops = jnp.where(zero[:, None, None, None] & ~regions[..., None], 0.0, crops)
        # A padding mask's crop holds none of it: CLIP sees the whole crop (its row is dropped below).
        regions = regions | ~jnp.any(regions, axis=(1, 2), keepdims=True)
        params = jax.lax.stop_gradient(clip_params)
        embeddings = clip.apply({"params": params}, clip_preprocess(crops), regions, method=CLIP.encode_image)
        return jnp.where(use[:, None], embeddings, 0.0)

    return embed
