"""Preparing `sa1b` and `coco_instances` on Apache Beam (DirectRunner, 2 workers) gives the
single-process data set record for record: the same ArrayRecord files, the same examples read
back by key, the same bad-record metadata; in "error" mode the same BadRecordError."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from tensorflow_datasets.proto import tf_example_pb2

from experiments import prepare_data
from sam_jax.data import bad_records, beam_prepare, rle
from sam_jax.data.bad_records import BadRecordError, BadRecordPolicy
from sam_jax.data.builders.coco_instances import CocoInstances
from sam_jax.data.builders.sa1b import Sa1b
from sam_jax.data.coco_reader import CocoReader
from test_coco_instances import BAD_CASES, write_split
from test_sa1b import fakes, members, tar_bytes, write_folder

HAS_BEAM = importlib.util.find_spec("apache_beam") is not None
needs_beam = pytest.mark.skipif(not HAS_BEAM, reason="apache-beam is not installed (pip install 'sam_jax[beam]')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def direct_runner():
    """The DirectRunner with two worker processes."""
    return beam_prepare.pipeline_options("DirectRunner", 2)


def prepare(builder_cls, data_dir, manual_dir, beam_options=None, **kwargs):
    builder = builder_cls(data_dir=str(data_dir), **kwargs)
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), beam_options=beam_options)
    builder.download_and_prepare(download_config=config)
    return builder


def records_in_files(builder, split):
    """{file name: [tf.train.Example, ...]} of the split's ArrayRecord files, in file order.

    Parsed, since the bytes of one example differ from process to process (protobuf writes the
    feature map in an order of its own), with or without Beam.
    """
    paths = sorted(glob.glob(os.path.join(builder.data_path, f"*-{split}.array_record-*")))
    assert paths
    parse = tf_example_pb2.Example.FromString
    return {os.path.basename(p): [parse(r) for r in ArrayRecordReader(p).read_all()] for p in paths}


def by_key(builder, split, key):
    source = builder.as_data_source(split)
    examples = {key(source[i]): source[i] for i in range(len(source))}
    assert len(examples) == len(source)
    return examples


def assert_equal_trees(a, b, where=""):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            assert_equal_trees(a[k], b[k], f"{where}/{k}")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def assert_same_data_set(single, beam, key):
    """Same files holding the same records in the same order (so the same keys: tfds orders
    records by the hash of their key), the same examples read back, the same metadata."""
    assert dict(beam.info.metadata) == dict(single.info.metadata)
    assert {s: i.num_examples for s, i in beam.info.splits.items()} == {
        s: i.num_examples for s, i in single.info.splits.items()}
    for split in single.info.splits:
        assert records_in_files(beam, split) == records_in_files(single, split)
        expected, got = by_key(single, split, key), by_key(beam, split, key)
        assert list(got) == list(expected)
        for k in expected:
            assert_equal_trees(got[k], expected[k], str(k))
    reloaded = type(beam)(data_dir=os.path.dirname(os.path.dirname(beam.data_path)))  # the metadata as saved
    assert dict(reloaded.info.metadata) == dict(single.info.metadata)
    assert not glob.glob(os.path.join(beam.data_path, "*beam_metadata*"))


def sa1b_key(example):
    return example["file_name"].decode()


def coco_key(example):
    return int(example["image_id"])


def sa1b_manual_dir(root, bad: bool = False):
    """Sources in reading order: extracted/ (sa_7-9), sa_000000.tar (sa_1-3), sa_000001.tar (sa_4, 5).

    With `bad`: empty masks in the first two sources (6, more than a report keeps examples of),
    a corrupt JSON in the folder, and an intact copy of sa_3 in the second tar, whose first copy
    lost a mask.
    """
    folder, tar0, tar1 = fakes(seed=1, ids=(7, 8, 9)), fakes(), fakes(seed=2, ids=(4, 5))
    if bad:
        tar1.append(fakes()[2])  # sa_3 as it was
        for fake, masks in ((tar0[1], (0, 2)), (tar0[2], (1,)), (folder[2], (0, 1, 2))):
            h, w = fake.record["image"]["height"], fake.record["image"]["width"]
            for k in masks:
                fake.record["annotations"][k]["segmentation"]["counts"] = rle.encode(np.zeros((h, w), bool)).decode()
    write_folder(root / "extracted", folder)
    (root / "sa_000000.tar").write_bytes(tar_bytes(members(tar0)))
    (root / "sa_000001.tar").write_bytes(tar_bytes(members(tar1)))
    if bad:
        (root / "extracted" / "sa_8.json").write_bytes(b'{"image": ')
    return root


def coco_manual_dir(root, bad: bool = False):
    """COCO 2017 layout, val2017 and train2017; with `bad`, val2017 has bad records in the JSON and
    in three images (three parts at one image per part)."""
    write_split(root, "train2017")
    json_path, _ = write_split(root, "val2017")
    if bad:
        data = json.loads(json_path.read_text())
        for case in ("unknown_image", "zero_area_rle", "missing_image", "no_masks"):
            BAD_CASES[case][0](data, root)
        json_path.write_text(json.dumps(data))
    return root


@needs_beam
def test_sa1b_on_beam_equals_single_process(tmp_path):
    manual = sa1b_manual_dir(tmp_path / "manual")
    single = prepare(Sa1b, tmp_path / "single", manual)
    beam = prepare(Sa1b, tmp_path / "beam", manual, direct_runner())
    assert beam.info.splits["train"].num_examples == 8
    assert_same_data_set(single, beam, sa1b_key)


@needs_beam
def test_coco_on_beam_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setattr(CocoInstances, "IMAGES_PER_BEAM_PART", 1)  # three parts per split
    manual = coco_manual_dir(tmp_path / "coco")
    single = prepare(CocoInstances, tmp_path / "single", manual)
    beam = prepare(CocoInstances, tmp_path / "beam", manual, direct_runner())
    assert sorted(beam.info.splits) == ["train2017", "val2017"]
    assert_same_data_set(single, beam, coco_key)


@needs_beam
def test_skipped_bad_records_are_counted_across_workers(tmp_path, monkeypatch):
    manual = sa1b_manual_dir(tmp_path / "sa1b", bad=True)
    single = prepare(Sa1b, tmp_path / "single", manual, on_bad_record="skip")
    beam = prepare(Sa1b, tmp_path / "beam", manual, direct_runner(), on_bad_record="skip")
    report = beam.info.metadata["bad_records"]["train"]
    assert report["skipped"] == {"empty_mask": 6, "corrupt_json": 1, "no_masks": 1, "duplicate_image": 1}
    assert report["examples"]["duplicate_image"] == ["sa_000001.tar:sa_3.jpg: sa_3.jpg was already read from "
                                                     "sa_000000.tar:sa_3.jpg"]
    assert len(report["examples"]["empty_mask"]) == bad_records.EXAMPLES_KEPT
    assert_same_data_set(single, beam, sa1b_key)

    monkeypatch.setattr(CocoInstances, "IMAGES_PER_BEAM_PART", 1)
    manual = coco_manual_dir(tmp_path / "coco", bad=True)
    single = prepare(CocoInstances, tmp_path / "coco_single", manual, on_bad_record="skip")
    beam = prepare(CocoInstances, tmp_path / "coco_beam", manual, direct_runner(), on_bad_record="skip")
    assert beam.info.metadata["bad_records"]["val2017"]["skipped"] == {
        "unknown_image": 1, "empty_mask": 1, "missing_image": 1, "malformed_polygon": 1, "undecodable_rle": 1,
        "no_masks": 1}
    assert beam.info.metadata["bad_records"]["train2017"]["skipped"] == {}
    assert_same_data_set(single, beam, coco_key)


@needs_beam
@pytest.mark.parametrize("case", ["bad_mask_in_second_tar", "image_in_two_tars", "coco_missing_image"])
def test_error_mode_fails_naming_the_file(tmp_path, case):
    if case.startswith("coco"):
        builder, manual = CocoInstances, write_split(tmp_path / "coco")[1].parent
        (manual / "val2017" / "000000000002.jpg").unlink()
    else:
        builder, manual = Sa1b, sa1b_manual_dir(tmp_path / "sa1b")
        tar = fakes(seed=2, ids=(4, 5)) + ([fakes()[2]] if case == "image_in_two_tars" else [])
        if case == "bad_mask_in_second_tar":
            tar[1].record["annotations"][2]["segmentation"]["counts"] = rle.encode(np.zeros((32, 24), bool)).decode()
        (manual / "sa_000001.tar").write_bytes(tar_bytes(members(tar)))
    with pytest.raises(BadRecordError) as single:
        prepare(builder, tmp_path / "single", manual)
    with pytest.raises(BadRecordError) as beam:
        prepare(builder, tmp_path / "beam", manual, direct_runner())
    assert (beam.value.reason, beam.value.where, str(beam.value)) == (
        single.value.reason, single.value.where, str(single.value))
    assert {"bad_mask_in_second_tar": "sa_000001.tar:sa_5.json annotation 2 (id 5002): mask has zero area",
            "image_in_two_tars": "sa_000001.tar:sa_3.jpg: sa_3.jpg was already read from sa_000000.tar:sa_3.jpg",
            "coco_missing_image": "000000000002.jpg"}[case] in str(beam.value)


@needs_beam
def test_prepare_data_beam_flags(tmp_path, capsys):
    manual = sa1b_manual_dir(tmp_path / "manual", bad=True)
    args = ["sa1b", "--manual-dir", str(manual), "--data-dir", str(tmp_path / "data"), "--on-bad-record", "skip",
            "--beam", "--beam-option", "direct_running_mode=in_memory"]
    assert prepare_data.main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "dataset"') :])
    assert summary["splits"] == {"train": 6}
    assert summary["bad_records"]["train"]["skipped"]["empty_mask"] == 6


@needs_beam
def test_multi_threading_is_refused(tmp_path):
    options = beam_prepare.pipeline_options("DirectRunner", 2, ["direct_running_mode=multi_threading"])
    with pytest.raises(ValueError, match="multi_threading loses records"):
        prepare(Sa1b, tmp_path / "data", sa1b_manual_dir(tmp_path / "manual"), options)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beam-workers", "2"], "--beam-runner, --beam-workers and --beam-option need --beam"),
        (["--beam", "--beam-workers", "0"], "--beam-workers must be at least 1"),
        (["--beam", "--beam-option=--runner=X"], "expected KEY=VALUE or KEY, without leading dashes"),
        (["--beam", "--beam-option", "no_such_option=1"], "unknown Beam pipeline option(s) ['no_such_option']"),
        (["--beam", "--beam-runner", "FlinkRunner", "--beam-workers", "2"], "workers is for the DirectRunner"),
    ],
)
def test_prepare_data_beam_flag_errors(tmp_path, capsys, flags, message):
    assert prepare_data.main(["sa1b", "--manual-dir", str(tmp_path), "--data-dir", str(tmp_path)] + flags) == 2
    err = capsys.readouterr().err
    if HAS_BEAM or "need --beam" in message or "at least 1" in message:
        assert message in err and err.count("\n") == 1
    else:
        assert "--beam needs Apache Beam" in err and "pip install 'sam_jax[beam]'" in err


def test_apache_beam_is_imported_only_for_beam(tmp_path):
    manual = sa1b_manual_dir(tmp_path / "manual")
    script = (
        "import sys\nfrom experiments import prepare_data\n"
        f"assert prepare_data.main(['sa1b', '--manual-dir', {str(manual)!r}, '--data-dir', {str(tmp_path)!r}]) == 0\n"
        "print('apache_beam' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


def test_coco_parts_read_as_the_whole(tmp_path):
    json_path, image_dir = write_split(tmp_path / "coco")
    data = json.loads(json_path.read_text())
    BAD_CASES["no_masks"][0](data, tmp_path / "coco")
    json_path.write_text(json.dumps(data))
    whole = CocoReader(json_path, image_dir, BadRecordPolicy("skip"))
    parts = whole.parts(2)  # images 1, 2 | 3, 7 (7: no usable mask)
    records = [kv for part in parts for kv in part]
    expected = list(CocoReader(json_path, image_dir, BadRecordPolicy("skip")))
    assert [k for k, _ in records] == [k for k, _ in expected]
    for (_, got), (_, want) in zip(records, expected):
        assert_equal_trees(got, want)
    assert [p.policy.report()["skipped"] for p in parts] == [{}, {"malformed_polygon": 1, "undecodable_rle": 1,
                                                                  "no_masks": 1}]
    assert parts[0].policy is not whole.policy and parts[0].policy.mode == "skip"
    with pytest.raises(ValueError, match="images_per_part must be at least 1"):
        whole.parts(0)
