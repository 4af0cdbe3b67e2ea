"""A data set record (`sam_jax.data.features`) at its original resolution, for evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import numpy as np

from sam_jax.data import rle


@dataclasses.dataclass
class Instances:
    """One image and its N ground-truth masks, in the image's own pixels."""

    image: np.ndarray  # (H, W, 3) uint8
    image_id: int
    file_name: str
    masks: np.ndarray  # (N, H, W) bool
    boxes: np.ndarray  # (N, 4) float32 XYWH
    ids: np.ndarray  # (N,) int64 annotation ids
    category_ids: np.ndarray  # (N,) int64; 1 where the data set has no categories
    iscrowd: np.ndarray  # (N,) bool; COCO crowd regions are not prompted, only matched

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def read_instances(record: Dict[str, Any]) -> Instances:
    """A decoded record (`open_source(...)[i]`) -> Instances."""
    image = np.asarray(record["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"record image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    masks = record["masks"]
    n = len(masks["counts"])
    name = record.get("file_name", b"")
    return Instances(
        image=image,
        image_id=int(record["image_id"]),
        file_name=name.decode() if isinstance(name, bytes) else str(name),
        masks=rle.decode_many(list(masks["counts"]), image.shape[:2]),
        boxes=np.asarray(masks["bbox"], np.float32).reshape(n, 4),
        ids=np.asarray(masks["id"], np.int64).reshape(n),
        category_ids=np.asarray(masks["category_id"], np.int64).reshape(n) if "category_id" in masks
        else np.ones(n, np.int64),
        iscrowd=np.asarray(masks["iscrowd"], bool).reshape(n) if "iscrowd" in masks else np.zeros(n, bool),
    )
