"""Compute dtype (bf16 with fp32 LayerNorm and softmax), scanned blocks, rematerialisation."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from sam_jax import weights
from sam_jax.modeling import Sam

rng = np.random.default_rng(0)


def _image(config):
    return jnp.asarray(rng.normal(size=(1, config.image_size, config.image_size, 3)), jnp.float32)


def _encode(config, params, image, **options):
    return Sam(config, **options).apply({"params": params}, image, method=Sam.encode_image)


def _primitive_operand_dtypes(jaxpr, names):
    """Operand dtypes of every `names` primitive in a (nested) jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.extend(str(v.aval.dtype) for v in eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_primitive_operand_dtypes(sub, names))
    return found


def test_bf16_compute_is_close_to_fp32_and_keeps_fp32_params(tiny):
    config, _, params = tiny
    image = _image(config)
    fp32 = _encode(config, params, image)
    bf16 = _encode(config, params, image, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    assert relative_error(bf16.astype(jnp.float32), fp32) < 3e-2
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_bf16_runs_matmuls_in_bf16_and_reductions_in_fp32(tiny):
    config, _, params = tiny
    jaxpr = jax.make_jaxpr(
        lambda p, x: _encode(config, p, x, dtype=jnp.bfloat16)
    )(params, _image(config)).jaxpr
    dots = _primitive_operand_dtypes(jaxpr, {"dot_general", "conv_general_dilated"})
    assert dots and all(d == "bfloat16" for d in dots), set(dots)  # the dtype option is not a no-op
    # LayerNorm statistics and softmax normalisation: every reduction is fp32.
    reductions = _primitive_operand_dtypes(jaxpr, {"reduce_sum", "reduce_max", "exp", "rsqrt"})
    assert reductions and all(d == "float32" for d in reductions), set(reductions)


def test_scanned_blocks_equal_looped_blocks(tiny):
    config, _, params = tiny
    image = _image(config)
    scanned_params = weights.to_scanned(params, config)
    assert weights.layout_of(scanned_params) == weights.SCANNED
    looped = _encode(config, params, image)
    scanned = _encode(config, scanned_params, image, scan_blocks=True)
    assert relative_error(scanned, looped) < 1e-6
    back = weights.to_looped(scanned_params, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["looped", "scanned"])
def test_remat_gives_the_same_gradients(tiny, scan_blocks):
    config, _, params = tiny
    image = _image(config)
    if scan_blocks:
        params = weights.to_scanned(params, config)

    def grads(remat_policy):
        loss = lambda p: jnp.sum(
            _encode(config, p, image, scan_blocks=scan_blocks, remat_policy=remat_policy) ** 2)
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(None), grads("nothing_saveable")
    # Recomputation reorders fp32 sums; each gradient agrees to rounding.
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        assert relative_error(b, a) < 1e-5
    assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(plain["image_encoder"]))


def test_bad_remat_policy_and_unscannable_config_are_named(tiny):
    config, _, params = tiny
    with pytest.raises(ValueError, match="unknown remat_policy 'everything'"):
        _encode(config, params, _image(config), remat_policy="everything")
    encoder = dataclasses.replace(config.encoder, global_attn_indexes=(0, 3))
    odd = dataclasses.replace(config, encoder=encoder)
    with pytest.raises(ValueError, match=r"scan_blocks needs global blocks.*\(0, 3\)"):
        Sam(odd, scan_blocks=True).init(jax.random.PRNGKey(0), _image(odd), method=Sam.encode_image)

