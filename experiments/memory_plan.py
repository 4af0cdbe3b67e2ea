"""Train-step memory per device for a pod, from XLA's buffer assignment, compiled on this CPU.

    python -m experiments.memory_plan --config vit_h --devices 8 64 256

Compiles (ahead of time, nothing runs) the FSDP train step of a paper config
(`experiments/train_configs.py`: bf16 compute, scanned and rematerialised
encoder blocks, 64 masks per image, the full 11-iteration interactive loop) on
a Mesh of N fake CPU devices (`--xla_force_host_platform_device_count`) at
the paper's per-device batch (SAM-H: 256 images on 256 GPUs, 1 each), and
reads `compiled.memory_analysis()` of the partitioned per-device program:
arguments (the FSDP shard of params and AdamW state, and the batch shard),
outputs, temporaries (activations, gradients, the update), and their peak sum
(outputs alias the donated state). Writes JSON (default
workdir/benchmarks/memory_plan_<config>_<attention>[_chunks<N>].json) with
which devices it fits. `--set interactive.mask_chunks=8` plans the decoder
run over each image's masks in 8 rematerialised chunks.

A CPU compile's buffer assignment stands in for the accelerator's: same
program, same partitioning, but another backend's fusion and scheduling, so
read the figures as an estimate of the GPU/TPU peak. `--attention flash`
plans the Pallas kernels' memory (compiled here in interpret mode), "xla"
that of the XLA attention path.
"""

from __future__ import annotations

import argparse
import os
import sys

_MAX_DEVICES = 256
if "jax" not in sys.modules:  # fake devices must be asked for before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_MAX_DEVICES}").strip()

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from experiments.train_configs import get_config  # noqa: E402
from sam_jax.host import cpu_model  # noqa: E402
from sam_jax.training.config import TrainConfig  # noqa: E402
from sam_jax.training.loop import build_model  # noqa: E402
from sam_jax.training.train_step import create_train_state, make_train_step, sharded_train_step  # noqa: E402
from sam_jax.weights import abstract_params  # noqa: E402

DEVICE_MEMORY_GB = {"80 GB (A100/H100)": 80.0, "16 GB (TPU v4 / v5e)": 16.0}  # HBM per device, decimal GB


def abstract_batch(config: TrainConfig, batch_size: int) -> dict:
    """The step's batch as the input pipeline hands it over (masks unpacked on device)."""
    p, m = config.data.preprocess, config.data.preprocess.max_masks
    spec = lambda shape, dtype: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
    batch = {
        "image": spec((p.image_size, p.image_size, 3), jnp.uint8),
        "image_size": spec((2,), jnp.int32),
        "masks_low_res": spec((m, p.low_res_size, p.low_res_size), jnp.bool_),
        "boxes": spec((m, 4), jnp.float32),
        "points": spec((m, 2), jnp.float32),
        "point_valid": spec((m,), jnp.bool_),
        "mask_valid": spec((m,), jnp.bool_),
        "image_id": spec((), jnp.int32),
    }
    if p.input_res_masks:
        batch["masks"] = spec((m, p.image_size, p.image_size), jnp.bool_)
    return batch


def plan(config: TrainConfig, num_devices: int, per_device_batch: int) -> dict:
    """memory_analysis() of the FSDP step on `num_devices` fake devices, in bytes, with compile time."""
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    model = build_model(config)
    params = abstract_params(config.model, scan_blocks=config.scan_blocks)
    state = jax.eval_shape(lambda p: create_train_state(p, config.optimizer, config.model, config.seed), params)
    step = make_train_step(model, config.optimizer, config.interactive, fsdp_mesh=mesh)
    jitted, shardings = sharded_train_step(step, state, mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding),
                         abstract_batch(config, num_devices * per_device_batch))
    start = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    entry = {name: int(getattr(memory, name)) for name in fields}
    # Outputs alias the donated state; the peak holds arguments, temporaries and unaliased outputs.
    entry["peak_bytes"] = (entry["argument_size_in_bytes"] + entry["temp_size_in_bytes"]
                           + entry["output_size_in_bytes"] - entry["alias_size_in_bytes"])
    state_bytes = sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(state))
    entry.update(devices=num_devices, global_batch=num_devices * per_device_batch, compile_s=round(seconds, 1),
                 state_bytes_total=int(state_bytes))
    entry["peak_gb"] = round(entry["peak_bytes"] / 1e9, 2)
    entry["fits"] = {name: entry["peak_bytes"] / 1e9 <= gb for name, gb in DEVICE_MEMORY_GB.items()}
    return entry


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="vit_h", help="a paper config of experiments/train_configs.py")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--per-device-batch", type=int, default=1, help="images per device (paper: 256 / 256)")
    parser.add_argument("--attention", default="xla", choices=("xla", "flash"))
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="config overrides, as experiments.train's --set")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if max(args.devices) > jax.device_count():
        parser.error(f"--devices up to {jax.device_count()} here (fake CPU devices: import this module first)")
    config = get_config(args.config, tuple(args.set) + (f"attention_impl={args.attention}",))
    interactive = config.interactive
    result = {
        "config": args.config, "model": config.model.name, "dtype": config.dtype, "scan_blocks": config.scan_blocks,
        "remat_policy": config.remat_policy, "max_masks": config.data.preprocess.max_masks,
        "mask_chunks": interactive.mask_chunks, "image_size": config.model.image_size,
        "interactive_iterations": interactive.num_iterations, "attention": args.attention,
        "per_device_batch": args.per_device_batch, "compiled_on": f"{cpu_model()} (XLA CPU, fake devices)",
        "jax": jax.__version__, "plans": [],
    }
    for n in args.devices:
        entry = plan(config, n, args.per_device_batch)
        print(f"{n:4d} devices: peak {entry['peak_gb']:.2f} GB/device (args {entry['argument_size_in_bytes'] / 1e9:.2f},"
              f" temp {entry['temp_size_in_bytes'] / 1e9:.2f}), compiled in {entry['compile_s']:.0f} s", flush=True)
        result["plans"].append(entry)
    chunks = config.interactive.mask_chunks
    name = f"memory_plan_{args.config}_{args.attention}" + (f"_chunks{chunks}" if chunks > 1 else "")
    output = args.output or Path("workdir/benchmarks") / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
