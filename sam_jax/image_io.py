"""Reading images for the command line: (H, W, 3) uint8 RGB, or one clear error.

Images are read the way the official `scripts/amg.py` reads them
(`cv2.imread(path)` then BGR -> RGB), so masks match what the official tools
would produce on the same file:

* 8-bit RGB is used as is; grayscale (L, 1-bit), palette (P) and other colour
  modes (CMYK, YCbCr, ...) are converted to RGB.
* An alpha channel (RGBA, LA, PA) is dropped: the colour channels are used as
  stored, not composited over a background.
* 16-bit images (grayscale or RGB) are reduced to 8 bits by keeping the high
  byte (value >> 8), as cv2.imread and Pillow do.
* 32-bit integer and floating-point images (modes I and F) have no fixed
  range, so they are refused: convert them to 8-bit first.
* The EXIF orientation tag is applied (as cv2.imread does), so masks line up
  with the image as viewers show it. Multi-frame files (GIF, TIFF) use the
  first frame.

Errors are `ImageError` (a ValueError) with a one-line message naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
_NO_RANGE = {"I": "32-bit integer", "F": "32-bit floating-point"}


class ImageError(ValueError):
    """An input file that cannot be used as an image; the message names the file."""


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (".jpg", ...) that Pillow can read."""
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def list_images(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(image files, other files) directly in `folder`, sorted by name.

    Image files are told by extension (those Pillow reads); hidden files
    (names starting with ".") and subfolders are left out of both lists.
    """
    extensions = image_extensions()
    images, others = [], []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        (images if path.suffix.lower() in extensions else others).append(path)
    return images, others


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Reads `path` as an (H, W, 3) uint8 RGB array; returns it and the file's Pillow mode."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as image:
            mode = image.mode
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
            return _to_rgb(image, mode, path), mode
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: too large to read safely ({err})") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({err})") from None


def _to_rgb(image: Image.Image, mode: str, path: Path) -> np.ndarray:
    if image.mode in _NO_RANGE:
        raise ImageError(
            f"{path}: {_NO_RANGE[image.mode]} image (mode {image.mode}) has no fixed range; "
            "convert it to 8-bit RGB first"
        )
    if image.mode in _SIXTEEN_BIT:
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's advice for palette transparency; alpha dropped next
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as err:
            raise ImageError(f"{path}: unsupported image mode {mode} ({err})") from None
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ImageError(f"{path}: unusable image of shape {array.shape} (mode {mode})")
    return np.ascontiguousarray(array)
