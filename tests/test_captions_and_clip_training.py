"""Object attributes of the synthetic scenes, their captions, and the tiny CLIP's training script."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.clip import CLIP, CLIP_CONFIGS, init_clip_params, load_clip, preprocess
from sam_jax.data import captions
from sam_jax.data.synthetic import Scene, generate_scene
from sam_jax.training.text_prompts import TextPromptConfig, crop_embedder


def _scene_digest(scene: Scene) -> str:
    d = hashlib.sha256()
    for a in (scene.image, scene.masks, scene.parent, scene.level, scene.owner):
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()[:16]


# ---------------------------------------------------------------- attributes


# Computed with the code before Scene gained `kind` and `colour`: recording them draws nothing.
@pytest.mark.parametrize("seed, size, digest", [(3, (256, 256), "21922265db8f8893"),
                                                (11, (120, 333), "70d65a51c855cfda")])
def test_attributes_leave_scenes_unchanged(seed, size, digest):
    assert _scene_digest(generate_scene(seed, *size)) == digest


def test_attributes_describe_the_objects():
    scene = generate_scene(5, 200, 180)
    n = len(scene.masks)
    assert scene.kind.shape == (n,) and scene.colour.shape == (n, 3) and scene.colour.dtype == np.float32
    wholes = scene.level == 0
    assert set(scene.kind[wholes]) <= {"ellipse", "rectangle", "polygon", "blob", "ring"}
    assert set(scene.kind[~wholes]) <= {"ellipse", "rectangle", "polygon", "blob", "band"}
    for i in range(n):
        own = scene.owner == i
        expected = scene.image[own].mean(axis=0) if own.any() else scene.image[scene.masks[i]].mean(axis=0)
        np.testing.assert_allclose(scene.colour[i], expected, rtol=1e-5, atol=1e-3)
    empty = generate_scene(0, 8, 8, min_area=10_000)
    assert empty.kind.shape == (0,) and empty.colour.shape == (0, 3)


# ---------------------------------------------------------------- captions


def _hand_scene() -> Scene:
    """A 100x100 scene: a red rectangle (30x40, a blue part inside), a small yellow ring, a big grey
    ellipse behind, and a tiny red rectangle; background black."""
    h = w = 100
    owner = np.full((h, w), -1, np.int32)
    image = np.zeros((h, w, 3), np.uint8)
    masks = np.zeros((6, h, w), bool)
    masks[0, 50:100, 0:100] = True  # grey ellipse (drawn first; its shape is not checked here)
    masks[1, 10:40, 10:50] = True  # red rectangle: 1200 px = 12% -> large
    masks[2, 15:25, 15:25] = True  # its blue part
    masks[3, 60:70, 60:70] = True  # yellow ring, 100 px; its own pixels cut from the ellipse
    masks[4, 60:70, 20:28] = True  # tiny red rectangle, 80 px
    masks[5, 80:90, 80:90] = True  # a second yellow ring, 100 px
    masks[0] &= ~(masks[3] | masks[4] | masks[5])
    colours = [(128, 128, 128), (220, 20, 20), (20, 40, 220), (240, 230, 30), (220, 20, 20), (240, 230, 30)]
    for i, colour in enumerate(colours):
        own = masks[i].copy()
        if i == 1:
            own &= ~masks[2]
        owner[own] = i
        image[own] = colour
    colour = np.array(colours, np.float32)
    return Scene(image=image, masks=masks, parent=np.array([-1, -1, 1, -1, -1, -1]), level=np.array([0, 0, 1, 0, 0, 0]),
                 owner=owner, kind=np.array(["ellipse", "rectangle", "ellipse", "ring", "rectangle", "ring"]),
                 colour=colour)


def test_captions_on_a_hand_made_scene():
    scene = _hand_scene()
    # areas: ellipse 5000 - 280 = 4720 (47%), rectangle 1200 (12%), rings 100 (1%), tiny 80 (0.8%)
    assert captions.caption(scene, 0) == "large grey ellipse"
    assert captions.caption(scene, 1) == "large red rectangle"
    assert captions.caption(scene, 3) == "small yellow ring"
    assert captions.caption(scene, 4) == "small red rectangle"
    assert captions.caption(scene, 1, image_area=20_000) == "medium red rectangle"  # 6%
    assert captions.captioned_objects(scene) == [0, 1, 3, 4, 5]  # the part (level 1) has none
    assert captions.captioned_objects(scene, min_area=100) == [0, 1, 3, 5]
    # The two yellow rings share a caption: neither is unambiguous.
    assert captions.unique_captions(scene) == {0: "large grey ellipse", 1: "large red rectangle",
                                               4: "small red rectangle"}
    # The tiny red rectangle is not captioned at min_area 100 ...
    assert captions.unique_captions(scene, min_area=100) == {0: "large grey ellipse", 1: "large red rectangle"}


def test_a_whole_mostly_covered_by_its_parts_gets_no_caption():
    scene = _hand_scene()
    masks = scene.masks.copy()
    owner = scene.owner.copy()
    owner[10:40, 10:35] = 2  # the blue part now covers 750 of the rectangle's 1200 pixels
    masks[2] = owner == 2
    scene = Scene(image=scene.image, masks=masks, parent=scene.parent, level=scene.level, owner=owner,
                  kind=scene.kind, colour=scene.colour)
    assert 1 not in captions.captioned_objects(scene)


def test_uncaptioned_wholes_still_make_a_caption_ambiguous():
    scene = _hand_scene()
    kind = scene.kind.copy()
    kind[4] = "ring"
    colour = scene.colour.copy()
    colour[4] = colour[3]  # the tiny rectangle becomes a third small yellow ring, below min_area
    scene = Scene(image=scene.image, masks=scene.masks, parent=scene.parent, level=scene.level, owner=scene.owner,
                  kind=kind, colour=colour)
    assert captions.unique_captions(scene, min_area=100) == {0: "large grey ellipse", 1: "large red rectangle"}


def test_captions_of_a_generated_scene():
    # Checked by eye on the rendered image (seed 3, 256x256).
    scene = generate_scene(3, 256, 256)
    assert captions.unique_captions(scene, min_area=300) == {
        0: "large green rectangle", 1: "medium red ellipse", 5: "medium pink polygon", 8: "medium blue polygon",
        12: "small green rectangle", 15: "small purple polygon"}
    assert captions.caption(scene, 14) == "small orange blob"  # (226, 101, 47)


def test_size_and_colour_words():
    assert [captions.size_word(f) for f in (0.0, 0.0399, 0.04, 0.1199, 0.12, 1.0)] == \
        ["small", "small", "medium", "medium", "large", "large"]
    named = {(255, 0, 0): "red", (0, 0, 255): "blue", (255, 255, 0): "yellow", (0, 128, 0): "green",
             (128, 0, 128): "purple", (255, 165, 0): "orange", (0, 0, 0): "black", (255, 255, 255): "white",
             (128, 128, 128): "grey", (0, 200, 200): "cyan", (255, 150, 200): "pink", (110, 70, 30): "brown",
             (31, 98, 71): "green", (226, 101, 47): "orange"}
    assert {rgb: captions.colour_name(rgb) for rgb in named} == named
    for name, prototypes in captions.COLOURS.items():
        assert all(captions.colour_name(rgb) == name for rgb in prototypes)
    np.testing.assert_allclose(captions.srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(captions.srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.02)


# ---------------------------------------------------------------- tiny CLIP training


def test_accuracy_on_hand_made_embeddings():
    from experiments.train_clip import retrieval_metrics, text_to_crop_top1
    candidates = ["small red ring", "large red ring", "small blue blob"]
    texts = np.eye(3)
    images = np.array([[1.0, 0.1, 0], [0.2, 1.0, 0], [0.9, 0.0, 0.1], [0, 0.3, 1.0]]) * 5  # norms don't matter
    truth = ["small red ring", "large red ring", "large red ring", "small red ring"]
    # predictions: small red ring (right), large red ring (right), small red ring (size wrong),
    # small blue blob (colour and shape wrong, size right)
    metrics = retrieval_metrics(images, truth, candidates, texts)
    assert metrics == {"accuracy": 0.5, "accuracy_size": 0.75, "accuracy_colour": 0.75, "accuracy_shape": 0.75}
    # text -> crop: "small red ring" finds image 0 (right), "large red ring" image 1 (right), "small blue
    # blob" image 3 ("small red ring": wrong)
    assert text_to_crop_top1(images, truth, candidates, texts) == pytest.approx(2 / 3)


def test_contrastive_loss_with_label_equality():
    from experiments.train_clip import contrastive_loss
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.normal(size=(4, 8))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    scale = np.log(10.0)
    logits = 10.0 * x @ y.T
    log_softmax = lambda a: a - np.log(np.exp(a).sum(axis=1, keepdims=True))
    clip = -0.5 * (np.trace(log_softmax(logits)) + np.trace(log_softmax(logits.T))) / 4  # CLIP's, distinct labels
    assert float(contrastive_loss(x, y, jnp.arange(4), scale)) == pytest.approx(clip, rel=1e-5)
    labels = jnp.array([0, 1, 0, 2])  # pairs 0 and 2 share a caption: each row's target is split between them
    target = np.array([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    expected = -0.5 * ((target * log_softmax(logits)).sum(1).mean() + (target * log_softmax(logits.T)).sum(1).mean())
    assert float(contrastive_loss(x, y, labels, scale)) == pytest.approx(expected, rel=1e-5)


def test_prompt_crops_are_sams_training_prompts():
    """The tiny CLIP's crops embed exactly as SAM's training-prompt crops (`crop_embedder`)."""
    from experiments.train_clip import frame_pairs, main_job_preprocess, prompt_crops
    scene = generate_scene(3, 256, 200)
    frame, pairs = frame_pairs(scene, main_job_preprocess(), np.random.default_rng(0), min_area=625)
    assert len(pairs) >= 3
    pairs = pairs[:3]
    low_res = np.stack([p[0] for p in pairs])
    boxes = np.stack([p[1] for p in pairs])
    config = CLIP_CONFIGS["tiny"]
    model, params = CLIP(config), init_clip_params(config)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    crops, regions = prompt_crops(np.repeat(frame[None], 3, axis=0), low_res, boxes, keys, 64)
    ours = model.apply({"params": params}, preprocess(crops), regions, method=CLIP.encode_image)
    embed = crop_embedder(model, params, jnp.asarray(frame[None], jnp.float32), low_res[None], boxes[None],
                          np.ones((1, 3), bool), TextPromptConfig(probability=1.0))
    np.testing.assert_allclose(np.asarray(embed(keys)), np.asarray(ours), atol=1e-5)


def test_train_clip_main_writes_a_checkpoint_and_metrics(tmp_path):
    from experiments import train_clip
    metrics = train_clip.main(["--workdir", str(tmp_path), "--steps", "3", "--batch", "8", "--train-images", "4",
                               "--heldout-images", "3", "--log-every", "1", "--warmup", "1"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_size", "accuracy_colour", "accuracy_shape", "accuracy_all_captions",
                "text_to_crop_top1", "heldout_captions", "heldout_pairs", "train_pairs", "final_loss",
                "logit_scale", "positives", "train_seconds", "steps", "batch", "seed"):
        assert key in written, key
    assert written["steps"] == 3 and written["positives"] == "label_equality"
    assert 0.0 <= written["accuracy"] <= 1.0 and np.isfinite(written["final_loss"])
    assert written["accuracy"] == metrics["accuracy"]
    config, params = load_clip(tmp_path / "clip")
    assert config == CLIP_CONFIGS["tiny"]
    assert np.isfinite(float(params["logit_scale"]))
