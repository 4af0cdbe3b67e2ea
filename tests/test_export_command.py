"""`sam-jax export`: the folder appears only when whole, and every bad input is one line, exit 2,
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_cli import cli, one_error_line, tree

from sam_jax import save_params
from sam_jax.export import MANIFEST, export_model, onnx_graphs
from sam_jax.modeling import Sam


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    config, _, params = tiny
    return save_params(tmp_path_factory.mktemp("ckpt") / "vit_tiny", params, config, source="test")


def test_export_writes_the_decoder_with_official_options(capsys, checkpoint, tmp_path):
    out = tmp_path / "exported"
    code, stdout, _ = cli(capsys, "export", "--checkpoint", checkpoint, "--format", "onnx", "--part", "decoder",
                          "--output", out, "--return-single-mask")
    assert code == 0 and stdout.strip() == str(out.absolute())
    assert tree(tmp_path) == ["exported", "exported/decoder.onnx", "exported/export.json"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["parts"]["decoder"]["options"] == {"return_single_mask": True, "use_stability_score": False,
                                                       "return_extra_metrics": False}
    assert manifest["source"] == str(checkpoint)
    sess = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.shape[1] for o in sess.get_outputs()] == [1, 1, 1]  # one mask


def test_overwrite_replaces_only_an_earlier_export(capsys, checkpoint, tmp_path):
    out = tmp_path / "exported"
    args = ["export", "--checkpoint", checkpoint, "--format", "stablehlo", "--part", "decoder", "--output", out]
    assert cli(capsys, *args)[0] == 0
    code, _, err = cli(capsys, *args)
    assert code == 2 and f"{out.absolute()} already exists" in one_error_line(err)
    assert cli(capsys, *args, "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging left
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, *args[:-1], other, "--overwrite")
    assert code == 2 and "is not a sam_jax export; not replacing it" in one_error_line(err)
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing checkpoint", "checkpoint is a file", "output under a file",
                                  "extra metrics in stablehlo", "decoder option without the decoder",
                                  "unknown format"])
def test_bad_input_is_one_line_and_writes_nothing(capsys, checkpoint, tmp_path, case):
    a_file = tmp_path / "weights.pth"
    a_file.write_bytes(b"not a checkpoint")
    args = {"--checkpoint": checkpoint, "--format": "onnx", "--output": tmp_path / "out"}
    extra, expected = [], ""
    if case == "missing checkpoint":
        args["--checkpoint"], expected = tmp_path / "nowhere", "nowhere"
    elif case == "checkpoint is a file":
        args["--checkpoint"], expected = a_file, "is a file, not a converted sam_jax checkpoint folder"
    elif case == "output under a file":
        args["--output"], expected = a_file / "out", "cannot write there"
    elif case == "extra metrics in stablehlo":
        args["--format"], extra, expected = "stablehlo", ["--return-extra-metrics"], "only the ONNX decoder"
    elif case == "decoder option without the decoder":
        extra, expected = ["--part", "encoder", "--use-stability-score"], "exports no decoder"
    else:
        args["--format"], expected = "tflite", "invalid choice: 'tflite'"
    before = tree(tmp_path)
    code, _, err = cli(capsys, "export", *[str(x) for kv in args.items() for x in kv], *extra)
    assert code == 2 and expected in one_error_line(err)
    assert tree(tmp_path) == before


def test_a_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    """The decoder is written, then the encoder fails: no output folder, no staging folder."""
    cfg, _, params = tiny

    def fail(*args, **kwargs):
        raise RuntimeError("the encoder conversion failed")

    monkeypatch.setattr(onnx_graphs, "encoder_onnx", fail)
    with pytest.raises(RuntimeError, match="the encoder conversion failed"):
        export_model(Sam(cfg), params, tmp_path / "out", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_weights_past_the_protobuf_limit_go_to_external_data(tmp_path):
    """Past protobuf's 2 GiB (vit_h's encoder is 2.5 GB) an ONNX file keeps its weights in
    `<name>.data`; tested with the limit lowered rather than with a vit_h export."""
    from onnx import TensorProto, helper, numpy_helper

    values = np.ones(2**18, np.float32)
    graph = helper.make_graph([helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0)], "g", [],
                              [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(values, "big")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_graphs.save_onnx(model, tmp_path / "small.onnx") == ["small.onnx"]
    files = onnx_graphs.save_onnx(model, tmp_path / "encoder.onnx", max_bytes=2**20)
    assert files == ["encoder.onnx", "encoder.onnx.data"]
    assert (tmp_path / "encoder.onnx").stat().st_size < 2**12
    sess = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {})[0] == values.sum()
