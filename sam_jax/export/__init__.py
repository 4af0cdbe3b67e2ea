"""Exporting a converted or trained model for serving without sam_jax's model code.

    export_model(model, params, "out/", format="onnx")       # decoder.onnx (official interface),
                                                             # encoder.onnx, export.json
    export_model(model, params, "out/", format="stablehlo")  # jax.export + StableHLO artifacts

`sam-jax export` is the command line. `graphs` holds the exported functions, `onnx_graphs` the
ONNX conversion (jax2onnx) and `stablehlo` the `jax.export` path; no path needs torch.
"""

from sam_jax.export.exporter import FORMATS, MANIFEST, PARTS, check_request, export_model

__all__ = ["FORMATS", "MANIFEST", "PARTS", "check_request", "export_model"]
