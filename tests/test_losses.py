"""SAM's training losses: hand-computed values, a PyTorch mirror of SAM 2's
`training/loss_fns.py`, argmin selection and its gradients, padding, bf16, jit/vmap."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam_jax.modeling.interpolate import resize_bilinear
from sam_jax.training.losses import (
    actual_iou,
    dice_loss,
    iou_prediction_loss,
    sam_loss,
    sigmoid_focal_loss,
)

LN3 = math.log(3.0)


# --- PyTorch mirror of SAM 2's loss_fns (multimask path), in float64 ------------------

def torch_focal(inputs, targets, num_objects, alpha=0.25, gamma=2.0):
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * loss).flatten(2).mean(-1) / num_objects


def torch_dice(inputs, targets, num_objects, l1_form=True):
    p = inputs.sigmoid().flatten(2)
    t = targets.flatten(2)
    denominator = p.sum(-1) + t.sum(-1)
    if l1_form:  # SAM 2 today: numerator = denominator - |p - t|_1
        numerator = denominator - torch.linalg.vector_norm(p - t, ord=1, dim=-1)
    else:  # SAM 2's first release: 2 sum(p t)
        numerator = 2 * (p * t).sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)) / num_objects


def torch_iou(inputs, targets, pred_ious, num_objects, use_l1=False):
    pred = inputs.flatten(2) > 0
    gt = targets.flatten(2) > 0
    area_i = (pred & gt).sum(-1).to(pred_ious.dtype)
    area_u = (pred | gt).sum(-1).to(pred_ious.dtype)
    actual = area_i / torch.clamp(area_u, min=1.0)
    loss = F.l1_loss(pred_ious, actual, reduction="none") if use_l1 else F.mse_loss(
        pred_ious, actual, reduction="none")
    return loss / num_objects


def torch_step_loss(src_masks, pred_ious, targets, weights=(20.0, 1.0, 1.0),
                    supervise_all_iou=False, use_l1=False):
    """MultiStepMultiMasksAndIous._update_losses for one step, no object scores."""
    num_objects = max(targets.shape[0], 1)
    target_masks = targets.unsqueeze(1).to(src_masks.dtype).expand_as(src_masks)
    focal = torch_focal(src_masks, target_masks, num_objects)
    dice = torch_dice(src_masks, target_masks, num_objects)
    iou = torch_iou(src_masks, target_masks, pred_ious, num_objects, use_l1)
    best = torch.zeros(focal.shape[0], dtype=torch.long)
    if focal.shape[1] > 1:
        best = torch.argmin(focal * weights[0] + dice * weights[1], dim=-1)
        rows = torch.arange(focal.shape[0])
        iou = iou.mean(-1) if supervise_all_iou else iou[rows, best]
        focal, dice = focal[rows, best], dice[rows, best]
    parts = {"focal": focal.sum(), "dice": dice.sum(), "iou": iou.sum()}
    total = weights[0] * parts["focal"] + weights[1] * parts["dice"] + weights[2] * parts["iou"]
    return total, parts, best


def random_inputs(seed, m=4, c=3, h=8, w=8):
    rng = np.random.default_rng(seed)
    targets = rng.random((m, h, w)) < rng.uniform(0.2, 0.6, (m, 1, 1))
    # Candidates that resemble the target to different degrees, so the argmin matters.
    strength = rng.uniform(-1.0, 4.0, (m, c, 1, 1))
    logits = (strength * (2 * targets[:, None] - 1) + rng.normal(0, 2.0, (m, c, h, w)))
    pred_iou = rng.uniform(0, 1, (m, c))
    return logits.astype(np.float32), pred_iou.astype(np.float32), targets


def torch_reference(logits, pred_iou, targets, **kw):
    """(total, parts, best, d total / d logits, d total / d pred_iou), float64."""
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(pred_iou, dtype=torch.float64, requires_grad=True)
    total, parts, best = torch_step_loss(x, s, torch.tensor(targets, dtype=torch.float64), **kw)
    total.backward()
    return (total.item(), {k: v.item() for k, v in parts.items()}, best.numpy(),
            x.grad.numpy(), s.grad.numpy())


# Everything runs compiled, on few shapes: on a loaded 2-core machine each XLA compile
# costs ~1 s, and eager dispatch compiles every primitive per shape. Weights are traced,
# so changing them does not recompile.
STATIC = ("iou_kind", "supervise_all_iou", "alpha", "gamma")
DEFAULTS = dict(focal_weight=20.0, dice_weight=1.0, iou_weight=1.0, iou_kind="mse",
                supervise_all_iou=False, alpha=0.25, gamma=2.0, empty_iou=1.0)
focal_jit, dice_jit, iou_jit = (jax.jit(f) for f in (sigmoid_focal_loss, dice_loss, actual_iou))


@functools.partial(jax.jit, static_argnames=STATIC)
def _loss_and_grads(logits, pred_iou, targets, valid, **kw):
    def f(x, s):
        return sam_loss(x, s, targets, valid, **kw)
    (total, parts), (gx, gs) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(logits, pred_iou)
    return total, parts, gx, gs


def loss_and_grads(logits, pred_iou, targets, valid, **kw):
    """(total, parts, d total / d logits, d total / d pred_iou), compiled."""
    kw = {**DEFAULTS, **kw}  # the same keywords every call: one trace per shape and option set
    return _loss_and_grads(logits, pred_iou, np.asarray(targets, np.float32), np.asarray(valid, bool), **kw)


def loss(logits, pred_iou, targets, valid, **kw):
    return loss_and_grads(logits, pred_iou, targets, valid, **kw)[:2]


# --- hand-computed values --------------------------------------------------------------

# One mask, one candidate, 2 x 2 pixels. sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2.
HAND_LOGITS = np.array([[[[LN3, -LN3], [0.0, LN3]]]], np.float32)   # (1, 1, 2, 2)
HAND_TARGETS = np.array([[[1, 0], [0, 0]]], bool)                    # (1, 2, 2)
# focal per pixel = alpha_t * (1 - p_t)^2 * ce
#   (ln3, t=1):  p_t = 3/4, ce = ln(4/3), 0.25 * (1/4)^2 * ln(4/3) =  1/64 ln(4/3)
#   (-ln3, t=0): p_t = 3/4, ce = ln(4/3), 0.75 * (1/4)^2 * ln(4/3) =  3/64 ln(4/3)
#   (0, t=0):    p_t = 1/2, ce = ln 2,    0.75 * (1/2)^2 * ln 2    = 12/64 ln 2
#   (ln3, t=0):  p_t = 1/4, ce = ln 4,    0.75 * (3/4)^2 * ln 4    = 54/64 ln 2
HAND_FOCAL = (4 / 64 * math.log(4 / 3) + 66 / 64 * math.log(2)) / 4
# dice: sum p = 3/4 + 1/4 + 1/2 + 3/4 = 9/4, sum t = 1, sum p t = 3/4
#   1 - (2 * 3/4 + 1) / (9/4 + 1 + 1) = 1 - (5/2) / (17/4) = 7/17
HAND_DICE = 7 / 17
# IoU: logits > 0 = [[1, 0], [0, 1]] (0 is not > 0), target [[1, 0], [0, 0]] -> 1/2
HAND_PRED_IOU = np.array([[0.8]], np.float32)
HAND_MSE, HAND_L1 = (0.8 - 0.5) ** 2, abs(0.8 - 0.5)


def test_hand_computed_components():
    focal = jax.jit(sigmoid_focal_loss, static_argnames=("alpha", "gamma"))
    iou_loss = jax.jit(iou_prediction_loss, static_argnames=("kind", "empty_iou"))
    np.testing.assert_allclose(focal(HAND_LOGITS, HAND_TARGETS), [[HAND_FOCAL]], rtol=1e-6)
    np.testing.assert_allclose(dice_jit(HAND_LOGITS, HAND_TARGETS), [[HAND_DICE]], rtol=1e-6)
    np.testing.assert_array_equal(iou_jit(HAND_LOGITS, HAND_TARGETS), [[0.5]])
    np.testing.assert_allclose(iou_loss(HAND_PRED_IOU, HAND_LOGITS, HAND_TARGETS), [[HAND_MSE]], rtol=1e-6)
    np.testing.assert_allclose(iou_loss(HAND_PRED_IOU, HAND_LOGITS, HAND_TARGETS, "l1"), [[HAND_L1]],
                               rtol=1e-6)
    # alpha < 0 disables the weighting: ((1/16 + 1/16) ln(4/3) + (1/4) ln 2 + (9/16) ln 4) / 4
    no_alpha = (2 / 16 * math.log(4 / 3) + 22 / 16 * math.log(2)) / 4
    np.testing.assert_allclose(focal(HAND_LOGITS, HAND_TARGETS, alpha=-1.0), [[no_alpha]], rtol=1e-6)


def test_hand_computed_total_and_normalisation():
    # Mask 0: the hand mask. Mask 1: logits -1e4 against an empty target: focal 0, dice
    # 1 - (0 + 1) / (0 + 0 + 1) = 0, empty prediction vs empty target -> IoU 1 (empty_iou),
    # predicted 1 -> IoU loss 0.
    logits = np.concatenate([HAND_LOGITS, np.full_like(HAND_LOGITS, -1e4)])
    targets = np.concatenate([HAND_TARGETS, np.zeros_like(HAND_TARGETS)])
    pred_iou = np.array([[0.8], [1.0]], np.float32)
    total, parts = loss(logits, pred_iou, targets, np.array([True, False]))
    np.testing.assert_allclose(total, 20 * HAND_FOCAL + HAND_DICE + HAND_MSE, rtol=1e-6)
    np.testing.assert_allclose([parts["focal"], parts["dice"], parts["iou"]],
                               [HAND_FOCAL, HAND_DICE, HAND_MSE], rtol=1e-6)
    np.testing.assert_array_equal(parts["selected"], [0, 0])
    # Both valid: the divisor is 2. Other weights.
    total2, _ = loss(logits, pred_iou, targets, np.array([True, True]),
                     focal_weight=2.0, dice_weight=3.0, iou_weight=5.0)
    np.testing.assert_allclose(total2, (2 * HAND_FOCAL + 3 * HAND_DICE + 5 * HAND_MSE) / 2, rtol=1e-6)


def test_hand_computed_selection():
    # Three candidates of the hand mask: the hand logits, a near-perfect one, an inverted one.
    perfect = np.where(HAND_TARGETS[:, None], 10.0, -10.0).astype(np.float32)
    logits = np.concatenate([HAND_LOGITS, perfect, -perfect], axis=1)   # (1, 3, 2, 2)
    pred_iou = np.array([[0.8, 0.5, 0.0]], np.float32)
    _, parts = loss(logits, pred_iou, HAND_TARGETS, np.array([True]))
    np.testing.assert_array_equal(parts["selected"], [1])
    # candidate 1 thresholds to the target exactly: IoU 1, predicted 0.5 -> 0.25
    np.testing.assert_allclose(parts["iou"], 0.25, rtol=1e-6)
    assert float(parts["focal"]) < 1e-6 and float(parts["dice"]) < 1e-3
    # supervise_all_iou: mean over the candidates of (0.8 - 1/2)^2, (0.5 - 1)^2 and
    # (0 - 0)^2 (-perfect thresholds to [[0, 1], [1, 1]], IoU 0 with [[1, 0], [0, 0]])
    _, parts_all = loss(logits, pred_iou, HAND_TARGETS, np.array([True]), supervise_all_iou=True)
    np.testing.assert_allclose(parts_all["iou"], (0.09 + 0.25 + 0.0) / 3, rtol=1e-6)


def test_empty_iou_convention():
    logits = np.full((2, 1, 2, 2), -5.0, np.float32)   # empty predictions
    targets = np.zeros((2, 2, 2), bool)
    targets[1, 0, 0] = True                            # empty vs one pixel -> 0
    np.testing.assert_array_equal(iou_jit(logits, targets), [[1.0], [0.0]])
    # empty_iou=0 reproduces SAM 2 (area_i / clamp(area_u, min=1))
    ious = jax.jit(actual_iou, static_argnames="empty_iou")(logits, targets, empty_iou=0.0)
    np.testing.assert_array_equal(ious, [[0.0], [0.0]])
    pred_iou = np.array([[0.3], [0.6]], np.float32)
    ref = torch_iou(torch.tensor(logits), torch.tensor(targets[:, None].astype(np.float32)),
                    torch.tensor(pred_iou), 1)
    _, parts = loss(logits, pred_iou, targets, np.array([True, True]), empty_iou=0.0, iou_weight=1.0)
    np.testing.assert_allclose(parts["iou"], ref.numpy().mean(), rtol=1e-6)
    _, parts = loss(logits, pred_iou, targets, np.array([True, True]))
    np.testing.assert_allclose(parts["iou"], ((0.3 - 1) ** 2 + 0.6**2) / 2, rtol=1e-6)


# --- against the PyTorch mirror ---------------------------------------------------------

@pytest.mark.parametrize("c, iou_kind, supervise_all_iou",
                         [(3, "mse", False), (3, "mse", True), (3, "l1", False), (3, "l1", True),
                          (1, "mse", False), (1, "l1", False)])
def test_matches_pytorch_sam2(c, iou_kind, supervise_all_iou):
    logits, pred_iou, targets = random_inputs(seed=c + 10 * supervise_all_iou, c=c)
    ref_total, ref_parts, ref_best, ref_gx, ref_gs = torch_reference(
        logits, pred_iou, targets, supervise_all_iou=supervise_all_iou, use_l1=iou_kind == "l1")
    total, parts, gx, gs = loss_and_grads(logits, pred_iou, targets, np.ones(4, bool),
                                          iou_kind=iou_kind, supervise_all_iou=supervise_all_iou)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    for key in ("focal", "dice", "iou"):
        np.testing.assert_allclose(parts[key], ref_parts[key], rtol=1e-6, err_msg=key)
    np.testing.assert_array_equal(parts["selected"], ref_best)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-6 * np.abs(ref_gx).max())
    np.testing.assert_allclose(gs, ref_gs, rtol=1e-5, atol=1e-7)
    if c > 1:
        assert len(set(ref_best.tolist())) > 1  # the inputs exercise the selection


def test_components_match_pytorch_and_dice_forms_agree():
    logits, _, targets = random_inputs(seed=3)
    x = torch.tensor(logits, dtype=torch.float64)
    for t in (targets.astype(np.float32), np.random.default_rng(4).random(targets.shape, np.float32)):
        tt = torch.tensor(t, dtype=torch.float64)[:, None].expand_as(x)
        # per mask, fp32 against float64: a few ulps of the 64-pixel sums
        np.testing.assert_allclose(focal_jit(logits, t), torch_focal(x, tt, 1), rtol=2e-6)
        np.testing.assert_allclose(dice_jit(logits, t), torch_dice(x, tt, 1, l1_form=False), rtol=2e-6)
    # binary targets: SAM 2's |p - t|_1 numerator equals 2 sum(p t)
    tt = torch.tensor(targets, dtype=torch.float64)[:, None].expand_as(x)
    np.testing.assert_allclose(dice_jit(logits, targets.astype(np.float32)),
                               torch_dice(x, tt, 1, l1_form=True), rtol=2e-6)


@jax.jit
def focal_grad(x, t):
    return jax.grad(lambda v: sigmoid_focal_loss(v[:, None, None, None], t[:, None, None]).sum())(x)


def test_focal_is_accurate_for_large_logits():
    # One pixel per mask: x in [-60, 60], both labels. 1 - sigmoid(x) in fp32 would be 0
    # for x > 17 (relative error 1); log(sigmoid(x)) would be -inf for x < -104.
    x = np.concatenate([np.linspace(-60, 60, 41), [-200.0, 200.0]]).astype(np.float32)
    for label in (0.0, 1.0):
        t = np.full(x.shape, label, np.float32)
        ours = np.asarray(focal_jit(x[:, None, None, None], t[:, None, None]))[:, 0]
        xt, tt = (torch.tensor(a, dtype=torch.float64)[:, None, None, None] for a in (x, t))
        ref = torch_focal(xt, tt, 1).numpy()[:, 0]
        ok = ref > 1e-30  # fp32's range; below it both are ~0
        assert ok.sum() > 20
        np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-5)
        assert np.all(np.abs(ours[~ok]) < 1e-30)
        assert np.all(np.isfinite(focal_grad(x, t)))


# --- selection and its gradients --------------------------------------------------------

BEST = [2, 0, 1, 2]


def designed_selection_inputs():
    """4 masks, 3 candidates; mask i's best candidate is BEST[i] (by construction)."""
    rng = np.random.default_rng(7)
    targets = rng.random((4, 8, 8)) < 0.4
    strength = np.full((4, 3, 1, 1), 0.5)
    strength[np.arange(4), BEST] = 4.0
    logits = strength * (2 * targets[:, None] - 1.0) + rng.normal(0, 0.3, (4, 3, 8, 8))
    return logits.astype(np.float32), rng.uniform(0, 1, (4, 3)).astype(np.float32), targets


@pytest.mark.parametrize("supervise_all_iou", [False, True])
def test_gradient_flows_only_through_selected_mask(supervise_all_iou):
    logits, pred_iou, targets = designed_selection_inputs()
    _, parts, gx, gs = loss_and_grads(logits, pred_iou, targets, np.ones(4, bool),
                                      supervise_all_iou=supervise_all_iou)
    np.testing.assert_array_equal(parts["selected"], BEST)
    gx, gs = np.asarray(gx), np.asarray(gs)
    chosen = np.zeros((4, 3), bool)
    chosen[np.arange(4), BEST] = True
    # focal/dice: the selected candidate's logits get gradient, the others exactly none
    # (the IoU loss sends none to the logits: the actual IoU is a stop-gradient target)
    assert np.all(gx[~chosen] == 0.0)
    assert np.all(np.abs(gx[chosen]).max(-1).max(-1) > 0)
    # IoU head: d/dpred of sum_m (pred - actual)^2 / M = 2 (pred - actual) / M, / C when
    # all candidates are supervised (SAM 2 takes their mean)
    actual = np.asarray(iou_jit(logits, targets))
    if supervise_all_iou:
        np.testing.assert_allclose(gs, 2 * (pred_iou - actual) / 4 / 3, rtol=1e-6)
        assert np.all(gs != 0)
    else:
        np.testing.assert_allclose(gs, np.where(chosen, 2 * (pred_iou - actual) / 4, 0.0), rtol=1e-6)
        assert np.all(gs[~chosen] == 0.0)


def test_selection_uses_weighted_combination():
    # Candidate 0 has the lower focal loss, candidate 1 the lower dice loss (candidate 2
    # is bad on both): which one is chosen depends on the weights.
    targets = np.zeros((4, 8, 8), bool)
    targets[:, :2] = True                                # 16 of 64 pixels
    c0 = np.where(targets[:, None], 0.0, -8.0)           # background sure, foreground 1/2
    c1 = np.where(targets[:, None], 3.0, -1.0)           # foreground sure-ish, background leaky
    logits = np.concatenate([c0, c1, -c1], 1).astype(np.float32)
    x = torch.tensor(logits, dtype=torch.float64)
    tt = torch.tensor(targets, dtype=torch.float64)[:, None].expand_as(x)
    focal, dice = torch_focal(x, tt, 1).numpy()[0], torch_dice(x, tt, 1).numpy()[0]
    assert focal[0] < focal[1] < focal[2] and dice[1] < dice[0] < dice[2]
    pred_iou, valid = np.zeros((4, 3), np.float32), np.ones(4, bool)
    for wf, wd, expected in [(1.0, 0.0, 0), (0.0, 1.0, 1), (20.0, 1.0, np.argmin(20 * focal + dice))]:
        _, parts = loss(logits, pred_iou, targets, valid, focal_weight=wf, dice_weight=wd)
        np.testing.assert_array_equal(parts["selected"], [expected] * 4)


# --- padding ----------------------------------------------------------------------------

@pytest.mark.parametrize("junk", [1e30, np.inf, np.nan])
def test_padded_masks_contribute_nothing(junk):
    logits, pred_iou, targets = random_inputs(seed=5)
    valid = np.array([True, False, True, False])
    base = loss_and_grads(logits, pred_iou, targets, valid)
    bad_logits, bad_iou, bad_targets = logits.copy(), pred_iou.copy(), targets.astype(np.float32)
    bad_logits[~valid] = junk
    bad_logits[3, 1] = -junk
    bad_iou[~valid] = junk
    bad_targets[~valid] = junk
    total, parts, gx, gs = loss_and_grads(bad_logits, bad_iou, bad_targets, valid)
    np.testing.assert_array_equal(total, base[0])
    for key in ("focal", "dice", "iou", "selected"):
        np.testing.assert_array_equal(parts[key], base[1][key], err_msg=key)
    np.testing.assert_array_equal(gx, base[2])
    np.testing.assert_array_equal(gs, base[3])
    assert np.all(np.asarray(gx)[~valid] == 0) and np.all(np.asarray(gs)[~valid] == 0)
    assert np.all(np.asarray(parts["selected"])[~valid] == 0)
    # and it is the loss of the valid masks alone (SAM 2 mirror, num_objects = 2)
    ref_total, _, _, ref_gx, _ = torch_reference(logits[valid], pred_iou[valid], targets[valid])
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gx)[valid], ref_gx, rtol=1e-5, atol=1e-6 * np.abs(ref_gx).max())


def test_all_padding_gives_zero_and_finite_grads():
    logits, pred_iou, targets = random_inputs(seed=6)
    logits[:] = np.nan
    total, parts, gx, gs = loss_and_grads(logits, pred_iou, targets, np.zeros(4, bool))
    assert float(total) == 0.0 and all(float(parts[k]) == 0.0 for k in ("focal", "dice", "iou"))
    assert np.all(np.asarray(gx) == 0) and np.all(np.asarray(gs) == 0)


# --- dtypes, jit, vmap -------------------------------------------------------------------

def test_bf16_logits_give_fp32_results():
    logits, pred_iou, targets = random_inputs(seed=8)
    valid = np.ones(4, bool)
    low, low_iou = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(pred_iou, jnp.bfloat16)
    total, parts, gx, _ = loss_and_grads(low, low_iou, targets, valid)
    assert total.dtype == jnp.float32 and parts["focal"].dtype == jnp.float32
    assert gx.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gx, np.float32)))
    # fp32 arithmetic on the bf16 values: the same numbers as fp32 inputs holding them
    same = loss(np.asarray(low, np.float32), np.asarray(low_iou, np.float32), targets, valid)[0]
    np.testing.assert_allclose(total, same, rtol=1e-6)
    # and close to the unrounded fp32 inputs
    np.testing.assert_allclose(total, loss(logits, pred_iou, targets, valid)[0], rtol=1e-2)
    assert focal_jit(low, targets).dtype == jnp.float32 and dice_jit(low, targets).dtype == jnp.float32


def test_jit_and_vmap():
    # (every other test runs sam_loss under jit too; here the plain jax.jit of it)
    valid = np.array([True, False])
    logits = np.concatenate([HAND_LOGITS, np.full_like(HAND_LOGITS, np.nan)])
    targets = np.concatenate([HAND_TARGETS, HAND_TARGETS])
    pred_iou = np.array([[0.8], [0.1]], np.float32)
    total, parts = jax.jit(sam_loss)(logits, pred_iou, targets, valid)
    np.testing.assert_allclose(total, 20 * HAND_FOCAL + HAND_DICE + HAND_MSE, rtol=1e-6)
    # vmap over a leading image axis: two images of four masks each
    (l0, s0, t0), (l1, s1, t1) = random_inputs(seed=9), random_inputs(seed=10)
    v0, v1 = np.array([True, True, False, True]), np.array([True, False, False, False])
    per_image = jax.jit(jax.vmap(lambda *a: sam_loss(*a)[0]))(
        np.stack([l0, l1]), np.stack([s0, s1]), np.stack([t0, t1]).astype(np.float32), np.stack([v0, v1]))
    expected = [loss(l0, s0, t0, v0)[0], loss(l1, s1, t1, v1)[0]]
    np.testing.assert_allclose(per_image, expected, rtol=1e-6)


def test_upsampling_to_the_loss_resolution_matches_torch():
    """Low-res logits reach the loss resolution as SAM 2 brings them there (F.interpolate)."""
    low = np.random.default_rng(2).normal(size=(2, 3, 4, 5)).astype(np.float32)
    ours = jax.jit(resize_bilinear, static_argnums=1)(low, (16, 20))
    ref = F.interpolate(torch.tensor(low), (16, 20), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=1e-6)


def test_rejects_bad_inputs():
    logits, pred_iou, targets = random_inputs(seed=0)
    valid = np.ones(4, bool)
    with pytest.raises(ValueError, match="kind"):
        iou_prediction_loss(pred_iou, logits, targets, kind="huber")
    with pytest.raises(ValueError, match="targets"):
        sam_loss(logits, pred_iou, targets[:, :4], valid)
    with pytest.raises(ValueError, match="pred_iou"):
        sam_loss(logits, pred_iou[:, :1], targets, valid)
    with pytest.raises(ValueError, match="valid"):
        sam_loss(logits, pred_iou, targets, np.ones(3, bool))
