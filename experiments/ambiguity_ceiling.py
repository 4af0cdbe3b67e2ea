"""How well could any model do at 1 click? The ambiguity and resolution ceilings of a data split, measured.

    python -m experiments.ambiguity_ceiling                         # sam_synthetic/cpu validation, 50 images
    python -m experiments.ambiguity_ceiling --dataset sa1b --num-images 200 --image-size 1024 --low-res-size 256

For every ground-truth mask the point protocol's first click is placed (the
pixel farthest from the mask's boundary, `sam_jax.evaluation.clicks`). A click
inside several masks (a part inside its object) is ambiguous: no model can
know which one was meant. The ceiling answers each click with the smallest
ground-truth mask that contains it (the most specific reading) and scores it
against the mask the click was placed for, exactly as the protocol scores a
prediction.

The resolution ceiling is what a model scores whose low-res logits are the
ground truth itself: SAM predicts masks on a low_res_size grid over its
image_size input (64 over 256 for the synthetic main job's model) and
upsamples them bilinearly to the image, so no mask is sharper than that grid.
Each mask is taken to the input frame (longest side image_size, zero padded),
to the low-res grid by block majority, as +-1 logits through the model's own
postprocessing back to the image and thresholded at 0, then scored against
itself.

Prints and writes (`--output`) JSON: the ambiguity ceiling mIoU, the share of
clicks inside more than one mask, the resolution ceiling mIoU, and all three
by mask size. Needs no model.
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
from sam_jax.modeling.sam import postprocess_masks
from sam_jax.utils.transforms import ResizeLongestSide


def resolution_iou(mask: np.ndarray, image_size: int, low_res_size: int) -> float:
    """IoU of an (H, W) mask with itself seen through the model's low-res mask grid."""
    h, w = mask.shape
    input_h, input_w = ResizeLongestSide.get_preprocess_shape(h, w, image_size)
    # Input-frame pixel (i, j) takes the mask at its centre's source pixel (nearest), then the
    # square frame is zero padded and each (image_size / low_res_size)^2 block votes.
    rows = np.minimum(((np.arange(input_h) + 0.5) * h / input_h).astype(int), h - 1)
    cols = np.minimum(((np.arange(input_w) + 0.5) * w / input_w).astype(int), w - 1)
    frame = np.zeros((image_size, image_size), np.float32)
    frame[:input_h, :input_w] = mask[rows][:, cols]
    block = image_size // low_res_size
    low_res = frame.reshape(low_res_size, block, low_res_size, block).mean(axis=(1, 3)) >= 0.5
    logits = np.where(low_res, 1.0, -1.0).astype(np.float32)
    seen = np.asarray(postprocess_masks(logits, (input_h, input_w), (h, w), image_size)) > 0
    union = np.logical_or(seen, mask).sum()
    return float(np.logical_and(seen, mask).sum() / union) if union else 1.0

def image_ceiling(instances: Instances, image_size: int = 256, low_res_size: int = 64) -> List[Dict[str, Any]]:
    """Per non-crowd mask: its size bin, the number of masks its first click lies in, the IoU
    of the smallest of them with it ("iou"), and its resolution ceiling ("resolution_iou")."""
    masks = np.asarray(instances.masks, bool)
    prompted = np.flatnonzero(~np.asarray(instances.iscrowd, bool))
    areas = masks.reshape(len(masks), -1).sum(1)
    h, w = instances.size
    out = []
    for k in prompted:
        x, y, _, placed = next_click(masks[k], np.zeros_like(masks[k]))
        containing = [j for j in range(len(masks)) if masks[j, y, x]] if placed else []
        if not containing:  # an empty mask: no click, the protocol scores it 0 as well
            out.append({"bin": size_bin(areas[k] / (h * w)), "masks_at_click": 0, "iou": 0.0, "resolution_iou": 0.0})
            continue
        best = min(containing, key=lambda j: areas[j])
        inter = np.logical_and(masks[best], masks[k]).sum()
        union = np.logical_or(masks[best], masks[k]).sum()
        out.append({"bin": size_bin(areas[k] / (h * w)), "masks_at_click": len(containing),
                    "iou": float(inter / union), "resolution_iou": resolution_iou(masks[k], image_size, low_res_size)})
    return out


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def stats(rs):
        return {"num_masks": len(rs), "ceiling_miou": float(np.mean([r["iou"] for r in rs])),
                "ambiguous_clicks": float(np.mean([r["masks_at_click"] > 1 for r in rs])),
                "resolution_ceiling_miou": float(np.mean([r["resolution_iou"] for r in rs]))}

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
    parser.add_argument("--image-size", type=int, default=256, help="the model's input side (default 256: "
                                                                     "the synthetic main job's)")
    parser.add_argument("--low-res-size", type=int, default=64, help="the model's low-res mask side (default 64)")
    parser.add_argument("--output", type=Path, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    try:
        source = open_source(args.dataset, args.split, args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"ambiguity_ceiling: error: {err}", file=sys.stderr)
        return 2
    n = min(args.num_images, len(source))
    if args.image_size < 1 or args.low_res_size < 1 or args.image_size % args.low_res_size:
        print(f"ambiguity_ceiling: error: --image-size ({args.image_size}) must be a positive multiple of "
              f"--low-res-size ({args.low_res_size})", file=sys.stderr)
        return 2
    rows = [row for i in range(n)
            for row in image_ceiling(read_instances(source[i]), args.image_size, args.low_res_size)]
    result = {"dataset": args.dataset, "split": args.split, "num_images": n, "image_size": args.image_size,
              "low_res_size": args.low_res_size, **summarize(rows)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
