"""The text-prompt evaluation (`sam_jax.evaluation.text_prompts`): each prompt's IoU against the
predictor driven one object at a time, and the crop embedding against CLIP on a hand-cut crop."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.clip import CLIP, CLIP_CONFIGS, init_clip_params, preprocess
from sam_jax.clip.text_encoder import ClipTextEncoder
from sam_jax.configs import CONFIGS
from sam_jax.data.synthetic import generate_scene
from sam_jax.evaluation.clicks import next_click
from sam_jax.evaluation.text_prompts import PROMPTS, CaptionedImage, crop_embeddings, evaluate_text_prompts
from sam_jax.modeling import Sam
from sam_jax.predictor import SamPredictor
from sam_jax.weights import init_params

CLIP_CONFIG = CLIP_CONFIGS["tiny"]
SAM_CONFIG = dataclasses.replace(CONFIGS["vit_tiny"], name="vit_tiny_text", text_embed_dim=CLIP_CONFIG.embed_dim)


@pytest.fixture(scope="module")
def models():
    model = Sam(SAM_CONFIG)
    params = init_params(model)
    clip_params = init_clip_params(CLIP_CONFIG, seed=3)
    predictor = SamPredictor(model, params, text_encoder=ClipTextEncoder(CLIP_CONFIG, clip_params))
    image_params = {"visual": clip_params["visual"], "logit_scale": clip_params["logit_scale"]}
    return predictor, CLIP(CLIP_CONFIG), image_params


def test_crop_embedding_of_an_aligned_square_is_clip_of_the_cut(models):
    _, clip, params = models
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)  # padded to 128 x 128 below the image
    mask = np.zeros((1, 96, 128), bool)
    mask[0, 20:84, 40:104] = True  # its box is 64 x 64: CLIP's size, so the crop is a pixel copy
    mask[0, 30:40, 50:60] = False
    got = crop_embeddings(clip, params, image, mask, expand_range=(1.0, 1.0))
    want = clip.apply({"params": params}, preprocess(image[None, 20:84, 40:104]), jnp.asarray(mask[:, 20:84, 40:104]),
                      method=CLIP.encode_image)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_every_prompt_equals_the_predictor_one_object_at_a_time(models):
    predictor, clip, image_params = models
    scene = generate_scene(4, 96, 128)
    keep = np.flatnonzero(scene.masks.reshape(len(scene.masks), -1).sum(1) > 200)[:3]
    item = CaptionedImage(scene.image, scene.masks[keep], ["large red ellipse", "small blue ring", "medium green blob"])
    result = evaluate_text_prompts(predictor, clip, image_params, [item, CaptionedImage(scene.image, scene.masks[:0], [])],
                                   seed=7)
    assert result.num_images == 2 and result.num_objects == 3 and set(result.miou) == set(PROMPTS)
    predictor.set_image(scene.image)
    iou = lambda a, b: (a & b).sum() / (a | b).sum()
    rng = np.random.default_rng(7)
    random = rng.normal(size=(3, CLIP_CONFIG.embed_dim)).astype(np.float32)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    crops = crop_embeddings(clip, image_params, scene.image, item.masks)
    for k, (target, caption) in enumerate(zip(item.masks, item.captions)):
        row = result.per_object[k]
        masks, scores, logits = predictor.predict(text=caption)
        best = np.argmax(scores)
        assert row["text"] == pytest.approx(iou(masks[best], target), abs=1e-6)
        click = next_click(target, masks[best])
        fixed, _, _ = predictor.predict(point_coords=[[click.x, click.y]], point_labels=[click.label], text=caption,
                                        mask_input=logits[best][None], multimask_output=False)
        assert row["text_1_click"] == pytest.approx(iou(fixed[0], target), abs=1e-6)
        first = next_click(target, np.zeros_like(target))
        masks, scores, logits = predictor.predict(point_coords=[[first.x, first.y]], point_labels=[1])
        best = np.argmax(scores)
        assert row["point"] == pytest.approx(iou(masks[best], target), abs=1e-6)
        click = next_click(target, masks[best])
        fixed, _, _ = predictor.predict(point_coords=[[first.x, first.y], [click.x, click.y]],
                                        point_labels=[1, click.label], mask_input=logits[best][None],
                                        multimask_output=False)
        assert row["point_2_clicks"] == pytest.approx(iou(fixed[0], target), abs=1e-6)
        for name, embedding in (("random_embedding", random[k]), ("crop_embedding", crops[k])):
            masks, scores, _ = predictor.predict_batch(text_embeddings=embedding[None])
            assert row[name] == pytest.approx(iou(masks[0, np.argmax(scores[0])], target), abs=1e-6)
    assert result.miou["text"] == pytest.approx(np.mean([r["text"] for r in result.per_object]))


def test_text_embeddings_are_checked(models):
    predictor, _, _ = models
    predictor.set_image(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"text_embeddings must be \(B, 64\)"):
        predictor.predict_batch(text_embeddings=np.ones((2, 32)))
    with pytest.raises(ValueError, match="zero row is no prompt"):
        predictor.predict_batch(text_embeddings=np.zeros((1, 64)))
    with pytest.raises(ValueError, match="not both"):
        predictor.predict_batch(text=["a"], text_embeddings=np.ones((1, 64)))


def test_the_demo_prompts_each_uniquely_captioned_object_once():
    from experiments.text_prompt_demo import MIN_INPUT_AREA, captioned_images

    images = captioned_images(6, 256, "sam_synthetic/cpu")
    assert len(images) == 6 and sum(len(i.captions) for i in images) > 0
    for item in images:
        h, w = item.image.shape[:2]
        assert len(item.masks) == len(item.captions) == len(set(item.captions))
        scale = (256 / max(h, w)) ** 2
        assert all(m.sum() * scale >= MIN_INPUT_AREA - scale for m in item.masks)
        assert all(len(c.split()) == 3 for c in item.captions)
