"""PyTorch-exact linear and bilinear resizing (`F.interpolate`, align_corners=False).

`jax.image.resize` antialiases when it downsamples and so differs from
PyTorch there. These build the (out, in) interpolation matrix with PyTorch's
source-index formula, in fp32 as PyTorch computes it, and apply it with a
matmul per axis: two non-zero weights per row, the same products PyTorch sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def linear_interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) fp32 weights of PyTorch's linear resize, align_corners=False."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    weights[rows, i0] += lam0
    weights[rows, i1] += lam1
    return weights


def resize_linear(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """Resizes one axis of `x` to `out_size` as `F.interpolate(mode="linear")` does."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    weights = jnp.asarray(linear_interpolation_matrix(in_size, out_size), dtype=x.dtype)
    moved = jnp.moveaxis(x, axis, -1)
    out = jnp.einsum("...i,oi->...o", moved, weights, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes the last two axes (H, W) of `x` as `F.interpolate(mode="bilinear")` does."""
    # Width first, then height: the order PyTorch's kernel sums in.
    return resize_linear(resize_linear(x, size[1], axis=-1), size[0], axis=-2)
