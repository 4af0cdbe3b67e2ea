"""Reads one COCO-format instance segmentation JSON + image folder into records.

Works for COCO 2017 (`instances_<split>.json`), LVIS (images carry only a
`coco_url`) and any tool that exports COCO. `CocoReader` yields
(image_id, record) in image-id order, each record in the layout of
`features.instance_features` with these per-mask fields added:

    masks/category_id  (N,) int64
    masks/iscrowd      (N,) int64 0/1: crowd regions are kept and flagged; the
                       input pipeline leaves them out of training targets, as
                       COCO evaluation treats them as ignore regions. LVIS has
                       no `iscrowd`: 0.
    masks/coco_area    (N,) float32: the JSON's `area` (NaN where absent)

`masks/area`, `bbox` and `point` are computed from the decoded mask: pixel
area, tight XYWH box, and the point farthest from the mask's boundary. Masks
appear in the JSON's annotation order. Segmentations are polygons (one or
more flat [x0, y0, x1, y1, ...] lists, rasterised and merged exactly as
`pycocotools.coco.COCO.annToRLE` does), uncompressed RLE (`counts` a list;
COCO's crowd regions) or compressed RLE (`counts` a string); every mask is
stored as compressed counts at the image size.

Images without any annotation in the JSON (about 1k in COCO train2017) are
legitimate but useless for training: they are not yielded and are counted in
`images_without_annotations`, not reported as bad data.

Bad data goes through the `BadRecordPolicy` (reason keys in parentheses):
a JSON that cannot be parsed or lacks `images` / `annotations` always raises
(`corrupt_json`), since no record can be salvaged. Whole images are dropped for
a malformed or duplicated image entry (`malformed_image`, `duplicate_image_id`),
a missing, undecodable or wrongly sized image file (`missing_image`,
`undecodable_image`, `size_mismatch`) and when every annotation of the image
was dropped (`no_masks`). Single annotations are dropped for a malformed entry
(`malformed_annotation`), an unknown image id (`unknown_image`), a malformed
polygon or segmentation (`malformed_polygon`, `malformed_segmentation`), an
undecodable RLE (`undecodable_rle`), an RLE whose size is not the image's
(`rle_size_mismatch`) and an empty mask (`empty_mask`).

The whole JSON is held in memory while reading (several GB for COCO train2017
or LVIS train, as with pycocotools).
"""

import collections
import copy
import json
import math
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from etils import epath
from pycocotools import mask as mask_utils

from sam_jax.data import rle
from sam_jax.data.bad_records import BadRecordError, BadRecordPolicy
from sam_jax.data.features import checked_image, text_file_name
from sam_jax.data.masks import farthest_from_boundary

# Per-mask fields this reader adds to the shared layout, and their dtypes.
EXTRA_MASK_FIELDS = {"category_id": np.int64, "iscrowd": np.int64, "coco_area": np.float32}


def _is_int(value) -> bool:
    """A JSON integer that fits int64."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_number(value) -> bool:
    """A finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def load_json(json_path: epath.Path) -> dict:
    """Parses a COCO JSON; BadRecordError("corrupt_json") if it is not one."""
    salvage = "no record can be salvaged from it (raised with on_bad_record='skip' too)"
    try:
        data = json.loads(json_path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRecordError("corrupt_json", str(json_path), f"cannot be parsed as JSON ({e}); {salvage}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise BadRecordError("corrupt_json", str(json_path), f"is a JSON {kind}, not an object; {salvage}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            problem = "has no" if key not in data else "has a non-list"
            raise BadRecordError("corrupt_json", str(json_path), f"{problem} {key!r} list; {salvage}")
    return data


def _checked_polygons(segm: list, hw: Tuple[int, int], where: str) -> List[List[float]]:
    """Validates a list of flat polygons before pycocotools rasterises them."""
    h, w = hw
    if not segm:
        raise BadRecordError("malformed_polygon", where, "segmentation is an empty list of polygons")
    for i, polygon in enumerate(segm):
        if not isinstance(polygon, list):
            problem = f"is a {type(polygon).__name__}, not a list"
        elif len(polygon) % 2:
            problem = f"has an odd number ({len(polygon)}) of coordinates"
        elif len(polygon) < 6:
            problem = f"has {len(polygon) // 2} points; 3 are needed"
        elif not all(_is_number(v) for v in polygon):
            problem = "has non-numeric or non-finite coordinates"
        else:
            problem = None
        if problem:
            raise BadRecordError("malformed_polygon", where, f"polygon {i} {problem}")
        xs, ys = np.asarray(polygon[0::2], np.float64), np.asarray(polygon[1::2], np.float64)
        # pycocotools rasterises in int at 5x scale with buffers the size of
        # the perimeter: far-away points overflow or exhaust memory. Real
        # annotations stay within the image, give or take a pixel.
        if xs.min() < -w or xs.max() > 2 * w or ys.min() < -h or ys.max() > 2 * h:
            raise BadRecordError("malformed_polygon", where, f"polygon {i} has points far outside the {h}x{w} image")
    return segm


def _checked_size(size, hw: Tuple[int, int], where: str) -> None:
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise BadRecordError("undecodable_rle", where, f"RLE size {size!r} is not [height, width]")
    if tuple(size) != tuple(hw):
        raise BadRecordError(
            "rle_size_mismatch", where, f"RLE size is {size[0]}x{size[1]} but the image is {hw[0]}x{hw[1]}"
        )


def segmentation_to_mask(segm, hw: Tuple[int, int], where: str) -> np.ndarray:
    """A COCO `segmentation` (polygons, uncompressed or compressed RLE) -> (h, w) bool mask.

    Raises BadRecordError (naming `where`) for anything pycocotools would
    misread, crash on, or read out of bounds for.
    """
    h, w = int(hw[0]), int(hw[1])
    if isinstance(segm, list):
        rles = mask_utils.frPyObjects(_checked_polygons(segm, (h, w), where), h, w)
        encoded = mask_utils.merge(rles)
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        _checked_size(segm["size"], (h, w), where)
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                raise BadRecordError("undecodable_rle", where, "uncompressed RLE counts are not non-negative integers")
            if sum(counts) != h * w:
                problem = f"uncompressed RLE runs cover {sum(counts)} pixels, the {h}x{w} image has {h * w}"
                raise BadRecordError("undecodable_rle", where, problem)
            encoded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        elif isinstance(counts, str):
            rle.check_counts(counts, (h, w), where)  # also refuses non-ASCII
            encoded = {"size": [h, w], "counts": counts.encode("ascii")}
        else:
            problem = f"RLE counts is a {type(counts).__name__}, not a list or string"
            raise BadRecordError("undecodable_rle", where, problem)
    else:
        problem = "segmentation is neither a list of polygons nor an RLE with counts and size"
        raise BadRecordError("malformed_segmentation", where, problem)
    return mask_utils.decode(encoded).astype(bool)


def mask_fields(mask: np.ndarray) -> Tuple[bytes, np.ndarray, int, np.ndarray]:
    """(h, w) bool non-empty mask -> (counts, bbox XYWH (4,), area, point (2,))."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = np.array([xs[0], ys[0], xs[-1] + 1 - xs[0], ys[-1] + 1 - ys[0]], np.float32)
    return rle.encode(mask), bbox, int(mask.sum()), farthest_from_boundary(mask)


class CocoReader:
    """One COCO JSON + image folder; iterate for (image_id, record) in image-id order.

    The JSON is parsed and indexed on construction (raising for a corrupt
    JSON, and in "error" mode for the first bad image or annotation entry);
    image files are read and masks decoded during iteration.
    `images_without_annotations` is final after construction.
    """

    def __init__(self, json_path, image_dir, policy: BadRecordPolicy):
        self.json_path = epath.Path(json_path)
        self.image_dir = epath.Path(image_dir)
        self.policy = policy
        self.name = self.json_path.name
        data = load_json(self.json_path)
        self._images: Dict[int, Tuple[int, int, List[str]]] = {}  # id -> (h, w, candidate file names)
        self._annotations: Dict[int, List[dict]] = collections.defaultdict(list)  # those that passed indexing
        self._n_annotations: Dict[int, int] = collections.Counter()  # all that name the image
        dropped = self._index_images(data["images"])
        self._index_annotations(data["annotations"], dropped)
        self.images_without_annotations = sum(1 for i in self._images if i not in self._n_annotations)

    def _image_where(self, image_id, file_name: Optional[str] = None) -> str:
        return f"{self.name} image {image_id}" + (f" ({self.image_dir / file_name})" if file_name else "")

    def _annotation_where(self, ann, index: int) -> str:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        return f"{self.name} annotation {ann_id if _is_int(ann_id) else f'#{index} (no id)'} (image {image_id})"

    def _index_images(self, entries: list) -> set:
        """Fills self._images; returns the ids of image entries dropped as bad."""
        id_counts = collections.Counter(e["id"] for e in entries if isinstance(e, dict) and _is_int(e.get("id")))
        dropped = set()
        for index, entry in enumerate(entries):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            try:
                if not _is_int(image_id):
                    raise BadRecordError("malformed_image", f"{self.name} image entry #{index}", "has no integer id")
                where = self._image_where(image_id)
                if id_counts[image_id] > 1:
                    problem = f"{id_counts[image_id]} image entries share this id"
                    raise BadRecordError("duplicate_image_id", where, problem)
                h, w = entry.get("height"), entry.get("width")
                if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
                    problem = f"width {w!r} / height {h!r} are not positive integers"
                    raise BadRecordError("malformed_image", where, problem)
                self._images[image_id] = (h, w, self._file_candidates(entry, where))
            except BadRecordError as e:
                if _is_int(image_id):
                    dropped.add(image_id)
                self.policy.handle(e)
        return dropped

    @staticmethod
    def _file_candidates(entry: dict, where: str) -> List[str]:
        """Image file names relative to the image folder, tried in order.

        COCO gives `file_name`. LVIS gives only `coco_url`
        (http://images.cocodataset.org/<folder>/<name>.jpg): its basename, then
        <folder>/<basename>, so that an image folder holding train2017/ and
        val2017/ serves LVIS val, whose images come from both.
        """
        file_name = entry.get("file_name")
        if isinstance(file_name, str) and file_name:
            return [file_name]
        url = entry.get("coco_url")
        if isinstance(url, str) and url.rstrip("/"):
            parts = url.rstrip("/").split("/")
            return [parts[-1]] + ([f"{parts[-2]}/{parts[-1]}"] if len(parts) > 1 and parts[-2] else [])
        raise BadRecordError("malformed_image", where, "has neither a file_name nor a coco_url")

    def _index_annotations(self, annotations: list, dropped: set) -> None:
        for index, ann in enumerate(annotations):
            where = self._annotation_where(ann, index)
            try:
                if not (isinstance(ann, dict) and _is_int(ann.get("id")) and _is_int(ann.get("image_id"))):
                    problem = "is not an object with integer id and image_id"
                    raise BadRecordError("malformed_annotation", where, problem)
                image_id = ann["image_id"]
                if image_id in dropped:
                    continue  # counted with its image
                if image_id not in self._images:
                    problem = f"image id {image_id} is not among the JSON's images"
                    raise BadRecordError("unknown_image", where, problem)
                self._n_annotations[image_id] += 1
                if not _is_int(ann.get("category_id")):
                    problem = f"category_id {ann.get('category_id')!r} is not an integer"
                    raise BadRecordError("malformed_annotation", where, problem)
                iscrowd = ann.get("iscrowd", 0)
                if not (_is_int(iscrowd) and iscrowd in (0, 1)):
                    raise BadRecordError("malformed_annotation", where, f"iscrowd {iscrowd!r} is not 0 or 1")
                if "area" in ann and not _is_number(ann["area"]):
                    raise BadRecordError("malformed_annotation", where, f"area {ann['area']!r} is not a finite number")
                if "segmentation" not in ann:
                    raise BadRecordError("malformed_segmentation", where, "has no segmentation")
                self._annotations[image_id].append(ann)
            except BadRecordError as e:
                self.policy.handle(e)

    def parts(self, images_per_part: int) -> List["CocoReader"]:
        """The images to read, in id order, cut into readers of `images_per_part` images each.

        Each part holds only its images' entries and annotations and reports
        to a fresh policy of this reader's mode: reading the parts in order
        yields this reader's records and bad records (after the JSON's, which
        construction reported). For preparing on several workers.
        """
        if images_per_part < 1:
            raise ValueError(f"images_per_part must be at least 1, got {images_per_part}")
        ids = sorted(self._n_annotations)
        parts = []
        for start in range(0, len(ids), images_per_part):
            part = copy.copy(self)
            part.policy = BadRecordPolicy(self.policy.mode)
            chosen = ids[start : start + images_per_part]
            part._images = {i: self._images[i] for i in chosen}
            part._annotations = {i: self._annotations[i] for i in chosen if i in self._annotations}
            part._n_annotations = collections.Counter({i: self._n_annotations[i] for i in chosen})
            parts.append(part)
        return parts

    def __iter__(self) -> Iterator[Tuple[int, dict]]:
        for image_id in sorted(self._n_annotations):
            try:
                record = self._record(image_id)
            except BadRecordError as e:
                self.policy.handle(e)
                continue
            yield image_id, record

    def _read_image(self, image_id: int) -> Tuple[bytes, str, Tuple[int, int]]:
        h, w, candidates = self._images[image_id]
        for file_name in candidates:
            path = self.image_dir / file_name
            if path.is_file():
                data, _ = checked_image(path.read_bytes(), self._image_where(image_id, file_name), (h, w))
                return data, file_name, (h, w)
        tried = ", ".join(str(self.image_dir / c) for c in candidates)
        where = self._image_where(image_id, candidates[0])
        raise BadRecordError("missing_image", where, f"image file is missing (looked for {tried})")

    def _record(self, image_id: int) -> dict:
        annotations = self._annotations.get(image_id, [])
        n_bad = self._n_annotations[image_id] - len(annotations)
        if not annotations:
            raise BadRecordError("no_masks", self._image_where(image_id), f"all {n_bad} annotations were dropped")
        image, file_name, hw = self._read_image(image_id)
        fields = collections.defaultdict(list)
        for ann in annotations:
            where = f"{self.name} annotation {ann['id']} (image {image_id})"
            try:
                mask = segmentation_to_mask(ann["segmentation"], hw, where)
                if not mask.any():
                    raise BadRecordError("empty_mask", where, "mask has zero area")
            except BadRecordError as e:
                self.policy.handle(e)
                n_bad += 1
                continue
            counts, bbox, area, point = mask_fields(mask)
            fields["counts"].append(counts.decode("ascii"))
            fields["bbox"].append(bbox)
            fields["area"].append(area)
            fields["point"].append(point)
            fields["id"].append(ann["id"])
            fields["category_id"].append(ann["category_id"])
            fields["iscrowd"].append(ann.get("iscrowd", 0))
            fields["coco_area"].append(ann.get("area", math.nan))
        if not fields["counts"]:
            where = self._image_where(image_id, file_name)
            raise BadRecordError("no_masks", where, f"all {n_bad} annotations were dropped")
        masks = {
            "counts": fields["counts"],
            "bbox": np.stack(fields["bbox"]).astype(np.float32),
            "area": np.asarray(fields["area"], np.int64),
            "point": np.stack(fields["point"]).astype(np.float32),
            "id": np.asarray(fields["id"], np.int64),
        }
        masks.update({k: np.asarray(fields[k], dtype) for k, dtype in EXTRA_MASK_FIELDS.items()})
        return {"image": image, "image_id": image_id, "file_name": text_file_name(file_name), "masks": masks}
