"""COCO mask AP of SAM prompted with boxes: the paper's box-prompted instance segmentation.

The SAM paper (section 7.4) measures zero-shot instance segmentation as COCO
mask AP of the masks SAM predicts from a detector's boxes (ViTDet there):
each box is one prompt, SAM answers with a single mask (`multimask_output=
False`), and the masks are scored with pycocotools' `COCOeval(iouType=
"segm")`. The boxes come either from a detector's COCO results file
(`read_detections`; a mask keeps its detection's score and category, and
matching is per category as in COCO) or from the ground truth (every non-crowd
mask's box, an upper bound free of detection errors; a mask's score is SAM's
predicted IoU, and matching ignores categories).

Images are encoded `batch_images` at a time with `SamBatchPredictor` (or
anything with its `set_images` / `predict_batch`); masks (P, H, W) come back
at each image's original resolution and are kept only as COCO compressed
RLE. An image with no box is not encoded; its ground truth still counts.
With ground-truth boxes every mask counts: COCO's limit of 100 detections per
image is raised to the most boxes in an image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import warnings
from typing import Any, Collection, Dict, Iterable, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam_jax.data import rle
from sam_jax.evaluation.instances import Instances

BOX_SOURCES = ("ground_truth", "detections")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
COCO_MAX_DETECTIONS = 100  # COCO's per-image (per-category) limit
DEFAULT_CATEGORY = 1  # for data sets without categories
_DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


@dataclasses.dataclass
class Detections:
    """One image's K detector boxes, in its original pixels."""

    boxes: np.ndarray  # (K, 4) float32 XYXY
    scores: np.ndarray  # (K,) float32
    category_ids: np.ndarray  # (K,) int64

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclasses.dataclass
class BoxResult:
    """COCO mask AP (-1 where COCO has no ground truth to measure, e.g. no large objects)."""

    stats: Dict[str, float]  # STATS -> value
    num_images: int
    num_boxes: int  # prompts given to SAM
    box_source: str  # "ground_truth" or "detections"
    max_detections: int = COCO_MAX_DETECTIONS  # COCOeval's maxDets for every statistic

    def summary(self) -> Dict[str, Any]:
        return {
            "box_source": self.box_source,
            "num_images": self.num_images,
            "num_boxes": self.num_boxes,
            "max_detections": self.max_detections,
            "mask_ap": {name: float(self.stats[name]) for name in STATS},
        }


def _encode(masks: np.ndarray) -> List[str]:
    """(N, H, W) bool -> N compressed RLE counts strings."""
    return [rle.encode(m).decode("ascii") for m in masks]


def _ground_truth_entries(inst: Instances, first_id: int) -> tuple[dict, List[dict]]:
    """One image's COCO image entry and annotations, numbered from `first_id`."""
    h, w = inst.size
    image = {"id": int(inst.image_id), "height": h, "width": w, "file_name": inst.file_name}
    annotations = [
        {
            "id": first_id + k,
            "image_id": int(inst.image_id),
            "category_id": int(inst.category_ids[k]),
            "segmentation": {"size": [h, w], "counts": counts},
            "area": float(inst.masks[k].sum()),
            "bbox": [float(v) for v in inst.boxes[k]],
            "iscrowd": int(inst.iscrowd[k]),
        }
        for k, counts in enumerate(_encode(inst.masks))
    ]
    return image, annotations


class GroundTruthBuilder:
    """Accumulates images one at a time into a COCO data set dict."""

    def __init__(self):
        self.images: List[dict] = []
        self.annotations: List[dict] = []
        self.category_ids: set = set()
        self._image_ids: set = set()

    def add(self, inst: Instances) -> List[dict]:
        """Adds one image; returns its annotations."""
        if int(inst.image_id) in self._image_ids:
            raise ValueError(f"image_id {inst.image_id} occurs twice")
        self._image_ids.add(int(inst.image_id))
        # COCOeval marks a match by the ground truth's annotation id, so ids must be nonzero
        # (data sets such as sam_synthetic number masks from 0 within each image).
        image, annotations = _ground_truth_entries(inst, len(self.annotations) + 1)
        self.images.append(image)
        self.annotations.extend(annotations)
        self.category_ids.update(int(c) for c in inst.category_ids)
        return annotations

    def dataset(self) -> dict:
        categories = sorted(self.category_ids) or [DEFAULT_CATEGORY]
        return {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": c, "name": str(c)} for c in categories],
        }


def coco_ground_truth(instances: Sequence[Instances]) -> dict:
    """A COCO data set dict of the instances' masks (crowd regions included, as iscrowd=1);
    annotation ids are renumbered 1, 2, ... in order."""
    builder = GroundTruthBuilder()
    for inst in instances:
        builder.add(inst)
    return builder.dataset()


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_int(value: Any, where: str, key: str) -> int:
    if _is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{where}: {key} must be an integer, got {_short(value)}")


def read_detections(path: str, image_ids: Optional[Collection[int]] = None) -> Dict[int, Detections]:
    """A COCO results file (a JSON list of {"image_id", "category_id", "bbox": [x, y, w, h],
    "score"}) -> Detections of each image that has any; given `image_ids`, every image_id
    must be among them.

    Raises FileNotFoundError for a missing file and a one-line ValueError naming the
    entry and the problem for anything else.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detections file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"detections file {path} is not JSON: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(
            f"detections file {path} must hold a JSON list of detections (COCO results format), "
            f"not a JSON {type(entries).__name__}"
        )
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    per_image: Dict[int, List[tuple]] = {}
    for k, entry in enumerate(entries):
        where = f"detections file {path}: entry {k}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object but {_short(entry)}")
        missing = [key for key in _DETECTION_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{where} has no {', '.join(repr(m) for m in missing)}")
        image_id = _as_int(entry["image_id"], where, "image_id")
        category_id = _as_int(entry["category_id"], where, "category_id")
        bbox, score = entry["bbox"], entry["score"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {_short(bbox)}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise ValueError(f"{where}: bbox width and height must be > 0, got {_short(bbox)}")
        if not (_is_number(score) and math.isfinite(score)):
            raise ValueError(f"{where}: score must be a finite number, got {_short(score)}")
        if wanted is not None and image_id not in wanted:
            raise ValueError(f"{where}: image_id {image_id} is not among the {len(wanted)} evaluated images")
        x, y, w, h = (float(v) for v in bbox)
        per_image.setdefault(image_id, []).append((x, y, x + w, y + h, float(score), category_id))
    return {
        image_id: Detections(
            boxes=np.array([r[:4] for r in rows], np.float32).reshape(-1, 4),
            scores=np.array([r[4] for r in rows], np.float32),
            category_ids=np.array([r[5] for r in rows], np.int64),
        )
        for image_id, rows in per_image.items()
    }


@dataclasses.dataclass
class _Prompted:
    """One image's boxes to prompt: (P, 4) XYXY, (P,) detection scores (None: use SAM's
    predicted IoU), (P,) categories."""

    image_id: int
    image: np.ndarray
    boxes: np.ndarray
    scores: Optional[np.ndarray]
    category_ids: np.ndarray


def _prompts(inst: Instances, detections: Optional[Dict[int, Detections]]) -> _Prompted:
    if detections is None:
        keep = ~np.asarray(inst.iscrowd, bool)
        xywh = np.asarray(inst.boxes, np.float32)[keep].reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        return _Prompted(int(inst.image_id), inst.image, boxes, None, np.asarray(inst.category_ids)[keep])
    d = detections.get(int(inst.image_id))
    if d is None:
        return _Prompted(int(inst.image_id), inst.image, np.zeros((0, 4), np.float32), None, np.zeros(0, np.int64))
    return _Prompted(int(inst.image_id), inst.image, d.boxes, d.scores, d.category_ids)


def _predict(predictor, batch: List[_Prompted]) -> List[dict]:
    """SAM's single mask for every box of every image -> COCO results (RLE, score, area)."""
    predictor.set_images([p.image for p in batch])
    outputs = predictor.predict_batch([{"boxes": p.boxes} for p in batch], multimask_output=False)
    results = []
    for p, (masks, iou, _) in zip(batch, outputs):
        masks, iou = np.asarray(masks), np.asarray(iou)
        expected = (len(p.boxes), 1) + p.image.shape[:2]
        if masks.shape != expected:
            raise ValueError(f"image {p.image_id}: predictor returned masks {masks.shape}, expected {expected}")
        masks = masks[:, 0]
        scores = p.scores if p.scores is not None else iou[:, 0]
        h, w = masks.shape[1:]
        for counts, mask, score, category in zip(_encode(masks), masks, scores, p.category_ids):
            results.append({
                "image_id": p.image_id,
                "category_id": int(category),
                "segmentation": {"size": [h, w], "counts": counts},
                "area": float(mask.sum()),
                "score": float(score),
                "iscrowd": 0,
            })
    return results


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_mask_ap(ground_truth: dict, results: List[dict], use_categories: bool,
                 max_detections: int = COCO_MAX_DETECTIONS, iou_type: str = "segm") -> Dict[str, float]:
    """COCOeval(iouType="segm") of results (dicts with image_id, category_id, segmentation,
    area, score) against a COCO data set dict -> STATS, as COCOeval.summarize computes them
    (which is tied to maxDets 100, so they are read here from eval["precision"]).
    iou_type="bbox": box AP instead, of the results' "bbox" (XYWH) against the ground truth's."""
    gt = _coco(ground_truth)
    annotations = [dict(r, id=k + 1) for k, r in enumerate(results)]  # nonzero ids, as loadRes
    dt = _coco({"images": ground_truth["images"], "categories": ground_truth["categories"],
                "annotations": annotations})
    evaluator = COCOeval(gt, dt, iouType=iou_type)
    evaluator.params.useCats = int(use_categories)
    evaluator.params.maxDets = [1, 10, int(max_detections)]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    p = evaluator.params
    precision = evaluator.eval["precision"]  # (iou thresholds, recall thresholds, categories, areas, maxDets)

    def average(iou: Optional[float] = None, area: str = "all") -> float:
        s = precision[:, :, :, p.areaRngLbl.index(area), len(p.maxDets) - 1]
        if iou is not None:
            s = s[np.isclose(p.iouThrs, iou)]
        s = s[s > -1]
        return float(s.mean()) if s.size else -1.0

    return {"AP": average(), "AP50": average(0.5), "AP75": average(0.75),
            "APs": average(area="small"), "APm": average(area="medium"), "APl": average(area="large")}


def evaluate_boxes(predictor, instances: Iterable[Instances], detections: Optional[Dict[int, Detections]] = None,
                   batch_images: int = 8, progress: Optional[Any] = None) -> BoxResult:
    """COCO mask AP of SAM prompted with each image's boxes: the ground-truth boxes of its
    non-crowd masks (detections None) or its detections. `predictor` has SamBatchPredictor's
    set_images / predict_batch; `progress` (e.g. tqdm) is updated per image."""
    if not isinstance(batch_images, int) or batch_images < 1:
        raise ValueError(f"batch_images must be an int >= 1, got {batch_images!r}")
    ground_truth = GroundTruthBuilder()
    results: List[dict] = []
    pending: List[_Prompted] = []
    num_images = num_boxes = most_boxes = 0

    def flush():
        results.extend(_predict(predictor, pending))
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    for inst in instances:
        ground_truth.add(inst)
        prompted = _prompts(inst, detections)
        num_images += 1
        num_boxes += len(prompted.boxes)
        most_boxes = max(most_boxes, len(prompted.boxes))
        if len(prompted.boxes) == 0:  # every set image needs prompts: this one is not encoded
            if progress is not None:
                progress.update(1)
            continue
        pending.append(prompted)
        if len(pending) == batch_images:
            flush()
    if pending:
        flush()
    if num_images == 0:
        raise ValueError("no images to evaluate")
    dataset = ground_truth.dataset()
    if detections is None:
        # One mask per ground-truth box: COCO's 100 per image would drop the least
        # confident masks of crowded images (SA-1B averages ~100 masks an image).
        max_detections = max(COCO_MAX_DETECTIONS, most_boxes)
    else:
        max_detections = COCO_MAX_DETECTIONS
        # COCOeval ignores detections of categories without ground truth; all of them is a mismatch.
        detected = {r["category_id"] for r in results}
        known = {c["id"] for c in dataset["categories"]}
        if detected and not detected & known:
            warnings.warn(f"no detection category {sorted(detected)[:10]} is a ground-truth category "
                          f"{sorted(known)[:10]}: every detection is ignored", stacklevel=2)
    stats = coco_mask_ap(dataset, results, use_categories=detections is not None, max_detections=max_detections)
    return BoxResult(stats, num_images, num_boxes, BOX_SOURCES[detections is not None], max_detections)
