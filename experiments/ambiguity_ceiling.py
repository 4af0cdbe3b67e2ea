"""How well could any model do at 1 click? The ambiguity ceiling of a data split, measured.

    python -m experiments.ambiguity_ceiling                         # sam_synthetic/cpu validation, 50 images
    python -m experiments.ambiguity_ceiling --dataset sa1b --num-images 200

For every ground-truth mask the point protocol's first click is placed (the
pixel farthest from the mask's boundary, `sam_jax.evaluation.clicks`). A click
inside several masks (a part inside its object) is ambiguous: no model can
know which one was meant. The ceiling answers each click with the smallest
ground-truth mask that contains it (the most specific reading) and scores it
against the mask the click was placed for, exactly as the protocol scores a
prediction. Prints and writes (`--output`) JSON: the ceiling mIoU, the share
of clicks inside more than one mask, and both by mask size. Needs no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from sam_jax.data.pipeline import DEFAULT_DATA_DIR, open_source
from sam_jax.evaluation.clicks import next_click
from sam_jax.evaluation.instances import Instances, read_instances
from sam_jax.evaluation.point_protocol import SIZE_BINS, size_bin

def image_ceiling(instances: Instances) -> List[Dict[str, Any]]:
    """Per non-crowd mask: its size bin, the number of masks its first click lies in, and the IoU
    of the smallest of them with it."""
    masks = np.asarray(instances.masks, bool)
    prompted = np.flatnonzero(~np.asarray(instances.iscrowd, bool))
    areas = masks.reshape(len(masks), -1).sum(1)
    h, w = instances.size
    out = []
    for k in prompted:
        x, y, _, placed = next_click(masks[k], np.zeros_like(masks[k]))
        containing = [j for j in range(len(masks)) if masks[j, y, x]] if placed else []
        if not containing:  # an empty mask: no click, the protocol scores it 0 as well
            out.append({"bin": size_bin(areas[k] / (h * w)), "masks_at_click": 0, "iou": 0.0})
            continue
        best = min(containing, key=lambda j: areas[j])
        inter = np.logical_and(masks[best], masks[k]).sum()
        union = np.logical_or(masks[best], masks[k]).sum()
        out.append({"bin": size_bin(areas[k] / (h * w)), "masks_at_click": len(containing),
                    "iou": float(inter / union)})
    return out


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def stats(rs):
        return {"num_masks": len(rs), "ceiling_miou": float(np.mean([r["iou"] for r in rs])),
                "ambiguous_clicks": float(np.mean([r["masks_at_click"] > 1 for r in rs]))}

    by_size = {}
    for low, _ in SIZE_BINS:
        name = size_bin(low)
        members = [r for r in rows if r["bin"] == name]
        if members:
            by_size[name] = stats(members)
    return {**stats(rows), "by_mask_size": by_size}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sam_synthetic/cpu")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--num-images", type=int, default=50, help="the first N images (default 50: the main "
                                                                   "job's held-out evaluation)")
    parser.add_argument("--output", type=Path, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    try:
        source = open_source(args.dataset, args.split, args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"ambiguity_ceiling: error: {err}", file=sys.stderr)
        return 2
    n = min(args.num_images, len(source))
    rows = [row for i in range(n) for row in image_ceiling(read_instances(source[i]))]
    result = {"dataset": args.dataset, "split": args.split, "num_images": n, **summarize(rows)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
