"""The numerics traps that SAM ports get wrong (REFERENCE.md), each pinned to PyTorch.

Each test compares one op with its PyTorch original on inputs where the trap
shows, and most also show that the wrong choice would fail the same check.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints_convert import reference_model
from conftest import apply_submodule, convert_module_params, relative_error, report, to_torch
from sam_jax.modeling.common import LayerNorm, PatchConv, gelu
from sam_jax.modeling.image_encoder import Attention, Block, get_rel_pos
from sam_jax.modeling.interpolate import resize_bilinear, resize_linear
from sam_jax.modeling.sam import postprocess_masks, preprocess
from sam_jax.modeling.transformer import DECODER_LN_EPS

image_encoder = reference_model.modeling.image_encoder
rng = np.random.default_rng(0)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layernorm_matches_torch_on_low_variance_input(eps):
    # Variance ~1e-6 makes eps matter: 1e-6 vs 1e-5 changes the output by ~30%.
    x = (1e-3 * rng.normal(size=(4, 7, 64))).astype(np.float32)
    scale, bias = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    ours = LayerNorm(eps).apply({"params": {"scale": scale, "bias": bias}}, x)
    ref = torch.nn.LayerNorm(64, eps=eps)
    ref.weight.data, ref.bias.data = to_torch(scale), to_torch(bias)
    assert relative_error(ours, ref(to_torch(x)).detach()) < 1e-5
    other = 1e-5 if eps == 1e-6 else 1e-6
    assert relative_error(LayerNorm(other).apply({"params": {"scale": scale, "bias": bias}}, x),
                          ref(to_torch(x)).detach()) > 1e-2


def test_decoder_layernorms_use_pytorch_default_eps():
    assert DECODER_LN_EPS == torch.nn.LayerNorm(8).eps == 1e-5


def test_gelu_is_exact_erf_form():
    x = np.linspace(-6, 6, 10001, dtype=np.float32)
    exact = torch.nn.GELU()(to_torch(x))
    assert relative_error(gelu(x), exact) < 1e-6
    assert relative_error(jax.nn.gelu(x), exact) > 1e-5  # jax's default is the tanh form


def test_conv_transpose_matches_pytorch_semantics():
    x = rng.normal(size=(2, 5, 7, 16)).astype(np.float32)
    ref = torch.nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
    expected = ref(to_torch(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    kernel = ref.weight.detach().numpy().transpose(2, 3, 1, 0)  # the converter's transform
    variables = {"params": {"kernel": kernel, "bias": ref.bias.detach().numpy()}}
    conv = lambda flip: nn.ConvTranspose(8, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=flip)
    error = relative_error(conv(True).apply(variables, x), expected)
    report("ConvTranspose2d k2 s2", error)
    assert error < 1e-6
    unflipped = dict(variables["params"], kernel=kernel.transpose(0, 1, 3, 2))
    assert relative_error(conv(False).apply({"params": unflipped}, x), expected) > 0.1


@pytest.mark.parametrize("kernel_size, use_bias", [(1, True), (2, True), (4, False)])
def test_patch_conv_matches_pytorch_strided_conv_and_loads_its_kernel(kernel_size, use_bias):
    x = rng.normal(size=(3, 8, 12, 5)).astype(np.float32)
    ref = torch.nn.Conv2d(5, 6, kernel_size=kernel_size, stride=kernel_size, bias=use_bias)
    expected = ref(to_torch(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    params = {"kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0)}  # the converter's transform
    if use_bias:
        params["bias"] = ref.bias.detach().numpy()
    layer = PatchConv(6, kernel_size, use_bias=use_bias)
    assert relative_error(layer.apply({"params": params}, x), expected) < 1e-6
    shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x))["params"]
    conv = nn.Conv(6, (kernel_size,) * 2, strides=kernel_size, padding="VALID", use_bias=use_bias)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(
        lambda a: a.shape, jax.eval_shape(lambda: conv.init(jax.random.PRNGKey(0), x))["params"])
    with pytest.raises(ValueError, match="divisible by 4"):
        PatchConv(6, 4).init(jax.random.PRNGKey(0), x[:, :6])


@pytest.mark.parametrize("grid", [(20, 33), (33, 20), (64, 64)])
def test_windowed_block_pads_each_axis_by_its_own_amount(grid):
    torch.manual_seed(0)
    ref = image_encoder.Block(32, 2, use_rel_pos=True, window_size=14, input_size=(64, 64))
    reference_model.randomize_zero_initialised(ref, 0)
    x = rng.normal(size=(1, *grid, 32)).astype(np.float32)
    block = Block(2, 4.0, window_size=14, input_size=(64, 64))
    ours = block.apply({"params": convert_module_params(block, ref, x)}, x)
    error = relative_error(ours, ref(to_torch(x)).detach())
    report(f"windowed block on a {grid} grid", error)
    assert error < 1e-5


@pytest.mark.parametrize("q_size,k_size,table_rows", [
    (14, 14, 27),  # table fits: no interpolation
    (20, 20, 27),  # upsampled table
    (5, 5, 27),  # downsampled table
    (14, 27, 53),  # query shorter than key
    (27, 14, 53),  # key shorter than query
])
def test_get_rel_pos_matches_official(q_size, k_size, table_rows):
    table = rng.normal(size=(table_rows, 8)).astype(np.float32)
    expected = image_encoder.get_rel_pos(q_size, k_size, to_torch(table))
    assert relative_error(get_rel_pos(q_size, k_size, jnp.asarray(table)), expected) < 1e-6


def test_global_attention_interpolates_rel_pos_for_another_resolution():
    # Tables sized for a 16x16 grid, run on 24x20: the interpolation branch on both axes.
    torch.manual_seed(1)
    ref = image_encoder.Attention(32, num_heads=2, use_rel_pos=True, input_size=(16, 16))
    reference_model.randomize_zero_initialised(ref, 1)
    x = rng.normal(size=(2, 24, 20, 32)).astype(np.float32)
    attention = Attention(2, input_size=(16, 16))
    ours = attention.apply({"params": convert_module_params(attention, ref, x)}, x)
    assert relative_error(ours, ref(to_torch(x)).detach()) < 1e-5


@pytest.mark.parametrize("in_size,out_size", [(256, 1024), (1024, 600), (7, 3), (3, 7), (5, 5)])
def test_linear_resize_matches_torch_interpolate_without_antialias(in_size, out_size):
    x = rng.normal(size=(2, 3, in_size)).astype(np.float32)
    expected = F.interpolate(to_torch(x), size=out_size, mode="linear", align_corners=False)
    assert relative_error(resize_linear(x, out_size, axis=-1), expected) < 1e-6
    # Any axis, and `keep`: the first samples only (what postprocess_masks keeps of its crop).
    keep = max(1, out_size * 2 // 3)
    for banded in (False, True):
        assert relative_error(resize_linear(x, out_size, -1, banded=banded), expected) < 1e-6
        moved = resize_linear(np.moveaxis(x, -1, 1), out_size, axis=1, keep=keep, banded=banded)
        assert relative_error(np.moveaxis(moved, 1, -1), expected[..., :keep]) < 1e-6


def test_bilinear_resize_matches_torch_and_jax_image_resize_does_not():
    x = rng.normal(size=(1, 2, 64, 48)).astype(np.float32)
    expected = F.interpolate(to_torch(x), size=(40, 100), mode="bilinear", align_corners=False)
    assert relative_error(resize_bilinear(x, (40, 100)), expected) < 1e-6
    # jax.image.resize antialiases when downsampling, so it is not PyTorch's op.
    assert relative_error(jax.image.resize(x, (1, 2, 40, 100), "linear"), expected) > 1e-2


def test_preprocess_normalises_then_pads_right_and_bottom(tiny):
    config, ref, _ = tiny
    image = rng.integers(0, 256, size=(150, 256, 3), dtype=np.uint8)
    expected = ref.preprocess(to_torch(image).permute(2, 0, 1).float())
    ours = np.asarray(preprocess(jnp.asarray(image), config)).transpose(2, 0, 1)
    assert relative_error(ours, expected) < 1e-6
    assert np.all(ours[:, 150:, :] == 0)


def test_preprocess_rejects_images_larger_than_the_input(tiny):
    config = tiny[0]
    with pytest.raises(ValueError, match=r"H, W <= 256.*\(300, 200, 3\)"):
        preprocess(jnp.zeros((300, 200, 3), jnp.uint8), config)


@pytest.mark.parametrize("original_size", [(150, 200), (600, 800), (37, 50)])
def test_postprocess_masks_matches_official(tiny, original_size):
    config, ref, _ = tiny
    low_res = rng.normal(size=(3, 2, 64, 64)).astype(np.float32)
    input_size = (192, 256)  # longest side 256, as ResizeLongestSide leaves it
    expected = ref.postprocess_masks(to_torch(low_res), input_size, original_size)
    ours = postprocess_masks(jnp.asarray(low_res), input_size, original_size, config.image_size)
    error = relative_error(ours, expected)
    report(f"postprocess 64 -> 256 -> crop {input_size} -> {original_size}", error)
    assert error < 1e-6


def test_points_are_shifted_to_pixel_centres_and_padded(tiny):
    config, ref, params = tiny
    coords = np.array([[[10.0, 200.0], [255.0, 0.0]]], np.float32)
    labels = np.array([[1, 0]])
    sparse, _ = apply_submodule(
        config, params, lambda m, c, l: m.prompt_encoder((c, l), None, None), coords, labels)
    expected, _ = ref.prompt_encoder((to_torch(coords), to_torch(labels)), None, None)
    assert sparse.shape == (1, 3, config.prompt_embed_dim)  # the not-a-point pad appended
    assert relative_error(sparse, expected.detach()) < 1e-6
    unshifted, _ = apply_submodule(
        config, params, lambda m, c, l: m.prompt_encoder((c, l), None, None), coords + 0.5, labels)
    assert relative_error(unshifted, expected.detach()) > 1e-3


def test_query_chunked_global_attention_equals_all_at_once():
    x = rng.normal(size=(2, 16, 12, 32)).astype(np.float32)  # 192 queries: 6 chunks of 32
    whole, chunked = Attention(2, input_size=(16, 16)), Attention(2, input_size=(16, 16), query_chunk_size=32)
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) * 0.1,
        whole.init(jax.random.PRNGKey(0), x)["params"])
    assert relative_error(chunked.apply({"params": params}, x), whole.apply({"params": params}, x)) < 1e-6
