"""Command line: official SAM `.pth` or Hugging Face SAM weights -> sam_jax checkpoint directory.

    python -m checkpoints_convert.convert sam_vit_b_01ec64.pth converted/vit_b
    python -m checkpoints_convert.convert path/to/facebook-sam-vit-base/ converted/vit_b_hf

The model type is read off the tensor shapes; `--model-type` checks it. The
output directory is written under a temporary name and renamed when complete,
so a failed conversion leaves nothing behind. No torch needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from checkpoints_convert.huggingface import huggingface_to_official, is_huggingface_state_dict
from checkpoints_convert.official import detect_config, official_to_flax
from checkpoints_convert.pth_reader import load_state_dict
from sam_jax import param_layout
from sam_jax.checkpoint import save_params
from sam_jax.configs import CONFIGS, SamConfig
from sam_jax.errors import CheckpointError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
    layout: str = param_layout.LOOPED,
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
    params = param_layout.to_layout(params, config, layout)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_params(staging / "ckpt", params, config, source=f"{kind}:{weights_file.name}")
        os.replace(staging / "ckpt", output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_convert.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", help="official .pth, HF .safetensors/.bin, or HF model directory")
    parser.add_argument("output", help="new directory for the converted checkpoint")
    parser.add_argument("--model-type", choices=sorted(CONFIGS), help="fail unless the checkpoint is this model")
    parser.add_argument("--layout", choices=param_layout.LAYOUTS, default=param_layout.LOOPED,
                        help="encoder block layout: looped (inference) or scanned (Sam(scan_blocks=True))")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        config = convert_checkpoint(args.source, args.output, args.model_type, args.layout)
    except (CheckpointError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.source} ({config.name}, {args.layout}) -> {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
