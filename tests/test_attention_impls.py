"""The encoder's attention implementations (`sam_jax.modeling.attention`) against today's XLA path.

The Pallas kernels run in interpret mode here (the CPU has no Pallas backend), with each
accelerator's padding rules (Triton's powers of two, Mosaic's multiples of 8), and are lowered
(not run) for CUDA and TPU so that a kernel the backends cannot lower fails here too.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from sam_jax.configs import get_config
from sam_jax.modeling import Sam
from sam_jax.modeling import attention as attention_module
from sam_jax.modeling.attention import rel_pos_attention, resolve_attention_impl
from sam_jax.modeling.flash_attention import flash_attention, tiling_for
from sam_jax.modeling.image_encoder import Attention

GRIDS = [(8, 8), (6, 10), (7, 7)]  # square global, non-square, a 7x7 window (odd sizes pad)
TILINGS = {
    "cpu": tiling_for("cpu", 16),
    "gpu_padding": dataclasses.replace(tiling_for("gpu", 32), interpret=True, platform="cpu"),
    "tpu_padding": dataclasses.replace(tiling_for("tpu", 16), interpret=True, platform="cpu"),
}


def _inputs(grid, head_dim=12, batch_heads=(2, 3), seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    tokens = grid[0] * grid[1]
    shape = batch_heads + (tokens,)
    arrays = [rng.normal(size=shape + (head_dim,)) * scale for _ in range(3)]
    arrays += [rng.normal(size=shape + (grid[0],)), rng.normal(size=shape + (grid[1],))]
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def _attend(impl, dtype=jnp.float32, windowed=False, chunk=None):
    return lambda *a: rel_pos_attention(*a, impl=impl, windowed=windowed, dtype=dtype, query_chunk_size=chunk)


def _grads(fn, args, cotangent):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent), argnums=tuple(range(5)))(*args)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("tiling", sorted(TILINGS))
def test_flash_kernel_equals_xla_path_forward_and_backward(grid, tiling):
    args = _inputs(grid)
    reference = _attend("xla")(*args)
    flat = lambda t: t.reshape(6, *t.shape[2:])
    flash = lambda q, k, v, rh, rw: flash_attention(flat(q), flat(k), flat(v), flat(rh), flat(rw),
                                                     TILINGS[tiling]).reshape(q.shape)
    assert relative_error(flash(*args), reference) < 1e-6
    cotangent = jax.random.normal(jax.random.PRNGKey(1), reference.shape)
    for name, got, want in zip(("q", "k", "v", "rel_h", "rel_w"), _grads(flash, args, cotangent),
                               _grads(_attend("xla"), args, cotangent)):
        assert relative_error(got, want) < 1e-5, name


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("impl", ["dot_product", "flash"])
def test_each_impl_equals_xla_path_in_float32(grid, impl):
    args = _inputs(grid, seed=2)
    want = _attend("xla", chunk=8 if grid == (8, 8) else None)(*args)  # chunked and whole
    assert relative_error(_attend(impl, windowed=grid == (7, 7))(*args), want) < 1e-6
    cotangent = jax.random.normal(jax.random.PRNGKey(3), want.shape)
    for got, ref in zip(_grads(_attend(impl), args, cotangent), _grads(_attend("xla"), args, cotangent)):
        assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_bf16_error_against_float32_is_no_worse_than_the_xla_path(grid):
    """In bf16 every path rounds its inputs and products; the fused paths accumulate in fp32, so their
    error against the float32 reference is at most the XLA path's (which rounds the probabilities)."""
    args = _inputs(grid, head_dim=16, seed=4, scale=2.0)
    want = _attend("xla")(*args)
    half = [a.astype(jnp.bfloat16) for a in args[:3]] + args[3:]
    xla_error = relative_error(_attend("xla", jnp.bfloat16)(*half).astype(jnp.float32), want)
    assert 1e-4 < xla_error < 2e-2  # bf16 really ran
    for impl in ("dot_product", "flash"):
        out = _attend(impl, jnp.bfloat16)(*half)
        assert out.dtype == jnp.bfloat16
        assert relative_error(out.astype(jnp.float32), want) <= 1.2 * xla_error, impl
    cotangent = jax.random.normal(jax.random.PRNGKey(5), want.shape)
    ref_grads = _grads(_attend("xla"), args, cotangent)
    xla_grads = _grads(_attend("xla", jnp.bfloat16), half, cotangent)
    flash_grads = _grads(_attend("flash", jnp.bfloat16), half, cotangent)
    for name, ref, x, f in zip("q k v rel_h rel_w".split(), ref_grads, xla_grads, flash_grads):
        f_error = relative_error(np.asarray(f, np.float32), ref)
        assert f_error < max(1.5 * relative_error(np.asarray(x, np.float32), ref), 1e-5), name


def _module_outputs(impl, x, window_size, dtype=jnp.float32):
    h, w = x.shape[1:3]
    module = Attention(num_heads=2, input_size=(window_size,) * 2 if window_size else (h, w),
                       window_size=window_size, attention_impl=impl, dtype=dtype)
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(7)  # rel-pos tables are zero at init: give them values
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype) if "rel_pos" in str(path) else p, params)
    loss = lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x).astype(jnp.float32)))
    return module.apply({"params": params}, x), jax.grad(loss)(params)


@pytest.mark.parametrize("grid,window", [((8, 8), 0), ((6, 10), 0), ((9, 12), 4)])
def test_encoder_attention_module_with_each_impl(grid, window):
    """Attention blocks (qkv, rel-pos tables, window padding, projection) agree across impls, params' grads too."""
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2,) + grid + (16,)), jnp.float32)
    want, want_grads = _module_outputs("xla", x, window)
    for impl in ("dot_product", "flash"):
        got, grads = _module_outputs(impl, x, window)
        assert relative_error(got, want) < 1e-6, impl
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            ref = dict(jax.tree_util.tree_leaves_with_path(want_grads))[path]
            assert relative_error(g, ref) < 1e-5, (impl, jax.tree_util.keystr(path))


def test_whole_encoder_with_flash_equals_default():
    config = get_config("vit_tiny")
    images = jnp.asarray(np.random.default_rng(9).normal(size=(1, 256, 256, 3)), jnp.float32)
    params = Sam(config).init(jax.random.PRNGKey(0), images, method=Sam.encode_image)["params"]
    want = Sam(config).apply({"params": params}, images, method=Sam.encode_image)
    got = Sam(config, attention_impl="flash").apply({"params": params}, images, method=Sam.encode_image)
    assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize("platform,marker", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("head_dim,grid", [(80, (64, 64)), (64, (14, 14))])  # vit_h global, a vit_b window
def test_flash_kernels_lower_for_accelerators(platform, marker, head_dim, grid):
    """Forward and both backward kernels lower to Triton (CUDA) and Mosaic (TPU) at the released sizes."""
    tiling = tiling_for("gpu" if platform == "cuda" else "tpu")
    tokens = grid[0] * grid[1]
    spec = lambda width, dt=jnp.bfloat16: jax.ShapeDtypeStruct((4, tokens, width), dt)
    args = (spec(head_dim),) * 3 + (spec(grid[0], jnp.float32), spec(grid[1], jnp.float32))
    grads = jax.grad(lambda *a: jnp.sum(flash_attention(*a, tiling).astype(jnp.float32)), argnums=tuple(range(5)))
    text = jax.jit(grads).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 3  # forward, d(queries), d(keys)


def test_auto_resolution(monkeypatch):
    choose = lambda **kw: resolve_attention_impl("auto", head_dim=64, grid=(64, 64), **kw)
    assert choose(windowed=False, dtype=jnp.float32) == "xla"  # the CPU
    assert resolve_attention_impl("flash", windowed=True, dtype=jnp.float32, head_dim=8, grid=(2, 2)) == "flash"
    monkeypatch.setattr(attention_module, "_compiles", lambda *a: True)
    for backend, windowed, dtype, want in [
        ("gpu", False, jnp.bfloat16, "flash"), ("gpu", True, jnp.bfloat16, "dot_product"),
        ("gpu", True, jnp.float32, "xla"), ("gpu", False, jnp.float32, "flash"),
        ("tpu", False, jnp.bfloat16, "flash"), ("tpu", True, jnp.bfloat16, "xla"),
    ]:
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert choose(windowed=windowed, dtype=dtype) == want, (backend, windowed, dtype)


def test_auto_falls_back_to_xla_with_a_warning_when_the_kernel_cannot_compile(monkeypatch):
    """Told it is on a GPU, the probe compiles a Triton kernel on this CPU, which fails: "xla", loudly."""
    attention_module._compiles.cache_clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    try:
        with pytest.warns(RuntimeWarning, match="'flash' does not compile on gpu.*using 'xla'"):
            assert resolve_attention_impl("auto", windowed=False, dtype=jnp.bfloat16, head_dim=16, grid=(4, 4)) == "xla"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the answer is cached: one warning per shape
            assert resolve_attention_impl("auto", windowed=False, dtype=jnp.bfloat16, head_dim=16, grid=(4, 4)) == "xla"
    finally:
        attention_module._compiles.cache_clear()


def test_unknown_impl_is_a_clear_error():
    images = jnp.zeros((1, 256, 256, 3))
    with pytest.raises(ValueError, match="unknown attention_impl 'cuda'; choose from"):
        Sam(get_config("vit_tiny"), attention_impl="cuda").init(jax.random.PRNGKey(0), images, method=Sam.encode_image)
    with pytest.raises(ValueError, match="flash_attention needs"):
        q, k, v, rel_h, _ = (t[0] for t in _inputs((4, 4)))
        flash_attention(q, k, v, rel_h, jnp.zeros((3, 16, 5)), tiling_for("cpu"))  # rel_w for 5 columns

