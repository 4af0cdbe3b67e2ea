"""SA-1B from local files: a tiny fake SA-1B (official JSON shape) as tars and folders.

Round trip through the `sa1b` TFDS builder, streaming reads (no seeks, bounded
memory), and every bad-data case in "error" and "skip" mode.
"""

import dataclasses
import io
import json
import os
import tarfile
import tracemalloc
from typing import Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sam_jax.data import rle, sa1b_reader
from sam_jax.data.bad_records import BadRecordError, BadRecordPolicy
from sam_jax.data.builders.sa1b import Sa1b

TAR = "sa_000000.tar"


@dataclasses.dataclass
class Fake:
    """One fake SA-1B image: its JPEG, its JSON record (official shape) and the true masks."""

    stem: str
    jpg: bytes
    record: dict
    masks: List[np.ndarray]

    @property
    def json(self) -> bytes:
        return json.dumps(self.record).encode()


def textured_jpeg(rng, h: int, w: int, quality: int = 90) -> bytes:
    """A smooth colour field plus noise, so JPEG decoding is not trivially exact."""
    coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    base = np.kron(coarse, np.ones((4, 4, 1), np.uint8))[:h, :w]
    pixels = np.clip(base.astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_fake(rng, image_id: int, h: int, w: int, n_masks: int = 3, jpg: Optional[bytes] = None) -> Fake:
    masks, annotations = [], []
    for k in range(n_masks):
        mask = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y0 : y0 + rng.integers(2, h // 2), x0 : x0 + rng.integers(2, w // 2)] = True
        mask[rng.integers(0, h), rng.integers(0, w)] = True  # a stray pixel: not a plain box
        counts = rle.encode(mask)
        x, y, bw, bh = (float(v) for v in rle.boxes_xywh([counts], (h, w))[0])
        masks.append(mask)
        annotations.append(
            {
                "bbox": [x, y, bw, bh],
                "area": int(mask.sum()),
                "segmentation": {"size": [h, w], "counts": counts.decode("ascii")},
                "predicted_iou": float(rng.uniform(0.8, 1.0)),
                "point_coords": [[x + 0.5 + k, y + 0.25]],
                "crop_box": [0.0, 0.0, float(w), float(h)] if k == 0 else [1.0, 2.0, float(w - 1), float(h - 2)],
                "id": image_id * 1000 + k,
                "stability_score": float(rng.uniform(0.9, 1.0)),
            }
        )
    stem = f"sa_{image_id}"
    record = {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": stem + ".jpg"},
        "annotations": annotations,
    }
    return Fake(stem, jpg if jpg is not None else textured_jpeg(rng, h, w), record, masks)


def fakes(seed: int = 0, ids=(1, 2, 3), sizes=((24, 32), (32, 24), (20, 20))) -> List[Fake]:
    rng = np.random.default_rng(seed)
    return [make_fake(rng, i, h, w) for i, (h, w) in zip(ids, sizes)]


def members(images: List[Fake], json_first=()) -> List[tuple]:
    """Tar members (name, bytes): each image's jpg then json, or json first for stems in `json_first`."""
    out = []
    for f in images:
        pair = [(f.stem + ".jpg", f.jpg), (f.stem + ".json", f.json)]
        out += pair[::-1] if f.stem in json_first else pair
    return out


def tar_bytes(entries) -> bytes:
    """A tar of (name, bytes) files; (name, None) is a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_folder(directory, images: List[Fake]) -> None:
    os.makedirs(directory, exist_ok=True)
    for f in images:
        with open(os.path.join(directory, f.stem + ".jpg"), "wb") as out:
            out.write(f.jpg)
        with open(os.path.join(directory, f.stem + ".json"), "wb") as out:
            out.write(f.json)


def assert_example_matches(example: Dict, fake: Fake, kept=None) -> None:
    """`example` (reader dict or TFDS data source dict) equals `fake`'s JSON, for the masks in `kept`."""
    kept = range(len(fake.masks)) if kept is None else kept
    anns = [fake.record["annotations"][k] for k in kept]
    info = fake.record["image"]
    if isinstance(example["image"], bytes):
        assert example["image"] == fake.jpg  # valid RGB JPEG bytes are kept unchanged
    else:
        expected = np.asarray(Image.open(io.BytesIO(fake.jpg)).convert("RGB"))
        np.testing.assert_array_equal(example["image"], expected)
    assert int(example["image_id"]) == info["image_id"]
    file_name = example["file_name"]
    assert (file_name.decode() if isinstance(file_name, bytes) else file_name) == info["file_name"]
    m = example["masks"]
    counts = [c.decode() if isinstance(c, bytes) else c for c in m["counts"]]
    assert counts == [a["segmentation"]["counts"] for a in anns]
    h, w = info["height"], info["width"]
    for c, k in zip(counts, kept):
        np.testing.assert_array_equal(rle.decode(c, (h, w)), fake.masks[k])
    fields = {
        "bbox": ([a["bbox"] for a in anns], np.float32),
        "area": ([a["area"] for a in anns], np.int64),
        "point": ([a["point_coords"][0] for a in anns], np.float32),
        "id": ([a["id"] for a in anns], np.int64),
        "predicted_iou": ([a["predicted_iou"] for a in anns], np.float32),
        "stability_score": ([a["stability_score"] for a in anns], np.float32),
        "crop_box": ([a["crop_box"] for a in anns], np.float32),
    }
    for key, (values, dtype) in fields.items():
        assert m[key].dtype == dtype, key
        np.testing.assert_array_equal(m[key], np.asarray(values, dtype), err_msg=key)


def prepare(manual_dir, data_dir, mode="error") -> Sa1b:
    builder = Sa1b(data_dir=str(data_dir), on_bad_record=mode)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def read_all(builder) -> Dict[str, dict]:
    source = builder.as_data_source("train")
    out = {}
    for i in range(len(source)):
        example = source[i]
        out[example["file_name"].decode()] = example
    return out


def test_builder_round_trip_tar_and_folder(tmp_path):
    images = fakes(ids=(1, 2, 3, 4, 5), sizes=((24, 32), (32, 24), (20, 20), (16, 40), (30, 18)))
    manual = tmp_path / "manual"
    manual.mkdir()
    # The tar holds sa_1..3 (sa_2's json before its jpg, as members may come); the folder sa_4..5.
    (manual / TAR).write_bytes(tar_bytes(members(images[:3], json_first={"sa_2"})))
    write_folder(manual / "extracted" / "sa_000001", images[3:])

    builder = prepare(manual, tmp_path / "data")
    got = read_all(builder)
    assert sorted(got) == [f.stem + ".jpg" for f in images]
    for f in images:
        assert_example_matches(got[f.stem + ".jpg"], f)
    assert builder.info.metadata["bad_records"] == {"train": {"skipped": {}, "examples": {}}}
    # The report survives a reload from the prepared data dir.
    reloaded = Sa1b(data_dir=str(tmp_path / "data"))
    assert reloaded.info.metadata["bad_records"]["train"]["skipped"] == {}
    assert builder.info.splits["train"].num_examples == 5


def test_registered_name_and_options():
    assert tfds.builder_cls("sa1b") is Sa1b
    assert "sa_*.tar" in Sa1b.MANUAL_DOWNLOAD_INSTRUCTIONS
    with pytest.raises(ValueError, match="on_bad_record"):
        Sa1b(data_dir="/nonexistent", on_bad_record="ignore")


def test_reader_order_is_sorted_and_deterministic(tmp_path):
    images = fakes(ids=(3, 1, 2, 10), sizes=((24, 32), (32, 24), (20, 20), (16, 16)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "sa_000001.tar").write_bytes(tar_bytes(members(images[:2])))
    write_folder(tmp_path / "a", images[2:])
    (tmp_path / "notes.txt").write_text("ignored")
    assert sa1b_reader.find_sources(str(tmp_path)) == [("dir", "a"), ("tar", os.path.join("b", "sa_000001.tar"))]
    keys = [k for k, _ in sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy())]
    # Folder files sorted by name; a tar in its own member order.
    assert keys == ["sa_10.jpg", "sa_2.jpg", "sa_3.jpg", "sa_1.jpg"]
    assert keys == [k for k, _ in sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy())]


def test_empty_manual_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sa_"):
        next(sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy()))


class NoSeek(io.RawIOBase):
    """A read-only stream that fails the test if anyone seeks or asks for the position."""

    def __init__(self, data: bytes):
        self._inner = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._inner.readinto(buffer)

    def seekable(self):
        return False

    def seek(self, *args):
        raise AssertionError("the tar reader seeked")

    def tell(self):
        raise AssertionError("the tar reader asked for the position")


def test_tar_is_read_as_a_stream(tmp_path):
    images = fakes()
    images[2].record["annotations"][0]["point_coords"].append([1.0, 1.0])  # `point` is the first one
    # As `tar cf sa_000000.tar .` writes it: a "./" entry, member names starting with "./".
    entries = [(".", None)] + [("./" + n, d) for n, d in members(images, json_first={"sa_1", "sa_3"})]
    stream = NoSeek(tar_bytes(entries))
    got = dict(sa1b_reader.iter_tar(stream, TAR, BadRecordPolicy()))
    assert list(got) == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]
    for f in images:
        assert_example_matches(got[f.stem + ".jpg"], f)


def test_tar_memory_stays_far_below_tar_size(tmp_path):
    rng = np.random.default_rng(1)
    images = []
    for i in range(20):
        noise = rng.integers(0, 256, (720, 720, 3), dtype=np.uint8)  # ~1 MB as JPEG: incompressible
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="JPEG", quality=100)
        images.append(make_fake(rng, i, 720, 720, n_masks=2, jpg=buffer.getvalue()))
    path = tmp_path / TAR
    path.write_bytes(tar_bytes(members(images)))
    tar_size = path.stat().st_size
    assert tar_size > 18e6
    del images

    tracemalloc.start()
    try:
        n = 0
        with open(path, "rb") as f:
            for _, example in sa1b_reader.iter_tar(f, TAR, BadRecordPolicy()):
                n += 1
                del example
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 20
    # About three times one member (tarfile's stream copies a member while reading it); a reader
    # holding the whole tar would pass tar_size.
    assert peak < tar_size / 4, (peak, tar_size)


# ---- bad data ----------------------------------------------------------------------------------
# Each case damages sa_2 (image 2 of 3, annotations with ids 2000, 2001, 2002) in sa_000000.tar.
# CASES[name] = (Case, damage, value): damage is a function editing the fakes' JSON, or a tar-level
# edit ("json" / "jpg": replace that member's bytes by `value`; "drop_jpg" / "drop_json"; "tar": cut it).


@dataclasses.dataclass
class Case:
    reason: str
    where: str  # the file and record the error names
    dropped_image: bool = False
    dropped_masks: tuple = ()  # annotation indices of sa_2 dropped in skip mode
    skipped: Optional[Dict[str, int]] = None  # skip-mode counts, if not {reason: 1}


def _set_ann(field, value, index=1):
    def damage(images):
        images[1].record["annotations"][index]["segmentation"][field] = value(images[1])
    return damage


def _counts_starting_with_15_background() -> str:
    mask = np.zeros((32, 24), bool)
    mask[15:20, 0:3] = True
    counts = rle.encode(mask).decode()
    assert counts[0] == "?"  # a run of 15 is the single character chr(48 + 15)
    return counts


def _all_empty(images):
    for ann in images[1].record["annotations"]:
        ann["segmentation"]["counts"] = rle.encode(np.zeros((32, 24), bool)).decode()


CASES = {
    # corrupt JSON: not parseable, or lacking required keys.
    "json_unparseable": (Case("corrupt_json", "sa_000000.tar:sa_2.json", True), "json", b'{"image": {"imag'),
    "json_not_utf8": (Case("corrupt_json", "sa_000000.tar:sa_2.json", True), "json", b'{"image": "\x80"}'),
    "json_not_an_object": (Case("corrupt_json", "sa_000000.tar:sa_2.json", True), "json", b"[1, 2]"),
    "json_file_name_disagrees": (
        Case("corrupt_json", "sa_000000.tar:sa_2.json: image.file_name is 'sa_5.jpg'", True),
        lambda im: im[1].record["image"].update(file_name="sa_5.jpg"),
        None,
    ),
    "json_no_width": (
        Case("corrupt_json", "sa_000000.tar:sa_2.json", dropped_image=True),
        lambda im: im[1].record["image"].pop("width"),
        None,
    ),
    "json_annotation_lacks_key": (
        Case("corrupt_json", "sa_000000.tar:sa_2.json: annotation file is corrupt: annotation 1 (id 2001)", True),
        lambda im: im[1].record["annotations"][1].pop("predicted_iou"),
        None,
    ),
    "json_counts_not_string": (
        Case("corrupt_json", "annotation 1 (id 2001) segmentation", True),
        _set_ann("counts", lambda f: [0, 5, 3]),
        None,
    ),
    "missing_image": (Case("missing_image", "sa_000000.tar:sa_2.jpg", True), "drop_jpg", None),
    "missing_annotation": (Case("missing_annotation", "sa_000000.tar:sa_2.jpg", True), "drop_json", None),
    "truncated_image": (Case("undecodable_image", "sa_000000.tar:sa_2.jpg", True), "jpg", "truncate"),
    "undecodable_image": (Case("undecodable_image", "sa_000000.tar:sa_2.jpg", True), "jpg", b"not a jpeg at all"),
    "image_size_disagrees_with_json": (
        Case("size_mismatch", "sa_000000.tar:sa_2.jpg", True),
        lambda im: im[1].record["image"].update(width=25),
        None,
    ),
    "mask_size_mismatch": (
        Case("mask_size_mismatch", "sa_000000.tar:sa_2.json annotation 1 (id 2001)", dropped_masks=(1,)),
        _set_ann("size", lambda f: [32, 25]),
        None,
    ),
    "rle_runs_do_not_cover_mask": (
        Case("undecodable_rle", "sa_000000.tar:sa_2.json annotation 1 (id 2001)", dropped_masks=(1,)),
        _set_ann("counts", lambda f: rle.encode(np.ones((33, 24), bool)).decode()),
        None,
    ),
    "rle_bad_character": (
        Case("undecodable_rle", "sa_000000.tar:sa_2.json annotation 1 (id 2001)", dropped_masks=(1,)),
        _set_ann("counts", lambda f: "0~!"),
        None,
    ),
    "rle_not_ascii": (
        Case("undecodable_rle", "sa_000000.tar:sa_2.json annotation 1 (id 2001)", dropped_masks=(1,)),
        # A parser that maps non-ASCII to '?' (a valid RLE digit) would read these runs as right.
        _set_ann("counts", lambda f: "\u00ff" + _counts_starting_with_15_background()[1:]),
        None,
    ),
    "zero_area_mask": (
        Case("empty_mask", "sa_000000.tar:sa_2.json annotation 2 (id 2002)", dropped_masks=(2,)),
        _set_ann("counts", lambda f: rle.encode(np.zeros((32, 24), bool)).decode(), index=2),
        None,
    ),
    "no_annotations": (
        Case("no_masks", "sa_000000.tar:sa_2.json", True),
        lambda im: im[1].record.update(annotations=[]),
        None,
    ),
    "no_remaining_masks": (
        # Error mode stops at the first bad mask; skip mode counts 3 masks and then the image.
        Case("empty_mask", "sa_000000.tar:sa_2.json annotation 0 (id 2000)", True,
             skipped={"empty_mask": 3, "no_masks": 1}),
        _all_empty,
        None,
    ),
    "truncated_tar": (Case("corrupt_tar", "sa_000000.tar", True), "tar", "cut_in_sa_2"),
    "tar_cut_at_header": (Case("corrupt_tar", "sa_000000.tar", True), "tar", "cut_at_header"),
}


def _damaged_manual_dir(tmp_path, name) -> List[Fake]:
    """Writes fakes sa_1..3 as sa_000000.tar into tmp_path with case `name` applied; returns the fakes."""
    images = fakes()
    _, what, value = CASES[name]
    if callable(what):
        what(images)
    entries = members(images)
    if what == "json":
        entries[3] = ("sa_2.json", value)
    elif what == "jpg":
        entries[2] = ("sa_2.jpg", entries[2][1][: len(entries[2][1]) // 2] if value == "truncate" else value)
    elif what in ("drop_jpg", "drop_json"):
        del entries[2 if what == "drop_jpg" else 3]
    data = tar_bytes(entries)
    if what == "tar":
        # Offsets: header 512 + data padded to 512, per member. sa_2.jpg is member 2.
        header_of_sa2_jpg = sum(512 + -(-len(d) // 512) * 512 for _, d in entries[:2])
        data = data[: header_of_sa2_jpg + 512 + 100] if value == "cut_in_sa_2" else data[:header_of_sa2_jpg]
    (tmp_path / TAR).write_bytes(data)
    return images


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_error_mode_names_file_and_record(tmp_path, name):
    case = CASES[name][0]
    _damaged_manual_dir(tmp_path, name)
    with pytest.raises(BadRecordError) as raised:
        list(sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy("error")))
    assert raised.value.reason == case.reason
    assert TAR in str(raised.value) and case.where in str(raised.value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_skip_mode_drops_and_counts(tmp_path, name):
    case = CASES[name][0]
    images = _damaged_manual_dir(tmp_path, name)
    policy = BadRecordPolicy("skip")
    got = dict(sa1b_reader.iter_examples(str(tmp_path), policy))

    assert policy.report()["skipped"] == (case.skipped or {case.reason: 1})
    assert any(case.where in message for message in policy.report()["examples"][case.reason])

    survivors = [f for f in images if not (case.dropped_image and f.stem == "sa_2")]
    if case.reason == "corrupt_tar":
        survivors = images[:1]  # nothing after the cut is read
    assert sorted(got) == [f.stem + ".jpg" for f in survivors]
    for f in survivors:
        kept = [k for k in range(3) if not (f.stem == "sa_2" and k in case.dropped_masks)]
        assert_example_matches(got[f.stem + ".jpg"], f, kept)


def test_duplicate_image_in_tar_and_folder(tmp_path):
    images = fakes()
    (tmp_path / TAR).write_bytes(tar_bytes(members(images)))
    write_folder(tmp_path / "z_extracted", images[1:2])
    message = r"z_extracted/sa_2.jpg: sa_2.jpg was already read from sa_000000.tar:sa_2.jpg"
    with pytest.raises(BadRecordError, match=message):
        list(sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy("error")))
    policy = BadRecordPolicy("skip")
    assert [k for k, _ in sa1b_reader.iter_examples(str(tmp_path), policy)] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]
    assert policy.report()["skipped"] == {"duplicate_image": 1}


def as_png(fake: Fake) -> Fake:
    """The fake with its image stored as a PNG (`sa_<id>.png`), as the data engine stores images."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(fake.jpg)).convert("RGB").save(buffer, format="PNG")
    record = json.loads(fake.json)
    record["image"]["file_name"] = fake.stem + ".png"
    return dataclasses.replace(fake, jpg=buffer.getvalue(), record=record)


def test_png_images_in_tar_and_folder(tmp_path):
    images = [as_png(f) for f in fakes(ids=(1, 2, 3, 4), sizes=((24, 32), (32, 24), (20, 20), (16, 18)))]
    png_members = [(name.replace(".jpg", ".png"), data) for name, data in members(images[:2], json_first={"sa_2"})]
    (tmp_path / TAR).write_bytes(tar_bytes(png_members))
    folder = tmp_path / "engine"
    folder.mkdir()
    for f in images[2:]:
        (folder / f"{f.stem}.png").write_bytes(f.jpg)
        (folder / f"{f.stem}.json").write_bytes(f.json)
    got = dict(sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy("error")))
    assert sorted(got) == ["sa_1.png", "sa_2.png", "sa_3.png", "sa_4.png"]
    for f in images:
        assert_example_matches(got[f.stem + ".png"], f)  # RGB PNG bytes kept unchanged


def test_two_images_for_one_annotation(tmp_path):
    images = fakes()
    write_folder(tmp_path, images)
    (tmp_path / "sa_2.png").write_bytes(as_png(images[1]).jpg)
    with pytest.raises(BadRecordError, match="sa_2.png: two images for one annotation file: sa_2.jpg and sa_2.png"):
        list(sa1b_reader.iter_examples(str(tmp_path), BadRecordPolicy("error")))
    policy = BadRecordPolicy("skip")
    assert [k for k, _ in sa1b_reader.iter_examples(str(tmp_path), policy)] == ["sa_1.jpg", "sa_3.jpg"]
    assert policy.report()["skipped"] == {"duplicate_image": 1}


def test_builder_skip_mode_reports_in_metadata(tmp_path):
    """Several bad cases at once, in a tar and a folder: survivors intact, counts in info.metadata."""
    manual = tmp_path / "manual"
    manual.mkdir()
    images = fakes()
    images[1].record["annotations"][1]["segmentation"]["size"] = [32, 25]  # sa_2 annotation 1: wrong size
    images[2].record["annotations"][0]["segmentation"]["counts"] = "0~!"  # sa_3 annotation 0: undecodable
    (manual / TAR).write_bytes(tar_bytes(members(images)))
    folder = fakes(seed=1, ids=(7, 8, 9))
    folder[1].jpg = folder[1].jpg[: len(folder[1].jpg) // 2]  # sa_8: truncated image
    folder[2].record["annotations"] = []  # sa_9: no masks
    write_folder(manual / "extracted", folder)
    (manual / "extracted" / "sa_11.json").write_bytes(b"{")  # corrupt and without its image

    builder = prepare(manual, tmp_path / "data", mode="skip")
    got = read_all(builder)
    assert sorted(got) == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg", "sa_7.jpg"]
    assert_example_matches(got["sa_1.jpg"], images[0])
    assert_example_matches(got["sa_2.jpg"], images[1], kept=[0, 2])
    assert_example_matches(got["sa_3.jpg"], images[2], kept=[1, 2])
    assert_example_matches(got["sa_7.jpg"], folder[0])
    expected = {"mask_size_mismatch": 1, "undecodable_rle": 1, "undecodable_image": 1, "no_masks": 1, "corrupt_json": 1}
    assert builder.info.metadata["bad_records"]["train"]["skipped"] == expected
    reloaded = Sa1b(data_dir=str(tmp_path / "data"))
    assert reloaded.info.metadata["bad_records"]["train"]["skipped"] == expected
    examples = reloaded.info.metadata["bad_records"]["train"]["examples"]
    assert any("extracted/sa_8.jpg" in m for m in examples["undecodable_image"])
    assert any("extracted/sa_11.json" in m for m in examples["corrupt_json"])


def test_builder_error_mode_raises_naming_file_and_record(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    _damaged_manual_dir(manual, "zero_area_mask")
    with pytest.raises(BadRecordError, match=r"sa_000000.tar:sa_2.json annotation 2 \(id 2002\): mask has zero area"):
        prepare(manual, tmp_path / "data", mode="error")
