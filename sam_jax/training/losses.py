"""SAM's training losses: focal + dice on masks (20:1), MSE on the IoU head (weight 1).

Pure functions of fixed-shape arrays, safe under `jit`, `vmap` and `grad`. Shapes:
M masks (objects, possibly flattened over images, some of them padding), C candidate
masks per prompt (3 with multimask output, 1 with the single-mask token), H x W the
target resolution (the caller upsamples low-res logits first, `modeling.interpolate.resize_bilinear`).

Conventions (SAM paper appendix; facebookresearch/sam2 `training/loss_fns.py`):
- focal: RetinaNet sigmoid focal loss (alpha 0.25, gamma 2), averaged over pixels.
- dice: 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) with p = sigmoid(logits). SAM 2
  writes the numerator as sum(p) + sum(t) - |p - t|_1, the same for binary targets.
- actual IoU: of (logits > 0) vs (targets > 0), no gradient; an empty prediction
  against an empty target scores `empty_iou` (1.0 by default: a perfect answer; SAM 2
  divides by max(union, 1) and so scores it 0).
- with C > 1 only the candidate with the lowest focal_weight * focal + dice_weight *
  dice is supervised (argmin, which carries no gradient); its IoU prediction too,
  unless `supervise_all_iou` (then the mean IoU loss over the C candidates, as SAM 2).
- each part is summed over valid masks and divided by max(1, number of valid masks);
  padded masks are replaced by zeros before any arithmetic (`jnp.where`), so whatever
  they hold (inf, NaN) reaches neither the loss nor any gradient, and their own
  gradients are exactly 0.
- everything is accumulated in float32 whatever the input dtype (bf16 logits included).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from sam_jax.metrics import mask_iou

IOU_KINDS = ("mse", "l1")


def _f32(x: jax.Array) -> jax.Array:
    """`x` as a float of at least 32 bits (bf16/f16 and bool/int are upcast)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                    else jnp.float32)


def _check(logits: jax.Array, targets: jax.Array) -> None:
    if logits.ndim != 4 or targets.ndim != 3 or logits.shape[:1] + logits.shape[2:] != targets.shape:
        raise ValueError(f"logits must be (M, C, H, W) and targets (M, H, W); got "
                         f"{logits.shape} and {targets.shape}")


def _sigmoid_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """sigmoid(x), sigmoid(-x) and log1p(exp(-|x|)) from one exp and one log1p per element:
    the losses' only transcendentals, shared by the focal and dice terms and their gradients."""
    e = jnp.exp(-jnp.abs(x))
    r = 1.0 / (1.0 + e)
    positive = x >= 0
    return jnp.where(positive, r, e * r), jnp.where(positive, e * r, r), jnp.log1p(e)


def _focal(x: jax.Array, t: jax.Array, p: jax.Array, q: jax.Array, log1p_e: jax.Array,
           alpha: float, gamma: float) -> jax.Array:
    """Per-pixel focal loss from `_sigmoid_parts(x)` = (p, q, log1p_e); t broadcasts against x."""
    # Binary cross-entropy with logits: -t log p - (1 - t) log q = max(x, 0) - x t + log1p(exp(-|x|)).
    ce = jnp.maximum(x, 0.0) - x * t + log1p_e
    one_minus_pt = p * (1.0 - t) + q * t
    # An integral gamma (the paper's 2) as repeated products: a float exponent is exp(gamma log(.)).
    loss = ce * (one_minus_pt ** int(gamma) if float(gamma).is_integer() else one_minus_pt ** gamma)
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss


def _dice(p: jax.Array, t: jax.Array) -> jax.Array:
    """(M, C) dice loss of probabilities p (M, C, H, W) against t (M, 1, H, W)."""
    numerator = 2.0 * (p * t).sum(axis=(-2, -1)) + 1.0
    denominator = p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + 1.0
    return 1.0 - numerator / denominator


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
    """(M, C): the focal loss of each candidate mask against its object's target, mean
    over pixels. Stable for any finite logit: the cross-entropy is max(x, 0) - x t +
    log1p(exp(-|x|)) and the modulating factor 1 - p_t = sigmoid(x) (1 - t) + sigmoid(-x) t
    (exact for soft targets too), never 1 - sigmoid(x). alpha < 0 disables the alpha weighting."""
    _check(logits, targets)
    x = _f32(logits)
    t = _f32(targets)[:, None]
    p, q, log1p_e = _sigmoid_parts(x)
    return _focal(x, t, p, q, log1p_e, alpha, gamma).mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(M, C): 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(logits)."""
    _check(logits, targets)
    p, _, _ = _sigmoid_parts(_f32(logits))
    return _dice(p, _f32(targets)[:, None])


def actual_iou(logits: jax.Array, targets: jax.Array, empty_iou: float = 1.0) -> jax.Array:
    """(M, C) float32: IoU of (logits > 0) vs (targets > 0), counted exactly in int32;
    `empty_iou` where both are empty. Carries no gradient."""
    _check(logits, targets)
    predicted = jax.lax.stop_gradient(logits) > 0
    return mask_iou(predicted, (jax.lax.stop_gradient(targets) > 0)[:, None], empty_iou)


def iou_prediction_loss(pred_iou: jax.Array, logits: jax.Array, targets: jax.Array,
                        kind: str = "mse", empty_iou: float = 1.0) -> jax.Array:
    """(M, C): squared ("mse", SAM paper) or absolute ("l1", SAM 2 configs) error of the
    IoU head's predictions against `actual_iou`. The gradient reaches `pred_iou` only."""
    if kind not in IOU_KINDS:
        raise ValueError(f"kind must be one of {IOU_KINDS}, got {kind!r}")
    if pred_iou.shape != logits.shape[:2]:
        raise ValueError(f"pred_iou must be (M, C) = {logits.shape[:2]}, got {pred_iou.shape}")
    error = _f32(pred_iou) - actual_iou(logits, targets, empty_iou)
    return error**2 if kind == "mse" else jnp.abs(error)


def sam_loss(
    logits: jax.Array,
    pred_iou: jax.Array,
    targets: jax.Array,
    valid: jax.Array,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    iou_kind: str = "mse",
    supervise_all_iou: bool = False,
    alpha: float = 0.25,
    gamma: float = 2.0,
    empty_iou: float = 1.0,
    num_valid: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """SAM's loss for one decoder step: (total, parts).

    logits (M, C, H, W) at the target resolution; pred_iou (M, C); targets (M, H, W)
    bool or {0, 1} float; valid (M,) bool, False for padding. Pass the C = 3 multimask
    outputs for a single-prompt step and the C = 1 single-mask token otherwise.

    total = focal_weight * focal + dice_weight * dice + iou_weight * iou, a float32
    scalar; parts holds the unweighted "focal", "dice" and "iou" (each summed over
    valid masks / max(1, #valid)) and "selected" (M,) int32, the supervised candidate
    of each mask (0 for padding). Summing `total` over the interactive steps gives SAM 2's
    multi-step loss. `num_valid` overrides the divisor, for data-parallel steps
    that divide by the count over all devices (then gradients are summed, not averaged).
    """
    _check(logits, targets)
    valid = jnp.asarray(valid)
    if valid.shape != logits.shape[:1] or pred_iou.shape != logits.shape[:2]:
        raise ValueError(f"valid must be (M,) and pred_iou (M, C) for logits {logits.shape}; got "
                         f"{valid.shape} and {pred_iou.shape}")
    if iou_kind not in IOU_KINDS:
        raise ValueError(f"iou_kind must be one of {IOU_KINDS}, got {iou_kind!r}")
    valid = valid.astype(bool)
    # Padding is zeroed before any arithmetic: where's gradient to the branch it drops is
    # an exact 0, whereas masking a computed loss lets 0 * inf = NaN into the gradients.
    logits = jnp.where(valid[:, None, None, None], _f32(logits), 0.0)
    targets = jnp.where(valid[:, None, None], _f32(targets), 0.0)
    pred_iou = jnp.where(valid[:, None], _f32(pred_iou), 0.0)

    t = targets[:, None]
    p, q, log1p_e = _sigmoid_parts(logits)  # one pass of transcendentals for both mask losses
    focal = _focal(logits, t, p, q, log1p_e, alpha, gamma).mean(axis=(-2, -1))
    dice = _dice(p, t)
    iou = iou_prediction_loss(pred_iou, logits, targets, iou_kind, empty_iou)

    combined = jax.lax.stop_gradient(focal_weight * focal + dice_weight * dice)
    selected = jnp.where(valid, jnp.argmin(combined, axis=1), 0).astype(jnp.int32)

    def pick(per_candidate: jax.Array) -> jax.Array:
        return jnp.take_along_axis(per_candidate, selected[:, None], axis=1)[:, 0]

    num_valid = jnp.maximum(valid.sum() if num_valid is None else num_valid, 1).astype(jnp.float32)

    def reduce(per_mask: jax.Array) -> jax.Array:
        return jnp.where(valid, per_mask, 0.0).sum() / num_valid

    parts = {
        "focal": reduce(pick(focal)),
        "dice": reduce(pick(dice)),
        "iou": reduce(iou.mean(axis=1) if supervise_all_iou else pick(iou)),
    }
    total = focal_weight * parts["focal"] + dice_weight * parts["dice"] + iou_weight * parts["iou"]
    return total, {**parts, "selected": selected}

