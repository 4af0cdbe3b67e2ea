"""The data path end to end: prepare_data -> ArrayRecord files -> open_source -> InputPipeline."""

import json

import jax
import numpy as np
import pytest

from experiments import prepare_data
from sam_jax.data import rle
from sam_jax.data.pipeline import InputPipeline, PipelineConfig, open_source
from sam_jax.data.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    assert prepare_data.main(["sam_synthetic/small", "--data-dir", str(path)]) == 0
    return path


def test_prepare_prints_splits_and_report(data_dir, capsys):
    assert prepare_data.main(["sam_synthetic/small", "--data-dir", str(data_dir)]) == 0  # already prepared: reused
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 48, "validation": 16}
    assert summary["bad_records"]["train"]["skipped"] == {}


def test_pipeline_reads_prepared_data_without_tensorflow(data_dir):
    source = open_source("sam_synthetic/small", "train", data_dir=str(data_dir))
    record = source[0]
    h, w = record["image"].shape[:2]
    assert len(record["masks"]["counts"]) == len(record["masks"]["area"]) > 0
    np.testing.assert_array_equal(rle.decode_many(record["masks"]["counts"], (h, w)).sum(axis=(1, 2)), record["masks"]["area"])
    config = PipelineConfig(
        global_batch_size=2, seed=0,
        preprocess=PreprocessConfig(image_size=256, low_res_size=64, max_masks=8, scale_range=(0.1, 2.0), horizontal_flip=True),
    )
    pipeline = InputPipeline(source, config)
    batches = [jax.tree.map(np.asarray, next(pipeline)) for _ in range(3)]
    state = pipeline.get_state()
    following = jax.tree.map(np.asarray, next(pipeline))
    assert all(b["mask_valid"].any(axis=1).all() for b in batches)
    assert batches[0]["masks"].shape == (2, 8, 256, 256)
    # Masks lie inside the image part of the canvas, and boxes are tight on them.
    for b in batches:
        for i in range(2):
            vh, vw = b["image_size"][i]
            assert not b["masks"][i][:, vh:].any() and not b["masks"][i][:, :, vw:].any()
    resumed = InputPipeline(open_source(str(data_dir / "sam_synthetic" / "small" / "1.0.0"), "train"), config)
    resumed.set_state(state)
    again = jax.tree.map(np.asarray, next(resumed))
    for key in following:
        np.testing.assert_array_equal(following[key], again[key], err_msg=key)


@pytest.mark.parametrize(
    "args, message",
    [
        (["imagenet"], "unknown data set 'imagenet'"),
        (["sa1b", "--manual-dir", "/nonexistent/sa1b"], "--manual-dir /nonexistent/sa1b is not a directory"),
        (["coco_instances", "--split", "train=only.json"], "expected NAME=ANNOTATIONS.json:IMAGE_DIR"),
        (["sa1b", "--split", "train=a.json:b"], "--split is for coco_instances only"),
    ],
)
def test_prepare_errors_are_one_line(tmp_path, capsys, args, message):
    assert prepare_data.main(args + ["--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_open_source_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        open_source("sam_synthetic/small", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        open_source("nope", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\], not 'test'"):
        open_source("sam_synthetic/small", "test", data_dir=str(data_dir))
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\], not 'test'"):
        open_source("sam_synthetic/small", "test[:10%]", data_dir=str(data_dir))
    with pytest.raises(ValueError, match=r"split 'train\[:x\]' of data set 'sam_synthetic/small': "):
        open_source("sam_synthetic/small", "train[:x]", data_dir=str(data_dir))


def test_a_slice_holds_out_part_of_a_split(data_dir):
    """A one-split set (sa1b) trains on "train[:75%]" and holds out "train[75%:]"."""
    whole = open_source("sam_synthetic/small", "train", data_dir=str(data_dir))
    head = open_source("sam_synthetic/small", "train[:75%]", data_dir=str(data_dir))
    tail = open_source("sam_synthetic/small", "train[75%:]", data_dir=str(data_dir))
    assert len(head) + len(tail) == len(whole) and len(tail) == len(whole) // 4
    names = [whole[i]["file_name"] for i in range(len(whole))]
    assert [head[i]["file_name"] for i in range(len(head))] + [tail[i]["file_name"] for i in range(len(tail))] == names


def test_bad_record_stops_prepare_with_one_line_or_is_counted(tmp_path, capsys):
    from PIL import Image

    manual = tmp_path / "sa1b"
    manual.mkdir()
    mask = np.zeros((40, 60), bool)
    mask[5:20, 5:30] = True
    for k in (1, 2):
        Image.fromarray(np.full((40, 60, 3), 40 * k, np.uint8)).save(manual / f"sa_{k}.jpg")
        annotation = {
            "id": k, "segmentation": {"size": [40, 60], "counts": rle.encode(mask).decode()}, "bbox": [5, 5, 25, 15],
            "area": 375, "predicted_iou": 0.9, "point_coords": [[10, 10]], "crop_box": [0, 0, 60, 40], "stability_score": 0.9,
        }
        image = {"image_id": k, "width": 60, "height": 40, "file_name": f"sa_{k}.jpg"}
        (manual / f"sa_{k}.json").write_text(json.dumps({"image": image, "annotations": [annotation]}))
    (manual / "sa_2.json").write_text("{not json")
    args = ["sa1b", "--manual-dir", str(manual)]
    assert prepare_data.main(args + ["--data-dir", str(tmp_path / "strict")]) == 2
    assert "sa_2.json: annotation file is not valid JSON" in capsys.readouterr().err
    assert prepare_data.main(args + ["--data-dir", str(tmp_path / "lenient"), "--on-bad-record", "skip"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "dataset"') :])  # after tfds's own progress lines
    assert summary["splits"] == {"train": 1} and summary["bad_records"]["train"]["skipped"] == {"corrupt_json": 1}
