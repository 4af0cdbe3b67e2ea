"""Prompts as every front end takes them: checked in the original frame, then moved to the
encoder's input frame and padded to bucketed sizes.

    check_prompts    point_coords (B, N, 2) + point_labels (B, N), boxes (B, 4), mask_input
                     (B, 1, L, L) (and the number of text phrases, B) -> the same as numpy
                     arrays, or a ValueError naming the problem
    check_inside     a ValueError naming the first point or box corner outside the image
                     (the command line and the server refuse those; the predictor does not)
    prompt_counts    (B, N) of checked prompts
    bucket           the padded size of a count: the next power of two, so growing
                     click or prompt counts compile log2(n) times, not n times
    to_input_frame   checked prompts -> float32 input-frame prompts padded to (B', N')
    pad_text         (B, E) text embeddings -> (B', E), padding rows zeros ("no text")

Padding prompts are rows of zeros (their outputs are dropped); padding points
are labelled PADDING, which `Sam.decode` masks out of attention.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sam_jax.configs import SamConfig
from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, NOT_A_POINT, PADDING
from sam_jax.utils.transforms import ResizeLongestSide

POINT_LABELS = (NOT_A_POINT, BACKGROUND, FOREGROUND)

Prompts = tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]


def bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def pad_to(x: np.ndarray, axis: int, size: int, value) -> np.ndarray:
    """`x` padded with `value` at the end of `axis` up to `size`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def check_prompts(config: SamConfig, point_coords, point_labels, boxes, mask_input,
                  num_texts: Optional[int] = None) -> Prompts:
    """Validates batched prompts in the original frame (`SamPredictor.predict_batch`'s
    arguments); returns them as numpy arrays (None where not given).

    Every given kind must hold the same number of prompts B (prompt b is point_coords[b],
    boxes[b] and mask_input[b] together, and the b-th of `num_texts` text phrases if
    given). Points and boxes outside the image are used as given, as the official
    predictor uses them (the positional encoding extends past the image); NaN or
    infinite values are refused."""
    if point_coords is None and boxes is None and mask_input is None and num_texts is None:
        raise ValueError("no prompt: give point_coords + point_labels, a box, or a mask_input")
    if (point_coords is None) != (point_labels is None):
        raise ValueError("point_coords and point_labels must be given together")
    if point_coords is not None:
        point_coords = np.asarray(point_coords, np.float64)
        point_labels = np.asarray(point_labels)
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_coords.shape[1] == 0:
            raise ValueError(f"point_coords must be (B, N, 2) with N >= 1; got {point_coords.shape}")
        if point_labels.shape != point_coords.shape[:2]:
            raise ValueError(
                f"point_labels must have shape {point_coords.shape[:2]} to match "
                f"point_coords; got {point_labels.shape}"
            )
        if not np.isin(point_labels, POINT_LABELS).all():
            raise ValueError(
                "point_labels must be 1 (foreground), 0 (background) or -1; "
                f"got {np.unique(point_labels)}"
            )
        if not np.isfinite(point_coords).all():
            raise ValueError("point_coords contain NaN or infinite values")
        point_labels = point_labels.astype(np.int32)
    if boxes is not None:
        boxes = np.asarray(boxes, np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (B, 4) XYXY; got {boxes.shape}")
        if not np.isfinite(boxes).all():
            raise ValueError("box contains NaN or infinite values")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError(f"box must be XYXY with x1 >= x0 and y1 >= y0; got {boxes.tolist()}")
    if mask_input is not None:
        m = config.low_res_mask_size
        mask_input = np.asarray(mask_input, np.float32)
        if mask_input.ndim != 4 or mask_input.shape[1:] != (1, m, m):
            raise ValueError(f"mask_input must be (B, 1, {m}, {m}); got {mask_input.shape}")
        if not np.isfinite(mask_input).all():
            raise ValueError("mask_input contains NaN or infinite values (it takes the low-res logits "
                             "of an earlier prediction)")
    counts = {name: x.shape[0] for name, x in (("point_coords", point_coords), ("boxes", boxes),
                                                ("mask_input", mask_input)) if x is not None}
    if num_texts is not None:
        counts = {"text phrases": num_texts, **counts}
    if len(set(counts.values())) > 1:
        given = ", ".join(f"{name} {n}" for name, n in counts.items())
        text = ", text[b]" if num_texts is not None else ""
        raise ValueError(f"prompts disagree on the number of prompts B ({given}): prompt b takes "
                         f"point_coords[b], boxes[b]{text} and mask_input[b] together")
    return point_coords, point_labels, boxes, mask_input


def check_inside(point_coords: Optional[np.ndarray], box: Optional[np.ndarray], width: int, height: int,
                 image: str) -> None:
    """Raises ValueError naming the first (x, y) of `point_coords` (N, 2) or corner of `box`
    (4,) XYXY outside the `width` x `height` image named `image` (0 <= x <= width, 0 <= y <= height)."""
    def inside(x, y):
        return 0 <= x <= width and 0 <= y <= height

    for x, y in [] if point_coords is None else point_coords:
        if not inside(x, y):
            raise ValueError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image {image}")
    if box is not None:
        x0, y0, x1, y1 = box
        if not (inside(x0, y0) and inside(x1, y1)):
            raise ValueError(f"box ({', '.join(f'{v:g}' for v in box)}) is outside the "
                             f"{width}x{height} image {image}")


def prompt_counts(coords, labels, boxes, mask_input, num_texts: Optional[int] = None) -> tuple[int, int]:
    """(number of prompts B, points per prompt N) of validated prompts (with `num_texts` phrases)."""
    b = next(x.shape[0] for x in (coords, boxes, mask_input) if x is not None) if num_texts is None else num_texts
    return b, 0 if coords is None else coords.shape[1]


def to_input_frame(transform: ResizeLongestSide, original_size: tuple[int, int], coords, labels, boxes,
                   mask_input, num_prompts: int, num_points: int) -> Prompts:
    """Validated prompts in the original frame -> float32 prompts in the input frame, padded
    to `num_prompts` prompts (padding rows are zeros, to be dropped) and `num_points`
    points (padding points are labelled PADDING: masked out of the decoder)."""
    if coords is not None:
        coords = transform.apply_coords(coords, original_size).astype(np.float32)
        coords = pad_to(coords, 1, num_points, 0.0)
        labels = pad_to(labels, 1, num_points, PADDING)
    if boxes is not None:
        boxes = transform.apply_boxes(boxes, original_size).astype(np.float32)
    prompts = (coords, labels, boxes, mask_input)
    return tuple(None if x is None else pad_to(x, 0, num_prompts, 0) for x in prompts)


def pad_text(text_embeddings: Optional[np.ndarray], num_prompts: int) -> Optional[np.ndarray]:
    """(B, E) CLIP text embeddings -> float32 (num_prompts, E); padding rows are zeros, which
    `Sam.decode` reads as "no text prompt" (and whose outputs are dropped)."""
    if text_embeddings is None:
        return None
    return pad_to(np.asarray(text_embeddings, np.float32), 0, num_prompts, 0.0)


def require_text_prompts(config, text_encoder) -> None:
    """ValueError unless text prompts can be decoded: a model with a text-prompt head and an encoder."""
    if not config.has_text_prompts:
        raise ValueError(f"text prompt given, but model {config.name!r} was not trained with text prompts "
                         "(config.text_embed_dim is None: its checkpoint has no text-prompt head)")
    if text_encoder is None:
        raise ValueError("text prompt given, but no text_encoder: pass a sam_jax.clip.ClipTextEncoder "
                         "(e.g. ClipTextEncoder.from_directory(clip_checkpoint)) to the predictor")


def check_text_embeddings(config, embeddings) -> np.ndarray:
    """(B, E) finite float32 CLIP embeddings for the model's text-prompt head, or ValueError naming
    the problem (no head, shape, non-finite values, zero rows: a zero row means no prompt)."""
    if not config.has_text_prompts:
        raise ValueError(f"text_embeddings given, but model {config.name!r} was not trained with text prompts "
                         "(config.text_embed_dim is None: its checkpoint has no text-prompt head)")
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != config.text_embed_dim or not len(embeddings):
        raise ValueError(f"text_embeddings must be (B, {config.text_embed_dim}); got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all() or not np.any(embeddings, axis=1).all():
        raise ValueError("text_embeddings must be finite, non-zero rows (a zero row is no prompt)")
    return embeddings


def check_text_encoder(config, text_encoder) -> None:
    """ValueError unless `text_encoder` (None, or a ClipTextEncoder) fits the model's text-prompt head."""
    if text_encoder is None:
        return
    if not config.has_text_prompts:
        raise ValueError(f"a text_encoder was given, but model {config.name!r} was not trained with text "
                         "prompts (config.text_embed_dim is None: its checkpoint has no text-prompt head)")
    if text_encoder.embed_dim != config.text_embed_dim:
        raise ValueError(f"text_encoder makes {text_encoder.embed_dim}-dim embeddings (CLIP "
                         f"{text_encoder.config.name!r}), but model {config.name!r}'s text-prompt head takes "
                         f"{config.text_embed_dim}-dim ones (config.text_embed_dim)")
