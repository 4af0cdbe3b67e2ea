"""Command line: official SAM `.pth` or Hugging Face SAM weights -> sam_jax checkpoint directory.

    python -m checkpoints_convert.convert sam_vit_b_01ec64.pth converted/vit_b
    python -m checkpoints_convert.convert path/to/facebook-sam-vit-base/ converted/vit_b_hf

The model type is read off the tensor shapes; `--model-type` checks it. The
output directory appears only when conversion succeeded (`sam_jax.weights.
save_params` stages it and renames it into place). No torch needed. The same
command is `sam-jax convert`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from checkpoints_convert.huggingface import huggingface_to_official, is_huggingface_state_dict
from checkpoints_convert.official import detect_config, official_to_flax
from checkpoints_convert.pth_reader import load_state_dict
from sam_jax import weights
from sam_jax.configs import CONFIGS, SamConfig
from sam_jax.errors import CheckpointError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DESCRIPTION = ("Converts official SAM `.pth` or Hugging Face SAM weights into a new sam_jax checkpoint "
               "folder. The model type is read off the tensor shapes; the folder appears only when "
               "conversion succeeded. No torch needed.")


def resolve_weights_file(path: Path) -> Path:
    """A checkpoint file, or the weights file inside a Hugging Face model directory."""
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: directory holds none of {', '.join(HF_WEIGHT_FILES)}")
    return path


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    model_type: Optional[str] = None,
    layout: str = weights.LOOPED,
) -> SamConfig:
    """Converts `source` into a new sam_jax checkpoint directory `output`; returns its config."""
    source, output = Path(source), Path(output)
    if output.exists():
        raise CheckpointError(f"{output} already exists; choose a new output directory")
    if model_type is not None and model_type not in CONFIGS:
        raise CheckpointError(f"unknown --model-type {model_type!r}; choose from {sorted(CONFIGS)}")
    weights_file = resolve_weights_file(source)
    state_dict = load_state_dict(weights_file)
    kind = "huggingface" if is_huggingface_state_dict(state_dict) else "official"
    try:
        if kind == "huggingface":
            state_dict = huggingface_to_official(state_dict)
        config = detect_config(state_dict)
    except CheckpointError as err:  # these name keys, not the file
        raise CheckpointError(f"{weights_file}: {err}") from err
    if model_type is not None and model_type != config.name:
        e = config.encoder
        raise CheckpointError(
            f"{weights_file} is a {config.name} checkpoint (embed_dim {e.embed_dim}, depth "
            f"{e.depth}), not {model_type}"
        )
    params = official_to_flax(state_dict, config, source=str(weights_file))
    del state_dict
    params = weights.to_layout(params, config, layout)
    weights.save_params(output, params, config, source=f"{kind}:{weights_file.name}")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (this module's `main` and `sam-jax convert` share them)."""
    parser.add_argument("source", help="official .pth, HF .safetensors/.bin, or HF model directory")
    parser.add_argument("output", help="new directory for the converted checkpoint")
    parser.add_argument("--model-type", choices=sorted(CONFIGS), help="fail unless the checkpoint is this model")
    parser.add_argument("--layout", choices=weights.LAYOUTS, default=weights.LOOPED,
                        help="encoder block layout: looped (inference) or scanned (Sam(scan_blocks=True))")


def run(args: argparse.Namespace) -> int:
    """Converts as `args` say and prints one line; errors propagate (CheckpointError, OSError)."""
    start = time.perf_counter()
    config = convert_checkpoint(args.source, args.output, args.model_type, args.layout)
    print(f"converted {args.source} ({config.name}, {args.layout}) -> {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def command_main(prog: str, description: str, add_args, run_args, argv: Optional[list[str]] = None) -> int:
    """A converter command: parse, run, and one `error:` line with exit status 2 for a bad checkpoint
    or an unwritable output."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_args(args)
    except (CheckpointError, OSError) as err:  # FileExistsError, a full disk, an unwritable folder
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    return command_main("python -m checkpoints_convert.convert", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
