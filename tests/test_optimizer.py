"""The paper's optimizer recipe (`sam_jax.training.optimizer`) on vit_tiny param trees."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_jax import weights
from sam_jax.weights import abstract_params
from sam_jax.configs import CONFIGS, get_config
from sam_jax.training.optimizer import (
    FROZEN,
    PAPER_RECIPES,
    TRAINABLE,
    OptimizerConfig,
    layer_id,
    layer_scales,
    learning_rate_schedule,
    make_optimizer,
    param_labels,
    scale_by_layer,
    weight_decay_mask,
)

TINY = get_config("vit_tiny")  # depth 4, global blocks (1, 3): 2 scan groups of 2 blocks
BUFFER = "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"


def flat(tree) -> dict:
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.fixture(scope="module")
def abstract():
    return abstract_params(TINY)


def random_tree(abstract, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), abstract)


def plain(**overrides) -> OptimizerConfig:
    """No warmup, no decay steps: constant lr, so the first update is not zero."""
    kw = dict(learning_rate=1e-2, warmup_steps=0, decay_steps=(), total_steps=None)
    return OptimizerConfig(**{**kw, **overrides})


BASE = plain(weight_decay=0.1, layer_decay=0.5)  # strong layer decay: 0.5 ** 5 for patch_embed


@functools.lru_cache(maxsize=None)
def stepper(config: OptimizerConfig, scan_blocks: bool):
    """(optimizer, jitted update), built from ShapeDtypeStructs and compiled once per config."""
    optimizer = make_optimizer(config, abstract_params(TINY, scan_blocks=scan_blocks), TINY)
    return optimizer, jax.jit(optimizer.update)


def run(config, params, grads_seq):
    """Applies the grads in turn: (final params, [updates of each step], final state), numpy."""
    optimizer, update = stepper(config, weights.layout_of(params) == weights.SCANNED)
    state = optimizer.init(params)
    updates_seq = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        updates_seq.append(jax.tree.map(np.asarray, updates))
    return jax.tree.map(np.asarray, params), updates_seq, state


@pytest.fixture(scope="module")
def trees(abstract):
    """params, and two steps of grads (the second 3x larger)."""
    return random_tree(abstract, 0), random_tree(abstract, 1), random_tree(abstract, 2, scale=3.0)


@pytest.fixture(scope="module")
def base_run(trees):
    params, g1, g2 = trees
    return run(BASE, params, [g1, g2])


@pytest.fixture(scope="module")
def frozen_run(trees):
    """BASE with a frozen encoder and clipping at 1.5x the larger decoder grad norm. The
    step-1 encoder grads are huge: counted in the global norm, they would engage it."""
    params, g1, g2 = trees
    g1 = {**g1, "image_encoder": jax.tree.map(lambda x: x * 1e6, g1["image_encoder"])}
    trainable = {p for p, label in flat(param_labels(params, True)).items() if label == TRAINABLE}
    decoder_norms = [global_norm(g, skip=set(flat(g)) - trainable) for g in (g1, g2)]
    assert global_norm(g1) > 1e3 * max(decoder_norms)
    config = dataclasses.replace(
        BASE, freeze_image_encoder=True, grad_clip_norm=1.5 * max(decoder_norms)
    )
    return run(config, params, [g1, g2])


def global_norm(tree, skip=()) -> float:
    squares = [np.sum(np.square(x, dtype=np.float64)) for p, x in flat(tree).items() if p not in skip]
    return float(np.sqrt(sum(squares)))


def expected_layer_id(path: str) -> int:
    """vit_tiny, looped: an independent statement of the MAE/BEiT convention."""
    if path.startswith("image_encoder/patch_embed/") or path == "image_encoder/pos_embed":
        return 0
    m = re.match(r"image_encoder/blocks_(\d+)/", path)
    return int(m.group(1)) + 1 if m else TINY.encoder.depth + 1


# --- schedule -----------------------------------------------------------------


def test_schedule_warmup_then_step_decay():
    schedule = learning_rate_schedule(PAPER_RECIPES["vit_h"])
    expected = {
        0: 0.0,  # linear warmup from 0
        1: 8e-4 / 250,
        125: 4e-4,  # mid-warmup
        249: 8e-4 * 249 / 250,
        250: 8e-4,  # end of warmup
        59_999: 8e-4,
        60_000: 8e-5,  # a step at a boundary already uses the lower lr
        86_665: 8e-5,
        86_666: 8e-6,
        90_000: 8e-6,
    }
    steps = np.array(list(expected), np.int32)
    want = np.array(list(expected.values()), np.float32)
    for got in (
        np.array([schedule(s) for s in expected]),  # Python ints
        np.asarray(jax.jit(jax.vmap(schedule))(steps)),  # traced int32 counts
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.asarray(schedule(0)).dtype == np.float32


def test_schedule_without_warmup_or_decay():
    schedule = learning_rate_schedule(plain(decay_steps=(10,), decay_factor=4.0))
    np.testing.assert_allclose([schedule(0), schedule(9), schedule(10)], [1e-2, 1e-2, 2.5e-3], rtol=1e-6)


# --- layer-wise lr decay ------------------------------------------------------


def test_layer_ids_looped(abstract):
    ids = {path: layer_id(path, TINY.encoder.depth) for path in flat(abstract)}
    assert ids == {path: expected_layer_id(path) for path in ids}
    # spot checks, including key-path and tuple forms of a path
    assert ids["image_encoder/patch_embed/proj/kernel"] == 0
    assert ids["image_encoder/pos_embed"] == 0
    assert ids["image_encoder/blocks_0/attn/rel_pos_h"] == 1
    assert ids["image_encoder/blocks_3/mlp/lin2/bias"] == 4
    assert ids["image_encoder/neck_0/kernel"] == 5
    assert ids["mask_decoder/iou_token/embedding"] == 5
    assert ids[BUFFER] == 5
    assert layer_id(("image_encoder", "blocks_2", "norm1", "scale"), 4) == 3
    key_path = jax.tree_util.tree_flatten_with_path({"image_encoder": {"blocks_1": {"b": 0}}})[0][0][0]
    assert layer_id(key_path, 4) == 2
    with pytest.raises(ValueError, match="block 4 of an encoder with 4 blocks"):
        layer_id("image_encoder/blocks_4/norm1/scale", 4)


def test_layer_ids_and_scales_scanned():
    depth, per_group = TINY.encoder.depth, TINY.encoder.blocks_per_group
    assert per_group == 2
    # block i = group * blocks_per_group + j
    group_ids = lambda path: layer_id("image_encoder/block_groups/" + path, depth, per_group)
    np.testing.assert_array_equal(group_ids("blocks_0/attn/qkv/kernel"), [1, 3])
    np.testing.assert_array_equal(group_ids("blocks_1/norm2/bias"), [2, 4])
    assert layer_id("image_encoder/pos_embed", depth, per_group) == 0
    with pytest.raises(ValueError, match="blocks_per_group"):
        layer_id("image_encoder/block_groups/blocks_0/norm1/scale", depth)

    scanned = flat(layer_scales(abstract_params(TINY, scan_blocks=True), TINY, 0.5))
    qkv = scanned["image_encoder/block_groups/blocks_0/attn/qkv/kernel"]  # leaf (2, 32, 96)
    assert qkv.shape == (2, 1, 1) and qkv.dtype == np.float32
    np.testing.assert_array_equal(qkv.ravel(), [0.5**4, 0.5**2])  # blocks 0 and 2
    bias = scanned["image_encoder/block_groups/blocks_1/mlp/lin1/bias"]  # leaf (2, 128)
    assert bias.shape == (2, 1)
    np.testing.assert_array_equal(bias.ravel(), [0.5**3, 0.5**1])  # blocks 1 and 3
    assert scanned["image_encoder/patch_embed/proj/kernel"] == 0.5**5
    assert scanned["image_encoder/neck_2/kernel"] == 1.0


def test_scanned_per_slice_scales_equal_looped_per_block_scales(abstract):
    looped = layer_scales(abstract, TINY, 0.6)
    as_leaves = jax.tree.map(lambda s: np.full((1,), s, np.float32), looped)  # to stack
    restacked = flat(weights.to_scanned(as_leaves, TINY))
    scanned = flat(layer_scales(abstract_params(TINY, scan_blocks=True), TINY, 0.6))
    assert restacked.keys() == scanned.keys()
    for path, want in restacked.items():
        np.testing.assert_allclose(np.ravel(scanned[path]), want.ravel(), rtol=1e-6, err_msg=path)


def test_scanned_update_equals_looped_update(trees, base_run):
    """Two steps from the same params and grads: the layouts agree leaf for leaf."""
    to_scanned = lambda t: weights.to_scanned(t, TINY)
    to_looped = lambda t: weights.to_looped(t, TINY)
    params, g1, g2 = map(to_scanned, trees)
    assert jax.tree.structure(params) == jax.tree.structure(abstract_params(TINY, scan_blocks=True))
    final, updates, _ = run(BASE, params, [g1, g2])
    looped_final, looped_updates, _ = base_run
    for got, want in zip([final, *updates], [looped_final, *looped_updates]):
        got = flat(to_looped(got))
        for path, expected in flat(want).items():
            np.testing.assert_allclose(got[path], expected, rtol=1e-6, atol=1e-9, err_msg=path)


def test_first_update_is_scaled_adamw(trees, base_run):
    """Step 1 of Adam is g / (|g| + eps); the layer scale multiplies the decay term too."""
    lr, wd, decay = BASE.learning_rate, BASE.weight_decay, BASE.layer_decay
    p, g = flat(trees[0]), flat(trees[1])
    u = flat(base_run[1][0])
    for path in p:
        if path == BUFFER:
            continue
        scale = decay ** (TINY.encoder.depth + 1 - expected_layer_id(path))
        decayed = path.rsplit("/", 1)[-1] in ("kernel", "embedding")
        want = -lr * scale * (g[path] / (np.abs(g[path]) + 1e-8) + (wd * p[path] if decayed else 0))
        np.testing.assert_allclose(u[path], want, rtol=2e-5, atol=1e-12, err_msg=path)


def test_scales_must_match_the_layout(abstract):
    scales = layer_scales(abstract_params(TINY, scan_blocks=True), TINY, 0.5)
    grads = random_tree(abstract, 0)  # looped
    with pytest.raises(ValueError, match="no scale for image_encoder/blocks_0"):
        scale_by_layer(scales).update(grads, optax.EmptyState())
    wrong_groups = weights.to_scanned(grads, TINY)
    norm1 = wrong_groups["image_encoder"]["block_groups"]["blocks_0"]["norm1"]
    norm1["scale"] = np.ones((3, 32), np.float32)
    with pytest.raises(ValueError, match="should lead with 2 groups"):
        layer_scales(wrong_groups, TINY, 0.5)
    with pytest.raises(ValueError, match="do not match vit_b"):
        make_optimizer(OptimizerConfig(), abstract, get_config("vit_b"))


# --- weight decay ---------------------------------------------------------------


def test_weight_decay_mask_by_name(abstract):
    mask = flat(weight_decay_mask(abstract))
    names = lambda decayed: {p.rsplit("/", 1)[-1] for p, m in mask.items() if m == decayed}
    assert names(True) == {"kernel", "embedding"}
    assert names(False) == {
        "bias", "scale", "pos_embed", "rel_pos_h", "rel_pos_w", "positional_encoding_gaussian_matrix"
    }
    assert {p for p, m in mask.items() if m and p.endswith("/embedding")} == {
        "mask_decoder/iou_token/embedding",
        "mask_decoder/mask_tokens/embedding",
        "prompt_encoder/no_mask_embed/embedding",
        "prompt_encoder/not_a_point_embed/embedding",
        *(f"prompt_encoder/point_embeddings_{i}/embedding" for i in range(4)),
    }
    assert sum(mask.values()) == sum(p.endswith(("/kernel", "/embedding")) for p in mask)

    # Scanned: biases and norm scales are 2-D, kernels 3-D; the name decides, not ndim.
    scanned = abstract_params(TINY, scan_blocks=True)
    shapes, scanned_mask = flat(scanned), flat(weight_decay_mask(scanned))
    assert shapes["image_encoder/block_groups/blocks_0/norm1/scale"].shape == (2, 32)
    assert scanned_mask["image_encoder/block_groups/blocks_0/norm1/scale"] is False
    assert scanned_mask["image_encoder/block_groups/blocks_0/attn/qkv/bias"] is False
    assert scanned_mask["image_encoder/block_groups/blocks_1/attn/rel_pos_w"] is False
    assert scanned_mask["image_encoder/block_groups/blocks_1/mlp/lin1/kernel"] is True

    with pytest.raises(ValueError, match="no rule for param mask_decoder/gate"):
        weight_decay_mask({"mask_decoder": {"gate": np.zeros(3)}})


# --- frozen params --------------------------------------------------------------


def state_floats(state) -> int:
    """Number of floats in the optimizer state's non-scalar arrays (mu, nu)."""
    return sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_params_get_exactly_zero_updates_and_no_state(trees, base_run, frozen_run, freeze):
    params = trees[0]
    final, updates_seq, state = frozen_run if freeze else base_run
    labels = flat(param_labels(params, freeze))
    for updates in updates_seq:
        for path, update in flat(updates).items():
            frozen = path == BUFFER or (freeze and path.startswith("image_encoder/"))
            assert labels[path] == (FROZEN if frozen else TRAINABLE), path
            if frozen:
                assert not np.any(update), path
            else:
                assert np.all(update != 0), path  # every element moves, the decoder's included
    for path, x in flat(final).items():
        assert np.array_equal(x, flat(params)[path]) == (labels[path] == FROZEN), path
    trainable = sum(x.size for p, x in flat(params).items() if labels[p] == TRAINABLE)
    state_floats = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert state_floats == 2 * trainable  # AdamW's mu and nu, nothing for frozen params
    float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)


@pytest.mark.parametrize("prefixes", [("mask_decoder/iou_prediction_head",),
                                      ("prompt_encoder", "image_encoder/neck_0")])
def test_trainable_prefixes_train_only_the_params_under_them(trees, prefixes):
    params, g1, g2 = trees
    config = dataclasses.replace(BASE, trainable=prefixes)
    final, updates_seq, state = run(config, params, [g1, g2])
    labels = flat(param_labels(params, trainable=prefixes))
    selected = {p for p in labels if p != BUFFER and any(p.startswith(prefix + "/") for prefix in prefixes)}
    assert selected and {p for p, label in labels.items() if label == TRAINABLE} == selected
    for updates in updates_seq:
        for path, update in flat(updates).items():
            assert np.all(update != 0) if path in selected else not np.any(update), path
    for path, x in flat(final).items():
        assert np.array_equal(x, flat(params)[path]) == (path not in selected), path
    assert state_floats(state) == 2 * sum(flat(params)[p].size for p in selected)  # mu and nu of those only
    assert config.encoder_frozen == ("image_encoder/neck_0" not in prefixes)


def test_a_trainable_prefix_naming_no_param_is_refused(abstract):
    with pytest.raises(ValueError, match=r"optimizer.trainable: 'encoder' names no param; the names under the root are "
                                         r"\['image_encoder', 'mask_decoder', 'prompt_encoder'\]"):
        make_optimizer(OptimizerConfig(trainable=("mask_decoder", "encoder")), abstract, TINY)
    with pytest.raises(ValueError, match=r"'image_encoder/neck' names no param; the names under image_encoder "
                                         r"are \['blocks_0', "):
        make_optimizer(OptimizerConfig(trainable=("image_encoder/neck",)), abstract, TINY)
    with pytest.raises(ValueError, match=r"'image_encoder/blocks_0' names no param; the names under image_encoder are "
                                         r"\['block_groups', "):  # the scanned layout
        make_optimizer(OptimizerConfig(trainable=("image_encoder/blocks_0",)),
                       abstract_params(TINY, scan_blocks=True), TINY)
    with pytest.raises(ValueError, match=r"'image_encoder/pos_embed/x' names no param; image_encoder/pos_embed "
                                         r"is a single param"):
        make_optimizer(OptimizerConfig(trainable=("image_encoder/pos_embed/x",)), abstract, TINY)


def test_encoder_frozen_says_whether_any_encoder_param_trains():
    assert not OptimizerConfig().encoder_frozen and OptimizerConfig(freeze_image_encoder=True).encoder_frozen
    assert OptimizerConfig(trainable=("mask_decoder", "prompt_encoder")).encoder_frozen
    assert not OptimizerConfig(trainable=("image_encoder/neck_0",)).encoder_frozen
    assert OptimizerConfig(trainable=["mask_decoder"]).trainable == ("mask_decoder",)


def test_gaussian_matrix_is_a_frozen_buffer(trees, base_run):
    """A register_buffer in the official model: no update (not even weight decay), no state."""
    params, grads = trees[0], trees[1]
    assert np.all(flat(grads)[BUFFER] != 0)  # it was given a gradient
    final, updates_seq, _ = base_run
    for updates in updates_seq:
        assert not np.any(flat(updates)[BUFFER])
    np.testing.assert_array_equal(flat(final)[BUFFER], flat(params)[BUFFER])
    assert flat(param_labels(params))[BUFFER] == FROZEN
    assert flat(weight_decay_mask(params))[BUFFER] is False


def test_params_must_be_float32(abstract):
    bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), abstract)
    with pytest.raises(ValueError, match="params must be float32.*is bfloat16"):
        make_optimizer(OptimizerConfig(), bf16, TINY)


# --- gradient clipping ----------------------------------------------------------


def test_gradient_clipping_engages_above_the_norm(trees, base_run):
    clip = 1.0
    params, g1, g2 = trees  # global norms ~20 and ~60
    norms = [global_norm(g, skip={BUFFER}) for g in (g1, g2)]  # the frozen buffer does not count
    assert min(norms) > clip
    clipped = dataclasses.replace(BASE, grad_clip_norm=clip)
    got, _, _ = run(clipped, params, [g1, g2])
    rescaled = [jax.tree.map(lambda x: x * (clip / n), g) for g, n in zip((g1, g2), norms)]
    want, _, _ = run(BASE, params, rescaled)
    raw = base_run[0]
    for path in flat(got):
        np.testing.assert_allclose(flat(got)[path], flat(want)[path], rtol=1e-5, atol=1e-8, err_msg=path)
    # and clipping changed the result (Adam is invariant to one global scale, not to two)
    assert max(np.max(np.abs(flat(got)[p] - flat(raw)[p])) for p in flat(got)) > 1e-4

    # Below the threshold nothing changes; two different norms, as Adam would not notice
    # both steps' grads being scaled to the same norm.
    small = [
        jax.tree.map(lambda x: x * (f * clip / n), g) for g, n, f in zip((g1, g2), norms, (0.5, 0.05))
    ]
    below, _, _ = run(clipped, params, small)
    reference, _, _ = run(BASE, params, small)
    for path in flat(below):
        np.testing.assert_allclose(
            flat(below)[path], flat(reference)[path], rtol=1e-6, atol=1e-9, err_msg=path
        )


def test_gradient_clipping_ignores_frozen_grads(base_run, frozen_run):
    """The decoder's grads (norms below the threshold) train exactly as without clipping
    or freezing, although the frozen encoder's grads were huge at step 1."""
    for got, want in zip([frozen_run[0], *frozen_run[1]], [base_run[0], *base_run[1]]):
        for path, expected in flat(want).items():
            if not path.startswith("image_encoder/"):
                np.testing.assert_allclose(
                    flat(got)[path], expected, rtol=1e-6, atol=1e-9, err_msg=path
                )


# --- configs ----------------------------------------------------------------------


def test_paper_recipes():
    assert set(PAPER_RECIPES) == set(CONFIGS) - {"vit_tiny"}
    h, b, l = PAPER_RECIPES["vit_h"], PAPER_RECIPES["vit_b"], PAPER_RECIPES["vit_l"]
    for r in (h, b, l):
        assert (r.b1, r.b2, r.weight_decay, r.warmup_steps) == (0.9, 0.999, 0.1, 250)
        assert r.decay_factor == 10.0
        assert r.grad_clip_norm is None and not r.freeze_image_encoder
    summary = lambda r: (r.learning_rate, r.total_steps, r.decay_steps, r.layer_decay)
    assert summary(h) == (8e-4, 90_000, (60_000, 86_666), 0.8)
    assert summary(b) == (8e-4, 180_000, (120_000, 173_333), 0.6)
    assert summary(l) == (4e-4, 180_000, (120_000, 173_333), 0.8)
    assert OptimizerConfig() == h
    assert OptimizerConfig(decay_steps=[60_000, 86_666]).decay_steps == (60_000, 86_666)


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("b1", 1.0),
        ("b2", -0.1),
        ("eps", 0.0),
        ("weight_decay", -0.1),
        ("warmup_steps", -1),
        ("warmup_steps", 2.5),
        ("decay_steps", 60_000),
        ("decay_steps", (86_666, 60_000)),
        ("decay_steps", (100,)),  # inside the 250-step warmup
        ("decay_steps", (60_000, 90_000)),  # not before total_steps
        ("decay_factor", 0.5),
        ("total_steps", 0),
        ("layer_decay", 0.0),
        ("layer_decay", 1.5),
        ("grad_clip_norm", 0.0),
        ("freeze_image_encoder", "yes"),
        ("trainable", ()),
        ("trainable", "mask_decoder"),
        ("trainable", ("mask_decoder//iou_prediction_head",)),
        ("trainable", ("",)),
        ("trainable", (3,)),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"OptimizerConfig\.{field} must be"):
        OptimizerConfig(**{field: value})
