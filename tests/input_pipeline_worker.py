"""Runs `InputPipeline` over the in-memory test records in a fresh process and saves what it holds.

Used by test_input_pipeline.py on 8 fake CPU devices, or as one of two
`jax.distributed` processes on localhost:

  python tests/input_pipeline_worker.py OUT.npz [--process-id I --num-processes P --port N]

XLA_FLAGS=--xla_force_host_platform_device_count=K must be set by the caller.
Saves, per step and field, this process's rows of the global batch (its
addressable shards in global row order) and the global rows they are.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np

import device_workers

STEPS = 3


def main() -> None:
    args = device_workers.init_worker()
    from test_input_pipeline import SOURCE_SIZE, config
    from data_records import make_source

    from sam_jax.data.pipeline import InputPipeline

    pipeline = InputPipeline(make_source(SOURCE_SIZE), config(global_batch_size=jax.device_count()))
    arrays = {"device_count": jax.device_count(), "process_count": jax.process_count()}
    for step in range(STEPS):
        batch = next(pipeline)
        for key, value in batch.items():
            shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
            arrays[f"{step}/{key}"] = np.concatenate([np.asarray(s.data) for s in shards])
            arrays[f"{step}/{key}/rows"] = np.concatenate([np.arange(s.index[0].start, s.index[0].stop) for s in shards])
            assert value.shape[0] == jax.device_count() and len(shards) == jax.local_device_count()
    pipeline.close()
    np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
