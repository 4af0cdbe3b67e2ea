"""Text prompts end to end (paper section 7.5): CLIP checkpoints in sam_jax's format, the
converter command, `ClipTextEncoder`, `SamPredictor(text_encoder=...)` / `SamBatchPredictor`
with `text=`, and `sam-jax segment --text --clip-checkpoint`.

vit_tiny with a text-prompt head (text_embed_dim 64, random head) and the `tiny` CLIP (random
weights, embed_dim 64). The predictor's results equal the low-level path: the CLIP text embedding
computed by hand (`ClipTokenizer` + `CLIP.encode_text`), `Sam.decode(text_embeddings=...)` on the
unpadded prompts, and the predictor's postprocessing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before any torchvision stand-in (see test_clip_parity)
from PIL import Image
from safetensors.numpy import save_file
from transformers import CLIPModel  # noqa: F401  the lazy import resolved now, at collection

from checkpoints_convert import clip as convert
from test_clip_parity import hf_model, numpy_state_dict

from experiments.sample_image import synthetic_image
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.cli import main
from sam_jax.clip import CLIP, CLIP_CONFIGS, ClipTextEncoder, ClipTokenizer, init_clip_params, load_clip, save_clip
from sam_jax.clip import text_encoder as text_encoder_module
from sam_jax.configs import CONFIGS
from sam_jax.errors import CheckpointError
from sam_jax.modeling import Sam, postprocess_masks
from sam_jax.predictor import SamPredictor
from sam_jax.tree_paths import flatten, unflatten
from sam_jax.weights import load_sam, save_params

E = 64  # the tiny CLIP's embed_dim
TEXT = dataclasses.replace(CONFIGS["vit_tiny"], name="vit_tiny_text", text_embed_dim=E)
CLIP_TINY = CLIP_CONFIGS["tiny"]
H, W = 120, 160
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sam_text(tiny):
    """(model, params): vit_tiny's random official weights plus a random text-prompt head."""
    _, _, params = tiny
    rng = np.random.default_rng(0)
    params = dict(params)
    head = {"kernel": rng.standard_normal((E, TEXT.prompt_embed_dim)).astype(np.float32),
            "bias": 0.1 * rng.standard_normal(TEXT.prompt_embed_dim).astype(np.float32)}
    params["prompt_encoder"] = {**params["prompt_encoder"], "text_projection": head}
    return Sam(TEXT), jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def clip_params():
    return init_clip_params(CLIP_TINY, seed=0)


@pytest.fixture(scope="module")
def encoder(clip_params):
    return ClipTextEncoder(CLIP_TINY, clip_params)


@pytest.fixture(scope="module")
def predictor(sam_text, encoder):
    p = SamPredictor(*sam_text, text_encoder=encoder)
    p.set_image(synthetic_image(H, W, seed=1))
    return p


def by_hand(clip_params, phrases):
    """CLIP text embeddings computed directly: the tokenizer and `CLIP.encode_text`."""
    tokens = ClipTokenizer()(phrases, context_length=CLIP_TINY.text.context_length)
    return CLIP(CLIP_TINY).apply({"params": clip_params}, tokens, method=CLIP.encode_text)


def low_level(predictor, text_embeddings, coords=None, labels=None, box=None, multimask=True):
    """`Sam.decode` on unpadded prompts moved to the input frame, then the predictor's
    postprocessing: (masks as logits, iou, low-res logits)."""
    t, size = predictor.transform, predictor.original_size
    coords = None if coords is None else jnp.asarray(t.apply_coords(np.asarray(coords, float), size), jnp.float32)
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    box = None if box is None else jnp.asarray(t.apply_boxes(np.asarray(box, float), size), jnp.float32)
    low_res, iou = _decode(predictor.model, predictor.params, predictor.features, coords, labels, box, multimask,
                           text_embeddings)
    masks = postprocess_masks(low_res, predictor.input_size, size, TEXT.image_size)
    return np.asarray(masks), np.asarray(iou), np.asarray(low_res)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _decode(model, params, features, coords, labels, box, multimask, text_embeddings):
    """`Sam.decode`, jitted (faster than op by op on the CPU), on exactly the prompts given."""
    return model.apply({"params": params}, features, coords, labels, box, None, multimask, text_embeddings,
                       method=Sam.decode)


def assert_close(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, **TOL)


# ----------------------------------------------------------------------------- the text encoder


def test_encoder_equals_clip_and_compiles_once_per_bucket(encoder, clip_params):
    phrases = ["a red circle", "a wheel", "beaver tooth grille"]
    got = encoder(phrases)
    assert got.dtype == np.float32 and got.shape == (3, E)
    np.testing.assert_allclose(got, by_hand(clip_params, phrases), **TOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(encoder("a wheel")[0], got[1], **TOL)  # a str is one phrase; bucket 1 vs 4
    before = text_encoder_module.encode_tokens._cache_size()
    encoder(phrases + ["a dog"])  # 4: the bucket of 3
    assert text_encoder_module.encode_tokens._cache_size() == before
    encoder(phrases * 2)  # 6 -> 8: one more
    assert text_encoder_module.encode_tokens._cache_size() == before + 1


def test_encoder_errors_and_truncation(encoder, clip_params):
    long = " ".join(["word"] * 40)  # > 32 tokens
    for texts, message in [("", r"text '' is empty"), (["a", "   "], r"text 1 '   ' is empty"),
                           (long, "over the context length of 32"), (5, "not a str|int"),
                           (["a", 7], r"text 1 7 is a int, not a str"), ([], "empty sequence")]:
        with pytest.raises(ValueError, match=message):
            encoder(texts)
    truncating = ClipTextEncoder(CLIP_TINY, clip_params, truncate=True)
    tokens = ClipTokenizer()(long, context_length=32, truncate=True)
    want = CLIP(CLIP_TINY).apply({"params": clip_params}, tokens, method=CLIP.encode_text)
    np.testing.assert_allclose(truncating(long), want, **TOL)


# ----------------------------------------------------------------------------- SamPredictor


def test_predict_text_equals_decode_by_hand(predictor, clip_params):
    embedding = by_hand(clip_params, ["a red circle"])
    got = predictor.predict(text="a red circle", return_logits=True)
    want = low_level(predictor, embedding)
    assert_close(got, tuple(w[0] for w in want))
    masks, _, _ = predictor.predict(text="a red circle")
    np.testing.assert_array_equal(masks, want[0][0] > TEXT.mask_threshold)
    other = predictor.predict(text="a blue square", return_logits=True)
    assert np.abs(other[2] - got[2]).max() > 1e-3  # the phrase matters


def test_text_and_a_corrective_click(predictor, clip_params):
    """Text first, then a point (the paper's figure): both prompts in one decode; points padded to 4."""
    embedding = by_hand(clip_params, ["a wheel"])
    coords, labels = np.array([[50.0, 60.0], [100.0, 30.0], [10.0, 110.0]]), np.array([1, 0, 1])
    got = predictor.predict(coords, labels, text="a wheel", multimask_output=False, return_logits=True)
    want = low_level(predictor, embedding, coords[None], labels[None], multimask=False)
    assert_close(got, tuple(w[0] for w in want))
    points_only = predictor.predict(coords, labels, multimask_output=False, return_logits=True)
    assert np.abs(points_only[2] - got[2]).max() > 1e-3
    # With a box and the feedback mask too.
    box = np.array([20.0, 10.0, 140.0, 100.0])
    refined = predictor.predict(coords[:1], labels[:1], box, got[2], text="a wheel", return_logits=True)
    assert refined[0].shape == (3, H, W) and np.isfinite(refined[1]).all()


def test_predict_batch_equals_one_by_one_and_unpadded(predictor, clip_params):
    """Three phrases (padded to 4 prompts, padding rows 'no text') with a box each."""
    phrases = ["a red circle", "a wheel", "a dog"]
    boxes = np.array([[20.0, 10.0, 140.0, 100.0], [0.0, 0.0, 80.0, 60.0], [50.0, 50.0, 159.0, 119.0]])
    got = predictor.predict_batch(boxes=boxes, text=phrases, return_logits=True)
    assert_close(got, low_level(predictor, by_hand(clip_params, phrases), box=boxes))
    for i, phrase in enumerate(phrases):
        one = predictor.predict(box=boxes[i], text=phrase, return_logits=True)
        assert_close(one, tuple(x[i] for x in got))


def test_predictor_errors(sam_text, tiny, predictor, encoder, clip_params):
    model, params = sam_text
    plain = SamPredictor(model, params)
    plain.set_embedding(predictor.features, predictor.input_size, predictor.original_size)
    with pytest.raises(ValueError, match="no text_encoder"):
        plain.predict(text="a wheel")
    config, _, plain_params = tiny
    with pytest.raises(ValueError, match="'vit_tiny' was not trained with text prompts"):
        SamPredictor(Sam(config), plain_params, text_encoder=encoder)
    no_head = SamPredictor(Sam(config), plain_params)
    no_head.set_embedding(predictor.features, predictor.input_size, predictor.original_size)
    with pytest.raises(ValueError, match="'vit_tiny' was not trained with text prompts"):
        no_head.predict(text="a wheel")
    small = ClipTextEncoder(dataclasses.replace(CLIP_TINY, name="tiny32", embed_dim=32), clip_params)
    with pytest.raises(ValueError, match=r"32-dim embeddings .*takes 64-dim"):
        SamPredictor(model, params, text_encoder=small)
    with pytest.raises(ValueError, match=r"disagree on the number of prompts B \(text phrases 2, boxes 3\)"):
        predictor.predict_batch(boxes=np.zeros((3, 4)), text=["a", "b"])
    with pytest.raises(ValueError, match="one phrase, a str"):
        predictor.predict(text=["a", "b"])
    with pytest.raises(ValueError, match="is empty after cleaning"):
        predictor.predict(text="  ")
    with pytest.raises(ValueError, match="over the context length"):
        predictor.predict(text="word " * 40)


# ----------------------------------------------------------------------------- SamBatchPredictor


def test_batch_predictor_text_equals_predictor(sam_text, encoder, predictor):
    images = [synthetic_image(H, W, seed=1), synthetic_image(90, 100, seed=2)]
    batch = SamBatchPredictor(*sam_text, text_encoder=encoder)
    batch.set_images(images)
    prompts = [dict(text=["a red circle", "a wheel", "a dog"], boxes=np.array([[20.0, 10, 140, 100]] * 3)),
               dict(text=["a cat"], boxes=np.array([[5.0, 5, 60, 80]]))]
    got = batch.predict_batch(prompts, return_logits=True)
    single = SamPredictor(*sam_text, text_encoder=encoder)
    for image, p, g in zip(images, prompts, got):
        single.set_image(image)
        assert_close(g, single.predict_batch(boxes=p["boxes"], text=p["text"], return_logits=True))
    with pytest.raises(ValueError, match="image 1: text '' is empty"):
        batch.predict_batch([prompts[0], dict(text=[""], boxes=np.zeros((1, 4)))])
    with pytest.raises(ValueError, match=r"same kinds of prompt \(points, boxes, masks, text\)"):
        batch.predict_batch([prompts[0], dict(boxes=np.zeros((1, 4)))])
    no_encoder = SamBatchPredictor(*sam_text)
    no_encoder.set_images(images)
    with pytest.raises(ValueError, match="image 0: text prompt given, but no text_encoder"):
        no_encoder.predict_batch(prompts)


# ----------------------------------------------------------------------------- CLIP checkpoints


def test_clip_checkpoint_round_trip_and_strictness(tmp_path, clip_params, encoder, sam_text):
    path = save_clip(tmp_path / "clip", clip_params, CLIP_TINY, source="test")
    meta = json.loads((path / "sam_jax.json").read_text())
    assert meta["format"] == "sam_jax_clip" and meta["config"]["name"] == "tiny" and meta["source"] == "test"
    config, params = load_clip(path)
    assert config == CLIP_TINY
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(clip_params)))
    phrases = ["a red circle", "a dog"]
    np.testing.assert_array_equal(ClipTextEncoder.from_directory(path)(phrases), encoder(phrases))

    with pytest.raises(FileExistsError, match="already exists"):
        save_clip(path, clip_params, CLIP_TINY)
    save_clip(path, clip_params, CLIP_TINY, overwrite=True)
    # Strict saving: missing / extra / misshapen keys named.
    bad = flatten(clip_params)
    missing = unflatten({k: v for k, v in bad.items() if k != "text/ln_final/bias"})
    with pytest.raises(CheckpointError, match="missing text/ln_final/bias"):
        save_clip(tmp_path / "c2", missing, CLIP_TINY)
    extra = unflatten({**bad, "text/extra": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected text/extra"):
        save_clip(tmp_path / "c2", extra, CLIP_TINY)
    # Strict loading: a checkpoint of another config (its metadata edited) is named key by key.
    meta["config"]["embed_dim"] = 32
    (path / "sam_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"misshapen text/text_projection \(64, 64\) != expected \(64, 32\)"):
        load_clip(path)
    # A SAM checkpoint as CLIP, and a CLIP checkpoint as SAM.
    save_clip(tmp_path / "clip_ok", clip_params, CLIP_TINY)
    sam_dir = save_params(tmp_path / "sam", sam_text[1], TEXT)
    with pytest.raises(CheckpointError, match="is a SAM checkpoint .*'vit_tiny_text'.*not a CLIP checkpoint"):
        load_clip(sam_dir)
    with pytest.raises(CheckpointError, match="is a CLIP checkpoint .*'tiny'.*not a SAM checkpoint"):
        load_sam(tmp_path / "clip_ok")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_clip(tmp_path / "nope")


def test_converter_command(tmp_path, capsys):
    """A random transformers.CLIPModel of the tiny config, as model.safetensors -> the sam_jax format;
    its text embeddings equal HF's."""
    model = hf_model(CLIP_TINY, seed=3)
    save_file(numpy_state_dict(model), str(tmp_path / "model.safetensors"))
    assert convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "out")]) == 0
    assert "(CLIP tiny, embed_dim 64)" in capsys.readouterr().out
    phrases = ["a red circle", "beaver tooth grille"]
    tokens = ClipTokenizer()(phrases, context_length=32)
    with torch.no_grad():
        want = model.get_text_features(input_ids=torch.from_numpy(tokens).long()).pooler_output
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    np.testing.assert_allclose(ClipTextEncoder.from_directory(tmp_path / "out")(phrases), want, rtol=1e-4, atol=1e-5)
    # The same through `sam-jax convert-clip`, from the model folder, with --config.
    assert main(["convert-clip", str(tmp_path), str(tmp_path / "out2"), "--config", "tiny"]) == 0
    assert load_clip(tmp_path / "out2")[0] == CLIP_TINY
    # Errors: an existing output, a config of other shapes.
    assert convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "out3"), "--config", "vit_b16"]) == 2
    assert "does not fit config vit_b16" in capsys.readouterr().err and not (tmp_path / "out3").exists()


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sam_text, tiny, clip_params):
    root = tmp_path_factory.mktemp("text_ckpts")
    save_params(root / "sam_text", sam_text[1], TEXT)
    save_params(root / "sam_plain", tiny[2], tiny[0])
    save_clip(root / "clip", clip_params, CLIP_TINY)
    Image.fromarray(synthetic_image(H, W, seed=1)).save(root / "a.png")
    return root


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) == 255


def test_segment_with_text(capsys, checkpoints, predictor, tmp_path):
    root = checkpoints
    code, out, err = cli(capsys, "segment", "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "clip",
                         "--input", root / "a.png", "--output", tmp_path / "out", "--text", "a red circle",
                         "--point-coords", "50,60")
    assert code == 0, err
    masks, scores, _ = predictor.predict(np.array([[50.0, 60.0]]), np.array([1]), text="a red circle")
    for i in range(3):
        np.testing.assert_array_equal(read_mask(tmp_path / "out" / "a" / f"mask_{i}.png"), masks[i])
    result = json.loads((tmp_path / "out" / "a" / "result.json").read_text())
    assert result["prompt"]["text"] == "a red circle" and result["prompt"]["point_coords"] == [[50.0, 60.0]]
    np.testing.assert_allclose(result["iou_predictions"], scores, rtol=1e-5)
    assert result["model"]["clip_checkpoint"] == str(root / "clip")

    # A prompts.json "text" field (text alone) for a folder.
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(synthetic_image(H, W, seed=1)).save(folder / "a.png")
    (tmp_path / "prompts.json").write_text(json.dumps({"a.png": {"text": "a wheel"}}))
    code, out, err = cli(capsys, "segment", "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "clip",
                         "--input", folder, "--output", tmp_path / "out2", "--prompts", tmp_path / "prompts.json")
    assert code == 0, err
    masks, _, _ = predictor.predict(text="a wheel")
    np.testing.assert_array_equal(read_mask(tmp_path / "out2" / "a" / "mask_0.png"), masks[0])
    assert json.loads((tmp_path / "out2" / "a" / "result.json").read_text())["prompt"]["text"] == "a wheel"


def test_segment_text_errors(capsys, checkpoints, tmp_path):
    root = checkpoints
    base = ["segment", "--input", root / "a.png", "--output", tmp_path / "out"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": {"text": "a wheel"}}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"a.png": {"text": 3}}))
    cases = [
        ([*base, "--checkpoint", root / "sam_text", "--text", "a wheel"],
         "--text needs --clip-checkpoint DIR"),
        ([*base, "--checkpoint", root / "sam_text", "--prompts", prompts],
         "has text prompts: they need --clip-checkpoint"),
        ([*base, "--checkpoint", root / "sam_plain", "--clip-checkpoint", root / "clip", "--text", "a wheel"],
         "(vit_tiny) was not trained with text prompts"),
        ([*base, "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "sam_text", "--text", "a wheel"],
         "is a SAM checkpoint"),
        ([*base, "--checkpoint", root / "clip", "--clip-checkpoint", root / "clip", "--text", "a wheel"],
         "is a CLIP checkpoint"),
        ([*base, "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "clip", "--text", " "],
         "--text: the text prompt is empty"),
        ([*base, "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "clip", "--text", "word " * 40],
         "--text: text 'word word"),
        ([*base, "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "clip", "--prompts", bad_json],
         "text must be a string"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sam-jax: error: "), (args, err)
        assert message in lines[0], (message, lines[0])
        assert not (tmp_path / "out").exists()
    # --truncate-text accepts the long phrase.
    code, _, err = cli(capsys, *base, "--checkpoint", root / "sam_text", "--clip-checkpoint", root / "clip",
                       "--text", "word " * 40, "--truncate-text", "--no-multimask")
    assert code == 0, err
