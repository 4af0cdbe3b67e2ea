"""Box-prompted COCO mask AP: stand-in predictors whose AP is known (perfect masks on prepared
synthetic records; filled box rectangles on a hand-made scene, AP counted by hand), the
detections file reader and its errors, and the tiny model end to end."""

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_records import mask_to_box_xyxy
from sam_jax.batch_predictor import SamBatchPredictor
from sam_jax.data import rle
from sam_jax.data.pipeline import open_source
from sam_jax.evaluation.box_prompts import (
    STATS, BoxResult, Detections, coco_ground_truth, coco_mask_ap, evaluate_boxes, read_detections,
)
from sam_jax.evaluation.instances import Instances, read_instances
from sam_jax.modeling import Sam


@pytest.fixture(scope="module")
def synthetic(synthetic_data_dir):
    """The first 3 validation images of the prepared sam_synthetic/small data set."""
    source = open_source("sam_synthetic/small", "validation", data_dir=synthetic_data_dir)
    return [read_instances(source[i]) for i in range(3)]


def xyxy(xywh):
    xywh = np.asarray(xywh, np.float32).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


class StandIn:
    """SamBatchPredictor's set_images / predict_batch contract, masks from answer(image, boxes)
    -> ((P, H, W) bool, (P,) scores); records the images per set_images call."""

    def __init__(self, answer):
        self.answer = answer
        self.images = None
        self.calls = []

    def set_images(self, images):
        assert len(images) > 0
        self.images = list(images)
        self.calls.append(len(images))

    def predict_batch(self, prompts, multimask_output=True):
        assert multimask_output is False
        assert len(prompts) == len(self.images)  # every set image gets prompts
        out = []
        for image, p in zip(self.images, prompts):
            assert set(p) == {"boxes"} and p["boxes"].ndim == 2 and len(p["boxes"]) > 0
            masks, scores = self.answer(image, np.asarray(p["boxes"]))
            out.append((masks[:, None], scores[:, None], np.zeros((len(masks), 1, 4, 4), np.float32)))
        return out


def perfect(instances):
    """Each prompted box -> the ground-truth mask it was taken from (masks sharing a box
    are handed out in order, as the evaluation prompts them)."""
    by_image = {inst.image.tobytes(): inst for inst in instances}

    def answer(image, boxes):
        inst = by_image[image.tobytes()]
        keep = ~inst.iscrowd
        gt_boxes, gt_masks = xyxy(inst.boxes[keep]), inst.masks[keep]
        used, masks = set(), []
        for box in boxes:
            k = next(k for k in range(len(gt_boxes)) if k not in used and np.array_equal(gt_boxes[k], box))
            used.add(k)
            masks.append(gt_masks[k])
        return np.stack(masks), np.full(len(boxes), 0.5, np.float32)

    return answer


def rectangles(scores=None):
    """Each box -> its filled rectangle, scored scores[box] (0 without scores)."""

    def answer(image, boxes):
        masks = np.zeros((len(boxes),) + image.shape[:2], bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
            m[y0:y1, x0:x1] = True
        s = [scores[tuple(b)] if scores else 0.0 for b in boxes.tolist()]
        return masks, np.array(s, np.float32)

    return answer


def make_instances(image_id, hw, masks, iscrowd=None):
    masks = np.asarray(masks, bool).reshape((-1,) + hw)
    box = mask_to_box_xyxy(masks)
    n = len(masks)
    return Instances(
        image=np.random.default_rng(image_id).integers(0, 256, hw + (3,), dtype=np.uint8),
        image_id=image_id, file_name=f"{image_id}.png", masks=masks,
        boxes=np.concatenate([box[:, :2], box[:, 2:] - box[:, :2]], axis=1),
        ids=np.arange(n, dtype=np.int64), category_ids=np.ones(n, np.int64),
        iscrowd=np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd, bool),
    )


# The hand-made scene. Each rectangle prediction's IoU with its own mask:
A_BOX, B_BOX, C_BOX = (2, 2, 12, 12), (20, 2, 30, 12), (5, 5, 15, 15)  # XYXY


def scene():
    """Image 10 (40x60): a, a 10x10 square (rectangle IoU 1); b, that square less a 6x6
    corner, still a 10x10 box (IoU 64/100); a crowd region, never prompted. Image 11:
    c, two 3x3 squares in opposite corners of a 10x10 box (IoU 18/100). Image 12: no masks.
    Boxes are apart, so no prediction overlaps another mask. All masks are small (< 32^2)."""
    m0 = np.zeros((3, 40, 60), bool)
    m0[0, 2:12, 2:12] = True
    m0[1, 2:12, 20:30] = True
    m0[1, 2:8, 24:30] = False
    m0[2, 25:35, 40:55] = True
    m1 = np.zeros((1, 30, 30), bool)
    m1[0, 5:8, 5:8] = m1[0, 12:15, 12:15] = True
    return [make_instances(10, (40, 60), m0, iscrowd=[0, 0, 1]), make_instances(11, (30, 30), m1),
            make_instances(12, (20, 20), np.zeros((0, 20, 20)))]


class Progress:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


def test_coco_ground_truth_renumbers_ids_and_keeps_masks_and_crowds():
    instances = scene()
    gt = coco_ground_truth(instances)
    assert [im["id"] for im in gt["images"]] == [10, 11, 12]
    assert (gt["images"][0]["height"], gt["images"][0]["width"], gt["images"][0]["file_name"]) == (40, 60, "10.png")
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]  # from 1: COCOeval treats id 0 as unmatched
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1, 0]
    assert [a["area"] for a in gt["annotations"]] == [100, 64, 150, 18]
    assert gt["annotations"][1]["bbox"] == [20, 2, 10, 10]
    assert gt["categories"] == [{"id": 1, "name": "1"}]
    for a, mask in zip(gt["annotations"], list(instances[0].masks) + list(instances[1].masks)):
        assert isinstance(a["segmentation"]["counts"], str)
        np.testing.assert_array_equal(rle.decode(a["segmentation"]["counts"], a["segmentation"]["size"]), mask)
    json.dumps(gt)
    with pytest.raises(ValueError, match="image_id 10 occurs twice"):
        coco_ground_truth([instances[0], instances[0]])
    assert coco_ground_truth([instances[2]])["categories"] == [{"id": 1, "name": "1"}]  # none: category 1


def test_a_perfect_predictor_scores_one_on_synthetic_records(synthetic):
    predictor, progress = StandIn(perfect(synthetic)), Progress()
    result = evaluate_boxes(predictor, synthetic, batch_images=2, progress=progress)
    assert predictor.calls == [2, 1]
    assert progress.n == 3
    non_crowd = sum(int((~inst.iscrowd).sum()) for inst in synthetic)
    assert result.num_images == 3 and result.num_boxes == non_crowd > 3
    assert result.box_source == "ground_truth"
    assert result.stats["AP"] == result.stats["AP50"] == result.stats["AP75"] == 1.0
    assert all(result.stats[k] in (1.0, -1.0) for k in STATS)


def test_box_rectangles_score_the_hand_count():
    """Rectangle IoUs: a 1, b 0.64, c 0.18; 3 ground-truth masks (the crowd does not count).
    COCO's AP is the mean of the interpolated precision (the best precision at recall >= r)
    over r = 0, 0.01, ..., 1; recall steps in thirds, and 1/3 and 2/3 lie between grid
    points: r <= 1/3 is 34 points, 1/3 < r <= 2/3 is 33, r > 2/3 (never reached) is 34.

    Scores a 0.9, c 0.8, b 0.7. IoU 0.5: a TP (P 1, R 1/3), c FP (P 1/2), b TP (P 2/3, R 2/3):
      AP50 = (34 * 1 + 33 * 2/3) / 101 = 56/101.
    IoU 0.75 (and every threshold above 0.64): only a: AP75 = 34/101.
    AP over thresholds 0.5, 0.55, ..., 0.95: three (0.5 - 0.6) count b, seven do not:
      (3 * 56 + 7 * 34) / 1010 = 406/1010. All masks are small: APs = AP, APm = APl = -1.
    With c scored lowest (0.1), a and b come first: precision 1 to recall 2/3, AP50 = 67/101."""
    instances = scene()
    predictor, progress = StandIn(rectangles({A_BOX: 0.9, C_BOX: 0.8, B_BOX: 0.7})), Progress()
    result = evaluate_boxes(predictor, instances, batch_images=8, progress=progress)
    assert predictor.calls == [2]  # image 12 has no box: not set
    assert progress.n == 3
    assert (result.num_images, result.num_boxes, result.box_source) == (3, 3, "ground_truth")
    expected = {"AP": 406 / 1010, "AP50": 56 / 101, "AP75": 34 / 101, "APs": 406 / 1010, "APm": -1.0, "APl": -1.0}
    for key in STATS:
        assert result.stats[key] == pytest.approx(expected[key], abs=1e-12), key
    reordered = evaluate_boxes(StandIn(rectangles({A_BOX: 0.9, C_BOX: 0.1, B_BOX: 0.7})), instances)
    assert reordered.stats["AP50"] == pytest.approx(67 / 101, abs=1e-12)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["mask_ap"]["AP50"] == pytest.approx(56 / 101) and summary["num_boxes"] == 3


@pytest.mark.parametrize("use_categories", [False, True])
def test_stats_equal_cocoeval_summarize(use_categories):
    """coco_mask_ap reads the statistics from the accumulated precision (summarize is tied to
    maxDets 100); at 100 they are summarize's, here on rectangles of the scene and of the
    masks' boxes shifted by 3 pixels, with a second category."""
    instances = scene()
    instances[0].category_ids = np.array([1, 2, 1])
    gt = coco_ground_truth(instances)
    results = []
    for inst in instances[:2]:
        for shift, score_base in ((0, 0.5), (3, 0.2)):
            boxes = xyxy(inst.boxes[~inst.iscrowd]) + shift
            masks, _ = rectangles()(inst.image, boxes)
            for k, (m, category) in enumerate(zip(masks, inst.category_ids[~inst.iscrowd])):
                results.append({"image_id": inst.image_id, "category_id": int(category), "score": score_base + 0.1 * k,
                                "segmentation": {"size": list(m.shape), "counts": rle.encode(m).decode()},
                                "area": float(m.sum())})
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="segm")
        evaluator.params.useCats = int(use_categories)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = coco_mask_ap(gt, results, use_categories=use_categories)
    np.testing.assert_allclose([stats[k] for k in STATS], evaluator.stats[:6], rtol=0, atol=1e-12)
    assert 0 < stats["AP"] < 1


def test_ground_truth_boxes_beyond_coco_s_100_per_image_all_count():
    """120 separate 2x2 squares in one image, each predicted exactly: AP 1, which COCO's
    default of 100 detections per image would cap at 100/120 recall."""
    masks = np.zeros((120, 60, 50), bool)
    for k, m in enumerate(masks):
        y, x = 5 * (k // 10), 5 * (k % 10)
        m[y:y + 2, x:x + 2] = True
    scores = {tuple(float(v) for v in b): 1 - k / 200 for k, b in enumerate(mask_to_box_xyxy(masks))}
    result = evaluate_boxes(StandIn(rectangles(scores)), [make_instances(1, (60, 50), masks)])
    assert result.max_detections == 120
    assert result.stats["AP"] == 1.0


def write(tmp_path, content):
    path = tmp_path / "detections.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def detection(image_id=10, bbox=(2, 2, 10, 10), score=0.9, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def test_read_detections(tmp_path):
    path = write(tmp_path, [detection(), detection(11, (1.5, 2, 3, 4.5), 0.25, 3), detection(score=1)])
    d = read_detections(path, [10, 11, 12])
    assert sorted(d) == [10, 11]
    np.testing.assert_array_equal(d[11].boxes, [[1.5, 2, 4.5, 6.5]])
    np.testing.assert_array_equal(d[10].boxes, [[2, 2, 12, 12], [2, 2, 12, 12]])
    np.testing.assert_array_equal(d[10].scores, np.float32([0.9, 1.0]))
    np.testing.assert_array_equal(d[11].category_ids, [3])
    assert (d[10].boxes.dtype, d[10].scores.dtype, d[10].category_ids.dtype) == (np.float32, np.float32, np.int64)
    assert read_detections(write(tmp_path, []), [10]) == {}


def test_a_missing_detections_file_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        read_detections(str(tmp_path / "nope.json"), [10])


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{'image_id': 1}]", "is not JSON: Expecting property name"),
        ({"annotations": []}, "must hold a JSON list of detections (COCO results format), not a JSON dict"),
        ([detection(), 7], "entry 1 is not an object"),
        ([{"image_id": 10, "bbox": [0, 0, 1, 1]}], "entry 0 has no 'category_id', 'score'"),
        ([detection(image_id="10")], "entry 0: image_id must be an integer"),
        ([detection(bbox=(0, 0, 1))], "entry 0: bbox must be 4 finite numbers [x, y, w, h], got [0, 0, 1]"),
        ('[{"image_id": 10, "category_id": 1, "bbox": [0, 0, NaN, 1], "score": 1}]', "bbox must be 4 finite numbers"),
        ([detection(bbox=(0, 0, "1", 1))], "bbox must be 4 finite numbers"),
        ([detection(), detection(bbox=(0, 0, 5, 0))], "entry 1: bbox width and height must be > 0, got [0, 0, 5, 0]"),
        ([detection(score="high")], 'entry 0: score must be a finite number, got "high"'),
        ('[{"image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1], "score": Infinity}]', "score must be a finite number, got inf"),
        ([detection(image_id=99)], "entry 0: image_id 99 is not among the 3 evaluated images"),
    ],
)
def test_bad_detections_files_are_one_line_errors(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as error:
        read_detections(path, [10, 11, 12])
    text = str(error.value)
    assert message in text and path in text and "\n" not in text


def test_detection_scores_order_the_masks(tmp_path):
    """Detections on image 10: box a (its rectangle is mask a) and a box over nothing
    (a false positive); 3 ground-truth masks. The true one scored higher: precision 1 up to
    recall 1/3, AP50 = 34/101. The false one higher: precision 1/2, AP50 = 17/101. The
    predictor's own scores (0) are not used."""
    instances = scene()
    ids = [inst.image_id for inst in instances]
    results = []
    for true_score, false_score in ((0.9, 0.2), (0.2, 0.9)):
        path = write(tmp_path, [detection(10, (2, 2, 10, 10), true_score), detection(10, (40, 2, 10, 10), false_score)])
        predictor = StandIn(rectangles())
        result = evaluate_boxes(predictor, instances, read_detections(path, ids))
        assert predictor.calls == [1]
        assert (result.num_images, result.num_boxes, result.box_source) == (3, 2, "detections")
        results.append(result)
    assert results[0].stats["AP50"] == pytest.approx(34 / 101, abs=1e-12)
    assert results[1].stats["AP50"] == pytest.approx(17 / 101, abs=1e-12)
    assert results[0].max_detections == 100


def test_detection_categories_are_matched_as_given():
    """Mask a detected as category 2: in the detections' path categories count, so it matches
    nothing (category 2 has no ground truth), and a warning says so."""
    instances = scene()
    detections = {10: Detections(np.array([A_BOX], np.float32), np.array([0.9], np.float32), np.array([2]))}
    with pytest.warns(UserWarning, match=r"no detection category \[2\] is a ground-truth category \[1\]"):
        result = evaluate_boxes(StandIn(rectangles()), instances, detections)
    assert result.stats["AP50"] == 0.0
    detections[10].category_ids[:] = 1
    assert evaluate_boxes(StandIn(rectangles()), instances, detections).stats["AP50"] == pytest.approx(34 / 101)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images to evaluate"):
        evaluate_boxes(StandIn(rectangles()), [])
    with pytest.raises(ValueError, match="batch_images must be an int >= 1"):
        evaluate_boxes(StandIn(rectangles()), scene(), batch_images=0)


def test_tiny_model_end_to_end(tiny, synthetic):
    config, _, params = tiny
    predictor = SamBatchPredictor(Sam(config), params)
    result = evaluate_boxes(predictor, synthetic, batch_images=2)
    assert isinstance(result, BoxResult)
    assert result.num_boxes == sum(int((~inst.iscrowd).sum()) for inst in synthetic)
    assert result.num_images == 3
    for key in STATS:
        value = result.stats[key]
        assert math.isfinite(value) and (0 <= value <= 1 or value == -1), (key, value)
