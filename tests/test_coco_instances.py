"""COCO-format builder and reader on a tiny fake COCO / LVIS data set, good and bad."""

import io
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools.coco import COCO

from sam_jax.data import rle
from sam_jax.data.bad_records import BadRecordError, BadRecordPolicy
from sam_jax.data.builders.coco_instances import CocoInstances
from sam_jax.data.coco_reader import CocoReader
from sam_jax.data.masks import farthest_from_boundary

JSON = "instances_val2017.json"
# id -> (file name, (h, w), PIL mode); image 4 has no annotations.
IMAGES = {
    3: ("000000000003.jpg", (16, 20), "L"),
    1: ("000000000001.png", (20, 24), "RGB"),
    4: ("000000000004.png", (12, 14), "RGB"),
    2: ("000000000002.jpg", (18, 22), "RGB"),
}


def ellipse(hw, cy, cx, ry, rx):
    y, x = np.mgrid[: hw[0], : hw[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def uncompressed(mask):
    """(h, w) bool -> COCO uncompressed RLE (column-major runs, background first)."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def compressed(mask):
    return {"size": list(mask.shape), "counts": rle.encode(mask).decode("ascii")}


def image_bytes(image_id, hw=None, mode=None):
    name, default_hw, default_mode = IMAGES.get(image_id, (f"{image_id}.png", None, "RGB"))
    h, w = hw or default_hw
    rng = np.random.default_rng(image_id)
    pixels = rng.integers(0, 256, (h, w) if (mode or default_mode) == "L" else (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buffer.getvalue()


def coco_json():
    crowd = ellipse((20, 24), 14, 6, 5, 5) | ellipse((20, 24), 3, 20, 2, 3)
    rle_mask = ellipse((18, 22), 9, 11, 6, 8) & ~ellipse((18, 22), 9, 11, 2, 3)  # a ring
    border = np.zeros((16, 20), bool)
    border[10:, 15:] = True  # touches the bottom-right image border
    annotations = [  # out of image order: masks keep JSON order within an image
        {"id": 301, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 20.0,
         "segmentation": [[2, 2, 10, 3, 6, 12]]},
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 40.5,
         "segmentation": [[1.5, 1.5, 12.3, 2.0, 8.0, 9.7, 2.2, 7.1]]},
        {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 30.0,  # two parts
         "segmentation": [[14, 10, 22, 10, 22, 18, 14, 18], [2, 12, 7, 12, 5, 18.5]]},
        {"id": 103, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
         "segmentation": uncompressed(crowd)},
        {"id": 201, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": float(rle_mask.sum()),
         "segmentation": compressed(rle_mask)},
        {"id": 202, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": 70.0,  # past the border: clipped
         "segmentation": [[-0.5, 10, 8, 10, 8, 18.5, -0.5, 18.5]]},
        {"id": 302, "image_id": 3, "category_id": 4, "iscrowd": 0, "area": 30.0,
         "segmentation": compressed(border)},
    ]
    images = [{"id": i, "file_name": name, "height": hw[0], "width": hw[1]} for i, (name, hw, _) in IMAGES.items()]
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, 5)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_split(root, split="val2017", data=None):
    """COCO 2017 layout under root; returns (json path, image folder)."""
    data = coco_json() if data is None else data
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for image in data["images"]:
        if image["id"] in IMAGES:
            (root / split / image["file_name"]).write_bytes(image_bytes(image["id"]))
    json_path = root / "annotations" / f"instances_{split}.json"
    json_path.write_text(json.dumps(data))
    return json_path, root / split


def read(json_path, image_dir, mode):
    policy = BadRecordPolicy(mode)
    reader = CocoReader(json_path, image_dir, policy)
    return dict(reader), policy, reader


def prepare(tmp_path, **kwargs):
    manual_dir = kwargs.pop("manual_dir", None)
    builder = CocoInstances(data_dir=str(tmp_path / "tfds"), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def records_of(builder, split):
    source = builder.as_data_source(split)
    return {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}


def assert_matches_pycocotools(records, json_path, image_dir, paths=None):
    """Each record equals the JSON as pycocotools reads it; every annotated image is there."""
    coco = COCO(str(json_path))
    assert sorted(records) == sorted(i for i in coco.imgs if coco.getAnnIds(imgIds=[i]))
    for image_id, record in records.items():
        info = coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        file_name = (paths or {}).get(image_id, info.get("file_name"))
        assert _text(record["file_name"]) == file_name
        with Image.open(image_dir / file_name) as image:
            assert np.array_equal(_pixels(record["image"]), np.asarray(image.convert("RGB")))
        masks = record["masks"]
        assert [int(i) for i in masks["id"]] == [a["id"] for a in anns]
        for k, ann in enumerate(anns):
            expected = coco.annToMask(ann).astype(bool)
            assert np.array_equal(rle.decode(masks["counts"][k], (h, w)), expected), ann["id"]
            ys, xs = np.nonzero(expected)
            bbox = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            np.testing.assert_array_equal(masks["bbox"][k], np.float32(bbox))
            assert masks["area"][k] == expected.sum()
            np.testing.assert_array_equal(masks["point"][k], farthest_from_boundary(expected))
            assert masks["category_id"][k] == ann["category_id"]
            assert masks["iscrowd"][k] == ann.get("iscrowd", 0)
            if "area" in ann:
                assert masks["coco_area"][k] == np.float32(ann["area"])
            else:
                assert math.isnan(masks["coco_area"][k])
        for key, dtype in [("bbox", np.float32), ("area", np.int64), ("point", np.float32), ("id", np.int64),
                           ("category_id", np.int64), ("iscrowd", np.int64), ("coco_area", np.float32)]:
            assert masks[key].dtype == dtype and len(masks[key]) == len(anns), key


def _pixels(image):
    """The reader's stored bytes or the data source's decoded array -> (H, W, 3) uint8."""
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as decoded:
            image = np.asarray(decoded)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return image


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def test_builder_name_is_not_taken():
    assert CocoInstances.name == "coco_instances"
    assert tfds.builder_cls("coco_instances") is CocoInstances  # would have failed to register on a clash


def test_reader_matches_pycocotools(tmp_path):
    json_path, image_dir = write_split(tmp_path)
    records, policy, reader = read(json_path, image_dir, "error")
    assert list(records) == [1, 2, 3]  # image-id order; image 4 has no annotations
    assert reader.images_without_annotations == 1 and policy.total == 0
    assert_matches_pycocotools(records, json_path, image_dir)
    assert records[1]["masks"]["iscrowd"].tolist() == [0, 0, 1]  # the crowd region is kept, flagged
    with Image.open(io.BytesIO(records[3]["image"])) as image:  # grayscale JPEG stored as RGB
        assert image.mode == "RGB"


def test_manual_dir_convention(tmp_path):
    root = tmp_path / "coco"
    val_json, val_dir = write_split(root, "val2017")
    train = coco_json()
    train["images"] = [i for i in train["images"] if i["id"] == 2]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] == 2]
    train_json, train_dir = write_split(root, "train2017", train)
    (root / "annotations" / "instances_test2017.json").write_text(json.dumps(coco_json()))  # no test2017/: skipped

    builder = prepare(tmp_path, manual_dir=str(root))
    assert set(builder.info.splits) == {"train2017", "val2017"}
    assert_matches_pycocotools(records_of(builder, "val2017"), val_json, val_dir)
    assert_matches_pycocotools(records_of(builder, "train2017"), train_json, train_dir)
    metadata = builder.info.metadata
    assert metadata["images_without_annotations"] == {"val2017": 1, "train2017": 0}
    assert metadata["bad_records"]["val2017"]["skipped"] == {}
    assert metadata["sources"] == {"val2017": JSON, "train2017": "instances_train2017.json"}


def test_explicit_splits_lvis_style(tmp_path):
    """LVIS: images carry only coco_url, annotations have no iscrowd; found by basename or <folder>/basename."""
    root = tmp_path / "coco"
    data = coco_json()
    folders = {1: "train2017", 2: "val2017", 3: "val2017"}
    for image in data["images"]:
        folder = folders.get(image["id"], "val2017")
        image["coco_url"] = f"http://images.cocodataset.org/{folder}/{image.pop('file_name')}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / image["coco_url"].rsplit("/", 1)[1]).write_bytes(image_bytes(image["id"]))
    for ann in data["annotations"]:
        del ann["iscrowd"]
    del data["annotations"][0]["area"]  # absent: coco_area NaN
    lvis_val = tmp_path / "lvis_v1_val.json"
    lvis_val.write_text(json.dumps(data))
    data["images"] = [i for i in data["images"] if folders.get(i["id"]) == "val2017"]
    data["annotations"] = [a for a in data["annotations"] if folders[a["image_id"]] == "val2017"]
    lvis_train = tmp_path / "lvis_v1_train.json"
    lvis_train.write_text(json.dumps(data))

    builder = prepare(tmp_path, splits={"validation": (lvis_val, root), "train": (lvis_train, root / "val2017")})
    paths = {i: f"{folders[i]}/{IMAGES[i][0]}" for i in folders}
    assert_matches_pycocotools(records_of(builder, "validation"), lvis_val, root, paths)
    train = records_of(builder, "train")
    flat_paths = {i: IMAGES[i][0] for i in folders}
    assert_matches_pycocotools(train, lvis_train, root / "val2017", flat_paths)
    assert all(not r["masks"]["iscrowd"].any() for r in train.values())


def test_prepared_data_from_other_json_is_refused(tmp_path):
    json_path, image_dir = write_split(tmp_path / "coco")
    prepare(tmp_path, splits={"val": (json_path, image_dir)})
    CocoInstances(data_dir=str(tmp_path / "tfds"), splits={"val": (json_path, image_dir)})  # same sources: fine
    with pytest.raises(ValueError, match="already holds coco_instances prepared from"):
        CocoInstances(data_dir=str(tmp_path / "tfds"), splits={"val": (tmp_path / "lvis_v1_val.json", image_dir)})


def test_unknown_mode_and_missing_manual_dir(tmp_path):
    with pytest.raises(ValueError, match="on_bad_record"):
        CocoInstances(data_dir=str(tmp_path / "tfds"), on_bad_record="ignore")
    (tmp_path / "empty" / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="instances_<split>.json"):
        prepare(tmp_path, manual_dir=str(tmp_path / "empty"))


# Bad data. Each case mutates the good data set (JSON dict, root folder) and
# names: the reasons counted in skip mode, the image whose record goes (None:
# every good record intact), and what the error message must name.
def _add_ann(data, ann_id, image_id, segmentation, **fields):
    data["annotations"].append(
        {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 1.0,
         "segmentation": segmentation, **fields})


def _image(data, image_id):
    return next(i for i in data["images"] if i["id"] == image_id)


def _zero_rle(data, root):
    _add_ann(data, 900, 1, compressed(np.zeros((20, 24), bool)))


def _no_masks(data, root):
    data["images"].append({"id": 7, "file_name": "7.png", "height": 10, "width": 10})
    (root / "val2017" / "7.png").write_bytes(image_bytes(7, (10, 10)))
    _add_ann(data, 900, 7, [[1, 1, 5, 5]])
    _add_ann(data, 901, 7, {"size": [10, 10], "counts": "PP"})


def _duplicate_id(data, root):
    data["images"].append(dict(_image(data, 2), file_name="other.jpg"))


def _corrupt_rle(data, root):
    counts = rle.encode(ellipse((20, 24), 8, 8, 4, 4)).decode()
    _add_ann(data, 900, 1, {"size": [20, 24], "counts": counts[:-2]})


BAD_CASES = {
    "missing_image": (lambda d, r: (r / "val2017" / IMAGES[2][0]).unlink(),
                      {"missing_image": 1}, 2, ["image 2", IMAGES[2][0]]),
    "truncated_image": (lambda d, r: (r / "val2017" / IMAGES[2][0]).write_bytes(image_bytes(2)[:300]),
                        {"undecodable_image": 1}, 2, ["image 2", IMAGES[2][0]]),
    "undecodable_image": (lambda d, r: (r / "val2017" / IMAGES[1][0]).write_bytes(b"not an image"),
                          {"undecodable_image": 1}, 1, ["image 1", IMAGES[1][0]]),
    "size_mismatch": (lambda d, r: _image(d, 2).update(width=23),
                      {"size_mismatch": 1}, 2, ["image 2", IMAGES[2][0]]),
    "unknown_image": (lambda d, r: _add_ann(d, 900, 999, [[1, 1, 5, 1, 3, 4]]),
                      {"unknown_image": 1}, None, ["annotation 900", "image 999"]),
    "polygon_too_few_points": (lambda d, r: _add_ann(d, 900, 1, [[1, 1, 5, 5]]),
                               {"malformed_polygon": 1}, None, ["annotation 900", "image 1"]),
    "polygon_odd_coordinates": (lambda d, r: _add_ann(d, 900, 1, [[1, 1, 5, 1, 3, 4], [1, 1, 5, 1, 3]]),
                                {"malformed_polygon": 1}, None, ["annotation 900", "image 1"]),
    "polygon_non_numeric": (lambda d, r: _add_ann(d, 900, 1, [[1, 1, "5", 1, 3, 4]]),
                            {"malformed_polygon": 1}, None, ["annotation 900", "image 1"]),
    "polygon_far_outside": (lambda d, r: _add_ann(d, 900, 1, [[1, 1, 5e9, 1, 3, 4]]),
                            {"malformed_polygon": 1}, None, ["annotation 900", "image 1"]),
    "undecodable_compressed_rle": (_corrupt_rle, {"undecodable_rle": 1}, None, ["annotation 900", "image 1"]),
    "undecodable_uncompressed_rle": (lambda d, r: _add_ann(d, 900, 2, {"size": [18, 22], "counts": [5, 3, 100]}),
                                     {"undecodable_rle": 1}, None, ["annotation 900", "image 2"]),
    "non_ascii_rle": (lambda d, r: _add_ann(d, 900, 2, {"size": [18, 22], "counts": "P\u00e9"}),
                      {"undecodable_rle": 1}, None, ["annotation 900", "image 2"]),
    "rle_size_mismatch": (lambda d, r: _add_ann(d, 900, 2, compressed(np.ones((19, 22), bool))),
                          {"rle_size_mismatch": 1}, None, ["annotation 900", "image 2"]),
    "zero_area_rle": (_zero_rle, {"empty_mask": 1}, None, ["annotation 900", "image 1"]),
    "zero_area_polygon": (lambda d, r: _add_ann(d, 900, 3, [[4, 4, 4, 4, 4, 4]]),
                          {"empty_mask": 1}, None, ["annotation 900", "image 3"]),
    "bad_segmentation": (lambda d, r: _add_ann(d, 900, 3, {"counts": [1]}),
                         {"malformed_segmentation": 1}, None, ["annotation 900", "image 3"]),
    "bad_iscrowd": (lambda d, r: _add_ann(d, 900, 3, [[1, 1, 5, 1, 3, 4]], iscrowd=2),
                    {"malformed_annotation": 1}, None, ["annotation 900", "image 3"]),
    "duplicate_image_id": (_duplicate_id, {"duplicate_image_id": 2}, 2, ["image 2"]),
    "no_masks": (_no_masks, {"malformed_polygon": 1, "undecodable_rle": 1, "no_masks": 1}, None,
                 ["annotation 900", "image 7"]),
}


@pytest.fixture(scope="module")
def good_records(tmp_path_factory):
    json_path, image_dir = write_split(tmp_path_factory.mktemp("good"))
    return read(json_path, image_dir, "error")[0]


def _assert_same_record(actual, expected):
    """A record read back through TFDS equals the reader's record of the good data set."""
    assert np.array_equal(_pixels(actual["image"]), _pixels(expected["image"]))
    assert _text(actual["file_name"]) == expected["file_name"]
    assert [_text(c) for c in actual["masks"]["counts"]] == expected["masks"]["counts"]
    for key, value in expected["masks"].items():
        if key != "counts":
            np.testing.assert_array_equal(actual["masks"][key], value)


def _bad_manual_dir(tmp_path, mutate):
    root = tmp_path / "coco"
    data = coco_json()
    json_path, _ = write_split(root, data=data)
    mutate(data, root)
    json_path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_error_mode(tmp_path, case):
    mutate, skipped, _, names = BAD_CASES[case]
    root = _bad_manual_dir(tmp_path, mutate)
    with pytest.raises(BadRecordError) as error:
        prepare(tmp_path, manual_dir=str(root))
    assert error.value.reason in skipped
    for name in [JSON] + names:
        assert name in str(error.value), (name, str(error.value))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_skip_mode(tmp_path, case, good_records):
    mutate, skipped, dropped_image, names = BAD_CASES[case]
    root = _bad_manual_dir(tmp_path, mutate)
    builder = prepare(tmp_path, manual_dir=str(root), on_bad_record="skip")
    report = builder.info.metadata["bad_records"]["val2017"]
    assert report["skipped"] == skipped
    assert all(name in report["examples"][next(iter(skipped))][0] for name in [JSON] + names)
    records = records_of(builder, "val2017")
    assert sorted(records) == sorted(i for i in good_records if i != dropped_image)
    for image_id, record in records.items():
        _assert_same_record(record, good_records[image_id])


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda path: path.write_text('{"images": [], "annotations": [}'), "cannot be parsed as JSON"),
        (lambda path: path.write_text(json.dumps({"images": []})), "has no 'annotations' list"),
        (lambda path: path.write_text(json.dumps({"annotations": [], "images": {}})), "non-list 'images' list"),
        (lambda path: path.write_bytes(b"\xff\xfe\x00garbage"), "cannot be parsed as JSON"),
    ],
)
def test_corrupt_json_raises_in_both_modes(tmp_path, corrupt, message, mode):
    json_path, image_dir = write_split(tmp_path / "coco")
    corrupt(json_path)
    with pytest.raises(BadRecordError, match="no record can be salvaged") as error:
        read(json_path, image_dir, mode)
    assert error.value.reason == "corrupt_json" and message in str(error.value) and str(json_path) in str(error.value)


def test_builder_bad_records(tmp_path, good_records):
    """Through TFDS: skip mode stores the per-split report; error mode and corrupt JSON raise."""
    root = tmp_path / "coco"
    data = coco_json()
    json_path, image_dir = write_split(root, data=data)
    BAD_CASES["missing_image"][0](data, root)
    _no_masks(data, root)
    _add_ann(data, 920, 999, [[1, 1, 5, 1, 3, 4]])  # unknown image
    _add_ann(data, 910, 1, [[1, 1, 5, 5, 3]])  # odd coordinates
    json_path.write_text(json.dumps(data))

    with pytest.raises(BadRecordError, match=f"{JSON} annotation 920 \\(image 999\\)"):
        prepare(tmp_path / "error", manual_dir=str(root))

    builder = prepare(tmp_path / "skip", manual_dir=str(root), on_bad_record="skip")
    expected = {"missing_image": 1, "unknown_image": 1, "malformed_polygon": 2, "undecodable_rle": 1, "no_masks": 1}
    reloaded = CocoInstances(data_dir=str(tmp_path / "skip" / "tfds"))  # the report is saved with the data
    for info in (builder.info, reloaded.info):
        report = info.metadata["bad_records"]["val2017"]
        assert report["skipped"] == expected
        assert any(f"{JSON} image 2" in m and IMAGES[2][0] in m for m in report["examples"]["missing_image"])
        assert info.metadata["images_without_annotations"] == {"val2017": 1}
    records = records_of(reloaded, "val2017")
    assert sorted(records) == [1, 3]
    for image_id, record in records.items():
        _assert_same_record(record, good_records[image_id])

    json_path.write_text("{")
    with pytest.raises(BadRecordError, match="no record can be salvaged"):
        prepare(tmp_path / "corrupt", manual_dir=str(root), on_bad_record="skip")


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_file_name_that_is_not_utf8_on_disk_is_prepared(tmp_path, mode):
    """Python names such a file with surrogate escapes (as json.dumps writes a listing of it); the
    image is read, and the record keeps the undecodable byte as a backslash escape."""
    data = coco_json()
    data["images"][0]["file_name"] = os.fsdecode(b"caf\xe9.png")  # "caf\udce9.png"
    json_path, image_dir = write_split(tmp_path / "coco", data=data)
    assert os.path.exists(os.fsencode(image_dir) + b"/caf\xe9.png")  # the bytes on disk are not UTF-8
    builder = prepare(tmp_path, splits={"val": (json_path, image_dir)}, on_bad_record=mode)
    record = records_of(builder, "val")[data["images"][0]["id"]]
    assert _text(record["file_name"]) == "caf\\xe9.png"
    with Image.open(os.fsencode(image_dir) + b"/caf\xe9.png") as image:
        assert np.array_equal(_pixels(record["image"]), np.asarray(image.convert("RGB")))
