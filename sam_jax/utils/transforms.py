"""Images, points and boxes to the model's input frame (the official `utils.transforms`).

`ResizeLongestSide` resizes an image with PIL bilinear (what the official code
gets through torchvision on a PIL image) so that its longest side is
`target_length`; new side = int(old * target / longest + 0.5). Points and
boxes are scaled per axis by the same factors. `as_rgb` checks an image as
every front end takes it; `to_input_batch` resizes images of any sizes and
zero-pads them into one square batch for `modeling.encode_images`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


class ResizeLongestSide:
    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) after scaling the longest side to `long_side_length`, rounded half up."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H', W', 3) uint8 with max(H', W') = target_length."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image; got {image.dtype} {image.shape}")
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) pixel coords in an image of `original_size` (H, W) -> input frame, float64."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(B, 4) XYXY boxes -> input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)


def as_rgb(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Validates an (H, W, 3) uint8 image in "RGB" or "BGR"; returns it as contiguous RGB."""
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR'; got {image_format!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"expected an (H, W, 3) uint8 image; got {image.dtype} array of shape "
            f"{image.shape} (convert grayscale or RGBA images to RGB first)"
        )
    return np.ascontiguousarray(image[..., ::-1] if image_format == "BGR" else image)


def pad_to_square(images: Sequence[np.ndarray], size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(H_i, W_i, 3) images already in the input frame (H_i, W_i <= size) -> a zero-padded
    (batch_size, size, size, 3) batch of their dtype and the (batch_size, 2) valid sizes;
    rows past the images are blank, size (0, 0)."""
    batch = np.zeros((batch_size, size, size, 3), images[0].dtype)
    sizes = np.zeros((batch_size, 2), np.int32)
    for i, x in enumerate(images):
        if x.ndim != 3 or x.shape[2] != 3 or max(x.shape[:2]) > size:
            raise ValueError(f"image {i}: expected (H, W, 3) with H, W <= {size}; got {x.shape}")
        batch[i, : x.shape[0], : x.shape[1]] = x
        sizes[i] = x.shape[:2]
    return batch, sizes


def to_input_batch(images: Sequence[np.ndarray], transform: ResizeLongestSide, batch_size: int,
                   image_format: str = "RGB") -> tuple[np.ndarray, np.ndarray]:
    """Original (H_i, W_i, 3) uint8 images -> (batch_size, S, S, 3) uint8 resized to the input
    frame and zero-padded, and the (batch_size, 2) input sizes. Errors name the image."""
    resized = []
    for i, image in enumerate(images):
        try:
            resized.append(transform.apply_image(as_rgb(image, image_format)))
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from None
    return pad_to_square(resized, transform.target_length, batch_size)
