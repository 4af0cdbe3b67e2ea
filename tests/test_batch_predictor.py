"""`SamBatchPredictor` equals `SamPredictor` image by image: on one device, on 8 fake
CPU devices, and split over two `jax.distributed` processes on localhost.

Five images of different sizes and aspect ratios (padded to the device count),
each with its own number of prompts and of points, points + boxes together.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import device_workers
from conftest import make_official
from experiments.sample_image import synthetic_image
from sam_jax import SamPredictor
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.modeling import Sam

IMAGE_SIZES = [(300, 411), (256, 256), (100, 500), (480, 320), (77, 90)]
WORKER = os.path.join(os.path.dirname(__file__), "batch_predictor_worker.py")
TOLERANCE = 1e-5  # batched vs single-image XLA programs sum in different orders


def model_and_params():
    config, _, params = make_official("vit_tiny")
    return Sam(config), params


def batch_inputs():
    """The images, and per image i: 1 + i % 3 prompts of 1 + 2i % 5 points and a box."""
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        images.append(synthetic_image(h, w, seed=i))
        p, n = 1 + i % 3, 1 + (2 * i) % 5
        corners = np.sort(rng.uniform(0, 1, (p, 2, 2)), axis=1) * [w, h]  # (p, corner, xy)
        prompts.append(dict(
            point_coords=rng.uniform(0, 1, (p, n, 2)) * [w, h],
            point_labels=rng.integers(0, 2, (p, n)),
            boxes=corners.reshape(p, 4),
        ))
    return images, prompts


@pytest.fixture(scope="module")
def expected():
    """SamPredictor's results, one image at a time."""
    model, params = model_and_params()
    predictor = SamPredictor(model, params)
    images, prompts = batch_inputs()
    results = []
    for image, p in zip(images, prompts):
        predictor.set_image(image)
        results.append(predictor.predict_batch(
            p["point_coords"], p["point_labels"], p["boxes"], return_logits=True
        ))
    return results


def assert_equal_results(results, expected):
    assert len(results) == len(expected)
    for i, ((logits, iou, low_res), (ref_logits, ref_iou, ref_low_res)) in enumerate(
        zip(results, expected)
    ):
        assert logits.shape == ref_logits.shape, i
        assert iou.shape == ref_iou.shape and low_res.shape == ref_low_res.shape, i
        np.testing.assert_allclose(logits, ref_logits, atol=TOLERANCE, err_msg=f"image {i}")
        np.testing.assert_allclose(iou, ref_iou, atol=TOLERANCE, err_msg=f"image {i}")
        np.testing.assert_allclose(low_res, ref_low_res, atol=TOLERANCE, err_msg=f"image {i}")


def test_one_device_equals_predictor(expected):
    model, params = model_and_params()
    predictor = SamBatchPredictor(model, params)
    images, prompts = batch_inputs()
    predictor.set_images(images)
    results = predictor.predict_batch(prompts, return_logits=True)
    assert_equal_results(results, expected)
    masks = predictor.predict_batch(prompts, multimask_output=False)
    for (m, iou, _), image in zip(masks, images):
        assert m.dtype == bool and m.shape[1:] == (1, *image.shape[:2]) and iou.shape[1] == 1


def test_mask_inputs(expected):
    """Earlier low-res logits fed back as mask prompts, with boxes, no points."""
    model, params = model_and_params()
    images, prompts = batch_inputs()
    batch = SamBatchPredictor(model, params)
    batch.set_images(images[:2])
    single = SamPredictor(model, params)
    fed_back = [dict(boxes=p["boxes"], mask_input=low_res[:, :1])
                for p, (_, _, low_res) in zip(prompts, expected)]
    results = batch.predict_batch(fed_back[:2], return_logits=True)
    for image, p, result in zip(images, fed_back, results):
        single.set_image(image)
        ref = single.predict_batch(boxes=p["boxes"], mask_input=p["mask_input"], return_logits=True)
        assert_equal_results([result], [ref])


def run_workers(tmp_path, num_processes: int, devices_per_process: int) -> dict:
    merged = {}
    for arrays in device_workers.run_workers(WORKER, tmp_path, num_processes, devices_per_process):
        merged.update(arrays)
    return merged


def results_from(arrays) -> list:
    return [tuple(arrays[f"{k}_{i}"] for k in ("logits", "iou", "low_res")) for i in range(len(IMAGE_SIZES))]


def test_eight_fake_devices_equal_one(tmp_path, expected):
    arrays = run_workers(tmp_path, num_processes=1, devices_per_process=8)
    assert int(arrays["device_count"]) == 8
    assert_equal_results(results_from(arrays), expected)


def test_two_processes_equal_one(tmp_path, expected):
    """Two `jax.distributed` processes (2 CPU devices each, gloo collectives), each
    passing only its own images; every image's result equals the single-process one."""
    arrays = run_workers(tmp_path, num_processes=2, devices_per_process=2)
    assert int(arrays["device_count"]) == 4
    assert_equal_results(results_from(arrays), expected)


@pytest.fixture(scope="module")
def two_images():
    model, params = model_and_params()
    predictor = SamBatchPredictor(model, params)
    images, _ = batch_inputs()
    predictor.set_images(images[:2])
    return predictor


@pytest.mark.parametrize("prompts, message", [
    ([dict(boxes=np.zeros((1, 4)))], "got prompts for 1 images; 2 are set"),
    ([dict(boxes=np.zeros((1, 4))), dict(point_coords=np.zeros((1, 1, 2)),
                                         point_labels=np.ones((1, 1)))],
     "same kinds of prompt"),
    ([dict(boxes=np.zeros((1, 4))), dict(box=np.zeros((1, 4)))], "image 1: unknown prompt keys"),
    ([dict(boxes=np.zeros((1, 4))), dict(boxes=np.array([[5.0, 0, 1, 1]]))], "image 1: box must be XYXY"),
    ([dict(boxes=np.zeros((1, 4))), dict()], "image 1: no prompt"),
    ([dict(boxes=np.zeros((1, 4))), dict(point_coords=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1)),
                                         boxes=np.zeros((2, 4)))],
     r"image 1: prompts disagree on the number of prompts B \(point_coords 3, boxes 2\)"),
    ([dict(mask_input=np.full((1, 1, 64, 64), np.nan)), dict(mask_input=np.zeros((1, 1, 64, 64)))],
     "image 0: mask_input contains NaN"),
])
def test_bad_prompts_name_the_image(two_images, prompts, message):
    with pytest.raises(ValueError, match=message):
        two_images.predict_batch(prompts)


def test_bad_images_name_the_image():
    model, params = model_and_params()
    predictor = SamBatchPredictor(model, params)
    with pytest.raises(ValueError, match="at least one image"):
        predictor.set_images([])
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8 image"):
        predictor.set_images([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
    with pytest.raises(RuntimeError, match="set_images"):
        predictor.predict_batch([dict(boxes=np.zeros((1, 4)))])
