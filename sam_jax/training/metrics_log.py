"""A run's logs: metrics.jsonl and TensorBoard events, and the rows written to them.

    {"step": 120, "train/total_loss": ..., "train/miou_iter_1": ..., "train/steps_per_s": ...}
    {"step": 1700, "eval/miou_1_clicks": ..., "eval/oracle_miou_1_clicks": ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl and TensorBoard events, written by process 0; a resumed run drops rows past its step."""

    def __init__(self, workdir: Path, resumed_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / METRICS_FILE
        self.rows: List[Dict[str, Any]] = []
        if not self.enabled:
            return
        if self.path.exists():
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in kept if row["step"] <= resumed_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def summarize_window(metrics: List[Dict[str, Any]]) -> Dict[str, float]:
    """Means over the steps of a log window (each step's metrics as the train step returns
    them); per-iteration arrays become train/miou_iter_<k>."""
    host = jax.device_get(metrics)
    out: Dict[str, float] = {}
    for key in ("total_loss", "grad_norm", "learning_rate"):
        out[f"train/{key}"] = float(np.mean([m[key] for m in host]))
    for key in ("focal", "dice", "iou_loss"):
        out[f"train/{key}"] = float(np.mean([np.sum(m[key]) for m in host]))
    miou = np.mean([m["miou"] for m in host], axis=0)
    for k, value in enumerate(miou, 1):
        out[f"train/miou_iter_{k}"] = float(value)
    out["train/skipped_steps"] = int(np.sum([m["skipped"] for m in host]))
    return out


def eval_row(step: int, summary: Dict[str, Any]) -> Dict[str, Any]:
    """A log row of a training evaluation's summary (`sam_jax.training.loop.evaluate`)."""
    row = {"step": step}
    row.update({f"eval/miou_{c}_clicks": v for c, v in summary["miou"].items()})
    row.update({f"eval/oracle_miou_{c}_clicks": v for c, v in summary["oracle_miou"].items()})
    head = summary["iou_head_first_click"]  # where defined: r needs spread in the scores
    row.update({f"eval/iou_head_{k}": head[k] for k in ("pearson", "picks_best") if head[k] is not None})
    row["eval/gray_images_miou_1_clicks"] = summary["gray_images_first_click"]["miou"]  # images made uniform grey
    return row
