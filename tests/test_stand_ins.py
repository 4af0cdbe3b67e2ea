"""The torchvision stand-ins (`stand_ins/`) and sam_jax's own resize and NMS against real
torchvision's answers, recorded in `data/torchvision_golden.npz` by `data/make_torchvision_golden.py`
(torchvision has no CPU build here, so the official modules run on the stand-ins)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from conftest import STAND_INS
from sam_jax.utils import amg
from sam_jax.utils.transforms import ResizeLongestSide

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "torchvision_golden.npz"))
RESIZE_CASES = sorted({int(k.split("_")[1]) for k in GOLDEN.files if k.startswith("resize_")})
NMS_CASES = sorted({int(k.split("_")[1]) for k in GOLDEN.files if k.startswith("nms_")})


@pytest.fixture(scope="module")
def stand_in():
    """The stand-in torchvision modules, imported from stand_ins/ (and then forgotten)."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "torchvision"}
    sys.path.insert(0, STAND_INS)
    try:
        from torchvision.ops import boxes
        from torchvision.transforms import functional

        yield boxes, functional
    finally:
        sys.path.remove(STAND_INS)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules.update(saved)


def nms_case(k):
    return (GOLDEN[f"nms_{k}_boxes"], GOLDEN[f"nms_{k}_scores"], GOLDEN[f"nms_{k}_idxs"],
            float(GOLDEN[f"nms_{k}_threshold"]))


@pytest.mark.parametrize("k", RESIZE_CASES)
def test_resize_equals_torchvision(stand_in, k):
    image, target = GOLDEN[f"resize_{k}_image"], int(GOLDEN[f"resize_{k}_target"])
    expected = GOLDEN[f"resize_{k}_output"]
    _, functional = stand_in
    h, w = ResizeLongestSide.get_preprocess_shape(*image.shape[:2], target)
    np.testing.assert_array_equal(np.array(functional.resize(functional.to_pil_image(image), (h, w))), expected)
    np.testing.assert_array_equal(ResizeLongestSide(target).apply_image(image), expected)


@pytest.mark.parametrize("k", NMS_CASES)
def test_nms_equals_torchvision_with_tied_scores(stand_in, k):
    boxes, scores, idxs, threshold = nms_case(k)
    assert len(np.unique(scores)) < len(scores) / 2  # ties are what the case is for
    ops, _ = stand_in
    as_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    kept = ops.nms(as_torch(boxes), as_torch(scores), threshold).numpy()
    np.testing.assert_array_equal(kept, GOLDEN[f"nms_{k}_keep"])
    np.testing.assert_array_equal(amg.nms(boxes, scores, threshold), GOLDEN[f"nms_{k}_keep"])
    batched = ops.batched_nms(as_torch(boxes), as_torch(scores), as_torch(idxs), threshold).numpy()
    np.testing.assert_array_equal(batched, GOLDEN[f"nms_{k}_batched_keep"])
    np.testing.assert_array_equal(amg.batched_nms(boxes, scores, idxs, threshold), GOLDEN[f"nms_{k}_batched_keep"])


def test_disjoint_tied_boxes_keep_their_input_order(stand_in):
    """Nothing overlaps: every box is kept, in descending score, ties in input order (a stable sort)."""
    boxes, scores, _, threshold = nms_case(0)
    expected = np.argsort(-scores, kind="stable")
    ops, _ = stand_in
    np.testing.assert_array_equal(ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold), expected)
    np.testing.assert_array_equal(GOLDEN["nms_0_keep"], expected)
