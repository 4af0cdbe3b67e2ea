"""Hugging Face `transformers.SamModel` weights, renamed to official keys, give the official model.

A small random `SamModel` is converted with `huggingface_to_official`, loaded
strictly into the official `segment_anything` model of the same sizes, and
both are run on the same normalised image and prompts. A vit_b-sized pair
checks only that the key mapping is complete and shape-exact.

How HF's `SamModel.forward` must be called to match the official
`image_encoder` -> `prompt_encoder` -> `mask_decoder` path (what
`SamPredictor.predict_torch` runs), and where the two differ:

* `pixel_values` is the image already normalised and padded to
  `image_size` (the official `Sam.preprocess`); HF rejects other sizes.
* One image, P prompts: HF `input_points` (1, P, N, 2), `input_labels`
  (1, P, N), `input_boxes` (1, P, 4) are the official `point_coords` (P, N, 2),
  `point_labels` (P, N), `boxes` (P, 4) with a leading image axis; with both
  points and boxes, P must agree. Coordinates are in the resized input frame
  in both (HF adds the same +0.5 pixel-centre shift) and outputs are
  `pred_masks` (1, P, K, 4h, 4w) and `iou_scores` (1, P, K), the official
  low-res logits (P, K, 4h, 4w) and IoU predictions (P, K).
* Padding point: both append one (0, 0) point labelled -1 ("not a point")
  when no box is given, and none when a box is given; -1 means the same in
  both (HF's docstring calls it "background", but it is the official
  not-a-point embedding; background is 0).
* HF adds label -10 for padding points: they get an all-zero embedding but
  remain tokens that the decoder attends to, so they are neither the official
  -1 nor equivalent to leaving the point out (low-res logits differ by ~2e-2
  relative on this model). The official model has no such label; it is not tested here.
* `input_labels` defaults to all ones in HF; the official model requires labels.
* Mask input: HF needs (B_image, 1, 4h, 4w) (not the (B, H, W) its docstring
  says) and adds it before repeating over the point batch, so it takes one
  mask per image, shared by all P prompts; the official model takes one mask
  per prompt (P, 1, 4h, 4w). A P > 1 mask batch fails in HF.
* LayerNorm eps: HF's two-way transformer blocks use
  `mask_decoder_config.layer_norm_eps`, default 1e-6 (we believe the released
  `facebook/sam-vit-*` configs keep it; not checked offline), where the
  official `norm1`..`norm4` use torch's default 1e-5 (`norm_final_attn` is
  1e-5 in both). With HF's default the decoder outputs
  differ by ~1e-4 relative on this model; the weights are the same, so this
  test sets 1e-5 on the HF side to compare the mapping at 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import SamConfig, SamModel

from checkpoints_convert import huggingface
from checkpoints_convert.huggingface import huggingface_to_official, is_huggingface_state_dict
from checkpoints_convert.reference_model import ENCODER_CONFIGS, build_official_sam, randomize_zero_initialised
from conftest import relative_error
from sam_jax.errors import CheckpointError

TOLERANCE = 1e-5
SMALL = dict(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), image_size=256)
PE_KEY = "shared_image_embedding.positional_embedding"
PE_TWIN = "prompt_encoder.shared_embedding.positional_embedding"


def hf_config(embed_dim, depth, num_heads, global_attn_indexes, image_size, decoder_eps=1e-6) -> SamConfig:
    """A `SamConfig` with the official prompt encoder and decoder sizes around the given ViT."""
    vision = dict(hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
                  global_attn_indexes=list(global_attn_indexes), image_size=image_size, patch_size=16, window_size=14)
    return SamConfig(vision_config=vision, prompt_encoder_config=dict(image_size=image_size, patch_size=16),
                     mask_decoder_config=dict(layer_norm_eps=decoder_eps))


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def load_converted(official: torch.nn.Module, hf_state: dict[str, np.ndarray]) -> None:
    converted = huggingface_to_official(hf_state)
    official.load_state_dict({key: torch.from_numpy(value) for key, value in converted.items()}, strict=True)


@torch.no_grad()
def randomise_hf(model: SamModel, seed: int) -> SamModel:
    """Gives every tensor of a fresh HF `SamModel` a random value of a realistic size.

    HF's init is no test of the mapping: vision weights are drawn with
    `initializer_range=1e-10`, so the ViT and neck output little but the last
    LayerNorm's bias, and biases, position embeddings, rel-pos tables and
    LayerNorms start constant. Linear/conv/embedding layers get torch's
    default init, the rest `randomize_zero_initialised`'s noise, and the
    Fourier matrix N(0, 1) as in the official init (HF uses std hidden/2).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)):
                module.reset_parameters()
        model.shared_image_embedding.positional_embedding.normal_()
    return randomize_zero_initialised(model, seed=seed + 1)


@pytest.fixture(scope="module")
def small_pair():
    """A random small HF `SamModel` and the official model loaded from its converted weights."""
    hf = randomise_hf(SamModel(hf_config(**SMALL, decoder_eps=1e-5)).eval(), seed=1)
    hf_state = numpy_state_dict(hf)
    assert np.array_equal(hf_state[PE_KEY], hf_state[PE_TWIN])  # tied in the model
    official = build_official_sam(**SMALL)
    load_converted(official, hf_state)
    return hf, official, hf_state


@pytest.fixture(scope="module")
def image_and_embeddings(small_pair):
    hf, official, _ = small_pair
    image = torch.randn(1, 3, SMALL["image_size"], SMALL["image_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return image, official.image_encoder(image), hf.get_image_embeddings(image)


def test_detects_layout(small_pair):
    _, official, hf_state = small_pair
    assert is_huggingface_state_dict(hf_state)
    assert not is_huggingface_state_dict(official.state_dict())


def test_small_mapping_is_a_pure_rename(small_pair):
    _, official, hf_state = small_pair
    converted = huggingface_to_official(hf_state)
    assert set(converted) == set(official.state_dict())
    assert len(converted) == len(hf_state) - 1  # the tied positional-encoding copy is dropped
    values = {id(value) for value in hf_state.values()}
    assert all(id(value) in values for value in converted.values())


@pytest.mark.parametrize("keep", [PE_KEY, PE_TWIN])
def test_either_tied_copy_alone_suffices(small_pair, keep):
    _, _, hf_state = small_pair
    drop = PE_TWIN if keep == PE_KEY else PE_KEY
    converted = huggingface_to_official({k: v for k, v in hf_state.items() if k != drop})
    assert converted["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] is hf_state[keep]


def test_image_embeddings_match(image_and_embeddings):
    _, official_embeddings, hf_embeddings = image_and_embeddings
    assert official_embeddings.shape == hf_embeddings.shape == (1, 256, 16, 16)
    assert relative_error(hf_embeddings, official_embeddings) <= TOLERANCE


def _prompts(kind: str):
    """(official kwargs, HF kwargs) for one image; see the module docstring for the layouts."""
    g = torch.Generator().manual_seed(4)
    size = SMALL["image_size"]
    points = torch.rand(2, 3, 2, generator=g) * size
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0], [50.0, 60.0, 120.0, 250.0]])
    mask = torch.randn(1, 1, size // 4, size // 4, generator=g) * 5
    official, hf = {"points": None, "boxes": None, "masks": None}, {}
    if "points" in kind:
        official["points"] = (points, labels)
        hf.update(input_points=points[None], input_labels=labels[None])
    if "box" in kind:
        official["boxes"] = boxes
        hf["input_boxes"] = boxes[None]
    if "mask" in kind:  # HF: one mask per image, shared by the prompts; official: one per prompt
        prompts = 1 if kind == "mask" else 2
        official["masks"] = mask.expand(prompts, -1, -1, -1)
        hf["input_masks"] = mask
    return official, hf


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "box", "points+box", "points+mask", "points+box+mask", "mask"])
def test_masks_and_iou_match(small_pair, image_and_embeddings, kind, multimask):
    hf, official, _ = small_pair
    image, image_embeddings, hf_embeddings = image_and_embeddings
    official_prompts, hf_prompts = _prompts(kind)
    # The whole HF forward from pixels once; elsewhere from HF's own image embeddings.
    hf_image = dict(pixel_values=image) if kind == "points" else dict(image_embeddings=hf_embeddings)
    with torch.no_grad():
        sparse, dense = official.prompt_encoder(**official_prompts)
        low_res, iou = official.mask_decoder(
            image_embeddings=image_embeddings, image_pe=official.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
        out = hf(**hf_image, multimask_output=multimask, **hf_prompts)
    assert out.pred_masks.shape == (1, *low_res.shape) and out.iou_scores.shape == (1, *iou.shape)
    assert relative_error(out.pred_masks[0], low_res) <= TOLERANCE
    assert relative_error(out.iou_scores[0], iou) <= TOLERANCE


def test_vit_b_layout_maps_completely():
    torch.manual_seed(0)
    hf_state = numpy_state_dict(SamModel(hf_config(**ENCODER_CONFIGS["vit_b"], image_size=1024)))
    official = build_official_sam(**ENCODER_CONFIGS["vit_b"])
    converted = huggingface_to_official(hf_state)
    expected = {key: tuple(value.shape) for key, value in official.state_dict().items()}
    assert {key: value.shape for key, value in converted.items()} == expected
    load_converted(official, hf_state)
    key = "image_encoder.blocks.11.attn.rel_pos_h"
    assert np.array_equal(official.state_dict()[key].numpy(), hf_state["vision_encoder.layers.11.attn.rel_pos_h"])


def _one_line_error(state: dict, *names: str) -> str:
    with pytest.raises(CheckpointError) as info:
        huggingface_to_official(state)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in names), message
    return message


def test_unknown_key_is_rejected(small_pair):
    _, _, hf_state = small_pair
    extra = "vision_encoder.layers.0.attn.extra"
    _one_line_error({**hf_state, extra: np.zeros(1)}, extra)


def test_many_unknown_keys_are_summarised(small_pair):
    _, _, hf_state = small_pair
    extra = {f"mask_decoder.extra_{i:02d}.weight": np.zeros(1) for i in range(12)}
    message = _one_line_error({**hf_state, **extra}, "mask_decoder.extra_00.weight", "(12 in all)")
    assert "extra_10" not in message and "..." in message


def test_differing_tied_copy_is_rejected(small_pair):
    _, _, hf_state = small_pair
    bad = hf_state[PE_TWIN].copy()
    bad[0, 0] = np.nextafter(bad[0, 0], np.float32(np.inf))  # one ulp off
    assert not np.array_equal(bad, hf_state[PE_KEY])
    _one_line_error({**hf_state, PE_TWIN: bad}, PE_TWIN, PE_KEY)


def test_two_keys_for_one_official_key_are_rejected(small_pair, monkeypatch):
    _, _, hf_state = small_pair
    monkeypatch.setattr(huggingface, "_TIED", {})  # undeclared duplicates must collide
    _one_line_error(hf_state, PE_KEY, PE_TWIN, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")


def test_rules_are_anchored():
    assert huggingface.official_key("vision_encoder.pos_embed") == "image_encoder.pos_embed"
    assert huggingface.official_key("model.vision_encoder.pos_embed") is None
    assert huggingface.official_key("vision_encoder.pos_embed.extra") is None
    assert huggingface.official_key("mask_decoder.iou_prediction_head.layers.1.weight") is None  # depth 3 only
