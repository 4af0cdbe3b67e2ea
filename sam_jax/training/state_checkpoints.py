"""Train-state checkpoints that resume exactly: an orbax `CheckpointManager` with three items.

    workdir/checkpoints/<step>/
      state/   the train state pytree (StandardSave: params, opt_state, step, rng, ...)
      data/    the input iterator's state (JSON, e.g. InputPipeline.get_state())
      meta/    anything JSON-able the run wants kept beside it, e.g. the config (or null)

Orbax does the work (asynchronous saves, keeping the last `max_to_keep`, the save
interval, sharded multi-process arrays). This module adds only:

- a finiteness guard: a state with a NaN/inf in any floating leaf is never
  written; `save` logs the first such leaf's path and returns False;
- typed PRNG keys (`jax.random.key`): stored as their `key_data` (uint32, trailing
  key dimension) and wrapped back with the dtype of the abstract state's leaf, so
  the on-disk form does not depend on an orbax version's key support. A raw
  uint32 key and a typed threefry key therefore share one on-disk form;
- strict restores: the state to restore into must match the checkpoint leaf by
  leaf (path, shape, dtype), or a CheckpointError names the differences; a
  missing checkpoint is a FileNotFoundError naming the directory and its steps.

Usage (every process of a multi-process run makes the same calls):

    ckpt = TrainStateCheckpointer(workdir, max_to_keep=3, save_interval_steps=1000)
    if ckpt.latest_step() is not None:
        state, data_state, meta = ckpt.restore(abstract_state)  # eval_shape + shardings
        pipeline.set_state(data_state)
    ...
    ckpt.save(step, state, pipeline.get_state(), meta={"config": ...})
    ...
    ckpt.close()  # waits for the last asynchronous save

An asynchronous `save` returns once the arrays are copied off the devices, so
the state may be donated to the next step right after it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sam_jax.errors import CheckpointError
from sam_jax.tree_paths import flatten, list_keys, path_str
from sam_jax.weights import error_reason, orbax_failures_quiet

STATE, DATA, META = "state", "data", "meta"
CHECKPOINTS_DIR = "checkpoints"

log = logging.getLogger(__name__)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_non_finite(state) -> Optional[str]:
    """The path of the first floating leaf of `state` holding a NaN or inf; None if all are finite.

    One jitted reduction over every floating leaf, so sharded (multi-process)
    arrays work; every process must call it.
    """
    flat = [(p, x) for p, x in flatten(state).items()
            if not _is_key(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not flat:
        return None
    flags = np.asarray(_finite_flags([x for _, x in flat]))  # replicated: readable on every process
    return None if flags.all() else flat[int(np.argmin(flags))][0]


def _to_stored_abstract(abstract_state):
    """The abstract state as stored: ShapeDtypeStructs with shardings, typed keys as key_data."""
    single_device = jax.device_count() == 1

    def convert(path, x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x  # a Python scalar: restored as saved
        if isinstance(x, (np.ndarray, np.generic)):
            return x  # a host array: restored as numpy
        sharding = getattr(x, "sharding", None)
        if sharding is None and not single_device:
            raise ValueError(
                f"restore: leaf {path_str(path)} of the state to restore into has no sharding; with "
                f"{jax.device_count()} devices give every leaf one (jax.ShapeDtypeStruct(..., sharding=...))"
            )
        if _is_key(x):  # key_data has a trailing key dimension, which a NamedSharding leaves unsharded
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(convert, abstract_state)


class TrainStateCheckpointer:
    """Asynchronous, rotating checkpoints of (train state, input iterator state, meta) in `workdir/checkpoints`."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: Optional[int] = 3,  # None: keep all
        save_interval_steps: int = 1,  # save() writes only at multiples of this (unless force)
        async_save: bool = True,  # False: save() returns once the checkpoint is committed
    ):
        self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove saves a crash left half-written
        )
        handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
                    META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any, meta: Any = None, force: bool = False) -> bool:
        """Saves (asynchronously) if the interval policy or `force` says so and `state` is finite.

        Returns whether a save was started. A state with a non-finite floating leaf
        is not written: a warning names the leaf and False is returned.
        """
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        bad = first_non_finite(state)
        if bad is not None:
            log.warning("not saving the checkpoint of step %d in %s: %s is not finite", step, self.directory, bad)
            return False
        stored = jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(stored),
            DATA: ocp.args.JsonSave(data_state),
            META: ocp.args.JsonSave(meta),
        })
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, Any]:
        """(state, data_state, meta) of `step` (None: the newest readable one), the state onto
        `abstract_state`.

        `abstract_state` has the structure of the state: `jax.ShapeDtypeStruct`s with
        shardings (e.g. `jax.eval_shape` output given the train shardings) or arrays
        whose shardings to use. With `step=None` a checkpoint that cannot be read (a
        missing or truncated file, corrupt JSON) is logged, moved aside to
        `<step>.unreadable` (nothing is deleted) and the one before it is restored.
        Raises FileNotFoundError when there is no such checkpoint, and CheckpointError (a
        ValueError) when a checkpoint does not match `abstract_state` (a changed model is
        not a corrupt file: no fallback) or when none can be read.
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is None and not steps:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        if step is not None and int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {self.directory}; it has steps {steps or 'none'}"
            )
        target = _to_stored_abstract(abstract_state)
        candidates = [int(step)] if step is not None else steps[::-1]
        for i, candidate in enumerate(candidates):
            try:
                restored = self._restore_step(candidate, target)
            except CheckpointError:
                raise
            except Exception as err:  # orbax and tensorstore raise many types for unreadable files
                reason = error_reason(err)
                if i + 1 == len(candidates):
                    earlier = "" if step is not None else ", and no earlier checkpoint can be read"
                    raise CheckpointError(
                        f"checkpoint of step {candidate} in {self.directory} cannot be read ({reason}){earlier}"
                    ) from err
                aside = self._move_aside(candidate)
                log.warning("checkpoint of step %d in %s cannot be read (%s); moved it to %s and restoring "
                            "step %d instead", candidate, self.directory, reason, aside, candidates[i + 1])
                continue

            def rewrap(want, got):
                return jax.random.wrap_key_data(got, dtype=want.dtype) if _is_key(want) else got

            state = jax.tree_util.tree_map(rewrap, abstract_state, restored[STATE])
            return state, restored[DATA], restored[META]
        raise AssertionError("unreachable")

    def _restore_step(self, step: int, target) -> dict:
        step_dir = Path(self.directory) / str(step)
        if not (step_dir / STATE / "_METADATA").is_file():  # orbax would report a pytree structure error
            raise ValueError(f"{step_dir / STATE / '_METADATA'} is missing (the state's tree layout)")
        self._check_matches(step, target)
        for item in (DATA, META):  # orbax's JSON errors name no file
            path = step_dir / item / "metadata"
            try:
                json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: not a readable JSON file ({err})") from err
        with orbax_failures_quiet(self.directory):
            return self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(target),
                DATA: ocp.args.JsonRestore(),
                META: ocp.args.JsonRestore(),
            }))

    def _move_aside(self, step: int) -> Path:
        """Renames an unreadable checkpoint out of the manager's sight (process 0; all wait)."""
        source = Path(self.directory) / str(step)
        aside = source.with_name(f"{step}.unreadable")
        if jax.process_index() == 0:
            suffix = 1
            while aside.exists():
                aside, suffix = source.with_name(f"{step}.unreadable.{suffix}"), suffix + 1
            os.replace(source, aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
        self._manager.reload()
        return aside

    def _check_matches(self, step: int, target) -> None:
        """Raises CheckpointError naming the leaves where `target` and checkpoint `step` differ."""
        metadata = self._manager.item_metadata(step)[STATE]
        if metadata is None:  # orbax could not read it; let restore say why
            return
        saved = flatten(getattr(metadata, "tree", metadata))
        wanted = flatten(target)
        problems = []
        if missing := sorted(wanted.keys() - saved.keys()):
            problems.append(f"not in the checkpoint: {list_keys(missing)}")
        if extra := sorted(saved.keys() - wanted.keys()):
            problems.append(f"in the checkpoint but not in the state: {list_keys(extra)}")

        def describe(x):
            return f"{tuple(getattr(x, 'shape', ()) or ())} {getattr(x, 'dtype', type(x).__name__)}"

        differing = []
        for path in sorted(wanted.keys() & saved.keys()):
            want, have = wanted[path], saved[path]
            same_shape = tuple(getattr(want, "shape", ())) == tuple(getattr(have, "shape", ()) or ())
            same_dtype = (not hasattr(want, "dtype") or getattr(have, "dtype", None) is None
                          or np.dtype(want.dtype) == np.dtype(have.dtype))
            if not (same_shape and same_dtype):
                differing.append(f"{path} is {describe(have)} in the checkpoint, {describe(want)} in the state")
        if differing:
            problems.append(list_keys(differing, limit=3))
        if problems:
            raise CheckpointError(
                f"checkpoint of step {step} in {self.directory} does not match the state to restore into "
                f"(a changed model or optimizer?): " + "; ".join(problems)
            )

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a pending save and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainStateCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
