"""The data engine's fully automatic stage: `sam-jax amg --sa1b` (`sam_jax.data_engine.auto_label`).

* The SA-1B files hold exactly the generator's records (ids added), beside the
  pixels the model saw: the source file linked when its bytes are those pixels,
  a lossless PNG otherwise (EXIF rotation, grayscale); `sa1b_reader` and the
  `sa1b` builder read the folder unchanged (the loop back to training).
* The stage-3 preset is the paper's settings and filters; explicit flags win.
* Two processes under `jax.distributed` (real subprocesses) write the same files,
  byte for byte, as one process; a run with another process count resumes.
* A prepared TFDS split is an input; bad process flags are one error line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from experiments.sample_image import synthetic_image
from sam_jax import SamAutomaticMaskGenerator, load_sam, save_params
from sam_jax.automatic_mask_generator import crop_boxes
from sam_jax.cli import build_parser
from sam_jax.cli.amg import amg_kwargs, mask_filter
from sam_jax.data import sa1b_reader, sa1b_writer
from sam_jax.data.bad_records import BadRecordPolicy
from sam_jax.data_engine.auto_label import STAGE3_SETTINGS, MaskFilter, shard
from sam_jax.image_io import read_image
from test_cli import AMG_FAST, cli, one_error_line

ROOT = Path(__file__).resolve().parents[1]
AMG = [*AMG_FAST, "--sa1b"]


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    config, _, params = tiny
    return save_params(tmp_path_factory.mktemp("ckpt") / "vit_tiny", params, config, source="test")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five images: RGB JPEG and PNG (stored as they are), an EXIF-rotated JPEG, a grayscale
    PNG (stored as PNGs of their RGB pixels), another RGB JPEG."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(synthetic_image(120, 160, seed=1)).save(folder / "a.jpg", quality=90)
    Image.fromarray(synthetic_image(100, 90, seed=2)).save(folder / "b.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(synthetic_image(80, 140, seed=3)).save(folder / "c.jpg", exif=exif)
    Image.fromarray(synthetic_image(96, 96, seed=4)[..., 0]).save(folder / "d.png")
    Image.fromarray(synthetic_image(130, 110, seed=5)).save(folder / "e.jpg")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sa1b_files_hold_the_generators_records(capsys, checkpoint, images, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", images, "--output", out, *AMG)
    assert code == 0 and "5 done" in stdout
    assert sorted(os.listdir(out)) == [f"sa_{s}.{e}" for s, exts in
                                       [("a", "jpg json"), ("b", "json png"), ("c", "json png"),
                                        ("d", "json png"), ("e", "jpg json")] for e in exts.split()]
    generator = SamAutomaticMaskGenerator(*load_sam(checkpoint), output_mode="coco_rle", points_per_side=4,
                                          pred_iou_thresh=0, stability_score_thresh=0)
    examples = dict(sa1b_reader.iter_examples(str(out), BadRecordPolicy("error")))
    for source in sorted(images.iterdir()):
        pixels = read_image(source)[0]
        record = json.loads((out / f"sa_{source.stem}.json").read_text())
        stored = next(p for p in out.iterdir() if p.stem == f"sa_{source.stem}" and p.suffix != ".json")
        assert record["image"] == {"image_id": sa1b_writer.stable_image_id(source.read_bytes()),
                                   "width": pixels.shape[1], "height": pixels.shape[0], "file_name": stored.name}
        expected = json.loads(json.dumps(generator.generate(pixels)))
        assert expected, "the tiny model should give masks at these thresholds"
        assert record["annotations"] == [{"id": i, **r} for i, r in enumerate(expected)]
        # The stored image is the model's pixels: the file itself only when it holds them as they are.
        np.testing.assert_array_equal(np.asarray(Image.open(stored).convert("RGB")), pixels)
        assert (stored.stat().st_ino == source.stat().st_ino) == (source.name in ("a.jpg", "b.png", "e.jpg"))
        example = examples[stored.name]
        assert example["masks"]["counts"][0] == expected[0]["segmentation"]["counts"]
        mask = mask_utils.decode(expected[0]["segmentation"])
        assert mask.shape == pixels.shape[:2] and mask.sum() == example["masks"]["area"][0] == expected[0]["area"]


def test_mask_filter_and_preset():
    records = [{"area": a} for a in (99, 100, 949, 950, 1000)]
    assert [r["area"] for r in MaskFilter(0.95, 100)(records, 20, 50)] == [100, 949]
    assert MaskFilter()(records, 20, 50) == records
    with pytest.raises(ValueError, match="max_area_fraction"):
        MaskFilter(max_area_fraction=0)

    def parse(*extra):
        return build_parser().parse_args(["amg", "--checkpoint", "c", "--input", "i", "--output", "o", *extra])

    args = parse("--preset", "sa1b")
    assert amg_kwargs(args) == STAGE3_SETTINGS and mask_filter(args) == MaskFilter(0.95, 100)
    args = parse("--preset", "sa1b", "--crop-n-layers", "1", "--min-area", "0")
    assert amg_kwargs(args) == {**STAGE3_SETTINGS, "crop_n_layers": 1}
    assert mask_filter(args) == MaskFilter(0.95, 0)
    assert mask_filter(parse()) == MaskFilter() and amg_kwargs(parse()) == {}
    # The paper: a 32x32 grid on the image, 16x16 and 8x8 on 2x2 and 4x4 windows, 21 crops in all.
    boxes, layers = crop_boxes((1500, 2250), STAGE3_SETTINGS["crop_n_layers"])
    assert np.bincount(layers).tolist() == [1, 4, 16] and len(boxes) == 21


def test_shard():
    items = list(range(7))
    shares = [shard(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == items and [len(s) for s in shares] == [3, 2, 2]
    with pytest.raises(ValueError, match="process_index 3"):
        shard(items, 3, 3)


def run_processes(checkpoint, images, out, count: int) -> list[str]:
    port = free_port()
    command = [sys.executable, "-m", "sam_jax.cli", "amg", "--checkpoint", str(checkpoint), "--input",
               str(images), "--output", str(out), *AMG, "--coordinator-address", f"127.0.0.1:{port}",
               "--num-processes", str(count)]
    workers = [subprocess.Popen([*command, "--process-id", str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(count)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * count, logs
    return logs


def test_two_processes_write_what_one_does(capsys, checkpoint, images, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(capsys, "amg", "--checkpoint", checkpoint, "--input", images, "--output", one, *AMG)[0] == 0
    logs = run_processes(checkpoint, images, two, 2)
    assert "process 0 of 2: 3 input(s)" in logs[0] and "process 1 of 2: 2 input(s)" in logs[1]
    assert "3 done" in logs[0] and "2 done" in logs[1]
    assert files(one) == files(two)
    # Resumable with another process count: only the missing images are done again.
    for name in ("sa_b.json", "sa_e.json"):
        (two / name).unlink()
    code, stdout, _ = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", images, "--output", two, *AMG)
    assert code == 0 and "2 done, 3 skipped" in stdout
    assert files(one) == files(two)


def test_prepared_split_as_input_and_back_to_training(capsys, checkpoint, synthetic_data_dir, tmp_path):
    import tensorflow_datasets as tfds

    from sam_jax.data.builders.sa1b import Sa1b
    from sam_jax.data.pipeline import open_source

    out = tmp_path / "labels"
    code, stdout, _ = cli(capsys, "amg", "--checkpoint", checkpoint, "--input",
                          "tfds:sam_synthetic/small:validation", "--data-dir", synthetic_data_dir,
                          "--output", out, *AMG)
    source = open_source("sam_synthetic/small", "validation", synthetic_data_dir)
    assert code == 0 and f"{len(source)} done" in stdout
    builder = Sa1b(data_dir=str(tmp_path / "prepared"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(out)))
    prepared = builder.as_data_source("train")
    by_name = {prepared[i]["file_name"].decode(): prepared[i] for i in range(len(prepared))}
    assert len(by_name) == len(source)
    for i in range(len(source)):
        record = source[i]
        stem = Path(record["file_name"].decode()).stem
        example = by_name[f"sa_{stem}.png"]
        assert example["image_id"] == record["image_id"]
        np.testing.assert_array_equal(example["image"], record["image"])
        labels = json.loads((out / f"sa_{stem}.json").read_text())["annotations"]
        assert list(example["masks"]["counts"]) == [a["segmentation"]["counts"].encode() for a in labels]


@pytest.mark.parametrize("extra, expected", [
    (["--num-processes", "2"], "--num-processes also needs --coordinator-address, --process-id"),
    (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 is not below --num-processes 2"),
    (["--input", "tfds:sam_synthetic/small"], "expected tfds:NAME:SPLIT"),
    (["--input", "tfds:no_such_set:train"], "unknown data set 'no_such_set'"),
])
def test_bad_process_and_input_flags(capsys, checkpoint, images, tmp_path, extra, expected):
    code, _, err = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", images, "--output",
                       tmp_path / "out", "--sa1b", *extra)  # a later --input wins
    assert code == 2 and expected in one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--sa1b", "--convert-to-rle"], "not allowed with argument --sa1b"),
    (["--max-area-fraction", "0"], "expected a number in (0, 1]"),
    (["--preset", "fast"], "invalid choice: 'fast'"),
])
def test_bad_flags_are_usage_errors(capsys, extra, expected):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["amg", "--checkpoint", "c", "--input", "i", "--output", "o", *extra])
    assert expected in capsys.readouterr().err
