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
`decode_image` reads an upload's bytes the same way (`sam-jax serve`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
_NO_RANGE = {"I": "32-bit integer", "F": "32-bit floating-point"}


class ImageError(ValueError):
    """An input file that cannot be used as an image; the message names the file."""


class ImageTooLargeError(ImageError):
    """An image of more pixels than a limit (or Pillow's decompression-bomb guard) allows."""


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
    return _decode(path, str(path))


def decode_image(data: bytes, name: str, max_pixels: Optional[int] = None) -> tuple[np.ndarray, str]:
    """`read_image` on a file's bytes (an upload); errors name `name`. With `max_pixels`,
    an image of more pixels is refused from its header, before it is decoded."""
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source, name: str, max_pixels: Optional[int] = None) -> tuple[np.ndarray, str]:
    try:
        with Image.open(source) as image:
            mode = image.mode
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{name}: {width}x{height} image is too large "
                                 f"({width * height:,} pixels; the limit is {max_pixels:,})")
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
            return _to_rgb(image, mode, name), mode
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: too large to read safely ({err})") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        raise ImageError(f"{name}: corrupt or truncated image ({err})") from None


def _to_rgb(image: Image.Image, mode: str, path: str) -> np.ndarray:
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
