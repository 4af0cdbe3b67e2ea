"""`sam-jax export`: a checkpoint as ONNX or StableHLO, for serving without sam_jax.

--format onnx writes decoder.onnx with the official export's inputs and outputs
(the official web demo and ONNX tools for SAM run it unchanged) and
encoder.onnx (one resized image in, its embedding out). --format stablehlo
writes jax.export and portable StableHLO artifacts with symbolic batch and
point counts. export.json beside them records every input and output. The
folder appears only when complete.
"""

from __future__ import annotations

import argparse

from sam_jax.cli import common


def add_parser(subparsers) -> None:
    parser = common.add_model_command(subparsers, "export", __doc__,
                                      "a checkpoint as ONNX (official decoder interface) or StableHLO")
    parser.add_argument("--format", required=True, choices=("onnx", "stablehlo"))
    parser.add_argument("--part", choices=("decoder", "encoder", "both"), default="both",
                        help="what to export (default both)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    official = parser.add_argument_group("decoder options (the official scripts/export_onnx_model.py's)")
    official.add_argument("--return-single-mask", action="store_true",
                          help="one mask: the best by predicted IoU, or the single-mask token below 3 points")
    official.add_argument("--use-stability-score", action="store_true",
                          help="iou_predictions holds the stability score of each low-res mask instead")
    official.add_argument("--return-extra-metrics", action="store_true",
                          help="ONNX only: also stability_scores and areas of the upscaled masks")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sam_jax.export import check_request, export_model
    from sam_jax.weights import load_sam

    options = dict(return_single_mask=args.return_single_mask, use_stability_score=args.use_stability_score,
                   return_extra_metrics=args.return_extra_metrics)
    check_request(args.format, args.part, args.output, args.overwrite, **options)  # before the model loads
    metadata = common.check_checkpoint(args.checkpoint)
    if args.format == "onnx":
        try:
            import jax2onnx  # noqa: F401
            import onnx  # noqa: F401
        except ImportError as err:
            raise common.UsageError(f"--format onnx needs the export extra: pip install 'sam_jax[export]' "
                                    f"({err.name} is not installed)") from None
    model, params = load_sam(args.checkpoint)
    common.note(f"exporting {metadata['config']['name']} from {args.checkpoint} as {args.format} "
                f"({args.part}) ...")
    output = export_model(model, params, args.output, args.format, args.part, **options,
                          overwrite=args.overwrite, source=str(args.checkpoint))
    print(output)
    return 0
