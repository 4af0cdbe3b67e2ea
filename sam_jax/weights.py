"""Model weights: the two param layouts, saving, strict loading, and `load_sam`.

A converted (or exported) checkpoint is a directory:
  sam_jax.json   {"format": "sam_jax", "config": {...}, "layout": "looped"|"scanned", "source": ...}
  params/        the orbax PyTree checkpoint of the params dict

`save_params` writes it under a temporary name beside the target and renames
it into place when complete, so a checkpoint directory that exists is whole.
Loading is strict: every expected param present with its shape, nothing
extra; otherwise a CheckpointError listing the offending keys.

The encoder's block params come in two layouts:
- "looped": `image_encoder/blocks_{i}/...`, one subtree per block (the
  official order; what the converter writes).
- "scanned": `image_encoder/block_groups/blocks_{j}/...` with a leading axis
  of length `num_groups`, for `Sam(scan_blocks=True)`: block
  `i = group * blocks_per_group + j`.
A checkpoint records its layout, and `load_params` returns either.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sam_jax.configs import SamConfig
from sam_jax.errors import CheckpointError
from sam_jax.modeling.sam import Sam
from sam_jax.staging import staged_directory
from sam_jax.tree_paths import flatten, list_keys

METADATA_FILE = "sam_jax.json"
PARAMS_DIR = "params"
FORMAT = "sam_jax"

LOOPED = "looped"
SCANNED = "scanned"
LAYOUTS = (LOOPED, SCANNED)

Params = dict[str, Any]


# ----------------------------------------------------------------------------- layouts


def layout_of(params: Params) -> str:
    return SCANNED if "block_groups" in params["image_encoder"] else LOOPED


def _tree_map(fn, *trees):
    if isinstance(trees[0], dict):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def to_scanned(params: Params, config: SamConfig) -> Params:
    """Looped -> scanned: stacks block `g * blocks_per_group + j` at `[g]` of `blocks_{j}`."""
    if layout_of(params) == SCANNED:
        return params
    enc_cfg = config.encoder
    if not enc_cfg.is_periodic():
        raise ValueError(f"{config.name}: global blocks {enc_cfg.global_attn_indexes} do not scan")
    encoder = dict(params["image_encoder"])
    g = enc_cfg.blocks_per_group
    groups = len(enc_cfg.global_attn_indexes)
    blocks = [encoder.pop(f"blocks_{i}") for i in range(enc_cfg.depth)]
    encoder["block_groups"] = {
        f"blocks_{j}": _tree_map(lambda *xs: np.stack(xs), *blocks[j::g][:groups]) for j in range(g)
    }
    return {**params, "image_encoder": encoder}


def to_looped(params: Params, config: SamConfig) -> Params:
    """Scanned -> looped: the inverse of `to_scanned`."""
    if layout_of(params) == LOOPED:
        return params
    encoder = dict(params["image_encoder"])
    stacked = encoder.pop("block_groups")
    g = config.encoder.blocks_per_group
    for i in range(config.encoder.depth):
        group, j = divmod(i, g)
        encoder[f"blocks_{i}"] = _tree_map(lambda x: np.asarray(x[group]), stacked[f"blocks_{j}"])
    return {**params, "image_encoder": encoder}


def to_layout(params: Params, config: SamConfig, layout: str) -> Params:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown param layout {layout!r}; choose one of {LAYOUTS}")
    return to_scanned(params, config) if layout == SCANNED else to_looped(params, config)


# ----------------------------------------------------------------------------- strict checks


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


def check_values(arrays: Mapping[str, Any], what: str) -> None:
    """Raises CheckpointError naming the tensors of {name: array} that are not floating point
    or hold NaN / infinite values (a cast would hide the one, the model would spread the other)."""
    problems = []
    for name, array in arrays.items():
        array = np.asarray(array)
        if not jax.dtypes.issubdtype(array.dtype, np.floating):
            problems.append(f"{name} is {array.dtype}, not floating point")
        elif (bad := array.size - int(np.isfinite(array.astype(np.float32)).sum())):
            problems.append(f"{name} holds {bad} NaN or infinite value{'s' * (bad > 1)}")
    if problems:
        raise CheckpointError(f"{what}: " + list_keys(problems, limit=4))


def _init_inputs(config: SamConfig) -> tuple:
    """One image and one prompt of every kind: what `Sam.init` needs to create every param
    (a text-prompt head creates its own)."""
    s, e = config.image_size, config.embedding_size
    return (jnp.zeros((1, s, s, 3)), jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 4)),
            jnp.zeros((1, 1, 4 * e, 4 * e)))


def abstract_params(config: SamConfig, scan_blocks: bool = False) -> Params:
    """The params tree of `Sam(config)` as ShapeDtypeStructs, without allocating it."""
    model = Sam(config, scan_blocks=scan_blocks)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_init_inputs(config)))["params"]


def init_params(model: Sam, seed: int = 0) -> Params:
    """Freshly initialised params of `model` (its own layout: looped or scanned)."""
    return jax.jit(model.init)(jax.random.PRNGKey(seed), *_init_inputs(model.config))["params"]


# ----------------------------------------------------------------------------- saving and loading


def error_reason(err: BaseException, limit: int = 300) -> str:
    """One line of what went wrong. orbax wraps tensorstore's specific error ("OUT_OF_RANGE: Error
    reading ... byte range ...") in a generic one; the innermost tensorstore error of the chain
    is the reason when there is one, else `err`'s own message; at most `limit` characters."""
    reason, chained = err, err
    while chained is not None:
        if _TENSORSTORE_STATUS.match(str(chained)):
            reason = chained
        chained = chained.__cause__ or chained.__context__
    text = " ".join(str(reason).split()) or type(reason).__name__
    if len(text) > limit:  # the middle goes: tensorstore names the file first and the fault last
        text = f"{text[:limit // 2 - 2]} ... {text[-(limit // 2 - 3):]}"
    return text


_TENSORSTORE_STATUS = re.compile(r"[A-Z_]{4,}: ")  # absl status codes: NOT_FOUND, OUT_OF_RANGE, ...


class _DropEchoes(logging.Filter):
    """Drops ERROR records that contain every one of `words`."""

    def __init__(self, *words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (record.levelno >= logging.ERROR and all(w in text for w in self.words))


@contextlib.contextmanager
def orbax_failures_quiet(directory: str | os.PathLike) -> Iterator[None]:
    """Keeps a failed orbax read or write of `directory` to the one error it raises.

    orbax reads and writes a checkpoint's arrays concurrently in threads and event loops.
    When one of them fails, the error is raised here; besides it, the operations still in
    flight report "Event loop is closed" through `sys.unraisablehook`, orbax's threads log
    the error again (logger "absl"), and asyncio reports their futures as never retrieved
    when they are collected, as late as the interpreter's exit: a stream of tracebacks.
    Those echoes, and only those, are dropped: the loop reports and the reports of reads of
    `directory` closed mid-failure while the block runs and until they stop (milliseconds),
    orbax's logs while it runs, and asyncio's notices of failures that name `directory` from
    then on.
    """
    previous = sys.unraisablehook
    last_echo = [time.monotonic()]

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if closed_loop or str(directory) in str(error):  # the latter: a read of it closed mid-failure
            last_echo[0] = time.monotonic()
        else:
            previous(unraisable)

    orbax_logs = _DropEchoes("raised an exception")
    logging.getLogger("absl").addFilter(orbax_logs)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        logging.getLogger("asyncio").addFilter(_DropEchoes("exception was never retrieved", str(directory)))
        gc.collect()  # closes the abandoned reads now, while their reports are dropped
        last_echo[0] = deadline = time.monotonic()
        deadline += 2.0
        while time.monotonic() < deadline and time.monotonic() - last_echo[0] < 0.2:
            time.sleep(0.02)
        raise
    finally:
        sys.unraisablehook = previous
        logging.getLogger("absl").removeFilter(orbax_logs)


def save_params(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    config: SamConfig,
    source: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Writes params (either layout, recorded) and the config as the checkpoint `directory`.

    The checkpoint is staged in a temporary folder beside `directory` and renamed
    into place when complete; on any failure nothing is left. An existing
    `directory` is a FileExistsError, unless `overwrite` and it is a sam_jax
    checkpoint, which is then replaced (the old one removed after the swap).
    """
    directory = check_output_directory(directory, overwrite)
    layout = layout_of(params)
    check_params_match(abstract_params(config, layout == SCANNED), params, "params to save")
    check_values(flatten(params), "params to save")
    metadata = {"format": FORMAT, "config": config.to_dict(), "layout": layout, "source": source}
    return write_checkpoint(directory, params, metadata)


def check_output_directory(directory: str | os.PathLike, overwrite: bool) -> Path:
    """`directory` as an absolute path, if a checkpoint may be written there: FileExistsError when
    it exists, unless `overwrite` and it is a checkpoint of this package (it has METADATA_FILE)."""
    directory = Path(directory).absolute()
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; choose a new output directory")
        if not (directory / METADATA_FILE).is_file():
            raise FileExistsError(f"{directory} exists and is not a sam_jax checkpoint; not replacing it")
    return directory


def write_checkpoint(directory: Path, params: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path:
    """Writes checked `params` (orbax, under PARAMS_DIR) and `metadata` (METADATA_FILE) as the
    checkpoint `directory`, staged and renamed into place (see `save_params`)."""
    with staged_directory(directory) as staged:
        try:
            with orbax_failures_quiet(staged.parent):
                ocp.PyTreeCheckpointer().save(staged / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, params))
        except (OSError, ValueError) as err:  # tensorstore reports a failed write as a ValueError
            failure = OSError(f"{directory}: cannot write the checkpoint ({_write_error_reason(err)})")
            failure.errno = _write_error_errno(err)
            raise failure from None
        (staged / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return directory


def _write_error_errno(err: Exception) -> int:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    match = re.search(r"os_error_code='(\d+)'", str(err))
    return int(match.group(1)) if match else errno.EIO


def _write_error_reason(err: Exception) -> str:
    """The OS's words for a failed write (e.g. "No space left on device"), else the error's."""
    code = _write_error_errno(err)
    return os.strerror(code) if code != errno.EIO else " ".join(str(err).split())[:200]


# The format a CLIP checkpoint records (`sam_jax.clip.checkpoint`): refused here by name.
CLIP_FORMAT = "sam_jax_clip"


def read_metadata_file(directory: str | os.PathLike, convert_hint: str) -> dict[str, Any]:
    """The parsed METADATA_FILE of the checkpoint folder `directory` (any format); CheckpointError
    when there is no such folder (`convert_hint`: how to make one), no such file, or bad JSON."""
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a converted sam_jax checkpoint (no {METADATA_FILE}); "
                              f"{convert_hint}")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({err})") from err
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{meta_path}: not sam_jax checkpoint metadata")
    return metadata


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    metadata = read_metadata_file(
        directory, "convert official weights with `python -m checkpoints_convert.convert`")
    if metadata.get("format") == CLIP_FORMAT:
        raise CheckpointError(
            f"{directory} is a CLIP checkpoint (text encoder {metadata.get('config', {}).get('name')!r}), "
            "not a SAM checkpoint; load it with sam_jax.clip.load_clip (sam-jax segment --clip-checkpoint)")
    if metadata.get("format") != FORMAT or metadata.get("layout") not in LAYOUTS:
        raise CheckpointError(f"{directory / METADATA_FILE}: not sam_jax checkpoint metadata")
    return metadata


def restore_params(directory: Path) -> Params:
    """The orbax params tree under `directory / PARAMS_DIR`, as saved (unchecked);
    CheckpointError with the reason when unreadable."""
    try:
        with orbax_failures_quiet(directory):
            return ocp.PyTreeCheckpointer().restore(directory / PARAMS_DIR)
    except Exception as err:  # orbax raises many types for unreadable or partial files
        raise CheckpointError(f"{directory / PARAMS_DIR}: cannot restore params ({error_reason(err)})") from err


def load_params(
    directory: str | os.PathLike, scan_blocks: bool = False, dtype: Any = jnp.float32
) -> tuple[SamConfig, Params]:
    """Strictly restores params in the layout `scan_blocks` asks for, cast to `dtype`."""
    directory = Path(directory).absolute()
    metadata = read_metadata(directory)
    try:
        config = SamConfig.from_dict(metadata["config"])
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{directory / METADATA_FILE}: bad config ({err})") from err
    params = restore_params(directory)
    check_params_match(abstract_params(config, metadata["layout"] == SCANNED), params, str(directory))
    check_values(flatten(params), str(directory))
    params = to_layout(params, config, SCANNED if scan_blocks else LOOPED)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return config, params


def load_sam(
    directory: str | os.PathLike,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_blocks: bool = False,
    remat_policy: Optional[str] = None,
    drop_path_rate: float = 0.0,
) -> tuple[Sam, Params]:
    """Loads a converted checkpoint: returns `(model, params)` for `model.apply({"params": params}, ...)`.
    `drop_path_rate` is for fine-tuning (see `Sam`); inference calls ignore it."""
    config, params = load_params(directory, scan_blocks=scan_blocks, dtype=param_dtype)
    model = Sam(config, dtype=dtype, param_dtype=param_dtype, scan_blocks=scan_blocks,
                remat_policy=remat_policy, drop_path_rate=drop_path_rate)
    return model, params
