"""Per-component parity with the official PyTorch modules on the same random weights.

The image encoder's components run at the full width of vit_b, vit_l and
vit_h (two blocks: one windowed, one global); the prompt encoder and mask
decoder, which are the same in all three, at their released size. Each
test prints the relative L2 error it measured (`pytest -s`).
"""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
import torch

from conftest import apply_submodule, make_official, relative_error, report, to_torch, with_depth
from sam_jax.configs import get_config
from sam_jax.modeling.sam import postprocess_masks

rng = np.random.default_rng(0)


@pytest.fixture(scope="module", params=["vit_b", "vit_l", "vit_h"])
def encoder_parts(request):
    config, ref, params = make_official(with_depth(get_config(request.param), 2))
    image = rng.normal(size=(1, 3, config.image_size, config.image_size)).astype(np.float32)
    with torch.no_grad():
        tokens = ref.image_encoder.patch_embed(to_torch(image)) + ref.image_encoder.pos_embed
    yield request.param, config, ref.image_encoder, params, image, tokens
    del ref, params
    gc.collect()


@torch.no_grad()
def test_patch_embedding(encoder_parts):
    name, config, ref, params, image, _ = encoder_parts
    ours = apply_submodule(
        config, params, lambda m, x: m.image_encoder.patch_embed(x), image.transpose(0, 2, 3, 1))
    error = relative_error(ours, ref.patch_embed(to_torch(image)))
    report(f"{name} patch embedding", error)
    assert error < 1e-6


@pytest.mark.parametrize("block", [0, 1], ids=["windowed", "global"])
@torch.no_grad()
def test_encoder_block(encoder_parts, block):
    name, config, ref, params, _, tokens = encoder_parts
    assert ref.blocks[block].window_size == (14 if block == 0 else 0)
    ours = apply_submodule(config, params, lambda m, x: m.image_encoder.blocks[block](x), tokens.numpy())
    error = relative_error(ours, ref.blocks[block](tokens))
    report(f"{name} {'windowed' if block == 0 else 'global'} block", error)
    assert error < 1e-5


@torch.no_grad()
def test_neck(encoder_parts):
    name, config, ref, params, _, tokens = encoder_parts
    ours = apply_submodule(config, params, lambda m, x: m.image_encoder.neck(x), tokens.numpy())
    error = relative_error(np.asarray(ours).transpose(0, 3, 1, 2), ref.neck(tokens.permute(0, 3, 1, 2)))
    report(f"{name} neck", error)
    assert error < 1e-5


@pytest.fixture(scope="module", params=["vit_tiny", "vit_b"])
def prompt_parts(request):
    """Released (or tiny) prompt encoder and decoder with the 1-block encoder they come with."""
    config, ref, params = make_official(with_depth(get_config(request.param), 1))
    e = config.embedding_size
    embedding = rng.normal(size=(1, config.prompt_embed_dim, e, e)).astype(np.float32)
    yield request.param, config, ref, params, embedding


PROMPTS = {
    "points": dict(points=True),
    "box": dict(box=True),
    "points+box": dict(points=True, box=True),
    "mask": dict(mask=True),
    "points+mask": dict(points=True, mask=True),
    "points+box+mask": dict(points=True, box=True, mask=True),
}


def make_prompts(config, kind: dict, num_prompts: int = 3):
    s, m = config.image_size, config.low_res_mask_size
    coords = rng.uniform(0, s, size=(num_prompts, 2, 2)).astype(np.float32) if kind.get("points") else None
    labels = rng.integers(0, 2, size=(num_prompts, 2)).astype(np.int32) if kind.get("points") else None
    corner = rng.uniform(0, s / 2, size=(num_prompts, 2))
    boxes = np.concatenate([corner, corner + s / 3], 1).astype(np.float32) if kind.get("box") else None
    masks = (4 * rng.normal(size=(num_prompts, 1, m, m))).astype(np.float32) if kind.get("mask") else None
    return coords, labels, boxes, masks


def official_prompt_encoding(ref, coords, labels, boxes, masks):
    points = None if coords is None else (to_torch(coords), to_torch(labels))
    return ref.prompt_encoder(points, None if boxes is None else to_torch(boxes),
                              None if masks is None else to_torch(masks))


@pytest.mark.parametrize("kind", PROMPTS, ids=list(PROMPTS))
@torch.no_grad()
def test_prompt_encoder(prompt_parts, kind):
    name, config, ref, params, _ = prompt_parts
    coords, labels, boxes, masks = make_prompts(config, PROMPTS[kind])
    sparse, dense = apply_submodule(
        config, params,
        lambda m, c, l, b, k: m.prompt_encoder(None if c is None else (c, l), b, k),
        coords, labels, boxes, masks,
    )
    ref_sparse, ref_dense = official_prompt_encoding(ref, coords, labels, boxes, masks)
    assert sparse.shape == tuple(ref_sparse.shape)
    sparse_error = relative_error(sparse, ref_sparse)
    dense_error = relative_error(np.asarray(dense).transpose(0, 3, 1, 2), ref_dense)
    report(f"{name} prompt encoder {kind}: sparse", sparse_error)
    report(f"{name} prompt encoder {kind}: dense", dense_error)
    assert sparse_error < 1e-6 and dense_error < 1e-5


@torch.no_grad()
def test_dense_positional_encoding(prompt_parts):
    name, config, ref, params, _ = prompt_parts
    ours = apply_submodule(config, params, lambda m: m.prompt_encoder.get_dense_pe())
    error = relative_error(np.asarray(ours).transpose(0, 3, 1, 2), ref.prompt_encoder.get_dense_pe())
    report(f"{name} dense positional encoding", error)
    assert error < 1e-6


# output_ids: the tokens the final attention runs for (the decoder's IoU token and returned
# mask tokens): all, a leading slice (single-mask output), a gather (multimask output).
@pytest.mark.parametrize("output_ids", [None, (0, 1), (0, 2, 3, 4)], ids=["all", "slice", "gather"])
@torch.no_grad()
def test_two_way_transformer(prompt_parts, output_ids):
    name, config, ref, params, embedding = prompt_parts
    tokens = rng.normal(size=(3, 9, config.prompt_embed_dim)).astype(np.float32)
    pe = ref.prompt_encoder.get_dense_pe()
    image = np.repeat(embedding, 3, axis=0)
    queries, keys = apply_submodule(
        config, params, lambda m, x, p, t: m.mask_decoder.transformer(x, p, t, output_ids=output_ids),
        image.transpose(0, 2, 3, 1), pe.numpy().transpose(0, 2, 3, 1), tokens,
    )
    ref_queries, ref_keys = ref.mask_decoder.transformer(to_torch(image), pe, to_torch(tokens))
    if output_ids is not None:
        ref_queries = ref_queries[:, list(output_ids)]
    assert queries.shape == tuple(ref_queries.shape)
    q_error, k_error = relative_error(queries, ref_queries), relative_error(keys, ref_keys)
    report(f"{name} two-way transformer: tokens", q_error)
    report(f"{name} two-way transformer: image", k_error)
    assert q_error < 1e-5 and k_error < 1e-5


@pytest.mark.parametrize("multimask_output", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("kind", ["points", "points+box+mask"])
@torch.no_grad()
def test_mask_decoder(prompt_parts, kind, multimask_output):
    name, config, ref, params, embedding = prompt_parts
    ref_sparse, ref_dense = official_prompt_encoding(ref, *make_prompts(config, PROMPTS[kind]))
    pe = ref.prompt_encoder.get_dense_pe()
    masks, iou = apply_submodule(
        config, params,
        lambda m, *a: m.mask_decoder(*a, multimask_output=multimask_output),
        embedding.transpose(0, 2, 3, 1), pe.numpy().transpose(0, 2, 3, 1),
        ref_sparse.numpy(), ref_dense.numpy().transpose(0, 2, 3, 1),
    )
    ref_masks, ref_iou = ref.mask_decoder(to_torch(embedding), pe, ref_sparse, ref_dense, multimask_output)
    side = config.low_res_mask_size
    assert masks.shape == tuple(ref_masks.shape) == (3, 3 if multimask_output else 1, side, side)
    mask_error, iou_error = relative_error(masks, ref_masks), relative_error(iou, ref_iou)
    report(f"{name} mask decoder {kind} multimask={multimask_output}: masks", mask_error)
    report(f"{name} mask decoder {kind} multimask={multimask_output}: iou", iou_error)
    assert mask_error < 1e-5 and iou_error < 1e-5


@pytest.mark.parametrize("original_size", [(768, 1024), (1500, 2000), (480, 640)])
@torch.no_grad()
def test_postprocessing_full_size(original_size):
    ref = make_official(with_depth(get_config("vit_b"), 1))[1]
    low_res = rng.normal(size=(2, 3, 256, 256)).astype(np.float32)
    input_size = (768, 1024)
    ours = jax.jit(postprocess_masks, static_argnums=(1, 2, 3))(low_res, input_size, original_size, 1024)
    error = relative_error(ours, ref.postprocess_masks(to_torch(low_res), input_size, original_size))
    report(f"postprocess 256 -> 1024 -> crop {input_size} -> {original_size}", error)
    assert error < 1e-6
