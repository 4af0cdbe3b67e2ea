"""CLIP in Flax against torch: Hugging Face `transformers.CLIPModel` and open_clip, both randomly
initialised at small sizes and converted by `checkpoints_convert.clip`; the region (masked
last-layer attention) embedding against a torch computation of the last block; strict loading.

open_clip parity runs when `open_clip` is installed: `pip install --no-deps open-clip-torch==3.3.0`
(only `open_clip.model` / `open_clip.transformer` are imported, with a stub for the one torchvision
name they import, so neither torchvision nor open_clip's other dependencies are needed). Without it,
the open_clip converter is still checked against torch numerics: the HF model's tensors renamed to
open_clip's keys by the documented correspondence.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers  # before any torchvision stub: transformers probes for torchvision on import
from safetensors.numpy import save_file

from checkpoints_convert import clip as convert
from sam_jax.clip.configs import CLIP_CONFIGS, ClipConfig, ClipTextConfig, ClipVisionConfig
from sam_jax.clip.model import CLIP, CLIP_MEAN, CLIP_STD, preprocess
from sam_jax.errors import CheckpointError
from sam_jax.tree_paths import flatten

SOT, EOT = 49406, 49407  # CLIP's start / end of text; EOT is the highest id, so argmax finds it
TOL = 1e-5
BATCH = 3


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want.detach().numpy() if torch.is_tensor(want) else want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def small_config(activation: str) -> ClipConfig:
    """Different widths per tower and an MLP ratio of 2, so a swapped or untransposed tensor shows."""
    return ClipConfig(
        name=f"small_{activation}", embed_dim=40, activation=activation,
        vision=ClipVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0),
        text=ClipTextConfig(width=48, layers=2, heads=3, context_length=16, mlp_ratio=4.0),
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Biases and LayerNorm params away from their 0 / 1 initialisation, so all of them count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias") or "ln" in name or "norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)


def hf_model(config: ClipConfig, seed: int = 0) -> transformers.CLIPModel:
    v, t = config.vision, config.text
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         max_position_embeddings=t.context_length, hidden_act=config.activation,
                         layer_norm_eps=config.layer_norm_eps, bos_token_id=SOT, eos_token_id=EOT),
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           hidden_act=config.activation, layer_norm_eps=config.layer_norm_eps),
        projection_dim=config.embed_dim, logit_scale_init_value=2.5,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_config).eval()
    model.set_attn_implementation("eager")
    randomize(model, seed + 1)
    # HF pools at the first eos_token_id unless it is 2 (then at the argmax, as OpenAI CLIP): with
    # eos 49407, the highest id, once per row, both pool at the same position.
    assert model.text_model.eos_token_id == EOT
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def make_inputs(config: ClipConfig, seed: int = 0):
    """(images (B, S, S, 3) float32, tokens (B, L) int32): SOT, random ids, EOT, zero padding."""
    rng = np.random.default_rng(seed)
    s, length = config.vision.image_size, config.text.context_length
    images = rng.standard_normal((BATCH, s, s, 3)).astype(np.float32)
    tokens = np.zeros((BATCH, length), np.int32)
    for row, eot in enumerate((5, length - 1, 9)[:BATCH]):
        tokens[row, 0] = SOT
        tokens[row, 1:eot] = rng.integers(1, SOT, eot - 1)
        tokens[row, eot] = EOT
    return images, tokens


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def flax_features(config: ClipConfig, params, images, tokens, region=None):
    """(image, text) embeddings, unnormalised."""
    model = CLIP(config)
    image = model.apply({"params": params}, images, region, normalize=False, method=CLIP.encode_image)
    text = model.apply({"params": params}, tokens, normalize=False, method=CLIP.encode_text)
    return np.asarray(image), np.asarray(text)


def assert_parity(config, params, images, tokens, want_image, want_text, label: str) -> None:
    got_image, got_text = flax_features(config, params, images, tokens)
    model = CLIP(config)
    norm_image = model.apply({"params": params}, images, method=CLIP.encode_image)
    norm_text = model.apply({"params": params}, tokens, method=CLIP.encode_text)
    for name, got, want in (
        ("image", got_image, want_image),
        ("text", got_text, want_text),
        ("image normalised", norm_image, F.normalize(want_image, dim=-1)),
        ("text normalised", norm_text, F.normalize(want_text, dim=-1)),
    ):
        error = rel_err(got, want)
        print(f"[parity] {label} {name}: max-abs relative error {error:.2e}")
        assert error < TOL, f"{label} {name}: {error:.2e}"


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_case(request):
    """(config, HF torch model, its numpy state dict, images, tokens, HF image / text features)."""
    config = small_config(request.param)
    model = hf_model(config, seed=0 if request.param == "quick_gelu" else 10)
    images, tokens = make_inputs(config)
    with torch.no_grad():
        want_image = model.get_image_features(pixel_values=to_nchw(images)).pooler_output
        want_text = model.get_text_features(input_ids=torch.from_numpy(tokens).long()).pooler_output
    return config, model, numpy_state_dict(model), images, tokens, want_image, want_text


@pytest.fixture(scope="module")
def quick_case():
    """The quick_gelu case alone, for tests that need one model."""
    config = small_config("quick_gelu")
    model = hf_model(config, seed=0)
    state_dict = numpy_state_dict(model)
    return config, model, state_dict, convert.huggingface_clip_to_flax(state_dict, config)


# --- Hugging Face --------------------------------------------------------------------------------


def test_huggingface_parity(hf_case):
    config, model, state_dict, images, tokens, want_image, want_text = hf_case
    params = convert.huggingface_clip_to_flax(state_dict, config)
    assert_parity(config, params, images, tokens, want_image, want_text, f"HF {config.activation}")
    assert float(params["logit_scale"]) == pytest.approx(model.logit_scale.item())
    # __call__: open_clip's forward (normalised features and exp(logit_scale)).
    image, text, scale = CLIP(config).apply({"params": params}, images, tokens)
    assert rel_err(image, F.normalize(want_image, dim=-1)) < TOL and rel_err(text, F.normalize(want_text, dim=-1)) < TOL
    assert float(scale) == pytest.approx(model.logit_scale.exp().item(), rel=1e-6)
    # The activation matters at these sizes: the other one is far off.
    other = dataclasses.replace(config, activation="gelu" if config.activation == "quick_gelu" else "quick_gelu")
    wrong_image, wrong_text = flax_features(other, params, images, tokens)
    assert rel_err(wrong_image, want_image) > 1e-3 and rel_err(wrong_text, want_text) > 1e-3


def test_safetensors_round_trip(quick_case, tmp_path):
    config, _, state_dict, params = quick_case
    on_disk = dict(state_dict)
    # Older HF checkpoints carry the position_ids buffers: allowed (and checked).
    on_disk["vision_model.embeddings.position_ids"] = np.arange(config.vision.num_tokens)[None]
    on_disk["text_model.embeddings.position_ids"] = np.arange(config.text.context_length)[None]
    path = tmp_path / "model.safetensors"
    save_file(on_disk, str(path))
    loaded_config, loaded = convert.load_clip_checkpoint(path, config)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(loaded)[key], value, err_msg=key)
    # The sizes are read off the shapes; heads and activation are not in the weights.
    detected = convert.detect_clip_config(on_disk)
    assert detected.vision == dataclasses.replace(config.vision, heads=1)  # 64 % 64 == 0 -> 64 // 64 = 1
    assert dataclasses.replace(detected.text, heads=3) == config.text and detected.embed_dim == config.embed_dim
    with pytest.raises(CheckpointError, match=rf"{path}: matches no registered CLIP config .*vision width 64"):
        convert.load_clip_checkpoint(path)
    # Bad position_ids values are refused.
    on_disk["text_model.embeddings.position_ids"] = on_disk["text_model.embeddings.position_ids"][:, ::-1].copy()
    save_file(on_disk, str(path))
    with pytest.raises(CheckpointError, match=r"text_model\.embeddings\.position_ids is not arange\(16\)"):
        convert.load_clip_checkpoint(path, config)


# --- open_clip -----------------------------------------------------------------------------------


def hf_to_open_clip_by_hand(hf: dict[str, np.ndarray], text_prefix: str = "") -> dict[str, np.ndarray]:
    """open_clip's names for a transformers CLIPModel's tensors, written out independently of the
    converter: fused in_proj = cat(q, k, v); conv1 = patch_embedding; proj = visual_projection.T."""
    out = {
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].T,
        text_prefix + "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        text_prefix + "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        text_prefix + "text_projection": hf["text_projection.weight"].T,
        "logit_scale": hf["logit_scale"],
    }
    norms = (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
             (text_prefix + "ln_final", "text_model.final_layer_norm"))
    for ours, theirs in norms:
        for leaf in ("weight", "bias"):
            out[f"{ours}.{leaf}"] = hf[f"{theirs}.{leaf}"]
    for tower, prefix in (("vision_model", "visual."), ("text_model", text_prefix)):
        layers = {int(k.split(".")[3]) for k in hf if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for leaf in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate(
                    [hf[f"{src}self_attn.{n}_proj.{leaf}"] for n in "qkv"], axis=0)
                for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                     ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{dst}{ours}.{leaf}"] = hf[f"{src}{theirs}.{leaf}"]
    return out


def test_open_clip_layout_against_hf_torch(hf_case):
    """The open_clip converter against torch numerics, open_clip itself not needed."""
    config, _, state_dict, images, tokens, want_image, want_text = hf_case
    open_clip_sd = hf_to_open_clip_by_hand(state_dict)
    params = convert.open_clip_to_flax(open_clip_sd, config)
    assert_parity(config, params, images, tokens, want_image, want_text, f"open_clip names {config.activation}")
    # CustomTextCLIP's layout (text tower under `text.`) gives the same params.
    custom = convert.open_clip_to_flax(hf_to_open_clip_by_hand(state_dict, "text."), config)
    jax.tree.map(np.testing.assert_array_equal, custom, params)
    # The renames agree with the hand-written ones, and flax_to_open_clip inverts the conversion.
    assert convert.huggingface_to_open_clip(state_dict, config).keys() == open_clip_sd.keys()
    back = convert.flax_to_open_clip(params)
    assert back.keys() == open_clip_sd.keys()
    for key, value in open_clip_sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def import_open_clip():
    """open_clip.model without its package __init__ (which imports torchvision through open_clip's
    transforms): a bare package module, and a stub for the one torchvision name open_clip.utils
    imports (FrozenBatchNorm2d, used only by freeze_batch_norm_2d), both removed afterwards."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip not installed: pip install --no-deps open-clip-torch==3.3.0")
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    added = {}
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    added["open_clip"] = package
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        if name not in sys.modules:
            added[name] = types.ModuleType(name)
    if "torchvision.ops.misc" in added:
        added["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    saved = {name: sys.modules.get(name) for name in added}
    sys.modules.update(added)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_open_clip_parity(activation, tmp_path):
    open_clip_model = import_open_clip()
    config = small_config(activation)
    v, t = config.vision, config.text
    torch.manual_seed(3)
    model = open_clip_model.CLIP(
        embed_dim=config.embed_dim, quick_gelu=activation == "quick_gelu",
        vision_cfg=open_clip_model.CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads,
                                                 mlp_ratio=v.mlp_ratio, patch_size=v.patch_size,
                                                 image_size=v.image_size),
        text_cfg=open_clip_model.CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size,
                                             width=t.width, heads=t.heads, layers=t.layers, mlp_ratio=t.mlp_ratio),
    ).eval()
    randomize(model, 4)
    images, tokens = make_inputs(config, seed=1)
    with torch.no_grad():
        want_image = model.encode_image(to_nchw(images))
        want_text = model.encode_text(torch.from_numpy(tokens).long())
    path = tmp_path / "open_clip.pth"
    torch.save(model.state_dict(), path)  # read back by the torch-free reader
    loaded_config, params = convert.load_clip_checkpoint(path, config)
    assert loaded_config == config
    assert_parity(config, params, images, tokens, want_image, want_text, f"open_clip {activation}")
    assert float(params["logit_scale"]) == pytest.approx(model.logit_scale.item())


# --- region: masked last-layer attention ---------------------------------------------------------


def make_regions(config: ClipConfig) -> np.ndarray:
    s, p = config.vision.image_size, config.vision.patch_size
    region = np.zeros((BATCH, s, s), bool)
    region[0, p:3 * p, 0:2 * p] = True  # patch-aligned block
    yy, xx = np.mgrid[:s, :s]
    region[1] = (yy - 13) ** 2 + (xx - 19) ** 2 < 30  # a disc cutting patches partly
    region[2, s - 1, 3] = True  # one pixel
    return region


def torch_region_features(model: transformers.CLIPModel, images: np.ndarray, region: np.ndarray, patch: int):
    """HF's vision model with an additive -inf mask on the class token's row in the last layer only."""
    vision = model.vision_model
    inside = F.max_pool2d(torch.from_numpy(region).float()[:, None], patch).flatten(1) > 0  # (B, N)
    length = inside.shape[1] + 1
    mask = torch.zeros(len(region), 1, length, length)
    mask[:, 0, 0, 1:] = torch.where(inside, 0.0, float("-inf"))
    with torch.no_grad():
        h = vision.pre_layrnorm(vision.embeddings(to_nchw(images)))
        for layer in vision.encoder.layers[:-1]:
            h = layer(h, None)
        h = vision.encoder.layers[-1](h, mask)
        return model.visual_projection(vision.post_layernorm(h[:, 0]))


def test_region_against_torch(quick_case):
    config, model, _, params = quick_case
    images, _ = make_inputs(config, seed=2)
    region = make_regions(config)
    want = torch_region_features(model, images, region, config.vision.patch_size)
    got, _ = flax_features(config, params, images, make_inputs(config)[1], region)
    error = rel_err(got, want)
    print(f"[parity] region image features: max-abs relative error {error:.2e}")
    assert error < TOL
    plain, _ = flax_features(config, params, images, make_inputs(config)[1])
    assert rel_err(got, plain) > 1e-3  # the mask does change the embedding
    # The same under jit (region traced: no emptiness check, same numbers).
    jitted = jax.jit(lambda p, x, r: CLIP(config).apply({"params": p}, x, r, normalize=False,
                                                          method=CLIP.encode_image))
    assert rel_err(jitted(params, images, region), want) < TOL


def test_full_region_equals_no_region(quick_case):
    config, _, _, params = quick_case
    images, tokens = make_inputs(config, seed=3)
    s, p = config.vision.image_size, config.vision.patch_size
    full = np.ones((BATCH, s, s), bool)
    one_pixel_per_patch = np.zeros((BATCH, s, s), bool)
    one_pixel_per_patch[:, p - 1::p, ::p] = True  # every patch touched
    plain, _ = flax_features(config, params, images, tokens)
    for region in (full, one_pixel_per_patch):
        masked, _ = flax_features(config, params, images, tokens, region)
        assert rel_err(masked, plain) < 1e-6


# --- bad inputs ----------------------------------------------------------------------------------


def test_checkpoint_errors(quick_case, tmp_path):
    config, _, state_dict, _ = quick_case
    key = "vision_model.encoder.layers.1.self_attn.k_proj.weight"

    missing = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(CheckpointError, match=rf"missing keys {key}$"):
        convert.huggingface_clip_to_flax(missing, config)

    extra = {**state_dict, "text_model.pooler.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected keys text_model\.pooler\.weight"):
        convert.huggingface_clip_to_flax(extra, config)

    misshapen = {**state_dict, key: np.zeros((64, 32), np.float32)}
    with pytest.raises(CheckpointError, match=rf"misshapen {key} \(64, 32\) \(needs \(64, 64\)\)"):
        convert.huggingface_clip_to_flax(misshapen, config)

    nan = {**state_dict, key: np.full((64, 64), np.nan, np.float32)}
    with pytest.raises(CheckpointError, match=rf"{key} holds 4096 NaN"):
        convert.huggingface_clip_to_flax(nan, config)

    # Another model's checkpoint: the differing dimensions are named.
    with pytest.raises(CheckpointError) as err:
        convert.huggingface_clip_to_flax(state_dict, CLIP_CONFIGS["tiny"])
    message = str(err.value)
    assert "vision image size 32 in the checkpoint, 64 in config tiny" in message
    assert "text width 48 in the checkpoint, 64 in config tiny" in message
    assert "\n" not in message

    # open_clip layout: the same strictness, in open_clip's names.
    open_clip_sd = hf_to_open_clip_by_hand(state_dict)
    del open_clip_sd["visual.ln_post.bias"]
    with pytest.raises(CheckpointError, match=r"open_clip CLIP state dict .*missing keys visual\.ln_post\.bias"):
        convert.open_clip_to_flax(open_clip_sd, config)

    # Through a file: the message starts with its path.
    path = tmp_path / "broken.safetensors"
    save_file(missing, str(path))
    with pytest.raises(CheckpointError, match=rf"^{path}: huggingface CLIP state dict does not fit config "
                                              rf"small_quick_gelu: missing keys {key}$"):
        convert.load_clip_checkpoint(path, config)
    not_clip = tmp_path / "not_clip.safetensors"
    save_file({"image_encoder.pos_embed": np.zeros(2, np.float32)}, str(not_clip))
    with pytest.raises(CheckpointError, match=rf"^{not_clip}: not a CLIP checkpoint"):
        convert.load_clip_checkpoint(not_clip)
    with pytest.raises(CheckpointError, match=rf"^{path}: unknown CLIP config 'vit_h'"):
        convert.load_clip_checkpoint(path, "vit_h")


def test_input_errors(quick_case):
    config, _, _, params = quick_case
    model = CLIP(config)
    images, tokens = make_inputs(config)
    encode_image = lambda x, r=None: model.apply({"params": params}, x, r, method=CLIP.encode_image)
    encode_text = lambda t: model.apply({"params": params}, t, method=CLIP.encode_text)

    with pytest.raises(ValueError, match=r"images must be \(B, 32, 32, 3\).*got shape \(3, 30, 30, 3\)"):
        encode_image(images[:, :30, :30])
    with pytest.raises(ValueError, match=r"images must be \(B, 32, 32, 3\).*got shape \(3, 3, 32, 32\)"):
        encode_image(images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"images must be float .*uint8"):
        encode_image(images.astype(np.uint8))
    region = make_regions(config)
    with pytest.raises(ValueError, match=r"region must be a \(B, H, W\) = \(3, 32, 32\) boolean .*shape \(2, 32, 32\)"):
        encode_image(images, region[:2])
    with pytest.raises(ValueError, match=r"region must be a boolean mask .*float32"):
        encode_image(images, region.astype(np.float32))
    region[1] = False
    with pytest.raises(ValueError, match=r"region is empty .*batch element\(s\) \[1\]"):
        encode_image(images, region)
    with pytest.raises(ValueError, match=r"tokens must be \(B, L\) .*context_length 16.*got shape \(3, 17\)"):
        encode_text(np.zeros((3, 17), np.int32))
    with pytest.raises(ValueError, match=r"tokens must be integer .*float32"):
        encode_text(tokens.astype(np.float32))
    with pytest.raises(ValueError, match=r"ids outside \[0, 49408\)"):
        encode_text(np.full((1, 4), 49408, np.int32))
    # Shorter texts than the context are fine (open_clip and HF allow them too).
    assert encode_text(tokens[:, :10]).shape == (BATCH, config.embed_dim)


def test_preprocess():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    want = (pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(preprocess(pixels, 16), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(preprocess(pixels.astype(np.float32)), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be 32x32 .*got shape \(2, 16, 16, 3\)"):
        preprocess(pixels, 32)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) RGB; got shape \(16, 16, 3\)"):
        preprocess(pixels[0])


# --- full size, shapes only ----------------------------------------------------------------------


def test_vit_l14_336_shapes_from_huggingface():
    """Flax's ViT-L/14@336 params (jax.eval_shape of init) against the shapes of transformers'
    openai/clip-vit-large-patch14-336 architecture, built on torch's meta device (no memory)."""
    hf_config = transformers.CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768,
    )
    with torch.device("meta"):
        state_dict = transformers.CLIPModel(hf_config).state_dict()
    config = CLIP_CONFIGS["vit_l14_336"]
    assert convert.detect_clip_config(state_dict) == config
    assert convert.check_clip_state_dict(state_dict, config) == convert.HUGGINGFACE  # every key and shape
    with pytest.raises(CheckpointError, match="vision width 1024 in the checkpoint, 768 in config vit_b16"):
        convert.check_clip_state_dict(state_dict, CLIP_CONFIGS["vit_b16"])
