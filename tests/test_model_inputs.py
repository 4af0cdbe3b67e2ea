"""Malformed model inputs get a ValueError naming the argument and its shape, not an XLA trace."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.modeling import Sam


def test_encoder_rejects_wrong_image_shape(tiny):
    config, _, params = tiny
    with pytest.raises(ValueError, match=r"\(batch, 256, 256, 3\).*\(1, 3, 256, 256\)"):
        Sam(config).apply({"params": params}, jnp.zeros((1, 3, 256, 256)), method=Sam.encode_image)


@pytest.mark.parametrize("kwargs,message", [
    (dict(point_coords=np.zeros((5, 2))), "point_coords and point_labels must be given together"),
    (dict(point_coords=np.zeros((5, 2)), point_labels=np.ones(5)), r"point_coords must be \(B, N, 2\); got shape \(5, 2\)"),
    (dict(point_coords=np.zeros((2, 5, 2)), point_labels=np.ones((2, 4))), r"point_labels must be \(B, N\) = \(2, 5\)"),
    (dict(boxes=np.zeros((2, 2, 2))), r"boxes must be \(B, 4\) XYXY; got shape \(2, 2, 2\)"),
    (dict(mask_inputs=np.zeros((2, 64, 64))), r"mask_inputs must be \(B, 1, 64, 64\); got shape \(2, 64, 64\)"),
    (dict(boxes=np.zeros((2, 4)), mask_inputs=np.zeros((3, 1, 64, 64))), "prompts disagree on the batch size"),
], ids=["labels-missing", "coords-unbatched", "labels-shape", "boxes-shape", "mask-shape", "batch-mismatch"])
def test_decode_names_malformed_prompts(tiny, kwargs, message):
    config, _, params = tiny
    embedding = np.zeros((1, 16, 16, 32), np.float32)
    with pytest.raises(ValueError, match=message):
        Sam(config).apply({"params": params}, embedding, **kwargs, method=Sam.decode)


def test_decode_names_a_wrong_image_embedding(tiny):
    config, _, params = tiny
    with pytest.raises(ValueError, match=r"image_embeddings must be \(1 or B=2, 16, 16, 32\); got shape \(1, 32, 16, 16\)"):
        Sam(config).apply({"params": params}, np.zeros((1, 32, 16, 16)), boxes=np.zeros((2, 4)), method=Sam.decode)


def test_preprocess_padded_equals_preprocess_of_the_unpadded_image():
    from sam_jax.configs import get_config
    from sam_jax.modeling import preprocess, preprocess_padded

    config = get_config("vit_tiny")
    s = config.image_size
    rng = np.random.default_rng(0)
    images = np.zeros((2, s, s, 3), np.uint8)
    sizes = np.array([[s, 170], [90, s]], np.int32)
    for image, (h, w) in zip(images, sizes):
        image[:h, :w] = rng.integers(0, 256, (h, w, 3))
    out = preprocess_padded(jnp.asarray(images), jnp.asarray(sizes), config)
    for i, (h, w) in enumerate(sizes):
        np.testing.assert_array_equal(out[i], preprocess(jnp.asarray(images[i, :h, :w]), config))
    with pytest.raises(ValueError, match="padded images"):
        preprocess_padded(jnp.zeros((2, s, s)), jnp.asarray(sizes), config)


@pytest.mark.parametrize("prompt", ["points+mask", "boxes"])
def test_decode_in_chunks_equals_one_decode(tiny, prompt):
    """8 prompts in chunks of 3 (the last one padded) give Sam.decode's outputs."""
    from sam_jax.modeling import decode_in_chunks

    config, _, params = tiny
    rng = np.random.default_rng(0)
    embedding = jnp.asarray(rng.normal(size=(1, 16, 16, 32)), jnp.float32)
    if prompt == "boxes":
        corners = np.sort(rng.uniform(0, 256, (8, 2, 2)), axis=1)
        kwargs = dict(boxes=corners.transpose(0, 2, 1).reshape(8, 4).astype(np.float32))
    else:
        kwargs = dict(point_coords=rng.uniform(0, 256, (8, 3, 2)).astype(np.float32),
                      point_labels=rng.integers(0, 2, (8, 3)).astype(np.int32),
                      mask_inputs=rng.normal(size=(8, 1, 64, 64)).astype(np.float32))
    expected = Sam(config).apply({"params": params}, embedding, **kwargs, multimask_output=True, method=Sam.decode)
    got = decode_in_chunks(Sam(config), params, embedding, **kwargs, multimask_output=True, chunk=3)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_decoder_chunk_keeps_the_released_decoder_in_cache_on_the_cpu():
    from sam_jax.configs import get_config
    from sam_jax.modeling import decoder_chunk

    assert decoder_chunk(get_config("vit_b"), 64) == 2  # 2 x (64, 64, 256) fp32 = 8 MiB
    assert decoder_chunk(get_config("vit_tiny"), 64) == 64
    assert decoder_chunk(get_config("vit_b"), 1) == 1
