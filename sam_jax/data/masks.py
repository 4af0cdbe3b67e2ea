"""The point farthest from a mask's boundary: builders' mask points, and the paper's evaluation clicks."""

import numpy as np
from scipy import ndimage


def farthest_from_boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (2,) float32 (x, y) of the pixel farthest from the mask's boundary.

    The image border counts as boundary (the mask is zero-padded), as in the
    paper's evaluation clicks; ties go to the first pixel in row-major order.
    """
    if not mask.any():
        raise ValueError("farthest_from_boundary: the mask is empty")
    x, y, _ = farthest_with_distance(mask)
    return np.array([x, y], np.float32)


def farthest_with_distance(mask: np.ndarray) -> tuple[int, int, float]:
    """(H, W) bool -> (x, y, distance) of `farthest_from_boundary`; (0, 0, 0.0) for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return 0, 0, 0.0
    # Outside its box the mask is background, so the box plus a ring of zeros
    # gives the same distances (and row-major ties) for a fraction of the work.
    y0, x0 = rows[0], cols[0]
    crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    distance = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x + x0), int(y + y0), float(distance[y, x])
