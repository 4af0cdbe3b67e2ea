"""The paper's simulated clicks (SAM appendix D.1, after RITM's `Clicker`).

The first click is the pixel farthest from the object's boundary. Each later
click is the pixel farthest from the boundary of the larger error region of
the current prediction: the false negatives (a foreground click) or the false
positives (a background click), whichever holds the pixel farther from its
boundary (ties: background, as RITM's `fn_max_dist > fp_max_dist`).
Distances are exact Euclidean with the image border counted as boundary;
ties between pixels go to the first in row-major order. With an empty prediction the next click is the first click.
"""

from typing import NamedTuple

import numpy as np

from sam_jax.data.masks import farthest_with_distance
from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND


class Click(NamedTuple):
    x: int
    y: int
    label: int  # FOREGROUND or BACKGROUND
    has_error: bool  # False: the prediction equals the target and no click is placed


def next_click(target: np.ndarray, predicted: np.ndarray) -> Click:
    """(H, W) bool ground truth and prediction -> the protocol's next click."""
    if target.shape != predicted.shape:
        raise ValueError(f"target {target.shape} and prediction {predicted.shape} differ in shape")
    target, predicted = target.astype(bool), predicted.astype(bool)
    fx, fy, fn_distance = farthest_with_distance(target & ~predicted)
    px, py, fp_distance = farthest_with_distance(predicted & ~target)
    if fn_distance == 0 and fp_distance == 0:
        return Click(0, 0, FOREGROUND, False)
    if fn_distance > fp_distance:
        return Click(fx, fy, FOREGROUND, True)
    return Click(px, py, BACKGROUND, True)
