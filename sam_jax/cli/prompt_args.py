"""`sam-jax segment`'s prompt arguments: parsed from the command line or a prompts.json, checked
against the image.

Command line: --point-coords "x,y;x,y" (pixels in the original image),
--point-labels "1,0" (1 foreground, 0 background; all 1 when left out),
--box "x0,y0,x1,y1", --text "a phrase" (a text prompt, for a checkpoint
trained with them; needs --clip-checkpoint). A prompts.json maps image file
names to the same fields as JSON: {"a.jpg": {"point_coords": [[x, y], ...],
"point_labels": [1, ...], "box": [x0, y0, x1, y1], "text": "a phrase"}, ...};
an entry replaces the command-line prompt for that image. Points and box
corners must lie inside the image: 0 <= x <= width, 0 <= y <= height.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sam_jax.cli.common import UsageError
from sam_jax.prompts import check_inside

PROMPT_FIELDS = ("point_coords", "point_labels", "box", "text")
EMPTY_TEXT = 'the text prompt is empty; give a phrase, e.g. "a red circle"'


@dataclasses.dataclass(frozen=True)
class Prompt:
    point_coords: Optional[np.ndarray] = None  # (N, 2) float64, (x, y) pixels
    point_labels: Optional[np.ndarray] = None  # (N,) int32, 1 foreground / 0 background
    box: Optional[np.ndarray] = None  # (4,) float64 XYXY pixels
    text: Optional[str] = None  # a phrase, encoded by CLIP

    def check_inside(self, width: int, height: int, image: Path) -> None:
        """Raises ValueError naming the first point or box corner outside the image."""
        check_inside(self.point_coords, self.box, width, height, str(image))

    def to_json(self) -> dict[str, Any]:
        """The prompt's fields as JSON; "text" only when there is one."""
        as_list = lambda x: None if x is None else x.tolist()
        fields = {name: as_list(getattr(self, name)) for name in ("point_coords", "point_labels", "box")}
        return fields if self.text is None else {**fields, "text": self.text}


def _fmt(v: float) -> str:
    return f"{v:g}"


def _numbers(text: str, what: str, syntax: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{what}: expected {syntax}; got {text!r}")
    return values


def parse_points(text: str) -> np.ndarray:
    syntax = "'x,y' or 'x,y;x,y;...' (pixels)"
    points = [_numbers(part, "--point-coords", syntax) for part in text.split(";")]
    if any(len(p) != 2 for p in points):
        raise UsageError(f"--point-coords: expected {syntax}; got {text!r}")
    return np.array(points, np.float64)


def parse_labels(text: str) -> np.ndarray:
    labels = _numbers(text, "--point-labels", "'1,0,...' (1 foreground, 0 background)")
    if any(v not in (0, 1) for v in labels):
        raise UsageError(f"--point-labels: labels must be 1 (foreground) or 0 (background); got {text!r}")
    return np.array(labels, np.int32)


def parse_box(text: str) -> np.ndarray:
    box = _numbers(text, "--box", "'x0,y0,x1,y1' (pixels)")
    if len(box) != 4:
        raise UsageError(f"--box: expected 'x0,y0,x1,y1' (pixels), 4 numbers; got {text!r}")
    return np.array(box, np.float64)


def make_prompt(coords: Optional[np.ndarray], labels: Optional[np.ndarray],
                box: Optional[np.ndarray], where: str = "", text: Optional[str] = None) -> Prompt:
    """Checks a prompt's parts together (labels without points, count mismatch, box order,
    blank text)."""
    prefix = f"{where}: " if where else ""
    if coords is None and labels is not None:
        raise UsageError(f"{prefix}point labels given without point coordinates")
    if coords is None and box is None and text is None:
        raise UsageError(f"{prefix}no prompt: give point coordinates and/or a box (or a text)")
    if text is not None and not text.strip():
        raise UsageError(f"{prefix}{EMPTY_TEXT}")
    if coords is not None:
        labels = np.ones(len(coords), np.int32) if labels is None else labels
        if len(labels) != len(coords):
            raise UsageError(f"{prefix}{len(coords)} point(s) but {len(labels)} point label(s)")
    if box is not None:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise UsageError(f"{prefix}box must be x0,y0,x1,y1 with x1 > x0 and y1 > y0; "
                             f"got {', '.join(map(_fmt, box))}")
    return Prompt(coords, labels, box, text)


def prompt_from_args(point_coords: Optional[str], point_labels: Optional[str],
                     box: Optional[str], text: Optional[str] = None) -> Optional[Prompt]:
    """The command-line prompt, or None when none of its flags is given."""
    if point_coords is None and point_labels is None and box is None and text is None:
        return None
    if text is not None and not text.strip():
        raise UsageError(f"--text: {EMPTY_TEXT}")
    coords = None if point_coords is None else parse_points(point_coords)
    labels = None if point_labels is None else parse_labels(point_labels)
    return make_prompt(coords, labels, None if box is None else parse_box(box), text=text)


def _array(value: Any, shape: Sequence[Optional[int]], what: str, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        array = None
    ok = (array is not None and array.ndim == len(shape) and array.size > 0
          and all(s is None or s == n for s, n in zip(shape, array.shape)) and np.isfinite(array).all())
    if not ok:
        layout = {"point_coords": "[[x, y], ...]", "point_labels": "[1, 0, ...]", "box": "[x0, y0, x1, y1]"}
        raise UsageError(f"{where}: {what} must be {layout[what]} (numbers); got {json.dumps(value)}")
    return array


def read_prompts_file(path: str, image_names: Sequence[str]) -> dict[str, Prompt]:
    """{image file name: Prompt} from a prompts.json; every name must be one of `image_names`."""
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--prompts {path}: not a readable JSON file ({err})") from None
    if not isinstance(entries, dict) or not entries:
        raise UsageError(f"--prompts {path}: expected a JSON object {{\"image file name\": "
                         "{\"point_coords\": ..., \"point_labels\": ..., \"box\": ...}}")
    unknown = sorted(set(entries) - set(image_names))
    if unknown:
        raise UsageError(f"--prompts {path}: no input image named {', '.join(unknown[:5])}"
                         + (f" ({len(unknown)} in all)" if len(unknown) > 5 else ""))
    prompts = {}
    for name, entry in entries.items():
        where = f"--prompts {path}, {name!r}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected an object with {', '.join(PROMPT_FIELDS)}")
        if extra := sorted(set(entry) - set(PROMPT_FIELDS)):
            raise UsageError(
                f"{where}: unknown field(s) {', '.join(extra)}; expected {', '.join(PROMPT_FIELDS)}")
        coords = labels = box = None
        if entry.get("point_coords") is not None:
            coords = _array(entry["point_coords"], (None, 2), "point_coords", where)
        if entry.get("point_labels") is not None:
            labels = _array(entry["point_labels"], (None,), "point_labels", where)
            if not np.isin(labels, (0, 1)).all():
                raise UsageError(f"{where}: point_labels must be 1 (foreground) or 0 (background)")
            labels = labels.astype(np.int32)
        if entry.get("box") is not None:
            box = _array(entry["box"], (4,), "box", where)
        text = entry.get("text")
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{where}: text must be a string (a phrase); got {json.dumps(text)}")
        prompts[name] = make_prompt(coords, labels, box, where, text)
    return prompts
