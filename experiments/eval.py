"""Evaluates a converted or trained checkpoint with the SAM paper's protocols.

    python -m experiments.eval --checkpoint workdir/synthetic_cpu/model      # sam_synthetic/cpu validation
    python -m experiments.eval --checkpoint /ckpt/sam_vit_b --dataset coco_instances \\
        --boxes detections.json                                              # boxes from a detector
    python -m experiments.eval --checkpoint /ckpt/sam_vit_h --dataset coco_instances \\
        --protocols amg --amg-points-per-side 32 --amg-pred-iou-thresh 0.88  # automatic masks

Point protocol (`sam_jax.evaluation.point_protocol`): per ground-truth mask, the
first click at the mask's distance-transform maximum (`--first-click random`:
uniform over the mask), each later click at the larger error region's maximum,
labelled by error type, previous logits fed back; mIoU after 1, 2, 3, 5 and 9
clicks of the most confident mask and of the oracle (best of three).

Box protocol (`sam_jax.evaluation.box_prompts`): every ground-truth box
(`--boxes gt`) or detection (`--boxes FILE`, COCO results JSON) prompts one
mask; COCO mask AP through pycocotools.

Automatic masks (`--protocols amg`, `sam_jax.evaluation.automatic_masks`): the
automatic mask generator on every image (`--amg-*`: grid points per side,
points per batch, predicted-IoU and stability thresholds, box NMS threshold,
crop layers; the official defaults), its masks scored against the image's
ground truth, categories ignored: COCO box and mask AP (scored by predicted
IoU, every mask counted), recall of the ground-truth masks at mask IoU 0.5
and 0.75, masks found per image.

`--gray-images` replaces every image by a uniform mid-grey one (128) of the same size
and keeps its masks, clicks and boxes: what a model scores without looking at
the image (a model whose figures do not drop has learnt only where prompts
fall, not what is there).

`--protocols` defaults to points,boxes. All run at each image's original
resolution; the point and box protocols `--batch-images` images per jitted
encoder call, data-parallel over all local devices, the generator one image
(and crop) at a time. Writes to `--output` (default:
`<checkpoint>/../eval/<dataset>-<split>`):

    results.json        every figure, the settings, and the time taken
    results.md          the same as Markdown tables
    miou_vs_clicks.png  mIoU after each click (most confident and oracle)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from sam_jax.data.pipeline import DEFAULT_DATA_DIR
from sam_jax.errors import CheckpointError
from sam_jax.evaluation.automatic_masks import AmgSettings
from sam_jax.evaluation.point_protocol import FIRST_CLICKS, REPORTED_CLICKS, ProtocolConfig

PROTOCOLS = ("points", "boxes", "amg")
DEFAULT_PROTOCOLS = ("points", "boxes")


def evaluate_checkpoint(checkpoint: str, dataset: str, split: str = "validation", data_dir: Optional[str] = None,
                        num_images: Optional[int] = None, protocols: Sequence[str] = DEFAULT_PROTOCOLS,
                        point_config: ProtocolConfig = ProtocolConfig(), boxes: str = "gt",
                        batch_images: int = 8, progress: bool = True,
                        amg_settings: AmgSettings = AmgSettings(), gray_images: bool = False) -> Dict[str, Any]:
    """Runs the chosen protocols; returns the results.json content. `gray_images`: every image
    replaced by a uniform 128 one of its size (masks, clicks and boxes unchanged)."""
    from tqdm import tqdm

    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
    from sam_jax.batch_predictor import SamBatchPredictor
    from sam_jax.weights import load_sam
    from sam_jax.data.pipeline import open_source
    from sam_jax.evaluation import automatic_masks, box_prompts, point_protocol
    from sam_jax.evaluation.instances import read_instances

    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(protocols)}")
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    # Read before any work, so that a bad file fails at once.
    detections = None if "boxes" not in protocols or boxes == "gt" else box_prompts.read_detections(boxes)
    model, params = load_sam(checkpoint)
    predictor = SamBatchPredictor(model, params)
    source = open_source(dataset, split, data_dir)
    total = len(source) if num_images is None else min(num_images, len(source))

    def instances():
        for i in range(total):
            try:
                x = read_instances(source[i])
            except ValueError as e:
                raise ValueError(f"{dataset} {split} record {i}: {e}") from None
            yield dataclasses.replace(x, image=np.full_like(x.image, point_protocol.GRAY)) if gray_images else x

    results: Dict[str, Any] = {
        "checkpoint": str(checkpoint), "model": model.config.name, "dataset": dataset, "split": split,
        "num_images": total, "batch_images": batch_images, "gray_images": gray_images,
    }
    if "points" in protocols:
        start = time.perf_counter()
        with tqdm(total=total, desc="point protocol", unit="image", disable=not progress) as bar:
            points = point_protocol.evaluate_images(predictor, instances(), point_config, batch_images, bar)
        results["points"] = {
            "num_clicks": point_config.num_clicks, "first_click": point_config.first_click,
            "seed": point_config.seed, **points.summary(),
            "oracle_miou_per_click": [float(v) for v in points.miou(oracle=True)],
            "seconds": round(time.perf_counter() - start, 1),
        }
    if "boxes" in protocols:
        start = time.perf_counter()
        evaluated = []
        with tqdm(total=total, desc="box protocol", unit="image", disable=not progress) as bar:
            box_result = box_prompts.evaluate_boxes(
                predictor, (evaluated.append(x.image_id) or x for x in instances()), detections, batch_images, bar)
        results["boxes"] = {**box_result.summary(), "seconds": round(time.perf_counter() - start, 1)}
        if detections is not None:  # e.g. a detector's file for the whole split, --num-images a part of it
            if not set(detections) & set(evaluated):
                shown = ", ".join(str(i) for i in sorted(detections)[:5])
                raise ValueError(
                    f"--boxes {boxes}: no detection is for any of the {len(evaluated)} evaluated images of "
                    f"{dataset} {split} (the file names image_id {shown}{', ...' if len(detections) > 5 else ''}); "
                    "is it for another split or data set?"
                )
            results["boxes"]["detection_images_not_evaluated"] = len(set(detections) - set(evaluated))
    if "amg" in protocols:
        start = time.perf_counter()
        generator = SamAutomaticMaskGenerator(model, params, **amg_settings.generator_options())
        with tqdm(total=total, desc="automatic masks", unit="image", disable=not progress) as bar:
            amg = automatic_masks.evaluate_generator(generator, instances(), bar)
        seconds = time.perf_counter() - start
        results["amg"] = {"settings": dataclasses.asdict(amg_settings), **amg.summary(),
                          "seconds": round(seconds, 1), "seconds_per_image": round(seconds / amg.num_images, 3)}
    return results


def markdown(results: Dict[str, Any]) -> str:
    """results.json as Markdown tables."""
    gray = " (every image replaced by uniform grey)" if results.get("gray_images") else ""
    lines = [f"# {results['model']} on {results['dataset']} {results['split']} ({results['num_images']} images){gray}", ""]
    points = results.get("points")
    if points:
        clicks = list(points["miou"])
        lines += [
            f"Point protocol: {points['num_masks']} masks, first click {points['first_click']}.", "",
            "| clicks | " + " | ".join(clicks) + " |",
            "|---|" + "---|" * len(clicks),
            "| mIoU, most confident | " + " | ".join(f"{points['miou'][c]:.3f}" for c in clicks) + " |",
            "| mIoU, oracle | " + " | ".join(f"{points['oracle_miou'][c]:.3f}" for c in clicks) + " |", "",
        ]
        head = points.get("iou_head_first_click")
        if head and head["picks_best"] is not None:
            r = "undefined (no spread)" if head["pearson"] is None else f"{head['pearson']:.3f}"
            lines += [
                f"IoU head at the first click: Pearson r {r} between the outputs' predicted and actual IoU; "
                f"the most confident output is a best one for {100 * head['picks_best']:.1f}% of masks; "
                f"mean absolute error {head['mean_abs_error']:.3f}.", "",
                "| first-click output | " + " | ".join(str(i) for i in range(len(head["chosen_share"]))) + " |",
                "|---|" + "---|" * len(head["chosen_share"]),
            ]
            per_output = (("mean predicted IoU", "mean_predicted"), ("mean actual IoU", "mean_actual"),
                          ("most confident, share of masks", "chosen_share"), ("best, share of masks", "best_share"))
            lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in head[key]) + " |" for label, key in per_output]
            lines.append("")
    boxes = results.get("boxes")
    if boxes:
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        lines += [
            f"Box protocol: {boxes['num_boxes']} boxes from {boxes['box_source'].replace('_', ' ')}, COCO mask AP.", "",
            "| " + " | ".join(names) + " |",
            "|" + "---|" * len(names),
            "| " + " | ".join(f"{boxes['mask_ap'][n]:.3f}" for n in names) + " |", "",
        ]
    amg = results.get("amg")
    if amg:
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        settings, per_image = amg["settings"], amg["masks_per_image"]
        recall = {iou: (f"{v:.3f}" if v >= 0 else "-") for iou, v in amg["recall"].items()}
        filters = [f"predicted IoU > {settings['pred_iou_thresh']:g}" if settings["pred_iou_thresh"]
                   else "no predicted-IoU filter",
                   f"stability >= {settings['stability_score_thresh']:g}" if settings["stability_score_thresh"]
                   else "no stability filter"]
        lines += [
            f"Automatic masks: {settings['points_per_side']}x{settings['points_per_side']} points, "
            f"{', '.join(filters)}, box NMS {settings['box_nms_thresh']:g}, {settings['crop_n_layers']} crop layers; "
            f"{amg['num_masks']} masks, categories ignored, {amg['seconds_per_image']:.2f} s an image.", "",
            "| COCO | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| box AP | " + " | ".join(f"{amg['box_ap'][n]:.3f}" for n in names) + " |",
            "| mask AP | " + " | ".join(f"{amg['mask_ap'][n]:.3f}" for n in names) + " |", "",
            "| masks per image (min-max) | ground-truth masks per image | "
            + " | ".join(f"recall at IoU {iou}" for iou in recall) + " | mean best IoU |",
            "|---|---|" + "---|" * len(recall) + "---|",
            f"| {per_image['mean']:.1f} ({per_image['min']}-{per_image['max']}) "
            f"| {amg['ground_truth_per_image']:.1f} | " + " | ".join(recall.values())
            + f" | {amg['mean_best_iou']:.3f} |",
            "",
        ]
    return "\n".join(lines)


def plot_miou_vs_clicks(path: Path, curves: Dict[str, Dict[str, Any]], title: str) -> None:
    """One line per {label: results["points"]}: most confident (solid) and oracle (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        clicks = list(range(1, len(points["miou_per_click"]) + 1))
        line, = ax.plot(clicks, points["miou_per_click"], marker="o", label=label)
        ax.plot(clicks, points["oracle_miou_per_click"], linestyle="--", color=line.get_color(), alpha=0.6,
                label=f"{label}, oracle")
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.set_xticks([c for c in REPORTED_CLICKS if c <= max(len(p["miou_per_click"]) for p in curves.values())])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(output: Path, results: Dict[str, Any]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "results.md").write_text(markdown(results))
    if "points" in results:
        plot_miou_vs_clicks(output / "miou_vs_clicks.png", {results["model"]: results["points"]},
                            f"{results['dataset']} {results['split']}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a converted or trained checkpoint folder")
    parser.add_argument("--dataset", default="sam_synthetic/cpu", help="a prepared data set (name[/config] or folder)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"prepared data sets (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--num-images", type=int, help="the first N images of the split (default all)")
    parser.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS),
                        help=f"comma-separated subset of {','.join(PROTOCOLS)} (default {','.join(DEFAULT_PROTOCOLS)})")
    parser.add_argument("--clicks", type=int, default=9, help="clicks per mask (default 9)")
    parser.add_argument("--first-click", choices=FIRST_CLICKS, default="center")
    parser.add_argument("--seed", type=int, default=0, help="for --first-click random")
    parser.add_argument("--boxes", default="gt",
                        help="'gt' (ground-truth boxes) or a COCO results JSON of detections; detections of "
                             "images not evaluated are ignored (and counted)")
    parser.add_argument("--batch-images", type=int, default=8, help="images per encoder call (default 8)")
    defaults = AmgSettings()
    amg = parser.add_argument_group("automatic masks (--protocols amg)")
    amg.add_argument("--amg-points-per-side", type=int, default=defaults.points_per_side,
                     help=f"grid points per side (default {defaults.points_per_side})")
    amg.add_argument("--amg-points-per-batch", type=int, default=defaults.points_per_batch,
                     help=f"points decoded at once (default {defaults.points_per_batch})")
    amg.add_argument("--amg-pred-iou-thresh", type=float, default=defaults.pred_iou_thresh,
                     help=f"keep masks with predicted IoU above this, 0 keeps all (default {defaults.pred_iou_thresh})")
    amg.add_argument("--amg-stability-score-thresh", type=float, default=defaults.stability_score_thresh,
                     help=f"keep masks at least this stable, 0 keeps all (default {defaults.stability_score_thresh})")
    amg.add_argument("--amg-box-nms-thresh", type=float, default=defaults.box_nms_thresh,
                     help=f"box IoU above which duplicates are dropped (default {defaults.box_nms_thresh})")
    amg.add_argument("--amg-crop-n-layers", type=int, default=defaults.crop_n_layers,
                     help=f"crop layers besides the whole image (default {defaults.crop_n_layers})")
    parser.add_argument("--gray-images", action="store_true",
                        help="replace every image by a uniform mid-grey one of its size (masks and prompts unchanged): "
                             "what the model scores without seeing the image")
    parser.add_argument("--output", help="default: <checkpoint>/../eval/<dataset>-<split>[-gray]")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        point_config = ProtocolConfig(num_clicks=args.clicks, first_click=args.first_click, seed=args.seed)
        amg_settings = AmgSettings(
            points_per_side=args.amg_points_per_side, points_per_batch=args.amg_points_per_batch,
            pred_iou_thresh=args.amg_pred_iou_thresh, stability_score_thresh=args.amg_stability_score_thresh,
            box_nms_thresh=args.amg_box_nms_thresh, crop_n_layers=args.amg_crop_n_layers,
        )
        results = evaluate_checkpoint(
            args.checkpoint, args.dataset, args.split, args.data_dir, args.num_images,
            [p for p in args.protocols.split(",") if p], point_config, args.boxes, args.batch_images,
            not args.no_progress, amg_settings, args.gray_images,
        )
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output or Path(args.checkpoint).resolve().parent / "eval" /
                  f"{args.dataset.strip('/').replace('/', '_')}-{args.split}{'-gray' * args.gray_images}")
    write_results(output, results)
    print(markdown(results))
    skipped = results.get("boxes", {}).get("detection_images_not_evaluated", 0)
    if skipped:
        print(f"eval: warning: detections of {skipped} image(s) in {args.boxes} were not evaluated (not among "
              f"the {results['num_images']} evaluated images of {args.dataset} {args.split})", file=sys.stderr)
    written = ["results.json", "results.md"] + ["miou_vs_clicks.png"] * ("points" in results)
    print(f"wrote {', '.join(str(output / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
