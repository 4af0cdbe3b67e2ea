"""The `sam-jax` command line (`sam_jax.cli`): segment, amg, convert; resumable folder runs; image reading.

* `segment` writes per image mask PNGs equal to `SamPredictor`'s masks on the
  same prompt, an overlay, and result.json (scores, prompt, sizes).
* `amg` writes the official scripts/amg.py layout: `<stem>/i.png` +
  metadata.csv with the official header, or `<stem>.json` COCO RLE records,
  equal to `SamAutomaticMaskGenerator`'s records.
* `convert` is the converter's `convert_checkpoint`.
* Folders resume: a second run skips finished images; an interrupted run
  leaves no output for the image it was on, only a temporary entry that the
  next run removes before redoing that image; a bad image is one line,
  counted, exit status 1.
* Bad input of every kind is exit status 2 and one line on stderr
  (`sam-jax: error: ...`, naming the problem), with nothing written.
* Images read as the official script's cv2.imread reads them (grayscale,
  palette, alpha, 16-bit), EXIF orientation applied; 32-bit images refused.

In-process `main([...])` runs share one tiny (vit_tiny, 256 px) checkpoint;
two runs go through real subprocesses (the console script, `python -m`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.sample_image import synthetic_image
from sam_jax import SamPredictor, load_sam, save_params
from sam_jax.cli import main
from sam_jax.cli import segment as segment_cli
from sam_jax.folder_runner import TEMP_MARK, FolderRunner, Job
from sam_jax.image_io import ImageError, read_image
from sam_jax.tree_paths import flatten

# Copied from the official scripts/amg.py (write_masks_to_folder).
OFFICIAL_METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                            "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
POINTS, LABELS, BOX = "50,60;100,30", "1,0", "20,10,140,100"
B_PROMPT = {"point_coords": [[40, 100], [10, 10]], "point_labels": [1, 0], "box": [0, 0, 100, 110]}
# A small grid and no IoU/stability filtering, so random weights still give masks.
AMG_FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """Runs `sam-jax args` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam-jax: error: "), f"expected one error line: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def tree(folder: Path) -> list[str]:
    """Every path under `folder`, relative, sorted (hidden entries included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    config, _, params = tiny
    return save_params(tmp_path_factory.mktemp("ckpt") / "vit_tiny", params, config, source="test")


@pytest.fixture(scope="module")
def image_a(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "a.png"
    Image.fromarray(synthetic_image(120, 160, seed=1)).save(path)
    return path


@pytest.fixture()
def folder(tmp_path, image_a) -> Path:
    """a.png (RGB), b.png (grayscale), both 160x120 (one size, one compile); bad.png (no image); notes.txt."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(image_a, folder / "a.png")
    Image.fromarray(synthetic_image(120, 160, seed=2)).convert("L").save(folder / "b.png")
    (folder / "bad.png").write_text("not an image")
    (folder / "notes.txt").write_text("not an input")
    return folder


@pytest.fixture(scope="module")
def predictor(checkpoint) -> SamPredictor:
    return SamPredictor(*load_sam(checkpoint))


def read_mask(path: Path) -> np.ndarray:
    mask = np.asarray(Image.open(path))
    assert mask.dtype == np.uint8 and mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
    return mask == 255


# ----------------------------------------------------------------------------- segment


def test_segment_matches_predictor(capsys, checkpoint, image_a, predictor, tmp_path):
    """(--no-multimask: test_console_script_segments.)"""
    multimask = True
    code, out, err = cli(capsys, "segment", "--checkpoint", checkpoint, "--input", image_a,
                         "--output", tmp_path, "--point-coords", POINTS, "--point-labels", LABELS, "--box", BOX)
    assert code == 0, err
    assert "1 done, 0 skipped (already done), 0 failed" in out
    image = np.asarray(Image.open(image_a))
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[50.0, 60.0], [100.0, 30.0]]), point_labels=np.array([1, 0]),
        box=np.array([20.0, 10.0, 140.0, 100.0]), multimask_output=multimask)
    n = 3 if multimask else 1
    files = [f"mask_{i}.png" for i in range(n)]
    assert tree(tmp_path) == sorted(["a", *(f"a/{f}" for f in files), "a/overlay.png", "a/result.json"])
    for i, name in enumerate(files):
        np.testing.assert_array_equal(read_mask(tmp_path / "a" / name), masks[i], err_msg=name)

    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["image"] == {"file": str(image_a), "width": 160, "height": 120, "mode": "RGB"}
    assert result["prompt"] == {"point_coords": [[50.0, 60.0], [100.0, 30.0]], "point_labels": [1, 0],
                                "box": [20.0, 10.0, 140.0, 100.0], "multimask_output": multimask}
    np.testing.assert_allclose(result["iou_predictions"], scores, rtol=1e-6)
    assert [m["file"] for m in result["masks"]] == files
    assert [m["area"] for m in result["masks"]] == [int(m.sum()) for m in masks]
    assert result["model"] == {"checkpoint": str(checkpoint), "model_type": "vit_tiny"}
    overlay = Image.open(tmp_path / "a" / "overlay.png")
    assert overlay.mode == "RGB" and overlay.width == n * 160 + (n - 1) * 4 and overlay.height > 120


def folder_args(checkpoint: Path, folder: Path, out_dir: Path) -> list:
    """A folder run with a per-image prompt for b.png (a prompts.json) and a command-line one for the rest.
    All prompts have the same form (2 points and a box) as test_segment_matches_predictor's, so the
    decoder compiles once for the whole file."""
    prompts = folder.parent / "prompts.json"
    prompts.write_text(json.dumps({"b.png": B_PROMPT}))
    return ["segment", "--checkpoint", checkpoint, "--input", folder, "--output", out_dir,
            "--point-coords", POINTS, "--point-labels", LABELS, "--box", BOX, "--prompts", prompts]


SEGMENT_FILES = ("mask_0.png", "mask_1.png", "mask_2.png", "overlay.png", "result.json")
FOLDER_OUTPUT = sorted(["a", "b", *(f"{s}/{f}" for s in "ab" for f in SEGMENT_FILES)])


def test_segment_folder_with_prompts_file(capsys, checkpoint, folder, tmp_path):
    """Per-image prompts replace the command-line prompt; grayscale is read as RGB; bad.png fails alone."""
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *folder_args(checkpoint, folder, out_dir))
    assert code == 1  # bad.png failed
    assert "2 done, 0 skipped (already done), 1 failed" in out
    failed = [line for line in err.splitlines() if "failed" in line]
    assert failed == [f"sam-jax: failed: {folder / 'bad.png'}: not an image (or a format Pillow cannot read)"]
    assert "ignoring 1 file(s) that are not images by extension" in err and "notes.txt" in err
    a = json.loads((out_dir / "a" / "result.json").read_text())
    b = json.loads((out_dir / "b" / "result.json").read_text())
    assert a["prompt"]["point_coords"] == [[50, 60], [100, 30]] and a["prompt"]["box"] == [20, 10, 140, 100]
    assert b["prompt"] == {**B_PROMPT, "multimask_output": True}
    assert b["image"] == {"file": str(folder / "b.png"), "width": 160, "height": 120, "mode": "L"}
    assert read_mask(out_dir / "b" / "mask_0.png").shape == (120, 160)
    assert tree(out_dir) == FOLDER_OUTPUT


def test_folder_resume(capsys, checkpoint, folder, tmp_path, monkeypatch):
    """Interrupted mid-image: nothing of that image is left but a temporary entry, and a
    re-run skips the finished image, cleans the leftover and redoes the interrupted one."""
    out_dir = tmp_path / "out"
    args = folder_args(checkpoint, folder, out_dir)
    write_result = segment_cli.write_result

    def interrupted_on_b(folder_, source, *rest):
        if source.name == "b.png":
            (folder_ / "mask_0.png").write_bytes(b"half a PNG")
            raise KeyboardInterrupt
        write_result(folder_, source, *rest)

    monkeypatch.setattr(segment_cli, "write_result", interrupted_on_b)
    code, _, err = cli(capsys, *args)
    assert code == 130 and "interrupted" in err
    assert tree(out_dir) == ["a", *(f"a/{f}" for f in SEGMENT_FILES)]
    monkeypatch.undo()

    # What a killed run (no `finally`) leaves: a half-written temporary folder and file.
    (out_dir / f".b{TEMP_MARK}dead").mkdir()
    (out_dir / f".b{TEMP_MARK}dead" / "mask_0.png").write_bytes(b"half")
    (out_dir / f".a.json{TEMP_MARK}dead").write_text("[{")
    a_result = out_dir / "a" / "result.json"
    a_stat = a_result.stat()
    code, out, err = cli(capsys, *args)
    assert code == 1  # bad.png
    assert "1 done, 1 skipped (already done), 1 failed" in out
    assert "removed 2 unfinished output(s) of an interrupted run" in err
    assert tree(out_dir) == FOLDER_OUTPUT
    assert a_result.stat().st_mtime_ns == a_stat.st_mtime_ns and a_result.stat().st_ino == a_stat.st_ino

    code, out, _ = cli(capsys, *args)
    assert "0 done, 2 skipped (already done), 1 failed" in out
    code, out, _ = cli(capsys, *args, "--overwrite")
    assert "2 done, 0 skipped (already done), 1 failed" in out
    assert a_result.stat().st_ino != a_stat.st_ino
    assert tree(out_dir) == FOLDER_OUTPUT


def test_a_live_runs_temporary_outputs_are_not_removed(tmp_path):
    """Two runs over one output folder: the second removes what dead runs left, never what a
    running one (another live process of this host, or any process of another host) is writing."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    out = tmp_path / "out"
    out.mkdir()
    entries = {
        f".a{TEMP_MARK}{host}-{live.pid}-0a1b2c3d": True,  # a live run of this host, writing a.png's output
        f".b.json{TEMP_MARK}{host}-{dead.pid}-0a1b2c3d": False,  # a run of this host that died
        f".c{TEMP_MARK}other-host-77-0a1b2c3d": True,  # another host's: it cannot be checked from here
        f".d{TEMP_MARK}dead": False,  # an older version's name, without its writer
    }
    try:
        for name in entries:
            (out / name).mkdir()
        logged = []
        summary = FolderRunner(out, "dir", log=logged.append).run([], lambda job, path: None)
    finally:
        live.kill()
        live.wait()
    assert summary.cleaned == 2 and logged == ["sam-jax: removed 2 unfinished output(s) of an interrupted run"]
    assert sorted(p.name for p in out.iterdir()) == sorted(name for name, kept in entries.items() if kept)


def test_temporary_outputs_name_their_writer(tmp_path):
    names = []
    FolderRunner(tmp_path / "out", "file").run([Job(tmp_path / "a.png", tmp_path / "out" / "a.json")],
                                               lambda job, path: (names.append(path.name), path.write_text("[]")))
    assert names[0].startswith(f".a.json{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-")
    assert (tmp_path / "out" / "a.json").read_text() == "[]"


def test_incomplete_existing_output_is_not_overwritten(capsys, checkpoint, image_a, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("keep me")
    code, _, err = cli(capsys, "segment", "--checkpoint", checkpoint, "--input", image_a,
                       "--output", tmp_path, "--box", BOX)
    assert code == 1 and "exists but is not a complete output; remove it to redo this image" in err
    assert tree(tmp_path) == ["a", "a/mine.txt"]


# ----------------------------------------------------------------------------- amg


@pytest.fixture(scope="module")
def generator_records(checkpoint, image_a):
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(*load_sam(checkpoint), points_per_side=4, pred_iou_thresh=0,
                                          stability_score_thresh=0)
    records = generator.generate(np.asarray(Image.open(image_a)))
    assert records, "the test needs some masks"
    return records


def test_amg_png_layout(capsys, checkpoint, image_a, tmp_path, generator_records):
    code, out, err = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", image_a, "--output", tmp_path,
                         *AMG_FAST)
    assert code == 0, err
    n = len(generator_records)
    assert tree(tmp_path) == sorted(["a", "a/metadata.csv", *(f"a/{i}.png" for i in range(n))])
    lines = (tmp_path / "a" / "metadata.csv").read_text().split("\n")
    assert lines[0] == OFFICIAL_METADATA_HEADER and len(lines) == n + 1  # no trailing newline, as official
    for i, record in enumerate(generator_records):
        mask = read_mask(tmp_path / "a" / f"{i}.png")
        assert mask.shape == (120, 160)
        np.testing.assert_array_equal(mask, record["segmentation"])
        row = lines[i + 1].split(",")
        assert row[0] == str(i) and row[1] == str(record["area"]) and len(row) == 14
        assert [float(x) for x in row[2:6]] == record["bbox"]
        assert [float(x) for x in row[6:8]] == record["point_coords"][0]
        assert float(row[8]) == record["predicted_iou"] and float(row[9]) == record["stability_score"]
        assert [float(x) for x in row[10:]] == record["crop_box"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode
def test_amg_rle_and_folder(capsys, checkpoint, folder, tmp_path, generator_records):
    from pycocotools import mask as mask_utils

    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", folder, "--output", out_dir,
                         "--convert-to-rle", *AMG_FAST)
    assert code == 1 and "2 done, 0 skipped (already done), 1 failed" in out
    assert tree(out_dir) == ["a.json", "b.json"]
    records = json.loads((out_dir / "a.json").read_text())
    assert len(records) == len(generator_records)
    for record, expected in zip(records, generator_records):
        assert record.keys() == expected.keys()
        assert record["segmentation"]["size"] == [120, 160]
        np.testing.assert_array_equal(mask_utils.decode(record["segmentation"]).astype(bool),
                                      expected["segmentation"])
        assert {k: v for k, v in record.items() if k != "segmentation"} == \
               {k: v for k, v in expected.items() if k != "segmentation"}
    code, out, _ = cli(capsys, "amg", "--checkpoint", checkpoint, "--input", folder, "--output", out_dir,
                       "--convert-to-rle", *AMG_FAST)
    assert "0 done, 2 skipped (already done), 1 failed" in out


def test_amg_kwargs_are_the_given_flags():
    from sam_jax.cli import build_parser
    from sam_jax.cli.amg import amg_kwargs

    args = build_parser().parse_args(["amg", "--checkpoint", "c", "--input", "i", "--output", "o",
                                      "--points-per-side", "8", "--crop-overlap-ratio", "0.25",
                                      "--min-mask-region-area", "100"])
    assert amg_kwargs(args) == {"points_per_side": 8, "crop_overlap_ratio": 0.25, "min_mask_region_area": 100}


# ----------------------------------------------------------------------------- convert


def test_convert(capsys, tiny, tmp_path):
    _, model, params = tiny
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    code, out, err = cli(capsys, "convert", tmp_path / "tiny.pth", tmp_path / "converted")
    assert code == 0, err
    assert "(vit_tiny, looped)" in out
    _, loaded = load_sam(tmp_path / "converted")
    flat, expected = flatten(loaded), flatten(params)
    assert flat.keys() == expected.keys() and all(np.array_equal(flat[k], expected[k]) for k in flat)
    code, _, err = cli(capsys, "convert", tmp_path / "tiny.pth", tmp_path / "converted")
    assert code == 2 and "already exists" in one_error_line(err)


# ----------------------------------------------------------------------------- bad input


def _write_bad_inputs(root: Path, image_a: Path) -> None:
    shutil.copy(image_a, root / "a.png")
    (root / "text.jpg").write_text("hello")
    data = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.ones((20, 30), np.float32)).save(root / "float.tif")
    (root / "model.pth").write_bytes(b"PK\x03\x04 not really")
    (root / "empty").mkdir()
    (root / "only_text").mkdir()
    (root / "only_text" / "notes.txt").write_text("x")
    (root / "twins").mkdir()
    shutil.copy(image_a, root / "twins" / "x.png")
    shutil.copy(image_a, root / "twins" / "x.jpg")
    (root / "not_json.json").write_text("{")
    (root / "unknown_image.json").write_text(json.dumps({"zzz.png": {"box": [1, 2, 3, 4]}}))
    (root / "bad_field.json").write_text(json.dumps({"a.png": {"points": [[1, 2]]}}))
    (root / "bad_box.json").write_text(json.dumps({"a.png": {"box": [1, 2, 3]}}))
    (root / "output_file").write_text("x")


# name: (arguments after --checkpoint; "{r}" is the folder of bad inputs; what the one line must name)
OK = ["--input", "{r}/a.png", "--output", "{r}/out"]
BAD_INPUTS = {
    "missing input": (["--input", "{r}/nope.png", "--output", "{r}/out", "--box", BOX],
                      "--input {r}/nope.png: no such file or folder"),
    "not an image": (["--input", "{r}/text.jpg", "--output", "{r}/out", "--box", BOX],
                     "{r}/text.jpg: not an image"),
    "truncated image": (["--input", "{r}/truncated.png", "--output", "{r}/out", "--box", BOX],
                        "{r}/truncated.png: corrupt or truncated image"),
    "32-bit float image": (["--input", "{r}/float.tif", "--output", "{r}/out", "--box", BOX],
                           "32-bit floating-point image (mode F) has no fixed range"),
    "empty folder": (["--input", "{r}/empty", "--output", "{r}/out", "--box", BOX],
                     "the folder holds no image files"),
    "folder without images": (["--input", "{r}/only_text", "--output", "{r}/out", "--box", BOX],
                              "the folder holds no image files (1 file(s) with other extensions)"),
    "two images, one output": (["--input", "{r}/twins", "--output", "{r}/out", "--box", BOX],
                               "x.jpg and x.png would both be written to"),
    "output is a file": (["--input", "{r}/a.png", "--output", "{r}/output_file", "--box", BOX],
                         "--output {r}/output_file: exists and is not a folder"),
    "point outside": ([*OK, "--point-coords", "50,60;161,30"],
                      "point (161, 30) is outside the 160x120 image"),
    "negative point": ([*OK, "--point-coords", "-1,5"], "point (-1, 5) is outside"),
    "box outside": ([*OK, "--box", "0,0,160,121"], "box (0, 0, 160, 121) is outside the 160x120 image"),
    "point with 3 numbers": ([*OK, "--point-coords", "1,2,3"], "--point-coords: expected 'x,y'"),
    "point not numbers": ([*OK, "--point-coords", "a,b"], "--point-coords: expected 'x,y'"),
    "empty points": ([*OK, "--point-coords", ""], "--point-coords: expected 'x,y'"),
    "point nan": ([*OK, "--point-coords", "nan,3"], "--point-coords: expected 'x,y'"),
    "box x1 < x0": ([*OK, "--box", "50,5,10,100"], "x1 > x0 and y1 > y0; got 50, 5, 10, 100"),
    "box 3 numbers": ([*OK, "--box", "1,2,3"], "--box: expected 'x0,y0,x1,y1' (pixels), 4 numbers"),
    "label count": ([*OK, "--point-coords", "1,2", "--point-labels", "1,0"],
                    "1 point(s) but 2 point label(s)"),
    "label value": ([*OK, "--point-coords", "1,2", "--point-labels", "2"],
                    "labels must be 1 (foreground) or 0"),
    "labels without points": ([*OK, "--point-labels", "1"], "point labels given without point coordinates"),
    "no prompt": (OK, "no prompt: give --point-coords"),
    "prompts not json": ([*OK, "--prompts", "{r}/not_json.json"], "not a readable JSON file"),
    "prompts missing": ([*OK, "--prompts", "{r}/nope.json"], "--prompts {r}/nope.json: no such file"),
    "prompts unknown image": ([*OK, "--prompts", "{r}/unknown_image.json"], "no input image named zzz.png"),
    "prompts bad field": ([*OK, "--prompts", "{r}/bad_field.json"], "unknown field(s) points"),
    "prompts bad box": ([*OK, "--prompts", "{r}/bad_box.json"],
                        "box must be [x0, y0, x1, y1] (numbers); got [1, 2, 3]"),
    "unknown flag": ([*OK, "--box", BOX, "--points-per-side", "4"],
                     "unrecognized arguments: --points-per-side"),
}
BAD_CHECKPOINTS = {
    "missing checkpoint": ("{r}/nope", "{r}/nope: no such checkpoint directory"),
    "a .pth as checkpoint": ("{r}/model.pth", "is a file, not a converted sam_jax checkpoint folder; "
                                             "convert it first: sam-jax convert"),
    "a folder that is not a checkpoint": ("{r}/empty",
                                          "not a converted sam_jax checkpoint (no sam_jax.json)"),
    "a config of the wrong type": ("{r}/bad_config", "{r}/bad_config/sam_jax.json: bad config "
                                                     "(ImageEncoderConfig.embed_dim must be an integer >= 1; got 'big')"),
    "a NaN weight": ("{r}/nan_weight", "{r}/nan_weight: mask_decoder/iou_token/embedding holds 1 NaN or infinite value"),
}
BAD_AMG = {
    "points per side 0": (["--points-per-side", "0"],
                          "argument --points-per-side: expected an integer >= 1; got '0'"),
    "overlap ratio 1.5": (["--crop-overlap-ratio", "1.5"],
                          "argument --crop-overlap-ratio: expected a number in [0, 1)"),
    "nms not a number": (["--box-nms-thresh", "x"], "argument --box-nms-thresh: expected a number in [0, 1]"),
    "model type mismatch": (["--model-type", "vit_b"], "is a vit_tiny checkpoint, not --model-type vit_b"),
    "not an image": (["--input", "{r}/text.jpg"], "{r}/text.jpg: not an image"),
    # A zero-width crop named as what it is, before the model loads, and no empty output folder.
    "more crop layers than the image holds": (["--crop-n-layers", "5", "--points-per-side", "4"],
                                              "{r}/a.png: crop_n_layers=5 is too many for a 120x160 image: layer 4 "
                                              "has crops outside it (XYXY [0, 120, 15, 120]); use crop_n_layers <= 3"),
}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, image_a, checkpoint) -> Path:
    root = tmp_path_factory.mktemp("bad")
    _write_bad_inputs(root, image_a)
    _write_bad_checkpoints(root, checkpoint)
    return root


def _write_bad_checkpoints(root: Path, checkpoint: Path) -> None:
    """Converted checkpoints that read but must not load: a config of the wrong type, a NaN weight."""
    import orbax.checkpoint as ocp

    from sam_jax.tree_paths import unflatten

    bad_config = root / "bad_config"
    shutil.copytree(checkpoint, bad_config)
    metadata = json.loads((bad_config / "sam_jax.json").read_text())
    metadata["config"]["encoder"]["embed_dim"] = "big"
    (bad_config / "sam_jax.json").write_text(json.dumps(metadata))
    nan_weight = root / "nan_weight"
    shutil.copytree(checkpoint, nan_weight)
    params = {k: np.array(v) for k, v in flatten(load_sam(checkpoint)[1]).items()}
    params["mask_decoder/iou_token/embedding"].flat[0] = np.nan
    shutil.rmtree(nan_weight / "params")
    ocp.PyTreeCheckpointer().save(nan_weight.absolute() / "params", unflatten(params))


def assert_fails_cleanly(capsys, bad_root: Path, args: list[str], expected: str) -> None:
    before = tree(bad_root)
    code, out, err = cli(capsys, *[a.replace("{r}", str(bad_root)) for a in args])
    assert code == 2
    line = one_error_line(err)
    assert expected.replace("{r}", str(bad_root)) in line, line
    assert tree(bad_root) == before, "something was written"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_segment_bad_input(capsys, checkpoint, bad_root, case):
    args, expected = BAD_INPUTS[case]
    assert_fails_cleanly(capsys, bad_root, ["segment", "--checkpoint", str(checkpoint), *args], expected)


@pytest.mark.parametrize("command", ["segment", "amg"])
@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint(capsys, bad_root, case, command):
    checkpoint, expected = BAD_CHECKPOINTS[case]
    prompt = ["--box", BOX] if command == "segment" else []
    assert_fails_cleanly(capsys, bad_root, [command, "--checkpoint", checkpoint, *OK, *prompt], expected)


@pytest.mark.parametrize("case", BAD_AMG)
def test_amg_bad_input(capsys, checkpoint, bad_root, case):
    extra, expected = BAD_AMG[case]
    args = ["amg", "--checkpoint", str(checkpoint), *OK]
    if extra[0] == "--input":
        args[args.index("--input") + 1] = extra[1]
        extra = []
    assert_fails_cleanly(capsys, bad_root, [*args, *extra], expected)


def test_convert_bad_source(capsys, bad_root):
    assert_fails_cleanly(capsys, bad_root, ["convert", "{r}/nope.pth", "{r}/converted"],
                         "{r}/nope.pth: checkpoint file does not exist")
    assert_fails_cleanly(capsys, bad_root, ["convert", "{r}/text.jpg", "{r}/converted"],
                         "is not a checkpoint")


def test_help(capsys):
    assert main(["--help"]) == 0
    for command in ("segment", "amg", "convert"):
        assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "an alpha channel dropped" in text and "16-bit images reduced" in text and "metadata.csv" in text


# ----------------------------------------------------------------------------- image modes


def _png_variants(folder: Path) -> dict[str, Path]:
    rgb = synthetic_image(24, 32, seed=3)
    rgba = np.concatenate([rgb, np.arange(24 * 32, dtype=np.uint8).reshape(24, 32, 1)], axis=2)
    variants = {
        "L": Image.fromarray(rgb).convert("L"),
        "1": Image.fromarray(rgb).convert("1"),
        "P": Image.fromarray(rgb).convert("P"),
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(rgba).convert("LA"),
        "I;16": Image.fromarray(np.random.default_rng(0).integers(0, 65536, (24, 32)).astype(np.uint16)),
    }
    paths = {}
    for mode, image in variants.items():
        assert image.mode == mode
        paths[mode] = folder / f"{mode.replace(';', '_')}.png"
        image.save(paths[mode])
    transparent = Image.fromarray(rgb).convert("P")
    transparent.info["transparency"] = 0
    paths["P transparent"] = folder / "p_transparent.png"
    transparent.save(paths["P transparent"], transparency=0)
    return paths


def test_image_modes_read_as_official_script(tmp_path):
    """Each mode gives what the official scripts/amg.py's cv2.imread + BGR2RGB gives."""
    import cv2  # opencv-python-headless, in the [test] extra
    for mode, path in _png_variants(tmp_path).items():
        image, read_mode = read_image(path)
        assert image.dtype == np.uint8 and image.shape == (24, 32, 3), mode
        assert read_mode == mode.split()[0]
        expected = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(image, expected, err_msg=mode)


def test_exif_orientation_is_applied(tmp_path):
    rgb = synthetic_image(24, 32, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif)
    image, _ = read_image(tmp_path / "rotated.png")
    np.testing.assert_array_equal(image, np.rot90(rgb, k=-1))


def test_read_image_errors(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)
    Image.fromarray(np.ones((4, 4), np.int32)).save(tmp_path / "int.tif")
    with pytest.raises(ImageError, match=r"32-bit integer image \(mode I\)"):
        read_image(tmp_path / "int.tif")


# ----------------------------------------------------------------------------- real processes


def test_console_script_segments(checkpoint, image_a, tmp_path):
    script = Path(sys.executable).parent / "sam-jax"
    assert script.exists(), "the sam-jax console script is not installed: pip install -e ."
    run = subprocess.run([str(script), "segment", "--checkpoint", str(checkpoint), "--input", str(image_a),
                          "--output", str(tmp_path / "out"), "--point-coords", "80,60", "--no-multimask"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "1 done, 0 skipped (already done), 0 failed" in run.stdout
    assert tree(tmp_path / "out") == ["a", "a/mask_0.png", "a/overlay.png", "a/result.json"]
    result = json.loads((tmp_path / "out" / "a" / "result.json").read_text())
    assert result["prompt"] == {"point_coords": [[80.0, 60.0]], "point_labels": [1], "box": None,
                                "multimask_output": False}
    assert len(result["iou_predictions"]) == 1
    assert read_mask(tmp_path / "out" / "a" / "mask_0.png").shape == (120, 160)


def test_python_m_bad_input_is_one_line(checkpoint, tmp_path):
    run = subprocess.run([sys.executable, "-m", "sam_jax.cli", "segment", "--checkpoint", str(checkpoint),
                          "--input", str(tmp_path / "missing.png"), "--output", str(tmp_path / "out"),
                          "--box", BOX], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 2
    line = one_error_line(run.stderr)
    assert "missing.png: no such file or folder" in line
    assert not (tmp_path / "out").exists()
