"""`sam-jax amg`: automatic mask generation, the official scripts/amg.py on sam_jax.

Output, as the official script writes it, per input image `<stem>`:
  OUTPUT/<stem>/0.png, 1.png, ...   one 8-bit mask per record (255 inside), image-sized
  OUTPUT/<stem>/metadata.csv        id,area,bbox_x0,...,crop_box_h: one row per PNG
or with --convert-to-rle:
  OUTPUT/<stem>.json                the records as a JSON list, segmentation in COCO RLE
The generator options are the official script's; those not given keep the
generator's defaults. Differences: --checkpoint is a converted sam_jax
folder and --model-type only checks it; there is no --device (JAX picks the
accelerator); --crop-overlap-ratio takes a fraction (the official script
declares it an int, so it cannot set the default 512/1500).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator, crop_boxes
from sam_jax.cli import common
from sam_jax.image_io import read_image
from sam_jax.weights import load_sam

METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
                   "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
METADATA_FILE = "metadata.csv"

# flag: (type, help), in the official script's order and words; the flag names the generator argument
AMG_SETTINGS = {
    "--points-per-side": (
        common.positive_int,
        "Generate masks by sampling a grid over the image with this many points to a side."),
    "--points-per-batch": (
        common.positive_int, "How many input points to process simultaneously in one batch."),
    "--pred-iou-thresh": (
        common.any_float,
        "Exclude masks with a predicted score from the model that is lower than this threshold."),
    "--stability-score-thresh": (common.any_float,
                                 "Exclude masks with a stability score lower than this threshold."),
    "--stability-score-offset": (common.non_negative_float,
                                 "Larger values perturb the mask more when measuring stability score."),
    "--box-nms-thresh": (common.unit_float, "The overlap threshold for excluding a duplicate mask."),
    "--crop-n-layers": (common.non_negative_int,
                        "If >0, mask generation is run on smaller crops of the image to generate more masks. "
                        "The value sets how many different scales to crop at."),
    "--crop-nms-thresh": (common.unit_float,
                          "The overlap threshold for excluding duplicate masks across different crops."),
    "--crop-overlap-ratio": (common.overlap_ratio,
                             "Larger numbers mean image crops will overlap more (a fraction of the image's "
                             "short side; generator default 512/1500)."),
    "--crop-n-points-downscale-factor": (common.positive_int,
                                         "The number of points-per-side in each layer of crop is reduced by "
                                         "this factor."),
    "--min-mask-region-area": (common.non_negative_int,
                               "Disconnected mask regions or holes with area smaller than this value "
                               "in pixels are removed by postprocessing."),
}


def add_parser(subparsers) -> None:
    parser = common.add_command(subparsers, "amg", "automatic mask generation (the official scripts/amg.py)",
                                __doc__)
    parser.add_argument("--convert-to-rle", action="store_true",
                        help="Save masks as COCO RLEs in a single json instead of as a folder of PNGs.")
    settings = parser.add_argument_group("AMG Settings")
    for flag, (kind, text) in AMG_SETTINGS.items():
        settings.add_argument(flag, type=kind, default=None, help=text)
    parser.set_defaults(run=run)


def amg_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generator options given on the command line (the official `get_amg_kwargs`)."""
    names = [flag[2:].replace("-", "_") for flag in AMG_SETTINGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    images, single = common.resolve_inputs(args.input)
    rle = args.convert_to_rle

    def load(metadata: dict) -> SamAutomaticMaskGenerator:
        return SamAutomaticMaskGenerator(
            *load_sam(args.checkpoint), output_mode="coco_rle" if rle else "binary_mask", **amg_kwargs(args))

    def prepare(source: Path) -> np.ndarray:
        """Reads the image and checks that the crop layers fit it (a ValueError names the image)."""
        image = read_image(source)[0]
        crops = {k: v for k, v in amg_kwargs(args).items() if k in ("crop_n_layers", "crop_overlap_ratio")}
        try:
            crop_boxes(image.shape[:2], **crops)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        return image

    def process(source: Path, image: np.ndarray, output: Path, generator: SamAutomaticMaskGenerator) -> None:
        records = generator.generate(image)
        if rle:
            output.write_text(json.dumps(records, default=_json_value))
        else:
            write_masks_to_folder(records, output)

    return common.run_images(
        args, images, single, suffix=".json" if rle else "", kind="file" if rle else "dir",
        is_complete=Path.is_file if rle else (lambda p: (p / METADATA_FILE).is_file()),
        prepare=prepare, load=load, process=process, desc="amg")


def _python(value: Any) -> Any:
    """numpy scalars -> Python numbers (what the official records hold, via torch's .item())."""
    return value.item() if isinstance(value, np.generic) else value


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_masks_to_folder(masks: list[dict[str, Any]], path: Path) -> None:
    """The official `write_masks_to_folder`: i.png per mask and metadata.csv (no trailing newline)."""
    metadata = [METADATA_HEADER]
    for i, mask_data in enumerate(masks):
        mask = np.asarray(mask_data["segmentation"], bool)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path / f"{i}.png")
        row = [
            str(i),
            str(_python(mask_data["area"])),
            *[str(_python(x)) for x in mask_data["bbox"]],
            *[str(_python(x)) for x in mask_data["point_coords"][0]],
            str(_python(mask_data["predicted_iou"])),
            str(_python(mask_data["stability_score"])),
            *[str(_python(x)) for x in mask_data["crop_box"]],
        ]
        metadata.append(",".join(row))
    (path / METADATA_FILE).write_text("\n".join(metadata))
