"""One text-prompt train step (CLIP crop embeddings as first prompts) three ways, saving its
metrics and the text head: one device (jit), `pmap` over all local devices, and `jit` over a
Mesh with the FSDP-sharded state (CLIP's frozen params sharded too). For the one-device step
also the head before it, whether it skipped, and whether CLIP's frozen params came back unchanged.

  python tests/text_step_worker.py OUT.npz   (XLA_FLAGS=--xla_force_host_platform_device_count=K)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np

import device_workers

METRICS = ("total_loss", "grad_norm", "loss", "miou", "skipped")


def main() -> None:
    args = device_workers.init_worker()
    from flax import jax_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from test_text_prompt_training import TINY_CLIP, text_setup_values
    from test_train_step import make_batch
    from sam_jax.clip import CLIP
    from sam_jax.training.interactive import InteractiveConfig
    from sam_jax.training.text_prompts import TextPromptConfig
    from sam_jax.training.train_step import (create_train_state, make_train_step, pmap_train_step,
                                             replicate_for_pmap, sharded_train_step)

    model, opt_config, params, frozen = text_setup_values()
    interactive = InteractiveConfig(num_correction_points=1, num_mask_only=0, text=TextPromptConfig(probability=0.5))
    clip = CLIP(TINY_CLIP)
    state = jax.device_get(create_train_state(params, opt_config, model.config, seed=0, frozen=frozen))
    devices = jax.device_count()
    batch = make_batch(0, b=devices)
    results = {"device_count": devices}

    def save(name, new_state, metrics):
        for key in METRICS:
            results[f"{name}/{key}"] = np.asarray(jax.device_get(metrics[key]))
        results[f"{name}/head"] = np.asarray(jax.device_get(new_state.params["prompt_encoder"]["text_projection"]["kernel"]))

    one, metrics = jax.jit(make_train_step(model, opt_config, interactive, clip=clip))(state, batch)
    save("one", one, metrics)
    results["one/head_before"] = np.asarray(state.params["prompt_encoder"]["text_projection"]["kernel"])
    results["one/frozen_unchanged"] = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(one.frozen)), jax.tree.leaves(frozen)))

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    step, shardings = sharded_train_step(make_train_step(model, opt_config, interactive, fsdp_mesh=mesh, clip=clip),
                                         jax.eval_shape(lambda: state), mesh)
    sharded = jax.device_put(state, shardings)
    results["frozen_sharded_leaves"] = sum(1 for x in jax.tree.leaves(sharded.frozen) if not x.sharding.is_fully_replicated)
    global_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    new, metrics = step(sharded, global_batch)
    save("mesh", new, metrics)

    pstep = pmap_train_step(make_train_step(model, opt_config, interactive, axis_name="devices", clip=clip))
    split = jax.tree.map(lambda x: x.reshape((devices, -1) + x.shape[1:]), batch)
    new, metrics = pstep(replicate_for_pmap(state), split)
    save("pmap", jax_utils.unreplicate(new), jax.tree.map(lambda x: x[0], metrics))
    np.savez(args.out, **results)


if __name__ == "__main__":
    main()
