"""Flax modules equal in function to `segment_anything.modeling`."""

from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder
from sam_jax.modeling.sam import Sam, decode_in_chunks, postprocess_masks, preprocess, preprocess_padded
from sam_jax.modeling.transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "decode_in_chunks",
    "postprocess_masks",
    "preprocess",
    "preprocess_padded",
]
