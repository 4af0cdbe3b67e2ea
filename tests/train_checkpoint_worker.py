"""Saves a NamedSharding-sharded train state on one mesh and restores it onto another.

Run by tests/test_train_checkpointing.py through `device_workers.run_workers` on 8
fake CPU devices, as one process or several `jax.distributed` processes; the
work directory is OUT's folder's `work`. Saves to OUT (.npz): every restored leaf
gathered to the host, the checkpoint's leaves as saved, and
`shardings_match` / `nan_refused` / `no_sharding_refused` flags.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from device_workers import init_worker  # noqa: E402

args = init_worker()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sam_jax.training.state_checkpoints import TrainStateCheckpointer  # noqa: E402

assert jax.device_count() == 8, jax.devices()
workdir = os.path.join(os.path.dirname(args.out), "work")

save_mesh = Mesh(np.array(jax.devices()).reshape(8), ("x",))
restore_mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))


def put(value, mesh, spec):
    """A global array from the same host value on every process."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


rs = np.random.RandomState(0)
params_host = {"w": rs.randn(16, 6).astype(np.float32), "b": rs.randn(6).astype(np.float32)}
keys_host = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(3), 8)))
tx = optax.adamw(1e-3)


def build(mesh, specs):
    params = {k: put(v, mesh, specs[k]) for k, v in params_host.items()}
    opt_state = jax.jit(tx.init)(params)  # mu/nu follow the params' shardings
    grads = jax.tree.map(lambda p: jnp.sin(p) + 1.0, params)
    _, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    rng = jax.random.wrap_key_data(put(keys_host, mesh, P(specs["rng"][0], None)))
    return {"step": put(np.int32(5), mesh, P()), "params": params, "opt_state": opt_state, "rng": rng}


saved = build(save_mesh, {"w": P("x", None), "b": P(), "rng": P("x")})
poisoned = dict(saved, params=dict(saved["params"], w=saved["params"]["w"].at[15, 5].set(jnp.nan)))

with TrainStateCheckpointer(workdir, max_to_keep=2) as ckpt:
    nan_refused = not ckpt.save(4, poisoned, {"next_index": 0})  # the NaN lies in the last shard only
    assert ckpt.save(5, saved, {"next_index": 40})

# A fresh run on another mesh: the abstract state carries the shardings to restore onto.
wanted = {"w": P("b", "a"), "b": P("a"), "rng": P("b")}
template = build(restore_mesh, wanted)
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
with TrainStateCheckpointer(workdir) as ckpt:
    steps = ckpt.all_steps()
    restored, data_state, _ = ckpt.restore(abstract)
    try:  # on several devices, a leaf without a sharding is an error, not orbax's guess
        ckpt.restore(jax.eval_shape(lambda: template))
        no_sharding_refused = False
    except ValueError as err:
        no_sharding_refused = "opt_state/0/count of the state to restore into has no sharding" in str(err)

shardings_match = all(
    r.sharding.is_equivalent_to(a.sharding, len(a.shape)) and r.dtype == a.dtype
    for r, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract))
)


def to_host(tree):
    tree = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): np.asarray(
            multihost_utils.process_allgather(x, tiled=True)
        )
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


out = {f"restored:{k}": v for k, v in to_host(restored).items()}
out.update({f"saved:{k}": v for k, v in to_host(saved).items()})
out.update(
    shardings_match=np.bool_(shardings_match),
    nan_refused=np.bool_(nan_refused),
    no_sharding_refused=np.bool_(no_sharding_refused),
    steps=np.asarray(steps),
    next_index=np.int64(data_state["next_index"]),
    rng_typed=np.bool_(jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)),
)
np.savez(args.out, **out)
