"""COCO box and mask AP, and recall, of the automatic mask generator's masks.

The automatic mask generator (`sam_jax.automatic_mask_generator`) segments a
whole image with no prompt from outside: a grid of point prompts, filtered by
predicted IoU and stability, deduplicated by box NMS. The SAM paper measures
these masks as object proposals (section 7.3, mask AR@1000 on LVIS); here
they are measured, per held-out image, against that image's ground-truth
masks as class-agnostic detections:

- COCO box AP (`COCOeval(iouType="bbox")`) and mask AP (`iouType="segm"`,
  the mask as compressed RLE), each mask scored by its predicted IoU, every
  detection category 1 and categories ignored (`useCats=0`), and COCO's
  limit of 100 detections per image raised to the most masks any image got,
  so that every generated mask counts. A mask's box is its tight XYWH box as
  pycocotools computes it (`mask.toBbox`, as `loadRes` does for mask results
  and as ground-truth boxes are); the generator's own "bbox" (the official
  code's, whose width and height are one pixel short) is not used.
- recall: the fraction of the non-crowd ground-truth masks whose best mask
  IoU with any of the image's generated masks is >= 0.5 (and >= 0.75); no
  one-to-one matching (one generated mask may cover two ground-truth masks),
  as a proposal's recall is counted. Also the mean of those best IoUs.
- how many masks the generator found per image, against the ground truth's.

Crowd regions (COCO `iscrowd`) are matched as COCOeval matches them (a
detection on one is ignored, not a false positive) and are not counted in
recall or in the ground-truth masks per image.

`score_masks` scores given records (one list per image, as `generate` returns
them), with no model; `evaluate_generator` runs a generator
(`SamAutomaticMaskGenerator(model, params, **settings.generator_options())`, or anything with
`generate(image)`) image by image and scores its masks, keeping each only as compressed RLE. `AmgSettings` are the generator options that the
`experiments.eval` command sets; the others keep the generator's defaults.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from sam_jax.data import rle
from sam_jax.evaluation.box_prompts import (
    COCO_MAX_DETECTIONS, DEFAULT_CATEGORY, STATS, GroundTruthBuilder, coco_mask_ap,
)
from sam_jax.evaluation.instances import Instances

RECALL_IOUS = (0.5, 0.75)  # a ground-truth mask counts as found at these mask IoUs


@dataclasses.dataclass(frozen=True)
class AmgSettings:
    """The `SamAutomaticMaskGenerator` options the protocol sets (official defaults)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88  # 0 disables
    stability_score_thresh: float = 0.95  # 0 disables
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0

    def __post_init__(self):
        for name, minimum in (("points_per_side", 1), ("points_per_batch", 1), ("crop_n_layers", 0)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    def generator_options(self) -> Dict[str, Any]:
        """Keyword arguments of `SamAutomaticMaskGenerator` for these settings, COCO RLE output."""
        return dict(dataclasses.asdict(self), output_mode="coco_rle")


@dataclasses.dataclass
class AmgResult:
    """COCO box and mask AP (STATS; -1 where COCO has no ground truth to measure, e.g. no
    large objects) and recall (-1 without non-crowd ground truth) over I images."""

    box_ap: Dict[str, float]
    mask_ap: Dict[str, float]
    recall: Dict[float, float]  # RECALL_IOUS -> fraction of non-crowd ground-truth masks found
    mean_best_iou: float  # mean over non-crowd ground-truth masks of the best generated mask's IoU
    masks_per_image: np.ndarray  # (I,) int64 generated masks
    ground_truth_per_image: np.ndarray  # (I,) int64 non-crowd ground-truth masks
    max_detections: int  # COCOeval's maxDets for every statistic

    @property
    def num_images(self) -> int:
        return int(self.masks_per_image.shape[0])

    def summary(self) -> Dict[str, Any]:
        found = self.masks_per_image
        return {
            "num_images": self.num_images,
            "num_masks": int(found.sum()),
            "masks_per_image": {"mean": float(found.mean()), "min": int(found.min()), "max": int(found.max())},
            "num_ground_truth": int(self.ground_truth_per_image.sum()),
            "ground_truth_per_image": float(self.ground_truth_per_image.mean()),
            "max_detections": self.max_detections,
            "box_ap": {name: float(self.box_ap[name]) for name in STATS},
            "mask_ap": {name: float(self.mask_ap[name]) for name in STATS},
            "recall": {f"{iou:g}": float(v) for iou, v in self.recall.items()},
            "mean_best_iou": float(self.mean_best_iou),
        }


def _compressed(segmentation: Any, size: tuple, where: str) -> Dict[str, Any]:
    """A record's segmentation ((H, W) bool mask, uncompressed RLE or COCO RLE, as the
    generator's output modes give it) -> COCO compressed RLE with str counts."""
    h, w = size
    if isinstance(segmentation, dict):
        if [int(v) for v in segmentation["size"]] != [h, w]:
            raise ValueError(f"{where}: mask size {list(segmentation['size'])} is not the image's {[h, w]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed
            counts = mask_utils.frPyObjects(segmentation, h, w)["counts"]
    else:
        mask = np.asarray(segmentation)
        if mask.shape != (h, w):
            raise ValueError(f"{where}: mask shape {mask.shape} is not the image's {(h, w)}")
        counts = rle.encode(mask.astype(bool))
    return {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _areas(rles: List[Dict[str, Any]]) -> np.ndarray:
    """pycocotools' `mask.area`, 255 RLEs at a time: under NumPy 2 it raises an OverflowError for
    256 or more (it builds a uint8 array holding their count), which an image's automatic masks
    reach with the filters open."""
    return np.concatenate([mask_utils.area(rles[i:i + 255]) for i in range(0, len(rles), 255)])


class _Scorer:
    """Accumulates images one at a time: ground truth, COCO results, best IoUs."""

    def __init__(self):
        self.ground_truth = GroundTruthBuilder()
        self.results: List[dict] = []
        self.masks_per_image: List[int] = []
        self.ground_truth_per_image: List[int] = []
        self.best_iou: List[np.ndarray] = []

    def add(self, records: Sequence[Dict[str, Any]], inst: Instances) -> None:
        annotations = self.ground_truth.add(inst)
        where = f"image {inst.image_id}"
        rles = [_compressed(r["segmentation"], inst.size, f"{where} mask {k}") for k, r in enumerate(records)]
        if rles:
            boxes, areas = mask_utils.toBbox(rles), _areas(rles)
        for k, (segmentation, record) in enumerate(zip(rles, records)):
            self.results.append({
                "image_id": int(inst.image_id),
                "category_id": DEFAULT_CATEGORY,
                "segmentation": segmentation,
                "bbox": [float(v) for v in boxes[k]],
                "area": float(areas[k]),
                "score": float(record["predicted_iou"]),
                "iscrowd": 0,
            })
        truth = [a["segmentation"] for a in annotations if not a["iscrowd"]]
        best = np.zeros(len(truth))
        if rles and truth:
            best = np.asarray(mask_utils.iou(rles, truth, [0] * len(truth))).reshape(len(rles), len(truth)).max(0)
        self.best_iou.append(best)
        self.masks_per_image.append(len(rles))
        self.ground_truth_per_image.append(len(truth))

    def result(self) -> AmgResult:
        if not self.masks_per_image:
            raise ValueError("no images to evaluate")
        dataset = self.ground_truth.dataset()
        max_detections = max(COCO_MAX_DETECTIONS, max(self.masks_per_image))
        # COCO's loadRes gives a box result the box's area, a mask result the mask's.
        boxes = [dict(r, area=r["bbox"][2] * r["bbox"][3]) for r in self.results]
        box_ap = coco_mask_ap(dataset, boxes, use_categories=False, max_detections=max_detections, iou_type="bbox")
        mask_ap = coco_mask_ap(dataset, self.results, use_categories=False, max_detections=max_detections)
        best = np.concatenate(self.best_iou)
        recall = {iou: float((best >= iou).mean()) if best.size else -1.0 for iou in RECALL_IOUS}
        return AmgResult(
            box_ap=box_ap, mask_ap=mask_ap, recall=recall,
            mean_best_iou=float(best.mean()) if best.size else -1.0,
            masks_per_image=np.asarray(self.masks_per_image, np.int64),
            ground_truth_per_image=np.asarray(self.ground_truth_per_image, np.int64),
            max_detections=max_detections,
        )


def score_masks(generated: Sequence[Sequence[Dict[str, Any]]], instances: Sequence[Instances]) -> AmgResult:
    """Scores I images' generated masks against their ground truth, with no model.

    Args:
      generated: per image, its records as `SamAutomaticMaskGenerator.generate` returns
        them; read are "segmentation" ((H, W) bool mask, uncompressed or COCO RLE at the
        image's size) and "predicted_iou" (the detection score).
      instances: the I images' ground truth, in the same order.
    """
    generated, instances = list(generated), list(instances)
    if len(generated) != len(instances):
        raise ValueError(f"{len(generated)} lists of generated masks for {len(instances)} images")
    scorer = _Scorer()
    for records, inst in zip(generated, instances):
        scorer.add(records, inst)
    return scorer.result()


def evaluate_generator(generator, instances: Iterable[Instances], progress: Optional[Any] = None) -> AmgResult:
    """Runs `generator.generate` (e.g. `AmgSettings.generator`) on every image at its
    original resolution and scores the masks (`score_masks`); only each mask's compressed
    RLE is kept. `progress` (e.g. tqdm) is updated per image."""
    scorer = _Scorer()
    for inst in instances:
        scorer.add(generator.generate(inst.image), inst)
        if progress is not None:
            progress.update(1)
    return scorer.result()
