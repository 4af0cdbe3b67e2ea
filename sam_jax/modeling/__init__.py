"""Flax modules equal in function to `segment_anything.modeling`, and the jitted inference core."""

from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.inference import (
    decode_batch,
    decode_in_chunks,
    decode_low_res,
    decode_prompts,
    decoder_chunk,
    dense_pe,
    encode_images,
    upsample_masks,
)
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder
from sam_jax.modeling.sam import Sam, postprocess_masks, preprocess, preprocess_padded, valid_region
from sam_jax.modeling.transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "decode_batch",
    "decode_in_chunks",
    "decode_low_res",
    "decode_prompts",
    "decoder_chunk",
    "dense_pe",
    "encode_images",
    "postprocess_masks",
    "preprocess",
    "preprocess_padded",
    "upsample_masks",
    "valid_region",
]
