"""Saving and strictly loading converted params (orbax), and `load_sam`.

A converted checkpoint is a directory:
  sam_jax.json   {"format": "sam_jax", "config": {...}, "layout": "looped"|"scanned", "source": ...}
  params/        the orbax PyTree checkpoint of the params dict

Loading is strict: every expected param present with its shape, nothing
extra; otherwise a CheckpointError listing the offending keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sam_jax import param_layout
from sam_jax.configs import SamConfig
from sam_jax.errors import CheckpointError
from sam_jax.modeling.sam import Sam

METADATA_FILE = "sam_jax.json"
PARAMS_DIR = "params"
FORMAT = "sam_jax"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def list_keys(keys, limit: int = 8) -> str:
    """Sorted keys, the first `limit` of them and a count: for one-line error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_params_match(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    """Raises CheckpointError unless `actual` has exactly `expected`'s keys and shapes.

    Both are nested dicts; leaves need a `.shape`.
    """
    exp, act = flatten(expected), flatten(actual)
    problems = []
    if missing := exp.keys() - act.keys():
        problems.append(f"missing {list_keys(missing)}")
    if extra := act.keys() - exp.keys():
        problems.append(f"unexpected {list_keys(extra)}")
    misshapen = [
        f"{k} {tuple(act[k].shape)} != expected {tuple(exp[k].shape)}"
        for k in sorted(exp.keys() & act.keys())
        if tuple(exp[k].shape) != tuple(act[k].shape)
    ]
    if misshapen:
        problems.append(f"misshapen {list_keys(misshapen)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def abstract_params(config: SamConfig, scan_blocks: bool = False) -> dict[str, Any]:
    """The params tree of `Sam(config)` as ShapeDtypeStructs, without allocating it."""
    model = Sam(config, scan_blocks=scan_blocks)
    s, e = config.image_size, config.embedding_size
    variables = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, s, s, 3)),
            jnp.zeros((1, 1, 2)),
            jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, 4)),
            jnp.zeros((1, 1, 4 * e, 4 * e)),
        )
    )
    return variables["params"]


def save_params(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    config: SamConfig,
    source: Optional[str] = None,
) -> Path:
    """Writes params (either layout, recorded) and the config to `directory`, which must not exist."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new output directory")
    layout = param_layout.layout_of(params)
    check_params_match(abstract_params(config, layout == param_layout.SCANNED), params, "params to save")
    directory.mkdir(parents=True)
    ocp.PyTreeCheckpointer().save(directory / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, params))
    metadata = {"format": FORMAT, "config": config.to_dict(), "layout": layout, "source": source}
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory}: not a converted sam_jax checkpoint (no {METADATA_FILE}); "
            "convert official weights with `python -m checkpoints_convert.convert`"
        )
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({err})") from err
    if metadata.get("format") != FORMAT or metadata.get("layout") not in param_layout.LAYOUTS:
        raise CheckpointError(f"{meta_path}: not sam_jax checkpoint metadata")
    return metadata


def load_params(
    directory: str | os.PathLike, scan_blocks: bool = False, dtype: Any = jnp.float32
) -> tuple[SamConfig, dict[str, Any]]:
    """Strictly restores params in the layout `scan_blocks` asks for, cast to `dtype`."""
    directory = Path(directory).absolute()
    metadata = read_metadata(directory)
    try:
        config = SamConfig.from_dict(metadata["config"])
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{directory / METADATA_FILE}: bad config ({err})") from err
    try:
        params = ocp.PyTreeCheckpointer().restore(directory / PARAMS_DIR)
    except Exception as err:  # orbax raises many types for unreadable or partial files
        raise CheckpointError(f"{directory / PARAMS_DIR}: cannot restore params ({err})") from err
    saved_scanned = metadata["layout"] == param_layout.SCANNED
    check_params_match(abstract_params(config, saved_scanned), params, str(directory))
    layout = param_layout.SCANNED if scan_blocks else param_layout.LOOPED
    params = param_layout.to_layout(params, config, layout)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return config, params


def load_sam(
    directory: str | os.PathLike,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_blocks: bool = False,
    remat_policy: Optional[str] = None,
    drop_path_rate: float = 0.0,
) -> tuple[Sam, dict[str, Any]]:
    """Loads a converted checkpoint: returns `(model, params)` for `model.apply({"params": params}, ...)`.
    `drop_path_rate` is for fine-tuning (see `Sam`); inference calls ignore it."""
    config, params = load_params(directory, scan_blocks=scan_blocks, dtype=param_dtype)
    model = Sam(config, dtype=dtype, param_dtype=param_dtype, scan_blocks=scan_blocks,
                remat_policy=remat_policy, drop_path_rate=drop_path_rate)
    return model, params
