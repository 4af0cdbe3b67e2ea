"""StableHLO through `jax.export`: the encoder and the decoder with symbolic batch and point counts.

Each part is a serialised `jax.export.Exported` (`<part>.jax_export`, for `jax.export.deserialize`)
and the same module as a portable StableHLO artifact (`<part>.mlirbc`, for IREE, TF or any
StableHLO consumer), lowered for the CPU, CUDA and TPU. The weights are the first argument, a flat
{"a/b/c": array} dict stored beside it (`<part>_weights.npz`), so vit_h stays under serialisation
limits and fine-tuned weights of the same shapes need no new export:

    encoder(weights, images (B, S, S, 3) f32 zero-padded RGB in [0, 255], input_sizes (B, 2) i32)
        -> (image_embeddings (B, D, h, w),)
    decoder(weights, image_embeddings (1, D, h, w), point_coords (B, N, 2), point_labels (B, N),
            mask_input (B, 1, 4h, 4w), has_mask_input (B,))
        -> (low_res_masks (B, T, 4h, 4w), iou_predictions (B, T))

The decoder is the official ONNX decoder's computation (`graphs.official_decoder`) for B prompts
at once, without the upscaling to the original size (an output shape set by input values).
In a process with jax but no sam_jax:

    exported = jax.export.deserialize(open("decoder.jax_export", "rb").read())
    low_res_masks, iou = exported.call(dict(np.load("decoder_weights.npz")), embeddings, coords, ...)

`export.json` lists each part's inputs and outputs with their shapes (symbolic dims by name).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.export import graphs
from sam_jax.modeling import Sam
from sam_jax.tree_paths import unflatten

PLATFORMS = ("cpu", "cuda", "tpu")


def export_part(model: Sam, weights: dict[str, np.ndarray], part: str, return_single_mask: bool = False,
                use_stability_score: bool = False) -> jax.export.Exported:
    """`jax.export` of one part (module docstring) with the weights as its first argument."""
    cfg = model.config
    s, e, m, d = cfg.image_size, cfg.embedding_size, cfg.low_res_mask_size, cfg.prompt_embed_dim
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    weight_specs = {k: spec(v.shape, v.dtype) for k, v in weights.items()}
    if part == "encoder":
        b, = jax.export.symbolic_shape("batch")

        def encoder(w, images, input_sizes):  # a 1-tuple: every part returns a tuple of its outputs
            return (model.apply({"params": unflatten(w)}, images, input_sizes, method=graphs.encode_padded),)

        return jax.export.export(jax.jit(encoder), platforms=PLATFORMS)(
            weight_specs, spec((b, s, s, 3)), spec((b, 2), jnp.int32))
    b, n = jax.export.symbolic_shape("prompts, num_points")

    def decoder(w, *inputs):
        return model.apply({"params": unflatten(w)}, *inputs, method=graphs.official_decoder,
                           return_single_mask=return_single_mask, use_stability_score=use_stability_score)

    return jax.export.export(jax.jit(decoder), platforms=PLATFORMS)(
        weight_specs, spec((1, d, e, e)), spec((b, n, 2)), spec((b, n)), spec((b, 1, m, m)), spec((b,)))


INPUT_NAMES = {"encoder": ("images", "input_sizes"),
               "decoder": ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")}
OUTPUT_NAMES = {"encoder": ("image_embeddings",), "decoder": ("low_res_masks", "iou_predictions")}


def calling_convention(exported: jax.export.Exported, part: str, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """What a caller needs besides the artifact: the arguments in their flat order (the weights by
    sorted key, then the inputs), the outputs, and the versions."""
    describe = lambda name, aval: {"name": name, "shape": [str(d) if not isinstance(d, int) else d
                                                           for d in aval.shape], "dtype": str(aval.dtype)}
    n_weights = len(weights)
    inputs = [describe(name, aval) for name, aval in zip(INPUT_NAMES[part], exported.in_avals[n_weights:])]
    return {
        "arguments": ["weights (a dict: the keys of the .npz, flattened in sorted order)"]
                     + [i["name"] for i in inputs],
        "weights": {"count": n_weights, "first_keys": sorted(weights)[:3]},
        "inputs": inputs,
        "outputs": [describe(name, aval) for name, aval in zip(OUTPUT_NAMES[part], exported.out_avals)],
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
    }
