"""`SamAutomaticMaskGenerator` and `sam_jax.utils.amg` equal the official ones (vit_tiny, random weights).

Official: `segment_anything.automatic_mask_generator` and `segment_anything.utils.amg`,
run on the torchvision stand-ins (tests/stand_ins: nms, batched_nms, box_area).

The random tiny decoder's masks are a periodic checkerboard over the whole
image, whatever the point: every box is the image, and NMS leaves one record.
`structured` edits a copy of the official model so that masks are blobs that
follow the image, vary with the point, and have holes and islands; `trained`
is a model the project trained, on a real photograph and held-out images.
Both sides get the same weights. The records must be the same, in the same
order: the same point, crop box, RLE, area and box, predicted IoU within
1e-4 and stability within 1e-4 (or three pixels' worth of its pixel-count
ratio); a mask may differ only at pixels whose logit lies
within 1e-4 of the threshold (checked where no small regions were edited),
and such masks are counted and must be few.
"""

from __future__ import annotations

import copy
import os
import sys

import jax
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from checkpoints_convert import reference_model
from checkpoints_convert.official import official_to_flax
from conftest import official_module
from experiments.sample_image import synthetic_image
from sam_jax.automatic_mask_generator import (SamAutomaticMaskGenerator, decode_points, predict_point_batch,
                                             summarise_masks)
from sam_jax.modeling import Sam, postprocess_masks
from sam_jax.predictor import SamPredictor
from sam_jax.utils import amg

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# 301 x 411: the four layer-1 crops have different areas, so the official crop NMS
# (scores 1 / crop area, visited in torch's unstable sort order) has no ties to break.
IMAGE = synthetic_image(301, 411, seed=3)


@pytest.fixture(scope="module")
def structured(tiny):
    """(config, official model, params) of the tiny model with image-following masks."""
    config, ref, _ = tiny
    ref = copy.deepcopy(ref)
    decoder = ref.mask_decoder
    with torch.no_grad():
        for i in (0, 3):  # nearest-neighbour upscaling instead of a random 2x2 pattern
            w = decoder.output_upscaling[i].weight
            w.copy_(w[:, :, :1, :1].expand_as(w))
        conv = decoder.output_upscaling[3]
        conv.weight[:, -1] = 0.0  # last mask-feature channel constant: a per-token logit offset
        conv.bias[-1] = 3.0
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight[-1] = 0.0
            mlp.layers[-1].bias[-1] = 0.0
        # Offsets so that token t's masks cover about 1 - quantile[t] of an image.
        torch.manual_seed(0)
        image = torch.as_tensor(synthetic_image(256, 256, 0)).permute(2, 0, 1)[None].float()
        embedding = ref.image_encoder(ref.preprocess(image))
        points = torch.rand(16, 1, 2) * 256
        sparse, dense = ref.prompt_encoder((points, torch.ones(16, 1)), None, None)
        low_res, _ = decoder.predict_masks(embedding, ref.prompt_encoder.get_dense_pe(), sparse, dense)
        for t, (mlp, quantile) in enumerate(zip(decoder.output_hypernetworks_mlps, (0.5, 0.6, 0.75, 0.9))):
            offset = torch.quantile(low_res[:, t].flatten(), quantile)
            mlp.layers[-1].bias[-1] = -offset / torch.nn.functional.gelu(torch.tensor(3.0))
            mlp.layers[-1].weight.mul_(100.0)
            mlp.layers[-1].bias.mul_(100.0)
    return config, ref, official_to_flax(reference_model.state_dict_numpy(ref), config)


def segmentation_mask(record, output_mode) -> np.ndarray:
    seg = record["segmentation"]
    if output_mode == "binary_mask":
        return seg
    if output_mode == "uncompressed_rle":
        return amg.rle_to_mask(seg)
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def near_threshold_logits(predictor: SamPredictor, image: np.ndarray, record) -> np.ndarray:
    """Our logits (H, W) of the output that made `record` (its point, on its crop), at the original
    size; -inf outside the crop. A pixel where the two generators' masks differ must sit here
    within float rounding of the threshold."""
    x, y, w, h = record["crop_box"]
    predictor.set_image(image[y : y + h, x : x + w])
    px, py = record["point_coords"][0]
    logits = predictor.predict(point_coords=np.array([[px - x, py - y]]), point_labels=np.array([1]),
                               return_logits=True)[0]
    mask = record["mask"][y : y + h, x : x + w]
    best = int(np.argmin([np.sum((lg > 0) != mask) for lg in logits]))
    full = np.full(image.shape[:2], -np.inf, np.float32)
    full[y : y + h, x : x + w] = logits[best]
    return full


def assert_records_equal(records, expected, output_mode, image, predictor=None, max_differing=0.02):
    """The claim: the same records in the same order, every field equal (scores within 1e-4), the
    same RLE for all masks but those whose differing pixels sit within 1e-4 of the threshold (with a
    `predictor` to check that; without, when small regions were edited, they are only counted).
    Returns the number of masks that differ, at most `max_differing` of the records."""
    assert len(records) == len(expected), (len(records), len(expected))
    differing = 0
    for ours, ref in zip(records, expected):
        assert sorted(ours) == sorted(ref)
        assert ours["point_coords"] == ref["point_coords"] and ours["crop_box"] == ref["crop_box"]
        assert abs(ours["predicted_iou"] - ref["predicted_iou"]) <= 1e-4
        if np.isnan(ref["stability_score"]):  # an empty mask at thr - offset, unfiltered
            assert np.isnan(ours["stability_score"])
        else:  # a count ratio: a pixel flipped at thr +- offset moves it by 1 / (a count >= the area)
            assert abs(ours["stability_score"] - ref["stability_score"]) <= max(1e-4, 3 / max(ref["area"], 1))
        assert all(type(v) is int for v in ours["bbox"] + ours["crop_box"] + [ours["area"]])
        if output_mode == "binary_mask":
            assert ours["segmentation"].shape == image.shape[:2] and ours["segmentation"].dtype == bool
            same = np.array_equal(ours["segmentation"], ref["segmentation"])
        else:
            same = ours["segmentation"] == ref["segmentation"]  # RLE dicts, counts and all
        if same:
            assert ours["area"] == ref["area"] and ours["bbox"] == ref["bbox"]
            continue
        differing += 1
        mask, ref_mask = segmentation_mask(ours, output_mode), segmentation_mask(ref, output_mode)
        if predictor is not None:
            logits = near_threshold_logits(predictor, image, {**ours, "mask": mask})
            assert np.all(np.abs(logits[mask != ref_mask]) < 1e-4), "masks differ away from the threshold"
    assert differing <= max(1, max_differing * len(records)), (differing, len(records))
    return differing


SETTINGS = {
    "filters": dict(points_per_side=8, points_per_batch=27, pred_iou_thresh=0.02,
                    stability_score_thresh=0.2, stability_score_offset=0.1),
    "no filters": dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0, box_nms_thresh=0.5),
    # Masks from all five crops; the crop NMS drops a whole-image mask for a crop's.
    "crops": dict(points_per_side=6, points_per_batch=20, pred_iou_thresh=0.02, stability_score_thresh=0.2,
                  stability_score_offset=0.1, crop_n_layers=1, crop_n_points_downscale_factor=2,
                  box_nms_thresh=0.5, crop_nms_thresh=0.5),
    # Islands and holes are blocks of ~700 pixels: most masks change, and one more goes.
    "small regions": dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.02,
                          stability_score_thresh=0.1, stability_score_offset=0.1, min_mask_region_area=6000),
    "point grids": dict(points_per_side=None, point_grids=[amg.build_point_grid(5)[::2]],
                        points_per_batch=7, pred_iou_thresh=0.0, stability_score_thresh=0.2,
                        stability_score_offset=0.1, box_nms_thresh=0.9),
}
OUTPUT_MODES = {"filters": "binary_mask", "no filters": "uncompressed_rle", "crops": "coco_rle",
                "small regions": "coco_rle", "point grids": "binary_mask"}


@pytest.mark.parametrize("setting", SETTINGS)
def test_generate_matches_official(structured, setting):
    config, ref, params = structured
    kwargs = dict(SETTINGS[setting], output_mode=OUTPUT_MODES[setting])
    official = official_module("automatic_mask_generator").SamAutomaticMaskGenerator(ref, **kwargs)
    expected = official.generate(IMAGE)
    records = SamAutomaticMaskGenerator(Sam(config), params, **kwargs).generate(IMAGE)
    assert len(records) >= 4, "the setting should keep several masks"
    predictor = None if kwargs.get("min_mask_region_area") else SamPredictor(Sam(config), params)
    differing = assert_records_equal(records, expected, kwargs["output_mode"], IMAGE, predictor)
    for ours in records:
        assert ours["area"] == int(segmentation_mask(ours, kwargs["output_mode"]).sum())
    print(f"[parity] amg {setting}: {len(records)} records, {differing} masks differ near the threshold")


# A model the project trained (`tests/data/make_trained_model.py`: the main job's export, mapped back to
# the official modules by the inverse converter): its masks follow objects, so a grid of points
# gives many distinct records, where random weights collapse to one or two after NMS.
TRAINED = os.path.join(os.path.dirname(__file__), "data", "synthetic_cpu_official.npz")
# The official defaults' filters (0.88 / 0.95 at offset 1) keep nothing of this small model's
# modest logits; these keep 100-250 masks per image, from a 16 or 24-point grid.
TRAINED_SETTINGS = {
    "crops and small regions": dict(points_per_side=16, crop_n_layers=1, crop_n_points_downscale_factor=2,
                                    min_mask_region_area=100, pred_iou_thresh=0.25, stability_score_thresh=0.6,
                                    stability_score_offset=0.1, output_mode="coco_rle"),
    "filters": dict(points_per_side=24, pred_iou_thresh=0.2, stability_score_thresh=0.5, stability_score_offset=0.1,
                    output_mode="binary_mask"),
}


@pytest.fixture(scope="module")
def trained():
    """(config, official model, params) of the trained synthetic_cpu model."""
    from experiments.train_configs import SYNTHETIC_MODEL

    stored = np.load(TRAINED)
    state = {k: torch.from_numpy(stored[k].astype(np.float32)) for k in stored.files if k != "source"}
    ref = reference_model.build_official_for(SYNTHETIC_MODEL)
    ref.load_state_dict(state)
    return SYNTHETIC_MODEL, ref.eval(), official_to_flax({k: v.numpy() for k, v in state.items()}, SYNTHETIC_MODEL)


def trained_images():
    """A real photograph (matplotlib's grace_hopper.jpg) and two held-out synthetic scenes."""
    import matplotlib.cbook
    from PIL import Image

    from sam_jax.data.builders.sam_synthetic import SamSynthetic, example_scene

    cpu = next(c for c in SamSynthetic.BUILDER_CONFIGS if c.name == "cpu")
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        images = {"grace_hopper": np.asarray(photo.convert("RGB"))}
    for i in (0, 1):
        images[f"held-out scene {i}"] = example_scene(cpu, "validation", i).image
    return images


@pytest.mark.parametrize("setting", TRAINED_SETTINGS)
def test_generate_equals_official_with_a_trained_model(trained, setting):
    config, ref, params = trained
    kwargs = TRAINED_SETTINGS[setting]
    official = official_module("automatic_mask_generator").SamAutomaticMaskGenerator(ref, **kwargs)
    ours = SamAutomaticMaskGenerator(Sam(config), params, **kwargs)
    predictor = None if kwargs.get("min_mask_region_area") else SamPredictor(Sam(config), params)
    for name, image in trained_images().items():
        with torch.no_grad():
            expected = official.generate(image)
        records = ours.generate(image)
        assert len(records) >= 10, f"{name}: the trained model should give many masks, got {len(records)}"
        differing = assert_records_equal(records, expected, kwargs["output_mode"], image, predictor)
        print(f"[parity] amg trained, {setting}, {name}: {len(records)} records identical but {differing}")


def test_vmapped_chunks_equal_one_at_a_time(structured):
    """The accelerator path (`_mask_chunk` > 1: vmapped chunks, no skipping) on CPU."""
    config, _, params = structured
    p = SamPredictor(Sam(config), params)
    p.set_image(IMAGE)
    points = np.random.default_rng(4).uniform(0, 256, (6, 2)).astype(np.float32)
    valid = np.array([True] * 5 + [False])
    run = lambda chunk: predict_point_batch(p.model, p.params, p.features, points, valid, np.float32(0.03), 0.1,
                                       p.input_size, IMAGE.shape[:2], chunk)
    (iou, *one), (iou_chunked, *chunked) = run(1), run(4)  # 18 masks: 4 chunks, the last padded
    np.testing.assert_array_equal(iou, iou_chunked)
    summarised = np.repeat(valid, 3) & (np.asarray(iou) > np.float32(0.03))
    assert 0 < summarised.sum() < 15
    for a, b in zip(one, chunked):  # equal where the one-at-a-time path did not skip
        np.testing.assert_array_equal(np.asarray(a)[summarised], np.asarray(b)[summarised])
        assert not np.asarray(a)[~summarised].any()


def test_generate_is_repeatable_and_compiles_the_decoder_once(structured):
    """The decoder compiles once for every crop size; the summary once per crop size."""
    config, _, params = structured
    generator = SamAutomaticMaskGenerator(Sam(config), params, points_per_side=4, points_per_batch=5,
                                          pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = synthetic_image(97, 61, seed=1)  # a crop size no other test compiles for
    first = generator.generate(image)
    decoders, summaries = decode_points._cache_size(), summarise_masks._cache_size()
    second = generator.generate(image)  # 16 points in 4 batches, the last one padded
    assert (decode_points._cache_size(), summarise_masks._cache_size()) == (decoders, summaries)
    assert [r["segmentation"].tolist() for r in first] == [r["segmentation"].tolist() for r in second]
    assert len(first) > 0
    generator.generate(synthetic_image(83, 71, seed=2))  # a new crop size: a new summary, the same decoder
    assert (decode_points._cache_size(), summarise_masks._cache_size()) == (decoders, summaries + 1)


# ------------------------------------------------------------------------------------- amg.py


@pytest.fixture(scope="module")
def official_amg():
    return official_module("utils.amg")


def random_masks(rng, shape, blobs=True):
    """Bool masks of a few smooth blobs (with holes and islands), or uniform noise."""
    if not blobs:
        return rng.random(shape) < 0.5
    small = rng.normal(size=(*shape[:-2], shape[-2] // 8 + 1, shape[-1] // 8 + 1))
    big = np.repeat(np.repeat(small, 8, -2), 8, -1)[..., : shape[-2], : shape[-1]]
    return big + 0.3 * rng.normal(size=shape) > 0.8


@pytest.mark.parametrize("shape", [(6, 37, 53), (3, 1, 9), (3, 9, 1), (4, 16, 16)])
def test_rle_matches_official(official_amg, shape):
    rng = np.random.default_rng(0)
    masks = np.concatenate([random_masks(rng, shape), random_masks(rng, shape, blobs=False),
                            np.zeros((1, *shape[1:]), bool), np.ones((1, *shape[1:]), bool)])
    rles = amg.mask_to_rle(masks)
    assert rles == official_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    for rle, mask in zip(rles, masks):
        np.testing.assert_array_equal(amg.rle_to_mask(rle), mask)
        np.testing.assert_array_equal(amg.rle_to_mask(rle), official_amg.rle_to_mask(rle))
        assert amg.area_from_rle(rle) == official_amg.area_from_rle(rle) == mask.sum()
        coco = amg.coco_encode_rle(rle)
        assert coco == official_amg.coco_encode_rle(rle)
        np.testing.assert_array_equal(mask_utils.decode({**coco, "counts": coco["counts"].encode()}), mask)


def test_stability_score_and_boxes_match_official(official_amg):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(5, 3, 23, 31)) * 3).astype(np.float32)
    logits[0, 0] = -5.0  # empty at both cutoffs: NaN
    expected = official_amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    for x in (logits, jax.numpy.asarray(logits)):
        np.testing.assert_array_equal(np.asarray(amg.calculate_stability_score(x, 0.0, 1.0)), expected)
    masks = random_masks(rng, (5, 3, 23, 31))
    masks[1, 2] = False
    masks[2, 0] = False
    masks[2, 0, 7, 4] = True  # a single pixel
    expected = official_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    for x in (masks, jax.numpy.asarray(masks)):
        np.testing.assert_array_equal(np.asarray(amg.batched_mask_to_box(x)), expected)
    np.testing.assert_array_equal(amg.batched_mask_to_box(masks[0, 0]), expected[0, 0])
    assert amg.batched_mask_to_box(np.zeros((0, 4, 4), bool)).shape == (0, 4)


def test_grids_crops_and_uncrop_match_official(official_amg):
    for args in [(32, 0, 1), (16, 2, 2), (7, 1, 1)]:
        expected = official_amg.build_all_layer_point_grids(*args)
        for ours, ref in zip(amg.build_all_layer_point_grids(*args), expected, strict=True):
            np.testing.assert_array_equal(ours, ref)
    for args in [((301, 411), 1, 512 / 1500), ((1500, 2250), 2, 512 / 1500), ((64, 30), 3, 0.2)]:
        assert amg.generate_crop_boxes(*args) == official_amg.generate_crop_boxes(*args)
    rng = np.random.default_rng(2)
    boxes = rng.integers(0, 100, (9, 4))
    crop = [30, 40, 130, 140]
    np.testing.assert_array_equal(amg.uncrop_boxes_xyxy(boxes, crop),
                                  official_amg.uncrop_boxes_xyxy(torch.from_numpy(boxes), crop).numpy())
    points = rng.uniform(0, 100, (9, 2))
    np.testing.assert_array_equal(amg.uncrop_points(points, crop),
                                  official_amg.uncrop_points(torch.from_numpy(points), crop).numpy())
    masks = random_masks(rng, (2, 100, 100))
    np.testing.assert_array_equal(amg.uncrop_masks(masks, crop, 200, 150),
                                  official_amg.uncrop_masks(torch.from_numpy(masks), crop, 200, 150).numpy())
    boxes = np.concatenate([boxes, [[0, 0, 5, 99], [75, 80, 100, 100], [10, 10, 20, 20]]])
    for orig in ([0, 0, 150, 200], [0, 0, 130, 140]):
        np.testing.assert_array_equal(
            amg.is_box_near_crop_edge(boxes, crop, orig),
            official_amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop, orig).numpy(),
        )
    np.testing.assert_array_equal(amg.box_xyxy_to_xywh(np.array([3, 4, 10, 20])), [3, 4, 7, 16])


@pytest.mark.parametrize("area", [1, 10, 60, 400])
def test_remove_small_regions_matches_official_cv2(official_amg, area):
    rng = np.random.default_rng(area)
    for mask in list(random_masks(rng, (4, 70, 90))) + [np.zeros((20, 20), bool), np.eye(20, dtype=bool)]:
        for mode in ("holes", "islands"):
            ours, changed = amg.remove_small_regions(mask, area, mode)
            ref, ref_changed = official_amg.remove_small_regions(mask, area, mode)
            assert changed == ref_changed
            np.testing.assert_array_equal(ours, ref)  # diagonal neighbours connect (8-connectivity)


def reference_nms(boxes, scores, threshold):
    """Greedy NMS written from its definition, in float64 (an independent check)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for k in keep:
            w = max(0.0, min(boxes[i][2], boxes[k][2]) - max(boxes[i][0], boxes[k][0]))
            h = max(0.0, min(boxes[i][3], boxes[k][3]) - max(boxes[i][1], boxes[k][1]))
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
            if w * h / (area(boxes[i]) + area(boxes[k]) - w * h) > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("n", [1, 40, 1200])
def test_nms_matches_torchvision_stand_in(n):
    official_module("automatic_mask_generator")  # imports the stand-in torchvision.ops.boxes
    tv = sys.modules["torchvision.ops.boxes"]
    rng = np.random.default_rng(n)
    xy = rng.integers(0, 80, (n, 2))
    boxes = np.concatenate([xy, xy + rng.integers(1, 40, (n, 2))], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: the order of ties is torch's own
    idxs = rng.integers(0, 3, n)
    for threshold in (0.3, 0.7):
        keep = amg.nms(boxes, scores, threshold)
        t_boxes, t_scores, t_idxs = (torch.from_numpy(x) for x in (boxes, scores, idxs))
        np.testing.assert_array_equal(keep, tv.nms(t_boxes, t_scores, threshold))
        if n <= 40:
            assert keep.tolist() == reference_nms(boxes.tolist(), scores.tolist(), threshold)
        ours = amg.batched_nms(boxes, scores, idxs, threshold)
        # n = 1200 takes torchvision's per-category path
        np.testing.assert_array_equal(ours, tv.batched_nms(t_boxes, t_scores, t_idxs, threshold))
        for c in range(3):  # never across categories
            in_c = np.flatnonzero(idxs == c)
            alone = in_c[amg.nms(boxes[in_c], scores[in_c], threshold)]
            assert sorted(ours[idxs[ours] == c]) == sorted(alone)
    # Equal scores keep their input order; identical boxes (IoU 1) are not suppressed at 1.0.
    same = np.tile([[0.0, 0.0, 10.0, 10.0]], (3, 1))
    assert amg.nms(same, np.ones(3), 0.7).tolist() == [0]
    assert amg.nms(same, np.ones(3), 1.0).tolist() == [0, 1, 2]
    assert amg.batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).shape == (0,)


def test_mask_data_filter_and_cat():
    data = amg.MaskData(a=np.arange(4), b=["w", "x", "y", "z"])
    data.filter(np.array([True, False, True, True]))
    data.filter(np.array([2, 0]))
    assert data["a"].tolist() == [3, 0] and data["b"] == ["z", "w"] and len(data) == 2
    data.cat(amg.MaskData(a=np.array([7]), b=["q"]))
    assert data["a"].tolist() == [3, 0, 7] and data["b"] == ["z", "w", "q"]
    with pytest.raises(TypeError, match="'c'"):
        data["c"] = (1, 2)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs,message", [
    (dict(points_per_side=None), "exactly one of points_per_side or point_grids"),
    (dict(point_grids=[amg.build_point_grid(4)]), "exactly one of points_per_side or point_grids"),
    (dict(output_mode="png"), r"output_mode must be one of .*'png'"),
    (dict(points_per_side=0), "points_per_side must be an integer >= 1; got 0"),
    (dict(points_per_side=8.5), "points_per_side must be an integer >= 1; got 8.5"),
    (dict(points_per_batch=0), "points_per_batch must be an integer >= 1; got 0"),
    (dict(crop_n_layers=-1), "crop_n_layers must be an integer >= 0; got -1"),
    (dict(crop_n_points_downscale_factor=0), "crop_n_points_downscale_factor must be an integer >= 1"),
    (dict(points_per_side=4, crop_n_layers=2, crop_n_points_downscale_factor=4), "no point in the last crop"),
    (dict(points_per_side=None, point_grids=[amg.build_point_grid(4)], crop_n_layers=1),
     "one grid per crop layer"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 3))]), r"\(N, 2\) arrays.*\(4, 3\)"),
    (dict(crop_overlap_ratio=1.5), "crop_overlap_ratio must be in"),
    (dict(crop_overlap_ratio=None), "crop_overlap_ratio must be a finite number; got None"),
    (dict(pred_iou_thresh=float("nan")), "pred_iou_thresh must be a finite number; got nan"),
    (dict(box_nms_thresh="0.7"), "box_nms_thresh must be a finite number"),
    (dict(min_mask_region_area=-5), "min_mask_region_area must be >= 0; got -5"),
])
def test_bad_arguments_are_named(tiny, kwargs, message):
    config, _, params = tiny
    with pytest.raises(ValueError, match=message):
        SamAutomaticMaskGenerator(Sam(config), params, **kwargs)


def test_bad_images_are_named(tiny):
    config, _, params = tiny
    generator = SamAutomaticMaskGenerator(Sam(config), params, points_per_side=2)
    for bad, what in [(np.zeros((10, 10), np.uint8), r"\(10, 10\)"),
                      (np.zeros((10, 10, 3), np.float32), "float32"),
                      (np.zeros((0, 10, 3), np.uint8), r"\(0, 10, 3\)")]:
        with pytest.raises(ValueError, match=what):
            generator.generate(bad)
    with pytest.raises(ValueError, match="'holes' or 'islands'"):
        amg.remove_small_regions(np.zeros((4, 4), bool), 3, "gaps")
    # Crops past the image (zero width) are the crop layers' fault, not a bad image.
    deep = SamAutomaticMaskGenerator(Sam(config), params, points_per_side=4, crop_n_layers=5)
    with pytest.raises(ValueError, match=r"crop_n_layers=5 is too many for a 120x160 image: layer 4 has crops "
                                         r"outside it \(XYXY \[0, 120, 15, 120\]\); use crop_n_layers <= 3"):
        deep.generate(np.zeros((120, 160, 3), np.uint8))
