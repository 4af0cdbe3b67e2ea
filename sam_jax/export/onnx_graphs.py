"""ONNX graphs through jax2onnx: the decoder in the official interface, and the image encoder.

The decoder has the inputs and outputs of the official `scripts/export_onnx_model.py`
(`segment_anything.utils.onnx.SamOnnxModel`), so the official web demo and the ONNX tools built
for SAM run it unchanged:

    image_embeddings (1, D, h, w) f32, point_coords (1, num_points, 2) f32 (encoder input frame),
    point_labels (1, num_points) f32, mask_input (1, 1, 4h, 4w) f32, has_mask_input (1,) f32,
    orig_im_size (2,) f32 (H, W)
    -> masks (1, T, H, W) logits, iou_predictions (1, T), low_res_masks (1, T, 4h, 4w);
       with return_extra_metrics: masks, iou_predictions, stability_scores (1, T),
       areas (1, T) int64, low_res_masks.  T = 4, or 1 with return_single_mask.

jax2onnx converts `graphs.official_decoder`; the upscaling to `orig_im_size` is appended as ONNX
nodes (Resize, Slice: an output shape set by an input's values has no JAX form), as are the
extra metrics on the upscaled masks. The encoder takes one resized image (H, W, 3) f32 in [0, 255],
longest side S; its normalisation and zero padding (a width set by the input's shape, which
jax2onnx lowers for no pad) are ONNX nodes before the converted `graphs.encode_normalised`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sam_jax.configs import SamConfig
from sam_jax.export import graphs
from sam_jax.modeling import Sam
from sam_jax.tree_paths import unflatten

OPSET = 17  # the official export's; the official demo's onnxruntime-web reads it
IR_VERSION = 8  # the IR of opset 17 (ONNX 1.13): runtimes of that age load the file

DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                  "orig_im_size")
ENCODER_INPUT, ENCODER_OUTPUT = "input_image", "image_embeddings"
# Global attention in chunks of this many queries: an ONNX Loop of 4 steps for a 64 x 64 grid.
# onnxruntime runs vit_b's encoder in ~5 s this way on 2 CPU cores, ~8 s with sam_jax's default
# of 32 (128 small steps) and ~6-17 s with all 4096 at once (9.6 GB of activations).
ONNX_QUERY_CHUNK = 1024


def decoder_outputs(return_extra_metrics: bool) -> tuple[str, ...]:
    if return_extra_metrics:
        return "masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"
    return "masks", "iou_predictions", "low_res_masks"


def decoder_onnx(model: Sam, params, return_single_mask: bool = False, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> onnx.ModelProto:
    """The official-interface decoder (module docstring) with `params` as initializers."""
    cfg = model.config
    e, m = cfg.embedding_size, cfg.low_res_mask_size

    def decode(weights, *inputs):
        return model.apply({"params": weights}, *inputs, method=graphs.official_decoder,
                           return_single_mask=return_single_mask, use_stability_score=use_stability_score)

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    num_points, = jax.export.symbolic_shape("num_points")
    specs = [f32(1, cfg.prompt_embed_dim, e, e), f32(1, num_points, 2), f32(1, num_points), f32(1, 1, m, m), f32(1)]
    proto = _convert(decode, graphs.part_weights(params, "decoder"), specs, list(DECODER_INPUTS[:-1]),
                     ["low_res_masks", "iou_predictions"], f"sam_jax_{cfg.name}_decoder")
    num_masks = 1 if return_single_mask else 1 + cfg.num_multimask_outputs
    _append_upscaling(proto.graph, cfg, num_masks, return_extra_metrics)
    return _finish(proto, cfg, "decoder", dict(return_single_mask=return_single_mask,
                                               use_stability_score=use_stability_score,
                                               return_extra_metrics=return_extra_metrics))


def encoder_onnx(model: Sam, params) -> onnx.ModelProto:
    """input_image (H, W, 3) f32, max(H, W) = S -> image_embeddings (1, D, h, w), `params` as initializers."""
    cfg = model.config
    s = cfg.image_size
    model = model.clone(query_chunk_size=ONNX_QUERY_CHUNK)

    def encode(weights, images):
        return model.apply({"params": weights}, images, method=graphs.encode_normalised)

    proto = _convert(encode, graphs.part_weights(params, "encoder"), [jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)],
                     ["normalised_image"], [ENCODER_OUTPUT], f"sam_jax_{cfg.name}_encoder")
    _prepend_preprocessing(proto.graph, cfg, "normalised_image")
    return _finish(proto, cfg, "encoder", {})


def _convert(apply, weights: dict[str, np.ndarray], specs, input_names, output_names, name) -> onnx.ModelProto:
    """jax2onnx of `apply(params, *inputs)`, `weights` (the flat {"a/b/c": array} params it reads)
    becoming initializers.

    The function is traced here first, by JAX, to lax primitives, with the weights abstract, and
    jax2onnx converts that jaxpr evaluated on the weights. Traced by jax2onnx from the model
    code, jnp.einsum and jnp.concatenate would reach its plugins for them, which emit ONNX Einsum
    (onnxruntime runs it several times slower than the MatMul a dot_general becomes) and mis-size
    a concatenation along a symbolic dimension; and whatever depends on the weights alone would be
    computed at trace time into constants (a padding token's qkv broadcast over the window grid:
    57 MB more for vit_b's encoder)."""
    from jax2onnx import to_onnx

    keys = sorted(weights)
    weight_specs = [jax.ShapeDtypeStruct(weights[k].shape, weights[k].dtype) for k in keys]

    def fn(*args):
        return apply(unflatten(dict(zip(keys, args[: len(keys)]))), *args[len(keys):])

    traced = jax.extend.core.jaxpr_as_fun(jax.make_jaxpr(fn)(*weight_specs, *specs))
    values = [weights[k] for k in keys]
    return to_onnx(lambda *inputs: traced(*values, *inputs), list(specs), input_names=list(input_names),
                   output_names=list(output_names), opset=OPSET, model_name=name)


def save_onnx(proto: onnx.ModelProto, path, max_bytes: int = 2**31 - 2**26) -> list[str]:
    """Writes `proto` to `path`; its weights go to `<name>.data` beside it when the file would pass
    `max_bytes` (default: below protobuf's 2 GiB limit, which vit_h's encoder passes). Returns the
    names of the files written."""
    path = Path(path)
    # The weights' bytes, not proto.ByteSize(): protobuf cannot size a message past 2 GiB.
    if sum(len(t.raw_data) for t in proto.graph.initializer) < max_bytes:
        onnx.save_model(proto, path)
        return [path.name]
    data = path.name + ".data"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [path.name, data]


def _finish(proto: onnx.ModelProto, cfg: SamConfig, part: str, options: dict[str, Any]) -> onnx.ModelProto:
    """Pins the IR version and records what the graph is in its metadata."""
    proto.ir_version = IR_VERSION
    del proto.metadata_props[:]
    for key, value in (("sam_jax.model", cfg.name), ("sam_jax.part", part),
                       ("sam_jax.options", json.dumps(options, sort_keys=True))):
        proto.metadata_props.add(key=key, value=value)
    return proto


def _prepend_preprocessing(graph: onnx.GraphProto, cfg: SamConfig, converted_input: str) -> None:
    """`sam_jax.modeling.sam.preprocess` as ONNX nodes before the converted encoder: input_image
    (H, W, 3) -> (x - pixel_mean) / pixel_std, zero-padded at the bottom and right to (1, S, S, 3).
    The padding width depends on the input's shape, which jax2onnx lowers for no pad."""
    s = cfg.image_size
    nodes, constants = [], []
    const = _constant_maker("preprocess", constants)
    node = _node_maker("preprocess", nodes)
    x = node("Div", [node("Sub", [ENCODER_INPUT, const("mean", np.asarray(cfg.pixel_mean, np.float32))],
                          "preprocess_centred"), const("std", np.asarray(cfg.pixel_std, np.float32))],
             "preprocess_normalised")
    # pads = [0, 0, 0, S - H, S - W, 0]; at least 0, so an image over S fails at the first reshape
    # instead of being cropped.
    short = node("Sub", [const("frame", np.array([s, s, 3], np.int64)), node("Shape", [ENCODER_INPUT], "preprocess_shape")],
                 "preprocess_short")
    after = node("Max", [short, const("zero", np.zeros(3, np.int64))], "preprocess_after")
    pads = node("Concat", [const("before", np.zeros(3, np.int64)), after], "preprocess_pads", axis=0)
    padded = node("Pad", [x, pads], "preprocess_padded")
    node("Unsqueeze", [padded, const("batch_axis", np.array([0], np.int64))], converted_input)
    kept = [n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes + kept)
    graph.initializer.extend(constants)
    inputs = [i for i in graph.input if i.name != converted_input]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.FLOAT, ["height", "width", 3])]
                       + inputs)


def _constant_maker(prefix: str, constants: list):
    def const(name: str, value) -> str:
        constants.append(numpy_helper.from_array(np.asarray(value), f"{prefix}_{name}"))
        return f"{prefix}_{name}"
    return const


def _node_maker(prefix: str, nodes: list):
    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{prefix}_{output}", **attrs))
        return output
    return node


def _append_upscaling(graph: onnx.GraphProto, cfg: SamConfig, num_masks: int, extra_metrics: bool) -> None:
    """`SamOnnxModel.mask_postprocessing` (and, with `extra_metrics`, its stability scores and areas)
    as ONNX nodes after the converted decoder: low_res_masks (1, T, 4h, 4w) -> masks (1, T, H, W)
    logits: bilinear (half pixel, as F.interpolate(align_corners=False)) to S x S, cropped to the
    resized image, bilinear to orig_im_size."""
    s = cfg.image_size
    nodes, constants = [], []
    const = _constant_maker("upscale", constants)
    node = _node_maker("upscale", nodes)
    resize = dict(mode="linear", coordinate_transformation_mode="half_pixel")
    full = node("Resize", ["low_res_masks", "", "", const("full_size", np.array([1, num_masks, s, s], np.int64))],
                "upscale_full", **resize)
    # The resized image's size: floor(S / max(H, W) * (H, W) + 0.5), in float32 as the official export.
    longest = node("ReduceMax", ["orig_im_size"], "upscale_longest", keepdims=1)
    scale = node("Div", [const("side", np.array([s], np.float32)), longest], "upscale_scale")
    scaled = node("Add", [node("Mul", [scale, "orig_im_size"], "upscale_scaled"), const("half", np.float32(0.5))],
                  "upscale_rounded")
    resized = node("Cast", [node("Floor", [scaled], "upscale_floor")], "upscale_resized_size", to=TensorProto.INT64)
    cropped = node("Slice", [full, const("starts", np.zeros(2, np.int64)), resized,
                             const("axes", np.array([2, 3], np.int64))], "upscale_cropped")
    original = node("Cast", ["orig_im_size"], "upscale_original_size", to=TensorProto.INT64)
    sizes = node("Concat", [const("batch_masks", np.array([1, num_masks], np.int64)), original], "upscale_sizes",
                 axis=0)
    node("Resize", [cropped, "", "", sizes], "masks", **resize)
    outputs = {"masks": helper.make_tensor_value_info("masks", TensorProto.FLOAT,
                                                      [1, num_masks, "orig_height", "orig_width"])}
    if extra_metrics:
        spatial = const("spatial_axes", np.array([2, 3], np.int64))

        def count_above(threshold: float, name: str, dtype: int) -> str:
            above = node("Greater", ["masks", const(f"{name}_threshold", np.float32(threshold))], f"upscale_{name}")
            as_int = node("Cast", [above], f"upscale_{name}_int", to=dtype)
            return node("ReduceSum", [as_int, spatial], f"upscale_{name}_count", keepdims=0)

        thr, offset = cfg.mask_threshold, graphs.STABILITY_SCORE_OFFSET
        inter = node("Cast", [count_above(thr + offset, "high", TensorProto.INT32)], "upscale_inter",
                     to=TensorProto.FLOAT)
        union = node("Cast", [count_above(thr - offset, "low", TensorProto.INT32)], "upscale_union",
                     to=TensorProto.FLOAT)
        node("Div", [inter, union], "stability_scores")
        node("Identity", [count_above(thr, "mask", TensorProto.INT64)], "areas")
        outputs["stability_scores"] = helper.make_tensor_value_info("stability_scores", TensorProto.FLOAT,
                                                                    [1, num_masks])
        outputs["areas"] = helper.make_tensor_value_info("areas", TensorProto.INT64, [1, num_masks])
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    graph.input.append(helper.make_tensor_value_info("orig_im_size", TensorProto.FLOAT, [2]))
    converted = {o.name: o for o in graph.output}
    outputs.update(converted)
    ordered = [outputs[name] for name in decoder_outputs(extra_metrics)]
    del graph.output[:]
    graph.output.extend(ordered)
