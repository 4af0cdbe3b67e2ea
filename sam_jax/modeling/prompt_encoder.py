"""The prompt encoder (`segment_anything.modeling.prompt_encoder`), channels-last.

Sparse prompts (points, box corners) become random-Fourier positional
encodings plus a learned type embedding; a dense mask prompt is downscaled 4x
by two strided convs to the embedding grid, or replaced by `no_mask_embed`.
With a text-prompt head (`text_embed_dim`, the paper's section 7.5) a CLIP
embedding becomes one more sparse token by a learned linear projection, placed
first; the head is absent from the released models' params.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import Dtype, LayerNorm, PatchConv, gelu

# Point labels, as the official code uses them.
NOT_A_POINT = -1  # the official padding token: zero encoding + `not_a_point_embed`
BACKGROUND = 0
FOREGROUND = 1
# A box's corners given as points (as SAM 2's prompt encoder takes them), so a
# fixed-shape training batch can hold a box or no box: embedded exactly as
# `boxes` embeds them.
BOX_TOP_LEFT = 2
BOX_BOTTOM_RIGHT = 3
# sam_jax only: an absent point, for fixed-shape batches. `Sam.decode` masks it
# out of attention, so a prompt padded with it predicts what it would without.
PADDING = -10


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (a fixed (2, F) Gaussian matrix).

    The matrix is a buffer in PyTorch; here it is a param named as the buffer,
    so that loading is strict. It is not meant to be trained.
    """

    num_pos_feats: int

    def setup(self):
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix",
            nn.initializers.normal(stddev=1.0),
            (2, self.num_pos_feats),
            jnp.float32,
        )

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """(..., 2) coords in [0, 1] -> (..., 2F) [sin, cos] features."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.astype(jnp.float32)
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def dense(self, size: tuple[int, int]) -> jax.Array:
        """(h, w, 2F) encoding of every pixel centre of an h x w grid."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self._pe_encoding(grid)

    def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """(B, N, 2) pixel (x, y) coords in an image of `image_size` (H, W) -> (B, N, 2F)."""
        coords = coords.astype(jnp.float32)
        coords = coords / jnp.array([image_size[1], image_size[0]], jnp.float32)
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    """Embeds points, boxes and mask prompts for the mask decoder."""

    embed_dim: int
    image_embedding_size: tuple[int, int]  # (h, w) of the image embedding
    input_image_size: tuple[int, int]  # (H, W) of the padded encoder input
    mask_in_chans: int
    text_embed_dim: Optional[int] = None  # CLIP embedding size; None: no text-prompt head
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = lambda n: nn.Embed(n, self.embed_dim, param_dtype=self.param_dtype)
        self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
        # pos/neg point, then the two box corners.
        self.point_embeddings = [embed(1) for _ in range(4)]
        self.not_a_point_embed = embed(1)
        self.no_mask_embed = embed(1)
        c = self.mask_in_chans
        self.mask_downscaling_0 = PatchConv(c // 4, 2, **kw)
        self.mask_downscaling_1 = LayerNorm(**kw)
        self.mask_downscaling_3 = PatchConv(c, 2, **kw)
        self.mask_downscaling_4 = LayerNorm(**kw)
        self.mask_downscaling_6 = PatchConv(self.embed_dim, 1, **kw)
        if self.text_embed_dim is not None:
            self.text_projection = nn.Dense(self.embed_dim, param_dtype=self.param_dtype)

    def get_dense_pe(self) -> jax.Array:
        """(1, h, w, embed_dim) positional encoding of the image embedding grid."""
        return self.pe_layer.dense(self.image_embedding_size)[None]

    def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """(B, N, 2), (B, N) -> (B, N + pad, D); label -1 marks a not-a-point, 2 / 3 box corners."""
        points = points.astype(jnp.float32) + 0.5  # pixel centre
        labels = labels.astype(jnp.int32)
        if pad:
            points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), jnp.float32)], 1)
            labels = jnp.concatenate([labels, jnp.full((labels.shape[0], 1), NOT_A_POINT, jnp.int32)], 1)
        emb = self.pe_layer.with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = jnp.where(labels == NOT_A_POINT, self.not_a_point_embed.embedding[0], emb)
        emb = jnp.where(labels == BACKGROUND, emb + self.point_embeddings[0].embedding[0], emb)
        emb = jnp.where(labels == FOREGROUND, emb + self.point_embeddings[1].embedding[0], emb)
        emb = jnp.where(labels == BOX_TOP_LEFT, emb + self.point_embeddings[2].embedding[0], emb)
        emb = jnp.where(labels == BOX_BOTTOM_RIGHT, emb + self.point_embeddings[3].embedding[0], emb)
        return emb

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """(B, 4) XYXY -> (B, 2, D) corner embeddings."""
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        emb = self.pe_layer.with_coords(corners, self.input_image_size)
        corner_types = jnp.stack(
            [self.point_embeddings[2].embedding[0], self.point_embeddings[3].embedding[0]]
        )
        return emb + corner_types

    def embed_text(self, embeddings: jax.Array) -> jax.Array:
        """(B, E) CLIP embeddings (L2-normalised text or image embeddings) -> (B, 1, D) tokens."""
        return self.text_projection(embeddings.astype(jnp.float32))[:, None]

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """(B, 1, 4h, 4w) mask logits -> (B, h, w, D)."""
        x = masks.reshape(masks.shape[0], *masks.shape[2:], 1).astype(self.dtype)
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
        x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(
        self,
        points: Optional[tuple[jax.Array, jax.Array]],
        boxes: Optional[jax.Array],
        masks: Optional[jax.Array],
        text: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Embeds prompts.

        Args:
          points: (coords (B, N, 2) as (x, y) in input-frame pixels, labels (B, N)).
          boxes: (B, 4) XYXY in input-frame pixels.
          masks: (B, 1, 4h, 4w) mask logits.
          text: (B, E) CLIP embeddings (needs the text-prompt head).
        Returns:
          sparse (B, N', D): the text token if any, the points with a padding point
          appended when there is no box, the box corners; dense (B, h, w, D).
        """
        # Read before branching so that init creates them whatever the prompts.
        no_mask = self.no_mask_embed.embedding[0]
        if self.text_embed_dim is not None and self.is_initializing() and text is None:
            self.embed_text(jnp.zeros((1, self.text_embed_dim), jnp.float32))
        if text is not None:
            bs = text.shape[0]
        elif points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        sparse = [jnp.zeros((bs, 0, self.embed_dim), jnp.float32)]
        if text is not None:
            sparse.append(self.embed_text(text))
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse = jnp.concatenate(sparse, axis=1)

        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(no_mask, (bs, h, w, self.embed_dim))
        return sparse.astype(self.dtype), dense.astype(self.dtype)
