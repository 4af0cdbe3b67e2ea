"""One record -> one fixed-shape training example.

Longest-side resize to `image_size` (optionally times a large-scale-jitter
factor), a random crop where the scaled image is larger than the canvas, an
optional horizontal flip, and zero padding at the bottom / right, as SAM's
`preprocess` pads. Image, masks, boxes and points go through the same map:

    x_out = (x_in + 0.5) * scale_x - crop_x - 0.5      (pixel centres)
    x_out = valid_w - 1 - x_out                         (after a flip)

Each mask is decoded and resampled only around its box (PIL's
`resize(box=...)` straight into the canvas), so a small mask of a 1500x2250
image costs its box, and a 2x jitter never materialises a 2x mask.

Example (M = `max_masks`, T = `image_size`, L = `low_res_size`):
    image          (T, T, 3) uint8, zero padded
    image_size     (2,) int32: (h, w) of the image inside the canvas
    masks          (M, T, T // 8) uint8: (M, T, T) bool bit-packed along width
                   (np.packbits; `unpack_masks`), if `input_res_masks`. Packed,
                   64 masks at 1024 are 8 MB to pass between processes and to
                   the devices instead of 64 MB; InputPipeline unpacks on device.
    masks_low_res  (M, L, L) bool: each LxL cell is its T/L block's majority
    boxes          (M, 4) float32 XYXY, tight on the transformed mask (x1, y1 exclusive)
    points         (M, 2) float32 (x, y): the record's point, transformed
    point_valid    (M,) bool: the point still lies on its (transformed) mask
    mask_valid     (M,) bool: False for padding
    image_id       () int32 (JAX arrays are 32-bit unless x64 is enabled)
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from sam_jax.data import rle


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How records become training examples (defaults: the paper's SA-1B recipe)."""

    image_size: int = 1024
    low_res_size: int = 256
    max_masks: int = 64
    max_mask_fraction: float = 0.9  # masks covering more of the image are dropped
    scale_range: Optional[Tuple[float, float]] = None  # large-scale jitter, e.g. (0.1, 2.0)
    horizontal_flip: bool = False
    input_res_masks: bool = True  # also return (M, T, T) ground truth
    drop_crowd: bool = True  # COCO iscrowd regions are not training targets

    def __post_init__(self):
        if self.image_size <= 0 or self.low_res_size <= 0 or self.image_size % self.low_res_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a positive multiple of low_res_size ({self.low_res_size})"
            )
        if self.image_size % math.lcm(8, self.image_size // self.low_res_size):
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of 8 and of 8 x its low-res block "
                f"({self.image_size // self.low_res_size}) when the block is odd: masks are bit-packed"
            )
        if self.max_masks <= 0:
            raise ValueError(f"max_masks must be positive, got {self.max_masks}")
        if not 0.0 < self.max_mask_fraction <= 1.0:
            raise ValueError(f"max_mask_fraction must be in (0, 1], got {self.max_mask_fraction}")
        if self.scale_range is not None:
            lo, hi = self.scale_range
            if not 0.0 < lo <= hi:
                raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Source image (h, w) -> canvas: per-axis scale, crop offset, valid size, flip."""

    scale_y: float
    scale_x: float
    crop_y: int
    crop_x: int
    valid_h: int
    valid_w: int
    flip: bool

    @property
    def source_box(self) -> Tuple[float, float, float, float]:
        """The source-pixel region (x0, y0, x1, y1) that fills the valid canvas area."""
        return (
            self.crop_x / self.scale_x,
            self.crop_y / self.scale_y,
            (self.crop_x + self.valid_w) / self.scale_x,
            (self.crop_y + self.valid_h) / self.scale_y,
        )

    def resample(self, plane: np.ndarray) -> np.ndarray:
        """(h, w[, 3]) uint8 source -> (valid_h, valid_w[, 3]) uint8, bilinear, flipped if asked."""
        out = Image.fromarray(plane).resize((self.valid_w, self.valid_h), Image.BILINEAR, box=self.source_box)
        out = np.asarray(out)
        return out[:, ::-1] if self.flip else out

    def resample_mask(self, counts: bytes, source_hw: Tuple[int, int], box_xywh) -> Optional[Tuple[int, int, np.ndarray]]:
        """One RLE mask -> (y0, x0, (hh, ww) bool): the canvas rectangle it can touch, resampled.

        Equal to `resample` of the whole decoded mask, but reads only the
        source pixels near the mask's box: the output rectangle covers every
        pixel whose bilinear window reaches the box, and the source crop adds
        a background margin wider than the window, so no window is cut short.
        None when the mask falls outside the canvas.
        """
        h, w = source_hw
        spans = []
        for start, extent, n_source, scale, crop, valid in (
            (box_xywh[0], box_xywh[2], w, self.scale_x, self.crop_x, self.valid_w),
            (box_xywh[1], box_xywh[3], h, self.scale_y, self.crop_y, self.valid_h),
        ):
            reach = max(1.0, 1.0 / scale)  # bilinear support in source pixels
            o0 = max(0, int(np.floor((start - reach) * scale - crop)) - 1)
            o1 = min(valid, int(np.ceil((start + extent + reach) * scale - crop)) + 1)
            if o0 >= o1:
                return None
            margin = int(np.ceil(2 * reach + 2 / scale)) + 2
            s0, s1 = max(0, int(start) - margin), min(n_source, int(np.ceil(start + extent)) + margin)
            box0 = max(0.0, (crop + o0) / scale - s0)
            box1 = min(float(s1 - s0), (crop + o1) / scale - s0)
            spans.append((o0, o1, s0, s1, box0, box1))
        (ox0, ox1, sx0, sx1, bx0, bx1), (oy0, oy1, sy0, sy1, by0, by1) = spans
        plane = rle.decode_columns(counts, (h, w), sx0, sx1)[:, sy0:sy1].T * np.uint8(255)
        out = Image.fromarray(plane).resize((ox1 - ox0, oy1 - oy0), Image.BILINEAR, box=(bx0, by0, bx1, by1))
        out = np.asarray(out) >= 128
        if self.flip:
            out, ox0 = out[:, ::-1], self.valid_w - ox1
        return oy0, ox0, out

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) source pixel (x, y) -> (N, 2) canvas pixel (x, y)."""
        x = (xy[:, 0] + 0.5) * self.scale_x - self.crop_x - 0.5
        y = (xy[:, 1] + 0.5) * self.scale_y - self.crop_y - 0.5
        if self.flip:
            x = self.valid_w - 1 - x
        return np.stack([x, y], axis=1).astype(np.float32)

    def overlaps(self, boxes_xywh: np.ndarray) -> np.ndarray:
        """(N,) bool: the source box lands (at least partly) inside the valid canvas area."""
        x0 = boxes_xywh[:, 0] * self.scale_x - self.crop_x
        y0 = boxes_xywh[:, 1] * self.scale_y - self.crop_y
        x1 = (boxes_xywh[:, 0] + boxes_xywh[:, 2]) * self.scale_x - self.crop_x
        y1 = (boxes_xywh[:, 1] + boxes_xywh[:, 3]) * self.scale_y - self.crop_y
        return (x1 > 0) & (y1 > 0) & (x0 < self.valid_w) & (y0 < self.valid_h)


def sample_geometry(h: int, w: int, config: PreprocessConfig, rng: np.random.Generator) -> Geometry:
    """The placement of an (h, w) source image: longest side to image_size, times a jitter
    scale from `scale_range`, a random crop where it overflows, a flip with probability 1/2."""
    jitter = 1.0 if config.scale_range is None else float(rng.uniform(*config.scale_range))
    scale = config.image_size / max(h, w) * jitter
    scaled_h, scaled_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    crop_y = int(rng.integers(0, max(scaled_h - config.image_size, 0) + 1))
    crop_x = int(rng.integers(0, max(scaled_w - config.image_size, 0) + 1))
    flip = bool(config.horizontal_flip and rng.random() < 0.5)
    return Geometry(
        scale_y=scaled_h / h,
        scale_x=scaled_w / w,
        crop_y=crop_y,
        crop_x=crop_x,
        valid_h=min(scaled_h - crop_y, config.image_size),
        valid_w=min(scaled_w - crop_x, config.image_size),
        flip=flip,
    )


def unpack_masks(packed: np.ndarray) -> np.ndarray:
    """(..., T, T // 8) uint8 bit-packed masks -> (..., T, T) bool."""
    return np.unpackbits(packed, axis=-1).astype(bool)


def _image_id(value) -> np.int32:
    if not np.iinfo(np.int32).min <= int(value) <= np.iinfo(np.int32).max:
        raise ValueError(f"image_id {value} does not fit in int32")
    return np.int32(value)


def _candidate_masks(record: Dict[str, Any], h: int, w: int, config: PreprocessConfig) -> np.ndarray:
    """Indices of the record's masks that may become targets (size and crowd filters)."""
    masks = record["masks"]
    area = np.asarray(masks["area"], np.int64)
    keep = (area > 0) & (area <= config.max_mask_fraction * h * w)
    if config.drop_crowd and "iscrowd" in masks:
        keep &= np.asarray(masks["iscrowd"]) == 0
    return np.flatnonzero(keep)


def preprocess_record(record: Dict[str, Any], config: PreprocessConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A decoded record (see `sam_jax.data.features`) -> a fixed-shape example (module docstring).

    Masks are sampled without replacement among those that pass the filters
    and still show after the crop; fewer than `max_masks` are padded with
    `mask_valid` False. An example may have no valid mask at all (the
    pipeline drops those).
    """
    image = np.asarray(record["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"record image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    counts = list(record["masks"]["counts"])
    geometry = sample_geometry(h, w, config, rng)
    size, low = config.image_size, config.low_res_size
    m = config.max_masks

    candidates = _candidate_masks(record, h, w, config)
    boxes_source = rle.boxes_xywh([counts[i] for i in candidates], (h, w))
    visible = geometry.overlaps(boxes_source)
    order = rng.permutation(np.flatnonzero(visible))

    block = size // low
    masks = np.zeros((m, size, size // 8), np.uint8)  # bit-packed along width
    masks_low_res = np.zeros((m, low, low), bool)
    boxes = np.zeros((m, 4), np.float32)
    patches = []
    # Masks that vanish in the resample (thin ones at a small scale) give way to the next candidate.
    for k in order:
        placed = geometry.resample_mask(counts[candidates[k]], (h, w), boxes_source[k])
        if placed is None or not placed[2].any():
            continue
        j = len(patches)
        y0, x0, patch = placed
        y1, x1 = y0 + patch.shape[0], x0 + patch.shape[1]
        rows, cols = np.flatnonzero(patch.any(axis=1)), np.flatnonzero(patch.any(axis=0))
        boxes[j] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
        # The patch inside a rectangle aligned to bytes and to low-res blocks.
        align = math.lcm(8, block)
        ry0, rx0 = y0 // block * block, x0 // align * align
        ry1, rx1 = -(-y1 // block) * block, -(-x1 // align) * align
        region = np.zeros((ry1 - ry0, rx1 - rx0), bool)
        region[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = patch
        masks[j, ry0:ry1, rx0 // 8 : rx1 // 8] = np.packbits(region, axis=-1)
        votes = region.reshape(region.shape[0] // block, block, region.shape[1] // block, block).sum(axis=(1, 3), dtype=np.uint32)
        masks_low_res[j, ry0 // block : ry1 // block, rx0 // block : rx1 // block] = 2 * votes >= block * block
        patches.append((int(candidates[k]), y0, x0, patch))
        if len(patches) == m:
            break
    n = len(patches)

    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: geometry.valid_h, : geometry.valid_w] = geometry.resample(image)
    points = np.zeros((m, 2), np.float32)
    point_valid = np.zeros((m,), bool)
    if n:
        points[:n] = geometry.points(np.asarray(record["masks"]["point"], np.float32)[[p[0] for p in patches]])
    for j, (_, y0, x0, patch) in enumerate(patches):
        px, py = int(round(points[j, 0])) - x0, int(round(points[j, 1])) - y0
        point_valid[j] = 0 <= py < patch.shape[0] and 0 <= px < patch.shape[1] and patch[py, px]
    example = {
        "image": canvas,
        "image_size": np.array([geometry.valid_h, geometry.valid_w], np.int32),
        "masks_low_res": masks_low_res,
        "boxes": boxes,
        "points": points,
        "point_valid": point_valid,
        "mask_valid": np.arange(m) < n,
        "image_id": _image_id(record["image_id"]),
    }
    if config.input_res_masks:
        example["masks"] = masks
    return example
