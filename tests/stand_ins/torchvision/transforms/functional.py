"""The two torchvision functions `segment_anything.utils.transforms` imports (see ../../README.md)."""

import numpy as np
from PIL import Image


def to_pil_image(pic, mode=None):
    """torchvision.transforms.functional.to_pil_image for (H, W, 3) uint8 numpy input."""
    if not isinstance(pic, np.ndarray) or pic.dtype != np.uint8 or pic.ndim != 3 or pic.shape[2] != 3:
        raise NotImplementedError("stand-in handles only (H, W, 3) uint8 numpy images")
    return Image.fromarray(pic, mode or "RGB")


def resize(img, size, interpolation=None, max_size=None, antialias=True):
    """torchvision.transforms.functional.resize for a PIL image and size [h, w]: PIL bilinear."""
    if not isinstance(img, Image.Image) or len(size) != 2 or interpolation not in (None, Image.BILINEAR):
        raise NotImplementedError("stand-in handles only PIL images, [h, w] sizes and bilinear")
    h, w = size
    return img.resize((w, h), Image.BILINEAR)
