"""open_clip and Hugging Face CLIP state dicts -> `sam_jax.clip.model.CLIP` Flax params. No torch.

Command line: a CLIP checkpoint file (or Hugging Face model folder) -> a sam_jax CLIP checkpoint
folder (`sam_jax.clip.save_clip`), the text encoder of SAM's text prompts:

    python -m checkpoints_convert.clip open_clip_pytorch_model.bin converted/clip_l14_336
    python -m checkpoints_convert.clip path/to/openai-clip-vit-large-patch14-336/ converted/clip --config vit_l14_336

(also `sam-jax convert-clip`). Without --config the checkpoint's shapes must be a registered config's.

The Flax modules are named after open_clip's state dict, so an open_clip key is a fixed rename of a
Flax param path and the value is copied or transposed:

    visual/transformer/resblocks_3/attn/in_proj/kernel  visual.transformer.resblocks.3.attn.in_proj_weight  .T
    visual/transformer/resblocks_3/mlp/c_fc/kernel      visual.transformer.resblocks.3.mlp.c_fc.weight      .T
    visual/conv1/kernel (p, p, 3, W)                    visual.conv1.weight (W, 3, p, p)
    visual/ln_pre/scale                                 visual.ln_pre.weight
    text/token_embedding/embedding                      token_embedding.weight
    text/transformer/resblocks_0/ln_1/bias              transformer.resblocks.0.ln_1.bias
    visual/proj, text/text_projection, logit_scale      visual.proj, text_projection, logit_scale

(open_clip's `CLIP` keeps the text tower at the top level; `CustomTextCLIP` under `text.`; both
are read.) A Hugging Face `transformers.CLIPModel` holds the same tensors under other names, with
separate q/k/v projections (concatenated here into the fused in_proj, rows q, k, v) and the two
projections as Linear weights (transposed): `visual_projection.weight` = `visual.proj`.T.

Conversion is strict: every tensor used once, every param filled with its shape, or one
`CheckpointError` line naming the file, the missing / unexpected / misshapen keys and, when the
checkpoint is simply another model, the dimensions that differ. Head counts and the activation are
not in the weights: they come from the config.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from checkpoints_convert.convert import command_main, resolve_weights_file
from checkpoints_convert.official import to_flax_array, to_torch_array  # Linear transposed, conv1 to HWIO
from checkpoints_convert.pth_reader import load_state_dict
from sam_jax.clip.configs import CLIP_CONFIGS, ClipConfig, ClipTextConfig, ClipVisionConfig, get_clip_config
from sam_jax.clip.model import abstract_clip_params
from sam_jax.errors import CheckpointError
from sam_jax.tree_paths import flatten, list_keys, unflatten

OPEN_CLIP = "open_clip"
HUGGINGFACE = "huggingface"

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_BLOCK = re.compile(r"resblocks_(\d+)")
_WB = r"(weight|bias)"

# OpenAI's original checkpoints carry these ints beside the tensors (open_clip drops them).
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
# Buffers some Hugging Face checkpoints carry: arange(n)[None], checked and dropped.
_HF_POSITION_IDS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


# --- names --------------------------------------------------------------------------------------


def open_clip_key(flax_path: str, text_prefix: str = "") -> str:
    """Flax param path -> open_clip state dict key; `text_prefix` "" (CLIP) or "text." (CustomTextCLIP)."""
    parts = flax_path.split("/")
    if parts[0] == "text":
        parts = ([text_prefix.rstrip(".")] if text_prefix else []) + parts[1:]
    if parts[-2:] == ["in_proj", "kernel"]:
        parts[-2:] = ["in_proj_weight"]
    elif parts[-2:] == ["in_proj", "bias"]:
        parts[-2:] = ["in_proj_bias"]
    elif parts[-1] in _LEAF_TO_TORCH:
        parts[-1] = _LEAF_TO_TORCH[parts[-1]]
    out = []
    for part in parts:
        match = _BLOCK.fullmatch(part)
        out.extend(("resblocks", match.group(1)) if match else (part,))
    return ".".join(out)


def _torch_shape(flax_path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_torch_array(flax_path, np.empty(shape, np.bool_)).shape


def _flax_paths_by_key(config: ClipConfig, text_prefix: str = "") -> dict[str, tuple[str, tuple[int, ...]]]:
    """{open_clip key: (Flax path, Flax shape)} for `CLIP(config)`."""
    shapes = flatten(abstract_clip_params(config))
    return {open_clip_key(p, text_prefix): (p, tuple(s.shape)) for p, s in shapes.items()}


def open_clip_shapes(config: ClipConfig, text_prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{open_clip key: torch shape} that `config` needs (read off `CLIP(config)`'s params)."""
    return {k: _torch_shape(p, s) for k, (p, s) in _flax_paths_by_key(config, text_prefix).items()}


# open_clip key (text at the top level) -> Hugging Face key, for the one-to-one tensors.
_TO_HF_RULES = [
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\." + _WB, r"vision_model.pre_layrnorm.\1"),
    (r"visual\.ln_post\." + _WB, r"vision_model.post_layernorm.\1"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\." + _WB, r"text_model.final_layer_norm.\1"),
    (r"logit_scale", "logit_scale"),
]
_TO_HF_COMPILED = [(re.compile(p), r) for p, r in _TO_HF_RULES]
_TO_HF_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_OC_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def huggingface_keys(oc_key: str) -> tuple[str, tuple[str, ...]]:
    """How an open_clip key (text at the top level) is made from Hugging Face keys:
    ("copy", (key,)), ("transpose", (key,)) or ("concat", (q, k, v))."""
    if oc_key in _TO_HF_TRANSPOSED:
        return "transpose", (_TO_HF_TRANSPOSED[oc_key],)
    match = _OC_BLOCK.fullmatch(oc_key)
    if match:
        tower = "vision_model" if match.group(1) else "text_model"
        prefix, rest = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = rest.rsplit("_", 1)[1]
            return "concat", tuple(f"{prefix}self_attn.{n}_proj.{leaf}" for n in "qkv")
        module, leaf = rest.rsplit(".", 1)
        if module in _BLOCK_PARTS:
            return "copy", (f"{prefix}{_BLOCK_PARTS[module]}.{leaf}",)
    for pattern, replacement in _TO_HF_COMPILED:
        if pattern.fullmatch(oc_key):
            return "copy", (pattern.sub(replacement, oc_key),)
    raise KeyError(f"no Hugging Face name for open_clip key {oc_key!r}")


def huggingface_shapes(config: ClipConfig) -> dict[str, tuple[int, ...]]:
    """{Hugging Face CLIPModel key: shape} that `config` needs (position_ids buffers not included)."""
    out = {}
    for oc_key, shape in open_clip_shapes(config).items():
        kind, keys = huggingface_keys(oc_key)
        if kind == "concat":
            out.update({k: (shape[0] // 3, *shape[1:]) for k in keys})
        else:
            out[keys[0]] = tuple(reversed(shape)) if kind == "transpose" else shape
    return out


# --- layout and config detection ----------------------------------------------------------------


def clip_layout(state_dict: Mapping[str, Any]) -> str:
    """OPEN_CLIP or HUGGINGFACE, by the keys; CheckpointError when neither."""
    keys = list(state_dict)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return HUGGINGFACE
    if any(k.startswith("visual.") for k in keys):
        return OPEN_CLIP
    raise CheckpointError(
        f"not a CLIP checkpoint: no open_clip keys (visual.conv1.weight, ...) nor Hugging Face keys "
        f"(vision_model.embeddings.patch_embedding.weight, ...); keys: {list_keys(keys, limit=5)}")


def _text_prefix(state_dict: Mapping[str, Any]) -> str:
    """"text." for open_clip's CustomTextCLIP layout, "" for CLIP."""
    return "text." if "text.token_embedding.weight" in state_dict else ""


def _probes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The keys whose shapes give the config, and the block-key patterns, for this layout."""
    if clip_layout(state_dict) == HUGGINGFACE:
        return dict(
            conv="vision_model.embeddings.patch_embedding.weight",
            vpos="vision_model.embeddings.position_embedding.weight",
            vproj=("visual_projection.weight", True), vfc="vision_model.encoder.layers.0.mlp.fc1.weight",
            vblocks=r"vision_model\.encoder\.layers\.(\d+)\.",
            tok="text_model.embeddings.token_embedding.weight",
            tpos="text_model.embeddings.position_embedding.weight",
            tproj=("text_projection.weight", True), tfc="text_model.encoder.layers.0.mlp.fc1.weight",
            tblocks=r"text_model\.encoder\.layers\.(\d+)\.",
        )
    tp = _text_prefix(state_dict)
    return dict(
        conv="visual.conv1.weight", vpos="visual.positional_embedding", vproj=("visual.proj", False),
        vfc="visual.transformer.resblocks.0.mlp.c_fc.weight", vblocks=r"visual\.transformer\.resblocks\.(\d+)\.",
        tok=tp + "token_embedding.weight", tpos=tp + "positional_embedding", tproj=(tp + "text_projection", False),
        tfc=tp + "transformer.resblocks.0.mlp.c_fc.weight", tblocks=re.escape(tp) + r"transformer\.resblocks\.(\d+)\.",
    )


def _shape(state_dict: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"not a complete CLIP checkpoint: no tensor {key!r}")
    shape = tuple(int(n) for n in state_dict[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"not a CLIP checkpoint: {key!r} has shape {shape}, not {ndim} nonzero dims")
    return shape


def _count_blocks(state_dict: Mapping[str, Any], pattern: str) -> int:
    ids = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def _default_heads(width: int) -> int:
    return width // 64 if width % 64 == 0 else 1  # OpenAI's head width of 64


def _shape_fields(config: ClipConfig) -> dict[str, int]:
    """What of a config the weights show, by the names errors use."""
    v, t = config.vision, config.text
    return {
        "embed dim": config.embed_dim, "vision image size": v.image_size, "vision patch size": v.patch_size,
        "vision width": v.width, "vision layers": v.layers, "vision MLP dim": v.mlp_dim,
        "text context length": t.context_length, "text vocab size": t.vocab_size, "text width": t.width,
        "text layers": t.layers, "text MLP dim": t.mlp_dim,
    }


def detect_clip_config(state_dict: Mapping[str, Any]) -> ClipConfig:
    """The config whose shapes this open_clip or Hugging Face state dict has (only `.shape` is read).

    A registered config (`CLIP_CONFIGS`) of the same shapes is returned as is, with its heads and
    activation; otherwise a new config named "custom" with OpenAI's conventions (heads = width / 64,
    QuickGELU), which may need changing: neither is visible in the weights. Note a checkpoint
    trained with GELU at a registered model's shapes is still given that config's activation.
    """
    probe = _probes(state_dict)
    width, _, patch, patch_w = _shape(state_dict, probe["conv"], 4)
    tokens, _ = _shape(state_dict, probe["vpos"], 2)
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid != tokens - 1 or patch != patch_w:
        raise CheckpointError(f"not a square ViT CLIP: {probe['vpos']!r} has {tokens} positions and "
                              f"{probe['conv']!r} a {patch}x{patch_w} patch")
    key, transposed = probe["vproj"]
    embed_dim = _shape(state_dict, key, 2)[0 if transposed else 1]
    vocab, text_width = _shape(state_dict, probe["tok"], 2)
    context = _shape(state_dict, probe["tpos"], 2)[0]
    key, transposed = probe["tproj"]
    text_embed = _shape(state_dict, key, 2)[0 if transposed else 1]
    if text_embed != embed_dim:
        raise CheckpointError(f"not a CLIP checkpoint: image projection to {embed_dim} dims, text to {text_embed}")
    vision = dict(image_size=grid * patch, patch_size=patch, width=width,
                  layers=_count_blocks(state_dict, probe["vblocks"]),
                  mlp_ratio=_shape(state_dict, probe["vfc"], 2)[0] / width)
    text = dict(width=text_width, layers=_count_blocks(state_dict, probe["tblocks"]), context_length=context,
                vocab_size=vocab, mlp_ratio=_shape(state_dict, probe["tfc"], 2)[0] / text_width)
    found = ClipConfig("custom", embed_dim, ClipVisionConfig(heads=_default_heads(width), **vision),
                       ClipTextConfig(heads=_default_heads(text_width), **text))
    for config in CLIP_CONFIGS.values():
        if _shape_fields(config) == _shape_fields(found):
            return config
    return found


def _config_differences(state_dict: Mapping[str, Any], config: ClipConfig) -> list[str]:
    """["vision width 768 in the checkpoint, 1024 in config vit_l14_336", ...]; [] if undetectable."""
    try:
        found = _shape_fields(detect_clip_config(state_dict))
    except CheckpointError:
        return []
    want = _shape_fields(config)
    return [f"{name} {found[name]} in the checkpoint, {want[name]} in config {config.name}"
            for name in want if found[name] != want[name]]


# --- strict checks ------------------------------------------------------------------------------


def _expected(state_dict: Mapping[str, Any], config: ClipConfig, layout: str):
    """({required key: shape}, {optional key: shape}) of this layout for `config`."""
    if layout == HUGGINGFACE:
        optional = {_HF_POSITION_IDS[0]: (1, config.vision.num_tokens),
                    _HF_POSITION_IDS[1]: (1, config.text.context_length)}
        return huggingface_shapes(config), optional
    return open_clip_shapes(config, _text_prefix(state_dict)), {k: () for k in _OPENAI_METADATA}


def check_clip_state_dict(state_dict: Mapping[str, Any], config: ClipConfig, source: str = "checkpoint") -> str:
    """Raises CheckpointError unless `state_dict` holds exactly the tensors `config` needs, with
    their shapes (only `.shape` is read); returns its layout (OPEN_CLIP or HUGGINGFACE)."""
    try:
        layout = clip_layout(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    required, optional = _expected(state_dict, config, layout)
    missing = required.keys() - state_dict.keys()
    extra = state_dict.keys() - required.keys() - optional.keys()
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} (needs {shape})"
        for k, shape in {**required, **optional}.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {list_keys(missing, limit=5)}")
    if extra:
        problems.append(f"unexpected keys {list_keys(extra, limit=5)}")
    if misshapen:
        problems.append(f"misshapen {list_keys(misshapen, limit=5)}")
    if problems:
        problems = _config_differences(state_dict, config) + problems
        raise CheckpointError(f"{source}: {layout} CLIP state dict does not fit config {config.name}: "
                              + "; ".join(problems))
    return layout


def _check_values(state_dict: Mapping[str, Any], keys, config: ClipConfig, source: str) -> None:
    """Floating, finite tensors; position_ids / OpenAI metadata equal to what the config implies."""
    problems = []
    for key in keys:
        array = np.asarray(state_dict[key])
        if not jax.dtypes.issubdtype(array.dtype, np.floating):
            problems.append(f"{key} is {array.dtype}, not floating point")
        elif (bad := array.size - int(np.isfinite(array.astype(np.float32)).sum())):
            problems.append(f"{key} holds {bad} NaN or infinite value{'s' * (bad > 1)}")
    for key in _HF_POSITION_IDS:
        if key in state_dict:
            ids = np.asarray(state_dict[key])
            if not (jax.dtypes.issubdtype(ids.dtype, np.integer) and np.array_equal(ids[0], np.arange(ids.shape[1]))):
                problems.append(f"{key} is not arange({ids.shape[1]}) (dtype {ids.dtype})")
    metadata = {"input_resolution": config.vision.image_size, "context_length": config.text.context_length,
                "vocab_size": config.text.vocab_size}
    for key, want in metadata.items():
        if key in state_dict and np.asarray(state_dict[key]).item() != want:
            problems.append(f"{key} is {np.asarray(state_dict[key]).item()}, config {config.name} has {want}")
    if problems:
        raise CheckpointError(f"{source}: " + list_keys(problems, limit=4))


# --- conversion ---------------------------------------------------------------------------------


def open_clip_to_flax(state_dict: Mapping[str, np.ndarray], config: ClipConfig,
                      source: str = "checkpoint") -> dict[str, Any]:
    """Strictly converts an open_clip CLIP (or CustomTextCLIP) state dict (numpy arrays) to the
    params of `CLIP(config)`, fp32. CheckpointError if anything is missing, extra or misshapen."""
    if check_clip_state_dict(state_dict, config, source) != OPEN_CLIP:
        raise CheckpointError(f"{source}: a Hugging Face CLIP state dict; use huggingface_clip_to_flax")
    by_key = _flax_paths_by_key(config, _text_prefix(state_dict))
    _check_values(state_dict, by_key, config, source)
    return unflatten({
        path: np.array(to_flax_array(path, np.asarray(state_dict[key])), dtype=np.float32, order="C")  # 0-d stays 0-d
        for key, (path, _) in by_key.items()
    })


def huggingface_to_open_clip(state_dict: Mapping[str, np.ndarray], config: ClipConfig,
                             source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Strictly renames a `transformers.CLIPModel` state dict to open_clip's CLIP keys: q/k/v
    concatenated into in_proj, the projections transposed, position_ids checked and dropped."""
    if check_clip_state_dict(state_dict, config, source) != HUGGINGFACE:
        raise CheckpointError(f"{source}: an open_clip CLIP state dict; use open_clip_to_flax")
    _check_values(state_dict, huggingface_shapes(config), config, source)
    out = {}
    for oc_key in open_clip_shapes(config):
        kind, keys = huggingface_keys(oc_key)
        arrays = [np.asarray(state_dict[k]) for k in keys]
        out[oc_key] = (np.concatenate(arrays, axis=0) if kind == "concat"
                       else arrays[0].T if kind == "transpose" else arrays[0])
    return out


def huggingface_clip_to_flax(state_dict: Mapping[str, np.ndarray], config: ClipConfig,
                             source: str = "checkpoint") -> dict[str, Any]:
    """Strictly converts a `transformers.CLIPModel` state dict (numpy arrays) to `CLIP(config)` params."""
    return open_clip_to_flax(huggingface_to_open_clip(state_dict, config, source), config, source)


def flax_to_open_clip(params: Mapping[str, Any], text_prefix: str = "") -> dict[str, np.ndarray]:
    """`CLIP` params -> open_clip CLIP state dict (numpy, fp32), the inverse of `open_clip_to_flax`."""
    return {open_clip_key(p, text_prefix): np.array(to_torch_array(p, np.asarray(a)), order="C")
            for p, a in flatten(params).items()}


def load_clip_checkpoint(path: Union[str, os.PathLike], config: Optional[Union[ClipConfig, str]] = None,
                         ) -> tuple[ClipConfig, dict[str, Any]]:
    """Reads an open_clip or Hugging Face CLIP checkpoint (.pth / .pt / .bin / .safetensors) without
    torch; returns (config, params for `CLIP(config)`).

    The layout is told by the keys; a DistributedDataParallel `module.` prefix on every key is
    dropped. Without `config`, the checkpoint's shapes must match a registered config (see
    `detect_clip_config`); with one (a ClipConfig or a registered name), they must match it.
    Raises CheckpointError, one line naming the file, for anything else.
    """
    source = os.fspath(path)
    state_dict = load_state_dict(source)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    try:
        layout = clip_layout(state_dict)
        if config is None:
            config = detect_clip_config(state_dict)
            if config.name not in CLIP_CONFIGS:
                fields = ", ".join(f"{k} {v}" for k, v in _shape_fields(config).items())
                raise CheckpointError(f"matches no registered CLIP config ({fields}); pass a ClipConfig "
                                      f"(e.g. detect_clip_config(state_dict) with its heads and activation)")
        elif isinstance(config, str):
            try:
                config = get_clip_config(config)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
    except CheckpointError as err:  # these name keys, not the file
        raise CheckpointError(f"{source}: {err}") from None
    convert = huggingface_clip_to_flax if layout == HUGGINGFACE else open_clip_to_flax
    return config, convert(state_dict, config, source)


# --- command line -------------------------------------------------------------------------------

DESCRIPTION = ("Converts open_clip or Hugging Face CLIP weights (.pth / .pt / .bin / .safetensors, or a Hugging "
               "Face model folder) into a new sam_jax CLIP checkpoint folder, the text encoder of text prompts. "
               "The config is read off the tensor shapes (or given with --config); the folder appears only "
               "when conversion succeeded. No torch needed.")


def convert_clip_checkpoint(source: Union[str, os.PathLike], output: Union[str, os.PathLike],
                            config: Optional[Union[ClipConfig, str]] = None) -> ClipConfig:
    """Converts the CLIP checkpoint `source` into a new sam_jax CLIP checkpoint folder `output`
    (`sam_jax.clip.checkpoint.save_clip`); returns its config."""
    from sam_jax.clip.checkpoint import save_clip

    source, output = Path(source), Path(output)
    if output.exists():
        raise CheckpointError(f"{output} already exists; choose a new output directory")
    weights_file = resolve_weights_file(source)
    config, params = load_clip_checkpoint(weights_file, config)
    save_clip(output, params, config, source=f"clip:{weights_file.name}")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (this module's `main` and `sam-jax convert-clip` share them)."""
    parser.add_argument("source", help="open_clip or HF CLIP .pth/.pt/.bin/.safetensors, or an HF model directory")
    parser.add_argument("output", help="new directory for the converted CLIP checkpoint")
    parser.add_argument("--config", choices=sorted(CLIP_CONFIGS),
                        help="the CLIP config (default: the registered one of the checkpoint's shapes)")


def run(args: argparse.Namespace) -> int:
    """Converts as `args` say and prints one line; errors propagate (CheckpointError, OSError)."""
    start = time.perf_counter()
    config = convert_clip_checkpoint(args.source, args.output, args.config)
    print(f"converted {args.source} (CLIP {config.name}, embed_dim {config.embed_dim}) -> {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return command_main("python -m checkpoints_convert.clip", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
