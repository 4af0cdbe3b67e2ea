"""The record layout every builder writes, and the checks records pass first.

One image per record; its masks as COCO compressed RLE at the image's size,
so that 100 masks of a 1500x2250 SA-1B image stay a few kB:

    image            (H, W, 3) uint8, stored as the source's JPEG / PNG bytes
    image_id         int64
    file_name        text (UTF-8; see `text_file_name`)
    masks/counts     (N,) COCO compressed RLE counts strings, size (H, W)
    masks/bbox       (N, 4) float32 XYWH, pixels
    masks/area       (N,) int64
    masks/point      (N, 2) float32 (x, y): a point inside the mask
    masks/id         (N,) int64
    masks/...        builder-specific fields (predicted_iou, iscrowd, parent...)

The input pipeline reads only the shared fields (plus `masks/iscrowd` where
present), so any builder's data trains the same way.
"""

import io
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sam_jax.data.bad_records import BadRecordError


def instance_features(extra_mask_fields: Optional[Dict[str, tfds.features.FeatureConnector]] = None):
    """The shared FeaturesDict, with builder-specific per-mask fields added."""
    masks = {
        "counts": tfds.features.Sequence(tfds.features.Text()),
        "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "area": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "point": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
        "id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    }
    masks.update(extra_mask_fields or {})
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "file_name": tfds.features.Text(),
            "masks": masks,
        }
    )


def text_file_name(name: str) -> str:
    """A file name as UTF-8 text for the record. A name that is not UTF-8 on disk reaches
    Python with surrogate escapes (and names the file correctly there); the record keeps
    its undecodable bytes as backslash escapes ("caf\\xe9.jpg") instead of failing."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def checked_image(data: Optional[bytes], where: str, expected_hw: Optional[Tuple[int, int]] = None):
    """Decodes image bytes fully and returns (bytes to store, (h, w)).

    RGB JPEG / PNG bytes are stored unchanged; grayscale, palette, CMYK and
    RGBA images are converted to RGB (alpha dropped) and stored as PNG. Raises
    BadRecordError for a missing, truncated or undecodable image, one that is
    not 8-bit, or one whose size disagrees with `expected_hw`.
    """
    if data is None:
        raise BadRecordError("missing_image", where, "image file is missing")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, mode = image.format, image.mode
            if mode in ("I", "I;16", "I;16B", "F"):
                raise BadRecordError("undecodable_image", where, f"image mode {mode} is not 8-bit; refusing it")
            if not (mode == "RGB" and fmt in ("JPEG", "PNG")):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                data = buffer.getvalue()
            h, w = image.height, image.width
    except BadRecordError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes.
        raise BadRecordError("undecodable_image", where, f"image cannot be decoded ({type(e).__name__}: {e})") from None
    if expected_hw is not None and (h, w) != tuple(int(v) for v in expected_hw):
        raise BadRecordError(
            "size_mismatch", where, f"image is {h}x{w} but its annotation says {expected_hw[0]}x{expected_hw[1]}"
        )
    return data, (h, w)
