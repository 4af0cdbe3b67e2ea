"""How a training run spreads over devices, and what it gathers back to the host.

Both strategies run the one step function of `train_step.py`:

- `FsdpParallel` (`parallelism="fsdp"`): `jax.jit` over a 1-D Mesh of every
  device of every process; the batch is sharded on its leading axis, params
  and optimizer state FSDP-style (`fsdp_sharding`).
- `PmapParallel` (`parallelism="pmap"`): `jax.pmap` over this process's
  devices; the state is replicated on each, the batch split into
  (devices, per-device batch), losses and gradients summed over devices.

Checkpoints hold the train state without a replica axis either way (the
FSDP state as global arrays, the pmap state as one replica's host copy).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from sam_jax.clip import CLIP
from sam_jax.modeling import Sam
from sam_jax.training.interactive import InteractiveConfig
from sam_jax.training.optimizer import OptimizerConfig
from sam_jax.training.train_step import (
    TrainState,
    fsdp_sharding,
    make_train_step,
    pmap_train_step,
    replicate_for_pmap,
    sharded_train_step,
)


class FsdpParallel:
    """One jit over every device of every process, the state FSDP-sharded."""

    axis = "data"

    def __init__(self, state_shapes: TrainState):
        self.mesh = Mesh(np.asarray(jax.devices()), (self.axis,))
        self.state_shapes = state_shapes
        self.shardings = jax.tree.map(fsdp_sharding(self.mesh, self.axis), state_shapes)

    def place(self, state: TrainState) -> TrainState:
        """A host (or single-device) state -> the state the step takes."""
        return jax.device_put(state, self.shardings)

    def train_step(self, model: Sam, optimizer_config: OptimizerConfig, interactive: InteractiveConfig,
                   clip: Optional[CLIP] = None):
        step = make_train_step(model, optimizer_config, interactive, fsdp_mesh=self.mesh, clip=clip)
        return sharded_train_step(step, self.state_shapes, self.mesh, self.axis)[0]

    def batch(self, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        """The input pipeline's global batch (sharded on its leading axis) as the step takes it."""
        return batch

    def metrics(self, metrics: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        return metrics

    def abstract_state(self) -> TrainState:
        """The checkpointed state's shapes and shardings, to restore into."""
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            self.state_shapes, self.shardings)

    def checkpointed(self, state: TrainState) -> TrainState:
        """The state as checkpoints hold it."""
        return state

    def host_params(self, state: TrainState):
        """Params as numpy on every host (FSDP shards of other hosts gathered)."""
        if jax.process_count() == 1:
            return jax.device_get(state.params)
        return multihost_utils.process_allgather(state.params, tiled=True)


class PmapParallel:
    """`jax.pmap` over this process's devices, the state replicated on each."""

    axis = "devices"

    def __init__(self, state_shapes: TrainState):
        self.devices = jax.local_devices()
        self.state_shapes = state_shapes

    def place(self, state: TrainState) -> TrainState:
        return replicate_for_pmap(jax.device_get(state), self.devices, self.axis)

    def train_step(self, model: Sam, optimizer_config: OptimizerConfig, interactive: InteractiveConfig,
                   clip: Optional[CLIP] = None):
        return pmap_train_step(make_train_step(model, optimizer_config, interactive, axis_name=self.axis, clip=clip),
                               self.axis)

    def batch(self, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        """(B, ...) global arrays sharded on B -> (this process's devices, B / devices, ...),
        each device keeping the rows it already holds (no copy between devices)."""

        def split(x: jax.Array) -> jax.Array:
            shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
            mesh = Mesh(np.asarray([s.device for s in shards]), (self.axis,))
            shape = (len(shards),) + shards[0].data.shape
            return jax.make_array_from_single_device_arrays(
                shape, NamedSharding(mesh, PartitionSpec(self.axis)), [s.data[None] for s in shards])

        return jax.tree.map(split, batch)

    def metrics(self, metrics: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        """Every device holds the same (psum'd) metrics: one replica's."""
        return jax.tree.map(lambda x: x[0], metrics)

    def abstract_state(self) -> TrainState:
        device = SingleDeviceSharding(self.devices[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), self.state_shapes)

    def checkpointed(self, state: TrainState) -> TrainState:
        return jax.device_get(jax_utils.unreplicate(state))

    def host_params(self, state: TrainState):
        return jax.device_get(jax_utils.unreplicate(state.params))


PARALLEL = {"fsdp": FsdpParallel, "pmap": PmapParallel}


def gather_data_states(state: Dict[str, Any]) -> List[Any]:
    """Every process's input-iterator state (JSON), in process order (all processes call it)."""
    if jax.process_count() == 1:
        return [state]
    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: encoded.size] = encoded
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(rows, np.ravel(lengths))]
