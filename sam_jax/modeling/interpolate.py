"""PyTorch-exact linear and bilinear resizing (`F.interpolate`, align_corners=False).

`jax.image.resize` antialiases when it downsamples and so differs from
PyTorch there. These compute PyTorch's source index and the two weights of
each output sample in fp32 as PyTorch does, and blend the two gathered input
samples: out = lam0 * x[i0] + lam1 * x[i1], one axis at a time.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def linear_interpolation_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """(i0, i1, lam0, lam1), each (out_size,): PyTorch's linear resize, align_corners=False."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.floor(src).astype(np.int32)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
    return i0, i1, lam0, lam1


def resize_linear(x: jax.Array, out_size: int, axis: int, keep: Optional[int] = None) -> jax.Array:
    """Resizes one axis of `x` to `out_size` as `F.interpolate(mode="linear")` does;
    with `keep`, returns only the first `keep` samples of that resize."""
    in_size = x.shape[axis]
    keep = out_size if keep is None else keep
    if in_size == out_size:
        return jax.lax.slice_in_dim(x, 0, keep, axis=axis % x.ndim)
    i0, i1, lam0, lam1 = (t[:keep] for t in linear_interpolation_taps(in_size, out_size))
    shape = [1] * x.ndim
    shape[axis] = keep
    weight = lambda lam: jnp.asarray(lam, x.dtype).reshape(shape)
    return jnp.take(x, i0, axis=axis) * weight(lam0) + jnp.take(x, i1, axis=axis) * weight(lam1)


def resize_bilinear(
    x: jax.Array, size: tuple[int, int], keep: Optional[tuple[int, int]] = None
) -> jax.Array:
    """Resizes the last two axes (H, W) of `x` as `F.interpolate(mode="bilinear")` does;
    with `keep` = (h, w), returns only the top-left (h, w) of the result."""
    keep = keep or size
    # Width first, then height: the order PyTorch's kernel sums in.
    return resize_linear(resize_linear(x, size[1], -1, keep[1]), size[0], -2, keep[0])
