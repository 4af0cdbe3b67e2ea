"""SA-1B files written from masks: the data engine's output, readable by the `sa1b` builder unchanged.

One image `<stem>` becomes a pair in an output folder, as SA-1B ships them:

    sa_<stem>.jpg (or .png)   the pixels the model saw
    sa_<stem>.json            {"image": {image_id, width, height, file_name},
                               "annotations": [{id, segmentation (COCO RLE), bbox XYWH, area,
                                                predicted_iou, point_coords [[x, y], ...],
                                                crop_box XYWH, stability_score, ...}, ...]}

The image file is the source file itself (hard-linked, else copied) when its
bytes decode to those pixels as they are (an RGB JPEG or PNG without an EXIF
rotation); any other image is stored as a lossless PNG of the RGB pixels, so
that the masks always lie on the stored image. `image_id` is a stable
31-bit number from the image file's content (SHA-256), so re-labelling an
image keeps its id. Both files are written under temporary names and renamed
into place, the JSON last: a JSON that exists has its image beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

PREFIX = "sa_"
# Keys every SA-1B annotation has (sa1b_reader checks them); records may carry more.
ANNOTATION_KEYS = ("id", "segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box",
                   "stability_score")
_EXIF_ORIENTATION = 0x0112


def stable_image_id(data: bytes) -> int:
    """A 31-bit image id from the image file's content (the same file, the same id). 31 bits,
    as the input pipeline carries ids in int32 (SA-1B's own ids are below 2**24); two images
    of a set share one with probability about n**2 / 2**32 (2e-4 for 1,000 images), which
    only an evaluation keyed by image id would notice."""
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big") >> 1


def json_name(stem: str) -> str:
    return f"{PREFIX}{stem}.json"


def annotation(record: dict[str, Any], annotation_id: int) -> dict[str, Any]:
    """An SA-1B annotation from a generator record (output_mode "coco_rle") or an accepted
    prompt's record with the same fields; extra fields (point_labels, box) are kept."""
    missing = [k for k in ANNOTATION_KEYS if k != "id" and k not in record]
    if missing:
        raise ValueError(f"mask record lacks {missing}; it needs {list(ANNOTATION_KEYS[1:])}")
    out = {"id": int(annotation_id)}
    out.update({k: plain(v) for k, v in record.items() if k != "id"})
    segmentation = out["segmentation"]
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str)):
        raise ValueError("segmentation must be a COCO compressed RLE {'size': [h, w], 'counts': str}")
    return out


def sa1b_record(image_id: int, file_name: str, height: int, width: int,
                annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON object of one SA-1B file."""
    return {"image": {"image_id": int(image_id), "width": int(width), "height": int(height),
                      "file_name": file_name},
            "annotations": list(annotations)}


def image_file(source: Optional[Path], data: Optional[bytes], pixels: np.ndarray) -> tuple[str, Optional[bytes]]:
    """(extension, bytes to write) for the stored image; bytes None: link or copy `source`.

    `pixels` (H, W, 3) uint8 are what the model saw; the source's own bytes are kept
    only when they decode to exactly that frame without a rotation."""
    raw = data if data is not None else (source.read_bytes() if source is not None else None)
    if raw is not None:
        try:
            with Image.open(io.BytesIO(raw)) as image:
                fmt, mode, size = image.format, image.mode, image.size
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # not readable as is: store the pixels
            fmt = None
        if fmt in ("JPEG", "PNG") and mode == "RGB" and orientation == 1 and size == (pixels.shape[1],
                                                                                       pixels.shape[0]):
            return (".jpg" if fmt == "JPEG" else ".png"), (None if data is None else data)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return ".png", buffer.getvalue()


def write_image(folder: Path, stem: str, *, source: Optional[Path] = None, data: Optional[bytes] = None,
                pixels: np.ndarray) -> str:
    """Writes the image `sa_<stem>.<ext>` into `folder` (atomically); returns its file name.

    The image comes from `source` (a file) or `data` (its bytes) when they hold exactly
    `pixels`, else from `pixels` (see `image_file`)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext, payload = image_file(source, data, pixels)
    image_name = f"{PREFIX}{stem}{ext}"
    for other in (".jpg", ".png"):  # a re-labelled image stored in another format before
        if other != ext and (folder / f"{PREFIX}{stem}{other}").exists():
            (folder / f"{PREFIX}{stem}{other}").unlink()
    if payload is None:
        _link_or_copy(source, folder / image_name)
    else:
        atomic_write(folder / image_name, payload)
    return image_name


def write_pair(folder: Path, stem: str, record_for: Callable[[str], dict], *, source: Optional[Path] = None,
               data: Optional[bytes] = None, pixels: np.ndarray) -> Path:
    """Writes `sa_<stem>.<ext>` and then `sa_<stem>.json` into `folder`; returns the JSON's path.

    record_for(image file name) -> the JSON object (see `sa1b_record`)."""
    image_name = write_image(folder, stem, source=source, data=data, pixels=pixels)
    json_path = folder / json_name(stem)
    atomic_write(json_path, dumps(record_for(image_name)).encode())
    return json_path


def remove_pair(folder: Path, stem: str) -> None:
    """Removes `sa_<stem>.json` and its image, the JSON first (an image left alone by a crash
    is reported by the reader as `missing_annotation`, naming it)."""
    for suffix in (".json", ".jpg", ".png"):
        (folder / f"{PREFIX}{stem}{suffix}").unlink(missing_ok=True)


def dumps(record: dict[str, Any]) -> str:
    """An SA-1B JSON object as text (numpy values made plain)."""
    return json.dumps(plain(record))


def read_record(path: Path) -> dict[str, Any]:
    """An SA-1B JSON written by `write_pair` (or SA-1B itself)."""
    return json.loads(Path(path).read_text())


def atomic_write(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def _link_or_copy(source: Path, target: Path) -> None:
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, temp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(source, temp)
        os.replace(temp, target)
    finally:
        if temp.exists():
            temp.unlink()


def plain(value: Any) -> Any:
    """numpy values (scalars, arrays) and bytes, also inside dicts and lists -> JSON-ready Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def stems_in(folder: Path) -> Iterable[str]:
    """The stems of the SA-1B JSONs in `folder` (`sa_<stem>.json` -> `<stem>`)."""
    if not folder.is_dir():
        return []
    return sorted(p.name[len(PREFIX):-len(".json")] for p in folder.glob(f"{PREFIX}*.json"))
