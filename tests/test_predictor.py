"""`SamPredictor` equals the official one on the same random weights (vit_tiny, full pipeline).

Official predictor: `segment_anything.predictor.SamPredictor`, run on the
torchvision stand-ins (tests/stand_ins). Non-square images are resized by
ResizeLongestSide, prompts are given in the original frame, and masks come
back at the original size. IoU predictions agree within 1e-4, logits to 1e-4
relative, binary masks everywhere except within 1e-4 of the threshold.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from conftest import official_module, relative_error
from experiments.sample_image import synthetic_image
from sam_jax.modeling import Sam, decode_low_res, upsample_masks
from sam_jax.modeling.prompt_encoder import PADDING
from sam_jax.predictor import SamPredictor
from sam_jax.prompts import to_input_frame


@pytest.fixture(scope="module")
def predictors(tiny):
    config, ref, params = tiny
    image = synthetic_image(300, 411, seed=5)  # resized to 187x256 and back
    official = official_module("predictor").SamPredictor(ref)
    official.set_image(image)
    ours = SamPredictor(Sam(config), params)
    ours.set_image(image)
    return official, ours, image


PROMPTS = {
    "one point": dict(point_coords=np.array([[200.0, 150.0]]), point_labels=np.array([1])),
    "three points": dict(point_coords=np.array([[200.0, 150.0], [20.5, 290.0], [410.0, 0.0]]),
                         point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([50.0, 40.0, 300.0, 250.0])),
    "points + box": dict(point_coords=np.array([[120.0, 100.0]]), point_labels=np.array([0]),
                         box=np.array([50.0, 40.0, 300.0, 250.0])),
    # Used as given, as the official predictor uses them (a detector's box may overhang).
    "outside the image": dict(point_coords=np.array([[-25.0, 310.0], [450.0, -5.0]]), point_labels=np.array([1, 0]),
                              box=np.array([-20.0, -10.0, 430.0, 320.0])),
}


def assert_same_prediction(ours, official):
    (masks, iou, low_res), (ref_masks, ref_iou, ref_low_res) = ours, official
    assert masks.shape == ref_masks.shape and iou.shape == ref_iou.shape
    np.testing.assert_allclose(iou, ref_iou, atol=1e-4)
    assert relative_error(low_res, ref_low_res) < 1e-4


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_predict_matches_official(predictors, prompt, multimask):
    official, ours, image = predictors
    with torch.no_grad():
        ref = official.predict(**PROMPTS[prompt], multimask_output=multimask, return_logits=True)
    logits = ours.predict(**PROMPTS[prompt], multimask_output=multimask, return_logits=True)
    assert_same_prediction(logits, ref)
    assert logits[0].shape == (3 if multimask else 1, *image.shape[:2])
    assert relative_error(logits[0], ref[0]) < 1e-4
    masks = ours.predict(**PROMPTS[prompt], multimask_output=multimask)[0]
    assert masks.dtype == bool
    disagree = masks != (ref[0] > 0)
    assert disagree.mean() <= 1e-4 and np.all(np.abs(ref[0][disagree]) < 1e-4)


def test_mask_input_feedback_matches_official(predictors):
    official, ours, _ = predictors
    prompt = PROMPTS["one point"]
    with torch.no_grad():
        _, ref_iou, ref_low_res = official.predict(**prompt)
        best = ref_low_res[np.argmax(ref_iou)][None]
        ref = official.predict(**prompt, mask_input=best, multimask_output=False)
    assert_same_prediction(ours.predict(**prompt, mask_input=best, multimask_output=False), ref)


def test_batch_of_boxes_matches_one_by_one(predictors):
    _, ours, _ = predictors
    boxes = np.array([[50.0, 40.0, 300.0, 250.0], [0.0, 0.0, 410.0, 299.0], [100.0, 100.0, 101.0, 140.0]])
    masks, iou, low_res = ours.predict_batch(boxes=boxes, multimask_output=False)
    assert masks.shape == (3, 1, 300, 411)
    for i, box in enumerate(boxes):
        single = ours.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(iou[i], single[1], atol=1e-6)
        assert relative_error(low_res[i], single[2]) < 1e-6


def test_image_embedding_and_bgr(predictors, tiny):
    official, ours, image = predictors
    with torch.no_grad():
        expected = official.get_image_embedding()
    assert relative_error(np.asarray(ours.get_image_embedding()), expected) < 1e-5
    bgr = SamPredictor(ours.model, ours.params)
    bgr.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    np.testing.assert_array_equal(np.asarray(bgr.features), np.asarray(ours.features))


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "no prompt"),
    (dict(point_coords=np.zeros((1, 2))), "point_coords and point_labels must be given together"),
    (dict(point_coords=np.zeros((2,)), point_labels=np.ones(1)), r"point_coords must be \(N, 2\)"),
    (dict(point_coords=np.zeros((2, 2)), point_labels=np.ones(3)), "point_labels must have shape"),
    (dict(point_coords=np.zeros((1, 2)), point_labels=np.array([2])), "point_labels must be 1"),
    (dict(point_coords=np.array([[np.nan, 1.0]]), point_labels=np.ones(1)), "NaN"),
    (dict(box=np.array([10.0, 10.0, 5.0, 20.0])), "x1 >= x0"),
    (dict(box=np.zeros(3)), r"box must be \(4,\)"),
    (dict(box=np.zeros((2, 4))), "predict takes one box"),
    (dict(box=np.zeros(4), mask_input=np.zeros((256, 256))), r"mask_input must be \(1, 64, 64\)"),
    # The shape named is the one given, not the batched one.
    (dict(box=np.zeros(4), mask_input=np.zeros((64, 64))), r"mask_input must be \(1, 64, 64\) .*got \(64, 64\)$"),
    (dict(point_coords=np.zeros((2,)), point_labels=np.ones(1)), r"got \(2,\)$"),
    (dict(box=np.zeros(4), mask_input=np.full((1, 64, 64), np.nan)), "mask_input contains NaN or infinite"),
    (dict(box=np.zeros(4), mask_input=np.full((1, 64, 64), np.inf)), "mask_input contains NaN or infinite"),
])
def test_bad_prompts_are_named(predictors, kwargs, message):
    _, ours, _ = predictors
    with pytest.raises(ValueError, match=message):
        ours.predict(**kwargs)


@pytest.mark.parametrize("num_points, num_boxes", [(3, 2), (2, 3), (1, 3)])
def test_prompts_of_different_counts_are_refused_not_padded(predictors, num_points, num_boxes):
    """Prompt b is point_coords[b] with boxes[b]: counts that disagree would pad a box or a point."""
    _, ours, _ = predictors
    with pytest.raises(ValueError, match=f"disagree on the number of prompts B \\(point_coords {num_points}, "
                                         f"boxes {num_boxes}\\)"):
        ours.predict_batch(point_coords=np.zeros((num_points, 1, 2)), point_labels=np.ones((num_points, 1)),
                           boxes=np.array([[0.0, 0.0, 5.0, 5.0]] * num_boxes))
    with pytest.raises(ValueError, match="mask_input 2"):
        ours.predict_batch(boxes=np.zeros((3, 4)), mask_input=np.zeros((2, 1, 64, 64)))


def test_bad_images_and_missing_image_are_named(tiny):
    config, _, params = tiny
    predictor = SamPredictor(Sam(config), params)
    with pytest.raises(RuntimeError, match="must be set"):
        predictor.predict(box=np.zeros(4))
    for bad, what in [(np.zeros((10, 10), np.uint8), r"\(10, 10\)"), (np.zeros((10, 10, 4), np.uint8), "RGBA"),
                      (np.zeros((10, 10, 3), np.float32), "float32")]:
        with pytest.raises(ValueError, match=what):
            predictor.set_image(bad)
    with pytest.raises(ValueError, match="image_format"):
        predictor.set_image(np.zeros((10, 10, 3), np.uint8), image_format="RGBA")


@pytest.mark.parametrize("with_box", [False, True])
def test_padding_points_change_nothing(tiny, with_box):
    config, _, params = tiny
    rng = np.random.default_rng(2)
    embedding = rng.normal(size=(1, 16, 16, 32)).astype(np.float32)
    coords = rng.uniform(0, 256, (2, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, 1], [1, 1, 0]], np.int32)
    boxes = np.array([[10, 20, 200, 150], [0, 0, 100, 100]], np.float32) if with_box else None
    padded_coords = np.concatenate([coords, np.zeros((2, 5, 2), np.float32)], 1)
    padded_labels = np.concatenate([labels, np.full((2, 5), PADDING, np.int32)], 1)
    decode = lambda c, l: Sam(config).apply({"params": params}, embedding, c, l, boxes, method=Sam.decode)
    (masks, iou), (padded_masks, padded_iou) = decode(coords, labels), decode(padded_coords, padded_labels)
    assert relative_error(padded_masks, masks) < 1e-6 and relative_error(padded_iou, iou) < 1e-6
    # Without the mask, extra tokens would change the answer: the test can fail.
    not_a_point = np.where(padded_labels == PADDING, -1, padded_labels)
    assert relative_error(decode(padded_coords, not_a_point)[0], masks) > 1e-3


def test_growing_click_counts_compile_once_per_bucket(tiny):
    config, _, params = tiny
    ours = SamPredictor(Sam(config), params)
    ours.set_image(synthetic_image(123, 77))
    decode_low_res.clear_cache()  # other tests in this process compiled prompt shapes too
    rng = np.random.default_rng(3)
    clicks = rng.uniform(0, 76, (9, 2))
    ours.predict(point_coords=clicks[:1], point_labels=np.ones(1))  # bucket 1, compiled
    before = decode_low_res._cache_size()
    for n in range(2, 10):  # buckets 2, 4, 8, 16: four compilations for eight click counts
        ours.predict(point_coords=clicks[:n], point_labels=np.ones(n))
    assert decode_low_res._cache_size() - before == 4
    for n in range(1, 10):  # all cached now
        ours.predict(point_coords=clicks[:n], point_labels=np.ones(n))
    assert decode_low_res._cache_size() - before == 4
    for b in (3, 4):  # 3 and 4 prompts share a bucket
        ours.predict_batch(boxes=np.tile([[10.0, 10.0, 200.0, 200.0]], (b, 1)))
    assert decode_low_res._cache_size() - before == 5
    # A new image size compiles the upsampling only: the decoder does not depend on it.
    upsampling = upsample_masks._cache_size()
    ours.set_image(synthetic_image(91, 130))
    for n in range(1, 10):
        ours.predict(point_coords=clicks[:n], point_labels=np.ones(n))
    assert decode_low_res._cache_size() - before == 5 and upsample_masks._cache_size() - upsampling == 1


def test_positional_encoding_is_computed_once_per_params(tiny, monkeypatch):
    """The predictor computes the decoder's dense positional encoding once (`image_pe`) and
    passes it: its decoder never recomputes it, gives the same masks as a decoder that does,
    and a predictor given other params recomputes it."""
    config, _, params = tiny
    model = Sam(config)
    ours = SamPredictor(model, params)
    ours.set_image(synthetic_image(123, 77))
    clicks = dict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]))
    decode_low_res.clear_cache()
    calls = []
    original = Sam.get_dense_pe

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(Sam, "get_dense_pe", counted)
    _, iou, low_res = ours.predict(**clicks, return_logits=True)
    assert calls == []  # traced without it: the decoder took `image_pe`
    embedding = ours.features
    prompts = to_input_frame(ours.transform, ours.original_size, clicks["point_coords"][None],
                             clicks["point_labels"][None], None, None, 1, 1)
    inline, inline_iou = decode_low_res(model, params, embedding, *prompts[:4], True)
    assert calls  # the same call without `image_pe` computes it
    np.testing.assert_allclose(low_res, np.asarray(inline)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(iou, np.asarray(inline_iou)[0], rtol=0, atol=1e-6)

    other = jax.tree_util.tree_map(lambda x: x, params)  # new containers, the same arrays
    gaussian = params["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"]
    other["prompt_encoder"]["pe_layer"] = {"positional_encoding_gaussian_matrix": 2 * gaussian}
    ours.params = other
    fresh = SamPredictor(model, other)
    np.testing.assert_array_equal(np.asarray(ours.image_pe), np.asarray(fresh.image_pe))
    assert np.abs(np.asarray(ours.image_pe) - np.asarray(SamPredictor(model, params).image_pe)).max() > 0.1


def test_bad_image_pe_is_named(tiny):
    config, _, params = tiny
    model = Sam(config)
    e, d = config.embedding_size, config.prompt_embed_dim
    with pytest.raises(ValueError, match=r"image_pe must be \(1, .*got shape \(1, 4, 4"):
        decode_low_res(model, params, np.zeros((1, e, e, d), np.float32), np.zeros((1, 1, 2), np.float32),
                       np.ones((1, 1), np.int32), None, None, True, None, np.zeros((1, 4, 4, d), np.float32))
