"""Helpers of the automatic mask generator: the port of `segment_anything.utils.amg`.

Same names and semantics as the official module, on numpy arrays instead of
torch tensors. `calculate_stability_score`, `batched_mask_to_box` and
`box_from_extent` take numpy or jax arrays (the generator's jitted batch step
calls `box_from_extent`). Box NMS
(`nms`, `batched_nms`, `box_area`) follows torchvision: boxes in descending
score order, suppress IoU > threshold; equal scores keep their input order.
Uncompressed RLE is pycocotools' format: column-major (Fortran) runs starting
with a run of zeros, {"size": [h, w], "counts": [...]}.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Dict, ItemsView, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class MaskData:
    """Per-mask fields in batched form (numpy arrays or lists), filtered and concatenated together."""

    def __init__(self, **kwargs) -> None:
        for k, v in kwargs.items():
            _check_field(k, v)
        self._stats = dict(**kwargs)

    def __setitem__(self, key: str, item: Any) -> None:
        _check_field(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def __len__(self) -> int:
        return len(next(iter(self._stats.values()), []))

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: np.ndarray) -> None:
        """Keeps the rows selected by `keep`: a bool mask or integer indices (in that order)."""
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64).reshape(-1)
        for k, v in self._stats.items():
            self._stats[k] = [v[i] for i in index] if isinstance(v, list) else v[index]

    def cat(self, new_stats: "MaskData") -> None:
        """Appends `new_stats`' rows (sharing its list items: no deep copies)."""
        for k, v in new_stats.items():
            if k not in self._stats:
                self._stats[k] = list(v) if isinstance(v, list) else v
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([self._stats[k], v], axis=0)
            else:
                self._stats[k] = self._stats[k] + list(v)


def _check_field(key: str, value: Any) -> None:
    if not isinstance(value, (list, np.ndarray)):
        raise TypeError(f"MaskData field {key!r} must be a list or numpy array; got {type(value)}")


def is_box_near_crop_edge(
    boxes: np.ndarray, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> np.ndarray:
    """(N, 4) XYXY boxes in the crop frame -> (N,) bool: within `atol` of a crop edge
    that is not also an edge of the original image."""
    crop_box = np.asarray(crop_box, np.float32)
    orig_box = np.asarray(orig_box, np.float32)
    boxes = uncrop_boxes_xyxy(np.asarray(boxes), crop_box).astype(np.float32)
    near_crop_edge = np.abs(boxes - crop_box[None, :]) <= atol
    near_image_edge = np.abs(boxes - orig_box[None, :]) <= atol
    return np.any(near_crop_edge & ~near_image_edge, axis=1)


def box_xyxy_to_xywh(box_xyxy: np.ndarray) -> np.ndarray:
    box_xywh = np.array(box_xyxy, copy=True)
    box_xywh[..., 2] = box_xywh[..., 2] - box_xywh[..., 0]
    box_xywh[..., 3] = box_xywh[..., 3] - box_xywh[..., 1]
    return box_xywh


def mask_to_rle(masks: np.ndarray) -> List[Dict[str, Any]]:
    """(B, H, W) bool masks -> B uncompressed RLEs (the official `mask_to_rle_pytorch`).

    Runs follow columns; their boundaries are found on the row-major masks (changes down
    a column, and from a column's bottom to the next one's top), with no transpose."""
    masks = np.ascontiguousarray(masks, bool)
    b, h, w = masks.shape
    n = h * w
    down = np.flatnonzero(masks[:, 1:, :] != masks[:, :-1, :])  # over (B, H - 1, W)
    i, rest = np.divmod(down, max((h - 1) * w, 1))
    r, c = np.divmod(rest, w)
    across = np.flatnonzero(masks[:, 0, 1:] != masks[:, -1, :-1])  # over (B, W - 1)
    j, c_prev = np.divmod(across, max(w - 1, 1))
    # run starts as indices into the B masks flattened column-major, one after another
    starts = np.sort(np.concatenate([i * n + c * h + r + 1, j * n + (c_prev + 1) * h]))
    bounds = np.searchsorted(starts, np.arange(b + 1) * n)
    out = []
    for k in range(b):
        run_starts = starts[bounds[k] : bounds[k + 1]] - k * n
        counts = np.diff(np.concatenate([[0], run_starts, [n]])).tolist()
        out.append({"size": [h, w], "counts": ([0] + counts) if n and masks[k, 0, 0] else counts})
    return out



def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, not h * w = {h * w}")
    parity = np.arange(len(counts)) % 2 == 1
    return np.repeat(parity, counts).reshape(w, h).transpose()  # runs are column-major


def area_from_rle(rle: Dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def calculate_stability_score(masks, mask_threshold: float, threshold_offset: float):
    """(..., H, W) logits -> (...,) IoU of the masks thresholded at thr + offset and thr - offset.

    The first mask lies inside the second, so the IoU is a ratio of pixel counts.
    An empty low-threshold mask gives NaN, as in the official code.
    """
    xp = jnp if isinstance(masks, jax.Array) else np
    intersections = (masks > (mask_threshold + threshold_offset)).sum((-1, -2), dtype=xp.int32)
    unions = (masks > (mask_threshold - threshold_offset)).sum((-1, -2), dtype=xp.int32)
    with np.errstate(invalid="ignore"):
        return intersections.astype(xp.float32) / unions.astype(xp.float32)


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n_per_side**2, 2) (x, y) points evenly spaced in [0, 1]^2, x fastest."""
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """Point grids for crop layers 0..n_layers; layer i has n_per_side / scale_per_layer**i per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes and their layer indices: the whole image, then (2**i)**2 crops in layer i."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        crop_box_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_box_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(crop_box_x0, crop_box_y0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """(..., 4) XYXY boxes in the crop frame -> original frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return np.asarray(boxes) + np.asarray([x0, y0, x0, y0], dtype=np.asarray(crop_box).dtype)


def uncrop_points(points: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """(..., 2) (x, y) points in the crop frame -> original frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return np.asarray(points) + np.asarray([x0, y0], dtype=np.asarray(crop_box).dtype)


def uncrop_masks(masks: np.ndarray, crop_box: Sequence[int], orig_h: int, orig_w: int) -> np.ndarray:
    """(..., h, w) masks of the crop -> (..., orig_h, orig_w), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    pad = [(0, 0)] * (masks.ndim - 2) + [(y0, pad_y - y0), (x0, pad_x - x0)]
    return np.pad(masks, pad, constant_values=0)


_EIGHT_CONNECTED = np.ones((3, 3), bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fills holes ("holes") or drops islands ("islands") under `area_thresh` pixels in an
    (H, W) bool mask, 8-connected; returns (mask, whether it changed). If every island
    is small, the largest stays."""
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands'; got {mode!r}")
    correct_holes = mode == "holes"
    working_mask = correct_holes ^ np.asarray(mask, bool)
    regions, n_regions = ndimage.label(working_mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)[1:]  # label 0: background
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    if correct_holes:
        fill_labels = np.concatenate([[0], small])
    else:
        fill_labels = np.setdiff1d(np.arange(1, n_regions + 1), small)
        if len(fill_labels) == 0:  # every region is small: keep the largest
            fill_labels = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, fill_labels), True


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with a str `counts` (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def batched_mask_to_box(masks):
    """(..., H, W) bool masks -> (..., 4) int32 XYXY boxes (inclusive max); [0, 0, 0, 0] if empty."""
    xp = jnp if isinstance(masks, jax.Array) else np
    if masks.size == 0:
        return xp.zeros((*masks.shape[:-2], 4), xp.int32)
    return box_from_extent(xp.any(masks, axis=-1), xp.any(masks, axis=-2))


def box_from_extent(rows, columns):
    """(..., H) rows and (..., W) columns a mask touches -> (..., 4) int32 XYXY box, as
    `batched_mask_to_box`."""
    xp = jnp if isinstance(rows, jax.Array) else np

    def edges(occupied):
        n = occupied.shape[-1]
        coords = xp.arange(n, dtype=xp.int32)
        first = xp.min(xp.where(occupied, coords, n), axis=-1)
        last = xp.max(xp.where(occupied, coords, 0), axis=-1)
        return first, last

    top, bottom = edges(rows)
    left, right = edges(columns)
    empty = (right < left) | (bottom < top)
    out = xp.stack([left, top, right, bottom], axis=-1)
    return xp.where(empty[..., None], 0, out).astype(xp.int32)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY -> (N,) (x1 - x0) * (y1 - y0)."""
    boxes = np.asarray(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS as torchvision's CPU kernel, in fp32: indices of kept (N, 4) XYXY boxes in
    descending score order (ties in input order); a box goes if its IoU with a kept one is
    > iou_threshold."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms expects (N, 4) boxes and (N,) scores; got {boxes.shape}, {scores.shape}")
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes[order].T
    areas = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        rest = slice(i + 1, None)
        w = np.maximum(np.float32(0), np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
        h = np.maximum(np.float32(0), np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 for empty boxes: NaN, kept
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= iou.astype(np.float64) > iou_threshold
    return np.asarray(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """`nms` within each category `idxs` (N,), never across: kept indices, descending score."""
    boxes = np.asarray(boxes, np.float32)
    if boxes.size == 0:
        return np.zeros((0,), np.int64)
    offsets = np.asarray(idxs).astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold)
