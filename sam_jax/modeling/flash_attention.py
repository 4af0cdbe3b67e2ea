"""Flash attention with SAM's decomposed relative positions, as Pallas kernels (forward and backward).

    out = softmax(q k^T + rel_h[q, row(k)] + rel_w[q, col(k)]) v

over a grid of H x W tokens (key k sits at row k // W, column k % W). The
(tokens x tokens) bias is never formed: the kernels walk the keys one grid row
(W keys) at a time, so a row's bias is `rel_w` for that query tile plus one
column of `rel_h`, and keep the online-softmax state of FlashAttention-2 (running
max, sum, fp32 accumulator). The backward pass recomputes the probabilities
from the saved log-sum-exp: one kernel per query tile for dq, d rel_h, d rel_w,
one per key row for dk, dv. Memory is O(tokens x (head_dim + H + W)) per head.

Lowered by Triton on GPUs, Mosaic on TPUs, and in Pallas interpret mode on the
CPU (what the tests run). Shapes are padded to what the backend tiles need:
query count to a multiple of the query tile, W to the key-row length (padding
keys get a -1e30 bias, so they have zero weight), head_dim to a power of two
under Triton.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_NEG = -1e30  # bias of padding keys: exp(_NEG - max) is 0 in fp32
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the kernels tile one (tokens x tokens) attention: the backend's constraints."""

    block_q: int  # queries per program
    row_multiple: int  # a key row (W keys) is padded to a multiple of this
    pow2: bool  # Triton: every block dimension a power of two (head_dim and W padded up)
    interpret: bool  # Pallas interpret mode (the CPU)
    platform: str  # "gpu", "tpu" or "cpu"

    def row_len(self, w: int) -> int:
        if self.pow2:
            return max(16, 1 << (w - 1).bit_length())
        return -(-w // self.row_multiple) * self.row_multiple

    def head_dim(self, d: int) -> int:
        return max(16, 1 << (d - 1).bit_length()) if self.pow2 else d

    def rows(self, h: int) -> int:
        """Columns of the padded rel_h (one per key row; the padding columns are never selected)."""
        return 1 << (h - 1).bit_length() if self.pow2 else h

    def query_block(self, n: int) -> int:
        """Queries per program for N queries: at most `block_q`, at least what N needs."""
        if self.pow2:
            return min(self.block_q, max(16, 1 << (n - 1).bit_length()))
        return min(self.block_q, -(-n // 8) * 8)


def tiling_for(platform: str, block_q: int | None = None) -> Tiling:
    """The tiling for a JAX platform name ("gpu"/"cuda", "tpu", "cpu")."""
    if platform in ("gpu", "cuda", "rocm"):
        return Tiling(block_q or 64, 16, True, False, "gpu")
    if platform == "tpu":
        return Tiling(block_q or 128, 8, False, False, "tpu")
    return Tiling(block_q or 64, 1, False, True, "cpu")


def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array, rel_w: jax.Array, tiling: Tiling
) -> jax.Array:
    """Attention of every query over an H x W key grid with decomposed relative positions.

    Args:
      q: (B, N, d) queries, already scaled by head_dim ** -0.5; N = H * W.
      k, v: (B, N, d) keys and values in row-major grid order.
      rel_h: (B, N, H) each query's row term per key row (fp32).
      rel_w: (B, N, W) each query's column term per key column (fp32).
    Returns:
      (B, N, d) in q's dtype. Differentiable in all five inputs.
    """
    b, n, d = q.shape
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    if h * w != n or k.shape != q.shape or v.shape != q.shape or rel_h.shape[:2] != (b, n) or rel_w.shape[:2] != (b, n):
        raise ValueError(f"flash_attention needs q, k, v (B, H*W, d) and rel_h (B, N, H), rel_w (B, N, W); got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}, rel_h {rel_h.shape}, rel_w {rel_w.shape}")
    row_len, dp, block_q = tiling.row_len(w), tiling.head_dim(d), tiling.query_block(n)
    n_pad = -(-n // block_q) * block_q

    def keys(x):  # (B, H*W, d) -> (B, H*row_len, dp): zero keys/values pad each row
        x = x.reshape(b, h, w, d)
        return jnp.pad(x, ((0, 0), (0, 0), (0, row_len - w), (0, dp - d))).reshape(b, h * row_len, dp)

    rel_h = jnp.pad(rel_h.astype(_F32), ((0, 0), (0, 0), (0, tiling.rows(h) - h)))
    rel_w = jnp.pad(rel_w.astype(_F32), ((0, 0), (0, 0), (0, row_len - w)), constant_values=_NEG)
    queries = lambda x: jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0)))  # padded queries: discarded rows
    out = _flash(
        queries(jnp.pad(q, ((0, 0), (0, 0), (0, dp - d)))), keys(k), keys(v),
        queries(rel_h), queries(rel_w), num_rows=h, tiling=dataclasses.replace(tiling, block_q=block_q),
    )
    return out[:, :n, :d]


@functools.partial(jax.custom_vjp, nondiff_argnames=("num_rows", "tiling"))
def _flash(q, k, v, rel_h, rel_w, num_rows, tiling):
    return _forward(q, k, v, rel_h, rel_w, num_rows, tiling)[0]


def _flash_fwd(q, k, v, rel_h, rel_w, num_rows, tiling):
    out, lse = _forward(q, k, v, rel_h, rel_w, num_rows, tiling)
    return out, (q, k, v, rel_h, rel_w, out, lse)


def _flash_bwd(num_rows, tiling, residuals, d_out):
    q, k, v, rel_h, rel_w, out, lse = residuals
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)  # (B, Nq, 1)
    dq, d_rel_h, d_rel_w = _backward_queries(q, k, v, rel_h, rel_w, d_out, lse, delta, num_rows, tiling)
    dk, dv = _backward_keys(q, k, v, rel_h, rel_w, d_out, lse, delta, num_rows, tiling)
    return dq, dk, dv, d_rel_h, d_rel_w


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- kernels


def _dot(a, b, contract=(1, 1)):
    """a @ b^T by default (contracting both minor axes), accumulated in fp32."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=_F32)


def _row_column(rel_h, row):
    """(Tq, H') -> (Tq, 1): column `row` (traced), by a one-hot sum (no dynamic lane indexing)."""
    ids = jax.lax.broadcasted_iota(jnp.int32, (1, rel_h.shape[1]), 1)
    return jnp.sum(jnp.where(ids == row, rel_h, 0.0), axis=1, keepdims=True)


def _logits(q, k, rel_h, rel_w, row):
    """(Tq, d) queries against key row `row` (row_len, d) -> (Tq, row_len) fp32 logits."""
    return _dot(q, k) + rel_w + _row_column(rel_h, row)


def _forward_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, o_ref, lse_ref, *, num_rows, row_len):
    q, rel_h, rel_w = q_ref[...], rh_ref[...], rw_ref[...]
    block_q = q.shape[0]

    def row_step(row, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(row * row_len, row_len), :]
        v = v_ref[pl.ds(row * row_len, row_len), :]
        s = _logits(q, k, rel_h, rel_w, row)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + _dot(p.astype(v.dtype), v, (1, 0))

    init = (jnp.full((block_q, 1), -jnp.inf, _F32), jnp.zeros((block_q, 1), _F32),
            jnp.zeros((block_q, q.shape[1]), _F32))
    m, l, acc = jax.lax.fori_loop(0, num_rows, row_step, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _backward_queries_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref, lse_ref, delta_ref,
                             dq_ref, drh_ref, drw_ref, *, num_rows, row_len):
    q, rel_h, rel_w = q_ref[...], rh_ref[...], rw_ref[...]
    d_out, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]
    ids = jax.lax.broadcasted_iota(jnp.int32, (1, rel_h.shape[1]), 1)

    def row_step(row, carry):
        dq, d_rel_h, d_rel_w = carry
        k = k_ref[pl.ds(row * row_len, row_len), :]
        v = v_ref[pl.ds(row * row_len, row_len), :]
        p = jnp.exp(_logits(q, k, rel_h, rel_w, row) - lse)
        ds = p * (_dot(d_out, v) - delta)  # (Tq, row_len) d logits
        dq = dq + _dot(ds.astype(k.dtype), k, (1, 0))
        d_rel_h = d_rel_h + jnp.where(ids == row, jnp.sum(ds, axis=1, keepdims=True), 0.0)
        return dq, d_rel_h, d_rel_w + ds

    init = (jnp.zeros(q.shape, _F32), jnp.zeros(rel_h.shape, _F32), jnp.zeros(rel_w.shape, _F32))
    dq, d_rel_h, d_rel_w = jax.lax.fori_loop(0, num_rows, row_step, init)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    drh_ref[...] = d_rel_h
    drw_ref[...] = d_rel_w


def _backward_keys_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                          *, block_q):
    k, v = k_ref[...], v_ref[...]  # this program's key row: (row_len, d)
    row = pl.program_id(1)

    def query_step(t, carry):
        dk, dv = carry
        rows = pl.ds(t * block_q, block_q)
        q, d_out = q_ref[rows, :], do_ref[rows, :]
        p = jnp.exp(_logits(q, k, rh_ref[rows, :], rw_ref[rows, :], row) - lse_ref[rows, :])
        ds = p * (_dot(d_out, v) - delta_ref[rows, :])
        dv = dv + _dot(p.astype(d_out.dtype), d_out, (0, 0))
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, query_step, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _compiler_params(tiling: Tiling):
    if tiling.platform == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    if tiling.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return None


def _call(kernel, grid, in_specs, out_specs, out_shape, tiling, name):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=tiling.interpret, compiler_params=_compiler_params(tiling), name=name,
    )


def _per_query_tile(width, block_q):
    return pl.BlockSpec((None, block_q, width), lambda g, i: (g, i, 0))


def _whole(length, width):
    return pl.BlockSpec((None, length, width), lambda g, i: (g, 0, 0))


def _forward(q, k, v, rel_h, rel_w, num_rows, tiling):
    b, nq, d = q.shape
    nk, cols, row_len, bq = k.shape[1], rel_h.shape[-1], rel_w.shape[-1], tiling.block_q
    tile = functools.partial(_per_query_tile, block_q=bq)
    kernel = functools.partial(_forward_kernel, num_rows=num_rows, row_len=row_len)
    return _call(
        kernel, (b, nq // bq),
        [tile(d), _whole(nk, d), _whole(nk, d), tile(cols), tile(row_len)],
        [tile(d), tile(1)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, nq, 1), _F32)],
        tiling, "sam_flash_attention_fwd",
    )(q, k, v, rel_h, rel_w)


def _backward_queries(q, k, v, rel_h, rel_w, d_out, lse, delta, num_rows, tiling):
    b, nq, d = q.shape
    nk, cols, row_len, bq = k.shape[1], rel_h.shape[-1], rel_w.shape[-1], tiling.block_q
    tile = functools.partial(_per_query_tile, block_q=bq)
    kernel = functools.partial(_backward_queries_kernel, num_rows=num_rows, row_len=row_len)
    return _call(
        kernel, (b, nq // bq),
        [tile(d), _whole(nk, d), _whole(nk, d), tile(cols), tile(row_len), tile(d), tile(1), tile(1)],
        [tile(d), tile(cols), tile(row_len)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(rel_h.shape, _F32),
         jax.ShapeDtypeStruct(rel_w.shape, _F32)],
        tiling, "sam_flash_attention_bwd_queries",
    )(q, k, v, rel_h, rel_w, d_out, lse, delta)


def _backward_keys(q, k, v, rel_h, rel_w, d_out, lse, delta, num_rows, tiling):
    b, nq, d = q.shape
    cols, row_len = rel_h.shape[-1], rel_w.shape[-1]
    whole = lambda width: _whole(nq, width)
    key_row = pl.BlockSpec((None, row_len, d), lambda g, r: (g, r, 0))
    kernel = functools.partial(_backward_keys_kernel, block_q=tiling.block_q)
    return _call(
        kernel, (b, num_rows),
        [whole(d), key_row, key_row, whole(cols), whole(row_len), whole(d), whole(1), whole(1)],
        [key_row, key_row],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        tiling, "sam_flash_attention_bwd_keys",
    )(q, k, v, rel_h, rel_w, d_out, lse, delta)

