"""Prepares a data set as ArrayRecord files that the input pipeline reads.

  python -m experiments.prepare_data sam_synthetic/small
  python -m experiments.prepare_data sa1b --manual-dir /data/sa1b --on-bad-record skip
  python -m experiments.prepare_data coco_instances --manual-dir /data/coco          # COCO 2017 layout
  python -m experiments.prepare_data coco_instances \\
      --split train=/data/lvis/lvis_v1_train.json:/data/coco --split val=...        # any COCO-format JSON

Preparing encodes images with TensorFlow (pip install tensorflow-cpu); reading
the result does not need it. Prints the splits, their sizes and the bad-record
report (also stored in the data set's metadata.json).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

from sam_jax.data.pipeline import DEFAULT_DATA_DIR



def parse_splits(values: List[str]) -> Dict[str, Tuple[str, str]]:
    """["train=a.json:images/", ...] -> {"train": ("a.json", "images/")}."""
    splits = {}
    for value in values:
        name, sep, paths = value.partition("=")
        json_path, sep2, image_dir = paths.rpartition(":")
        if not (sep and sep2 and name and json_path and image_dir):
            raise ValueError(f"--split {value!r}: expected NAME=ANNOTATIONS.json:IMAGE_DIR")
        splits[name] = (json_path, image_dir)
    return splits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="sam_synthetic[/small|/cpu|/default], sa1b or coco_instances")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"where prepared data go (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--manual-dir", help="the SA-1B tars / folders, or the COCO 2017 root")
    parser.add_argument("--split", action="append", default=[], help="coco_instances: NAME=ANNOTATIONS.json:IMAGE_DIR")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from sam_jax.data import builders

    name = args.dataset.split("/")[0]
    kwargs = {"on_bad_record": args.on_bad_record}
    try:
        if name not in builders.NAMES:
            raise ValueError(f"unknown data set {name!r}; expected one of {builders.NAMES}")
        if args.split:
            if name != "coco_instances":
                raise ValueError("--split is for coco_instances only")
            kwargs["splits"] = parse_splits(args.split)
        if args.manual_dir and not os.path.isdir(args.manual_dir):
            raise ValueError(f"--manual-dir {args.manual_dir} is not a directory")
        builder = tfds.builder(args.dataset, data_dir=args.data_dir, **kwargs)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    except (ValueError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    summary = {
        "dataset": args.dataset,
        "path": str(builder.data_path),
        "splits": {split: info.num_examples for split, info in builder.info.splits.items()},
        "bad_records": builder.info.metadata.get("bad_records", {}) if builder.info.metadata else {},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
