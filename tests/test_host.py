"""sam_jax/host.py's FLOP count: every loop iteration counted (XLA's own count takes a loop's body once),
on small functions whose Python-unrolled twins XLA counts without loops, and on the train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmark_train_step import train_batch
from experiments.train_configs import get_config
from sam_jax.host import xla_flops
from sam_jax.training.loop import build_model, initial_params, step_flops
from sam_jax.training.train_step import create_train_state
from test_train_run import MICRO

X = jnp.linspace(-1.0, 1.0, 32 * 32).reshape(32, 32)


def step(c):
    return jnp.tanh(c @ X)


def scanned(x, length=10, unroll=1):
    return jax.lax.scan(lambda c, _: (jax.checkpoint(step)(c), None), x, None, length=length, unroll=unroll)[0].sum()


def unrolled(x, length=10):
    for _ in range(length):
        x = jax.checkpoint(step)(x)
    return x.sum()


def test_xla_alone_counts_a_loop_body_once():
    """What this module corrects: the compiled scan's count is one iteration's, not ten."""
    cost = jax.jit(scanned).lower(X).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] < 0.2 * xla_flops(unrolled, X)


@pytest.mark.parametrize("unroll", [1, 3, 5, 10, 16])  # remainders, one trip of all, more than the length
def test_a_scan_counts_as_its_unrolled_twin(unroll):
    expected = xla_flops(unrolled, X)
    assert expected > 10 * 2 * 32**3
    # The loop counter's increments are the only FLOPs a loop adds.
    assert xla_flops(lambda x: scanned(x, unroll=unroll), X) == pytest.approx(expected, abs=20)
    # The gradient: a reverse scan, each iteration's forward pass recomputed inside it; a scan of
    # unroll >= its length lowers to no loop at all, which XLA counts whole.
    expected_grad = xla_flops(jax.grad(lambda x: scanned(x, unroll=10)), X)
    assert expected_grad > 20 * 2 * 32**3
    assert xla_flops(jax.grad(lambda x: scanned(x, unroll=unroll)), X) == pytest.approx(expected_grad, abs=40)


def test_nested_scans_maps_and_fori_loops_under_jit_and_remat():
    def nested(x):
        inner = lambda c, _: (jax.lax.scan(lambda d, _: (step(d), None), c, None, length=3)[0], None)
        return jax.lax.scan(jax.checkpoint(inner), x, None, length=4)[0].sum()

    assert xla_flops(jax.jit(nested), X) == pytest.approx(xla_flops(lambda x: unrolled(x, 12), X), abs=40)
    rows = X.reshape(4, 8, 32)
    assert xla_flops(lambda r: jax.lax.map(step, r).sum(), rows) == pytest.approx(
        xla_flops(lambda r: step(r.reshape(32, 32)).sum(), rows), abs=20)
    assert xla_flops(lambda x: jax.lax.fori_loop(0, 7, lambda i, c: step(c), x).sum(), X) == pytest.approx(
        xla_flops(lambda x: unrolled(x, 7), X), abs=20)


def test_train_step_counts_every_iteration_and_query_chunk():
    """The full loop's scan and the encoder's query chunks (a lax.map) count in full."""
    config = get_config("synthetic_smoke", MICRO)
    model = build_model(config)
    state = jax.eval_shape(lambda: create_train_state(initial_params(config, model), config.optimizer,
                                                      config.model, config.seed))
    batch = train_batch(config, config.data.global_batch_size)
    full = config.interactive
    count = lambda model, mask_only: step_flops(model, config.optimizer,
                                                dataclasses.replace(full, num_mask_only=mask_only), state, batch)
    # A mask-only iteration more adds the same decoder call each time (the point buffer keeps its size).
    counts = [count(model, mask_only) for mask_only in (1, 2, 3)]
    one_iteration = counts[1] - counts[0]
    assert counts[2] - counts[1] == pytest.approx(one_iteration, rel=1e-3)
    single = step_flops(model, config.optimizer, config.interactive_at(1), state, batch)
    assert one_iteration > 0.2 * single
    # Chunked, the backward pass also sums the keys' gradients over the chunks (~1e-4 more); a chunk
    # counted once would be ~2% less.
    assert model.query_chunk_size < (config.model.encoder.image_size // config.model.encoder.patch_size) ** 2
    assert single == pytest.approx(step_flops(model.clone(query_chunk_size=None), config.optimizer,
                                              config.interactive_at(1), state, batch), rel=1e-3)
