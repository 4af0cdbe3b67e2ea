"""`experiments.eval` end to end on sam_synthetic/small with a random vit_tiny checkpoint, its
refused inputs, the automatic-mask protocol's scoring on known masks, and the ablation's table
and variants."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import ablation
from experiments import eval as evaluation
from experiments.train_configs import get_config
from sam_jax import Sam, save_params
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.data.pipeline import open_source
from sam_jax.evaluation.automatic_masks import AmgSettings, score_masks
from sam_jax.evaluation.box_prompts import STATS
from sam_jax.evaluation.instances import Instances, read_instances
from sam_jax.utils.amg import batched_mask_to_box, coco_encode_rle, mask_to_rle
from sam_jax.weights import load_sam
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
    head = points["iou_head_first_click"]
    assert head["picks_best"] == pytest.approx(direct.iou_head()["picks_best"])
    np.testing.assert_allclose(head["mean_predicted"], direct.first_click_predicted_iou.mean(axis=0), atol=1e-5)
    assert points["num_masks"] == sum(len(x.masks) for x in instances)
    assert boxes["num_boxes"] == points["num_masks"] and boxes["box_source"] == "ground_truth"
    assert all(-1.0 <= v <= 1.0 for v in boxes["mask_ap"].values())
    table = (tmp_path / "results.md").read_text()
    assert f"| mIoU, most confident | {points['miou']['1']:.3f}" in table and "| AP | AP50 |" in table
    assert f"a best one for {100 * head['picks_best']:.1f}% of masks" in table
    assert head["chosen_share"] == pytest.approx(direct.iou_head()["chosen_share"])
    assert "| most confident, share of masks | " + " | ".join(f"{v:.3f}" for v in head["chosen_share"]) in table
    assert (tmp_path / "miou_vs_clicks.png").stat().st_size > 1000


def test_gray_images_keep_the_prompts_and_replace_what_the_model_sees(tiny, checkpoint, synthetic_data_dir,
                                                                      tmp_path):
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path / "gray", "--num-images", "2", "--clicks", "3",
                    "--protocols", "points", "--gray-images") == 0
    gray = json.loads((tmp_path / "gray" / "results.json").read_text())
    assert gray["gray_images"] is True
    assert "(every image replaced by uniform grey)" in (tmp_path / "gray" / "results.md").read_text()
    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    instances = [read_instances(source[i]) for i in range(2)]
    config, _, params = tiny
    predictor = SamBatchPredictor(Sam(config), params)
    grayed = [dataclasses.replace(x, image=np.full_like(x.image, 128)) for x in instances]
    direct = evaluate_images(predictor, grayed, ProtocolConfig(num_clicks=3))
    np.testing.assert_allclose(gray["points"]["miou_per_click"], direct.miou(), atol=1e-6)
    np.testing.assert_allclose(gray["points"]["iou_head_first_click"]["mean_predicted"],
                               direct.first_click_predicted_iou.mean(axis=0), atol=1e-5)
    # The clicks come from the masks, so the real images' run differs only in what the model sees.
    real = evaluate_images(predictor, instances, ProtocolConfig(num_clicks=3))
    assert not np.allclose(real.first_click_predicted_iou, direct.first_click_predicted_iou, atol=1e-4)


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


def generator_records(masks, scores, output_mode="binary_mask"):
    """(N, H, W) masks as `SamAutomaticMaskGenerator.generate` records, "bbox" in the official
    convention (width and height one pixel short of the mask's tight box)."""
    masks = np.asarray(masks, bool).reshape(-1, *np.shape(masks)[-2:])
    rles = mask_to_rle(masks) if len(masks) else []
    segmentations = {"binary_mask": list(masks), "uncompressed_rle": rles,
                     "coco_rle": [coco_encode_rle(r) for r in rles]}[output_mode]
    boxes = batched_mask_to_box(masks)
    return [{"segmentation": seg, "predicted_iou": float(score), "area": int(m.sum()),
             "bbox": [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])]}
            for seg, score, m, box in zip(segmentations, scores, masks, boxes)]


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_automatic_masks_are_scored_against_the_ground_truth(synthetic_data_dir, output_mode):
    """Masks equal to the ground truth: box and mask AP 1, recall 1. Every other mask left out:
    all found masks are true, so precision is 1 up to the recall reached, k / n, and COCO's AP
    (101 recall points) is the share of recall points <= k / n; recall k / n at both IoUs.
    No masks: AP 0, recall 0."""
    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    instances = [read_instances(source[i]) for i in range(3)]
    assert not any(x.iscrowd.any() for x in instances)
    n = sum(len(x.masks) for x in instances)

    scores = lambda m: np.linspace(0.9, 0.5, m)  # any order
    equal = score_masks([generator_records(x.masks, scores(len(x.masks)), output_mode) for x in instances], instances)
    for ap in (equal.box_ap, equal.mask_ap):
        assert (ap["AP"], ap["AP50"], ap["AP75"]) == (1.0, 1.0, 1.0)
        assert all(ap[k] in (1.0, -1.0) for k in STATS)
    assert equal.recall == {0.5: 1.0, 0.75: 1.0} and equal.mean_best_iou == 1.0
    summary = json.loads(json.dumps(equal.summary()))
    assert (summary["num_images"], summary["num_masks"], summary["num_ground_truth"]) == (3, n, n)
    assert summary["masks_per_image"] == {"mean": n / 3, "min": min(len(x.masks) for x in instances),
                                          "max": max(len(x.masks) for x in instances)}
    assert summary["recall"] == {"0.5": 1.0, "0.75": 1.0} and summary["max_detections"] == 100

    half = score_masks([generator_records(x.masks[::2], scores(len(x.masks[::2])), output_mode)
                        for x in instances], instances)
    k = sum(len(x.masks[::2]) for x in instances)
    assert 0 < k < n
    expected_ap = np.count_nonzero(np.linspace(0, 1, 101) <= k / n) / 101
    for ap in (half.box_ap, half.mask_ap):
        for key in ("AP", "AP50", "AP75"):
            assert ap[key] == pytest.approx(expected_ap, abs=1e-12) and ap[key] < 1
    assert half.recall == {0.5: k / n, 0.75: k / n}
    assert list(half.masks_per_image) == [len(x.masks[::2]) for x in instances]

    empty = score_masks([[] for _ in instances], instances)
    for ap in (empty.box_ap, empty.mask_ap):
        assert (ap["AP"], ap["AP50"], ap["AP75"]) == (0.0, 0.0, 0.0)
    assert empty.recall == {0.5: 0.0, 0.75: 0.0} and empty.mean_best_iou == 0.0
    assert empty.summary()["masks_per_image"] == {"mean": 0.0, "min": 0, "max": 0}


def test_automatic_mask_recall_counts_each_iou_threshold():
    """A 10x10 and a 10x8 (w x h) rectangle; masks: the first exactly (score 0.9), 5 of the
    second's 8 rows (IoU 0.625, score 0.8). Recall 1 at IoU 0.5, 1/2 at 0.75; mean best IoU
    0.8125. AP50 1; AP75: precision 1 to recall 1/2, 51 of the 101 recall points; the second
    mask matches at 3 of COCO's 10 IoU thresholds (0.5, 0.55, 0.6). The boxes' IoU is 0.625 too."""
    masks = np.zeros((2, 20, 30), bool)
    masks[0, :10, :10] = masks[1, 10:18, 10:20] = True
    instances = Instances(image=np.zeros((20, 30, 3), np.uint8), image_id=7, file_name="7.png", masks=masks,
                          boxes=np.array([[0, 0, 10, 10], [10, 10, 10, 8]], np.float32), ids=np.arange(2),
                          category_ids=np.ones(2, np.int64), iscrowd=np.zeros(2, bool))
    part = masks.copy()
    part[1, 15:] = False
    result = score_masks([generator_records(part, [0.9, 0.8])], [instances])
    assert result.recall == {0.5: 1.0, 0.75: 0.5} and result.mean_best_iou == 0.8125
    for ap in (result.box_ap, result.mask_ap):
        assert ap["AP50"] == 1.0 and ap["AP75"] == pytest.approx(51 / 101, abs=1e-12)
        assert ap["AP"] == pytest.approx((3 * 1 + 7 * 51 / 101) / 10, abs=1e-12)
    with pytest.raises(ValueError, match=r"image 7 mask 0: mask shape \(20, 29\) is not the image's \(20, 30\)"):
        score_masks([generator_records(part[:, :, :29], [0.9, 0.8])], [instances])
    with pytest.raises(ValueError, match="1 lists of generated masks for 2 images"):
        score_masks([[]], [instances, instances])


def test_an_image_with_hundreds_of_masks_is_scored():
    """300 masks on one image (the generator's count with its filters open; pycocotools' `area`
    alone overflows past 255 masks under NumPy 2), the two ground-truth masks among them scored
    highest: AP 1, every object small (COCO's areas under 32^2), recall 1."""
    rng = np.random.default_rng(0)
    masks = np.zeros((300, 40, 50), bool)
    for k in range(300):
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        masks[k, y:y + 1 + k % 10, x:x + 1 + k % 7] = True
    boxes = np.asarray(batched_mask_to_box(masks[:2]))
    instances = Instances(image=np.zeros((40, 50, 3), np.uint8), image_id=3, file_name="3.png", masks=masks[:2],
                          boxes=np.asarray([[x0, y0, x1 - x0 + 1, y1 - y0 + 1] for x0, y0, x1, y1 in boxes.tolist()],
                                           np.float32),
                          ids=np.arange(2), category_ids=np.ones(2, np.int64), iscrowd=np.zeros(2, bool))
    result = score_masks([generator_records(masks, np.linspace(0.9, 0.1, 300), "coco_rle")], [instances])
    assert list(result.masks_per_image) == [300] and result.recall == {0.5: 1.0, 0.75: 1.0}
    for ap in (result.box_ap, result.mask_ap):
        assert (ap["AP"], ap["APs"], ap["APm"], ap["APl"]) == (1.0, 1.0, -1.0, -1.0)


def test_eval_runs_the_automatic_mask_generator(checkpoint, synthetic_data_dir, tmp_path, capsys):
    """--protocols amg on 2 images, a 4x4 grid and no thresholds (the random model's masks are
    neither confident nor stable): the masks counted are the generator's own for each image."""
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path, "--num-images", "2", "--protocols", "amg",
                    "--amg-points-per-side", "4", "--amg-points-per-batch", "8", "--amg-pred-iou-thresh", "0",
                    "--amg-stability-score-thresh", "0") == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert "points" not in results and "boxes" not in results
    amg = results["amg"]
    settings = AmgSettings(points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert amg["settings"] == {"points_per_side": 4, "points_per_batch": 8, "pred_iou_thresh": 0.0,
                               "stability_score_thresh": 0.0, "box_nms_thresh": 0.7, "crop_n_layers": 0}

    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    instances = [read_instances(source[i]) for i in range(2)]
    generator = SamAutomaticMaskGenerator(*load_sam(checkpoint), **settings.generator_options())
    found = [len(generator.generate(x.image)) for x in instances]
    assert sum(found) > 0
    assert amg["num_images"] == 2 and amg["num_masks"] == sum(found)
    assert amg["masks_per_image"] == {"mean": sum(found) / 2, "min": min(found), "max": max(found)}
    assert amg["num_ground_truth"] == sum(len(x.masks) for x in instances)
    assert amg["ground_truth_per_image"] == amg["num_ground_truth"] / 2
    assert amg["max_detections"] == max(100, max(found))
    for key in ("box_ap", "mask_ap"):
        assert list(amg[key]) == list(STATS) and all(-1.0 <= v <= 1.0 for v in amg[key].values())
    assert set(amg["recall"]) == {"0.5", "0.75"} and 0 <= amg["recall"]["0.75"] <= amg["recall"]["0.5"] <= 1
    assert 0 <= amg["mean_best_iou"] <= 1 and amg["seconds"] >= 0 and amg["seconds_per_image"] >= 0
    table = (tmp_path / "results.md").read_text()
    assert table in printed
    assert "Automatic masks: 4x4 points, no predicted-IoU filter, no stability filter, box NMS 0.7" in table
    assert f"| box AP | {amg['box_ap']['AP']:.3f} |" in table
    assert f"| mask AP | {amg['mask_ap']['AP']:.3f} |" in table
    assert f"| {sum(found) / 2:.1f} ({min(found)}-{max(found)}) |" in table
    assert not (tmp_path / "miou_vs_clicks.png").exists()


@pytest.mark.parametrize("extra, message", [
    (("--amg-pred-iou-thresh", "1.5"), "pred_iou_thresh must be a number in [0, 1], got 1.5"),
    (("--amg-stability-score-thresh", "-0.1"), "stability_score_thresh must be a number in [0, 1], got -0.1"),
    (("--amg-box-nms-thresh", "nan"), "box_nms_thresh must be a number in [0, 1], got nan"),
    (("--amg-points-per-side", "0"), "points_per_side must be an int >= 1, got 0"),
    (("--amg-points-per-batch", "0"), "points_per_batch must be an int >= 1, got 0"),
    (("--amg-crop-n-layers", "-1"), "crop_n_layers must be an int >= 0, got -1"),
    (("--amg-crop-n-layers", "6"), "crop_n_layers=6 is too many for a 132x119 image"),  # the first image
])
def test_bad_automatic_mask_settings_are_one_line_errors(checkpoint, synthetic_data_dir, tmp_path, capsys,
                                                         extra, message):
    assert run_eval(checkpoint, synthetic_data_dir, tmp_path / "out", "--protocols", "amg", "--num-images", "1",
                    *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()
