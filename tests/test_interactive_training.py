"""The interactive training loop: prompt sampling, the paper's schedule, box-as-corner prompts, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sam_jax.modeling import Sam, preprocess_padded
from test_train_step import micro_config
from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, PADDING
from sam_jax.training import prompt_sampling
from sam_jax.training.losses import sam_loss
from sam_jax.training.interactive import InteractiveConfig, correction_schedule, initial_prompts, interactive_loss, make_decode

MASKS = hnp.arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12)))


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(0, 2**31 - 1))
def test_corrections_lie_in_the_error_region_with_the_right_label(data, seed):
    target = data.draw(MASKS)
    predicted = data.draw(hnp.arrays(np.bool_, target.shape))
    point, label, found = prompt_sampling.sample_correction(jax.random.PRNGKey(seed), predicted, target, 48)
    error = predicted != target
    assert bool(found) == error.any()
    if error.any():
        h, w = target.shape
        # Back from the input frame (T = 48) to the mask pixel whose cell centre the point is.
        col = int(round((float(point[0]) + 0.5) * w / 48 - 0.5))
        row = int(round((float(point[1]) + 0.5) * h / 48 - 0.5))
        assert error[row, col]
        assert int(label) == (FOREGROUND if target[row, col] else 0)


@settings(max_examples=100, deadline=None)
@given(MASKS, st.integers(0, 2**31 - 1))
def test_first_point_lies_in_the_mask(mask, seed):
    index, found = prompt_sampling.sample_pixel(jax.random.PRNGKey(seed), jnp.asarray(mask))
    assert bool(found) == mask.any()
    if mask.any():
        assert mask.reshape(-1)[int(index)]


def test_points_are_uniform_over_the_region():
    region = np.zeros((4, 5), bool)
    region[[0, 1, 3, 3], [1, 4, 0, 2]] = True
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    indices = np.asarray(jax.vmap(lambda k: prompt_sampling.sample_pixel(k, jnp.asarray(region))[0])(keys))
    counts = np.bincount(indices, minlength=20)[region.reshape(-1)]
    assert counts.sum() == 4000 and np.all(np.abs(counts - 1000) < 120)  # ~4 sigma


def test_noisy_box_statistics_and_limits():
    box = jnp.array([100.0, 50.0, 400.0, 100.0])  # 300 wide (std 30 -> clipped at 20), 50 high (std 5)
    keys = jax.random.split(jax.random.PRNGKey(1), 2000)
    boxes = np.asarray(jax.vmap(lambda k: prompt_sampling.noisy_box(k, box, jnp.array([120, 1000])))(keys))
    noise = boxes - np.asarray(box)
    assert np.abs(noise).max() <= 20 + 1e-4
    assert abs(noise[:, 1].std() - 5.0) < 0.4
    assert np.abs(noise[:, 0]).max() == pytest.approx(20.0)  # std 30 saturates at the 20 px cap
    assert (boxes[:, 3] <= 120).all() and (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()


def test_schedule_is_the_papers():
    config = InteractiveConfig()
    adds = np.asarray(correction_schedule(jax.random.split(jax.random.PRNGKey(0), 500), config))
    assert adds.shape == (10, 500)  # iterations 2..11
    assert (adds.sum(axis=0) == 8).all()  # 8 add a point, 2 add none
    assert not adds[-1].any()  # the last adds none
    places = np.argmin(adds[:-1], axis=0)  # the other mask-only iteration: anywhere among the first 9
    assert set(places.tolist()) == set(range(9))
    assert config.num_iterations == 11
    no_mask_only = InteractiveConfig(num_mask_only=0)
    assert np.asarray(correction_schedule(jax.random.split(jax.random.PRNGKey(0), 3), no_mask_only)).all()
    assert no_mask_only.num_iterations == 9


@pytest.fixture(scope="module")
def tiny():
    """test_train_step's micro model (vit_tiny at 128 px, 2 blocks, 1 decoder layer): these tests
    compile the whole loop, and what they check does not depend on the model's size."""
    config = micro_config()
    model = Sam(config)
    n = config.encoder.image_size
    low = config.low_res_mask_size
    params = model.init(  # every prompt kind, so every param exists
        jax.random.PRNGKey(0), jnp.zeros((1, n, n, 3)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1)), jnp.zeros((1, 4)),
        jnp.zeros((1, 1, low, low)),
    )["params"]
    return model, params


def test_box_corner_labels_embed_as_the_box_prompt(tiny):
    model, params = tiny
    e = model.config.embedding_size
    embedding = jax.random.normal(jax.random.PRNGKey(1), (1, e, e, model.config.prompt_embed_dim))
    box = jnp.array([[20.0, 30.0, 150.0, 200.0]])
    decode = lambda *a, **k: model.apply({"params": params}, embedding, *a, method=Sam.decode, **k)
    via_box = decode(boxes=box)
    coords = jnp.array([[[7.0, 9.0], [0.0, 0.0], [20.0, 30.0], [150.0, 200.0]]])
    labels = jnp.array([[PADDING, PADDING, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]])
    for a, b in zip(via_box, decode(coords, labels)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # A point and a box given as corners equal the official point + box prompt (no pad point).
    point = jnp.array([[[60.0, 70.0]]])
    official = decode(point, jnp.array([[FOREGROUND]]), box)
    labels = jnp.array([[FOREGROUND, PADDING, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]])
    for a, b in zip(official, decode(coords.at[:, 0].set(point[:, 0]), labels)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # A point in the buffer with the box slots padded equals the official point prompt (pad point added).
    official = decode(point, jnp.array([[FOREGROUND]]))
    labels = jnp.array([[FOREGROUND, PADDING, PADDING, PADDING]])
    for a, b in zip(official, decode(coords.at[:, 0].set(point[:, 0]), labels)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_initial_prompts_fill_the_buffer():
    config = InteractiveConfig()
    targets = jnp.zeros((400, 16, 16), bool).at[:, 4:12, 2:10].set(True)
    boxes = jnp.tile(jnp.array([[8.0, 16.0, 40.0, 48.0]]), (400, 1))
    coords, labels = initial_prompts(jax.random.split(jax.random.PRNGKey(0), 400), targets, boxes, jnp.full((400, 2), 64), 64, config)
    labels, coords = np.asarray(labels), np.asarray(coords)
    assert labels.shape == (400, 11)
    box_mode = labels[:, 9] == BOX_TOP_LEFT
    assert 150 < box_mode.sum() < 250  # equal odds
    assert (labels[box_mode][:, 0] == PADDING).all() and (labels[box_mode][:, 10] == BOX_BOTTOM_RIGHT).all()
    point_mode = ~box_mode
    assert (labels[point_mode][:, 0] == FOREGROUND).all() and (labels[point_mode][:, 9:] == PADDING).all()
    assert (labels[:, 1:9] == PADDING).all()
    box_coords = coords[box_mode][:, 9:].reshape(-1, 4)
    noise = box_coords - [8, 16, 40, 48]
    assert abs(noise.std() - 3.2) < 0.5 and np.abs(noise).max() <= 20  # std 10% of the 32 px sides
    x, y = coords[point_mode, 0, 0], coords[point_mode, 0, 1]  # inside the mask (cells 2..9, 4..11 of 4 px)
    assert (x >= 8).all() and (x < 40).all() and (y >= 16).all() and (y < 48).all()


def _batch(b=2, m=3, t=128, low=32, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((b, m, t, t), bool)
    boxes = np.zeros((b, m, 4), np.float32)
    for i in range(b):
        for j in range(m):
            x0, y0 = rng.integers(0, t - 40, 2)
            w, h = rng.integers(10, 40, 2)
            masks[i, j, y0 : y0 + h, x0 : x0 + w] = True
            boxes[i, j] = (x0, y0, x0 + w, y0 + h)
    low_res = masks.reshape(b, m, low, t // low, low, t // low).mean(axis=(3, 5)) >= 0.5
    valid = np.ones((b, m), bool)
    valid[1, 2] = False
    return {
        "image": rng.integers(0, 256, (b, t, t, 3), dtype=np.uint8),
        "masks": masks, "masks_low_res": low_res, "boxes": boxes, "mask_valid": valid,
        "image_size": np.full((b, 2), t, np.int32),
    }


def test_every_correction_lies_in_the_previous_error_region():
    """Run the loop eagerly with a stand-in decoder and check each added point against what it was shown."""
    config = InteractiveConfig()
    batch = jax.tree.map(jnp.asarray, _batch(t=256, low=64))
    seen = []

    def decode(embeddings, coords, labels, mask_inputs, multimask):
        b, m = coords.shape[:2]
        c = 3 if multimask else 1
        step = jnp.sum(labels != PADDING) + (0 if mask_inputs is None else 1)  # differs between iterations
        key = jax.random.fold_in(jax.random.PRNGKey(0), step)
        logits = jax.random.normal(key, (b, m, c, 64, 64)) + 0.5 * (batch["masks_low_res"][:, :, None] - 0.5)
        shown = jnp.zeros((b, m, 1, 64, 64)) if mask_inputs is None else mask_inputs
        jax.debug.callback(lambda *a: seen.append(tuple(np.array(x, copy=True) for x in a)), coords, labels, shown,
                           ordered=True)
        return logits, jax.random.uniform(key, (b, m, c))

    loss, metrics = jax.jit(lambda key: interactive_loss(decode, jnp.zeros((2, 1, 1, 1)), batch, key, config, 256))(
        jax.random.split(jax.random.PRNGKey(0), 2)
    )
    assert len(seen) == 11 and metrics["loss"].shape == (11,)
    targets = np.asarray(batch["masks_low_res"]).reshape(6, 64, 64)
    valid = np.asarray(batch["mask_valid"]).reshape(6)
    added = 0
    for (coords, labels, _), (new_coords, new_labels, fed_back) in zip(seen, seen[1:]):
        coords, labels = coords.reshape(6, 11, 2), labels.reshape(6, 11)
        new_coords, new_labels = new_coords.reshape(6, 11, 2), new_labels.reshape(6, 11)
        predicted = fed_back.reshape(6, 64, 64) > 0
        for k in range(6):
            changed = np.flatnonzero(new_labels[k] != labels[k])
            assert changed.size <= 1 and set(changed) <= set(range(1, 9))
            if changed.size:
                assert valid[k]
                x, y = new_coords[k, changed[0]]
                row, col = int(round((y + 0.5) / 4 - 0.5)), int(round((x + 0.5) / 4 - 0.5))
                assert predicted[k, row, col] != targets[k, row, col]
                assert new_labels[k, changed[0]] == (FOREGROUND if targets[k, row, col] else 0)
                added += 1
    assert added == 8 * int(valid.sum())  # random predictions always leave errors to correct
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("supervise_all_iou", [False, True])
def test_iou_loss_supervises_the_chosen_candidate_or_all(supervise_all_iou):
    """A multimask step's IoU loss is `sam_loss`'s: of the lowest-loss candidate, or of all three
    with `supervise_all_iou` (SAM 2's option)."""
    batch = jax.tree.map(jnp.asarray, _batch(t=256, low=64))
    logits = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 3, 64, 64)) + 2.0 * (batch["masks_low_res"][:, :, None] - 0.5)
    iou = jax.random.uniform(jax.random.PRNGKey(6), (2, 3, 3))
    decode = lambda embeddings, coords, labels, mask_inputs, multimask: (logits, iou)
    config = InteractiveConfig(num_correction_points=0, num_mask_only=0, supervise_all_iou=supervise_all_iou)
    _, metrics = interactive_loss(decode, jnp.zeros((2, 1, 1, 1)), batch, jax.random.split(jax.random.PRNGKey(0), 2),
                                  config, 256)
    iou_loss = lambda all_iou: float(sam_loss(
        logits.reshape(6, 3, 64, 64), iou.reshape(6, 3), batch["masks_low_res"].reshape(6, 64, 64),
        batch["mask_valid"].reshape(6), supervise_all_iou=all_iou)[1]["iou"])
    np.testing.assert_allclose(metrics["iou_loss"][0], iou_loss(supervise_all_iou), rtol=1e-6)
    assert abs(iou_loss(supervise_all_iou) - iou_loss(not supervise_all_iou)) > 1e-3


def loop_loss_and_grads(model, **config_changes):
    """(params, batch, keys) -> ((loss, metrics), grads) of the interactive loop (2 corrections,
    1 mask-only iteration) through the image encoder and the decoder; not jitted."""
    config = InteractiveConfig(num_correction_points=2, num_mask_only=1, **config_changes)

    def loss_fn(params, batch, keys):
        images = preprocess_padded(batch["image"], batch["image_size"], model.config)
        embeddings = model.apply({"params": params}, images, method=Sam.encode_image)
        return interactive_loss(make_decode(model, params), embeddings, batch, keys, config, 128)

    return jax.value_and_grad(loss_fn, has_aux=True)


@pytest.fixture(scope="module")
def default_loop(tiny):
    """The default loop's jitted loss and gradients, compiled once for this file's tests, and the
    list its tracing appends to."""
    traces = []

    @jax.jit
    def loss_and_grads(params, batch, keys):
        traces.append(1)
        return loop_loss_and_grads(tiny[0])(params, batch, keys)

    return loss_and_grads, traces


def test_gradients_reach_encoder_and_decoder_and_no_recompile(tiny, default_loop):
    _, params = tiny
    loss_and_grads, traces = default_loop
    batch = jax.tree.map(jnp.asarray, _batch())
    (loss, metrics), grads = loss_and_grads(params, batch, jax.random.split(jax.random.PRNGKey(0), 2))
    assert np.isfinite(float(loss)) and metrics["miou"].shape == (4,)
    norms = {name: float(optax_global_norm(grads[name])) for name in ("image_encoder", "mask_decoder", "prompt_encoder")}
    assert all(v > 0 and np.isfinite(v) for v in norms.values()), norms
    loss_and_grads(params, batch, jax.random.split(jax.random.PRNGKey(1), 2))
    assert len(traces) == 1


@pytest.mark.parametrize("variant", [dict(mask_chunks=3, image_groups=2), dict(remat=False, image_groups=2)])
def test_mask_chunks_remat_and_image_groups_give_the_same_losses_and_gradients(tiny, default_loop, variant):
    """Decoding each image's masks in rematerialised chunks, or not rematerialising the iterations,
    and decoding the images in independent groups, change nothing but memory and time."""
    model, params = tiny
    batch = jax.tree.map(jnp.asarray, _batch())
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    (loss, metrics), grads = default_loop[0](params, batch, keys)
    (variant_loss, variant_metrics), variant_grads = jax.jit(loop_loss_and_grads(model, **variant))(params, batch, keys)
    np.testing.assert_allclose(variant_loss, loss, rtol=1e-5)
    for name in metrics:
        np.testing.assert_allclose(variant_metrics[name], metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Summation order differs: gradients that cancel to ~0 differ at fp32 noise of the largest ones.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(variant_grads)[0], jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="mask_chunks=2 must divide the masks per image"):
        config = InteractiveConfig(mask_chunks=2)
        interactive_loss(make_decode(model, params), jnp.zeros((2, 8, 8, 256)), batch, keys, config, 128)


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_config_errors():
    with pytest.raises(ValueError, match="num_correction_points and num_mask_only"):
        InteractiveConfig(num_correction_points=-1)
    with pytest.raises(ValueError, match="mask_chunks and image_groups must be >= 1"):
        InteractiveConfig(mask_chunks=0)
    with pytest.raises(ValueError, match="mask_chunks and image_groups must be >= 1"):
        InteractiveConfig(image_groups=0)
    with pytest.raises(ValueError, match="box_probability"):
        dataclasses.replace(InteractiveConfig(), box_probability=2.0)
    with pytest.raises(ValueError, match="max_masks must be None or >= 1"):
        InteractiveConfig(max_masks=0)
