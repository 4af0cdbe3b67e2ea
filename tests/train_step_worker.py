"""Runs a few train steps of vit_tiny three ways and saves the params: one device (jit), `pmap`
over all local devices, and `jit` over a Mesh with FSDP-sharded state.

  python tests/train_step_worker.py OUT.npz [--process-id I --num-processes P --port N]

XLA_FLAGS=--xla_force_host_platform_device_count=K must be set by the caller. With
several processes only the Mesh run is made (each process feeding its images).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np

import device_workers

STEPS = 2


def main() -> None:
    args = device_workers.init_worker()
    from flax import jax_utils
    from flax.traverse_util import flatten_dict
    from jax.sharding import Mesh

    from test_train_step import GLOBAL_BATCH, METRICS, make_batch, setup
    from sam_jax.training.train_step import make_train_step, pmap_train_step, replicate_for_pmap, sharded_train_step

    model, opt_config, interactive, state = setup()
    state = jax.device_get(state)  # host copies: the steps donate their device buffers
    batches = [make_batch(seed) for seed in range(STEPS)]
    results = {}

    def save(name, params):
        for key, value in flatten_dict(jax.device_get(params), sep="/").items():
            results[f"{name}/{key}"] = np.asarray(value)

    def save_metrics(name, step, metrics, replica=False):
        for key in METRICS:
            value = jax.experimental.multihost_utils.process_allgather(metrics[key], tiled=True)
            results[f"{name}_metrics/{step}/{key}"] = np.asarray(value)[0] if replica else np.asarray(value)

    # Mesh over every device of every process; each process passes its slice of the global batch.
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    step, shardings = sharded_train_step(make_train_step(model, opt_config, interactive, fsdp_mesh=mesh), jax.eval_shape(lambda: state), mesh)
    sharded = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x)[index]), state, shardings
    )
    per_process = GLOBAL_BATCH // jax.process_count()
    mine = slice(args.process_id * per_process, (args.process_id + 1) * per_process)
    for i, batch in enumerate(batches):
        local = {k: v[mine] for k, v in batch.items()}
        global_batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), x, (GLOBAL_BATCH,) + x.shape[1:]),
            local,
        )
        sharded, metrics = step(sharded, global_batch)
        save_metrics("mesh", i, metrics)
    sharded_params = jax.tree.map(lambda x: jax.experimental.multihost_utils.process_allgather(x, tiled=True), sharded.params)
    save("mesh", sharded_params)
    results["mesh_sharded_leaves"] = sum(
        1 for x in jax.tree.leaves(sharded.params) if not x.sharding.is_fully_replicated
    )

    if jax.process_count() == 1:
        devices = jax.local_device_count()
        pstep = pmap_train_step(make_train_step(model, opt_config, interactive, axis_name="devices"))
        replicated = replicate_for_pmap(state)
        for i, batch in enumerate(batches):
            split = jax.tree.map(lambda x: x.reshape((devices, -1) + x.shape[1:]), batch)
            replicated, metrics = pstep(replicated, split)
            save_metrics("pmap", i, metrics, replica=True)  # every device holds the psum'd metrics
        save("pmap", jax_utils.unreplicate(replicated).params)
    results["device_count"] = jax.device_count()
    np.savez(args.out, **results)


if __name__ == "__main__":
    import jax.experimental.multihost_utils  # noqa: F401

    main()
