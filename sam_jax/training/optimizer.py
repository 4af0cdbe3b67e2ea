"""SAM's optimizer recipe in optax: AdamW, layer-wise lr decay, warmup + step decay.

`make_optimizer(config, params, model_config)` builds, for the trainable params,

    [clip_by_global_norm] -> adamw(schedule, weight-decay mask) -> scale_by_layer

and gives every frozen param exactly zero updates and no optimizer state
(`optax.multi_transform` with `optax.set_to_zero()`). Conventions:

- Schedule: linear warmup from 0 (lr(0) = 0, so the first update is zero, as
  `optax.linear_schedule`), lr(warmup_steps) = learning_rate, then lr is divided
  by `decay_factor` at every boundary in `decay_steps`: a step `s >= boundary`
  already uses the lower lr (the step count is optax's: updates applied so far).
- Layer-wise lr decay (BEiT/MAE/ViTDet `get_vit_lr_decay_rate`): patch_embed and
  pos_embed are layer 0, encoder block i is layer i + 1, everything else (neck,
  prompt encoder, mask decoder) is layer depth + 1; the lr of layer id is scaled
  by layer_decay ** (depth + 1 - id). The scale multiplies the whole AdamW update,
  weight-decay term included, as a per-param-group lr does in PyTorch.
- Weight decay by leaf name (never by ndim: scanned biases and norm scales are
  2-D): `kernel` and `embedding` decay; `bias`, `scale` (norms), `pos_embed`,
  `rel_pos_h`/`rel_pos_w` do not. Embedding tables (mask/IoU tokens, point,
  not-a-point and no-mask embeddings) ARE decayed, as in SAM 2's released
  training configs, which exempt only biases and LayerNorm params.
- `positional_encoding_gaussian_matrix` is a `register_buffer` in the official
  PositionEmbeddingRandom (fixed random frequencies, never trained); it is a
  param here only so that loading is strict, so it is always frozen.
- Gradient clipping sees only trainable params: frozen gradients neither count
  towards the global norm nor get clipped.
- Params must be float32 (bf16 compute is `Sam(dtype=jnp.bfloat16)`); AdamW's
  mu/nu take the params' dtype, so the optimizer state is float32 too.

Fine-tuning the decoder only: `OptimizerConfig(freeze_image_encoder=True)` on
params from `sam_jax.load_sam`. The encoder's gradients are then
unused; compute the image embeddings under `jax.lax.stop_gradient` (or outside
the differentiated function) so they are not computed at all. Training only some
modules: `OptimizerConfig(trainable=("mask_decoder/iou_prediction_head",))` (param path
prefixes; every other param frozen); `encoder_frozen` says whether the encoder then
trains at all.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_jax.configs import SamConfig
from sam_jax.tree_paths import Path, path_names

TRAINABLE = "trainable"
FROZEN = "frozen"

DECAYED_LEAVES = frozenset({"kernel", "embedding"})  # Dense/Conv kernels, nn.Embed tables
UNDECAYED_LEAVES = frozenset({"bias", "scale", "pos_embed", "rel_pos_h", "rel_pos_w"})
BUFFERS = frozenset({"positional_encoding_gaussian_matrix"})  # never updated

_BLOCK = re.compile(r"blocks_(\d+)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + step decay; the defaults are the paper's ViT-H recipe."""

    learning_rate: float = 8e-4  # peak lr, after warmup
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # torch.optim.AdamW's default
    weight_decay: float = 0.1  # decoupled (AdamW), times the scheduled lr
    warmup_steps: int = 250  # linear from 0
    decay_steps: tuple[int, ...] = (60_000, 86_666)  # lr /= decay_factor at each
    decay_factor: float = 10.0
    total_steps: Optional[int] = 90_000  # for the training loop; decay_steps must lie before it
    layer_decay: Optional[float] = 0.8  # None or 1.0: off
    grad_clip_norm: Optional[float] = None  # global L2 norm of trainable grads; None: off
    freeze_image_encoder: bool = False  # decoder-only fine-tuning
    # Param path prefixes to train ("mask_decoder", "mask_decoder/iou_prediction_head"), every
    # other param frozen; None: all of them (buffers and, if asked, the encoder excepted).
    trainable: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        def fail(field, requirement):
            raise ValueError(
                f"OptimizerConfig.{field} must be {requirement}; got {getattr(self, field)!r}"
            )

        def is_number(x):
            real = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            return real and math.isfinite(x)

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not (is_number(self.learning_rate) and self.learning_rate > 0):
            fail("learning_rate", "a finite number > 0")
        for field in ("b1", "b2"):
            if not (is_number(getattr(self, field)) and 0 <= getattr(self, field) < 1):
                fail(field, "in [0, 1)")
        if not (is_number(self.eps) and self.eps > 0):
            fail("eps", "a finite number > 0")
        if not (is_number(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", "a finite number >= 0")
        if not (is_int(self.warmup_steps) and self.warmup_steps >= 0):
            fail("warmup_steps", "an int >= 0")
        if self.total_steps is not None and not (is_int(self.total_steps) and self.total_steps > 0):
            fail("total_steps", "None or an int > 0")
        if not isinstance(self.decay_steps, (tuple, list)):
            fail("decay_steps", "a tuple of step numbers")
        object.__setattr__(self, "decay_steps", tuple(self.decay_steps))
        steps = self.decay_steps
        if not all(is_int(s) for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
            fail("decay_steps", "strictly increasing ints")
        if steps and steps[0] < max(self.warmup_steps, 1):
            fail("decay_steps", f"at or after the end of warmup (warmup_steps={self.warmup_steps})")
        if steps and self.total_steps is not None and steps[-1] >= self.total_steps:
            fail("decay_steps", f"before total_steps={self.total_steps}")
        if not (is_number(self.decay_factor) and self.decay_factor >= 1):
            fail("decay_factor", "a finite number >= 1 (the lr is divided by it)")
        decay = self.layer_decay
        if decay is not None and not (is_number(decay) and 0 < decay <= 1):
            fail("layer_decay", "None or in (0, 1]")
        clip = self.grad_clip_norm
        if clip is not None and not (is_number(clip) and clip > 0):
            fail("grad_clip_norm", "None or a finite number > 0")
        if not isinstance(self.freeze_image_encoder, bool):
            fail("freeze_image_encoder", "a bool")
        if self.trainable is not None:
            prefixes = self.trainable
            if (not isinstance(prefixes, (tuple, list)) or not prefixes
                    or not all(isinstance(p, str) and p and "" not in p.split("/") for p in prefixes)):
                fail("trainable", "None or a non-empty tuple of param path prefixes like 'mask_decoder'")
            object.__setattr__(self, "trainable", tuple(prefixes))

    @property
    def encoder_frozen(self) -> bool:
        """No image-encoder param trains: the step can run the encoder without gradients."""
        return self.freeze_image_encoder or (
            self.trainable is not None and all(p.split("/")[0] != "image_encoder" for p in self.trainable))


# The paper's recipes (SAM appendix A, "Training algorithm"). ViT-H: AdamW (0.9, 0.999),
# lr 8e-4 after a 250-iteration linear warmup, 90k iterations at batch 256, lr / 10 at
# 60k and 86,666, wd 0.1, ld 0.8 (drop path 0.4 is a model option). "To train ViT-B and
# ViT-L, we use 180k iterations with batch size 128 ... lr = 8e-4/4e-4, ld = 0.6/0.8,
# wd = 0.1, dp = 0.6/0.4 for ViT-B/L". The paper gives no decay steps or warmup for
# 180k: the decay steps keep ViT-H's fractions of training (2/3 and 26/27: 86,666 is
# 90k * 26/27 rounded down) and the warmup stays 250 iterations.
PAPER_RECIPES: dict[str, OptimizerConfig] = {
    "vit_b": OptimizerConfig(
        learning_rate=8e-4, total_steps=180_000, decay_steps=(120_000, 173_333), layer_decay=0.6
    ),
    "vit_l": OptimizerConfig(
        learning_rate=4e-4, total_steps=180_000, decay_steps=(120_000, 173_333), layer_decay=0.8
    ),
    "vit_h": OptimizerConfig(
        learning_rate=8e-4, total_steps=90_000, decay_steps=(60_000, 86_666), layer_decay=0.8
    ),
}


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """step -> lr: linear from 0 over warmup_steps, then / decay_factor at each decay step."""
    peak, warmup = config.learning_rate, config.warmup_steps
    boundaries = np.asarray(config.decay_steps, np.int32)

    def schedule(count):
        step = jnp.asarray(count)
        lr = jnp.float32(peak)
        if warmup:
            lr = lr * jnp.minimum(step.astype(jnp.float32) / warmup, 1.0)
        if boundaries.size:
            num_decays = jnp.sum(step[..., None] >= boundaries, axis=-1)
            lr = lr * jnp.float32(1 / config.decay_factor) ** num_decays
        return lr

    return schedule


def layer_id(path: Path, num_layers: int, blocks_per_group: Optional[int] = None):
    """The layer-wise-decay id of a param (MAE/BEiT/ViTDet convention).

    0 for image_encoder/patch_embed/** and image_encoder/pos_embed, i + 1 for
    image_encoder/blocks_{i}/**, num_layers + 1 for everything else. A scanned
    block param (image_encoder/block_groups/blocks_{j}/**) stands for the blocks
    g * blocks_per_group + j of every group g: its ids, an int array of shape
    (num_groups,), need `blocks_per_group`.
    """
    names = path_names(path)
    if len(names) < 2 or names[0] != "image_encoder":
        return num_layers + 1
    if names[1] in ("patch_embed", "pos_embed"):
        return 0
    match = _BLOCK.fullmatch(names[1])
    if match:
        i = int(match.group(1))
        if i >= num_layers:
            raise ValueError(f"{'/'.join(names)}: block {i} of an encoder with {num_layers} blocks")
        return i + 1
    if names[1] == "block_groups":
        match = _BLOCK.fullmatch(names[2]) if len(names) > 2 else None
        if match is None:
            raise ValueError(f"{'/'.join(names)}: not a scanned block param")
        if blocks_per_group is None or blocks_per_group < 1 or num_layers % blocks_per_group:
            raise ValueError(
                f"{'/'.join(names)}: a scanned block param needs blocks_per_group dividing "
                f"num_layers={num_layers}; got {blocks_per_group!r}"
            )
        j = int(match.group(1))
        if j >= blocks_per_group:
            raise ValueError(f"{'/'.join(names)}: block {j} of {blocks_per_group}-block scan groups")
        return np.arange(num_layers // blocks_per_group) * blocks_per_group + j + 1
    return num_layers + 1


def layer_scales(params: Any, model_config: SamConfig, layer_decay: Optional[float]) -> Any:
    """Per-param lr scales, params' structure: a float, or for a scanned leaf an array of
    shape (num_groups, 1, ...) that broadcasts against it (one scale per stacked block)."""
    enc = model_config.encoder
    depth, per_group = enc.depth, enc.blocks_per_group

    def scale(path, leaf):
        ids = layer_id(path, depth, per_group)
        factor = 1.0 if layer_decay is None else float(layer_decay)
        scales = factor ** (depth + 1 - np.asarray(ids, np.float64))
        if np.ndim(ids) == 0:
            return float(scales)
        shape = tuple(leaf.shape)
        if not shape or shape[0] != len(scales):
            raise ValueError(
                f"{'/'.join(path_names(path))}: scanned leaf of shape {shape} should lead with "
                f"{len(scales)} groups for {model_config.name}"
            )
        return scales.astype(np.float32).reshape((-1,) + (1,) * (len(shape) - 1))

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its scale from `scales` (e.g. `layer_scales(...)`).

    Scales are looked up by param path, so the transform also works inside
    `optax.masked` / `multi_transform`, which hand it only part of the tree.
    """
    table = {path_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}

    def scale(path, update):
        names = path_names(path)
        if names not in table:
            raise ValueError(
                f"scale_by_layer: no scale for {'/'.join(names)}; were the scales built for "
                "params of another layout or model?"
            )
        s = table[names]
        if isinstance(s, float) and s == 1.0:
            return update
        return update * jnp.asarray(s, update.dtype)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW's weight decay applies; decided by leaf name (see module doc)."""

    def decayed(path, leaf):
        names = path_names(path)
        if names[-1] in DECAYED_LEAVES:
            return True
        if names[-1] in UNDECAYED_LEAVES or names[-1] in BUFFERS:
            return False
        raise ValueError(
            f"weight_decay_mask: no rule for param {'/'.join(names)}; add its name to "
            "DECAYED_LEAVES, UNDECAYED_LEAVES or BUFFERS in sam_jax.training.optimizer"
        )

    return jax.tree_util.tree_map_with_path(decayed, params)


def param_labels(params: Any, freeze_image_encoder: bool = False,
                 trainable: Optional[tuple[str, ...]] = None) -> Any:
    """TRAINABLE or FROZEN per param: buffers always frozen, the encoder if asked, and with
    `trainable` (path prefixes) every param under none of them. A prefix that names no
    param is a ValueError."""
    prefixes = None if trainable is None else [tuple(p.split("/")) for p in trainable]
    matched = set()

    def label(path, leaf):
        names = path_names(path)
        selected = True
        if prefixes is not None:
            hits = [p for p in prefixes if names[:len(p)] == p]
            matched.update(hits)
            selected = bool(hits)
        frozen = names[-1] in BUFFERS or (freeze_image_encoder and names[0] == "image_encoder") or not selected
        return FROZEN if frozen else TRAINABLE

    labels = jax.tree_util.tree_map_with_path(label, params)
    unmatched = [p for p in prefixes or () if p not in matched]
    if unmatched:
        prefix, node, depth = unmatched[0], params, 0
        while isinstance(node, Mapping) and depth < len(prefix) and prefix[depth] in node:
            node, depth = node[prefix[depth]], depth + 1
        where = "/".join(prefix[:depth])
        found = (f"the names under {where or 'the root'} are {sorted(node)}" if isinstance(node, Mapping)
                 else f"{where} is a single param")
        raise ValueError(f"optimizer.trainable: {'/'.join(prefix)!r} names no param; {found}")
    return labels


def _check_params(params: Any, model_config: SamConfig) -> None:
    """Raises ValueError unless params are float32 and their encoder blocks match the config."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:
            raise ValueError(
                f"make_optimizer: params must be float32 (AdamW's state takes their dtype; for "
                f"bf16 compute use Sam(dtype=jnp.bfloat16, param_dtype=jnp.float32)); "
                f"{'/'.join(path_names(path))} is {dtype}"
            )
    if not isinstance(params, Mapping) or "image_encoder" not in params:
        raise ValueError("make_optimizer: params have no image_encoder (pass the full Sam params)")
    encoder = params["image_encoder"]
    enc = model_config.encoder
    if "block_groups" in encoder:
        found = set(encoder["block_groups"])
        expected = {f"blocks_{j}" for j in range(enc.blocks_per_group)}
    else:
        found = {k for k in encoder if _BLOCK.fullmatch(k)}
        expected = {f"blocks_{i}" for i in range(enc.depth)}
    if found != expected:
        raise ValueError(
            f"make_optimizer: encoder blocks {sorted(found)} do not match {model_config.name} "
            f"(depth {enc.depth}, {enc.blocks_per_group} blocks per scan group)"
        )


def make_optimizer(
    config: OptimizerConfig, params: Any, model_config: SamConfig
) -> optax.GradientTransformation:
    """The optimizer for `params` (looped or scanned layout, arrays or ShapeDtypeStructs)."""
    _check_params(params, model_config)
    weight_decay_mask(params)  # fails now, not at init, on a param without a rule
    chain = []
    if config.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    )
    if config.layer_decay is not None and config.layer_decay != 1.0:
        chain.append(scale_by_layer(layer_scales(params, model_config, config.layer_decay)))
    return optax.multi_transform(
        {TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()},
        param_labels(params, config.freeze_image_encoder, config.trainable),
    )
