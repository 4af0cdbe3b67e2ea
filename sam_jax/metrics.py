"""Mask IoU, the one measure of agreement that training, evaluation and the tests share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_iou(predicted: jax.Array, targets: jax.Array, empty_iou: float = 1.0) -> jax.Array:
    """IoU over the last two axes of bool masks (broadcast against each other), float32,
    counted exactly in int32; `empty_iou` where both masks are empty."""
    inter = jnp.sum(predicted & targets, axis=(-2, -1), dtype=jnp.int32)
    union = jnp.sum(predicted | targets, axis=(-2, -1), dtype=jnp.int32)
    iou = inter.astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
    return jnp.where(union > 0, iou, jnp.float32(empty_iou))
