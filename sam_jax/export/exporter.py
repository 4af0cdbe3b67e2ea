"""`export_model`: one output folder of ONNX or StableHLO artifacts, staged and renamed when whole.

    OUT/export.json             what was exported: model config, options, every file's inputs and
                                outputs (names, shapes, dtypes), sizes, versions
    OUT/decoder.onnx            official-interface decoder     (--format onnx)
    OUT/encoder.onnx[.data]     image encoder; `.data` holds the weights above 2 GiB (vit_h)
    OUT/<part>.jax_export       jax.export.Exported, weights as the first argument (--format stablehlo)
    OUT/<part>.mlirbc           the same module as a portable StableHLO artifact
    OUT/<part>_weights.npz      its weights, flat {"a/b/c": array}
"""

from __future__ import annotations

import datetime
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sam_jax.export import graphs, stablehlo
from sam_jax.modeling import Sam
from sam_jax.staging import staged_directory

FORMATS = ("onnx", "stablehlo")
PARTS = ("decoder", "encoder", "both")
MANIFEST = "export.json"
DECODER_OPTIONS = ("return_single_mask", "use_stability_score", "return_extra_metrics")

ENCODER_PREPROCESSING = (
    "Resize the RGB image so that its longest side is {s} (ResizeLongestSide: new side = "
    "int(old * {s} / longest + 0.5), bilinear); the graph normalises it with pixel_mean / pixel_std and "
    "zero-pads it to {s} x {s}. Points go to the same frame: x * new_w / old_w, y * new_h / old_h.")


def export_model(model: Sam, params, output: str | os.PathLike, format: str = "onnx", part: str = "both", *,
                 return_single_mask: bool = False, use_stability_score: bool = False,
                 return_extra_metrics: bool = False, overwrite: bool = False,
                 source: Optional[str] = None) -> Path:
    """Exports `part` ("decoder", "encoder" or "both") of (model, params) as `format` into the folder
    `output`, which appears only when complete. The three options are the official export's and
    apply to the decoder; `return_extra_metrics` needs the upscaled masks, so ONNX only. An existing
    `output` is a FileExistsError unless `overwrite` and it is an earlier export."""
    parts, options, output = check_request(format, part, output, overwrite, return_single_mask=return_single_mask,
                                           use_stability_score=use_stability_score,
                                           return_extra_metrics=return_extra_metrics)
    # Portable graphs: the XLA attention (a Pallas kernel is one backend's custom call).
    model = model.clone(attention_impl="xla")
    try:
        with staged_directory(output) as staged:
            manifest = {"format": "sam_jax export", "kind": format, "model": model.config.name,
                        "config": model.config.to_dict(), "source": source,
                        "sam_jax_version": _version("sam_jax"), "created": _now(), "parts": {}}
            write = _write_onnx if format == "onnx" else _write_stablehlo
            for name in parts:
                manifest["parts"][name] = write(model, params, name, staged, options if name == "decoder" else {})
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as err:
        raise OSError(f"{output}: cannot write there ({err.strerror or err})") from None
    return output


def check_request(format: str, part: str, output: str | os.PathLike, overwrite: bool = False,
                  **options: bool) -> tuple[tuple[str, ...], dict[str, bool], Path]:
    """(parts, decoder options, absolute output) of an export request, or a ValueError / FileExistsError
    naming what is wrong, before anything is loaded or written (see `export_model`)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}; got {part!r}")
    options = {name: bool(options.get(name, False)) for name in DECODER_OPTIONS}
    if format == "stablehlo":
        if options.pop("return_extra_metrics"):
            raise ValueError("return_extra_metrics is computed on the masks upscaled to orig_im_size, which only "
                             "the ONNX decoder returns; the StableHLO decoder returns low_res_masks")
    parts = ("decoder", "encoder") if part == "both" else (part,)
    if "decoder" not in parts and any(options.values()):
        raise ValueError(f"{', '.join(k for k, v in options.items() if v)}: decoder options, but part={part!r} "
                         "exports no decoder")
    return parts, options, _check_output(Path(output).absolute(), overwrite)


def _write_onnx(model: Sam, params, part: str, folder: Path, options: dict[str, bool]) -> dict[str, Any]:
    from sam_jax.export import onnx_graphs  # onnx and jax2onnx: only for this format

    if part == "decoder":
        proto = onnx_graphs.decoder_onnx(model, params, **options)
    else:
        proto = onnx_graphs.encoder_onnx(model, params)
    entry = {"files": onnx_graphs.save_onnx(proto, folder / f"{part}.onnx"), "opset": onnx_graphs.OPSET,
             "ir_version": proto.ir_version, "inputs": [_value_info(v) for v in proto.graph.input],
             "outputs": [_value_info(v) for v in proto.graph.output], "options": options,
             "exporter": f"jax2onnx {_version('jax2onnx')}"}
    if part == "encoder":
        entry["preprocessing"] = ENCODER_PREPROCESSING.format(s=model.config.image_size)
    entry["bytes"] = sum((folder / f).stat().st_size for f in entry["files"])
    return entry


def _write_stablehlo(model: Sam, params, part: str, folder: Path, options: dict[str, bool]) -> dict[str, Any]:
    weights = graphs.part_weights(params, part)
    exported = stablehlo.export_part(model, weights, part, **options)
    files = [f"{part}.jax_export", f"{part}.mlirbc", f"{part}_weights.npz"]
    (folder / files[0]).write_bytes(exported.serialize())
    (folder / files[1]).write_bytes(exported.mlir_module_serialized)
    np.savez(folder / files[2], **weights)
    entry = {"files": files, **stablehlo.calling_convention(exported, part, weights), "options": options}
    if part == "encoder":
        entry["preprocessing"] = ENCODER_PREPROCESSING.format(s=model.config.image_size).replace(
            "zero-pads it to", "expects it zero-padded to")
    entry["bytes"] = sum((folder / f).stat().st_size for f in files)
    return entry


def _value_info(value) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}


def _check_output(output: Path, overwrite: bool) -> Path:
    above = next((p for p in output.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise FileExistsError(f"{output}: cannot write there ({above} is a file, not a folder)")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{output} already exists; choose a new output folder (or overwrite)")
        if not (output / MANIFEST).is_file():
            raise FileExistsError(f"{output} exists and is not a sam_jax export; not replacing it")
    return output


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
