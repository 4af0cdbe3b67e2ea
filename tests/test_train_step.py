"""The train step: it learns, skips non-finite updates, and pmap / Mesh-sharded jit over 8 devices
and two processes give the one-device result on the same global batch."""

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import device_workers
from sam_jax.configs import get_config
from sam_jax.modeling import Sam
from sam_jax.training.interactive import InteractiveConfig
from sam_jax.training.optimizer import OptimizerConfig
from sam_jax.training.parallel import PmapParallel
from sam_jax.training.train_step import create_train_state, make_train_step

GLOBAL_BATCH = 8
MASKS = 2
WORKER = os.path.join(os.path.dirname(__file__), "train_step_worker.py")
# Devices sum gradients and losses in other orders than one device: fp32 rounding.
RTOL, ATOL = 2e-4, 2e-6
CLIP = 2.0  # global-norm clipping, below the gradient norms of these steps (asserted)
METRICS = ("total_loss", "grad_norm", "loss", "focal", "dice", "iou_loss", "miou")  # compared across devices


def micro_config():
    """vit_tiny made smaller still (2 blocks at 128 px): these tests compile the step several times."""
    tiny = get_config("vit_tiny")
    encoder = dataclasses.replace(tiny.encoder, depth=2, global_attn_indexes=(1,), image_size=128, window_size=4)
    return dataclasses.replace(tiny, name="vit_micro", encoder=encoder, decoder_depth=1)


def setup():
    config = micro_config()
    model = Sam(config)
    n, low = config.image_size, config.low_res_mask_size
    params = model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, n, n, 3)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1)), jnp.zeros((1, 4)),
        jnp.zeros((1, 1, low, low)),
    )["params"]
    # Clipping below the gradient norm: the clipped update depends on the gradient's scale, so a
    # wrongly scaled sum over devices (psum against pmean: 8x) shows in the params, not just the norm.
    opt_config = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=(), layer_decay=0.8, weight_decay=0.1,
                                 grad_clip_norm=CLIP)
    interactive = InteractiveConfig(num_correction_points=1, num_mask_only=1)
    return model, opt_config, interactive, create_train_state(params, opt_config, config, seed=0)


def make_batch(seed: int, b: int = GLOBAL_BATCH, t: int = 128, low: int = 32):
    rng = np.random.default_rng(seed)
    masks = np.zeros((b, MASKS, t, t), bool)
    boxes = np.zeros((b, MASKS, 4), np.float32)
    image = rng.integers(0, 256, (b, t, t, 3), dtype=np.uint8)
    for i in range(b):
        for j in range(MASKS):
            x0, y0 = rng.integers(0, t - 50, 2)
            w, h = rng.integers(15, 50, 2)
            masks[i, j, y0 : y0 + h, x0 : x0 + w] = True
            image[i, y0 : y0 + h, x0 : x0 + w] = 60 + 120 * j
            boxes[i, j] = (x0, y0, x0 + w, y0 + h)
    low_res = masks.reshape(b, MASKS, low, t // low, low, t // low).mean(axis=(3, 5)) >= 0.5
    valid = np.ones((b, MASKS), bool)
    valid[-1, -1] = False  # devices see different valid counts: the global divisor matters
    return {"image": image, "image_size": np.full((b, 2), t, np.int32), "masks_low_res": low_res,
            "boxes": boxes, "mask_valid": valid}


@pytest.fixture(scope="module")
def jitted_step():
    model, opt_config, interactive, _ = setup()
    return jax.jit(make_train_step(model, opt_config, interactive))


@pytest.fixture(scope="module")
def one_device(jitted_step):
    state, step = setup()[3], jitted_step
    losses, metrics, history = [], None, []
    for seed in range(2):
        state, metrics = step(state, make_batch(seed))
        losses.append(float(metrics["total_loss"]))
        history.append({k: np.asarray(metrics[k]) for k in METRICS})
    return state, metrics, losses, history


def test_step_updates_params_and_reports_metrics(one_device):
    state, metrics, losses, history = one_device
    assert int(state.step) == 2 and int(state.nonfinite_total) == 0
    assert all(np.isfinite(losses))
    assert metrics["miou"].shape == (3,) and metrics["loss"].shape == (3,)
    assert float(metrics["grad_norm"]) > 0 and not bool(metrics["skipped"])
    assert all(float(h["grad_norm"]) > CLIP for h in history)  # clipping engaged at every step


def test_the_loss_falls_over_a_few_steps_on_one_batch(jitted_step):
    state, batch, losses = setup()[3], make_batch(0), []
    for _ in range(4):
        state, metrics = jitted_step(state, batch)
        losses.append(float(metrics["total_loss"]))
    assert losses[-1] < 0.9 * losses[0], losses


def test_padded_images_from_scratch_give_moderate_gradients(jitted_step):
    """Zero padding of a freshly initialised model: with a zero pos_embed every padding token
    was one vector, LayerNorm saw zero variance and the gradient norm reached ~1e8."""
    batch = make_batch(0)
    batch["image"][:, 64:] = 0
    batch["image_size"][:] = (64, 128)  # the bottom half is padding
    _, metrics = jitted_step(setup()[3], batch)
    assert float(metrics["grad_norm"]) < 1e3


def test_training_only_the_iou_head_moves_only_it_and_skips_the_encoders_gradient(one_device):
    """`optimizer.trainable` = the IoU head: the same forward pass (step 1's loss) as training
    everything, every other param unchanged, and no gradient through the encoder: XLA counts
    no more FLOPs than for the decoder-only step, which skips it (the encoder's backward pass
    would add about twice its forward)."""
    model, opt_config, interactive, state = setup()
    batch = make_batch(0)
    flops = {}
    for name, changes in (("head", {"trainable": ("mask_decoder/iou_prediction_head",)}),
                          ("decoder", {"freeze_image_encoder": True})):
        config = dataclasses.replace(opt_config, **changes)
        start = create_train_state(state.params, config, model.config, seed=0)
        compiled = jax.jit(make_train_step(model, config, interactive)).lower(start, batch).compile()
        cost = compiled.cost_analysis()
        flops[name] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        if name == "head":
            new_state, metrics = compiled(start, batch)
    first_loss = one_device[3][0]["loss"]
    np.testing.assert_allclose(np.asarray(metrics["loss"]), first_loss, rtol=1e-5)
    before, after = flatten_dict(jax.device_get(state.params)), flatten_dict(jax.device_get(new_state.params))
    head = [k for k in before if k[:2] == ("mask_decoder", "iou_prediction_head")]
    assert head and all(not np.array_equal(before[k], after[k]) for k in head)
    assert all(np.array_equal(before[k], after[k]) for k in before if k not in head)
    assert 0 < flops["head"] <= 1.001 * flops["decoder"], flops


def test_max_masks_trains_the_first_masks_of_each_image():
    """interactive.max_masks=1 on a 2-mask batch is the step on the batch of each image's first mask:
    the same loss, metrics and params (a mask's prompts depend on its index, not on the others)."""
    model, opt_config, _, state = setup()
    batch = make_batch(0)
    batch["mask_valid"][2, 0] = False  # the divisor counts only the masks the loop trains
    first = {k: v[:, :1] if k in ("masks_low_res", "boxes", "mask_valid") else v for k, v in batch.items()}
    single = InteractiveConfig(num_correction_points=0, num_mask_only=0)  # the slicing is the loop's; 1 iteration compiles fast
    new, metrics = jax.jit(make_train_step(model, opt_config, dataclasses.replace(single, max_masks=1)))(state, batch)
    want_state, want = jax.jit(make_train_step(model, opt_config, single))(setup()[3], first)
    assert metrics["loss"].shape == (1,)
    for key in METRICS:
        np.testing.assert_array_equal(metrics[key], want[key], err_msg=key)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_batch_skips_the_update_and_counts(jitted_step):
    state, step = setup()[3], jitted_step
    bad = make_batch(0)
    bad["boxes"][0, 0, 0] = np.nan  # a NaN box prompt poisons the loss
    bad["boxes"][:, :, :] = np.nan
    new, metrics = step(state, bad)
    assert bool(metrics["skipped"]) and int(new.nonfinite_in_a_row) == 1 and int(new.nonfinite_total) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    new, metrics = step(new, make_batch(1))
    assert not bool(metrics["skipped"]) and int(new.nonfinite_in_a_row) == 0 and int(new.nonfinite_total) == 1


def _assert_params_close(arrays, prefix, expected_params, lr=1e-3, steps=2):
    """Tolerance: every element within 2 * lr * steps (Adam moves an element at most ~lr per step,
    whatever its gradient), and 99.9% of each tensor's elements within RTOL / ATOL.

    Devices add gradients in other orders than one device, so gradients differ by fp32
    rounding; where a gradient is itself at rounding level (attention key biases, whose
    true gradient is 0 because softmax ignores a shift shared by all keys, and a few
    others), Adam's normalisation turns that noise into a full step of either sign.
    """
    expected = flatten_dict(jax.device_get(expected_params), sep="/")
    for key, value in expected.items():
        actual, value = arrays[f"{prefix}/{key}"], np.asarray(value)
        assert np.all(np.abs(actual - value) <= 2 * lr * steps), key
        if key.endswith("k_proj/bias") or key.endswith("attn/qkv/bias"):
            continue  # (partly) pure noise, see above
        close = np.isclose(actual, value, rtol=RTOL, atol=ATOL)
        assert close.mean() >= 0.999, (key, int((~close).sum()), close.size)


def _assert_metrics_equal(arrays, prefix, history):
    """Loss, its parts, the gradient norm and the training mIoU of every step, as one device has them:
    a loss or gradient summed where it should be averaged (or the reverse) is off by the device count."""
    for step, expected in enumerate(history):
        for key, value in expected.items():
            np.testing.assert_allclose(arrays[f"{prefix}_metrics/{step}/{key}"], value, rtol=RTOL, atol=1e-6,
                                       err_msg=f"{prefix} step {step} {key}")


def test_a_pmapped_step_fed_its_own_outputs_compiles_once():
    """The state placed for pmap (`PmapParallel.place`, `replicate_for_pmap`) lies on the mesh
    pmap returns its outputs on: the second step reuses the first one's compile."""
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                compiles.append(record.getMessage())

    handler = Count()
    logging.getLogger("jax").addHandler(handler)
    try:
        step = jax.pmap(lambda state: {"w": state["w"] * 0.5, "step": state["step"] + 1},
                        axis_name=PmapParallel.axis, donate_argnums=(0,))
        state = PmapParallel(None).place({"w": np.ones((3, 2), np.float32), "step": np.int32(0)})
        with jax.log_compiles():
            for _ in range(3):
                state = step(state)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert len(compiles) == 1, compiles
    np.testing.assert_array_equal(np.asarray(state["step"]), 3)


def test_pmap_and_mesh_on_eight_devices_equal_one_device(tmp_path, one_device):
    (arrays,) = device_workers.run_workers(WORKER, tmp_path, 1, 8)
    assert int(arrays["device_count"]) == 8 and int(arrays["mesh_sharded_leaves"]) > 0
    for prefix in ("pmap", "mesh"):
        _assert_metrics_equal(arrays, prefix, one_device[3])
        _assert_params_close(arrays, prefix, one_device[0].params)


def test_two_processes_equal_one_device(tmp_path, one_device):
    results = device_workers.run_workers(WORKER, tmp_path, 2, 2)
    for arrays in results:
        assert int(arrays["device_count"]) == 4
        _assert_metrics_equal(arrays, "mesh", one_device[3])
        _assert_params_close(arrays, "mesh", one_device[0].params)
