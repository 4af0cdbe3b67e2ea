"""The procedural scene generator and the `sam_synthetic` builder: exact masks, nesting, occlusion, touching, sizes."""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from sam_jax.data import rle, synthetic
from sam_jax.data.builders.sam_synthetic import SamSynthetic, SamSyntheticConfig, example_scene
from data_records import mask_to_box_xyxy
from sam_jax.data.masks import farthest_from_boundary

SEEDS = range(8)


def _scenes(keep_layers=False, size=(256, 256)):
    return [synthetic.generate_scene(seed, *size, keep_layers=keep_layers) for seed in SEEDS]


@pytest.fixture(scope="module")
def layered():
    return _scenes(keep_layers=True, size=(200, 280))


def _canvas(layer, h, w):
    full = np.zeros((h, w), bool)
    full[layer.y0:layer.y0 + layer.shape.shape[0], layer.x0:layer.x0 + layer.shape.shape[1]] = layer.shape
    return full


def _subtree(parent, i):
    """Indices of object i and all its descendants."""
    members = {i}
    for j in range(i + 1, len(parent)):  # parents precede children
        if parent[j] in members:
            members.add(j)
    return sorted(members)


def _adjacent(a, b):
    """True when some pixel of a and some pixel of b share an edge."""
    return bool((a[1:] & b[:-1]).any() or (a[:-1] & b[1:]).any() or (a[:, 1:] & b[:, :-1]).any() or (a[:, :-1] & b[:, 1:]).any())


def _scene_equal(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("image", "masks", "parent", "level", "owner"))


# ---------------------------------------------------------------- generator


def test_same_seed_same_scene_and_shapes():
    a = synthetic.generate_scene(11, 120, 333)
    b = synthetic.generate_scene(np.random.SeedSequence(11), 120, 333)
    assert _scene_equal(a, b)
    c = synthetic.generate_scene(12, 120, 333)
    assert not np.array_equal(a.image, c.image)
    n = len(a.masks)
    assert n > 0
    assert a.image.shape == (120, 333, 3) and a.image.dtype == np.uint8
    assert a.masks.shape == (n, 120, 333) and a.masks.dtype == bool
    assert a.parent.shape == a.level.shape == (n,) and a.parent.dtype == a.level.dtype == np.int64
    assert a.owner.shape == (120, 333) and a.owner.dtype == np.int32


def test_nesting_invariants():
    levels = set()
    for scene in _scenes():
        for i, (p, level) in enumerate(zip(scene.parent, scene.level)):
            levels.add(int(level))
            assert scene.masks[i].sum() >= 16  # min_area
            if p < 0:
                assert level == 0
                continue
            assert p < i and scene.level[p] == level - 1 and level <= 2
            assert not (scene.masks[i] & ~scene.masks[p]).any(), "a part leaks out of its whole"
            assert scene.masks[i].sum() < 0.9 * scene.masks[p].sum(), "a part duplicates its whole"
    assert levels == {0, 1, 2}


def test_masks_are_exactly_the_painted_regions(layered):
    """Each pixel shows the top-most object covering it, and masks are exactly those regions."""
    for scene in layered:
        h, w = scene.owner.shape
        shapes = [_canvas(layer, h, w) for layer in scene.layers]
        owner = np.full((h, w), -1)
        for i, shape in enumerate(shapes):  # masks are in paint order, back to front
            owner[shape] = i
            if scene.parent[i] >= 0:
                assert not (shape & ~shapes[scene.parent[i]]).any(), "a part's shape leaves its whole's"
        np.testing.assert_array_equal(owner, scene.owner)
        for i in range(len(shapes)):
            np.testing.assert_array_equal(scene.masks[i], np.isin(owner, _subtree(scene.parent, i)))
            layer, own = scene.layers[i], owner == i
            window = scene.image[layer.y0:layer.y0 + layer.shape.shape[0], layer.x0:layer.x0 + layer.shape.shape[1]]
            own_window = own[layer.y0:layer.y0 + layer.shape.shape[0], layer.x0:layer.x0 + layer.shape.shape[1]]
            np.testing.assert_array_equal(window[own_window], layer.texture[own_window])
        np.testing.assert_array_equal(scene.image[owner == -1], scene.background[owner == -1])


def test_parts_differ_visibly_from_their_parent(layered):
    pairs = 0
    for scene in layered:
        for i, p in enumerate(scene.parent):
            child, parent = scene.owner == i, scene.owner == p
            if p >= 0 and child.sum() >= 20 and parent.sum() >= 20:
                pairs += 1
                assert np.linalg.norm(scene.image[child].mean(0) - scene.image[parent].mean(0)) > 40
    assert pairs >= 10


def test_occlusion_clips_objects_and_their_parts(layered):
    occluded = {0: 0, 1: 0}
    for scene in layered:
        h, w = scene.owner.shape
        for i, layer in enumerate(scene.layers):
            hidden = _canvas(layer, h, w) & ~np.isin(scene.owner, _subtree(scene.parent, i))
            if hidden.any():
                assert (scene.owner[hidden] > i).all(), "only objects painted later may cover an object"
                assert not (scene.masks[i] & hidden).any()
                if scene.level[i] < 2:
                    occluded[int(scene.level[i])] += 1
    assert occluded[0] >= 5 and occluded[1] >= 3, occluded


def test_touching_objects_share_an_edge_without_overlap(layered):
    touching = 0
    for scene in layered:
        h, w = scene.owner.shape
        wholes = [_canvas(scene.layers[i], h, w) for i in np.flatnonzero(scene.level == 0)]
        for a in range(len(wholes)):
            for b in range(a + 1, len(wholes)):
                if not (wholes[a] & wholes[b]).any() and _adjacent(wholes[a], wholes[b]):
                    touching += 1
    assert touching >= 4


def test_touching_placement_is_exact():
    rng = np.random.default_rng(0)
    placed = 0
    for _ in range(40):
        anchor = synthetic._rasterize(rng, str(rng.choice(synthetic._SHAPES)), rng.uniform(30, 3000), 0.0, 0.0)
        shape = synthetic._rasterize(rng, str(rng.choice(synthetic._SHAPES)), rng.uniform(30, 3000), 0.0, 0.0)
        moved = synthetic._touching(rng, anchor, shape)
        if moved is None:
            continue
        placed += 1
        y0, x0 = min(anchor.y0, moved.y0) - 1, min(anchor.x0, moved.x0) - 1
        size = 2 * (sum(anchor.mask.shape) + sum(moved.mask.shape)) + 2
        a, b = np.zeros((size, size), bool), np.zeros((size, size), bool)
        a[anchor.y0 - y0:anchor.y0 - y0 + anchor.mask.shape[0], anchor.x0 - x0:anchor.x0 - x0 + anchor.mask.shape[1]] = anchor.mask
        b[moved.y0 - y0:moved.y0 - y0 + moved.mask.shape[0], moved.x0 - x0:moved.x0 - x0 + moved.mask.shape[1]] = moved.mask
        assert not (a & b).any() and _adjacent(a, b)
    assert placed >= 30


def test_sizes_range_from_tiny_to_large():
    fractions, areas = [], []
    for scene in _scenes():
        area = scene.masks.sum(axis=(1, 2))
        areas.append(area.min())
        fractions.append(area.max() / scene.owner.size)
    assert min(areas) < 48, areas  # a few dozen pixels
    assert max(fractions) >= 0.5, fractions


def test_generation_is_fast():
    start = time.perf_counter()
    for seed in range(5):
        synthetic.generate_scene(seed, 256, 256)
    assert (time.perf_counter() - start) / 5 < 0.25  # ~20 ms unloaded; generous for a shared machine


# ---------------------------------------------------------------- builder


def _prepare(data_dir):
    builder = SamSynthetic(config="small", data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("first"))


def _by_id(source):
    return {int(ex["image_id"]): ex for ex in (source[i] for i in range(len(source)))}


def test_builder_records_equal_the_generator(small):
    config = small.builder_config
    train = _by_id(small.as_data_source("train"))
    assert sorted(train) == list(range(config.num_train))
    for index, ex in train.items():
        scene = example_scene(config, "train", index)
        h, w = scene.image.shape[:2]
        masks = ex["masks"]
        np.testing.assert_array_equal(ex["image"], scene.image)
        np.testing.assert_array_equal(rle.decode_many(masks["counts"], (h, w)), scene.masks)
        np.testing.assert_array_equal(masks["parent"], scene.parent)
        np.testing.assert_array_equal(masks["level"], scene.level)
        np.testing.assert_array_equal(masks["id"], np.arange(len(scene.masks)))
        np.testing.assert_array_equal(masks["area"], scene.masks.sum(axis=(1, 2)))
        xyxy = mask_to_box_xyxy(scene.masks)
        np.testing.assert_array_equal(masks["bbox"], np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1))
        assert masks["point"].shape == (len(scene.masks), 2)
        for m, point in zip(scene.masks[:5], masks["point"]):
            np.testing.assert_array_equal(point, farthest_from_boundary(m))
        assert ex["file_name"] == f"train_{index:06d}.png".encode()


def test_images_have_varied_sizes_and_aspect_ratios(small):
    config = small.builder_config
    shapes = [ex["image"].shape[:2] for ex in _by_id(small.as_data_source("train")).values()]
    assert all(config.min_side <= s <= config.max_side for shape in shapes for s in shape)
    ratios = [w / h for h, w in shapes]
    assert min(ratios) < 0.75 and max(ratios) > 1.33 and len(set(shapes)) > len(shapes) // 2


def test_validation_split_is_fixed_and_held_out(small, tmp_path):
    again = _prepare(tmp_path)
    first, second = _by_id(small.as_data_source("validation")), _by_id(again.as_data_source("validation"))
    assert sorted(first) == list(range(small.builder_config.num_validation))
    for index in first:
        np.testing.assert_array_equal(first[index]["image"], second[index]["image"])
        assert first[index]["masks"]["counts"] == second[index]["masks"]["counts"]
    train_images = {ex["image"].tobytes() for ex in _by_id(small.as_data_source("train")).values()}
    assert not any(ex["image"].tobytes() in train_images for ex in first.values())
    # Validation example i is not train example i drawn again.
    assert not _scene_equal(example_scene(small.builder_config, "validation", 0), example_scene(small.builder_config, "train", 0))


def test_builder_interface(small):
    assert small.info.metadata["bad_records"] == {s: {"skipped": {}, "examples": {}} for s in ("train", "validation")}
    assert {c.name for c in SamSynthetic.BUILDER_CONFIGS} == {"small", "cpu", "default"}
    assert isinstance(small.builder_config, SamSyntheticConfig)
    with pytest.raises(ValueError, match="on_bad_record"):
        SamSynthetic(config="small", on_bad_record="ignore")
