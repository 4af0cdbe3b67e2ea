"""`SamPredictor`: the official predictor's API on sam_jax.

Embed an image once with `set_image`, then prompt it repeatedly with
`predict` (one prompt) or `predict_batch` (many prompts at once). Inputs and
outputs are numpy arrays in the original image's frame, with the official
shapes. The encoder is compiled once per model. The decoder is compiled once
per bucket of prompt sizes: the number of points and of prompts are padded
up to powers of two (padding points are masked out of attention, padding
prompts are dropped), so an interactive session that adds clicks one by one
compiles log2(clicks) times, not once per click; also once per (box or not,
mask or not, multimask or not) and per image size.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling import Sam, decode_in_chunks, postprocess_masks, preprocess
from sam_jax.modeling.prompt_encoder import PADDING
from sam_jax.transforms import ResizeLongestSide

POINT_LABELS = (-1, 0, 1)  # not-a-point, background, foreground


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: Sam, params, image: jax.Array) -> jax.Array:
    """(1, S, S, 3) preprocessed image -> (1, h, w, D) embedding."""
    return model.apply({"params": params}, image, method=Sam.encode_image)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _decode(model: Sam, params, features, coords, labels, boxes, masks,
            multimask_output: bool, input_size: tuple, original_size: tuple,
            return_logits: bool = True):
    """Prompts in the input frame -> (masks at original size: logits, or booleans
    unless return_logits; IoU; low-res logits)."""
    low_res, iou = decode_in_chunks(model, params, features, coords, labels, boxes, masks, multimask_output)
    logits = postprocess_masks(low_res, input_size, original_size, model.config.image_size)
    # Thresholding inside the jit fuses it into the upsampling: no full-size float masks.
    return (logits if return_logits else logits > model.config.mask_threshold), iou, low_res


def _bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_to(x: np.ndarray, axis: int, size: int, value) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


class SamPredictor:
    def __init__(self, model: Sam, params: Any) -> None:
        """`model, params = sam_jax.load_sam(path)`; `SamPredictor(model, params)`."""
        self.model = model
        self.params = params
        self.transform = ResizeLongestSide(model.config.image_size)
        self.reset_image()

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: Optional[jax.Array] = None
        self.original_size: Optional[tuple[int, int]] = None
        self.input_size: Optional[tuple[int, int]] = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embeds an (H, W, 3) uint8 image in `image_format` "RGB" or "BGR"."""
        image = as_rgb(image, image_format)
        self.set_transformed_image(self.transform.apply_image(image), image.shape[:2])

    def set_transformed_image(
        self, transformed_image: np.ndarray, original_image_size: tuple[int, int]
    ) -> None:
        """Embeds an (H', W', 3) image already resized by `ResizeLongestSide` (the
        official `set_torch_image`, channels-last)."""
        s = self.model.config.image_size
        shape = transformed_image.shape
        if len(shape) != 3 or shape[2] != 3 or max(shape[:2]) != s:
            raise ValueError(
                f"transformed image must be (H, W, 3) with longest side {s}; got {transformed_image.shape}"
            )
        self.reset_image()
        image = preprocess(jnp.asarray(transformed_image), self.model.config)[None]
        self.features = _encode(self.model, self.params, image)
        self.original_size = tuple(int(x) for x in original_image_size)
        self.input_size = tuple(int(x) for x in transformed_image.shape[:2])
        self.is_image_set = True

    def get_image_embedding(self) -> jax.Array:
        """(1, D, h, w) image embedding, in the official layout."""
        self._require_image()
        return jnp.transpose(self.features, (0, 3, 1, 2))

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the set image.

        Args:
          point_coords: (N, 2) (x, y) pixels in the original image; with
            point_labels (N,): 1 foreground, 0 background.
          box: (4,) XYXY pixels in the original image.
          mask_input: (1, 256, 256) low-res logits from an earlier prediction.
        Returns:
          masks (C, H, W) bool (float logits if return_logits), iou_predictions
          (C,), low_res_logits (C, 256, 256); C = 3 with multimask_output else 1.
        """
        batch = lambda x: None if x is None else np.asarray(x)[None]
        boxes = batch(box) if np.ndim(box) == 1 else box  # (4,), or (1, 4) as the official accepts
        if boxes is not None and np.shape(boxes)[0] != 1:
            raise ValueError(
                f"predict takes one box, (4,); got {np.shape(box)}: use predict_batch for several"
            )
        masks, iou, low_res = self.predict_batch(
            batch(point_coords), batch(point_labels), boxes, batch(mask_input), multimask_output,
            return_logits,
        )
        return masks[0], iou[0], low_res[0]

    def predict_batch(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        boxes: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompts on the set image at once (the official `predict_torch`, but in the
        original image's frame): point_coords (B, N, 2), point_labels (B, N),
        boxes (B, 4), mask_input (B, 1, 256, 256). Returns (B, C, H, W) masks,
        (B, C) IoU predictions and (B, C, 256, 256) low-res logits."""
        self._require_image()
        prompts = check_prompts(self.model.config, point_coords, point_labels, boxes, mask_input)
        b, n = prompt_counts(*prompts)
        padded = to_input_frame(self.transform, self.original_size, *prompts, _bucket(b), _bucket(n))
        masks, iou, low_res = _decode(
            self.model, self.params, self.features, *padded,
            bool(multimask_output), self.input_size, self.original_size, bool(return_logits),
        )
        return tuple(np.asarray(x[:b]) for x in (masks, iou, low_res))

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")


def as_rgb(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Validates an (H, W, 3) uint8 image in "RGB" or "BGR"; returns it as contiguous RGB."""
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR'; got {image_format!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"expected an (H, W, 3) uint8 image; got {image.dtype} array of shape "
            f"{image.shape} (convert grayscale or RGBA images to RGB first)"
        )
    return np.ascontiguousarray(image[..., ::-1] if image_format == "BGR" else image)


def check_prompts(config, point_coords, point_labels, boxes, mask_input):
    """Validates batched prompts in the original frame (`predict_batch`'s arguments);
    returns them as numpy arrays (None where not given)."""
    if point_coords is None and boxes is None and mask_input is None:
        raise ValueError("no prompt: give point_coords + point_labels, a box, or a mask_input")
    if (point_coords is None) != (point_labels is None):
        raise ValueError("point_coords and point_labels must be given together")
    if point_coords is not None:
        point_coords = np.asarray(point_coords, np.float64)
        point_labels = np.asarray(point_labels)
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_coords.shape[1] == 0:
            raise ValueError(
                f"point_coords must be (N, 2) with N >= 1 (batched: (B, N, 2)); "
                f"got {point_coords.shape}"
            )
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
            raise ValueError(f"box must be (4,) XYXY (batched: (B, 4)); got {boxes.shape}")
        if not np.isfinite(boxes).all():
            raise ValueError("box contains NaN or infinite values")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError(f"box must be XYXY with x1 >= x0 and y1 >= y0; got {boxes.tolist()}")
    if mask_input is not None:
        m = config.low_res_mask_size
        mask_input = np.asarray(mask_input, np.float32)
        if mask_input.ndim != 4 or mask_input.shape[1:] != (1, m, m):
            raise ValueError(
                f"mask_input must be (1, {m}, {m}) (batched: (B, 1, {m}, {m})); "
                f"got {mask_input.shape}"
            )
    return point_coords, point_labels, boxes, mask_input


def prompt_counts(coords, labels, boxes, mask_input) -> tuple[int, int]:
    """(number of prompts B, points per prompt N) of validated prompts."""
    b = next(x.shape[0] for x in (coords, boxes, mask_input) if x is not None)
    return b, 0 if coords is None else coords.shape[1]


def to_input_frame(transform, original_size, coords, labels, boxes, mask_input,
                   num_prompts: int, num_points: int):
    """Validated prompts in the original frame -> float32 prompts in the input frame, padded
    to `num_prompts` prompts (padding rows are zeros, to be dropped) and `num_points`
    points (padding points are labelled PADDING: masked out of the decoder)."""
    if coords is not None:
        coords = transform.apply_coords(coords, original_size).astype(np.float32)
        coords = _pad_to(coords, 1, num_points, 0.0)
        labels = _pad_to(labels, 1, num_points, PADDING)
    if boxes is not None:
        boxes = transform.apply_boxes(boxes, original_size).astype(np.float32)
    prompts = (coords, labels, boxes, mask_input)
    return tuple(None if x is None else _pad_to(x, 0, num_prompts, 0) for x in prompts)
