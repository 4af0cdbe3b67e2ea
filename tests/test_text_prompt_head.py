"""The prompt encoder's optional text-prompt head (paper section 7.5): a CLIP embedding
projected to one sparse token placed first. Absent from the released configs' params,
recorded in a text-enabled checkpoint, and an exact sparse token in the decoder."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.configs import CONFIGS, SamConfig
from sam_jax.errors import CheckpointError
from sam_jax.modeling import Sam
from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, FOREGROUND, PADDING
from sam_jax.tree_paths import flatten
from sam_jax.weights import abstract_params, init_params, load_params, load_sam, save_params

E = 24  # CLIP embedding size of the test head
TEXT = dataclasses.replace(CONFIGS["vit_tiny"], name="vit_tiny_text", text_embed_dim=E)


@pytest.fixture(scope="module")
def text_model():
    model = Sam(TEXT)
    params = init_params(model)
    e = TEXT.embedding_size
    embedding = jax.random.normal(jax.random.PRNGKey(1), (1, e, e, TEXT.prompt_embed_dim))
    return model, params, embedding


def decode(model, params, embedding, **prompts):
    return model.apply({"params": params}, embedding, **prompts, method=Sam.decode)


def unit(key, b=2):
    x = jax.random.normal(key, (b, E))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_b", "vit_h"])
def test_released_configs_have_no_text_head(name):
    paths = flatten(abstract_params(CONFIGS[name]))
    assert not any("text" in path for path in paths)
    assert not CONFIGS[name].has_text_prompts


def test_text_head_params_and_config_round_trip():
    head = {p: a.shape for p, a in flatten(abstract_params(TEXT)).items() if "text" in p}
    assert head == {"prompt_encoder/text_projection/kernel": (E, TEXT.prompt_embed_dim),
                    "prompt_encoder/text_projection/bias": (TEXT.prompt_embed_dim,)}
    assert SamConfig.from_dict(TEXT.to_dict()) == TEXT
    # A config written before the field existed reads as a model without the head.
    old = TEXT.to_dict()
    del old["text_embed_dim"]
    assert SamConfig.from_dict(old).text_embed_dim is None


@pytest.mark.parametrize("value", [0, -3, 2.5, "768"])
def test_text_embed_dim_is_checked(value):
    with pytest.raises(ValueError, match="text_embed_dim"):
        dataclasses.replace(TEXT, text_embed_dim=value)


def test_text_token_is_an_exact_sparse_token(text_model):
    """A head that maps every embedding to the top-left box corner's token, with the
    bottom-right corner given as a point, is the box prompt: same logits and IoU."""
    model, params, embedding = text_model
    box = jnp.array([[30.0, 40.0, 150.0, 200.0]])
    corner = model.apply({"params": params}, box, method=lambda m, b: m.prompt_encoder.embed_boxes(b))[:, 0]
    head = {"kernel": jnp.zeros((E, TEXT.prompt_embed_dim)), "bias": corner[0]}
    swapped = dict(params)
    swapped["prompt_encoder"] = {**params["prompt_encoder"], "text_projection": head}
    want = decode(model, params, embedding, boxes=box)
    got = decode(model, swapped, embedding, text_embeddings=unit(jax.random.PRNGKey(2), 1),
                 point_coords=box[:, None, 2:], point_labels=jnp.array([[BOX_BOTTOM_RIGHT]]))
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_padding_points_after_the_text_token_are_masked_out(text_model):
    model, params, embedding = text_model
    text = unit(jax.random.PRNGKey(3))
    coords = jnp.array([[[60.0, 70.0]], [[120.0, 30.0]]])
    labels = jnp.full((2, 1), FOREGROUND)
    padded_coords = jnp.concatenate([coords, jnp.full((2, 3, 2), 9.0)], 1)
    padded_labels = jnp.concatenate([labels, jnp.full((2, 3), PADDING)], 1)
    want = decode(model, params, embedding, text_embeddings=text, point_coords=coords, point_labels=labels)
    got = decode(model, params, embedding, text_embeddings=text, point_coords=padded_coords,
                 point_labels=padded_labels)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_text_alone_and_the_text_changes_the_masks(text_model):
    model, params, embedding = text_model
    a, b = unit(jax.random.PRNGKey(4)), unit(jax.random.PRNGKey(5))
    logits_a, iou_a = decode(model, params, embedding, text_embeddings=a)
    logits_b, _ = decode(model, params, embedding, text_embeddings=b)
    m = TEXT.low_res_mask_size
    assert logits_a.shape == (2, 3, m, m) and iou_a.shape == (2, 3)
    assert float(jnp.abs(logits_a - logits_b).max()) > 1e-3
    # Per-row: the two prompts of a batch are decoded independently.
    row, _ = decode(model, params, embedding, text_embeddings=a[1:])
    np.testing.assert_allclose(np.asarray(row[0]), np.asarray(logits_a[1]), rtol=1e-5, atol=1e-5)


def test_bad_text_prompts_are_named(text_model):
    model, params, embedding = text_model
    with pytest.raises(ValueError, match=r"text_embeddings must be \(B, 24\).*\(2, 16\)"):
        decode(model, params, embedding, text_embeddings=jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        decode(model, params, embedding, text_embeddings=jnp.zeros((2, E)), boxes=jnp.zeros((3, 4)))
    plain = Sam(CONFIGS["vit_tiny"])
    plain_params = dict(params)
    plain_params["prompt_encoder"] = {k: v for k, v in params["prompt_encoder"].items() if k != "text_projection"}
    with pytest.raises(ValueError, match="has no text-prompt head"):
        decode(plain, plain_params, embedding, text_embeddings=jnp.zeros((1, E)))


def test_checkpoint_records_the_text_head(text_model, tmp_path):
    model, params, embedding = text_model
    save_params(tmp_path / "text", params, TEXT)
    loaded_model, loaded = load_sam(tmp_path / "text")
    assert loaded_model.config.text_embed_dim == E
    text = unit(jax.random.PRNGKey(6), 1)
    want = decode(model, params, embedding, text_embeddings=text)
    got = decode(loaded_model, loaded, embedding, text_embeddings=text)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    # Strict: the head's params cannot be saved as, or pass for, a model without it.
    with pytest.raises(CheckpointError, match="text_projection"):
        save_params(tmp_path / "plain", params, CONFIGS["vit_tiny"])
    config, _ = load_params(tmp_path / "text")
    assert config == TEXT


def test_a_zero_row_is_no_text_prompt(text_model):
    """Rows of zeros are masked out: a batch mixing text and no text decodes each row as alone."""
    model, params, embedding = text_model
    boxes = jnp.array([[30.0, 40.0, 150.0, 200.0], [10.0, 20.0, 90.0, 60.0]])
    text = unit(jax.random.PRNGKey(7), 1)
    mixed = jnp.concatenate([jnp.zeros((1, E)), text])
    got = decode(model, params, embedding, boxes=boxes, text_embeddings=mixed)
    without = decode(model, params, embedding, boxes=boxes[:1])
    with_text = decode(model, params, embedding, boxes=boxes[1:], text_embeddings=text)
    for g, w0, w1 in zip(got, without, with_text):
        np.testing.assert_allclose(np.asarray(g[0]), np.asarray(w0[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g[1]), np.asarray(w1[0]), rtol=1e-5, atol=1e-5)
    # No prompt at all but the zero row: finite masks (the output tokens still attend).
    logits, iou = decode(model, params, embedding, text_embeddings=jnp.zeros((1, E)))
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(iou)).all()
