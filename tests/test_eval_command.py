"""`experiments.eval` end to end on sam_synthetic/small with a random vit_tiny checkpoint, its
refused inputs, and the ablation's table and variants."""

import json

import numpy as np
import pytest

from experiments import ablation
from experiments import eval as evaluation
from experiments.train_configs import get_config
from sam_jax import Sam, save_params
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.data.pipeline import open_source
from sam_jax.evaluation.instances import read_instances
from sam_jax.evaluation.point_protocol import ProtocolConfig, evaluate_images


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    config, _, params = tiny
    return str(save_params(tmp_path_factory.mktemp("ckpt") / "vit_tiny", params, config, source="test"))


def run_eval(checkpoint, data_dir, output, *extra):
    return evaluation.main(["--checkpoint", checkpoint, "--dataset", "sam_synthetic/small", "--data-dir", data_dir,
                            "--output", str(output), "--no-progress", *extra])


def test_eval_writes_json_markdown_and_plot_with_the_protocols_figures(tiny, checkpoint, synthetic_data_dir, tmp_path):
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path, "--num-images", "3", "--clicks", "5",
                    "--batch-images", "2") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "vit_tiny" and results["num_images"] == 3
    points, boxes = results["points"], results["boxes"]
    assert list(points["miou"]) == ["1", "2", "3", "5"] and len(points["miou_per_click"]) == 5
    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    instances = [read_instances(source[i]) for i in range(3)]
    config, _, params = tiny
    direct = evaluate_images(SamBatchPredictor(Sam(config), params), instances, ProtocolConfig(num_clicks=5))
    np.testing.assert_allclose(points["miou_per_click"], direct.miou(), atol=1e-6)
    assert points["num_masks"] == sum(len(x.masks) for x in instances)
    assert boxes["num_boxes"] == points["num_masks"] and boxes["box_source"] == "ground_truth"
    assert all(-1.0 <= v <= 1.0 for v in boxes["mask_ap"].values())
    table = (tmp_path / "results.md").read_text()
    assert f"| mIoU, most confident | {points['miou']['1']:.3f}" in table and "| AP | AP50 |" in table
    assert (tmp_path / "miou_vs_clicks.png").stat().st_size > 1000


def oracle_predictor(instances, empty: bool):
    """A SamBatchPredictor stand-in that answers each ground-truth box with that box's own
    ground-truth mask and score 1 (or with an empty mask): COCO mask AP is then exactly 1 (or 0)."""
    truth = {}
    for x in instances:
        for box, mask in zip(np.asarray(x.boxes, np.float32), x.masks):
            xyxy = np.concatenate([box[:2], box[:2] + box[2:]])
            truth[(x.image.tobytes(), tuple(np.round(xyxy, 3)))] = mask

    class Oracle:
        def __init__(self, model, params):
            self.images = []

        def set_images(self, images):
            self.images = list(images)

        def predict_batch(self, prompts, multimask_output=True, return_logits=False):
            out = []
            for image, prompt in zip(self.images, prompts):
                masks = np.stack([truth[(image.tobytes(), tuple(np.round(b, 3)))] for b in prompt["boxes"]])
                masks = (np.zeros_like(masks) if empty else masks)[:, None]
                out.append((masks, np.ones((len(masks), 1), np.float32), None))
            return out

    return Oracle


@pytest.mark.parametrize("empty, expected", [(False, 1.0), (True, 0.0)])
def test_the_command_reports_the_ap_of_known_masks(checkpoint, synthetic_data_dir, tmp_path, monkeypatch,
                                                   empty, expected):
    """With masks that equal the ground truth COCO mask AP, AP50 and AP75 are 1; empty, 0."""
    import sam_jax.batch_predictor

    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    instances = [read_instances(source[i]) for i in range(3)]
    monkeypatch.setattr(sam_jax.batch_predictor, "SamBatchPredictor", oracle_predictor(instances, empty))
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path, "--num-images", "3", "--protocols", "boxes") == 0
    ap = json.loads((tmp_path / "results.json").read_text())["boxes"]["mask_ap"]
    assert (ap["AP"], ap["AP50"], ap["AP75"]) == (expected, expected, expected)
    sizes = [ap[k] for k in ("APs", "APm", "APl") if ap[k] != -1.0]  # -1: no object of that size
    assert sizes and all(v == expected for v in sizes)


def test_detections_for_images_not_evaluated_are_named(checkpoint, synthetic_data_dir, tmp_path, capsys):
    """A detections file of another split: an error, not an AP of 0; partly covered: a warning."""
    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    other = [{"image_id": 10**6 + i, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.9} for i in range(7)]
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(other))
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path / "out", "--num-images", "2", "--protocols", "boxes",
                    "--boxes", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--boxes {path}: no detection is for any of the 2 evaluated images" in err
    assert "image_id 1000000, 1000001, 1000002, 1000003, 1000004, ..." in err
    assert not (tmp_path / "out").exists()
    mine = {"image_id": int(source[0]["image_id"]), "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.9}
    path.write_text(json.dumps(other + [mine]))
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path / "out", "--num-images", "2", "--protocols", "boxes",
                    "--boxes", str(path)) == 0
    assert ("eval: warning: detections of 7 image(s) in " f"{path} were not evaluated (not among the 2 evaluated "
            "images of sam_synthetic/small validation)") in capsys.readouterr().err


def test_random_first_clicks_are_an_option(checkpoint, synthetic_data_dir, tmp_path):
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path, "--num-images", "2", "--clicks", "1",
                    "--protocols", "points", "--first-click", "random", "--seed", "4") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["points"]["first_click"] == "random" and results["points"]["seed"] == 4
    assert "boxes" not in results


@pytest.mark.parametrize("extra, message", [
    (("--protocols", "masks"), "protocols must be"),
    (("--num-images", "0"), "--num-images must be >= 1"),
    (("--clicks", "0"), "num_clicks must be"),
    (("--split", "test"), "has splits"),
    (("--boxes", "/nonexistent/detections.json"), "/nonexistent/detections.json"),
])
def test_bad_arguments_are_one_line_errors(checkpoint, synthetic_data_dir, tmp_path, capsys, extra, message):
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_missing_checkpoint_or_unprepared_data_set_is_named(checkpoint, tmp_path, capsys):
    assert run_eval(str(tmp_path / "none"), str(tmp_path), tmp_path / "out") == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
    assert run_eval(checkpoint, str(tmp_path), tmp_path / "out") == 2
    assert "prepare_data" in capsys.readouterr().err


def test_ablation_variants_and_table():
    configs = {name: get_config(ablation.BASE_CONFIG, ablation.BASE_OVERRIDES + overrides)
               for name, overrides in ablation.VARIANTS.items()}
    assert {name: c.interactive.num_iterations for name, c in configs.items()} == {
        "interactive": 11, "single_prompt": 1, "no_mask_only": 9}
    # Every step runs the variant's own loop, for the same number of steps.
    assert {(c.single_prompt_steps, c.total_steps, c.interactive_at(1)) for c in configs.values()} == {
        (0, 550, c.interactive) for c in configs.values()}
    points = {"miou": {"1": 0.5, "3": 0.61, "5": 0.7, "9": 0.755}}
    table = ablation.table({"interactive": {"iterations": 11, "points": points}})
    assert table.splitlines()[2] == "| interactive | 11 | 0.500 | 0.610 | 0.700 | 0.755 |"


def test_boxes_from_a_detections_file(checkpoint, synthetic_data_dir, tmp_path):
    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    detections = [
        {"image_id": int(source[i]["image_id"]), "category_id": 1, "bbox": [float(v) for v in box], "score": 0.9}
        for i in range(3) for box in source[i]["masks"]["bbox"]
    ]
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(detections))
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path / "out", "--num-images", "2", "--protocols", "boxes",
                    "--boxes", str(path)) == 0
    boxes = json.loads((tmp_path / "out" / "results.json").read_text())["boxes"]
    assert boxes["box_source"] == "detections" and boxes["detection_images_not_evaluated"] == 1
    assert boxes["num_boxes"] == sum(len(source[i]["masks"]["bbox"]) for i in range(2))
    assert not (tmp_path / "out" / "miou_vs_clicks.png").exists()
