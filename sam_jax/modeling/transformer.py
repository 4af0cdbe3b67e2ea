"""The decoder's two-way transformer (`segment_anything.modeling.transformer`).

Tokens (prompts + output tokens) and image keys attend to each other in turn.
LayerNorm epsilon is PyTorch's default 1e-5 here, unlike the encoder's 1e-6.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import Dtype, LayerNorm, MLPBlock, softmax_fp32

DECODER_LN_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`."""

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
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        heads = lambda x: x.reshape(*x.shape[:2], self.num_heads, -1)  # (B, N, heads, c)
        q = heads(dense(internal_dim, "q_proj")(q))
        k = heads(dense(internal_dim, "k_proj")(k))
        v = heads(dense(internal_dim, "v_proj")(v))
        # Queries or keys/values may have batch 1, shared by all B prompts (the decoder's
        # first layer sees the same image for every prompt): then they are projected once.
        b = max(q.shape[0], k.shape[0])
        sq, sk = ("b" if x.shape[0] == b else "" for x in (q, k))
        shared = lambda x, s: x if s else x[0]
        logits = jnp.einsum(f"{sq}qnc,{sk}knc->bnqk", shared(q, sq), shared(k, sk),
                            preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(q.shape[-1])
        if key_mask is not None:  # exp(-inf) = 0: a masked key adds exactly nothing
            logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        attn = softmax_fp32(logits, self.dtype)
        out = jnp.einsum(f"bnqk,{sk}knc->bqnc", attn, shared(v, sk))
        return dense(embedding_dim, "out_proj")(out.reshape(b, q.shape[1], internal_dim))


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
    def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None):
        """Runs the transformer.

        Args:
          image_embedding: (B, h, w, D), or (1, h, w, D) shared by all B prompts.
          image_pe: (B, h, w, D) positional encoding of the image grid.
          point_embedding: (B, N, D) tokens.
          token_mask: optional (B, N) bool; False tokens (padding) are never
            attended to, so they change no other output.
        Returns:
          queries (B, N, D) and keys (B, h * w, D).
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
        queries = queries + final(queries + point_embedding, keys + key_pe, keys)
        queries = LayerNorm(DECODER_LN_EPS, name="norm_final_attn", **kw)(queries)
        return queries, keys
