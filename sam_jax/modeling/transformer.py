"""The decoder's two-way transformer (`segment_anything.modeling.transformer`).

Tokens (prompts + output tokens) and image keys attend to each other in turn.
LayerNorm epsilon is PyTorch's default 1e-5 here, unlike the encoder's 1e-6.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import Dtype, LayerNorm, MLPBlock, softmax_fp32

DECODER_LN_EPS = 1e-5


class Linear(nn.Module):
    """`nn.Dense`'s parameters (kernel (in, out), bias (out,)), exposed so that `Attention` can
    multiply them in another order."""

    in_features: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.in_features, self.features),
                                 self.param_dtype)
        self.bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.kernel.astype(self.dtype)) + self.bias.astype(self.dtype)


def _many_few(length, head_width: int) -> tuple[bool, bool]:
    """(length > head_width, length < head_width). A symbolic length (the prompt tokens of a
    decoder exported for any number of points) counts as few: prompts have a few points."""
    if jax.export.is_symbolic_dim(length):
        return False, True
    return length > head_width, length < head_width


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`.

    The decoder's cross-attentions pair a few tokens (T, ~7) with a prompt's own h*w image
    keys or queries. Where that side is per prompt and T is below the head width c, its
    projections are folded into the small side instead (q W_k^T k^T = (q W_k^T) k^T,
    A (v W_v) = (A v) W_v, (A v') W_o = A (v' W_o), using that softmax rows sum to 1):
    h*w x D x T instead of h*w x D x c multiplications per head, the same function.
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask=None) -> jax.Array:
        """(B, Nq, D), (B, Nk, D), (B, Nk, D) -> (B, Nq, D); keys where key_mask (B, Nk) is False
        are ignored. Either q or k and v may have batch 1 (shared by all B)."""
        embedding_dim = q.shape[-1]
        internal_dim = embedding_dim // self.downsample_rate
        if internal_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide internal dim {internal_dim}")
        n, c = self.num_heads, internal_dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_proj, k_proj, v_proj = (Linear(embedding_dim, internal_dim, name=f"{x}_proj", **kw) for x in "qkv")
        out_proj = Linear(internal_dim, embedding_dim, name="out_proj", **kw)
        heads = lambda x: x.reshape(*x.shape[:2], n, c)  # (B, N, heads, c)
        per_head = lambda linear: linear.kernel.astype(self.dtype).reshape(-1, n, c)  # (D, heads, c)
        f32 = dict(preferred_element_type=jnp.float32)
        b = max(q.shape[0], k.shape[0])
        # Queries or keys/values may have batch 1, shared by all B prompts (the decoder's
        # first layer sees the same image for every prompt): then they are projected once.
        own = q.shape[0] == k.shape[0] == v.shape[0]  # no side shared by the B prompts
        (many_q, few_q), (many_k, few_k) = (_many_few(x.shape[1], c) for x in (q, k))
        fold_keys = own and many_k and few_q  # few queries, a prompt's own keys
        fold_queries = own and many_q and few_k  # a prompt's own queries, few keys
        fold_out = many_q and few_k and k.shape[0] == v.shape[0] == b

        if fold_keys:
            qh = heads(q_proj(q))  # (B, T, heads, c)
            g = jnp.einsum("btnc,dnc->bntd", qh, per_head(k_proj))
            # k_proj's bias adds q.b_k to a query's every logit: softmax cancels it, so it is left out.
            logits = jnp.einsum("bntd,bkd->bntk", g, k.astype(self.dtype), **f32)
        elif fold_queries:
            kh = heads(k_proj(k))  # (B, T, heads, c)
            g = jnp.einsum("btnc,dnc->bntd", kh, per_head(q_proj))
            logits = jnp.einsum("bqd,bntd->bnqt", q.astype(self.dtype), g, **f32)
            logits = logits + jnp.einsum("btnc,nc->bnt", kh, q_proj.bias.astype(self.dtype).reshape(n, c))[:, :, None, :]
        else:
            qh, kh = heads(q_proj(q)), heads(k_proj(k))
            sq, sk = ("b" if x.shape[0] == b else "" for x in (qh, kh))
            shared = lambda x, s: x if s else x[0]
            logits = jnp.einsum(f"{sq}qnc,{sk}knc->bnqk", shared(qh, sq), shared(kh, sk), **f32)
        logits = logits / math.sqrt(c)
        if key_mask is not None:  # exp(-inf) = 0: a masked key adds exactly nothing
            logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        attn = softmax_fp32(logits, self.dtype)  # (B, heads, Nq, Nk)

        if fold_keys:
            pooled = jnp.einsum("bnqk,bkd->bnqd", attn, v.astype(self.dtype))
            out = jnp.einsum("bnqd,dnc->bqnc", pooled, per_head(v_proj)) + v_proj.bias.astype(self.dtype).reshape(n, c)
            return out_proj(out.reshape(b, q.shape[1], internal_dim))
        vh = heads(v_proj(v))
        if fold_out:
            u = jnp.einsum("bknc,ncd->bnkd", vh, out_proj.kernel.astype(self.dtype).reshape(n, c, -1))
            return jnp.einsum("bnqk,bnkd->bqd", attn, u) + out_proj.bias.astype(self.dtype)
        sk = "b" if vh.shape[0] == b else ""
        out = jnp.einsum(f"bnqk,{sk}knc->bqnc", attn, vh if sk else vh[0])
        return out_proj(out.reshape(b, q.shape[1], internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn."""

    num_heads: int
    mlp_dim: int
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: LayerNorm(DECODER_LN_EPS, name=name, **kw)
        cross = lambda name: Attention(self.num_heads, self.attention_downsample_rate, name=name, **kw)

        self_attn = Attention(self.num_heads, name="self_attn", **kw)
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries, token_mask)
        queries = norm("norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = norm("norm2")(queries + cross("cross_attn_token_to_image")(q, k, keys))

        mlp = MLPBlock(self.mlp_dim, act=nn.relu, name="mlp", **kw)
        queries = norm("norm3")(queries + mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = norm("norm4")(keys + cross("cross_attn_image_to_token")(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int
    attention_downsample_rate: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None,
                 output_ids: Optional[tuple[int, ...]] = None):
        """Runs the transformer.

        Args:
          image_embedding: (B, h, w, D), or (1, h, w, D) shared by all B prompts.
          image_pe: (B, h, w, D) positional encoding of the image grid.
          point_embedding: (B, N, D) tokens.
          token_mask: optional (B, N) bool; False tokens (padding) are never
            attended to, so they change no other output.
          output_ids: static indices of the tokens to return (default all N). The final
            token-to-image attention and its LayerNorm act on each token alone, so they
            run only for these: the same numbers as slicing all N.
        Returns:
          queries (B, len(output_ids), D) and keys (B, h * w, D).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, d = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, d)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, d)
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads,
                self.mlp_dim,
                self.attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                name=f"layers_{i}",
                **kw,
            )(queries, keys, point_embedding, key_pe, token_mask)
        final = Attention(
            self.num_heads, self.attention_downsample_rate, name="final_attn_token_to_image", **kw
        )
        if output_ids is not None:
            ids = list(output_ids)
            ids = slice(ids[0], ids[-1] + 1) if ids == list(range(ids[0], ids[-1] + 1)) else np.asarray(ids)
            queries, point_embedding = queries[:, ids], point_embedding[:, ids]
        queries = queries + final(queries + point_embedding, keys + key_pe, keys)
        queries = LayerNorm(DECODER_LN_EPS, name="norm_final_attn", **kw)(queries)
        return queries, keys
