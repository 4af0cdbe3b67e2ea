"""Tests for checkpoints_convert.pth_reader: torch-free reading of .pth and .safetensors files."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from checkpoints_convert import pth_reader
from checkpoints_convert.pth_reader import load_state_dict
from sam_jax.errors import CheckpointError

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]


def _np(t: torch.Tensor) -> np.ndarray:
    """The reference numpy array for a tensor (bfloat16 via its bits)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_same(out: dict[str, np.ndarray], sd: dict, ordered: bool = True) -> None:
    assert list(out) == list(sd) if ordered else sorted(out) == sorted(sd)
    for key, t in sd.items():
        ref = _np(t)
        assert out[key].dtype == ref.dtype, key
        assert out[key].shape == ref.shape, key
        assert out[key].tobytes() == ref.tobytes(), key  # exact, bit for bit
        assert out[key].flags.c_contiguous and out[key].flags.writeable, key


def _sample() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (4, 2), generator=g),
        "bool": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),  # non-contiguous
        "sliced": base[1:4, 2:5],  # storage offset, non-contiguous; shares base's storage
        "base": base,
        "row": base[2],  # a third view of the same storage
        "expanded": torch.randn(1, 4, generator=g).expand(3, 4),  # stride 0
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copies a zip, passing each record through edit(name, data) -> data, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def _write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", b"little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)


def _raises(path: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# --- round trips ---------------------------------------------------------------------------


def test_round_trip_torch_zip(tmp_path):
    sd = _sample()
    torch.save(sd, tmp_path / "a.pth")
    _assert_same(load_state_dict(tmp_path / "a.pth"), sd)
    _assert_same(load_state_dict(str(tmp_path / "a.pth")), sd)


def test_other_dtypes(tmp_path):
    sd = {
        "f64": torch.randn(3, dtype=torch.float64),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "c64": torch.randn(3, dtype=torch.complex64),
        "u16": torch.arange(6).to(torch.uint16),  # written as UntypedStorage + _rebuild_tensor_v3
    }
    torch.save(sd, tmp_path / "a.pth")
    _assert_same(load_state_dict(tmp_path / "a.pth"), sd)


def test_shared_storage_is_read_once(tmp_path, monkeypatch):
    base = torch.arange(24, dtype=torch.float32)
    sd = {"a": base.view(4, 6), "b": base[6:12], "c": base.view(6, 4).t()}
    torch.save(sd, tmp_path / "a.pth")
    reads = collections.Counter()
    original = zipfile.ZipFile.read

    def counting_read(self, name, *args):
        reads[name if isinstance(name, str) else name.filename] += 1
        return original(self, name, *args)

    monkeypatch.setattr(zipfile.ZipFile, "read", counting_read)
    out = load_state_dict(tmp_path / "a.pth")
    _assert_same(out, sd)
    assert [n for n in reads if "/data/" in n] == ["a/data/0"] and reads["a/data/0"] == 1
    out["a"][0, 0] = 99  # each array owns its memory
    assert out["b"][0] == 6


def test_module_state_dict_ordered_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = model.state_dict()  # an OrderedDict with `_metadata`; int64 num_batches_tracked
    assert isinstance(sd, collections.OrderedDict)
    torch.save(sd, tmp_path / "a.pth")
    _assert_same(load_state_dict(tmp_path / "a.pth"), sd)


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_wrapper_is_unwrapped(tmp_path, key):
    sd = _sample()
    torch.save({key: sd, "epoch": 3}, tmp_path / "a.pth")
    _assert_same(load_state_dict(tmp_path / "a.pth"), sd)


def test_big_endian_byteorder_record(tmp_path):
    sd = {"f32": torch.randn(3, 2), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(-2, 2),
          "c64": torch.randn(2, dtype=torch.complex64), "bool": torch.tensor([True, False])}
    unit = {"0": 4, "1": 2, "2": 8, "3": 4, "4": 1}  # storage key -> size of a swapped unit
    torch.save(sd, tmp_path / "a.pth")

    def to_big(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, f"u{unit[name.rsplit('/', 1)[1]]}").byteswap().tobytes()
        return data

    _rewrite_zip(tmp_path / "a.pth", tmp_path / "big.pth", to_big)
    _assert_same(load_state_dict(tmp_path / "big.pth"), sd)


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in _sample().items()}
    del sd["row"], sd["sliced"], sd["expanded"]  # save_file refuses shared storage
    sd["transposed"] = sd["transposed"].clone()
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt"})
    _assert_same(load_state_dict(tmp_path / "a.safetensors"), sd, ordered=False)  # file's order


def test_safetensors_hand_written_bf16(tmp_path):
    # Written by hand, so reading bfloat16 does not depend on the safetensors version.
    w = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    b = np.array([True, False])
    header = {"__metadata__": {"format": "np"},
              "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
              "b": {"dtype": "BOOL", "shape": [2], "data_offsets": [12, 14]}}  # fmt: skip
    blob = json.dumps(header).encode()
    data = len(blob).to_bytes(8, "little") + blob + w.tobytes() + b.tobytes()
    (tmp_path / "a.st").write_bytes(data)
    out = load_state_dict(tmp_path / "a.st")
    assert out["w"].dtype == ml_dtypes.bfloat16 and out["w"].shape == (2, 3)
    assert out["w"].tobytes() == w.tobytes() and out["b"].tolist() == [True, False]


def test_does_not_import_torch(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pth")
    code = (
        "import sys; from checkpoints_convert.pth_reader import load_state_dict; "
        f"assert load_state_dict({str(tmp_path / 'a.pth')!r})['w'].sum() == 2; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- errors --------------------------------------------------------------------------------


def test_missing_directory_empty(tmp_path):
    _raises(tmp_path / "nope.pth", "does not exist")
    _raises(tmp_path, "is a directory")
    (tmp_path / "empty.pth").write_bytes(b"")
    _raises(tmp_path / "empty.pth", "empty")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "a.txt").write_text("hello, this is not a checkpoint\n" * 10)
    _raises(tmp_path / "a.txt", "not a checkpoint")
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    _raises(tmp_path / "a.jpg", "not a checkpoint")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    _raises(tmp_path / "other.zip", "data.pkl")


def test_truncated_zip(tmp_path):
    torch.save(_sample(), tmp_path / "a.pth")
    data = (tmp_path / "a.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    err = _raises(tmp_path / "half.pth", "truncated or corrupt zip")
    assert isinstance(err.__cause__, zipfile.BadZipFile)


def test_corrupt_storage_bytes_fail_crc(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "a.pth")
    data = bytearray((tmp_path / "a.pth").read_bytes())
    data[data.index(bytes(400)) + 200] ^= 0xFF  # flip a byte inside the zero storage
    (tmp_path / "bad.pth").write_bytes(bytes(data))
    _raises(tmp_path / "bad.pth", "corrupt zip", "CRC")


def test_short_or_missing_storage_record(tmp_path):
    torch.save({"w": torch.randn(10)}, tmp_path / "a.pth")
    _rewrite_zip(tmp_path / "a.pth", tmp_path / "short.pth",
                 lambda name, data: data[:-4] if name.endswith("/data/0") else data)
    _raises(tmp_path / "short.pth", "data/0", "shorter")
    _rewrite_zip(tmp_path / "a.pth", tmp_path / "missing.pth",
                 lambda name, data: None if name.endswith("/data/0") else data)
    _raises(tmp_path / "missing.pth", "data/0", "KeyError")


def test_missing_data_pkl(tmp_path):
    torch.save({"w": torch.randn(10)}, tmp_path / "a.pth")
    _rewrite_zip(tmp_path / "a.pth", tmp_path / "b.pth",
                 lambda name, data: None if name.endswith("data.pkl") else data)
    _raises(tmp_path / "b.pth", "data.pkl")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_disallowed_global_via_torch_save(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, tmp_path / "evil.pth")
    _raises(tmp_path / "evil.pth", "disallowed pickle global", f"{os.system.__module__}.system")
    assert not marker.exists()


def test_disallowed_global_hand_written(tmp_path):
    marker = tmp_path / "pwned"
    _write_torch_zip(tmp_path / "evil.pth", pickle.dumps(_Evil(marker), protocol=2), {})
    _raises(tmp_path / "evil.pth", "disallowed pickle global", "system")
    builtins_eval = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    _write_torch_zip(tmp_path / "eval.pth", builtins_eval, {})
    _raises(tmp_path / "eval.pth", "disallowed pickle global builtins.eval")
    # A bare pickle (no zip, no torch magic) is refused without being unpickled at all.
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    _raises(tmp_path / "evil.pkl", "not a checkpoint")
    assert not marker.exists()


def test_pickle_cannot_mutate_allowed_globals(tmp_path):
    before = pth_reader._GLOBALS["torch", "FloatStorage"]
    build = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00valueK\x01sb."  # BUILD on it
    _write_torch_zip(tmp_path / "a.pth", build, {})
    _raises(tmp_path / "a.pth", "corrupt pickle")
    assert pth_reader._GLOBALS["torch", "FloatStorage"] is before
    assert before.value == np.float32


def test_out_of_bounds_view_is_refused(tmp_path):
    class FakeTensor:
        def __init__(self, *args):
            self.args = args

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None

    storage = ("storage", torch.FloatStorage, "0", "cpu", 4)
    for name, args in [("far", (storage, 1000, (2,), (1,), False, collections.OrderedDict())),
                       ("wide", (storage, 0, (3,), (2,), False, collections.OrderedDict())),
                       ("neg", (storage, 0, (2,), (-1,), False, collections.OrderedDict()))]:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump({"w": FakeTensor(*args)})
        _write_torch_zip(tmp_path / f"{name}.pth", buf.getvalue(), {"0": bytes(16)})
        _raises(tmp_path / f"{name}.pth", "'w'")
    # The same hand-made file with a valid view reads fine.
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": FakeTensor(storage, 1, (3,), (1,), False, {})})
    four = np.arange(4, dtype="<f4").tobytes()
    _write_torch_zip(tmp_path / "ok.pth", buf.getvalue(), {"0": four})
    assert load_state_dict(tmp_path / "ok.pth")["w"].tolist() == [1.0, 2.0, 3.0]


def test_legacy_format_is_refused_with_advice(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    _raises(tmp_path / "old.pth", "legacy", "torch.save(torch.load(p), p2)")


def test_bad_contents(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "int.pth")
    _raises(tmp_path / "int.pth", "'step'", "not a tensor")
    torch.save({"w": torch.ones(2), "name": "vit_h"}, tmp_path / "str.pth")
    _raises(tmp_path / "str.pth", "'name'", "not a tensor")
    torch.save({}, tmp_path / "empty.pth")
    _raises(tmp_path / "empty.pth", "empty dict")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    _raises(tmp_path / "list.pth", "list")
    sd = {"w": torch.ones(2)}
    torch.save({"model": sd, "state_dict": sd}, tmp_path / "both.pth")  # ambiguous: not unwrapped
    _raises(tmp_path / "both.pth", "'model'")
    torch.save({"model": {"w": torch.ones(2), "n": 1}}, tmp_path / "nested.pth")
    _raises(tmp_path / "nested.pth", "'n'")


def test_bad_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((4, 4), np.float32)}, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    _raises(tmp_path / "cut.safetensors", "'w'", "truncated")
    header_len = int.from_bytes(data[:8], "little")
    broken = data[:8] + b"{" + b"x" * (header_len - 1) + data[8 + header_len :]
    (tmp_path / "header.safetensors").write_bytes(broken)
    _raises(tmp_path / "header.safetensors", "corrupt safetensors header")
    for spec, fragment in [
        ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64, 1]}, "corrupt safetensors"),
        ({"dtype": "Q7", "shape": [4, 4], "data_offsets": [0, 64]}, "corrupt safetensors"),
        ({"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}, "'w' has bad data offsets"),
    ]:
        blob = json.dumps({"w": spec}).encode()
        data = len(blob).to_bytes(8, "little") + blob + bytes(64)
        (tmp_path / "spec.safetensors").write_bytes(data)
        _raises(tmp_path / "spec.safetensors", fragment)
