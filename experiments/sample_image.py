"""A deterministic synthetic test image (no downloads): smooth colour fields, shapes and noise."""

from __future__ import annotations

import numpy as np


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 RGB with smooth gradients, a few discs and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    phase = np.array([0.0, 2.0, 4.0])[:, None, None]
    image = 128 + 60 * np.sin(6 * xx + phase) * np.cos(4 * yy)
    for _ in range(6):
        cy, cx, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.15)
        disc = (yy * max(height, width) / height - cy) ** 2 + (xx * max(height, width) / width - cx) ** 2 < r**2
        image[:, disc] = rng.uniform(0, 255, size=(3, 1))
    image = image.transpose(1, 2, 0) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
