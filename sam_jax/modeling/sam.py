"""`Sam`: image encoder + prompt encoder + mask decoder, with SAM's pre- and postprocessing.

Images are channels-last (H, W, 3) RGB. `preprocess` normalises and zero-pads
to the square encoder input; `postprocess_masks` upsamples the 4h x 4w mask
logits to the encoder input size, crops the padding and resizes to the
original image size, as `segment_anything.modeling.Sam` does.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.configs import SamConfig
from sam_jax.modeling.common import Dtype
from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.interpolate import resize_bilinear
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, PADDING, PromptEncoder


class Sam(nn.Module):
    config: SamConfig
    dtype: Dtype = jnp.float32  # compute dtype; LayerNorm and softmax stay fp32
    param_dtype: Dtype = jnp.float32
    scan_blocks: bool = False  # encoder blocks under nn.scan (stacked param layout)
    remat_policy: Optional[str] = None  # see image_encoder.REMAT_POLICIES
    # Training only: encoder stochastic depth, rising linearly over the blocks to this rate
    # (the paper: 0.4 ViT-H/L, 0.6 ViT-B); active in `encode_image(..., deterministic=False)`.
    drop_path_rate: float = 0.0
    # Global attention over chunks of this many queries (see ImageEncoderViT); None: all at once.
    query_chunk_size: Optional[int] = 32
    # Encoder attention implementation (`sam_jax.modeling.attention`): "auto", "xla", "dot_product", "flash".
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.image_encoder = ImageEncoderViT(
            cfg.encoder, scan_blocks=self.scan_blocks, remat_policy=self.remat_policy,
            drop_path_rate=self.drop_path_rate, query_chunk_size=self.query_chunk_size,
            attention_impl=self.attention_impl, **kw
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(cfg.embedding_size, cfg.embedding_size),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
            text_embed_dim=cfg.text_embed_dim,
            **kw,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer_depth=cfg.decoder_depth,
            transformer_num_heads=cfg.decoder_num_heads,
            transformer_mlp_dim=cfg.decoder_mlp_dim,
            attention_downsample_rate=cfg.attention_downsample_rate,
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            **kw,
        )

    def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """(B, S, S, 3) preprocessed images -> (B, h, w, D) image embeddings.

        `deterministic=False` (training) applies `drop_path_rate`, drawing per-sample masks
        from the 'dropout' rng: `model.apply(v, x, False, method=Sam.encode_image,
        rngs={"dropout": key})`. The default is the inference graph, whatever the rate.
        """
        return self.image_encoder(images, deterministic)

    def decode(
        self,
        image_embeddings: jax.Array,
        point_coords: Optional[jax.Array] = None,
        point_labels: Optional[jax.Array] = None,
        boxes: Optional[jax.Array] = None,
        mask_inputs: Optional[jax.Array] = None,
        multimask_output: bool = True,
        text_embeddings: Optional[jax.Array] = None,
        image_pe: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Predicts low-res mask logits for B prompts on one image (or B images).

        Args:
          image_embeddings: (1 or B, h, w, D).
          point_coords: (B, N, 2) (x, y) in the encoder input frame; with
            point_labels (B, N): 1 foreground, 0 background, -1 not-a-point,
            -10 padding (masked out: as if the point were not there).
          boxes: (B, 4) XYXY in the encoder input frame.
          mask_inputs: (B, 1, 4h, 4w) mask logits from an earlier prediction.
          multimask_output: static; 3 masks if True, else the single-mask token.
          text_embeddings: (B, E) CLIP embeddings, the first prompt token (a model
            with a text-prompt head, `config.text_embed_dim` = E). A row of zeros
            (never an L2-normalised embedding) is no text prompt: masked out, as a
            PADDING point is, so a fixed-shape batch can mix prompts with and without.
          image_pe: (1, h, w, D) `get_dense_pe()`, or None to compute it here. It depends on
            the params only: a caller that decodes one prompt at a time computes it once.
        Returns:
          low_res_logits (B, C, 4h, 4w) and iou_predictions (B, C).
        """
        self._check_prompts(image_embeddings, point_coords, point_labels, boxes, mask_inputs, text_embeddings,
                            image_pe)
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs, text_embeddings)
        if mask_inputs is None:
            # Every row is `no_mask_embed`: with one image, the decoder's first layer then
            # does its image-side work once for all prompts.
            dense = dense[:1]
        sparse_mask = None
        b = sparse.shape[0]
        text = jnp.ones((b, 0), bool)
        if text_embeddings is not None:
            text = jnp.broadcast_to(jnp.any(text_embeddings != 0, axis=1, keepdims=True), (b, 1))
            sparse_mask = jnp.concatenate([text, jnp.ones((b, sparse.shape[1] - 1), bool)], 1)
        if points is not None:  # tokens: text if any, points, the official pad point if no box, box corners
            labels = jnp.asarray(point_labels)
            after = jnp.ones((b, sparse.shape[1] - text.shape[1] - labels.shape[1]), bool)
            if boxes is None:
                # Box corners given as points (labels 2 / 3) are a box: officially no pad point then.
                corners = (labels == BOX_TOP_LEFT) | (labels == BOX_BOTTOM_RIGHT)
                after = after & ~jnp.any(corners, axis=1, keepdims=True)
            sparse_mask = jnp.concatenate([text, labels != PADDING, after], 1)
        return self.mask_decoder(
            image_embeddings,
            self.get_dense_pe() if image_pe is None else image_pe,
            sparse,
            dense,
            multimask_output,
            sparse_mask,
        )

    def get_dense_pe(self) -> jax.Array:
        """(1, h, w, D) positional encoding of the image embedding grid (the prompt encoder's)."""
        return self.prompt_encoder.get_dense_pe()

    def _check_prompts(self, image_embeddings, point_coords, point_labels, boxes, mask_inputs, text_embeddings,
                       image_pe=None):
        """Raises ValueError naming the argument whose shape is wrong (shapes are static)."""
        cfg = self.config
        e, m = cfg.embedding_size, cfg.low_res_mask_size
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        batch = {}
        if text_embeddings is not None:
            if not cfg.has_text_prompts:
                raise ValueError(f"text_embeddings given, but model {cfg.name!r} has no text-prompt head "
                                 "(config.text_embed_dim is None): it was not trained with text prompts")
            if text_embeddings.ndim != 2 or text_embeddings.shape[1] != cfg.text_embed_dim:
                raise ValueError(f"text_embeddings must be (B, {cfg.text_embed_dim}) CLIP embeddings; "
                                 f"got shape {text_embeddings.shape}")
            batch["text_embeddings"] = text_embeddings.shape[0]
        if point_coords is not None:
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
                raise ValueError(f"point_coords must be (B, N, 2); got shape {point_coords.shape}")
            if point_labels.shape != point_coords.shape[:2]:
                raise ValueError(
                    f"point_labels must be (B, N) = {point_coords.shape[:2]} to match point_coords; "
                    f"got shape {point_labels.shape}"
                )
            batch["point_coords"] = point_coords.shape[0]
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be (B, 4) XYXY; got shape {boxes.shape}")
            batch["boxes"] = boxes.shape[0]
        if mask_inputs is not None:
            if mask_inputs.ndim != 4 or mask_inputs.shape[1:] != (1, m, m):
                raise ValueError(f"mask_inputs must be (B, 1, {m}, {m}); got shape {mask_inputs.shape}")
            batch["mask_inputs"] = mask_inputs.shape[0]
        if len(set(batch.values())) > 1:
            raise ValueError(f"prompts disagree on the batch size B: {batch}")
        expected = (e, e, cfg.prompt_embed_dim)
        b = next(iter(batch.values()), 1)
        if image_embeddings.ndim != 4 or image_embeddings.shape[1:] != expected or (
            image_embeddings.shape[0] not in (1, b)
        ):
            raise ValueError(
                f"image_embeddings must be (1 or B={b}, {e}, {e}, {cfg.prompt_embed_dim}); "
                f"got shape {image_embeddings.shape}"
            )
        if image_pe is not None and image_pe.shape != (1,) + expected:
            raise ValueError(f"image_pe must be (1, {e}, {e}, {cfg.prompt_embed_dim}), get_dense_pe()'s; "
                             f"got shape {image_pe.shape}")

    def __call__(self, images, point_coords=None, point_labels=None, boxes=None,
                 mask_inputs=None, multimask_output: bool = True, deterministic: bool = True,
                 text_embeddings=None):
        """Encodes one preprocessed image (1, S, S, 3) and decodes B prompts on it;
        `deterministic`: see `encode_image`."""
        return self.decode(
            self.encode_image(images, deterministic), point_coords, point_labels, boxes, mask_inputs,
            multimask_output, text_embeddings,
        )


def preprocess(image: jax.Array, config: SamConfig) -> jax.Array:
    """(H, W, 3) RGB image, H, W <= image_size -> (S, S, 3) normalised, zero-padded fp32."""
    h, w = image.shape[:2]
    s = config.image_size
    if image.ndim != 3 or image.shape[2] != 3 or h > s or w > s:
        raise ValueError(
            f"expected an (H, W, 3) RGB image with H, W <= {s} (resize the longest side "
            f"to {s} first); got shape {image.shape}"
        )
    mean = jnp.asarray(config.pixel_mean, jnp.float32)
    std = jnp.asarray(config.pixel_std, jnp.float32)
    x = (image.astype(jnp.float32) - mean) / std
    return jnp.pad(x, ((0, s - h), (0, s - w), (0, 0)))


def preprocess_padded(images: jax.Array, image_hw: jax.Array, config: SamConfig) -> jax.Array:
    """(B, S, S, 3) images already resized and zero-padded (the input pipeline's), with valid
    sizes (B, 2) -> (B, S, S, 3) normalised fp32 with the padding zero, as `preprocess` gives."""
    s = config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"expected (B, {s}, {s}, 3) padded images; got shape {images.shape}")
    mean = jnp.asarray(config.pixel_mean, jnp.float32)
    std = jnp.asarray(config.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    return jnp.where(valid_region(image_hw, s)[..., None], x, 0.0)


def valid_region(image_hw: jax.Array, size: int) -> jax.Array:
    """(B, 2) valid (H, W) sizes -> (B, size, size) bool: True inside each image, False on the
    zero padding that fills the square frame."""
    rows = jnp.arange(size)[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(size)[None, None, :] < image_hw[:, 1, None, None]
    return rows & cols


def postprocess_masks(
    masks: jax.Array,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int,
    banded: bool = False,
) -> jax.Array:
    """(..., 4h, 4w) logits -> (..., *original_size) logits.

    Bilinear (align_corners=False, no antialias) to image_size, crop to the
    unpadded `input_size`, bilinear to `original_size` (H, W). `banded`: see
    `interpolate.resize_linear`.
    """
    # Only the rows and columns that survive the crop are computed.
    masks = resize_bilinear(masks, (image_size, image_size), tuple(input_size), banded)
    return resize_bilinear(masks, tuple(original_size), banded=banded)
