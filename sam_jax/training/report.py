"""Pictures and sample files of a training run: curves.png, samples.png, and samples/ +
sample_prompts.json for `sam-jax segment`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from PIL import Image

from sam_jax.data.pipeline import evaluation_batches
from sam_jax.evaluation import point_protocol
from sam_jax.training.interactive import InteractiveConfig

SAMPLE_CLICKS = (1, 5)


def write_curves(path: Path, rows: List[Dict[str, Any]], interactive: InteractiveConfig) -> None:
    """Loss, training mIoU (first and last interactive iteration), learning rate and held-out mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "train/total_loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    steps = [r["step"] for r in train]
    n = interactive.num_iterations
    axes[0].plot(steps, [r["train/total_loss"] for r in train], label=f"total ({n} iteration{'s' * (n > 1)})")
    axes[0].plot(steps, [r["train/focal"] * interactive.focal_weight + r["train/dice"] * interactive.dice_weight
                         for r in train], label=f"{interactive.focal_weight:g} focal + {interactive.dice_weight:g} dice")
    axes[0].plot(steps, [r["train/iou_loss"] for r in train], label="IoU head")
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    for k in sorted({1, min(2, n), n}):  # single-prompt steps (single_prompt_steps) log iteration 1 only
        axes[1].plot(steps, [r.get(f"train/miou_iter_{k}", np.nan) for r in train], label=f"iteration {k}")
    axes[1].set_title("training mIoU (low res)")
    axes[2].plot(steps, [r["train/learning_rate"] for r in train])
    axes[2].set_title("learning rate")
    if evals:
        last = evals[-1]
        clicks = sorted(int(k.split("_")[1]) for k in last if k.startswith("eval/miou_"))
        for row in evals:
            axes[3].plot(clicks, [row[f"eval/miou_{c}_clicks"] for c in clicks], marker="o", label=f"step {row['step']}")
        axes[3].set_xlabel("clicks")
        axes[3].set_ylim(0, 1)
    axes[3].set_title("held-out mIoU (point protocol)")
    for ax in axes[:2]:
        ax.set_xlabel("step")
    for ax in (axes[0], axes[1], axes[3]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sample_masks(example: Dict[str, np.ndarray]) -> int:
    """The mask to show: the largest valid one covering under a quarter of the image."""
    h, w = example["image_size"]
    area = example["masks"].sum(axis=(1, 2)).astype(float)
    area[~example["mask_valid"] | (area > 0.25 * h * w)] = -1
    return int(np.argmax(area))


def _tint(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def _dot(image: np.ndarray, x: float, y: float, colour, r: int = 3) -> None:
    h, w = image.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    image[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = colour


def write_samples(workdir: Path, config, model, params, eval_source) -> None:
    """samples.png (per held-out image: ground truth | 1 click | 5 clicks), the original images in
samples/ and their first protocol clicks in sample_prompts.json (`sam-jax segment --prompts`)."""
    n = min(config.sample_images, len(eval_source))
    batch = next(evaluation_batches(eval_source, config.data.eval_preprocess, n, n))
    protocol = point_protocol.ProtocolConfig(num_clicks=max(SAMPLE_CLICKS), seed=config.seed)
    result = point_protocol.evaluate_batch(model, params, batch, protocol, keep_clicks=SAMPLE_CLICKS)
    rows = []
    samples = workdir / "samples"
    samples.mkdir(exist_ok=True)
    prompts = {}
    for i in range(n):
        h, w = (int(v) for v in batch["image_size"][i])
        image = batch["image"][i, :h, :w]
        j = _sample_masks({k: v[i] for k, v in batch.items()})
        tiles = [_tint(image, batch["masks"][i, j, :h, :w], (40, 200, 40))]
        for clicks in SAMPLE_CLICKS:
            tile = _tint(image, result.predictions[clicks][i, j, :h, :w], (230, 60, 200))
            for c in range(clicks):
                label = result.click_labels[i, j, c]
                if label >= 0:
                    x, y = result.click_coords[i, j, c]
                    _dot(tile, x, y, (0, 255, 0) if label == 1 else (255, 0, 0))
            tiles.append(tile)
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
        # The original image and its first protocol click, for `sam-jax segment --prompts`.
        record = eval_source[i]
        name = f"heldout_{i}.png"
        Image.fromarray(np.asarray(record["image"])).save(samples / name)
        x, y = result.click_coords[i, j, 0]
        scale_y, scale_x = record["image"].shape[0] / h, record["image"].shape[1] / w
        prompts[name] = {"point_coords": [[float((x + 0.5) * scale_x - 0.5), float((y + 0.5) * scale_y - 0.5)]],
                         "point_labels": [1]}
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(grid).save(workdir / "samples.png")
    (workdir / "sample_prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
