"""One pure train step, and the two ways it runs on many devices.

    step(state, batch) -> (state, metrics)

encodes each image once (with the model's drop path unless the encoder is
frozen), runs the interactive loop (`interactive.py`) on its masks, and
applies one optimizer update. Prompt randomness is per image: image i of the
global batch draws from fold_in(fold_in(state.rng, step), i), so with drop
path off the result does not depend on how the batch is split over devices.

- `pmap_train_step`: `jax.pmap` data parallelism; each device holds a
  replica and a slice of the batch; the loss is divided by the valid-mask
  count over all devices and gradients are summed (`psum`), which equals the
  single-device step on the global batch.
- `sharded_train_step`: `jax.jit` over a Mesh; the batch is sharded on its
  leading axis and every param / optimizer-state tensor FSDP-style on its
  largest axis divisible by the device count (`fsdp_sharding`), so vit_h's
  state is spread over the pod instead of replicated. The step gathers the
  params for the forward pass (`make_train_step(..., fsdp_mesh=mesh)`) and
  reduce-scatters their gradients: left to itself, XLA's partitioner keeps
  the weights split and gathers the activations instead (every device
  computing the whole batch on a slice of the features; vit_h on 8 devices
  planned 38 GB per device that way, `experiments/memory_plan.py`).

A non-finite loss or gradient leaves params and optimizer state as they were
and counts the skip (`nonfinite_in_a_row`, `nonfinite_total`); the training
loop stops after too many in a row.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_jax.clip import CLIP
from sam_jax.configs import SamConfig
from sam_jax.modeling import Sam, preprocess_padded
from sam_jax.training.interactive import InteractiveConfig, interactive_loss, make_decode, masks_for_loop
from sam_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from sam_jax.training.text_prompts import crop_embedder


_DROPOUT_STREAM = 2**31 - 1  # image indices fold in below this


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    rng: jax.Array  # (2,) uint32 base key; each step folds in its number
    nonfinite_in_a_row: jax.Array  # () int32
    nonfinite_total: jax.Array  # () int32
    # Params the step uses but does not train: {"clip": CLIP image-tower params} for text-prompt
    # training (`interactive.text`), else None.
    frozen: Any = None


def create_train_state(params, optimizer_config: OptimizerConfig, model_config: SamConfig, seed: int,
                       frozen: Any = None) -> TrainState:
    """Step 0: `params`, the optimizer state of `make_optimizer(optimizer_config, ...)`, the base key,
    and the `frozen` params (see TrainState)."""
    zero = lambda: jnp.zeros((), jnp.int32)
    optimizer = make_optimizer(optimizer_config, params, model_config)
    state = TrainState(
        step=zero(), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed),
        nonfinite_in_a_row=zero(), nonfinite_total=zero(), frozen=frozen,
    )
    # Every leaf its own buffer (optax may share one zero between counters): the step donates the state.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    model: Sam,
    optimizer_config: OptimizerConfig,
    interactive: InteractiveConfig,
    *,
    axis_name: Optional[str] = None,
    fsdp_mesh: Optional[Mesh] = None,
    clip: Optional[CLIP] = None,
) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """The step as a pure function. `axis_name` names the pmap axis (None under jit);
    `fsdp_mesh` the mesh whose devices hold FSDP shards of the state (`sharded_train_step`):
    the forward pass then runs on params gathered over it, and activations stay split by image.

    The optimizer is `make_optimizer(optimizer_config, ...)` (the one `create_train_state`
    initialised); an encoder it does not train (`optimizer_config.encoder_frozen`) also runs
    without drop path and without gradients.
    batch: the input pipeline's (image, image_size, masks_low_res, [masks], boxes,
    mask_valid; see `sam_jax.data.preprocess`), B images on this call.
    metrics: per-iteration "loss", "focal", "dice", "iou_loss", "miou"
    (num_iterations,), "total_loss", "grad_norm", "learning_rate", "skipped".
    `interactive.text.probability` > 0 (text-prompt training) needs a model with a text head,
    `clip` (the CLIP module) and its params in `state.frozen["clip"]`.
    """
    image_size = model.config.image_size
    text_training = interactive.text.probability > 0
    if text_training and (clip is None or not model.config.has_text_prompts):
        raise ValueError("interactive.text.probability > 0 trains text prompts: it needs a model with a text head "
                         f"(model {model.config.name!r} has text_embed_dim={model.config.text_embed_dim}) and a "
                         f"CLIP model (clip={'given' if clip is not None else 'None'})")
    if text_training and clip.config.embed_dim != model.config.text_embed_dim:
        raise ValueError(f"CLIP {clip.config.name!r} embeds to {clip.config.embed_dim} dims, the model's text head "
                         f"takes {model.config.text_embed_dim}")
    encoder_frozen = optimizer_config.encoder_frozen
    learning_rate = learning_rate_schedule(optimizer_config)

    def step(state: TrainState, batch: Dict[str, jax.Array]):
        batch = masks_for_loop(batch, interactive)
        b = batch["image"].shape[0]
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
        step_key = jax.random.fold_in(state.rng, state.step)
        image_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(b))
        num_valid = jnp.sum(batch["mask_valid"])
        if axis_name is not None:
            num_valid = jax.lax.psum(num_valid, axis_name)

        dropout_key = jax.random.fold_in(step_key, _DROPOUT_STREAM)
        if axis_name is not None:  # drop-path masks are drawn per device (the one draw not split per image)
            dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

        text_prompts = None
        if text_training:
            if state.frozen is None or "clip" not in state.frozen:
                raise ValueError('text-prompt training needs the CLIP params in state.frozen["clip"]')
            clip_params = state.frozen["clip"]
            if fsdp_mesh is not None:
                clip_params = jax.lax.with_sharding_constraint(clip_params, NamedSharding(fsdp_mesh, PartitionSpec()))
            text_prompts = crop_embedder(clip, clip_params, batch["image"], batch["masks_low_res"], batch["boxes"],
                                         batch["mask_valid"], interactive.text)

        def loss_fn(params):
            if fsdp_mesh is not None:  # all-gather here; the gradient's transpose is a reduce-scatter
                params = jax.lax.with_sharding_constraint(params, NamedSharding(fsdp_mesh, PartitionSpec()))
            images = preprocess_padded(batch["image"], batch["image_size"], model.config)
            embeddings = model.apply(
                {"params": params}, images, encoder_frozen, method=Sam.encode_image, rngs={"dropout": dropout_key}
            )
            if encoder_frozen:
                embeddings = jax.lax.stop_gradient(embeddings)
            return interactive_loss(
                make_decode(model, params), embeddings, batch, image_keys, interactive, image_size, num_valid,
                text_prompts,
            )

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            # Each device's loss is already divided by the global count: the global loss is the sum.
            loss, grads = jax.lax.psum((loss, grads), axis_name)
            metrics = jax.lax.psum(metrics, axis_name)  # every metric is a share of the global mean

        with jax.named_scope("optimizer"):
            finite = jnp.isfinite(loss) & _all_finite(grads)
            optimizer = make_optimizer(optimizer_config, state.params, model.config)  # built from the tree's paths
            updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            state = state.replace(
                step=state.step + 1,
                params=keep(new_params, state.params),
                opt_state=keep(new_opt_state, state.opt_state),
                nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
                nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
            )
        metrics = dict(metrics, total_loss=loss, grad_norm=optax.tree.norm(grads), skipped=~finite,
                       learning_rate=learning_rate(state.step - 1))
        return state, metrics

    return step


def pmap_train_step(step_fn, axis_name: str = "devices"):
    """`jax.pmap` of a step made with `make_train_step(..., axis_name=axis_name)`.

    Inputs: a state replicated over local devices (`replicate_for_pmap`)
    and a batch with a leading (local devices, per-device batch) split.
    """
    return jax.pmap(step_fn, axis_name=axis_name, donate_argnums=(0,))


def replicate_for_pmap(tree: Any, devices: Optional[list] = None, axis_name: str = "devices") -> Any:
    """Host arrays -> one copy per device (leading axis: devices), placed as `jax.pmap(...,
    axis_name=axis_name)` returns its outputs. `flax.jax_utils.replicate` places them on a mesh
    axis of another name, so a pmapped step fed its own outputs on the second call compiles
    again (a second full compile of the train step)."""
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices), (axis_name,)), PartitionSpec(axis_name))
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), sharding), tree)


def fsdp_sharding(mesh: Mesh, axis: str = "data") -> Callable[[jax.ShapeDtypeStruct], NamedSharding]:
    """Shape -> sharding: the largest dimension divisible by the axis size is split, else replicated."""
    size = mesh.shape[axis]

    def rule(leaf) -> NamedSharding:
        shape = tuple(leaf.shape)
        candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % size == 0 and shape[d] >= size]
        spec = [None] * len(shape)
        if candidates and size > 1:
            spec[int(candidates[0])] = axis
        return NamedSharding(mesh, PartitionSpec(*spec))

    return rule


def sharded_train_step(step_fn, state_shapes: TrainState, mesh: Mesh, axis: str = "data"):
    """`jax.jit` of a step made with `make_train_step(..., fsdp_mesh=mesh)` (no axis_name) over `mesh`.

    Returns (jitted step, state shardings). Place the state with
    `jax.device_put(state, shardings)`; batches sharded on the leading axis
    (what `InputPipeline` yields for a 1-D "data" mesh).
    """
    rule = fsdp_sharding(mesh, axis)
    state_shardings = jax.tree.map(rule, state_shapes)
    batch_sharding = NamedSharding(mesh, PartitionSpec(axis))
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    return jitted, state_shardings
