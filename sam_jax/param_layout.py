"""The two layouts of the encoder's block params, and conversion between them.

- "looped": `image_encoder/blocks_{i}/...`, one subtree per block (the
  official order; what the converter writes).
- "scanned": `image_encoder/block_groups/blocks_{j}/...` with a leading
  axis of length `num_groups`, for `Sam(scan_blocks=True)`: block
  `i = group * blocks_per_group + j`.

Saved params record their layout (see `sam_jax.checkpoint`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_jax.configs import SamConfig

LOOPED = "looped"
SCANNED = "scanned"
LAYOUTS = (LOOPED, SCANNED)

Params = dict[str, Any]


def layout_of(params: Params) -> str:
    encoder = params["image_encoder"]
    return SCANNED if "block_groups" in encoder else LOOPED


def _tree_map(fn, *trees):
    if isinstance(trees[0], dict):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def to_scanned(params: Params, config: SamConfig) -> Params:
    """Looped -> scanned: stacks block `g * blocks_per_group + j` at `[g]` of `blocks_{j}`."""
    if layout_of(params) == SCANNED:
        return params
    enc_cfg = config.encoder
    if not enc_cfg.is_periodic():
        raise ValueError(f"{config.name}: global blocks {enc_cfg.global_attn_indexes} do not scan")
    encoder = dict(params["image_encoder"])
    g = enc_cfg.blocks_per_group
    groups = len(enc_cfg.global_attn_indexes)
    blocks = [encoder.pop(f"blocks_{i}") for i in range(enc_cfg.depth)]
    encoder["block_groups"] = {
        f"blocks_{j}": _tree_map(lambda *xs: np.stack(xs), *blocks[j::g][:groups]) for j in range(g)
    }
    return {**params, "image_encoder": encoder}


def to_looped(params: Params, config: SamConfig) -> Params:
    """Scanned -> looped: the inverse of `to_scanned`."""
    if layout_of(params) == LOOPED:
        return params
    encoder = dict(params["image_encoder"])
    stacked = encoder.pop("block_groups")
    g = config.encoder.blocks_per_group
    for i in range(config.encoder.depth):
        group, j = divmod(i, g)
        encoder[f"blocks_{i}"] = _tree_map(lambda x: np.asarray(x[group]), stacked[f"blocks_{j}"])
    return {**params, "image_encoder": encoder}


def to_layout(params: Params, config: SamConfig, layout: str) -> Params:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown param layout {layout!r}; choose one of {LAYOUTS}")
    return to_scanned(params, config) if layout == SCANNED else to_looped(params, config)
