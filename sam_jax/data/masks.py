"""Small geometry on binary masks shared by the builders, pipeline and evaluation."""

import numpy as np
from scipy import ndimage


def mask_to_box_xyxy(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 tight XYXY boxes (x1, y1 exclusive); zeros if empty."""
    n = masks.shape[0]
    boxes = np.zeros((n, 4), np.float32)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(n):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def farthest_from_boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (2,) float32 (x, y) of the pixel farthest from the mask's boundary.

    The image border counts as boundary (the mask is zero-padded), as in the
    paper's evaluation clicks; ties go to the first pixel in row-major order.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        raise ValueError("farthest_from_boundary: the mask is empty")
    # Outside its box the mask is background, so the box plus a ring of zeros
    # gives the same distances (and row-major ties) for a fraction of the work.
    y0, x0 = rows[0], cols[0]
    crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    distance = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([x + x0, y + y0], np.float32)
