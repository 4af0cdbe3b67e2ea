"""`SamAutomaticMaskGenerator`: the official automatic mask generator on sam_jax.

Prompts SAM with a grid of single foreground points over the image (and
optionally over overlapping crops), keeps masks that are confident and
stable, and removes duplicates with box NMS. Same parameters, defaults and
records as `segment_anything.SamAutomaticMaskGenerator`.

Each batch of `points_per_batch` points runs as one fixed-shape jitted step,
compiled once per crop size (the last batch is padded): decode 3 masks per
point, then per mask upsample the logits to the crop, stability score, binary
mask, its box, and the mask bit-packed. On CPU masks go one at a time, so
full-size logits never leave the cache, and masks the IoU filter drops are
skipped. The host applies the official filters to the small arrays (IoU,
stability, boxes), then fetches and run-length encodes only the survivors.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.utils.amg import (
    MaskData,
    area_from_rle,
    batched_mask_to_box,
    batched_nms,
    box_from_extent,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from sam_jax.modeling import Sam, decode_in_chunks, encode_images, postprocess_masks
from sam_jax.modeling.prompt_encoder import FOREGROUND
from sam_jax.prompts import bucket
from sam_jax.utils.transforms import ResizeLongestSide, as_rgb, to_input_batch

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
DEFAULT_CROP_OVERLAP_RATIO = 512 / 1500


def crop_boxes(image_size: Tuple[int, int], crop_n_layers: int = 0,
               crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO) -> Tuple[List[List[int]], List[int]]:
    """The XYXY crop boxes of an (H, W) image and their layers (`generate_crop_boxes`), or a
    ValueError when a layer's crops are so small that some lie outside the image."""
    boxes, layers = generate_crop_boxes(image_size, crop_n_layers, crop_overlap_ratio)
    empty = [(box, layer) for box, layer in zip(boxes, layers) if box[2] <= box[0] or box[3] <= box[1]]
    if empty:
        usable = max(n for n in range(crop_n_layers + 1) if all(
            b[2] > b[0] and b[3] > b[1] for b in generate_crop_boxes(image_size, n, crop_overlap_ratio)[0]))
        (box, layer), (h, w) = empty[0], image_size
        raise ValueError(
            f"crop_n_layers={crop_n_layers} is too many for a {h}x{w} image: layer {layer} has crops outside it "
            f"(XYXY {box}); use crop_n_layers <= {usable}"
        )
    return boxes, layers


def _count_bits(packed: jax.Array) -> jax.Array:
    return jax.lax.population_count(packed).astype(jnp.int32).sum()


def _mask_summary(low_res, input_size, crop_size, image_size, threshold, offset):
    """One mask's (4h, 4w) logits -> its stability score, the rows (H,) and columns (W,)
    it touches, and the mask bit-packed along W, (H, ceil(W / 8)) uint8.

    The stability score is `calculate_stability_score`'s, counting set bits."""
    logits = postprocess_masks(low_res, input_size, crop_size, image_size, banded=True)
    packed = jnp.packbits(logits > threshold, axis=-1)
    high = _count_bits(jnp.packbits(logits > (threshold + offset), axis=-1))
    low = _count_bits(jnp.packbits(logits > (threshold - offset), axis=-1))
    stability = high.astype(jnp.float32) / low.astype(jnp.float32)
    rows = jnp.any(packed != 0, axis=-1)
    columns = jax.lax.reduce(packed, np.uint8(0), jax.lax.bitwise_or, (0,))
    columns = jnp.unpackbits(columns, count=crop_size[1]).astype(bool)
    return stability, rows, columns, packed


def _mask_chunk(crop_size: Tuple[int, int]) -> int:
    """Masks summarised at once: 1 on CPU (a mask's full-size logits stay in cache, and
    masks the IoU filter drops are skipped), else as many as fit 2**26 pixels (vmapped)."""
    if jax.default_backend() == "cpu":
        return 1
    return max(1, 2**26 // (crop_size[0] * crop_size[1]))


def predict_point_batch(model: Sam, params, features, points, valid, iou_floor,
                        stability_offset: float, input_size: tuple, crop_size: tuple, chunk: int):
    """One batch of single-point prompts, 3 masks each: the decoder (compiled once, whatever
    the crop) then the crop-size-specific summary (compiled once per crop size).

    Args:
      features: (1, h, w, D) image embedding of the crop.
      points: (B, 2) (x, y) in the encoder input frame; valid (B,) bool, False for padding.
      iou_floor: masks with predicted IoU <= this need no summary (-inf: all do).
      chunk: masks summarised at once (`_mask_chunk`); with 1, masks needing none are skipped.
    Returns, for the 3B masks (point-major): iou_preds (3B,), stability (3B,),
      boxes (3B, 4) int32 XYXY in the crop, and the masks (3B, H, ceil(W / 8)) uint8,
      bit-packed along W. Skipped masks have zero stability, box and mask.
    """
    low_res, iou_preds = decode_points(model, params, features, points)
    cfg = model.config
    return summarise_masks(low_res, iou_preds, valid, iou_floor, stability_offset, input_size, crop_size,
                           cfg.image_size, cfg.mask_threshold, chunk)


@functools.partial(jax.jit, static_argnums=(0,))
def decode_points(model: Sam, params, features, points):
    """(B, 2) foreground points on one (1, h, w, D) embedding -> the 3B masks' low-res logits
    (3B, 4h, 4w) and predicted IoUs (3B,), point-major."""
    b = points.shape[0]
    labels = jnp.full((b, 1), FOREGROUND, jnp.int32)
    low_res, iou_preds = decode_in_chunks(model, params, features, points[:, None, :], labels)
    return low_res.reshape(-1, *low_res.shape[2:]), iou_preds.reshape(-1)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def summarise_masks(low_res, iou_preds, valid, iou_floor, stability_offset: float, input_size: tuple,
                    crop_size: tuple, image_size: int, threshold: float, chunk: int):
    """`_mask_summary` of each of the 3B masks of `decode_points` (see `predict_point_batch`)."""
    n = len(low_res)
    summary = functools.partial(_mask_summary, input_size=input_size, crop_size=crop_size, image_size=image_size,
                                threshold=threshold, offset=stability_offset)
    if chunk == 1:
        active = jnp.repeat(valid, n // len(valid)) & (iou_preds > iou_floor)
        shapes = jax.eval_shape(summary, low_res[0])
        skip = lambda x: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        outputs = jax.lax.map(lambda a: jax.lax.cond(a[1], summary, skip, a[0]), (low_res, active))
    else:
        chunks = -(-n // chunk)
        padded = jnp.pad(low_res, ((0, chunks * chunk - n), (0, 0), (0, 0)))
        outputs = jax.lax.map(jax.vmap(summary), padded.reshape(chunks, chunk, *low_res.shape[1:]))
        outputs = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n], outputs)
    stability, rows, columns, packed = outputs
    return iou_preds, stability, box_from_extent(rows, columns), packed


@jax.jit
def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    return x[index]


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        params: Any,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        """Masks for a whole image from a grid of point prompts (defaults tuned for ViT-H).

        Args:
          model, params: as `sam_jax.load_sam` returns them.
          points_per_side: grid points per side (points_per_side**2 in all); or None
            with explicit `point_grids`.
          points_per_batch: points decoded at once.
          pred_iou_thresh: keep masks whose predicted IoU is > this (0 disables).
          stability_score_thresh: keep masks whose stability score is >= this (0 disables).
          stability_score_offset: logit shift of the stability score's two cutoffs.
          box_nms_thresh: box IoU above which duplicates in a crop are suppressed.
          crop_n_layers: if > 0, also run on crops; layer i has (2**i)**2 crops.
          crop_nms_thresh: box IoU for duplicates between crops (smaller crops win).
          crop_overlap_ratio: overlap of layer-1 crops as a fraction of the short side.
          crop_n_points_downscale_factor: layer i uses points_per_side / factor**i per side.
          point_grids: one (N, 2) array of (x, y) in [0, 1] per crop layer.
          min_mask_region_area: if > 0, fill holes and drop islands smaller than this
            (pixels), then NMS again.
          output_mode: "binary_mask", "uncompressed_rle" or "coco_rle".
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError(
                "exactly one of points_per_side or point_grids must be given; got "
                f"points_per_side={points_per_side!r} and point_grids="
                f"{'None' if point_grids is None else f'a list of {len(point_grids)}'}"
            )
        _require_int("crop_n_layers", crop_n_layers, 0)
        _require_int("points_per_batch", points_per_batch, 1)
        _require_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        if points_per_side is not None:
            _require_int("points_per_side", points_per_side, 1)
            last = int(points_per_side / crop_n_points_downscale_factor**crop_n_layers)
            if last < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} / crop_n_points_downscale_factor="
                    f"{crop_n_points_downscale_factor}**crop_n_layers={crop_n_layers} leaves "
                    "no point in the last crop layer"
                )
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(g, np.float64) for g in point_grids]
            bad = [np.shape(g) for g in self.point_grids if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0]
            if bad:
                raise ValueError(f"point_grids must be (N, 2) arrays with N >= 1; got shapes {bad}")
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids needs one grid per crop layer, crop_n_layers + 1 = "
                    f"{crop_n_layers + 1}; got {len(self.point_grids)}"
                )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}; got {output_mode!r}")
        if output_mode == "coco_rle":
            from pycocotools import mask as mask_utils  # noqa: F401  (fail early if missing)
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("stability_score_offset", stability_score_offset),
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
            ("crop_overlap_ratio", crop_overlap_ratio),
            ("min_mask_region_area", min_mask_region_area),
        ):
            if not isinstance(value, numbers.Real) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if not 0 <= crop_overlap_ratio < 1:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1); got {crop_overlap_ratio!r}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0; got {min_mask_region_area!r}")

        self.model = model
        self.params = params
        self.transform = ResizeLongestSide(model.config.image_size)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    def generate(self, image: np.ndarray, image_embedding: Optional[jax.Array] = None) -> List[Dict[str, Any]]:
        """Masks of an (H, W, 3) uint8 RGB image, as records (dicts) with keys:

        segmentation: (H, W) bool mask, or an RLE dict (per `output_mode`);
        area: int pixels; bbox: [x, y, w, h]; predicted_iou: float;
        point_coords: [[x, y]] the prompt; stability_score: float;
        crop_box: [x, y, w, h] of the crop the mask came from.

        `image_embedding`, the image's (1, h, w, D) embedding as `SamPredictor.features`
        holds it, is used for the whole-image crop instead of encoding the image again.
        """
        image = as_rgb(image)
        mask_data = self._generate_masks(image, image_embedding)
        if self.min_mask_region_area > 0:
            mask_data = self.postprocess_small_regions(
                mask_data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )

        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in mask_data["rles"]]
        elif self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in mask_data["rles"]]
        else:
            segmentations = mask_data["rles"]

        bboxes = box_xyxy_to_xywh(mask_data["boxes"]).tolist()
        crop_boxes = box_xyxy_to_xywh(mask_data["crop_boxes"]).tolist()
        return [
            {
                "segmentation": segmentations[i],
                "area": area_from_rle(mask_data["rles"][i]),
                "bbox": bboxes[i],
                "predicted_iou": float(mask_data["iou_preds"][i]),
                "point_coords": [mask_data["points"][i].tolist()],
                "stability_score": float(mask_data["stability_score"][i]),
                "crop_box": crop_boxes[i],
            }
            for i in range(len(segmentations))
        ]

    def _generate_masks(self, image: np.ndarray, image_embedding: Optional[jax.Array]) -> MaskData:
        orig_size = image.shape[:2]
        boxes, layer_idxs = crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        for crop_box, layer_idx in zip(boxes, layer_idxs):
            features = image_embedding if layer_idx == 0 else None  # layer 0 is the whole image
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size, features))

        if len(boxes) > 1 and len(data):  # duplicates between crops: prefer smaller crops
            scores = np.float32(1) / box_area(data["crop_boxes"]).astype(np.float32)
            keep = batched_nms(
                data["boxes"].astype(np.float32), scores, np.zeros(len(data)), self.crop_nms_thresh
            )
            data.filter(keep)
        return data

    def _process_crop(
        self, image: np.ndarray, crop_box: List[int], crop_layer_idx: int, orig_size: Tuple[int, ...],
        features: Optional[jax.Array] = None,
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped_im = image[y0:y1, x0:x1, :]
        crop_size = cropped_im.shape[:2]
        input_size = self.transform.get_preprocess_shape(*crop_size, self.transform.target_length)
        if features is None:
            resized, _ = to_input_batch([cropped_im], self.transform, 1)
            features = encode_images(self.model, self.params, resized, np.asarray([input_size], np.int32))

        points = self.point_grids[crop_layer_idx] * np.array(crop_size)[None, ::-1]  # (N, 2) in the crop
        transformed = self.transform.apply_coords(points, crop_size).astype(np.float32)
        n, b = len(points), self.points_per_batch
        n_batches = -(-n // b)
        padded = np.zeros((n_batches * b, 2), np.float32)
        padded[:n] = transformed
        valid = np.arange(n_batches * b) < n
        iou_floor = np.float32(self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else -np.inf)

        def launch(i):
            rows = slice(i * b, (i + 1) * b)
            return predict_point_batch(
                self.model, self.params, features, padded[rows], valid[rows], iou_floor,
                float(self.stability_score_offset), input_size, crop_size, _mask_chunk(crop_size),
            )

        data = MaskData()
        pending = launch(0)
        for i in range(n_batches):  # the next batch runs on the device while this one is filtered
            outputs, pending = pending, (launch(i + 1) if i + 1 < n_batches else None)
            rows = slice(i * b, (i + 1) * b)
            data.cat(self._filter_batch(outputs, points[rows], valid[rows], crop_box, orig_size))

        if len(data):  # duplicates within this crop
            keep = batched_nms(
                data["boxes"].astype(np.float32), data["iou_preds"], np.zeros(len(data)),
                self.box_nms_thresh,
            )
            data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64), (len(data), 1))
        return data

    def _filter_batch(
        self, outputs, points: np.ndarray, valid: np.ndarray, crop_box: List[int], orig_size
    ) -> MaskData:
        """Host side of one batch: the official filters on (3B,) scores and boxes, then the
        surviving masks fetched and run-length encoded in the original frame."""
        iou_preds, stability, boxes, packed = outputs
        iou_preds, stability, boxes = (np.asarray(x) for x in (iou_preds, stability, boxes))
        per_point = len(iou_preds) // len(valid)
        keep = np.repeat(valid, per_point)
        if self.pred_iou_thresh > 0.0:
            keep &= iou_preds > np.float32(self.pred_iou_thresh)
        if self.stability_score_thresh > 0.0:
            keep &= stability >= np.float32(self.stability_score_thresh)
        orig_h, orig_w = orig_size
        keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        index = np.flatnonzero(keep)

        rles = []
        if len(index):
            gather = np.zeros(bucket(len(index)), np.int32)
            gather[: len(index)] = index
            packed = np.asarray(_take_rows(packed, gather))[: len(index)]
            x0, y0, x1, y1 = crop_box
            masks = np.unpackbits(packed, axis=-1, count=x1 - x0).view(bool)  # (k, h, w)
            rles = mask_to_rle(uncrop_masks(masks, crop_box, orig_h, orig_w))
        return MaskData(
            rles=rles,
            iou_preds=iou_preds[index],
            points=np.repeat(points, per_point, axis=0)[index],
            stability_score=stability[index],
            boxes=boxes[index].astype(np.int64),
        )

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fills holes and drops islands under `min_area` pixels in every mask, then box NMS
        preferring unchanged masks; edits and returns `mask_data`."""
        if len(mask_data["rles"]) == 0:
            return mask_data
        changed_masks, boxes, scores = {}, [], []
        for i, rle in enumerate(mask_data["rles"]):
            mask = rle_to_mask(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            if changed_holes or changed_islands:
                changed_masks[i] = mask
            boxes.append(batched_mask_to_box(mask))
            # unchanged masks score 1, so that NMS prefers them
            scores.append(0.0 if i in changed_masks else 1.0)
        boxes = np.stack(boxes).astype(np.int64)
        keep = batched_nms(boxes.astype(np.float32), np.asarray(scores, np.float32),
                           np.zeros(len(boxes)), nms_thresh)
        for i in keep:  # re-encode only the masks that changed
            if i in changed_masks:
                mask_data["rles"][i] = mask_to_rle(changed_masks[i][None])[0]
                mask_data["boxes"][i] = boxes[i]
        mask_data.filter(keep)
        return mask_data


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
