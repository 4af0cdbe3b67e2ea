"""ResizeLongestSide equals the official one (run on the torchvision stand-ins): target shapes, points
and boxes, and the images. The stand-ins' resize itself is checked against real torchvision's
output in test_stand_ins.py, so the image comparison here is not PIL against itself alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import official_module
from sam_jax.utils.transforms import ResizeLongestSide

SIZES = [(600, 800), (800, 600), (1500, 2250), (333, 1000), (1024, 1024), (7, 3000), (1, 1), (479, 640)]
rng = np.random.default_rng(0)


@pytest.fixture(scope="module")
def official():
    return official_module("utils.transforms").ResizeLongestSide(1024)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_shapes_coords_and_boxes_match_official(official, size):
    ours = ResizeLongestSide(1024)
    assert ours.get_preprocess_shape(*size, 1024) == official.get_preprocess_shape(*size, 1024)
    assert max(ours.get_preprocess_shape(*size, 1024)) == 1024
    coords = rng.uniform(0, 1, (3, 5, 2)) * [size[1], size[0]]
    np.testing.assert_array_equal(ours.apply_coords(coords, size), official.apply_coords(coords, size))
    boxes = np.concatenate([coords[0, :4], coords[1, :4]], 1)
    np.testing.assert_array_equal(ours.apply_boxes(boxes, size), official.apply_boxes(boxes, size))


@pytest.mark.parametrize("size", [(600, 800), (300, 171), (1500, 1125)], ids=str)
def test_image_resize_is_pil_bilinear_like_official(official, size):
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = official.apply_image(image)
    ours = ResizeLongestSide(1024).apply_image(image)
    assert ours.shape == expected.shape and max(ours.shape[:2]) == 1024
    np.testing.assert_array_equal(ours, expected)


def test_apply_image_names_bad_input():
    with pytest.raises(ValueError, match=r"uint8 image; got float32 \(4, 4, 3\)"):
        ResizeLongestSide(1024).apply_image(np.zeros((4, 4, 3), np.float32))
