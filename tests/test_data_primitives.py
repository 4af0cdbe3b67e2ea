"""RLE parsing and checks, mask geometry and the bad-record policy shared by every builder."""

import numpy as np
import pytest
from scipy import ndimage

from sam_jax.data import rle
from sam_jax.data.bad_records import BadRecordError, BadRecordPolicy
from data_records import mask_to_box_xyxy
from sam_jax.data.masks import farthest_from_boundary


def fortran_runs(mask):
    """Run lengths of the column-major flattening, starting with background."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    return np.concatenate([[0], runs]) if flat[0] else runs


@pytest.mark.parametrize("seed", range(40))
def test_parse_counts_equals_the_mask_runs(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 80, size=2)
    mask = ndimage.binary_opening(rng.random((h, w)) < rng.random()) if seed % 4 else rng.random((h, w)) < 0.5
    if seed == 0:
        mask[:] = True
    counts = rle.encode(mask)
    np.testing.assert_array_equal(rle.parse_counts(counts), fortran_runs(mask))
    assert rle.check_counts(counts, (h, w), "x") == mask.sum()
    np.testing.assert_array_equal(rle.decode(counts, (h, w)), mask)


def test_parse_counts_handles_long_runs():
    mask = np.zeros((1500, 2250), bool)
    mask[700:1400, 3:2000] = True
    np.testing.assert_array_equal(rle.parse_counts(rle.encode(mask)), fortran_runs(mask))


@pytest.mark.parametrize(
    "counts, size, message",
    [
        (b"\xff1", (2, 2), "not in the RLE alphabet"),
        ("é1", (2, 2), "non-ASCII"),
        (b"1a", (2, 2), "ends inside a run length"),
        (b"44", (2, 3), "runs cover 8 pixels, mask size 2x3 has 6"),
        (b"4O", (2, 2), "negative run length"),
    ],
)
def test_check_counts_names_the_problem_and_the_record(counts, size, message):
    with pytest.raises(BadRecordError, match=message) as info:
        rle.check_counts(counts, size, "sa_1.json annotation 3 (id 9)")
    assert str(info.value).startswith("sa_1.json annotation 3 (id 9): undecodable RLE")
    assert info.value.reason == "undecodable_rle"


def test_boxes_and_farthest_point():
    mask = np.zeros((40, 50), bool)
    mask[5:25, 10:41] = True
    mask[30:38, 0:4] = True
    assert rle.boxes_xywh([rle.encode(mask)], (40, 50)).tolist() == [[0, 5, 41, 33]]
    assert mask_to_box_xyxy(mask[None]).tolist() == [[0, 5, 41, 38]]
    assert mask_to_box_xyxy(np.zeros((1, 3, 3), bool)).tolist() == [[0, 0, 0, 0]]
    # Equal to the distance transform over the whole (zero-padded) image, ties included.
    rng = np.random.default_rng(0)
    for _ in range(20):
        blob = ndimage.binary_opening(rng.random((30, 45)) < 0.6)
        if not blob.any():
            continue
        full = ndimage.distance_transform_edt(np.pad(blob, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(full), full.shape)
        assert farthest_from_boundary(blob).tolist() == [x, y]
    with pytest.raises(ValueError, match="empty"):
        farthest_from_boundary(np.zeros((3, 3), bool))


def test_policy_raises_or_counts():
    error = BadRecordError("empty_mask", "a.json annotation 1", "zero-area mask")
    with pytest.raises(BadRecordError, match="a.json annotation 1: zero-area mask"):
        BadRecordPolicy("error").handle(error)
    policy = BadRecordPolicy("skip")
    for _ in range(7):
        policy.handle(error)
    policy.handle(BadRecordError("missing_image", "b.jpg", "image file is missing"))
    report = policy.report()
    assert report["skipped"] == {"empty_mask": 7, "missing_image": 1} and policy.total == 8
    assert len(report["examples"]["empty_mask"]) == 5
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        BadRecordPolicy("ignore")
