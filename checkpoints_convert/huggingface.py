"""Renames a Hugging Face `transformers.SamModel` state dict to the official SAM keys.

`facebook/sam-vit-{base,large,huge}` hold the same tensors as Meta's
`sam_vit_*.pth` under other names (transformers' `convert_sam_to_hf.py` is a
pure rename), so no value changes: every HF tensor has exactly the shape,
dtype and layout of its official twin. The positional-encoding matrix is
stored twice in HF checkpoints (tied), and both copies must agree. (HF's
two-way-transformer LayerNorms use eps 1e-6 where the official ones use 1e-5:
a config difference, not a weight one: converted, the weights run as official.)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from sam_jax.errors import CheckpointError

_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_WB = r"(weight|bias)"
_ATTN = r"(q_proj|k_proj|v_proj|out_proj)\." + _WB
_MLP = r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)"

# Ordered (HF pattern, official replacement) rules; a pattern must match the
# whole HF key, and the first rule that matches wins.
_RULES: list[tuple[str, str]] = [
    # Image encoder (ViT + neck).
    (r"vision_encoder\.patch_embed\.projection\." + _WB, r"image_encoder.patch_embed.proj.\1"),
    (r"vision_encoder\.pos_embed", r"image_encoder.pos_embed"),
    (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\." + _WB, r"image_encoder.blocks.\1.norm\2.\3"),
    (r"vision_encoder\.layers\.(\d+)\.attn\.(qkv|proj)\." + _WB, r"image_encoder.blocks.\1.attn.\2.\3"),
    (r"vision_encoder\.layers\.(\d+)\.attn\.(rel_pos_[hw])", r"image_encoder.blocks.\1.attn.\2"),
    (r"vision_encoder\.layers\.(\d+)\.mlp\.(lin[12])\." + _WB, r"image_encoder.blocks.\1.mlp.\2.\3"),
    (r"vision_encoder\.neck\.conv1\.weight", r"image_encoder.neck.0.weight"),
    (r"vision_encoder\.neck\.layer_norm1\." + _WB, r"image_encoder.neck.1.\1"),
    (r"vision_encoder\.neck\.conv2\.weight", r"image_encoder.neck.2.weight"),
    (r"vision_encoder\.neck\.layer_norm2\." + _WB, r"image_encoder.neck.3.\1"),
    # Prompt encoder; HF keeps the random-Fourier matrix twice (tied).
    (r"shared_image_embedding\.positional_embedding", _PE),
    (r"prompt_encoder\.shared_embedding\.positional_embedding", _PE),
    (r"prompt_encoder\.point_embed\.([0-3])\.weight", r"prompt_encoder.point_embeddings.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"prompt_encoder\.mask_embed\.conv1\." + _WB, r"prompt_encoder.mask_downscaling.0.\1"),
    (r"prompt_encoder\.mask_embed\.layer_norm1\." + _WB, r"prompt_encoder.mask_downscaling.1.\1"),
    (r"prompt_encoder\.mask_embed\.conv2\." + _WB, r"prompt_encoder.mask_downscaling.3.\1"),
    (r"prompt_encoder\.mask_embed\.layer_norm2\." + _WB, r"prompt_encoder.mask_downscaling.4.\1"),
    (r"prompt_encoder\.mask_embed\.conv3\." + _WB, r"prompt_encoder.mask_downscaling.6.\1"),
    # Mask decoder: two-way transformer.
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
     + _ATTN, r"mask_decoder.transformer.layers.\1.\2.\3.\4"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\." + _WB,
     r"mask_decoder.transformer.layers.\1.norm\2.\3"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\." + _WB,
     r"mask_decoder.transformer.layers.\1.mlp.\2.\3"),
    (r"mask_decoder\.transformer\.final_attn_token_to_image\." + _ATTN,
     r"mask_decoder.transformer.final_attn_token_to_image.\1.\2"),
    (r"mask_decoder\.transformer\.layer_norm_final_attn\." + _WB, r"mask_decoder.transformer.norm_final_attn.\1"),
    # Mask decoder: upscaling and the 3-layer MLP heads (proj_in, layers.0, proj_out).
    (r"mask_decoder\.upscale_conv1\." + _WB, r"mask_decoder.output_upscaling.0.\1"),
    (r"mask_decoder\.upscale_layer_norm\." + _WB, r"mask_decoder.output_upscaling.1.\1"),
    (r"mask_decoder\.upscale_conv2\." + _WB, r"mask_decoder.output_upscaling.3.\1"),
    (r"mask_decoder\." + _MLP + r"\.proj_in\." + _WB, r"mask_decoder.\1.layers.0.\2"),
    (r"mask_decoder\." + _MLP + r"\.layers\.0\." + _WB, r"mask_decoder.\1.layers.1.\2"),
    (r"mask_decoder\." + _MLP + r"\.proj_out\." + _WB, r"mask_decoder.\1.layers.2.\2"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in _RULES]

# HF keys that are tied copies of another HF key: kept only if bit-identical to it.
_TIED = {"prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding"}

# Roots that only a transformers SamModel state dict has.
_HF_MARKER = re.compile(
    r"^(vision_encoder\.|shared_image_embedding\.|prompt_encoder\.(shared_embedding|point_embed|mask_embed)\."
    r"|mask_decoder\.upscale_)"
)


def _preview(keys: list[str], limit: int = 10) -> str:
    """`'a', 'b', ... (N in all)`: a one-line list of the first `limit` keys."""
    shown = ", ".join(repr(key) for key in keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def is_huggingface_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether `state_dict` has any key that only a `transformers.SamModel` checkpoint has."""
    return any(_HF_MARKER.match(key) for key in state_dict)


def official_key(hf_key: str) -> str | None:
    """The official segment-anything key for `hf_key`, or None if no rule matches it."""
    for pattern, replacement in _COMPILED:
        if pattern.fullmatch(hf_key):
            return pattern.sub(replacement, hf_key)
    return None


def huggingface_to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a transformers SamModel state dict to the official segment-anything keys.

    Values are passed through unchanged. Raises `CheckpointError` for keys no
    rule maps, for two keys mapping to one official key, and for a tied copy
    (`_TIED`) that differs from its twin.
    """
    for copy, twin in _TIED.items():
        if copy in state_dict and twin in state_dict:
            a, b = np.asarray(state_dict[copy]), np.asarray(state_dict[twin])
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
                raise CheckpointError(
                    f"Hugging Face SAM state dict: tied tensor {copy!r} differs from its twin {twin!r}"
                    f" ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})"
                )
    skipped = {copy for copy, twin in _TIED.items() if copy in state_dict and twin in state_dict}
    renamed: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if key in skipped:
            continue
        target = official_key(key)
        if target is None:
            unmapped.append(key)
        elif target in renamed:
            raise CheckpointError(
                f"Hugging Face SAM state dict: {source[target]!r} and {key!r} both map to {target!r}"
            )
        else:
            renamed[target], source[target] = value, key
    if unmapped:
        raise CheckpointError(f"Hugging Face SAM state dict: unrecognised keys {_preview(sorted(unmapped))}")
    return renamed
