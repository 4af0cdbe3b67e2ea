"""SA-1B read from local files: `sa_*.tar` shards (streamed) and extracted folders.

Each image is a pair `sa_<id>.jpg` + `sa_<id>.json` (the official layout; an
`sa_<id>.png` image is read too: the data engine's lossless images, see
`sa1b_writer`). The JSON holds `image` {image_id, width, height, file_name} and `annotations`,
each a COCO compressed RLE mask with its bbox, area, predicted_iou,
stability_score, point_coords and crop_box). `iter_examples(manual_dir,
policy)` yields `(key, example)` in the shared layout of `features.py`, key
the image's file name; per-mask fields besides the shared ones:

    masks/predicted_iou    (N,) float32
    masks/stability_score  (N,) float32
    masks/crop_box         (N, 4) float32 XYWH, pixels

`masks/point` is the first of the annotation's `point_coords`; `masks/area` is
the pixel count of the RLE itself (SA-1B's JSON area is the same number,
computed by pycocotools; the RLE is what training uses).

Tars are read as a stream (`mode="r|*"`: no seeks, never the whole tar in
memory); a member waits in a small dict only until its partner arrives (jpg
and json may come in either order).
"""

import json
import math
import os
import posixpath
import tarfile
from typing import IO, Dict, Iterator, List, Optional, Tuple

import numpy as np

from sam_jax.data import rle
from sam_jax.data.bad_records import BadRecordError, BadRecordPolicy
from sam_jax.data.features import checked_image, text_file_name

_PREFIX = "sa_"
_IMAGE_EXTENSIONS = (".jpg", ".png")
_IMAGE_KEYS = ("image_id", "width", "height", "file_name")
_ANNOTATION_KEYS = (
    "id", "segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box", "stability_score"
)
Example = Dict[str, object]


def find_sources(manual_dir: str) -> List[Tuple[str, str]]:
    """The sources under `manual_dir` in reading order, as (kind, relative path).

    kind "tar": one `sa_*.tar` file; kind "dir": one directory holding loose
    `sa_*.jpg` / `sa_*.json` files (its subdirectories are sources of their
    own). Sorted by relative path, so the order does not depend on the file
    system.
    """
    sources = []
    for root, dirs, files in os.walk(manual_dir):
        dirs.sort()
        rel_root = os.path.relpath(root, manual_dir)
        rel_root = "" if rel_root == "." else rel_root
        loose = False
        for name in files:
            if not name.startswith(_PREFIX):
                continue
            if name.endswith(".tar"):
                sources.append(("tar", os.path.join(rel_root, name)))
            elif name.endswith((".jpg", ".json")):
                loose = True
        if loose:
            sources.append(("dir", rel_root))
    return sorted(sources, key=lambda s: (s[1], s[0]))


def iter_examples(manual_dir: str, policy: BadRecordPolicy) -> Iterator[Tuple[str, Example]]:
    """Every valid SA-1B image under `manual_dir`, tars and extracted folders alike."""
    sources = find_sources(manual_dir)
    if not sources:
        raise FileNotFoundError(f"no sa_*.tar files and no sa_*.jpg / sa_*.json files under {manual_dir}")
    seen: Dict[str, str] = {}  # image file name -> where it was first read
    for kind, rel in sources:
        path = os.path.join(manual_dir, rel)
        if kind == "tar":
            with open(path, "rb") as f:
                yield from iter_tar(f, rel, policy, seen)
        else:
            yield from iter_folder(path, rel, policy, seen)


def iter_tar(
    fileobj: IO[bytes], tar_name: str, policy: BadRecordPolicy, seen: Optional[Dict[str, str]] = None
) -> Iterator[Tuple[str, Example]]:
    """Valid images of one SA-1B tar read from `fileobj` as a stream (never seeks).

    `tar_name` names the tar in error messages ("sa_000000.tar:sa_12.json").
    Images and annotations are paired by path without extension; a jpg or json
    whose partner never arrives is reported once the tar has been read.
    """
    pending: Dict[str, Dict[str, object]] = {}
    seen = {} if seen is None else seen
    last = "its first member"
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndNotingTarInfo) as tar:
            while True:
                member = tar.next()
                if member is None:
                    # tarfile also stops quietly when the stream ends at (or inside) a
                    # header; only the zero-block marker means the tar is complete.
                    if not isinstance(getattr(tar, "end_of_headers", None), tarfile.EOFHeaderError):
                        raise tarfile.ReadError("it ends without the end-of-archive marker")
                    break
                tar.members = []  # TarFile keeps every header it has read; a stream needs none of them.
                name = member.name[2:] if member.name.startswith("./") else member.name
                stem, ext = posixpath.splitext(name)
                if not (member.isfile() and posixpath.basename(stem).startswith(_PREFIX)
                        and ext in _IMAGE_EXTENSIONS + (".json",)):
                    continue
                data = tar.extractfile(member).read()
                last = name
                entry = pending.setdefault(stem, {"file_name": posixpath.basename(stem) + ".jpg"})
                if not _add_member(entry, posixpath.basename(name), ext, data, f"{tar_name}:{name}", policy):
                    continue
                if ".jpg" in entry and ".json" in entry:
                    del pending[stem]
                    yield from _pair_examples(entry, policy, seen)
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated download, bad gzip stream...
        policy.handle(BadRecordError("corrupt_tar", tar_name, f"tar is truncated or corrupt after {last}; "
                                     f"the rest of it is not read ({type(e).__name__}: {e})"))
    for stem in sorted(pending):
        if not pending[stem].get("bad"):
            yield from _pair_examples(pending[stem], policy, seen)


class _EndNotingTarInfo(tarfile.TarInfo):
    """Notes on the TarFile why reading its headers stopped (see iter_tar)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.end_of_headers = e
            raise


def iter_folder(
    path: str, rel: str, policy: BadRecordPolicy, seen: Optional[Dict[str, str]] = None
) -> Iterator[Tuple[str, Example]]:
    """Valid images among the loose `sa_*.jpg` (`.png`) / `sa_*.json` files of one directory (not recursive)."""
    seen = {} if seen is None else seen
    stems: Dict[str, Dict[str, object]] = {}
    for name in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(name)
        if (name.startswith(_PREFIX) and ext in _IMAGE_EXTENSIONS + (".json",)
                and os.path.isfile(os.path.join(path, name))):
            stems.setdefault(stem, {"file_name": stem + ".jpg"}).setdefault("names", []).append(name)
    for stem in sorted(stems):
        entry = stems[stem]
        complete = True
        for name in entry.pop("names"):
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
            where = os.path.join(rel, name) if rel else name
            complete &= _add_member(entry, name, os.path.splitext(name)[1], data, where, policy)
        if complete:
            yield from _pair_examples(entry, policy, seen)


def _add_member(entry: Dict[str, object], name: str, ext: str, data: bytes, where: str,
                policy: BadRecordPolicy) -> bool:
    """Files the member into its pair: the JSON under ".json", the image (jpg or png) under
    ".jpg"; a second image of one stem is a bad record (False: the pair is not read)."""
    key = ".json" if ext == ".json" else ".jpg"
    if key == ".jpg" and ".jpg" in entry:
        policy.handle(BadRecordError("duplicate_image", where, f"two images for one annotation file: "
                                     f"{entry['.jpg where']} and {name}"))
        entry["bad"] = True
        return False
    entry[key] = data
    entry[key + " where"] = where
    if key == ".jpg":
        entry["file_name"] = name
    return not entry.get("bad", False)


def _pair_examples(entry: Dict[str, object], policy: BadRecordPolicy, seen: Dict[str, str]):
    """Zero or one (key, example) from a jpg / json pair; bad records go to `policy`."""
    try:
        if ".json" not in entry:
            raise BadRecordError("missing_annotation", entry[".jpg where"], "image has no sa_*.json annotation file")
        json_where = entry[".json where"]
        jpg_where = entry.get(".jpg where", json_where[: -len(".json")] + ".jpg")
        file_name = entry["file_name"]
        if file_name in seen:
            raise BadRecordError("duplicate_image", jpg_where, f"{file_name} was already read from {seen[file_name]}")
        example = parse_record(entry[".json"], entry.get(".jpg"), file_name, json_where, jpg_where, policy)
    except BadRecordError as e:
        policy.handle(e)
        return
    seen[file_name] = jpg_where
    yield file_name, example


def parse_record(
    json_bytes: bytes,
    jpg_bytes: Optional[bytes],
    file_name: str,
    json_where: str,
    jpg_where: str,
    policy: BadRecordPolicy,
) -> Example:
    """One SA-1B image and its annotation file -> an example in the shared layout.

    Raises BadRecordError for a bad image record (corrupt JSON, missing or bad
    image, no valid mask left); bad masks go to `policy` one by one (raised in
    "error" mode, dropped and counted in "skip" mode).
    """
    image_info, annotations = _parsed_json(json_bytes, json_where)
    if posixpath.basename(image_info["file_name"]) != file_name:
        raise BadRecordError(
            "corrupt_json", json_where, f"image.file_name is {image_info['file_name']!r}, expected {file_name!r}"
        )
    hw = (image_info["height"], image_info["width"])
    image_bytes, _ = checked_image(jpg_bytes, jpg_where, hw)

    kept, areas = [], []
    for index, ann in enumerate(annotations):
        where = f"{json_where} annotation {index} (id {ann['id']})"
        try:
            areas.append(_checked_mask_area(ann, hw, where))
            kept.append(ann)
        except BadRecordError as e:
            policy.handle(e)
    if not kept:
        what = "all its masks are bad" if annotations else "it has no annotations"
        raise BadRecordError("no_masks", json_where, f"no usable mask: {what}")

    def floats(key, shape):
        return np.asarray([ann[key] for ann in kept], np.float32).reshape(shape)

    return {
        "image": image_bytes,
        "image_id": image_info["image_id"],
        "file_name": text_file_name(file_name),
        "masks": {
            "counts": [ann["segmentation"]["counts"] for ann in kept],
            "bbox": floats("bbox", (-1, 4)),
            "area": np.asarray(areas, np.int64),
            "point": np.asarray([ann["point_coords"][0] for ann in kept], np.float32).reshape(-1, 2),
            "id": np.asarray([ann["id"] for ann in kept], np.int64),
            "predicted_iou": floats("predicted_iou", (-1,)),
            "stability_score": floats("stability_score", (-1,)),
            "crop_box": floats("crop_box", (-1, 4)),
        },
    }


def _checked_mask_area(ann: dict, hw: Tuple[int, int], where: str) -> int:
    """The mask's pixel area; BadRecordError for a wrong size, undecodable RLE or empty mask."""
    segmentation = ann["segmentation"]
    if tuple(segmentation["size"]) != hw:
        h, w = segmentation["size"]
        raise BadRecordError("mask_size_mismatch", where, f"mask is {h}x{w} but its image is {hw[0]}x{hw[1]}")
    area = rle.check_counts(segmentation["counts"], hw, where)
    if area == 0:
        raise BadRecordError("empty_mask", where, "mask has zero area")
    return area


def _parsed_json(json_bytes: bytes, where: str):
    """(image info, annotations) of an SA-1B JSON; BadRecordError("corrupt_json") unless it has the official shape."""
    try:
        record = json.loads(json_bytes)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise BadRecordError("corrupt_json", where, f"annotation file is not valid JSON ({e})") from None

    def fail(what):
        raise BadRecordError("corrupt_json", where, f"annotation file is corrupt: {what}")

    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        fail("no 'image' object")
    if not isinstance(record.get("annotations"), list):
        fail("no 'annotations' list")
    image_info = record["image"]
    missing = [k for k in _IMAGE_KEYS if k not in image_info]
    if missing:
        fail(f"image lacks {missing}")
    if not (_is_int64(image_info["image_id"]) and isinstance(image_info["file_name"], str)):
        fail("image.image_id must be an integer and image.file_name a string")
    if not all(_is_int64(image_info[k]) and image_info[k] > 0 for k in ("width", "height")):
        fail(f"image size must be positive integers, got {image_info['width']!r}x{image_info['height']!r}")

    for index, ann in enumerate(record["annotations"]):
        if not isinstance(ann, dict):
            fail(f"annotation {index} is not an object")
        label = f"annotation {index} (id {ann.get('id')})"
        missing = [k for k in _ANNOTATION_KEYS if k not in ann]
        if missing:
            fail(f"{label} lacks {missing}")
        seg = ann["segmentation"]
        problem = None
        if not _is_int64(ann["id"]):
            problem = "id is not a 64-bit integer"
        elif not (isinstance(seg, dict) and isinstance(seg.get("counts"), str)):
            problem = "segmentation is not a compressed RLE {'size', 'counts': str}"
        elif not (isinstance(seg.get("size"), list) and len(seg["size"]) == 2 and all(map(_is_int64, seg["size"]))):
            problem = "segmentation.size is not [h, w]"
        elif not (_is_numbers(ann["bbox"], 4) and _is_numbers(ann["crop_box"], 4)):
            problem = "bbox and crop_box must be 4 finite numbers"
        elif not all(_is_numbers([ann[k]], 1) for k in ("area", "predicted_iou", "stability_score")):
            problem = "area, predicted_iou and stability_score must be finite numbers"
        elif not (isinstance(ann["point_coords"], list) and ann["point_coords"]
                  and _is_numbers(ann["point_coords"][0], 2)):
            problem = "point_coords must be [[x, y], ...] with at least one point"
        if problem:
            fail(f"{label} {problem}")
    return image_info, record["annotations"]


def _is_int64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_numbers(values, n: int) -> bool:
    """True for a list of `n` finite ints / floats (bools refused)."""
    return (
        isinstance(values, list)
        and len(values) == n
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )
