"""Prepares a data set as ArrayRecord files that the input pipeline reads.

  python -m experiments.prepare_data sam_synthetic/small
  python -m experiments.prepare_data sa1b --manual-dir /data/sa1b --on-bad-record skip
  python -m experiments.prepare_data coco_instances --manual-dir /data/coco          # COCO 2017 layout
  python -m experiments.prepare_data coco_instances \\
      --split train=/data/lvis/lvis_v1_train.json:/data/coco --split val=...        # any COCO-format JSON

On Apache Beam (pip install 'sam_jax[beam]'), sa1b and coco_instances only; the
same records and report as without --beam:

  python -m experiments.prepare_data sa1b --manual-dir /data/sa1b --beam --beam-workers 8   # DirectRunner
  python -m experiments.prepare_data sa1b --manual-dir /shared/sa1b --data-dir /shared/tfds --beam \\
      --beam-runner FlinkRunner --beam-option flink_master=host:8081 --beam-option environment_type=LOOPBACK

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


def beam_options(args, name: str):
    """The Beam PipelineOptions that --beam and its flags ask for; None without --beam."""
    if not args.beam:
        if args.beam_runner or args.beam_workers is not None or args.beam_option:
            raise ValueError("--beam-runner, --beam-workers and --beam-option need --beam")
        return None
    if name not in ("sa1b", "coco_instances"):
        raise ValueError(f"--beam is for sa1b and coco_instances, not {name}")
    if args.beam_workers is not None and args.beam_workers < 1:
        raise ValueError(f"--beam-workers must be at least 1, got {args.beam_workers}")
    try:
        from sam_jax.data.beam_prepare import pipeline_options

        return pipeline_options(args.beam_runner or "DirectRunner", args.beam_workers, args.beam_option)
    except ImportError as e:
        raise ValueError(f"--beam needs Apache Beam ({e}): pip install 'sam_jax[beam]'") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="sam_synthetic[/small|/cpu|/default], sa1b or coco_instances")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"where prepared data go (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--manual-dir", help="the SA-1B tars / folders, or the COCO 2017 root")
    parser.add_argument("--split", action="append", default=[], help="coco_instances: NAME=ANNOTATIONS.json:IMAGE_DIR")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    beam = parser.add_argument_group("Apache Beam (sa1b, coco_instances)")
    beam.add_argument("--beam", action="store_true", help="prepare as an Apache Beam pipeline")
    beam.add_argument("--beam-runner", help="DirectRunner (default), DataflowRunner, FlinkRunner, SparkRunner...")
    beam.add_argument("--beam-workers", type=int, help="DirectRunner: worker processes (default: one per CPU)")
    beam.add_argument("--beam-option", action="append", default=[], metavar="KEY=VALUE",
                      help="a Beam pipeline option, e.g. direct_running_mode=in_memory or project=my-project")
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
        options = beam_options(args, name)
        download_config = tfds.download.DownloadConfig(manual_dir=args.manual_dir, beam_options=options)
        builder = tfds.builder(args.dataset, data_dir=args.data_dir, **kwargs)
        builder.download_and_prepare(download_config=download_config)
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
