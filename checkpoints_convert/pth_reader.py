"""Reads PyTorch and safetensors checkpoints as numpy arrays, without importing torch.

Pickles are loaded with an allow-list: the globals a state dict needs resolve to inert
stand-ins, and any other global is refused without being run.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from sam_jax.errors import CheckpointError

# torch dtype name: (numpy dtype, `torch.<X>Storage` class prefix, safetensors code)
_DTYPES = {
    "float64": (np.float64, "Double", "F64"), "float32": (np.float32, "Float", "F32"),
    "float16": (np.float16, "Half", "F16"), "bfloat16": (ml_dtypes.bfloat16, "BFloat16", "BF16"),
    "complex64": (np.complex64, "ComplexFloat", "C64"),
    "complex128": (np.complex128, "ComplexDouble", None),
    "int64": (np.int64, "Long", "I64"), "int32": (np.int32, "Int", "I32"),
    "int16": (np.int16, "Short", "I16"), "int8": (np.int8, "Char", "I8"),
    "uint8": (np.uint8, "Byte", "U8"), "bool": (np.bool_, "Bool", "BOOL"),
    "uint16": (np.uint16, None, "U16"), "uint32": (np.uint32, None, "U32"),
    "uint64": (np.uint64, None, "U64"),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, None, "F8_E4M3"),
    "float8_e5m2": (ml_dtypes.float8_e5m2, None, "F8_E5M2"),
}  # fmt: skip
_SAFETENSORS = {code: np.dtype(dt) for dt, _, code in _DTYPES.values() if code}
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # legacy torch.save's 1st pickle
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, struct.error, EOFError, OSError, ValueError,
               KeyError, RuntimeError, NotImplementedError)  # KeyError: a record is missing


# Stand-ins for what the pickle names. All immutable, so a pickle's BUILD cannot alter them.
class _DType(NamedTuple):  # `torch.FloatStorage`, `torch.uint16`, ...
    value: np.dtype


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class _TensorRef(NamedTuple):
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple
    dtype: np.dtype


def _rebuild_tensor_v3(storage, offset, size, stride, _grad, _hooks, dtype, *_) -> _TensorRef:
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
        raise TypeError("a tensor without a storage record or dtype")
    return _TensorRef(storage, offset, tuple(size), tuple(stride), dtype.value)


def _rebuild_tensor_v2(storage, offset, size, stride, *_) -> _TensorRef:
    return _rebuild_tensor_v3(storage, offset, size, stride, 0, 0, _DType(storage.dtype))


def _rebuild_parameter(data, *_) -> Any:  # also `_rebuild_parameter_with_state`
    return data


_GLOBALS: dict[tuple[str, str], Any] = {
    **{("torch", f"{c}Storage"): _DType(np.dtype(dt)) for dt, c, _ in _DTYPES.values() if c},
    **{("torch", name): _DType(np.dtype(dt)) for name, (dt, _, _) in _DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _DType(np.dtype(np.uint8)),  # with `_rebuild_tensor_v3`
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _error(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {' '.join(problem.split())}")


class _Unpickler(pickle.Unpickler):
    """Resolves only `_GLOBALS`; `persistent_load` records storages without reading them."""

    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            raise _error(self.path, f"refusing disallowed pickle global {module}.{name}")
        return _GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _DType)):  # fmt: skip
            raise _error(self.path, f"unsupported persistent id {str(pid)[:80]}")
        return _Storage(str(pid[2]), pid[1].value, int(pid[4]))

    def load(self) -> Any:
        try:
            return super().load()
        except CheckpointError:
            raise
        except Exception as err:  # a hostile or corrupt pickle can raise almost anything
            raise _error(self.path, f"corrupt pickle ({type(err).__name__}: {err})") from err


def _state_dict(path: str, obj: Any) -> dict[str, _TensorRef]:
    if isinstance(obj, dict):
        wrapped = [k for k in ("model", "state_dict") if isinstance(obj.get(k), dict)]
        obj = obj[wrapped[0]] if len(wrapped) == 1 else obj
    if not isinstance(obj, dict):
        raise _error(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    if not obj:
        raise _error(path, "holds an empty dict: no tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise _error(path, f"entry {key!r} is not a tensor but a {type(value).__name__}")
    return obj


def _to_array(path: str, name: str, t: _TensorRef, raw: bytes, big_endian: bool) -> np.ndarray:
    """Copies the tensor `t` out of its storage's bytes `raw` into a new C-contiguous array."""
    dtype = np.dtype(t.dtype)
    buf = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)
    ints = (t.offset, *t.shape, *t.stride)
    if len(t.shape) != len(t.stride) or not all(isinstance(i, int) and i >= 0 for i in ints):
        raise _error(path, f"tensor {name!r} has an invalid view {t.shape}/{t.stride}+{t.offset}")
    if 0 in t.shape:
        return np.zeros(t.shape, dtype)
    # Bounds check, as as_strided would read past the buffer (a crafted pickle could ask it to).
    if t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) >= buf.size:
        raise _error(path, f"tensor {name!r} of shape {t.shape} runs past the end of its storage")
    unit = dtype.itemsize // (2 if dtype.kind == "c" else 1)
    if big_endian and unit > 1:
        buf = buf.view(f"u{unit}").byteswap().view(dtype)
    strides = tuple(s * dtype.itemsize for s in t.stride)
    return np.array(np.lib.stride_tricks.as_strided(buf[t.offset :], t.shape, strides), order="C")


def _load_zip(path: str) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            pkl = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
            if not pkl:
                raise _error(path, "zip archive without <archive>/data.pkl: not a torch checkpoint")
            prefix = pkl[0][: -len("data.pkl")]
            order = zf.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
            if order not in (b"little", b"big"):
                raise _error(path, f"unknown byteorder record {order[:20]!r}")
            tensors = _state_dict(path, _Unpickler(io.BytesIO(zf.read(pkl[0])), path).load())
            # Each storage is read once and dropped after its last tensor is copied out of it.
            refs = collections.Counter(t.storage.key for t in tensors.values())
            cache: dict[str, bytes] = {}
            out = {}
            for name, t in tensors.items():
                st = t.storage
                if st.key not in cache:
                    cache[st.key] = zf.read(f"{prefix}data/{st.key}")
                    if len(cache[st.key]) < st.numel * st.dtype.itemsize:
                        raise _error(path, f"storage record data/{st.key} is shorter than "
                                     f"its {st.numel} elements")  # fmt: skip
                out[name] = _to_array(path, name, t, cache[st.key], order == b"big")
                refs[st.key] -= 1
                if not refs[st.key]:
                    del cache[st.key]
            return out
    except CheckpointError:
        raise
    except _ZIP_ERRORS as err:
        raise _error(path, f"truncated or corrupt zip ({type(err).__name__}: {err})") from err


def _load_safetensors(path: str, f: io.BufferedReader) -> dict[str, np.ndarray]:
    # Parsed here, as older safetensors.numpy lacks bfloat16: 8-byte length, JSON header, data.
    (n,) = struct.unpack("<Q", f.read(8))
    size = os.fstat(f.fileno()).st_size - 8 - n
    try:
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        specs = {k: (_SAFETENSORS[v["dtype"]], tuple(map(int, v["shape"])),
                     *map(int, v["data_offsets"])) for k, v in header.items()}  # fmt: skip
        if any(len(spec) != 4 for spec in specs.values()):
            raise ValueError("data_offsets is not [start, end]")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _error(path, f"corrupt safetensors header ({type(err).__name__}: {err})") from err
    if not specs:
        raise _error(path, "holds no tensors")
    out = {}
    for key, (dtype, shape, start, end) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or end - start != nbytes or not 0 <= start <= end <= size:
            raise _error(path, f"tensor {key!r} has bad data offsets or the file is truncated")
        buf = bytearray(nbytes)  # read straight into a buffer the array then owns, writable
        f.seek(8 + n + start)
        f.readinto(buf)
        out[key] = np.frombuffer(buf, dtype).reshape(shape)
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint's tensors as numpy arrays: a torch zip `.pth`/`.bin` or a `.safetensors` file.

    The format is told by content. A top-level `{"model": sd}` or `{"state_dict": sd}` is
    unwrapped. Raises `CheckpointError`, one line naming the file, for any unusable file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error(path, "checkpoint file does not exist")
    if os.path.isdir(path):
        raise _error(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if not head:
                raise _error(path, "file is empty")
            if head.startswith(b"PK\x03\x04"):
                return _load_zip(path)
            size = os.fstat(f.fileno()).st_size
            if head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:  # safetensors
                f.seek(0)
                return _load_safetensors(path, f)
    except OSError as err:
        raise _error(path, f"cannot be read ({type(err).__name__}: {err})") from err
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:  # never unpickled: nothing in it runs
        raise _error(path, "is a legacy (non-zip, pre-1.6) torch.save file, which is not "
                     "supported; re-save it with torch: torch.save(torch.load(p), p2)")
    raise _error(path, "is not a checkpoint (neither a torch zip archive nor safetensors)")
