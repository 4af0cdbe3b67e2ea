"""`sam-jax amg`: automatic mask generation, the official scripts/amg.py on sam_jax.

Output, as the official script writes it, per input image `<stem>`:
  OUTPUT/<stem>/0.png, 1.png, ...   one 8-bit mask per record (255 inside), image-sized
  OUTPUT/<stem>/metadata.csv        id,area,bbox_x0,...,crop_box_h: one row per PNG
or with --convert-to-rle:
  OUTPUT/<stem>.json                the records as a JSON list, segmentation in COCO RLE
or with --sa1b (the data engine's fully automatic stage):
  OUTPUT/sa_<stem>.json             SA-1B's layout: {"image": {image_id, width, height,
                                    file_name}, "annotations": [records with an "id"]}
  OUTPUT/sa_<stem>.jpg (or .png)    the image (linked or copied; a lossless PNG when the
                                    file's own bytes are not the pixels the model saw)
  so that `python -m experiments.prepare_data sa1b --manual-dir OUTPUT` prepares it for
  training. --preset sa1b sets the paper's stage-3 generator settings and filters (32x32
  grid, two crop layers, IoU >= 0.88, stability >= 0.95, no masks under 100 px or over 95%
  of the image); options given explicitly override it.
--input may also name a prepared data set split, tfds:NAME:SPLIT (read from --data-dir).
Many processes: each takes every N-th input (N processes) and writes into the one
--output; start every process with the same arguments plus --coordinator-address,
--num-processes and --process-id (or --distributed on a cluster JAX detects: TPU pods,
SLURM). The run is resumable, and two runs over one --output do not corrupt it.
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
from sam_jax.data import sa1b_writer
from sam_jax.data.pipeline import DEFAULT_DATA_DIR, open_source
from sam_jax.data_engine.auto_label import (
    PRESETS, LoadedImage, MaskFilter, dataset_images, load_input, shard, write_sa1b)
from sam_jax.weights import load_sam

TFDS_PREFIX = "tfds:"

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
    output_format = parser.add_mutually_exclusive_group()
    output_format.add_argument("--convert-to-rle", action="store_true",
                               help="Save masks as COCO RLEs in a single json instead of as a folder of PNGs.")
    output_format.add_argument("--sa1b", action="store_true",
                               help="Save each image and its masks as an SA-1B pair: sa_<stem>.json + the image.")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="sa1b: the paper's stage-3 settings and filters (explicit options override them)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"where --input tfds:NAME:SPLIT is prepared (default {DEFAULT_DATA_DIR})")
    settings = parser.add_argument_group("AMG Settings")
    for flag, (kind, text) in AMG_SETTINGS.items():
        settings.add_argument(flag, type=kind, default=None, help=text)
    settings.add_argument("--max-area-fraction", type=common.fraction, default=None,
                          help="Exclude masks covering at least this fraction of the image (sam_jax; preset sa1b: 0.95).")
    settings.add_argument("--min-area", type=common.non_negative_int, default=None,
                          help="Exclude masks of fewer pixels, after postprocessing (sam_jax; preset sa1b: 100).")
    processes = parser.add_argument_group("Many processes (jax.distributed)")
    processes.add_argument("--distributed", action="store_true",
                           help="join the processes of a cluster JAX detects (TPU pod, SLURM, ...)")
    processes.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    processes.add_argument("--num-processes", type=common.positive_int)
    processes.add_argument("--process-id", type=common.non_negative_int)
    parser.set_defaults(run=run)


def amg_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generator options: the preset's, overridden by those on the command line (the
    official `get_amg_kwargs`)."""
    names = [flag[2:].replace("-", "_") for flag in AMG_SETTINGS]
    preset = PRESETS[args.preset][0] if args.preset else {}
    return {**preset, **{name: getattr(args, name) for name in names if getattr(args, name) is not None}}


def mask_filter(args: argparse.Namespace) -> MaskFilter:
    preset = PRESETS[args.preset][1] if args.preset else MaskFilter()
    return MaskFilter(
        preset.max_area_fraction if args.max_area_fraction is None else args.max_area_fraction,
        preset.min_area if args.min_area is None else args.min_area)


def run(args: argparse.Namespace) -> int:
    inputs, single = resolve_inputs(args)
    process_index, process_count = join_processes(args)
    inputs = shard(inputs, process_index, process_count)
    if process_count > 1:
        common.note(f"process {process_index} of {process_count}: {len(inputs)} input(s) of this process")
    mode = "sa1b" if args.sa1b else "rle" if args.convert_to_rle else "png"
    suffix, prefix, kind = {"png": ("", "", "dir"), "rle": (".json", "", "file"),
                            "sa1b": (".json", sa1b_writer.PREFIX, "file")}[mode]
    keep = mask_filter(args)
    output_dir = Path(args.output)

    def load(metadata: dict) -> SamAutomaticMaskGenerator:
        return SamAutomaticMaskGenerator(*load_sam(args.checkpoint),
                                         output_mode="binary_mask" if mode == "png" else "coco_rle",
                                         **amg_kwargs(args))

    def prepare(source) -> LoadedImage:
        """Reads the image and checks that the crop layers fit it (a ValueError names the image)."""
        image = load_input(source)
        crops = {k: v for k, v in amg_kwargs(args).items() if k in ("crop_n_layers", "crop_overlap_ratio")}
        try:
            crop_boxes(image.pixels.shape[:2], **crops)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        return image

    def process(source, image: LoadedImage, output: Path, generator: SamAutomaticMaskGenerator) -> None:
        records = keep(generator.generate(image.pixels), *image.pixels.shape[:2])
        if mode == "sa1b":
            write_sa1b(records, image, output_dir, source.stem, output)
        elif mode == "rle":
            output.write_text(json.dumps(sa1b_writer.plain(records)))
        else:
            write_masks_to_folder(records, output)

    return common.run_images(
        args, common.make_jobs(inputs, args.output, suffix, prefix), single, kind=kind,
        is_complete=Path.is_file if kind == "file" else (lambda p: (p / METADATA_FILE).is_file()),
        prepare=prepare, load=load, process=process, desc="amg")


def resolve_inputs(args: argparse.Namespace) -> tuple[list, bool]:
    """(inputs, whether --input named a single image): image Paths, or a split's records."""
    if not args.input.startswith(TFDS_PREFIX):
        return common.resolve_inputs(args.input)
    name, sep, split = args.input[len(TFDS_PREFIX):].rpartition(":")
    if not (sep and name and split):
        raise common.UsageError(f"--input {args.input}: expected {TFDS_PREFIX}NAME:SPLIT, e.g. "
                                f"{TFDS_PREFIX}sam_synthetic/small:validation")
    import tensorflow_datasets as tfds

    try:
        source = open_source(name, split, args.data_dir)
        names = open_source(name, split, args.data_dir, decoders={"image": tfds.decode.SkipDecoding()})
    except (ValueError, FileNotFoundError) as err:
        raise common.UsageError(f"--input {args.input}: {err}") from None
    images = dataset_images(source, names, args.input)
    if not images:
        raise common.UsageError(f"--input {args.input}: the split holds no records")
    return images, False


def join_processes(args: argparse.Namespace) -> tuple[int, int]:
    """(this process's index, the process count), after `jax.distributed.initialize` when asked."""
    explicit = {"--coordinator-address": args.coordinator_address, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    given = [flag for flag, value in explicit.items() if value is not None]
    if not given and not args.distributed:
        return 0, 1
    import jax

    if given:
        if len(given) < 3:
            missing = sorted(set(explicit) - set(given))
            raise common.UsageError(f"{', '.join(given)} also needs {', '.join(missing)}")
        if args.process_id >= args.num_processes:
            raise common.UsageError(f"--process-id {args.process_id} is not below --num-processes {args.num_processes}")
        kwargs = {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes,
                  "process_id": args.process_id}
    else:
        kwargs = {}
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:
        where = args.coordinator_address or "the cluster's coordinator"
        raise common.UsageError(f"cannot join the processes at {where}: {' '.join(str(err).split())}") from None
    return jax.process_index(), jax.process_count()


def _python(value: Any) -> Any:
    """numpy scalars -> Python numbers (what the official records hold, via torch's .item())."""
    return value.item() if isinstance(value, np.generic) else value


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
