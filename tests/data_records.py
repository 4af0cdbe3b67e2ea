"""Records in the builders' layout (`sam_jax.data.features`), made in memory for data tests."""

import numpy as np

from sam_jax.data import rle
from sam_jax.data.masks import farthest_from_boundary


def mask_to_box_xyxy(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 tight XYXY boxes (x1, y1 exclusive); zeros if empty."""
    n = masks.shape[0]
    boxes = np.zeros((n, 4), np.float32)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(n):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def make_record(h, w, rects, image=None, iscrowd=None, image_id=7):
    """A record in the builders' layout with rectangular masks (x0, y0, x1, y1), x1/y1 exclusive."""
    masks = np.zeros((len(rects), h, w), bool)
    for m, (x0, y0, x1, y1) in zip(masks, rects):
        m[y0:y1, x0:x1] = True
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    record = {
        "image": image,
        "image_id": image_id,
        "file_name": b"test.png",
        "masks": {
            "counts": [rle.encode(m) for m in masks],
            "area": masks.sum(axis=(1, 2)).astype(np.int64),
            "point": np.stack([farthest_from_boundary(m) for m in masks]) if len(rects) else np.zeros((0, 2), np.float32),
            "bbox": np.array([[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in rects], np.float32).reshape(-1, 4),
            "id": np.arange(len(rects), dtype=np.int64),
        },
    }
    if iscrowd is not None:
        record["masks"]["iscrowd"] = np.asarray(iscrowd, np.int64)
    return record, masks


def make_source(num_records: int, seed: int = 0) -> list:
    """A list of records (a valid grain / pipeline source): varied sizes, 1-6 rectangles each."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_records):
        h, w = (int(v) for v in rng.integers(24, 80, size=2))
        rects = []
        for _ in range(int(rng.integers(1, 7))):
            x0, y0 = int(rng.integers(0, w - 6)), int(rng.integers(0, h - 6))
            rects.append((x0, y0, int(rng.integers(x0 + 3, min(w, x0 + 30) + 1)), int(rng.integers(y0 + 3, min(h, y0 + 30) + 1))))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        records.append(make_record(h, w, rects, image=image, image_id=i)[0])
    return records
