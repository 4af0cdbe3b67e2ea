"""`experiments.iou_head_probe`: its first clicks are the point protocol's, its tokens the IoU
head's input, its ridge readout exact on a planted linear relation, and the command's JSON and
refusals."""

import json

import numpy as np
import pytest

from experiments import iou_head_probe
from sam_jax import Sam, save_params
from sam_jax.data.pipeline import evaluation_batches, open_source
from sam_jax.data.preprocess import PreprocessConfig
from sam_jax.evaluation.point_protocol import ProtocolConfig, evaluate
from conftest import apply_submodule


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    config, _, params = tiny
    return str(save_params(tmp_path_factory.mktemp("ckpt") / "vit_tiny", params, config, source="test"))


def batches(config, data_dir, split="validation", count=3):
    preprocess = PreprocessConfig(image_size=config.image_size, low_res_size=config.low_res_mask_size,
                                  max_masks=64, input_res_masks=True)
    return list(evaluation_batches(open_source("sam_synthetic/small", split, data_dir), preprocess, 2, count))


def test_first_clicks_equal_the_point_protocols_and_tokens_are_the_heads_input(tiny, synthetic_data_dir):
    config, _, params = tiny
    model = Sam(config)
    held_out = batches(config, synthetic_data_dir)
    probed = iou_head_probe.collect(model, params, held_out)
    protocol = evaluate(model, params, held_out, ProtocolConfig(num_clicks=1))
    assert probed["tokens"].shape == (protocol.num_masks, 4, config.prompt_embed_dim)
    np.testing.assert_allclose(probed["predicted"], protocol.first_click_predicted_iou, atol=1e-5)
    np.testing.assert_allclose(probed["actual"], protocol.first_click_output_iou, atol=1e-6)
    result = iou_head_probe.probe(probed, probed)
    assert result["head"]["miou"] == pytest.approx(float(protocol.miou()[0]), abs=1e-6)
    assert result["oracle_miou"] == pytest.approx(float(protocol.miou(oracle=True)[0]), abs=1e-6)
    # Token 0 through the model's own IoU head gives the head's scores of outputs 1-3.
    head = apply_submodule(config, params, lambda sam, x: sam.mask_decoder.iou_prediction_head(x),
                           probed["tokens"][:, 0])
    np.testing.assert_allclose(np.asarray(head)[:, 1:], probed["predicted"], atol=1e-5)
    # ...and the mask tokens are not token 0: the readouts' inputs differ.
    assert not np.allclose(probed["tokens"][:, 0], probed["tokens"][:, 1])


def test_ridge_recovers_a_planted_linear_readout_and_picks_by_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w, bias = rng.normal(size=(5, 3)), np.array([0.2, -0.1, 0.4])
    y = x @ w + bias
    fitted = iou_head_probe.fit_ridge(x, y, 1e-9)
    np.testing.assert_allclose(fitted[:-1], w, atol=1e-6)
    np.testing.assert_allclose(fitted[-1], bias, atol=1e-6)
    # A huge penalty leaves only the (unpenalised) bias: each output's mean.
    flat = iou_head_probe.fit_ridge(x, y, 1e12)
    np.testing.assert_allclose(iou_head_probe.predict_ridge(flat, x[:4]), np.tile(y.mean(0), (4, 1)), atol=1e-6)
    assert iou_head_probe.choose_strength(x, y) == 1e-3  # exact data: the weakest picks as well as any
    assert iou_head_probe.choose_strength(x, y, strengths=(1e6, 1e-3)) == 1e-3  # a huge one picks worse
    scores = np.array([[0.1, 0.9, 0.2], [0.5, 0.5, 0.1]])
    actual = np.array([[0.3, 0.6, 0.9], [0.7, 0.2, 0.1]])
    np.testing.assert_allclose(iou_head_probe.chosen_iou(scores, actual), [0.6, 0.7])  # ties: the first
    assert iou_head_probe.share(scores) == [0.5, 0.5, 0.0]


def test_features_of_each_readout():
    tokens = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.testing.assert_array_equal(iou_head_probe.features(tokens, "iou_token"), tokens[:, 0])
    np.testing.assert_array_equal(iou_head_probe.features(tokens, "mask_tokens"), tokens[:, 1:].reshape(2, 9))
    assert iou_head_probe.features(tokens, "all_tokens").shape == (2, 12)
    with pytest.raises(ValueError, match="readout must be one of"):
        iou_head_probe.features(tokens, "head")


def test_command_writes_json_and_refuses_bad_counts(checkpoint, synthetic_data_dir, tmp_path, capsys):
    output = tmp_path / "probe.json"
    args = ["--checkpoint", checkpoint, "--dataset", "sam_synthetic/small", "--data-dir", synthetic_data_dir,
            "--train-images", "6", "--test-images", "3", "--batch-images", "2", "--output", str(output)]
    assert iou_head_probe.main(args) == 0
    results = json.loads(output.read_text())
    assert results["model"] == "vit_tiny" and (results["train_images"], results["test_images"]) == (6, 3)
    for readout in iou_head_probe.READOUTS:
        row = results[readout]
        assert row["ridge_strength"] in iou_head_probe.RIDGE_STRENGTHS and len(row["chosen_share"]) == 3
        assert row["miou"] <= results["oracle_miou"] + 1e-9  # a choice among the outputs
    assert f"head         1-click mIoU {results['head']['miou']:.3f}" in capsys.readouterr().out
    assert iou_head_probe.main(args[:-2] + ["--train-images", "0"]) == 2
    assert "--train-images must be >= 1, got 0" in capsys.readouterr().err
    assert iou_head_probe.main(["--checkpoint", checkpoint, "--dataset", "nope", "--data-dir",
                                synthetic_data_dir]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
