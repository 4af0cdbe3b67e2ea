"""PyTorch-exact linear and bilinear resizing (`F.interpolate`, align_corners=False).

`jax.image.resize` antialiases when it downsamples and so differs from
PyTorch there. These compute PyTorch's source index and the two weights of
each output sample in fp32 as PyTorch does, out = lam0 * x[i0] + lam1 * x[i1],
one axis at a time.
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


@functools.lru_cache(maxsize=64)
def banded_weights(in_size: int, out_size: int, keep: int) -> tuple[tuple[int, ...], np.ndarray]:
    """The first `keep` rows of the (out_size, in_size) resize matrix, in blocks of consecutive
    outputs: each block's input window start, and the (blocks, window, block) weights. Each
    output blends two neighbouring inputs, so a block's window is short."""
    group = max(8, min(32, 32 * out_size // in_size))  # windows of <= ~32 inputs
    i0, i1, lam0, lam1 = (t[:keep] for t in linear_interpolation_taps(in_size, out_size))
    n_groups = -(-keep // group)
    dense = np.zeros((n_groups * group, in_size), np.float32)
    np.add.at(dense, (np.arange(keep), i0), lam0)
    np.add.at(dense, (np.arange(keep), i1), lam1)
    blocks = dense.reshape(n_groups, group, in_size)
    used = [np.flatnonzero(block.any(0)) for block in blocks]
    width = max(int(u[-1]) + 1 - int(u[0]) for u in used if len(u))
    starts = tuple(min(int(u[0]) if len(u) else 0, in_size - width) for u in used)
    weights = np.stack([block[:, s : s + width].T for block, s in zip(blocks, starts)])
    return starts, weights


def resize_linear(
    x: jax.Array, out_size: int, axis: int, keep: Optional[int] = None, banded: bool = False
) -> jax.Array:
    """Resizes one axis of `x` to `out_size` as `F.interpolate(mode="linear")` does;
    with `keep`, returns only the first `keep` samples of that resize.

    By default the two taps are gathered and blended, which XLA fuses with what follows
    (a threshold): fastest for batches of masks. `banded` applies them as a block-banded
    matmul instead (zeros off the band add nothing): faster on the CPU when the result
    is materialised and read several times (the generator's stability score)."""
    axis %= x.ndim
    in_size = x.shape[axis]
    keep = out_size if keep is None else keep
    if in_size == out_size:
        return jax.lax.slice_in_dim(x, 0, keep, axis=axis)
    if not banded:
        i0, i1, lam0, lam1 = (t[:keep] for t in linear_interpolation_taps(in_size, out_size))
        shape = [1] * x.ndim
        shape[axis] = keep
        weight = lambda lam: jnp.asarray(lam, x.dtype).reshape(shape)
        return jnp.take(x, i0, axis=axis) * weight(lam0) + jnp.take(x, i1, axis=axis) * weight(lam1)
    if axis < x.ndim - 2:
        moved = resize_linear(jnp.moveaxis(x, axis, -2), out_size, -2, keep, banded)
        return jnp.moveaxis(moved, -2, axis)
    starts, weights = banded_weights(in_size, out_size, keep)
    weights = jnp.asarray(weights, x.dtype)
    width = weights.shape[1]
    hi = jax.lax.Precision.HIGHEST
    if axis == x.ndim - 1:
        windows = jnp.stack([x[..., s : s + width] for s in starts], axis=-2)  # (..., G, window)
        out = jnp.einsum("...gw,gwo->...go", windows, weights, precision=hi)
        return out.reshape(*out.shape[:-2], -1)[..., :keep]
    windows = jnp.stack([x[..., s : s + width, :] for s in starts], axis=-3)  # (..., G, window, C)
    out = jnp.einsum("...gwc,gwo->...goc", windows, weights, precision=hi)
    return out.reshape(*out.shape[:-3], -1, out.shape[-1])[..., :keep, :]


def resize_bilinear(
    x: jax.Array, size: tuple[int, int], keep: Optional[tuple[int, int]] = None,
    banded: bool = False,
) -> jax.Array:
    """Resizes the last two axes (H, W) of `x` as `F.interpolate(mode="bilinear")` does;
    with `keep` = (h, w), returns only the top-left (h, w) of the result."""
    keep = keep or size
    # Width first, then height: the order PyTorch's kernel sums in.
    return resize_linear(resize_linear(x, size[1], -1, keep[1], banded), size[0], -2, keep[0], banded)
