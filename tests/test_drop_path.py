"""Encoder drop path (stochastic depth): a training option that leaves inference untouched."""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from sam_jax import weights
from sam_jax.configs import get_config
from sam_jax.modeling import Sam, image_encoder
from sam_jax.modeling.image_encoder import drop_path, drop_path_rates

CONFIG = get_config("vit_tiny")  # depth 4: blocks_per_group 2, two scan groups
RATE = 0.6
S = CONFIG.image_size
# Four copies of one image: a difference between samples can only come from drop path.
# One batch size everywhere, so the cached jitted encoders compile once for the whole file.
IMAGES = jnp.asarray(np.broadcast_to(np.random.default_rng(0).normal(size=(1, S, S, 3)), (4, S, S, 3)),
                     jnp.float32)


@pytest.fixture(scope="module")
def params():
    """Random looped params (every leaf random, so no branch is trivially zero)."""
    shapes = jax.eval_shape(
        lambda: Sam(CONFIG).init(jax.random.PRNGKey(0), IMAGES[:1], method=Sam.encode_image)["params"]
    )
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32), shapes)


def _apply(model, p, x, deterministic, key=None):
    rngs = None if key is None else {"dropout": key}
    return model.apply({"params": p}, x, deterministic, method=Sam.encode_image, rngs=rngs)


@functools.cache
def _encoder(scan_blocks=False, remat_policy=None, drop_path_rate=RATE):
    """jit(params, images, deterministic, key) -> embeddings, compiled once per option set."""
    model = Sam(CONFIG, scan_blocks=scan_blocks, remat_policy=remat_policy, drop_path_rate=drop_path_rate)
    return jax.jit(functools.partial(_apply, model), static_argnums=2)


def test_helper_drops_a_rate_fraction_of_samples_and_rescales_the_rest():
    r, n = 0.3, 200_000
    branch = jnp.ones((n, 2, 3, 4), jnp.float32)
    out = np.asarray(jax.jit(drop_path)(branch, r, jax.random.PRNGKey(0)))  # traced rate
    per_sample = out.reshape(n, -1)
    # One draw per sample: every element of a sample is dropped or kept together.
    assert np.all(per_sample == per_sample[:, :1])
    dropped = per_sample[:, 0] == 0
    assert abs(dropped.mean() - r) < 0.005, dropped.mean()  # std ~0.001
    np.testing.assert_allclose(per_sample[~dropped, 0], 1 / (1 - r), rtol=1e-6)
    # Unbiased, and rate 0 (the first block under scan, traced) is exactly the identity.
    assert abs(out.mean() - 1.0) < 0.01
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 5, 3))
    np.testing.assert_array_equal(jax.jit(drop_path)(x, 0.0, jax.random.PRNGKey(2)), x)
    # Compute dtype kept.
    assert drop_path(branch[:8].astype(jnp.bfloat16), r, jax.random.PRNGKey(0)).dtype == jnp.bfloat16


def test_rates_are_the_linear_schedule():
    assert drop_path_rates(0.4, 32) == pytest.approx([0.4 * i / 31 for i in range(32)])
    assert drop_path_rates(0.4, 32)[0] == 0.0 and drop_path_rates(0.4, 32)[-1] == pytest.approx(0.4)
    assert drop_path_rates(0.6, 12)[5] == pytest.approx(0.6 * 5 / 11)
    assert drop_path_rates(0.5, 1) == (0.0,)  # torch.linspace(0, r, 1)


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["looped", "scanned"])
def test_blocks_use_their_absolute_index_rate(params, scan_blocks, monkeypatch):
    """Records the rate and rng of every drop_path call the model makes, in execution order."""
    seen, keys = [], []

    def recording(branch, rate, rng):
        def record(r, k):
            seen.append(float(r))
            keys.append(np.asarray(k).tobytes())

        jax.debug.callback(record, rate, jax.random.key_data(rng), ordered=True)
        return drop_path(branch, rate, rng)

    monkeypatch.setattr(image_encoder, "drop_path", recording)
    p = weights.to_scanned(params, CONFIG) if scan_blocks else params
    model = Sam(CONFIG, scan_blocks=scan_blocks, drop_path_rate=RATE)
    encode = jax.jit(lambda p, x, key: model.apply(
        {"params": p}, x, False, method=Sam.encode_image, rngs={"dropout": key}))
    jax.block_until_ready(encode(p, IMAGES, jax.random.PRNGKey(0)))
    jax.effects_barrier()
    schedule = [RATE * i / (CONFIG.encoder.depth - 1) for i in range(CONFIG.encoder.depth)]
    # Two calls per block (attention and MLP branch); looped, block 0 (rate 0.0) skips the draw.
    expected = [r for r in schedule[0 if scan_blocks else 1:] for _ in range(2)]
    assert seen == pytest.approx(expected, abs=1e-6)
    # Every branch draws its own mask: scan iterations get split 'dropout' rngs.
    assert len(set(keys)) == len(keys)


def test_deterministic_is_the_inference_graph_and_ignores_the_rng(params):
    key = jax.random.PRNGKey(1)

    def graph(rate, deterministic, scan_blocks=False):
        model = Sam(CONFIG, scan_blocks=scan_blocks, drop_path_rate=rate)
        p = weights.to_scanned(params, CONFIG) if scan_blocks else params
        return str(jax.make_jaxpr(lambda q, k: _apply(model, q, IMAGES, deterministic, k))(p, key))

    # The same program as without drop path: deterministic (either layout), or training at rate 0.
    inference = graph(0.0, True)
    assert graph(RATE, True) == inference and graph(0.0, False) == inference
    assert graph(RATE, True, scan_blocks=True) == graph(0.0, True, scan_blocks=True)
    assert graph(RATE, False) != inference  # the comparison can tell
    # No 'dropout' rng is needed then (jax.eval_shape traces without running).
    jax.eval_shape(lambda: _apply(Sam(CONFIG, drop_path_rate=RATE), params, IMAGES, True))
    jax.eval_shape(lambda: _apply(Sam(CONFIG), params, IMAGES, False))
    # And numerically: bit-identical, whatever the key.
    expected = _encoder(drop_path_rate=0.0)(params, IMAGES, True, key)
    for k in (1, 2):
        np.testing.assert_array_equal(_encoder()(params, IMAGES, True, jax.random.PRNGKey(k)), expected)


def test_training_mode_depends_on_the_rng_and_differs_per_sample(params):
    encode = _encoder()
    inference = np.asarray(encode(params, IMAGES, True, jax.random.PRNGKey(1)))
    assert np.all(inference == inference[:1])
    a = np.asarray(encode(params, IMAGES, False, jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(encode(params, IMAGES, False, jax.random.PRNGKey(1)), a)  # reproducible
    b = np.asarray(encode(params, IMAGES, False, jax.random.PRNGKey(2)))
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    assert not np.array_equal(a, inference)
    assert len({sample.tobytes() for sample in a}) > 1, "every sample got the same drop-path draw"


def test_training_mode_needs_a_dropout_rng_and_a_valid_rate(params):
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        jax.eval_shape(lambda: _apply(Sam(CONFIG, drop_path_rate=RATE), params, IMAGES, False))
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\); got 1.0"):
        jax.eval_shape(lambda: _apply(Sam(CONFIG, drop_path_rate=1.0), params, IMAGES, True))


def test_looped_and_scanned_both_train_and_agree_when_deterministic(params):
    scanned_params = weights.to_scanned(params, CONFIG)
    looped, scanned = _encoder(), _encoder(scan_blocks=True)
    key = jax.random.PRNGKey(1)
    looped_inference = looped(params, IMAGES, True, key)
    assert relative_error(scanned(scanned_params, IMAGES, True, key), looped_inference) < 1e-6
    for encode, p in ((looped, params), (scanned, scanned_params)):
        inference = np.asarray(encode(p, IMAGES, True, key))
        train = np.asarray(encode(p, IMAGES, False, jax.random.PRNGKey(1)))
        assert np.isfinite(train).all() and not np.array_equal(train, inference)
        assert len({sample.tobytes() for sample in train}) > 1
    # Looped blocks under remat (static deterministic and rate) draw the same masks.
    train = looped(params, IMAGES, False, key)
    remat = _encoder(remat_policy="nothing_saveable")(params, IMAGES, False, key)
    assert relative_error(remat, train) < 1e-6


def test_training_gradients_flow_and_remat_redraws_the_same_masks(params):
    """Scanned + remat: the recomputed forward must draw the masks of the first one."""
    p = weights.to_scanned(params, CONFIG)
    key = jax.random.PRNGKey(4)

    def grads(remat_policy):
        encode = _encoder(scan_blocks=True, remat_policy=remat_policy)
        return jax.jit(jax.grad(lambda q: jnp.sum(encode(q, IMAGES, False, key) ** 2)))(p)

    plain, remat = grads(None), grads("nothing_saveable")
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        assert np.isfinite(a).all()
        assert relative_error(b, a) < 1e-5
    # Every block position gets gradient (some of its 2 groups x 2 branches x 4 samples are kept).
    for j, block in plain["image_encoder"]["block_groups"].items():
        assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(block)), j
