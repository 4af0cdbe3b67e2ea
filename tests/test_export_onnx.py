"""`sam-jax export --format onnx` run in onnxruntime: against sam_jax's own decoder and encoder, and
against the official `SamOnnxModel` exported by torch.onnx from the same random official weights."""

from __future__ import annotations

import json
import zlib

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import STAND_INS, check_output, make_official, relative_error, report, with_depth

from checkpoints_convert import reference_model

from sam_jax.configs import get_config
from sam_jax.export import MANIFEST, export_model
from sam_jax.export import onnx_graphs
from sam_jax.modeling import Sam, inference
from sam_jax.utils.transforms import ResizeLongestSide, pad_to_square

SIZES = {"square": (300, 300), "landscape": (480, 640), "portrait": (700, 333)}
TOL = 1e-4


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # jax2onnx leaves a few unused initializers; ORT warns of each
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """The tiny model's ONNX export, both parts, default options: (folder, sessions)."""
    cfg, _, params = tiny
    folder = export_model(Sam(cfg), params, tmp_path_factory.mktemp("onnx") / "export", "onnx")
    return folder, {part: session(folder / f"{part}.onnx") for part in ("decoder", "encoder")}


def onnx_feed(cfg, embedding_nhwc, points, labels, box=None, mask_input=None, size=(300, 300)) -> dict:
    """The official demo's inputs: points in the input frame, the (0, 0, -1) pad point when there is
    no box, a box as corner points labelled 2 and 3 after the points."""
    coords, point_labels = list(points), list(labels)
    if box is not None:
        coords += [box[:2], box[2:]]
        point_labels += [2, 3]
    else:
        coords.append([0.0, 0.0])
        point_labels.append(-1)
    m = cfg.low_res_mask_size
    return {"image_embeddings": np.ascontiguousarray(np.transpose(embedding_nhwc, (0, 3, 1, 2))),
            "point_coords": np.asarray([coords], np.float32), "point_labels": np.asarray([point_labels], np.float32),
            "mask_input": np.zeros((1, 1, m, m), np.float32) if mask_input is None else mask_input,
            "has_mask_input": np.asarray([0.0 if mask_input is None else 1.0], np.float32),
            "orig_im_size": np.asarray(size, np.float32)}


def prompt_case(name: str, cfg, rng):
    """(points, labels, box) in the input frame for a named prompt set."""
    s = cfg.image_size
    n = {"1 point": 1, "3 points": 3, "16 points": 16, "box": 0, "box + point": 1}[name]
    points = rng.uniform(0, s * 0.7, (n, 2)).tolist()
    labels = [1] + rng.integers(0, 2, n - 1).tolist() if n else []
    box = [s * 0.1, s * 0.2, s * 0.6, s * 0.5] if name.startswith("box") else None
    return points, labels, box


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("prompts", ["1 point", "3 points", "16 points", "box", "box + point"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no mask", "mask input"])
def test_decoder_equals_sam_jax_decoder(tiny, exported, prompts, size, with_mask):
    cfg, _, params = tiny
    model = Sam(cfg)
    rng = np.random.default_rng(zlib.crc32(f"{prompts} {size} {with_mask}".encode()))  # the same every run
    e, m = cfg.embedding_size, cfg.low_res_mask_size
    embedding = rng.normal(size=(1, e, e, cfg.prompt_embed_dim)).astype(np.float32)
    points, labels, box = prompt_case(prompts, cfg, rng)
    mask_input = rng.normal(0, 4, (1, 1, m, m)).astype(np.float32) if with_mask else None
    original = SIZES[size]
    outputs = exported[1]["decoder"].run(None, onnx_feed(cfg, embedding, points, labels, box, mask_input, original))
    masks, iou, low_res = outputs

    input_size = ResizeLongestSide.get_preprocess_shape(*original, cfg.image_size)
    coords = jnp.asarray([points], jnp.float32).reshape(1, -1, 2) if points else None
    point_labels = jnp.asarray([labels], jnp.int32) if points else None
    boxes = None if box is None else jnp.asarray([box], jnp.float32)
    for multimask, tokens in ((True, slice(1, None)), (False, slice(0, 1))):
        want_masks, want_iou, want_low = inference.decode_prompts(
            model, params, jnp.asarray(embedding), coords, point_labels, boxes,
            None if mask_input is None else jnp.asarray(mask_input), multimask, input_size, original, True)
        error = relative_error(masks[:, tokens], want_masks)
        report(f"onnx decoder {prompts} {size} mask={with_mask} multimask={multimask}", error)
        assert error < TOL
        assert relative_error(low_res[:, tokens], want_low) < TOL
        np.testing.assert_allclose(iou[:, tokens], want_iou, atol=TOL, rtol=0)


def test_decoder_takes_any_number_of_points(tiny, exported):
    """One file serves 1 to 16 points (the symbolic num_points), each equal to sam_jax."""
    cfg, _, params = tiny
    rng = np.random.default_rng(5)
    embedding = rng.normal(size=(1, cfg.embedding_size, cfg.embedding_size, cfg.prompt_embed_dim)).astype(np.float32)
    sess = exported[1]["decoder"]
    assert [d.dim_param or d.dim_value for d in onnx.load(exported[0] / "decoder.onnx").graph.input[1]
            .type.tensor_type.shape.dim] == [1, "num_points", 2]
    for n in range(1, 17):
        points = rng.uniform(0, cfg.image_size, (n, 2)).tolist()
        labels = rng.integers(0, 2, n).tolist()
        _, iou, low_res = sess.run(None, onnx_feed(cfg, embedding, points, labels))
        want_low, want_iou = inference.decode_low_res(
            Sam(cfg), params, jnp.asarray(embedding), jnp.asarray([points], jnp.float32),
            jnp.asarray([labels], jnp.int32), None, None, True)
        assert relative_error(low_res[:, 1:], want_low) < TOL, n
        np.testing.assert_allclose(iou[:, 1:], want_iou, atol=TOL, rtol=0)


def test_encoder_equals_sam_jax_encoder(tiny, exported):
    cfg, _, params = tiny
    transform = ResizeLongestSide(cfg.image_size)
    rng = np.random.default_rng(2)
    for size in SIZES.values():
        image = transform.apply_image(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        got = exported[1]["encoder"].run(None, {"input_image": image.astype(np.float32)})[0]
        batch, sizes = pad_to_square([image], cfg.image_size, 1)
        want = inference.encode_images(Sam(cfg), params, jnp.asarray(batch), jnp.asarray(sizes))
        error = relative_error(got, np.transpose(np.asarray(want), (0, 3, 1, 2)))
        report(f"onnx encoder vit_tiny {image.shape}", error)
        assert error < TOL


@pytest.mark.slow
def test_vit_b_encoder_equals_sam_jax_encoder(tmp_path):
    """The released size: 12 blocks of 64 x 64 tokens, 14-windows and global attention."""
    cfg = get_config("vit_b")
    _, _, params = make_official(cfg, seed=3)
    proto = onnx_graphs.encoder_onnx(Sam(cfg), params)
    onnx_graphs.save_onnx(proto, tmp_path / "encoder.onnx")
    del proto
    image = ResizeLongestSide(cfg.image_size).apply_image(
        np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    got = session(tmp_path / "encoder.onnx").run(None, {"input_image": image.astype(np.float32)})[0]
    batch, sizes = pad_to_square([image], cfg.image_size, 1)
    want = inference.encode_images(Sam(cfg), params, jnp.asarray(batch), jnp.asarray(sizes))
    error = relative_error(got, np.transpose(np.asarray(want), (0, 3, 1, 2)))
    report("onnx encoder vit_b (768, 1024)", error)
    assert error < TOL


# ------------------------------------------------------------------ the official export


@pytest.fixture(scope="module")
def vit_b_decoder():
    """vit_b's decoder and prompt encoder (full width), under a one-block encoder nothing runs."""
    return make_official(with_depth(get_config("vit_b"), 1), seed=7)


OPTIONS = {"default": {}, "single mask": dict(return_single_mask=True),
           "stability + extra metrics": dict(use_stability_score=True, return_extra_metrics=True),
           "single mask + extra metrics": dict(return_single_mask=True, return_extra_metrics=True)}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_drop_in_for_the_official_onnx_export(vit_b_decoder, tmp_path, option):
    """The same inputs to both files in onnxruntime give the same outputs, output by output."""
    cfg, official, params = vit_b_decoder
    options = OPTIONS[option]
    reference_model.export_official_onnx(official, cfg, tmp_path / "official.onnx", STAND_INS, **options)
    ours = onnx_graphs.decoder_onnx(Sam(cfg), params, **options)
    onnx_graphs.save_onnx(ours, tmp_path / "ours.onnx")
    theirs, mine = session(tmp_path / "official.onnx"), session(tmp_path / "ours.onnx")
    assert [i.name for i in mine.get_inputs()] == [i.name for i in theirs.get_inputs()]
    assert [(i.type, i.shape) for i in mine.get_inputs()] == [(i.type, i.shape) for i in theirs.get_inputs()]
    assert [o.name for o in mine.get_outputs()][:2] == [o.name for o in theirs.get_outputs()][:2]
    assert len(mine.get_outputs()) == len(theirs.get_outputs())
    rng = np.random.default_rng(8)
    e, m = cfg.embedding_size, cfg.low_res_mask_size
    for n, size, has_mask in ((1, "square", 0.0), (5, "landscape", 1.0), (16, "portrait", 0.0), (2, "portrait", 1.0)):
        embedding = rng.normal(size=(1, e, e, cfg.prompt_embed_dim)).astype(np.float32)
        points = rng.uniform(0, cfg.image_size, (n, 2)).tolist()
        labels = rng.integers(0, 4, n).tolist()  # background, foreground and box corners
        mask = rng.normal(0, 4, (1, 1, m, m)).astype(np.float32) if has_mask else None
        feed = onnx_feed(cfg, embedding, points, labels, None, mask, SIZES[size])
        for name, want, got in zip([o.name for o in mine.get_outputs()], theirs.run(None, feed), mine.run(None, feed)):
            assert got.shape == want.shape and got.dtype == want.dtype, name
            if name == "areas":  # pixel counts of logits > 0: a logit within float error of 0 may flip
                np.testing.assert_allclose(got, want, rtol=1e-3, atol=2)
            elif name == "stability_scores":
                np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
            else:
                check_output(f"official onnx {option} N={n} {size} {name}", got, want)


def test_decoder_file_is_valid_opset_17(exported):
    """Loadable where the official file is: IR 8, opset 17, no custom domains or functions."""
    model = onnx.load(exported[0] / "decoder.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert not model.functions and {n.domain for n in model.graph.node} == {""}
    assert {p.key: p.value for p in model.metadata_props}["sam_jax.part"] == "decoder"


def test_manifest_describes_the_files(exported):
    folder, sessions = exported
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["kind"] == "onnx" and manifest["model"] == "vit_tiny"
    for part, sess in sessions.items():
        entry = manifest["parts"][part]
        assert [i["name"] for i in entry["inputs"]] == [i.name for i in sess.get_inputs()]
        assert [o["name"] for o in entry["outputs"]] == [o.name for o in sess.get_outputs()]
        assert entry["bytes"] == sum((folder / f).stat().st_size for f in entry["files"])
    assert manifest["parts"]["encoder"]["inputs"] == [{"name": "input_image", "dtype": "float32",
                                                      "shape": ["height", "width", 3]}]


# ------------------------------------------------------------------ bad input


def test_onnxruntime_refuses_wrong_shapes_and_dtypes(tiny, exported):
    """What the README documents: onnxruntime refuses a wrong rank or size before running, naming
    the input, and a wrong dtype naming the types (not the input); an image larger than the
    encoder's frame fails inside the graph."""
    cfg, _, _ = tiny
    e = cfg.embedding_size
    good = onnx_feed(cfg, np.zeros((1, e, e, cfg.prompt_embed_dim), np.float32), [[10.0, 10.0]], [1])
    sess = exported[1]["decoder"]
    errors = (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail)
    for name, bad in (("image_embeddings", np.zeros((1, cfg.prompt_embed_dim, e, e + 1), np.float32)),
                      ("point_coords", np.zeros((1, 2, 3), np.float32)),
                      ("has_mask_input", np.zeros((1, 1), np.float32))):
        with pytest.raises(errors) as err:
            sess.run(None, {**good, name: bad})
        assert name in str(err.value)
    with pytest.raises(errors, match=r"Actual: \(tensor\(int64\)\) , expected: \(tensor\(float\)\)"):
        sess.run(None, {**good, "point_labels": good["point_labels"].astype(np.int64)})
    encoder = exported[1]["encoder"]
    with pytest.raises(errors, match="input_image"):
        encoder.run(None, {"input_image": np.zeros((cfg.image_size, 10), np.float32)})
    with pytest.raises(errors):  # over S: refused at the first reshape, never cropped
        encoder.run(None, {"input_image": np.zeros((cfg.image_size + 16, cfg.image_size, 3), np.float32)})
