"""End-to-end parity with the official model, every released size at full size.

From a non-square uint8 image (as `ResizeLongestSide` leaves it: longest
side = image_size) through preprocessing, the image encoder, the prompt
encoder, the mask decoder and postprocessing to logits at the original image
size, against the official modules on the same seeded random weights.
Tolerances (fp32, CPU): relative L2 <= 1e-5 on the image embedding, <= 1e-4
on mask logits and IoU predictions; binary masks agree except at pixels
whose logit is within 1e-4 of the threshold. `test_predictors_from_original_images`
also starts from images of other sizes (portrait, odd, thin), which both
predictors resize with ResizeLongestSide (vit_tiny and vit_b: the steps
around the encoder are the same for every released size).
"""

from __future__ import annotations

import functools
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_official, relative_error, report, to_torch
from experiments.sample_image import synthetic_image
from sam_jax.modeling import Sam, decode_in_chunks, postprocess_masks, preprocess

SIZES = [
    "vit_tiny",
    "vit_b",
    pytest.param("vit_l", marks=pytest.mark.slow),
    pytest.param("vit_h", marks=pytest.mark.slow),
]


@functools.partial(jax.jit, static_argnums=(0,))
def encode(model, params, image):
    """uint8 (H, W, 3) -> (1, h, w, D)."""
    return model.apply({"params": params}, preprocess(image, model.config)[None], method=Sam.encode_image)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def predict(model, params, embedding, coords, labels, boxes, masks, multimask, input_size, original_size):
    """Low-res logits, IoU predictions and logits at `original_size` for B prompts, decoded as
    the predictors decode them (the released sizes in chunks of 2 on the CPU)."""
    low_res, iou = decode_in_chunks(model, params, embedding, coords, labels, boxes, masks, multimask)
    return low_res, iou, postprocess_masks(low_res, input_size, original_size, model.config.image_size)


@pytest.fixture(scope="module", params=SIZES)
def pipeline(request):
    config, ref, params = make_official(request.param, seed=3)
    s = config.image_size
    input_size, original_size = (3 * s // 4, s), (3 * s // 4 * 25 // 32, s * 25 // 32)  # 768x1024, 600x800
    rng = np.random.default_rng(1)  # prompts
    image = synthetic_image(*input_size, seed=1)

    start = time.perf_counter()
    with torch.no_grad():
        ref_embedding = ref.image_encoder(ref.preprocess(to_torch(image).permute(2, 0, 1).float())[None])
    torch_s = time.perf_counter() - start
    model = Sam(config)
    start = time.perf_counter()
    embedding = encode(model, params, jnp.asarray(image)).block_until_ready()
    print(f"\n{request.param}: official encoder {torch_s:.1f} s, ours {time.perf_counter() - start:.1f} s with compile")
    yield dict(name=request.param, config=config, ref=ref, params=params, model=model, rng=rng,
               input_size=input_size, original_size=original_size,
               embedding=embedding, ref_embedding=ref_embedding)
    del ref, params, embedding
    gc.collect()


def test_image_embedding(pipeline):
    error = relative_error(np.asarray(pipeline["embedding"]).transpose(0, 3, 1, 2), pipeline["ref_embedding"])
    report(f"{pipeline['name']} image embedding (end to end)", error)
    assert error < 1e-5


# vit_l and vit_h share vit_b's decoder (the same config and code): every prompt combination runs on
# vit_tiny and vit_b, and the fullest one (points + box + a fed-back mask) on every released size.
@pytest.mark.parametrize("pipeline", ["vit_tiny", "vit_b"], indirect=True, scope="module")
@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("prompt", ["points", "box", "points+box"])
def test_masks_and_iou(pipeline, prompt, with_mask, multimask):
    check_masks_and_iou(pipeline, prompt, with_mask, multimask)


@pytest.mark.parametrize("pipeline", SIZES[2:], indirect=True, scope="module")
def test_masks_and_iou_from_the_larger_encoders(pipeline):
    check_masks_and_iou(pipeline, "points+box", True, True)


@torch.no_grad()
def check_masks_and_iou(pipeline, prompt, with_mask, multimask):
    p, rng = pipeline, pipeline["rng"]
    ref, (h, w) = p["ref"], p["input_size"]
    n = 4  # prompts on this image
    coords = labels = boxes = masks = None
    if "points" in prompt:
        coords = (rng.uniform(0, 1, (n, 3, 2)) * [w - 1, h - 1]).astype(np.float32)
        labels = rng.integers(0, 2, (n, 3)).astype(np.int32)
    if "box" in prompt:
        x0y0 = rng.uniform(0, 0.5, (n, 2)) * [w, h]
        boxes = np.concatenate([x0y0, x0y0 + rng.uniform(0.1, 0.5, (n, 2)) * [w, h]], 1).astype(np.float32)
    t = lambda a: None if a is None else to_torch(a)
    points = None if coords is None else (t(coords), t(labels))
    if with_mask:  # an earlier prediction's logits fed back, as interactive use does
        sparse, dense = ref.prompt_encoder(points, t(boxes), None)
        first, _ = ref.mask_decoder(p["ref_embedding"], ref.prompt_encoder.get_dense_pe(), sparse, dense, False)
        masks = first.numpy()

    sparse, dense = ref.prompt_encoder(points, t(boxes), t(masks))
    ref_low_res, ref_iou = ref.mask_decoder(
        p["ref_embedding"], ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    ref_logits = ref.postprocess_masks(ref_low_res, p["input_size"], p["original_size"])
    low_res, iou, logits = predict(p["model"], p["params"], p["embedding"], coords, labels, boxes,
                                   masks, multimask, p["input_size"], p["original_size"])

    assert logits.shape == tuple(ref_logits.shape) == (n, 3 if multimask else 1, *p["original_size"])
    case = f"{p['name']} {prompt}{' +mask' if with_mask else ''} multimask={multimask}"
    errors = {
        "low-res logits": relative_error(low_res, ref_low_res),
        "logits at original size": relative_error(logits, ref_logits),
        "iou predictions": relative_error(iou, ref_iou),
    }
    for what, error in errors.items():
        report(f"{case}: {what}", error)
    assert max(errors.values()) < 1e-4, errors
    disagree = (np.asarray(logits) > 0) != (ref_logits.numpy() > 0)
    assert np.all(np.abs(ref_logits.numpy()[disagree]) < 1e-4), "binary masks differ away from the threshold"


# Original images as users pass them: resized by ResizeLongestSide on both sides (the official
# through the stand-ins, whose resize equals torchvision's: test_stand_ins.py). Resizing, padding and
# postprocessing do not depend on the encoder's size, and every released size has image_size 1024, so
# vit_b stands for vit_l and vit_h here (their encoders are test_image_embedding's).
ORIGINALS = {"vit_tiny": [(1001, 749), (333, 517), (1203, 97)],  # portrait, odd landscape, thin portrait
             "vit_b": [(1001, 749)]}  # -> 1024 x 766 at the released input size


@pytest.mark.parametrize("pipeline", list(ORIGINALS), indirect=True, scope="module")
@torch.no_grad()
def test_predictors_from_original_images(pipeline):
    from conftest import official_module
    from sam_jax.predictor import SamPredictor

    p = pipeline
    official = official_module("predictor").SamPredictor(p["ref"])
    ours = SamPredictor(p["model"], p["params"])
    for k, (h, w) in enumerate(ORIGINALS[p["name"]]):
        image = synthetic_image(h, w, seed=10 + k)
        official.set_image(image)
        ours.set_image(image)
        assert ours.input_size == tuple(official.input_size) and ours.original_size == (h, w)
        assert max(ours.input_size) == p["config"].image_size
        error = relative_error(np.asarray(ours.get_image_embedding()), official.get_image_embedding())
        report(f"{p['name']} {h}x{w} original: image embedding", error)
        assert error < 1e-5
        coords = p["rng"].uniform(0, 1, (3, 2)) * [w - 1, h - 1]
        box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h])
        prompt = dict(point_coords=coords, point_labels=np.array([1, 0, 1]), box=box, multimask_output=True,
                      return_logits=True)
        ref_logits, ref_iou, ref_low_res = official.predict(**prompt)
        logits, iou, low_res = ours.predict(**prompt)
        assert logits.shape == ref_logits.shape == (3, h, w)
        errors = {"logits": relative_error(logits, ref_logits), "iou": relative_error(iou, ref_iou),
                  "low-res logits": relative_error(low_res, ref_low_res)}
        report(f"{p['name']} {h}x{w} original: predict", max(errors.values()))
        assert max(errors.values()) < 1e-4, errors
        disagree = (logits > 0) != (ref_logits > 0)
        assert np.all(np.abs(ref_logits[disagree]) < 1e-4), "binary masks differ away from the threshold"
