"""The paper's point protocol: click placement against a brute-force reference, and the
protocol loop driven by predictors whose scores are known by hand."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sam_jax.evaluation.clicks import next_click
from sam_jax.evaluation.point_protocol import ProtocolConfig, gray_images, run_protocol
from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, PADDING


def brute_force_distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel, the world
    outside the image counting as non-region: every pair, no distance-transform code."""
    h, w = region.shape
    padded = np.pad(region, 1)
    ys, xs = np.nonzero(~padded)
    out = np.zeros((h, w))
    for y, x in zip(*np.nonzero(region)):
        out[y, x] = np.sqrt(np.min((ys - (y + 1)) ** 2 + (xs - (x + 1)) ** 2))
    return out


def reference_click(target, predicted):
    """RITM's Clicker.get_next_points, written out with the brute-force distance."""
    fn = brute_force_distance(target & ~predicted)
    fp = brute_force_distance(predicted & ~target)
    if fn.max() == 0 and fp.max() == 0:
        return None
    positive = fn.max() > fp.max()
    distance = fn if positive else fp
    y, x = np.argwhere(distance == distance.max())[0]  # first in row-major order
    return int(x), int(y), FOREGROUND if positive else BACKGROUND


masks = st.integers(4, 12).flatmap(
    lambda n: st.tuples(
        st.lists(st.booleans(), min_size=n * n, max_size=n * n),
        st.lists(st.booleans(), min_size=n * n, max_size=n * n),
    ).map(lambda ab: (np.array(ab[0]).reshape(n, n), np.array(ab[1]).reshape(n, n)))
)


@settings(max_examples=150, deadline=None)
@given(masks)
def test_next_click_matches_the_brute_force_reference(pair):
    target, predicted = pair
    click = next_click(target, predicted)
    expected = reference_click(target, predicted)
    if expected is None:
        assert not click.has_error
    else:
        assert click.has_error and (click.x, click.y, click.label) == expected


def test_first_click_is_the_centre_and_the_border_counts_as_boundary():
    target = np.zeros((30, 30), bool)
    target[0:9, 0:9] = True  # touches the image corner: the border is boundary, its depth is 5
    target[12:30, 10:30] = True  # deeper: 9 at rows 20..21, columns 18..21
    click = next_click(target, np.zeros_like(target))
    assert (click.x, click.y, click.label) == (18, 20, FOREGROUND)  # the first of the tied maxima
    assert ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1][20, 18] == 9
    assert brute_force_distance(target)[4, 4] == 5


def test_false_positives_get_a_background_click_and_ties_go_to_background():
    target = np.zeros((15, 15), bool)
    target[2:5, 2:5] = True
    predicted = target.copy()
    predicted[8:15, 8:15] = True  # a large false positive
    assert next_click(target, predicted)[:3] == (11, 11, BACKGROUND)
    tie_target, tie_pred = np.zeros((5, 9), bool), np.zeros((5, 9), bool)
    tie_target[2, 1], tie_pred[2, 7] = True, True  # equal one-pixel errors
    assert next_click(tie_target, tie_pred)[:3] == (7, 2, BACKGROUND)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        next_click(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def _scene():
    """Two images, three masks, one padding slot; image 1 has two touching rectangles."""
    targets = np.zeros((2, 2, 16, 16), bool)
    targets[0, 0, 2:10, 2:12] = True
    targets[1, 0, 0:8, 0:8] = True
    targets[1, 1, 0:8, 8:16] = True
    valid = np.array([[True, False], [True, True]])
    return targets, valid, np.array([7, 8])


def _predictor(answer):
    """PredictFn returning `answer(coords, labels)` (B, M, T, T) as the only / best output."""

    def predict(coords, labels, mask_inputs, multimask):
        masks = answer(coords, labels)
        c = 3 if multimask else 1
        stacked = np.repeat(masks[:, :, None], c, axis=2)
        scores = np.zeros(masks.shape[:2] + (c,), np.float32)
        return stacked, scores, np.zeros(masks.shape[:2] + (c, 1, 4, 4), np.float32)

    return predict


def test_a_perfect_predictor_scores_one_after_every_click():
    targets, valid, ids = _scene()
    result = run_protocol(_predictor(lambda c, l: targets), targets, valid, ids, ProtocolConfig(num_clicks=3))
    assert result.num_masks == 3
    np.testing.assert_array_equal(result.iou, 1.0)
    np.testing.assert_array_equal(result.miou(), [1.0, 1.0, 1.0])


def test_a_predictor_of_the_clicked_connected_region_scores_the_hand_count():
    """The predictor returns the connected region of the union of all targets under the
    first foreground click. Image 1's touching rectangles form one 8x16 region, so each of
    its masks scores 64 / 128 = 0.5, and later clicks fall on the false positive half (a
    background click does not change this predictor's answer). Image 0 scores 1."""
    targets, valid, ids = _scene()

    def answer(coords, labels):
        out = np.zeros_like(targets)
        for i in range(2):
            regions, _ = ndimage.label(targets[i].any(axis=0))
            for j in range(2):
                if labels[i, j, 0] == FOREGROUND:
                    x, y = coords[i, j, 0].astype(int)
                    out[i, j] = regions == regions[y, x]
        return out

    result = run_protocol(_predictor(answer), targets, valid, ids, ProtocolConfig(num_clicks=2))
    np.testing.assert_allclose(result.iou, [[1.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(result.miou(), [2 / 3, 2 / 3])
    assert result.summary()["miou"] == {"1": pytest.approx(2 / 3), "2": pytest.approx(2 / 3)}
    # By mask size, in images of 16 x 12 (the frame's rest is padding): 80 / 192 px and 64 / 192 px.
    by_size = run_protocol(_predictor(answer), targets, valid, ids, ProtocolConfig(num_clicks=2),
                           image_hw=np.array([[16, 12], [16, 12]])).summary()["miou_by_mask_size"]
    assert by_size.keys() == {"10-100%"} and by_size["10-100%"]["num_masks"] == 3
    assert by_size["10-100%"]["miou"] == {"1": pytest.approx(2 / 3), "2": pytest.approx(2 / 3)}
    np.testing.assert_allclose(result.mask_fraction, [80 / 256, 64 / 256, 64 / 256])  # the whole frame by default


def test_the_oracle_takes_the_best_of_three_at_the_first_click_only():
    targets, valid, ids = _scene()

    def predict(coords, labels, mask_inputs, multimask):
        empty = np.zeros_like(targets)
        # The most confident output is empty; the second is the target.
        masks = np.stack([empty, targets, empty], axis=2) if multimask else empty[:, :, None]
        scores = np.tile(np.array([0.9, 0.1, 0.0], np.float32), targets.shape[:2] + (1,))[..., : masks.shape[2]]
        return masks, scores, np.zeros(masks.shape[:3] + (4, 4), np.float32)

    result = run_protocol(predict, targets, valid, ids, ProtocolConfig(num_clicks=2))
    np.testing.assert_array_equal(result.iou, 0.0)
    np.testing.assert_array_equal(result.oracle_iou[:, 0], 1.0)
    np.testing.assert_array_equal(result.oracle_iou[:, 1], 0.0)


def test_the_iou_head_is_scored_on_the_first_clicks_outputs():
    """Every mask's second output is its target, the others empty (actual IoU 0, 1, 0). Image 0's
    mask scores the outputs 0.9 / 0.1 / 0.0 (the wrong one first), image 1's two 0.2 / 0.8 / 0.1;
    the padding slot's 5.0 must count nowhere."""
    targets, valid, ids = _scene()
    scores = np.array([[[0.9, 0.1, 0.0], [5.0, 5.0, 5.0]], [[0.2, 0.8, 0.1], [0.2, 0.8, 0.1]]], np.float32)

    def predict(coords, labels, mask_inputs, multimask):
        empty = np.zeros_like(targets)
        if not multimask:
            return targets[:, :, None], np.ones(targets.shape[:2] + (1,), np.float32), np.zeros((2, 2, 1, 4, 4))
        return np.stack([empty, targets, empty], axis=2), scores, np.zeros((2, 2, 3, 4, 4), np.float32)

    result = run_protocol(predict, targets, valid, ids, ProtocolConfig(num_clicks=2))
    np.testing.assert_array_equal(result.first_click_output_iou, [[0, 1, 0]] * 3)
    np.testing.assert_array_equal(result.first_click_predicted_iou, scores[valid])
    head = json.loads(json.dumps(result.summary()))["iou_head_first_click"]
    predicted = [0.9, 0.1, 0.0, 0.2, 0.8, 0.1, 0.2, 0.8, 0.1]
    actual = [0, 1, 0] * 3
    assert head["pearson"] == pytest.approx(np.corrcoef(predicted, actual)[0, 1])
    assert head["picks_best"] == pytest.approx(2 / 3)
    assert head["mean_abs_error"] == pytest.approx((1.8 + 0.5 + 0.5) / 9)
    assert head["mean_predicted"] == pytest.approx([1.3 / 3, 1.7 / 3, 0.2 / 3])
    assert head["mean_actual"] == pytest.approx([0, 1, 0])
    assert head["chosen_share"] == pytest.approx([1 / 3, 2 / 3, 0]) and head["best_share"] == pytest.approx([0, 1, 0])
    # By size: image 0's mask is 80 px of a 160 x 120 image (0.42%), image 1's two 64 of 16 x 12.
    by_size = run_protocol(predict, targets, valid, ids, ProtocolConfig(num_clicks=1),
                           image_hw=np.array([[160, 120], [16, 12]])).summary()["miou_by_mask_size"]
    assert by_size.keys() == {"0.2-1%", "10-100%"}
    assert by_size["0.2-1%"]["first_click_mean_predicted"] == pytest.approx([0.9, 0.1, 0.0])
    assert by_size["10-100%"]["first_click_mean_predicted"] == pytest.approx([0.2, 0.8, 0.1])
    assert by_size["10-100%"]["num_masks"] == 2 and by_size["10-100%"]["first_click_mean_actual"] == [0, 1, 0]
    # Scores without spread say nothing about the outputs: no correlation is reported, and the
    # tie goes to the first output, as the most confident mask's does.
    scores[:] = 0.5
    flat = run_protocol(predict, targets, valid, ids, ProtocolConfig(num_clicks=1)).iou_head()
    assert flat["pearson"] is None and flat["picks_best"] == 0.0 and flat["chosen_share"] == [1.0, 0.0, 0.0]


def test_clicks_accumulate_with_labels_and_padding():
    targets, valid, ids = _scene()
    seen = []

    def predict(coords, labels, mask_inputs, multimask):
        seen.append((coords.copy(), labels.copy(), mask_inputs is None))
        grown = targets.copy()
        grown[:, :, 12:, 12:] = True  # a false positive square the second click must remove
        return _predictor(lambda c, l: grown)(coords, labels, mask_inputs, multimask)

    run_protocol(predict, targets, valid, ids, ProtocolConfig(num_clicks=2))
    (c1, l1, none1), (c2, l2, none2) = seen
    assert none1 and not none2  # the first prediction has no mask input, later ones the previous logits
    assert l1[0, 0].tolist() == [FOREGROUND, PADDING] and l1[0, 1].tolist() == [PADDING, PADDING]
    assert l2[0, 0].tolist() == [FOREGROUND, BACKGROUND]
    assert c2[0, 0, 1].tolist() == [13, 13]  # the centre of the 4x4 false positive at 12..15 (first of ties)


def test_random_first_clicks_lie_in_the_mask_and_are_reproducible():
    targets, valid, ids = _scene()
    runs = []
    for _ in range(2):
        seen = []

        def predict(coords, labels, mask_inputs, multimask):
            seen.append(coords.copy())
            return _predictor(lambda c, l: targets)(coords, labels, mask_inputs, multimask)

        run_protocol(predict, targets, valid, ids, ProtocolConfig(num_clicks=1, first_click="random", seed=3))
        runs.append(seen[0])
    np.testing.assert_array_equal(runs[0], runs[1])
    for i, j in zip(*np.nonzero(valid)):
        x, y = runs[0][i, j, 0].astype(int)
        assert targets[i, j, y, x]


def test_bad_protocol_config_is_refused():
    with pytest.raises(ValueError, match="first_click"):
        ProtocolConfig(first_click="edge")
    with pytest.raises(ValueError, match="num_clicks"):
        ProtocolConfig(num_clicks=0)


def test_the_ambiguity_ceiling_answers_each_click_with_the_smallest_mask_holding_it():
    """An object with a part at its centre: its first click lands in the part (ambiguous), so the
    ceiling scores part / object for it and 1 for the part; a separate mask scores 1."""
    from experiments.ambiguity_ceiling import image_ceiling, summarize
    from sam_jax.evaluation.instances import Instances

    masks = np.zeros((3, 40, 60), bool)
    masks[0, 5:35, 5:35] = True  # the object, 900 px; its centre is inside the part
    masks[1, 15:25, 15:25] = True  # the part, 100 px
    masks[2, 10:20, 45:55] = True  # a separate object
    instances = Instances(np.zeros((40, 60, 3), np.uint8), 7, "x.png", masks, np.zeros((3, 4), np.float32),
                          np.arange(3), np.ones(3, np.int64), np.zeros(3, bool))
    rows = image_ceiling(instances)
    assert [r["masks_at_click"] for r in rows] == [2, 2, 1]
    np.testing.assert_allclose([r["iou"] for r in rows], [100 / 900, 1.0, 1.0])
    summary = summarize(rows)
    assert summary["ceiling_miou"] == pytest.approx((100 / 900 + 2) / 3)
    assert summary["ambiguous_clicks"] == pytest.approx(2 / 3)
    assert summary["by_mask_size"]["10-100%"]["num_masks"] == 1  # 900 / 2400 px


def test_the_resolution_ceiling_sees_masks_through_the_low_res_grid():
    """+-1 logits on the low-res grid, upsampled bilinearly: a block-aligned square loses one pixel
    at each corner (there the 2x2 weights of its one inside cell are 0.625^2 < 1/2); a 3x3 mask
    inside one 4x4 block becomes that block without its corners (12 px, 8 of them the mask's;
    away from the image border, where the upsampling clamps)."""
    from experiments.ambiguity_ceiling import resolution_iou

    square = np.zeros((64, 64), bool)
    square[16:32, 32:48] = True  # 4x4 cells of 4x4 pixels
    assert resolution_iou(square, 64, 16) == pytest.approx(252 / 256)
    small = np.zeros((64, 64), bool)
    small[5:8, 5:8] = True  # 9 of block (1, 1)'s 16 pixels: the block votes in
    assert resolution_iou(small, 64, 16) == pytest.approx(8 / 13)
    tiny = np.zeros((64, 64), bool)
    tiny[5:7, 5:7] = True  # 4 of 16: the block votes out, nothing is seen
    assert resolution_iou(tiny, 64, 16) == 0.0
    # A 128 x 96 image at image_size 64: the input frame is 64 x 48 (each input pixel 2 x 2 of the image),
    # the square the aligned one above; the second bilinear stage (frame -> image) rounds each corner
    # by a 3-pixel triangle (worked out by hand from the two stages' weights).
    wide = np.zeros((96, 128), bool)
    wide[32:64, 64:96] = True
    assert resolution_iou(wide, 64, 16) == pytest.approx((1024 - 4 * 6) / 1024)


def test_gray_images_replace_only_the_pixels():
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), "masks": rng.random((2, 3, 8, 8)) > 0.5,
             "image_size": np.array([[8, 5], [6, 8]], np.int32)}
    original = batch["image"].copy()
    (gray,) = list(gray_images([batch]))
    assert gray["image"].dtype == np.uint8 and gray["image"].shape == (2, 8, 8, 3)
    assert (gray["image"] == 128).all()
    assert gray["masks"] is batch["masks"] and gray["image_size"] is batch["image_size"]
    np.testing.assert_array_equal(batch["image"], original)  # the caller's batch is left as it was
