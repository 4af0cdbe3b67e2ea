"""The image encoder's attention core, and which implementation computes it on which backend.

    out = softmax(q k^T + rel_h[q, row(k)] + rel_w[q, col(k)]) v      (per head, over an H x W grid)

Implementations (`ImageEncoderViT(attention_impl=...)`, `Sam(attention_impl=...)`):

- "xla": logits, fp32 softmax and the value product as XLA ops, global attention
  in chunks of `query_chunk_size` queries. Runs everywhere; the CPU default.
- "dot_product": `jax.nn.dot_product_attention` with the bias formed per block:
  cuDNN's fused kernel on GPUs for bf16/fp16, XLA elsewhere. For windowed blocks,
  whose bias is small (196 x 196 per head).
- "flash": the Pallas kernels of `flash_attention.py`, which form the
  relative-position terms per tile and never the (tokens x tokens) bias: Triton on
  GPUs, Mosaic on TPUs, interpret mode on the CPU (slow; for tests).
- "auto": on GPUs, "flash" for global blocks and "dot_product" for windowed ones
  (bf16/fp16; fp32 stays "xla"); on TPUs "flash" for global blocks; "xla" on the
  CPU and for everything else. An accelerator path is first compiled alone once
  per shape; if that fails, a warning names the error and "xla" is used.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from sam_jax.modeling.common import Dtype, softmax_fp32
from sam_jax.modeling.flash_attention import flash_attention, tiling_for

ATTENTION_IMPLS = ("auto", "xla", "dot_product", "flash")


def check_attention_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose from {ATTENTION_IMPLS}")


def rel_pos_attention(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    rel_h: jax.Array,
    rel_w: jax.Array,
    *,
    impl: str,
    windowed: bool,
    dtype: Dtype,
    query_chunk_size: Optional[int] = None,
) -> jax.Array:
    """Attention over an H x W grid with decomposed relative positions.

    Args:
      queries: (B, heads, N, d), already scaled by d ** -0.5; N = H * W.
      keys, values: (B, heads, N, d).
      rel_h: (B, heads, N, H) and rel_w: (B, heads, N, W) fp32 relative-position terms.
      impl: one of ATTENTION_IMPLS; `windowed` says which kind of block asks ("auto").
    Returns:
      (B, heads, N, d) in `dtype`.
    """
    b, n, tokens, d = queries.shape
    grid = (rel_h.shape[-1], rel_w.shape[-1])
    impl = resolve_attention_impl(impl, windowed=windowed, dtype=dtype, head_dim=d, grid=grid)
    if impl == "flash":
        flat = lambda t: t.reshape(b * n, tokens, t.shape[-1])
        tiling = tiling_for(jax.default_backend())
        out = flash_attention(flat(queries), flat(keys), flat(values), flat(rel_h), flat(rel_w), tiling)
        return out.reshape(b, n, tokens, d).astype(dtype)
    if impl == "dot_product":
        return _dot_product(queries, keys, values, rel_h, rel_w, dtype)
    return _xla(queries, keys, values, rel_h, rel_w, dtype, query_chunk_size)


def resolve_attention_impl(impl: str, *, windowed: bool, dtype: Dtype, head_dim: int, grid: tuple[int, int]) -> str:
    """The implementation `impl` means for one block on this backend: "auto" resolved, the rest as given."""
    check_attention_impl(impl)
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu":
        wanted = "dot_product" if windowed else "flash"
        if wanted == "dot_product" and not (half and head_dim % 8 == 0):
            return "xla"
    elif backend == "tpu" and not windowed:
        wanted = "flash"
    else:
        return "xla"
    return wanted if _compiles(wanted, jnp.dtype(dtype).name, head_dim, grid) else "xla"


@functools.lru_cache(maxsize=None)
def _compiles(impl: str, dtype: str, head_dim: int, grid: tuple[int, int]) -> bool:
    """Whether one head of `impl` (forward and backward) compiles here for this shape."""
    tokens = grid[0] * grid[1]
    arg = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
    args = (arg(1, 1, tokens, head_dim),) * 3 + (arg(1, 1, tokens, grid[0], dt="float32"),
                                                  arg(1, 1, tokens, grid[1], dt="float32"))

    def loss(*a):
        out = rel_pos_attention(*a, impl=impl, windowed=impl == "dot_product", dtype=jnp.dtype(dtype))
        return jnp.sum(out.astype(jnp.float32))

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return True
    except Exception as error:  # a backend without the kernel's features: fall back, loudly
        warnings.warn(f"attention_impl='auto': {impl!r} does not compile on {jax.default_backend()} for "
                      f"{dtype}, head_dim {head_dim}, grid {grid} ({type(error).__name__}: {str(error)[:300]}); "
                      f"using 'xla'", RuntimeWarning, stacklevel=2)
        return False


def _xla(queries, keys, values, rel_h, rel_w, dtype, query_chunk_size):
    b, n, tokens, d = queries.shape
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    f32 = dict(preferred_element_type=jnp.float32)
    keys_t = jnp.swapaxes(keys, 2, 3)  # (B, heads, d, N), transposed once rather than per chunk

    def attend(q_c, rel_h_c, rel_w_c):
        """(B, heads, Q, d) queries and their rel-pos terms -> (B, heads, Q, d)."""
        logits = jnp.einsum("bnqd,bndk->bnqk", q_c, keys_t, **f32)
        logits = logits.reshape(*q_c.shape[:3], h, w) + rel_h_c[..., None] + rel_w_c[..., None, :]
        attn = softmax_fp32(logits.reshape(*q_c.shape[:3], tokens), dtype)
        return jnp.einsum("bnqk,bnkd->bnqd", attn, values)

    chunk = query_chunk_size
    if chunk is None or tokens <= chunk or tokens % chunk:
        return attend(queries, rel_h, rel_w)
    # Chunks of queries keep each chunk's logits (heads x chunk x N) in cache;
    # the all-at-once logits of a 64x64 grid are 64 MB per head.
    split = lambda t: jnp.moveaxis(t.reshape(b, n, -1, chunk, t.shape[-1]), 2, 0)
    out = jax.lax.map(lambda a: attend(*a), (split(queries), split(rel_h), split(rel_w)))
    return jnp.moveaxis(out, 0, 2).reshape(b, n, tokens, d)


def _dot_product(queries, keys, values, rel_h, rel_w, dtype):
    b, n, tokens, d = queries.shape
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, tokens, tokens)
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn = jax.default_backend() == "gpu" and half
    heads_second = lambda t: jnp.swapaxes(t, 1, 2).astype(dtype)  # (B, N, heads, d), the function's layout
    out = jax.nn.dot_product_attention(
        heads_second(queries), heads_second(keys), heads_second(values), bias.astype(dtype if cudnn else jnp.float32),
        scale=1.0, implementation="cudnn" if cudnn else None,
    )
    return jnp.swapaxes(out, 1, 2).astype(dtype)
