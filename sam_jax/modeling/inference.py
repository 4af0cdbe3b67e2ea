"""The jitted inference core: encode images, decode prompts, upsample masks.

Every front end calls these (`SamPredictor`, `SamBatchPredictor`, the
automatic mask generator, evaluation, the training loop's decoder): one
compiled function per job, cached per model and per static argument.

    encode_images   (B, S, S, 3) zero-padded images + (B, 2) sizes -> (B, h, w, D)
    dense_pe        the params' (1, h, w, D) positional encoding of the embedding grid, which
                    the decoder takes (`image_pe`): computed once, not on every call
    decode_prompts  one image's embedding, B prompts (points, boxes, masks and, for a model
                    with a text-prompt head, CLIP text embeddings) -> masks at the original size,
                    IoU, low-res logits (on the CPU in cache-sized chunks of prompts):
                    decode_low_res, then upsample_masks
    decode_batch    B images, P prompts each (vmapped) -> (B, P, C, 4h, 4w), (B, P, C)
    upsample_masks  low-res logits -> logits or masks at the original size

Prompts are in the encoder input frame (`sam_jax.prompts` moves and pads them).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from sam_jax.configs import SamConfig
from sam_jax.modeling.sam import Sam, postprocess_masks, preprocess_padded

# The decoder holds several (B, h, w, D) activations per prompt (4 MiB each for the
# released models); a CPU runs it fastest on chunks of prompts whose activations stay
# in cache (`experiments.benchmark_inference` times the predictor and the mask generator).
_CPU_CHUNK_BYTES = 8 * 2**20


@functools.partial(jax.jit, static_argnums=0)
def encode_images(model: Sam, params, images: jax.Array, input_sizes: jax.Array) -> jax.Array:
    """(B, S, S, 3) images resized to the input frame and zero-padded, with their (B, 2)
    valid sizes -> (B, h, w, D) image embeddings."""
    return model.apply({"params": params}, preprocess_padded(images, input_sizes, model.config),
                       method=Sam.encode_image)


@functools.partial(jax.jit, static_argnums=0)
def dense_pe(model: Sam, params) -> jax.Array:
    """(1, h, w, D) `Sam.get_dense_pe`, a function of the params alone: a sine and a cosine per
    cell of the embedding grid and channel (1M of each for the released models). The decoder
    computes it when not given it; callers that decode a few prompts at a time pass it."""
    return model.apply({"params": params}, method=Sam.get_dense_pe)


def decoder_chunk(config: SamConfig, num_prompts: int) -> int:
    """Prompts `decode_in_chunks` decodes at once: all of them on accelerators; on the
    CPU as many as keep one (chunk, h, w, D) fp32 activation within 8 MiB."""
    if jax.default_backend() != "cpu":
        return max(num_prompts, 1)
    per_prompt = config.embedding_size**2 * config.prompt_embed_dim * 4
    return max(1, min(num_prompts, _CPU_CHUNK_BYTES // per_prompt))


def decode_in_chunks(model: Sam, params, image_embeddings: jax.Array, point_coords=None, point_labels=None,
                     boxes=None, mask_inputs=None, multimask_output: bool = True,
                     chunk: Optional[int] = None, text_embeddings=None,
                     image_pe=None) -> tuple[jax.Array, jax.Array]:
    """`Sam.decode` of B prompts on one image (1, h, w, D), `chunk` prompts at a time
    (default `decoder_chunk`) under `lax.map`; the same outputs, (B, C, 4h, 4w) and (B, C).
    `text_embeddings` (B, E): CLIP embeddings for a model with a text-prompt head (rows of
    zeros: no text prompt). `image_pe`: `dense_pe(model, params)`, or None to compute it."""
    prompts = (point_coords, point_labels, boxes, mask_inputs, text_embeddings)
    b = next((x.shape[0] for x in prompts if x is not None), 1)
    chunk = decoder_chunk(model.config, b) if chunk is None else chunk

    def decode(p):
        *sam_prompts, text = p
        return model.apply({"params": params}, image_embeddings, *sam_prompts, multimask_output, text, image_pe,
                           method=Sam.decode)

    if chunk >= b or image_embeddings.shape[0] != 1:
        return decode(prompts)
    chunks = -(-b // chunk)
    # Padding repeats the last prompt: any valid prompt would do; its outputs are dropped.
    split = lambda x: None if x is None else jnp.concatenate(
        [x, jnp.repeat(x[-1:], chunks * chunk - b, axis=0)]).reshape(chunks, chunk, *x.shape[1:])
    low_res, iou = jax.lax.map(decode, tuple(split(x) for x in prompts))
    return low_res.reshape(-1, *low_res.shape[2:])[:b], iou.reshape(-1, iou.shape[-1])[:b]


@functools.partial(jax.jit, static_argnums=(0, 7))
def decode_low_res(model: Sam, params, image_embeddings, point_coords, point_labels, boxes, mask_inputs,
                   multimask_output: bool, text_embeddings=None, image_pe=None) -> tuple[jax.Array, jax.Array]:
    """`decode_in_chunks`, compiled once per prompt shape whatever the image size."""
    return decode_in_chunks(model, params, image_embeddings, point_coords, point_labels, boxes, mask_inputs,
                            multimask_output, text_embeddings=text_embeddings, image_pe=image_pe)


def decode_prompts(model: Sam, params, image_embeddings, point_coords, point_labels, boxes, mask_inputs,
                   multimask_output: bool, input_size: tuple, original_size: tuple, return_logits: bool,
                   text_embeddings=None, image_pe=None):
    """B prompts on one image (1, h, w, D) -> masks (B, C, H, W) at `original_size` (logits if
    `return_logits`, else booleans), IoU predictions (B, C) and low-res logits (B, C, 4h, 4w).
    `text_embeddings`: optional (B, E) CLIP embeddings; `image_pe`: see `decode_in_chunks`.

    Two compiled steps: the decoder (per prompt shape) and the upsampling (per image size),
    so a new image size recompiles only the upsampling, and a new prompt shape only the decoder."""
    low_res, iou = decode_low_res(model, params, image_embeddings, point_coords, point_labels, boxes,
                                  mask_inputs, multimask_output, text_embeddings, image_pe)
    threshold = None if return_logits else model.config.mask_threshold
    masks = upsample_masks(low_res, tuple(input_size), tuple(original_size), model.config.image_size, threshold)
    return masks, iou, low_res


@functools.partial(jax.jit, static_argnums=(0, 7))
def decode_batch(model: Sam, params, image_embeddings, point_coords, point_labels, boxes=None, mask_inputs=None,
                 multimask_output: bool = True, text_embeddings=None) -> tuple[jax.Array, jax.Array]:
    """Per image b: embeddings (B, h, w, D), its P prompts (B, P, ...; any may be None, but
    not all; `text_embeddings` (B, P, E) CLIP embeddings, rows of zeros no text) -> low-res
    logits (B, P, C, 4h, 4w) and IoU predictions (B, P, C)."""

    def one_image(embedding, coords, labels, box, mask, text):
        return model.apply({"params": params}, embedding[None], coords, labels, box, mask, multimask_output, text,
                           method=Sam.decode)

    return jax.vmap(one_image)(image_embeddings, point_coords, point_labels, boxes, mask_inputs, text_embeddings)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def upsample_masks(low_res: jax.Array, input_size: tuple, original_size: tuple, image_size: int,
                   threshold: Optional[float]) -> jax.Array:
    """(..., 4h, 4w) low-res logits -> logits at `original_size`, or masks (logits > threshold)."""
    logits = postprocess_masks(low_res, input_size, original_size, image_size)
    return logits if threshold is None else logits > threshold
