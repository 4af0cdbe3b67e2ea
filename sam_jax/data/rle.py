"""COCO compressed RLE: validation before pycocotools sees it, encode, decode.

pycocotools trusts its input: a counts string whose runs do not add up to
h * w makes it read or write past the mask. Every RLE that comes from a file
is therefore parsed and checked here first (`check_counts`).
"""

from typing import Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from sam_jax.data.bad_records import BadRecordError


def parse_counts(counts) -> np.ndarray:
    """Run lengths of a COCO compressed counts string (maskApi.c rleFrString), vectorised.

    Each run is a little-endian base-32 number, 5 bits per character offset by
    48, bit 0x20 meaning "more characters follow" and bit 0x10 of the last
    character the sign; runs from the fourth on are deltas against the run two
    back. Returns int64 (R,) run lengths, alternating background / foreground
    and starting with background. Raises ValueError on characters outside the
    alphabet or an unterminated number.
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("counts string has non-ASCII characters") from None
    c = np.frombuffer(bytes(counts), np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros((0,), np.int64)
    bad = np.flatnonzero((c < 0) | (c >= 64))
    if bad.size:
        p = int(bad[0])
        raise ValueError(f"character {chr(counts[p])!r} at position {p} is not in the RLE alphabet")
    last = (c & 0x20) == 0  # the character that ends its number
    if not last[-1]:
        raise ValueError("counts string ends inside a run length")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    number = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = 5 * (np.arange(c.size) - starts[number])
    if shift.max() > 55:
        raise ValueError("counts string has a run length longer than 12 characters")
    values = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (shift[ends[negative]] + 5)
    runs = np.empty_like(values)
    runs[:1] = values[:1]
    runs[2::2] = np.cumsum(values[2::2])
    runs[1::2] = np.cumsum(values[1::2])
    return runs


def check_counts(counts, size: Sequence[int], where: str) -> int:
    """Checks a compressed RLE against its mask size; returns its area.

    Raises BadRecordError (naming `where`) when the string is malformed, a run
    is negative, or the runs do not cover exactly h * w pixels.
    """
    h, w = int(size[0]), int(size[1])
    try:
        runs = parse_counts(counts)
    except ValueError as e:
        raise BadRecordError("undecodable_rle", where, f"undecodable RLE: {e}") from None
    if (runs < 0).any():
        raise BadRecordError("undecodable_rle", where, "undecodable RLE: negative run length")
    if int(runs.sum()) != h * w:
        raise BadRecordError(
            "undecodable_rle", where, f"undecodable RLE: runs cover {int(runs.sum())} pixels, mask size {h}x{w} has {h * w}"
        )
    return int(runs[1::2].sum())


def encode(mask: np.ndarray) -> bytes:
    """(H, W) bool mask -> COCO compressed counts bytes."""
    return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"]


def decode(counts, size: Tuple[int, int]) -> np.ndarray:
    """Compressed counts (already checked) at size (h, w) -> (h, w) bool mask."""
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return decode_many([counts], size)[0]


def decode_many(counts: Sequence[bytes], size: Tuple[int, int]) -> np.ndarray:
    """N compressed counts at one size -> (N, h, w) bool masks."""
    h, w = int(size[0]), int(size[1])
    if len(counts) == 0:
        return np.zeros((0, h, w), bool)
    rles = [{"size": [h, w], "counts": c if isinstance(c, bytes) else c.encode("ascii")} for c in counts]
    return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)


def decode_columns(counts, size: Tuple[int, int], x0: int, x1: int) -> np.ndarray:
    """Columns [x0, x1) of a checked compressed RLE, (x1 - x0, h) uint8 0/1 (column-major, transposed).

    Touches only the runs that cross those columns, so a small mask of a large
    image costs its box, not the image.
    """
    h = int(size[0])
    runs = parse_counts(counts)
    ends = np.cumsum(runs)
    starts = ends - runs
    a, b = x0 * h, x1 * h
    first, last = np.searchsorted(ends, a, side="right"), np.searchsorted(starts, b, side="left")
    lengths = np.minimum(ends[first:last], b) - np.maximum(starts[first:last], a)
    values = (np.arange(first, last) % 2).astype(np.uint8)  # odd runs are foreground
    return np.repeat(values, lengths).reshape(x1 - x0, h)


def boxes_xywh(counts: Sequence[bytes], size: Tuple[int, int]) -> np.ndarray:
    """Tight XYWH boxes of N compressed RLEs, (N, 4) float32, without decoding."""
    if len(counts) == 0:
        return np.zeros((0, 4), np.float32)
    h, w = int(size[0]), int(size[1])
    rles = [{"size": [h, w], "counts": c if isinstance(c, bytes) else c.encode("ascii")} for c in counts]
    return mask_utils.toBbox(rles).astype(np.float32).reshape(-1, 4)
