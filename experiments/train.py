"""Trains SAM with the paper's interactive loop; resumes from its work directory by itself.

    python -m experiments.train                                   # synthetic_cpu -> workdir/synthetic_cpu
    python -m experiments.train --config vit_b --workdir /ckpt/vit_b --set data.dataset=sa1b
    python -m experiments.train --config vit_b --set init_checkpoint=/ckpt/sam_vit_b \\
        --set optimizer.freeze_image_encoder=True                 # fine-tune the decoder only
    python -m experiments.train --config vit_b --set init_checkpoint=/ckpt/sam_vit_b \\
        --set "optimizer.trainable=('mask_decoder/iou_prediction_head',)"   # train only these modules
    python -m experiments.train --config vit_b --set parallelism=pmap   # pmap instead of FSDP jit

Configs: `experiments/train_configs.py`; `--set path=value` overrides any field
of `sam_jax.training.config.TrainConfig`. The run itself is
`sam_jax.training.loop.train_and_evaluate` (what the work directory holds is
described there); this entry point parses the flags and calls it. The
synthetic data set is prepared on first use; SA-1B and COCO data sets are
prepared beforehand with `python -m experiments.prepare_data`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import jax

from experiments.train_configs import get_config
from sam_jax.data.pipeline import DEFAULT_DATA_DIR
from sam_jax.training.loop import TrainingError, train_and_evaluate


def restart_with_huge_pages() -> None:
    """Re-executes this command with glibc's malloc putting large blocks on transparent huge pages.

    XLA's CPU runtime allocates a step's temporary buffers afresh on every call, and glibc serves
    large blocks with mmap, so each call first touches fresh 4 KiB pages: ~15,000 page faults per
    decoder gradient of the interactive loop. With huge pages a synthetic_cpu step is 10-20%
    faster. glibc reads the tunable only at start-up; other C libraries ignore it.
    """
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        os.execv(sys.executable, sys.orig_argv)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic_cpu", help="a name from experiments/train_configs.py")
    parser.add_argument("--workdir", help="default: workdir/<config>")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"prepared data sets (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a config field, e.g. optimizer.total_steps=100 (repeatable)")
    parser.add_argument("--compilation-cache", default=os.path.join("workdir", "jax_cache"),
                        help="persistent XLA compilation cache, so a restarted run does not compile again "
                             "(default workdir/jax_cache; '' turns it off)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compilation_cache))
    try:
        config = get_config(args.config, tuple(args.overrides))
        workdir = Path(args.workdir or os.path.join("workdir", args.config))
        summary = train_and_evaluate(config, workdir, args.data_dir, progress=not args.no_progress)
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
