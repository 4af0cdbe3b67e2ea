"""TrainStateCheckpointer: exact resume of (train state, input iterator state, meta).

In process on the one CPU device: bit-identical round trips of a realistic state
(a flax struct with params, a multi_transform/adamw optax state after real
updates, a typed or raw PRNG key), async saves, rotation, the interval policy,
the finiteness guard, resuming from the latest step, strict structure checks.
In subprocesses on 8 fake CPU devices (one process, and two `jax.distributed`
processes of 4): a NamedSharding-sharded state restored onto another mesh.
"""

from __future__ import annotations

import logging
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from device_workers import run_workers
from sam_jax.errors import CheckpointError
from sam_jax.training.state_checkpoints import TrainStateCheckpointer

WORKER = os.path.join(os.path.dirname(__file__), "train_checkpoint_worker.py")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    num_examples: jax.Array  # a small counter


LABELS = {
    "image_encoder": {"patch_embed": {"kernel": "trainable", "bias": "trainable"}},
    "mask_decoder": {"iou_head": {"kernel": "trainable", "bias": "trainable"}, "pe_matrix": "frozen"},
}


def make_optimizer():
    """The project's shape of optimizer: clip -> adamw(schedule, decay mask) for trainable, zero for frozen."""
    schedule = optax.linear_schedule(0.0, 1e-3, transition_steps=10)
    trainable = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    )
    return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, LABELS)


@jax.jit
def _train_step(params, opt_state, scale):
    grads = jax.tree.map(lambda p: jnp.cos(p * scale), params)
    updates, opt_state = make_optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_state(seed: int = 0, typed_key: bool = True, steps: int = 2) -> TrainState:
    """A state after `steps` real optimizer updates: every array leaf holds non-trivial values."""
    rs = np.random.RandomState(seed)
    params = {
        "image_encoder": {"patch_embed": {"kernel": rs.randn(4, 3, 3, 8), "bias": rs.randn(8)}},
        "mask_decoder": {"iou_head": {"kernel": rs.randn(8, 4), "bias": rs.randn(4)}, "pe_matrix": rs.randn(2, 8)},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    opt_state = jax.jit(make_optimizer().init)(params)
    for i in range(steps):
        params, opt_state = _train_step(params, opt_state, jnp.float32(i + 1))
    rng = jax.random.key(seed) if typed_key else jax.random.PRNGKey(seed)
    return TrainState(jnp.int32(steps), params, opt_state, rng, jnp.int32(steps * 16))


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def leaves_with_paths(state) -> dict:
    """path -> host array (keys as their key_data, tagged with their dtype)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            name, x = f"{name}:{x.dtype}", jax.random.key_data(x)
        out[name] = np.asarray(x)
    return out


def assert_bit_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    got, want = leaves_with_paths(actual), leaves_with_paths(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def step_dirs(workdir) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.mark.parametrize("typed_key", [True, False], ids=["typed_key", "raw_key"])
def test_round_trip_is_bit_identical(tmp_path, typed_key):
    state = make_state(typed_key=typed_key)
    assert isinstance(state.opt_state.inner_states["frozen"], optax.MaskedState)
    data_state = {"next_index": 8, "worker": {"epoch": 1, "order": [3, 1, 2]}}
    meta = {"config": {"model": "vit_tiny", "lr": 1e-3}}
    with TrainStateCheckpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(7, state, data_state, meta=meta)
        restored, restored_data, restored_meta = ckpt.restore(abstract_of(state))
        again, _, _ = ckpt.restore(state)  # concrete arrays as the template work too
    assert isinstance(restored, TrainState)
    assert_bit_identical(restored, state)
    assert_bit_identical(again, state)
    assert restored_data == data_state and restored_meta == meta
    assert restored.rng.dtype == state.rng.dtype
    # The restored key continues the same random stream; the optimizer the same trajectory.
    np.testing.assert_array_equal(jax.random.normal(restored.rng, (4,)), jax.random.normal(state.rng, (4,)))
    resumed = _train_step(restored.params, restored.opt_state, jnp.float32(3))
    uninterrupted = _train_step(state.params, state.opt_state, jnp.float32(3))
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(got, want)


def test_async_save_is_restorable_after_wait_and_on_close(tmp_path):
    states = {step: make_state(seed=step) for step in (1, 2)}
    ckpt = TrainStateCheckpointer(tmp_path, async_save=True)
    assert ckpt.save(1, states[1], {"next_index": 1})
    ckpt.wait_until_finished()
    assert step_dirs(tmp_path) == [1]
    restored, data_state, meta = ckpt.restore(abstract_of(states[1]))
    assert_bit_identical(restored, states[1])
    assert data_state == {"next_index": 1} and meta is None
    with ckpt:  # leaving the context waits for the pending save
        assert ckpt.save(3, states[1], {"next_index": 3})
        restored, _, _ = ckpt.restore(abstract_of(states[1]))  # right after an async save
        assert_bit_identical(restored, states[1])
        assert ckpt.save(4, states[2], {"next_index": 4})
    restored, data_state, _ = TrainStateCheckpointer(tmp_path).restore(abstract_of(states[2]))
    assert_bit_identical(restored, states[2])
    assert data_state == {"next_index": 4}


def test_keeps_only_the_last_n(tmp_path):
    state = make_state(steps=0)
    with TrainStateCheckpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state, {"next_index": step})
    assert step_dirs(tmp_path) == [4, 5]
    assert TrainStateCheckpointer(tmp_path).all_steps() == [4, 5]


def test_save_interval_and_force(tmp_path):
    state = make_state(steps=0)
    with TrainStateCheckpointer(tmp_path, save_interval_steps=5, async_save=False) as ckpt:
        saved = [step for step in range(1, 12) if ckpt.save(step, state, {})]
        assert ckpt.save(13, state, {}, force=True)
    assert saved == [1, 5, 10]  # the first save always happens, then every 5th step
    assert step_dirs(tmp_path) == [5, 10, 13]  # max_to_keep=3


@pytest.mark.parametrize(
    "where, expected_path",
    [
        ("params", "params/mask_decoder/iou_head/kernel"),
        ("opt_state", "opt_state/inner_states/trainable/inner_state/1/0/nu/image_encoder/patch_embed/bias"),
    ],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_is_never_written(tmp_path, caplog, where, expected_path, bad):
    state = make_state()
    if where == "params":
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x.at[1, 2].set(bad) if "iou_head" in str(p) and "kernel" in str(p) else x, state.params
        )
        state = state.replace(params=params)
    else:
        inner = state.opt_state.inner_states["trainable"].inner_state
        adam = inner[1][0]
        adam = adam._replace(nu=jax.tree_util.tree_map_with_path(
            lambda p, x: x.at[0].set(bad) if "patch_embed" in str(p) and "bias" in str(p) else x, adam.nu))
        inner = (inner[0], (adam,) + tuple(inner[1][1:]))
        opt_state = state.opt_state._replace(inner_states={
            **state.opt_state.inner_states,
            "trainable": state.opt_state.inner_states["trainable"]._replace(inner_state=inner),
        })
        state = state.replace(opt_state=opt_state)
    with caplog.at_level(logging.WARNING, logger="sam_jax.training.state_checkpoints"):
        with TrainStateCheckpointer(tmp_path) as ckpt:
            assert not ckpt.save(3, state, {"next_index": 3})
            assert not ckpt.save(4, state, {"next_index": 4}, force=True)
            assert ckpt.latest_step() is None
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2 and all(f"{expected_path} is not finite" in m for m in messages), messages


def test_resume_picks_the_latest_step(tmp_path):
    states = {step: make_state(seed=step, steps=step) for step in (10, 20, 30)}
    with TrainStateCheckpointer(tmp_path) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state, {"next_index": step * 4}, meta={"step": step})
    abstract = abstract_of(states[10])
    resumed = TrainStateCheckpointer(tmp_path)  # a new run in the same work directory
    assert resumed.latest_step() == 30
    state, data_state, meta = resumed.restore(abstract)
    assert_bit_identical(state, states[30])
    assert (data_state, meta) == ({"next_index": 120}, {"step": 30})
    state, data_state, _ = resumed.restore(abstract, step=20)
    assert_bit_identical(state, states[20])
    assert data_state == {"next_index": 80}
    resumed.close()


def test_restore_onto_a_given_sharding(tmp_path):
    state = make_state()
    device = jax.devices()[0]
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), state
    )
    with TrainStateCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait_until_finished()
        restored, _, _ = ckpt.restore(target)
        # Without shardings (plain eval_shape output) a single-device run restores onto its device.
        unsharded, _, _ = ckpt.restore(jax.eval_shape(lambda: state))
    for tree in (restored, unsharded):
        assert_bit_identical(tree, state)
        for leaf in jax.tree.leaves(tree):
            assert isinstance(leaf, jax.Array) and leaf.sharding == jax.sharding.SingleDeviceSharding(device)


@pytest.mark.parametrize("num_processes, devices_per_process", [(1, 8), (2, 4)], ids=["1x8", "2x4"])
def test_sharded_state_restores_onto_another_mesh(tmp_path, num_processes, devices_per_process):
    for out in run_workers(WORKER, tmp_path, num_processes, devices_per_process):
        assert out["nan_refused"], "a NaN in one shard must stop the save"
        assert out["no_sharding_refused"], "restoring onto leaves without shardings must be refused"
        assert list(out["steps"]) == [5]
        assert out["shardings_match"] and out["rng_typed"]
        assert int(out["next_index"]) == 40
        restored = sorted(k for k in out if k.startswith("restored:"))
        assert len(restored) == 9
        for key in restored:
            saved = out[key.replace("restored:", "saved:")]
            assert out[key].dtype == saved.dtype and out[key].tobytes() == saved.tobytes(), key


def test_mismatching_structure_is_a_clear_error(tmp_path):
    state = make_state()
    with TrainStateCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, state, {})
        abstract = abstract_of(state)
        kernel = abstract.params["mask_decoder"]["iou_head"]["kernel"]
        grown = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct((8, 5), x.dtype, sharding=x.sharding)
            if jax.tree_util.keystr(p).endswith("['iou_head']['kernel']") else x,
            abstract,
        )
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(grown)
        message = str(err.value)
        assert str(tmp_path) in message and "step 3" in message
        assert "params/mask_decoder/iou_head/kernel is (8, 4) float32 in the checkpoint, (8, 5) float32" in message

        extra = abstract.replace(params={**abstract.params, "new_head": {"kernel": kernel}})
        with pytest.raises(ValueError, match="not in the checkpoint: params/new_head/kernel"):
            ckpt.restore(extra)
        params = {"image_encoder": abstract.params["image_encoder"]}
        unexpected = "in the checkpoint but not in the state: params/mask_decoder/iou_head/bias"
        with pytest.raises(ValueError, match=unexpected):
            ckpt.restore(abstract.replace(params=params))
        as_f16 = abstract.replace(num_examples=jax.ShapeDtypeStruct((), jnp.float16))
        with pytest.raises(ValueError, match=r"num_examples is \(\) int32 in the checkpoint, \(\) float16"):
            ckpt.restore(as_f16)

        missing = f"no checkpoint of step 4 in {tmp_path}/checkpoints; it has steps [3]"
        with pytest.raises(FileNotFoundError, match=re.escape(missing)):
            ckpt.restore(abstract, step=4)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint to restore in {tmp_path}/empty/checkpoints")):
        TrainStateCheckpointer(tmp_path / "empty").restore(abstract)


def _truncate_largest_state_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:10])


CORRUPTIONS = {
    # name: (damage to the newest checkpoint's folder, what the logged line must name)
    "truncated data file": (_truncate_largest_state_file, "is not valid for value of size 10"),
    "deleted _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), "_METADATA"),
    "invalid JSON in data/metadata": (lambda d: (d / "data" / "metadata").write_text('{"next_index": '),
                                      "data/metadata: not a readable JSON file"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, corruption):
    damage, named = CORRUPTIONS[corruption]
    states = {step: make_state(seed=step, steps=step) for step in (2, 3)}
    with TrainStateCheckpointer(tmp_path, async_save=False) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"next_index": step})
    damage(tmp_path / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING, logger="sam_jax.training.state_checkpoints"):
        with TrainStateCheckpointer(tmp_path) as ckpt:
            restored, data_state, _ = ckpt.restore(abstract_of(states[2]))
            assert_bit_identical(restored, states[2])
            assert data_state == {"next_index": 2}
            assert ckpt.save(3, states[3], {"next_index": 3}, force=True)  # the run goes on past it
    (line,) = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert f"checkpoint of step 3 in {tmp_path}/checkpoints cannot be read" in line and named in line
    assert f"moved it to {tmp_path}/checkpoints/3.unreadable and restoring step 2 instead" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3", "3.unreadable"]  # none deleted
    assert_bit_identical(TrainStateCheckpointer(tmp_path).restore(abstract_of(states[3]))[0], states[3])


def test_no_readable_checkpoint_or_an_unreadable_chosen_one_is_one_line(tmp_path):
    state = make_state()
    with TrainStateCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state, {"next_index": 2})
        ckpt.save(3, state, {"next_index": 3})
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("[")
    with pytest.raises(CheckpointError, match=r"checkpoint of step 2 in .* cannot be read \(.*meta/metadata: not a "
                                              r"readable JSON file"):
        TrainStateCheckpointer(tmp_path).restore(abstract_of(state), step=2)  # chosen: no fallback
    (tmp_path / "checkpoints" / "3" / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointError) as err:
        TrainStateCheckpointer(tmp_path).restore(abstract_of(state))
    message = str(err.value)
    assert "\n" not in message and "checkpoint of step 2" in message
    assert message.endswith("and no earlier checkpoint can be read")


def test_a_changed_state_is_refused_not_skipped(tmp_path):
    """A checkpoint that reads but does not fit the state is a changed model, not damage: no fallback."""
    state = make_state()
    with TrainStateCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state, {})
        ckpt.save(3, state, {})
    grown = abstract_of(state).replace(num_examples=jax.ShapeDtypeStruct((2,), jnp.int32))
    with pytest.raises(CheckpointError, match="checkpoint of step 3 .* does not match the state"):
        TrainStateCheckpointer(tmp_path).restore(grown)
    assert step_dirs(tmp_path) == [2, 3]
