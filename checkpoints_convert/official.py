"""Official segment-anything state_dict <-> sam_jax Flax params.

The Flax modules are named after the PyTorch state_dict, so each Flax param
path maps to one PyTorch key by a fixed rule:
  image_encoder/blocks_3/attn/qkv/kernel -> image_encoder.blocks.3.attn.qkv.weight
(`name_N` -> `name.N`; leaf kernel/scale/embedding -> weight) and one of
three transforms: Dense kernels are transposed, conv and transposed-conv
kernels go (A, B, kh, kw) -> (kh, kw, B, A), everything else is copied.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from sam_jax.tree_paths import flatten, list_keys, unflatten
from sam_jax.weights import abstract_params, check_values
from sam_jax.configs import CONFIGS, ImageEncoderConfig, SamConfig
from sam_jax.errors import CheckpointError

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(flax_path: str) -> str:
    """Looped-layout Flax param path -> official state_dict key."""
    *modules, leaf = flax_path.split("/")
    parts = []
    for m in modules:
        match = _INDEXED.match(m)
        parts.extend(match.groups() if match else (m,))
    parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
    return ".".join(parts)


def to_flax_array(flax_path: str, tensor: np.ndarray) -> np.ndarray:
    """The official tensor for `flax_path`, in the Flax layout."""
    if flax_path.endswith("/kernel"):
        if tensor.ndim == 2:  # Linear (out, in) -> (in, out)
            return tensor.T
        if tensor.ndim == 4:  # Conv (O, I, kh, kw) / ConvTranspose (I, O, kh, kw)
            return tensor.transpose(2, 3, 1, 0)
    return tensor


def to_torch_array(flax_path: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax_array`."""
    if flax_path.endswith("/kernel"):
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
    return array


def _shape(state_dict: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"not a SAM checkpoint: no tensor {key!r}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"not a SAM checkpoint: tensor {key!r} has shape {shape}, not {ndim} nonzero dims")
    return shape


def detect_config(state_dict: Mapping[str, np.ndarray]) -> SamConfig:
    """The registered config whose shapes this official state_dict has."""
    embed_dim, _, patch, _ = _shape(state_dict, "image_encoder.patch_embed.proj.weight", 4)
    grid = _shape(state_dict, "image_encoder.pos_embed", 4)[1]
    block_ids = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
    }
    depth = max(block_ids) + 1 if block_ids else 0
    rel_rows, head_dim = _shape(state_dict, "image_encoder.blocks.0.attn.rel_pos_h", 2)
    global_idx = tuple(
        i for i in range(depth)
        if _shape(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2)[0] == 2 * grid - 1
    )
    window = (rel_rows + 1) // 2 if 0 not in global_idx else 14
    found = ImageEncoderConfig(
        embed_dim, depth, embed_dim // head_dim, global_idx,
        image_size=grid * patch, patch_size=patch, window_size=window,
        out_chans=_shape(state_dict, "image_encoder.neck.0.weight", 4)[0],
    )
    for config in CONFIGS.values():
        if config.encoder == found:
            return config
    raise CheckpointError(
        f"checkpoint matches no known model type: embed_dim={embed_dim}, depth={depth}, "
        f"heads={found.num_heads}, global blocks={list(global_idx)}, image_size={found.image_size}"
    )


def official_to_flax(
    state_dict: Mapping[str, np.ndarray], config: SamConfig, source: str = "checkpoint"
) -> dict[str, Any]:
    """Strictly converts an official state_dict to looped-layout Flax params.

    Every tensor is used exactly once and every param filled with the right
    shape, or CheckpointError lists what is missing, extra or misshapen.
    """
    expected = flatten(abstract_params(config))
    wanted = {torch_key(path): path for path in expected}
    missing = wanted.keys() - state_dict.keys()
    extra = state_dict.keys() - wanted.keys()
    problems = []
    if missing:
        problems.append(f"missing {list_keys(missing)}")
    if extra:
        problems.append(f"unexpected {list_keys(extra)}")
    flat = {}
    for key, path in wanted.items():
        if key in missing:
            continue
        array = to_flax_array(path, np.asarray(state_dict[key]))
        if array.shape != expected[path].shape:
            problems.append(
                f"{key} has shape {tuple(state_dict[key].shape)}, {config.name} needs "
                f"{tuple(to_torch_array(path, np.empty(expected[path].shape)).shape)}"
            )
            continue
        flat[path] = np.ascontiguousarray(array, dtype=np.float32)
    if problems:
        raise CheckpointError(f"{source} does not fit {config.name}: " + "; ".join(problems))
    check_values({key: state_dict[key] for key in wanted}, source)
    return unflatten(flat)


def flax_to_official(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Looped-layout Flax params -> official state_dict (numpy), the inverse map."""
    return {torch_key(p): np.asarray(to_torch_array(p, np.asarray(a))) for p, a in flatten(params).items()}
