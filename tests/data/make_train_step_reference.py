"""Writes train_step_reference.npz: the losses and gradients of one full-loop training step, as the code
computed them before the step was made faster (issue 21), for `tests/test_train_step_reference.py`.

    git worktree add /tmp/before f8f8de3 && cd /tmp/before && python /path/to/this/script.py OUT.npz

The step is the `synthetic_smoke` config's (the tiny model, 2 images x 3 masks, 4 interactive
iterations) on `experiments.benchmark_train_step.train_batch`'s batch, from the config's initial
params. Stored: the loss the step differentiates, its per-iteration metrics (losses and mIoU) and its
gradient with respect to every param.
"""

import os
import sys

sys.path.insert(0, os.getcwd())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmark_train_step import train_batch  # noqa: E402
from experiments.train_configs import get_config  # noqa: E402
from sam_jax.modeling import Sam, preprocess_padded  # noqa: E402
from sam_jax.training.interactive import interactive_loss, make_decode  # noqa: E402
from sam_jax.training.loop import build_model, initial_params  # noqa: E402
from sam_jax.training.train_step import create_train_state  # noqa: E402

CONFIG = "synthetic_smoke"
BATCH_SEED = 0


def reference_inputs():
    """(config, model, params, state, batch) of the reference step."""
    config = get_config(CONFIG)
    model = build_model(config)
    params = initial_params(config, model)
    state = create_train_state(params, config.optimizer, config.model, config.seed)
    batch = jax.tree.map(jnp.asarray, train_batch(config, config.data.global_batch_size, BATCH_SEED))
    return config, model, params, state, batch


def loss_and_grads(config, model, params, state, batch):
    """The full-loop step's loss, metrics and gradients (its key derivation, no drop path)."""
    interactive = config.interactive_at(config.total_steps)
    step_key = jax.random.fold_in(state.rng, state.step)
    image_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch["image"].shape[0]))

    def loss_fn(params):
        images = preprocess_padded(batch["image"], batch["image_size"], model.config)
        embeddings = model.apply({"params": params}, images, method=Sam.encode_image)
        return interactive_loss(make_decode(model, params), embeddings, batch, image_keys, interactive,
                                model.config.image_size, jnp.sum(batch["mask_valid"]))

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def flat(prefix, tree):
    return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main() -> None:
    config, model, params, state, batch = reference_inputs()
    if config.drop_path_rate:
        raise SystemExit("the reference step assumes no drop path")
    (loss, metrics), grads = loss_and_grads(config, model, params, state, batch)
    out = {"loss": np.asarray(loss), **flat("metrics", metrics), **flat("grads", grads)}
    np.savez_compressed(sys.argv[1], **out)
    print(f"wrote {sys.argv[1]}: loss {float(loss):.6f}, "
          f"{len(out)} arrays")


if __name__ == "__main__":
    main()
