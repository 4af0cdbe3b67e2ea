"""The mask decoder (`segment_anything.modeling.mask_decoder`), channels-last.

Output tokens (IoU token + 1 single-mask + 3 multimask tokens) are prepended
to the prompt tokens; after the two-way transformer, the image keys are
upscaled 4x by two stride-2 transposed convs and each mask token's
hypernetwork MLP gives the weights of a dot product with the upscaled map.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import MLP, Dtype, LayerNorm, gelu
from sam_jax.modeling.transformer import TwoWayTransformer


class SubpixelConvTranspose(nn.Module):
    """PyTorch's ConvTranspose2d(kernel_size=2, stride=2) in sub-pixel layout: every input
    pixel becomes a 2x2 block, (..., I) -> (..., 2, 2, O), out[..., a, b, :] being output
    pixel (2i + a, 2j + b). One matmul; the caller rearranges pixels when it needs them.

    `kernel` is (2, 2, O, I), the layout of `nn.ConvTranspose(transpose_kernel=True)`:
    kernel[a, b, o, i] = torch weight[i, o, a, b].
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2, 2, self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        # One matmul against the (I, 2*2*O) kernel: einsum("...i,aboi->...abo"), in the form an
        # ONNX export runs fastest (onnxruntime's Einsum is slower than its MatMul).
        i, o = x.shape[-1], self.features
        matrix = kernel.astype(self.dtype).reshape(4 * o, i).T
        y = jnp.dot(x.astype(self.dtype), matrix).reshape(*x.shape[:-1], 2, 2, o)
        return y + bias.astype(self.dtype)


class MaskDecoder(nn.Module):
    transformer_dim: int
    transformer_depth: int = 2
    transformer_num_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.transformer_dim
        self.iou_token = nn.Embed(1, d, param_dtype=self.param_dtype)
        self.mask_tokens = nn.Embed(self.num_mask_tokens, d, param_dtype=self.param_dtype)
        self.transformer = TwoWayTransformer(
            self.transformer_depth,
            self.transformer_num_heads,
            self.transformer_mlp_dim,
            self.attention_downsample_rate,
            **kw,
        )
        up = lambda n: SubpixelConvTranspose(n, **kw)
        self.output_upscaling_0 = up(d // 4)
        self.output_upscaling_1 = LayerNorm(**kw)
        self.output_upscaling_3 = up(d // 8)
        self.output_hypernetworks_mlps = [MLP(d, d // 8, 3, **kw) for _ in range(self.num_mask_tokens)]
        self.iou_prediction_head = MLP(
            self.iou_head_hidden_dim, self.num_mask_tokens, self.iou_head_depth, **kw
        )

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
        sparse_prompt_mask: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Predicts masks from image and prompt embeddings.

        Args:
          image_embeddings: (B, h, w, D), or (1, h, w, D) shared by all B prompts.
          image_pe: (1, h, w, D).
          sparse_prompt_embeddings: (B, N, D).
          dense_prompt_embeddings: (B, h, w, D), or (1, h, w, D) shared by all B prompts.
          multimask_output: static; True returns tokens 1..3, False token 0 (only those are decoded).
          sparse_prompt_mask: optional (B, N) bool, False for padding tokens.
        Returns:
          masks (B, C, 4h, 4w) logits and iou_pred (B, C), C = 3 or 1.
        """
        returned = range(1, self.num_mask_tokens) if multimask_output else range(1)
        return self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                  dense_prompt_embeddings, sparse_prompt_mask, returned)

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                      dense_prompt_embeddings, sparse_prompt_mask=None,
                      mask_token_ids: Optional[range] = None) -> tuple[jax.Array, jax.Array]:
        """Masks (B, T, 4h, 4w) and IoU predictions (B, T) of the mask tokens `mask_token_ids`
        (static; default all 1 + num_multimask_outputs). Every token takes part in the
        transformer's layers; only the IoU token and the returned ones run its final attention,
        their hypernetwork and mask product, the same numbers as slicing all of them."""
        ids = range(self.num_mask_tokens) if mask_token_ids is None else mask_token_ids
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = jnp.concatenate(
            [self.iou_token.embedding, self.mask_tokens.embedding]
        ).astype(self.dtype)
        output_tokens = jnp.broadcast_to(output_tokens, (b, *output_tokens.shape))
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(self.dtype)], 1)

        src = image_embeddings.astype(self.dtype) + dense_prompt_embeddings.astype(self.dtype)
        token_mask = None
        if sparse_prompt_mask is not None:  # output tokens are always attended to
            token_mask = jnp.concatenate([jnp.ones(output_tokens.shape[:2], bool), sparse_prompt_mask], 1)
        if self.is_initializing():  # every hypernetwork owns params, whichever tokens are asked for
            ids = range(self.num_mask_tokens)
        hs, src = self.transformer(src, image_pe.astype(self.dtype), tokens, token_mask,
                                   output_ids=(0, *(1 + i for i in ids)))
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:]  # (B, T, D), the tokens `ids`

        h, w = image_embeddings.shape[1:3]
        x = src.reshape(b, h, w, self.transformer_dim)
        # Upscaling in sub-pixel layout: pixel (4i + 2a + c, 4j + 2b + d) is x[:, i, j, a, b, c, d];
        # only the T final masks are rearranged to image layout.
        x = gelu(self.output_upscaling_1(self.output_upscaling_0(x)))  # (B, h, w, 2, 2, D/4)
        x = gelu(self.output_upscaling_3(x))  # (B, h, w, 2, 2, 2, 2, D/8)
        hyper_in = jnp.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, t]) for t, i in enumerate(ids)], axis=1
        )  # (B, T, D/8)
        # The product in the map's own (sub-pixel, channels-last) order, tokens last, then the
        # T masks rearranged: a tokens-first product has XLA copy the D/8-channel map
        # channels-first (D/8 / T times the data of the masks' rearrangement).
        masks = jnp.einsum("nijabcdz,ntz->nijabcdt", x, hyper_in)
        masks = jnp.transpose(masks, (0, 7, 1, 3, 5, 2, 4, 6))  # (B, T, i, a, c, j, b, d)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, ids.start:ids.stop:ids.step]
        return masks.reshape(b, -1, 4 * h, 4 * w), iou_pred
