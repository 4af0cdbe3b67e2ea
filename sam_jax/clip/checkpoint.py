"""CLIP checkpoints in sam_jax's format: `save_clip` / `load_clip`.

A CLIP checkpoint is a directory laid out as a SAM one (`sam_jax.weights`):
  sam_jax.json   {"format": "sam_jax_clip", "config": {ClipConfig}, "source": ...}
  params/        the orbax PyTree checkpoint of `CLIP(config)`'s params

written the same way (staged beside the target, renamed into place when
complete) and loaded as strictly: every param of `CLIP(config)` present with
its shape, nothing extra, all finite floats, or one CheckpointError line
naming the offending keys. A SAM checkpoint given as a CLIP one (or the
reverse, to `sam_jax.weights.load_params`) is a CheckpointError saying so.
Convert open_clip / Hugging Face CLIP weights with
`python -m checkpoints_convert.clip SRC OUT` (or `sam-jax convert-clip`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from sam_jax import weights
from sam_jax.clip.configs import ClipConfig
from sam_jax.clip.model import abstract_clip_params
from sam_jax.errors import CheckpointError
from sam_jax.tree_paths import flatten

FORMAT = weights.CLIP_FORMAT
CONVERT_HINT = "convert open_clip / Hugging Face CLIP weights with `python -m checkpoints_convert.clip`"

Params = dict[str, Any]


def save_clip(directory: str | os.PathLike, params: Mapping[str, Any], config: ClipConfig,
              source: Optional[str] = None, overwrite: bool = False) -> Path:
    """Writes `CLIP(config)`'s params and the config as the CLIP checkpoint `directory`.

    Strict as `sam_jax.weights.save_params`: the params must be exactly `CLIP(config)`'s
    (CheckpointError naming missing / unexpected / misshapen keys) and finite floats; the
    folder appears only when complete; an existing `directory` is a FileExistsError unless
    `overwrite` (and it is a sam_jax checkpoint)."""
    if not isinstance(config, ClipConfig):
        raise TypeError(f"save_clip needs a ClipConfig; got {type(config).__name__}")
    directory = weights.check_output_directory(directory, overwrite)
    weights.check_params_match(abstract_clip_params(config), params, "CLIP params to save")
    weights.check_values(flatten(params), "CLIP params to save")
    metadata = {"format": FORMAT, "config": config.to_dict(), "source": source}
    return weights.write_checkpoint(directory, params, metadata)


def read_clip_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the CLIP checkpoint `directory`; CheckpointError when it is none (a SAM
    checkpoint is named as such)."""
    directory = Path(directory)
    metadata = weights.read_metadata_file(directory, CONVERT_HINT)
    if metadata.get("format") == weights.FORMAT:
        name = metadata.get("config", {}).get("name") if isinstance(metadata.get("config"), dict) else None
        raise CheckpointError(f"{directory} is a SAM checkpoint (model {name!r}), not a CLIP checkpoint; "
                              f"load it with sam_jax.load_sam (sam-jax --checkpoint); {CONVERT_HINT}")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{directory / weights.METADATA_FILE}: not sam_jax CLIP checkpoint metadata")
    return metadata


def read_clip_config(directory: str | os.PathLike) -> ClipConfig:
    """The ClipConfig the CLIP checkpoint `directory` records, without reading its params."""
    directory = Path(directory)
    try:
        return ClipConfig.from_dict(read_clip_metadata(directory)["config"])
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory / weights.METADATA_FILE}: bad CLIP config ({err})") from err


def load_clip(directory: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[ClipConfig, Params]:
    """Strictly restores a CLIP checkpoint: (config, params for `CLIP(config)`), cast to `dtype`."""
    directory = Path(directory).absolute()
    config = read_clip_config(directory)
    params = weights.restore_params(directory)
    weights.check_params_match(abstract_clip_params(config), params, str(directory))
    weights.check_values(flatten(params), str(directory))
    return config, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
