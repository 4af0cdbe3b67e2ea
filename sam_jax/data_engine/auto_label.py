"""The fully automatic stage of the data engine: the mask generator over every image of a data
set, split across processes, SA-1B files out.

The paper's stage-3 settings (Kirillov et al. 2023, appendix B, "Fully automatic stage") as the
preset "sa1b":
  * a 32x32 point grid on the whole image and 20 zoomed-in crops (2x2 and 4x4 overlapping
    windows) with 16x16 and 8x8 grids: crop_n_layers=2, crop_n_points_downscale_factor=2;
    masks touching a crop's inner edge dropped, box NMS 0.7 within each crop (ranked by
    predicted IoU) and across crops (most zoomed-in first): the generator does all of this;
  * confident masks, predicted IoU >= 0.88; stable masks, stability score >= 0.95 between the
    masks thresholded at logits -1 and +1 (stability_score_offset=1);
  * connected components under 100 px removed and holes under 100 px filled
    (min_mask_region_area=100), and, as the paper says, a mask removed entirely when its
    largest component is under 100 px (`MaskFilter.min_area`); masks covering 95% or more
    of the image removed (`MaskFilter.max_area_fraction`).
The generator keeps a mask at predicted IoU exactly 0.88 out (it keeps `> thresh`, as the
official code does), a difference from the paper's wording on a measure-zero set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sam_jax.data import sa1b_writer
from sam_jax.image_io import read_image

STAGE3_SETTINGS = {
    "points_per_side": 32,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 2,
    "crop_nms_thresh": 0.7,
    "crop_n_points_downscale_factor": 2,
    "min_mask_region_area": 100,
}


@dataclasses.dataclass(frozen=True)
class MaskFilter:
    """Filters on the generator's records beyond its own: masks of fewer than `min_area`
    pixels, or covering at least `max_area_fraction` of the image, are dropped."""

    max_area_fraction: Optional[float] = None
    min_area: int = 0

    def __post_init__(self):
        if self.max_area_fraction is not None and not 0 < self.max_area_fraction <= 1:
            raise ValueError(f"max_area_fraction must be in (0, 1]; got {self.max_area_fraction!r}")
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0; got {self.min_area!r}")

    def __call__(self, records: Sequence[dict[str, Any]], height: int, width: int) -> list[dict[str, Any]]:
        limit = np.inf if self.max_area_fraction is None else self.max_area_fraction * height * width
        return [r for r in records if self.min_area <= r["area"] < limit]


PRESETS = {"sa1b": (STAGE3_SETTINGS, MaskFilter(max_area_fraction=0.95, min_area=100))}


def shard(items: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
    """This process's items: every `process_count`-th from `process_index` (balanced when image
    costs drift along the list; each item has one owner, whatever the count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return list(items[process_index::process_count])


@dataclasses.dataclass(frozen=True)
class DatasetImage:
    """One record of a prepared TFDS split (`sam_jax.data.pipeline.open_source`) as an input."""

    source: Any  # random-access: source[index] -> {"image": (H, W, 3) uint8, "image_id", "file_name"}
    label: str  # "tfds:<name>:<split>"
    index: int
    file_name: str

    def __str__(self) -> str:
        return f"{self.label}[{self.index}] {self.file_name}"

    @property
    def stem(self) -> str:
        return Path(self.file_name).stem


def dataset_images(source: Any, names: Any, label: str) -> list[DatasetImage]:
    """The records of a prepared split as inputs, in record order; their file names read from
    `names`, the same split opened without decoding images (listing decodes nothing)."""
    return [DatasetImage(source, label, i, _text(names[i]["file_name"])) for i in range(len(names))]


@dataclasses.dataclass
class LoadedImage:
    """An input's pixels, with what the SA-1B writer needs to store and name them."""

    pixels: np.ndarray  # (H, W, 3) uint8, as the model sees them
    image_id: int
    path: Optional[Path] = None  # the file, when the input is one


def load_input(item: Path | DatasetImage) -> LoadedImage:
    """Reads an input image (ImageError naming it when it cannot be read)."""
    if isinstance(item, DatasetImage):
        record = item.source[item.index]
        return LoadedImage(np.asarray(record["image"], np.uint8), int(record["image_id"]))
    pixels = read_image(item)[0]
    return LoadedImage(pixels, sa1b_writer.stable_image_id(Path(item).read_bytes()), Path(item))


def write_sa1b(records: Sequence[dict[str, Any]], image: LoadedImage, folder: Path, stem: str,
               json_path: Path) -> int:
    """Writes the image as `folder/sa_<stem>.<ext>` and the records (output_mode "coco_rle") as
    an SA-1B JSON at `json_path` (the caller renames it into place); returns the mask count."""
    h, w = image.pixels.shape[:2]
    image_name = sa1b_writer.write_image(folder, stem, source=image.path, pixels=image.pixels)
    annotations = [sa1b_writer.annotation(r, i) for i, r in enumerate(records)]
    record = sa1b_writer.sa1b_record(image.image_id, image_name, h, w, annotations)
    json_path.write_text(sa1b_writer.dumps(record))
    return len(annotations)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
