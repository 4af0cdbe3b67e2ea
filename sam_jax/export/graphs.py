"""The functions that are exported, in the official layout (NCHW embeddings, float point labels).

    official_decoder   `segment_anything.utils.onnx.SamOnnxModel.forward` up to its upscaling:
                       image_embeddings (1, D, h, w), point_coords (B, N, 2), point_labels (B, N),
                       mask_input (B, 1, 4h, 4w), has_mask_input (B,) -> low_res_masks (B, T, 4h, 4w),
                       iou_predictions (B, T); T = 4 (every mask token), or 1 with return_single_mask
    encode_normalised  (B, S, S, 3) normalised, zero-padded images -> image_embeddings (B, D, h, w)
    encode_padded      (B, S, S, 3) zero-padded RGB in [0, 255] + (B, 2) valid sizes -> (B, D, h, w)

Each takes the bound `Sam` module first (`model.apply(variables, ..., method=fn)`). The upscaling
to the original image size has an output shape set by an input's values (`orig_im_size`), which a
JAX function cannot have: `onnx_graphs` appends it to the ONNX decoder as ONNX nodes, and puts
the ONNX encoder's normalisation and padding of an image of any size before `encode_normalised`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling import Sam
from sam_jax.modeling.sam import preprocess_padded
from sam_jax.tree_paths import flatten
from sam_jax.utils.amg import calculate_stability_score

# The official export's constants (`SamOnnxModel`).
STABILITY_SCORE_OFFSET = 1.0
_SINGLE_MASK_REWEIGHT = 1000.0  # select_masks: token 0 wins below 2.5 points, else the best IoU


def part_weights(params, part: str) -> dict[str, np.ndarray]:
    """The flat {"a/b/c": array} params one part reads: "encoder" the image encoder's, "decoder" the rest."""
    return {k: np.asarray(v) for k, v in flatten(params).items()
            if k.startswith("image_encoder/") == (part == "encoder")}


def official_decoder(module: Sam, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                     return_single_mask: bool = False, use_stability_score: bool = False):
    """See the module docstring. Labels: -1 not-a-point (the caller adds the official (0, 0) pad point
    when there is no box), 0 background, 1 foreground, 2 / 3 box corners; coordinates in the encoder
    input frame; has_mask_input 1 uses mask_input, 0 `no_mask_embed`."""
    pe = module.prompt_encoder
    sparse = pe.embed_points(point_coords, point_labels, pad=False)
    has_mask = jnp.asarray(has_mask_input, jnp.float32)[:, None, None, None]
    dense = has_mask * pe.embed_masks(mask_input) + (1.0 - has_mask) * pe.no_mask_embed.embedding[0]
    embeddings = jnp.transpose(image_embeddings, (0, 2, 3, 1))
    masks, scores = module.mask_decoder.predict_masks(embeddings, pe.get_dense_pe(), sparse, dense)
    if use_stability_score:
        scores = calculate_stability_score(masks, module.config.mask_threshold, STABILITY_SCORE_OFFSET)
    if return_single_mask:
        # The number of points (pad point included) as a value: a sum, not a shape, so that it
        # stays a graph computation when the point count is symbolic.
        num_points = jnp.sum(jnp.ones_like(point_labels, jnp.float32), axis=1, keepdims=True)
        reweight = jnp.zeros(scores.shape[1], jnp.float32).at[0].set(_SINGLE_MASK_REWEIGHT)
        best = jnp.argmax(scores + (num_points - 2.5) * reweight, axis=1)
        masks = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)
        scores = jnp.take_along_axis(scores, best[:, None], axis=1)
    return masks, scores


def encode_normalised(module: Sam, images):
    """(B, S, S, 3) normalised, zero-padded images -> (B, D, h, w)."""
    return _nchw(module.encode_image(images))


def encode_padded(module: Sam, images, input_sizes):
    """(B, S, S, 3) resized, zero-padded RGB in [0, 255] and their (B, 2) valid (H, W) -> (B, D, h, w)."""
    return _nchw(module.encode_image(preprocess_padded(images, input_sizes, module.config)))


def _nchw(embeddings: jax.Array) -> jax.Array:
    return jnp.transpose(embeddings, (0, 3, 1, 2))
