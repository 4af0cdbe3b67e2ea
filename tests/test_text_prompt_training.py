"""Text-prompt training (paper appendix D.5): the crop each mask's CLIP prompt is computed
from, the embedding against CLIP on a hand-cut crop, the first prompts, and one train step."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.clip import CLIP, CLIP_CONFIGS, init_clip_params, preprocess
from sam_jax.modeling import Sam
from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, PADDING
from sam_jax.training.interactive import InteractiveConfig, initial_prompts
from sam_jax.clip.crops import crop_windows, sample_crop
from sam_jax.training.text_prompts import TextPromptConfig, chosen_for_text, crop_embedder
from sam_jax.training.train_step import create_train_state, make_train_step
from sam_jax.weights import init_params
from test_train_step import make_batch, micro_config, setup

TINY_CLIP = CLIP_CONFIGS["tiny"]


def test_crop_windows_are_squares_on_the_longer_side():
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    boxes = jnp.tile(jnp.array([[10.0, 20.0, 30.0, 60.0]]), (200, 1))  # 20 wide, 40 high, centre (20, 40)
    exact = crop_windows(keys[:1], boxes[:1], (1.0, 1.0))
    np.testing.assert_allclose(np.asarray(exact), [[0.0, 20.0, 40.0]])
    windows = np.asarray(crop_windows(keys, boxes, TextPromptConfig().expand_range))
    side = windows[:, 2]
    assert side.min() >= 40.0 and side.max() <= 80.0 and side.max() - side.min() > 20.0  # factor in [1, 2]
    np.testing.assert_allclose(windows[:, 0] + side / 2, 20.0, rtol=1e-6)  # centred on the box
    np.testing.assert_allclose(windows[:, 1] + side / 2, 40.0, rtol=1e-6)


def test_sample_crop_copies_aligned_pixels_and_blacks_out_the_outside():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (64, 64, 3)).astype(np.float32)
    mask = rng.uniform(size=(16, 16)) > 0.5  # low-res: 4 x 4 pixel cells
    crop, region = sample_crop(jnp.asarray(image), jnp.asarray(mask), jnp.array([8.0, 12.0, 32.0]), 32)
    np.testing.assert_allclose(np.asarray(crop), image[12:44, 8:40], rtol=1e-5, atol=1e-3)
    full = np.repeat(np.repeat(mask, 4, 0), 4, 1)
    np.testing.assert_array_equal(np.asarray(region), full[12:44, 8:40])
    # Half the window outside the image (x < 0): black, and outside the mask.
    crop, region = sample_crop(jnp.asarray(image), jnp.asarray(mask), jnp.array([-16.0, 0.0, 32.0]), 32)
    np.testing.assert_allclose(np.asarray(crop)[:, 16:], image[0:32, 0:16], rtol=1e-5, atol=1e-3)
    assert not np.asarray(crop)[:, :15].any() and not np.asarray(region)[:, :16].any()
    # Downsampled 2x: each sample sits between 4 pixels, bilinear is their mean.
    crop, _ = sample_crop(jnp.asarray(image), jnp.asarray(mask), jnp.array([0.0, 0.0, 64.0]), 32)
    means = image.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(crop), means, rtol=1e-5, atol=1e-3)


def test_crop_embedding_equals_clip_on_the_hand_cut_crop():
    """A square box of CLIP's size at integer pixels, no expansion, outside always zeroed: the
    prompt is CLIP's masked embedding of exactly image[y0:y0+64, x0:x0+64] with the rest black."""
    clip = CLIP(TINY_CLIP)
    params = init_clip_params(TINY_CLIP, seed=1)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    masks = np.zeros((1, 3, 64, 64), bool)  # the third: padding (empty, not valid), as the pipeline pads
    masks[0, 0, 6:18, 10:22] = True  # pixels 24:72 x 40:88
    masks[0, 1, 30:40, 30:50] = True
    boxes = np.array([[[32.0, 16.0, 96.0, 80.0], [120.0, 120.0, 200.0, 160.0], [0, 0, 0, 0]]], np.float32)
    config = TextPromptConfig(probability=1.0, expand_range=(1.0, 1.0), zero_outside_probability=1.0)
    embed = crop_embedder(clip, params, jnp.asarray(images), jnp.asarray(masks), jnp.asarray(boxes),
                          jnp.array([[True, True, False]]), config)
    got = np.asarray(embed(jax.random.split(jax.random.PRNGKey(2), 3)))  # eagerly: no empty-region error
    assert not got[2].any()
    region = np.repeat(np.repeat(masks[0, 0], 4, 0), 4, 1)[16:80, 32:96]
    crop = np.where(region[..., None], images[0, 16:80, 32:96], 0)
    want = clip.apply({"params": params}, preprocess(crop[None]), jnp.asarray(region[None]),
                      method=CLIP.encode_image)
    np.testing.assert_allclose(got[0], np.asarray(want[0]), rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(got[1]) == pytest.approx(1.0, abs=1e-5)
    # The frozen tower's params are only read: the prompt has no gradient into them.
    grads = jax.grad(lambda p: jnp.sum(crop_embedder(clip, p, jnp.asarray(images), jnp.asarray(masks),
                                                     jnp.asarray(boxes), jnp.array([[True, True, False]]),
                                                     config)(jax.random.split(jax.random.PRNGKey(2), 3))))(params)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_which_masks_get_a_text_prompt():
    keys = jax.random.split(jax.random.PRNGKey(3), 4000)
    areas = jnp.where(jnp.arange(4000) % 2 == 0, 50.0, 500.0)
    valid = jnp.arange(4000) < 3000
    use = np.asarray(chosen_for_text(keys, areas, valid, TextPromptConfig(probability=0.3, min_area=100)))
    assert not use[::2].any() and not use[3000:].any()  # too small, or not a mask
    assert use[1:3000:2].mean() == pytest.approx(0.3, abs=0.04)


def test_text_prompted_masks_start_with_no_point_and_no_box():
    config = InteractiveConfig(num_correction_points=2, num_mask_only=1, box_probability=0.5)
    k = 64
    keys = jax.random.split(jax.random.PRNGKey(4), k)
    targets = jnp.zeros((k, 32, 32), bool).at[:, 8:20, 8:20].set(True)
    boxes = jnp.tile(jnp.array([[32.0, 32.0, 80.0, 80.0]]), (k, 1))
    hw = jnp.full((k, 2), 128)
    use_text = jnp.arange(k) % 3 == 0
    plain = initial_prompts(keys, targets, boxes, hw, 128, config)
    coords, labels = initial_prompts(keys, targets, boxes, hw, 128, config, use_text)
    labels, plain_labels = np.asarray(labels), np.asarray(plain[1])
    assert (labels[np.asarray(use_text)] == PADDING).all()
    np.testing.assert_array_equal(labels[~np.asarray(use_text)], plain_labels[~np.asarray(use_text)])
    first = plain_labels[:, 0] == FOREGROUND
    boxed = plain_labels[:, 3] == BOX_TOP_LEFT
    assert (first ^ boxed).all() and (plain_labels[boxed, 4] == BOX_BOTTOM_RIGHT).all()


def text_setup_values():
    """The micro model with a text head for the tiny CLIP, its params, and CLIP's frozen image tower."""
    _, opt_config, _, _ = setup()
    config = dataclasses.replace(micro_config(), text_embed_dim=TINY_CLIP.embed_dim)
    model = Sam(config)
    params = init_params(model)
    clip_params = init_clip_params(TINY_CLIP, seed=5)
    frozen = {"clip": {"visual": clip_params["visual"], "logit_scale": clip_params["logit_scale"]}}
    return model, opt_config, params, frozen


@pytest.fixture(scope="module")
def text_setup():
    return text_setup_values()


@pytest.fixture(scope="module")
def text_steps(tmp_path_factory):
    """text_step_worker.py's arrays: the text step on one device, over a Mesh (FSDP) and under pmap."""
    import device_workers

    (arrays,) = device_workers.run_workers(os.path.join(os.path.dirname(__file__), "text_step_worker.py"),
                                           tmp_path_factory.mktemp("text_steps"), 1, 4)
    return arrays


def test_pmap_and_fsdp_text_steps_equal_one_device(text_steps):
    arrays = text_steps
    assert int(arrays["device_count"]) == 4 and int(arrays["frozen_sharded_leaves"]) > 0
    for name in ("mesh", "pmap"):
        for key in ("total_loss", "grad_norm", "loss", "miou", "head"):
            np.testing.assert_allclose(arrays[f"{name}/{key}"], arrays[f"one/{key}"], rtol=2e-4, atol=1e-6,
                                       err_msg=f"{name} {key}")


def test_a_text_prompt_step_trains_the_head_and_leaves_clip_alone(text_steps, text_setup):
    assert np.isfinite(float(text_steps["one/total_loss"])) and not bool(text_steps["one/skipped"])
    assert float(np.abs(text_steps["one/head"] - text_steps["one/head_before"]).max()) > 0  # the text token had a gradient
    assert bool(text_steps["one/frozen_unchanged"])
    # Without text prompts the head gets no gradient: only the text token reaches it.
    model, opt_config, params, _ = text_setup
    head = lambda s: s.params["prompt_encoder"]["text_projection"]["kernel"]
    state = create_train_state(params, opt_config, model.config, seed=0)
    np.testing.assert_array_equal(np.asarray(head(state)), text_steps["one/head_before"])
    off = InteractiveConfig(num_correction_points=0, num_mask_only=0)
    untouched, _ = jax.jit(make_train_step(model, opt_config, off))(state, make_batch(0, b=2))
    grads_free = float(jnp.abs(head(untouched) - head(state)).max())
    # AdamW's weight decay still moves the kernel; compare with the decay alone.
    decayed = head(state) * (1 - opt_config.learning_rate * opt_config.weight_decay)
    assert grads_free <= float(jnp.abs(head(state) - decayed).max()) + 1e-7


def test_text_training_needs_a_text_head_and_clip(text_setup):
    model, opt_config, params, frozen = text_setup
    interactive = InteractiveConfig(text=TextPromptConfig(probability=0.5))
    with pytest.raises(ValueError, match="needs a model with a text head"):
        make_train_step(Sam(micro_config()), opt_config, interactive, clip=CLIP(TINY_CLIP))
    with pytest.raises(ValueError, match="needs a model with a text head.*clip=None"):
        make_train_step(model, opt_config, interactive)
    other = dataclasses.replace(TINY_CLIP, name="tiny32", embed_dim=32)
    with pytest.raises(ValueError, match="embeds to 32 dims, the model's text head takes 64"):
        make_train_step(model, opt_config, interactive, clip=CLIP(other))
    with pytest.raises(ValueError, match=r"text.probability must be in \[0, 1\]"):
        TextPromptConfig(probability=1.5)
    with pytest.raises(ValueError, match="expand_range"):
        TextPromptConfig(expand_range=(0.5, 2.0))


def test_a_training_run_with_text_prompts(tmp_path, synthetic_data_dir):
    """`experiments.train` with a CLIP checkpoint: the run trains, and its export is a
    text-enabled model; without the checkpoint the config is refused by name."""
    from sam_jax import load_sam
    from sam_jax.clip.checkpoint import save_clip
    from test_train_run import run_train

    save_clip(tmp_path / "clip", init_clip_params(TINY_CLIP, seed=6), TINY_CLIP)
    text = ("model.text_embed_dim=64", "interactive.text.probability=0.5")
    code, _, err = run_train(tmp_path / "run", synthetic_data_dir, str(tmp_path / "cache"), *text,
                             f"clip_checkpoint={tmp_path / 'clip'}", "optimizer.total_steps=2",
                             "single_prompt_steps=2")
    assert code == 0, err
    model, params = load_sam(tmp_path / "run" / "model")
    assert model.config.text_embed_dim == 64 and "text_projection" in params["prompt_encoder"]
    code, _, err = run_train(tmp_path / "refused", synthetic_data_dir, str(tmp_path / "cache"), *text,
                             "optimizer.total_steps=2", "single_prompt_steps=2")
    assert code != 0 and "needs model.text_embed_dim (now 64) and clip_checkpoint (now None)" in err
