"""mIoU after each simulated click (the paper's point protocol), batched over images and masks.

For every ground-truth mask the protocol places a first click (`clicks`:
farthest from the boundary, or uniform over the mask with `first_click=
"random"`), predicts, and then adds a click at the centre of the larger error
region, feeding back the previous low-res logits, up to `num_clicks`. The
first prediction is multimask (three masks; the default score takes the most
confident one, the oracle the best of three against the ground truth); later
predictions, with several points, use the single-mask output as the official
predictor recommends (and as SAM is trained), so default and oracle agree there.

Two frames, one protocol (`run_protocol`):

- `evaluate_images`: each image at its original resolution through a
  `SamBatchPredictor` (clicks are pixels of the image, masks are compared at
  H x W), as the paper measures and as the official predictor is driven. The
  `experiments.eval` command uses it.
- `evaluate` / `evaluate_batch`: the preprocessed input frame of
  `sam_jax.data.preprocess` (longest side T, zero padded; masks compared at
  T x T inside the image's valid region), entirely on device batches; the
  training run's periodic held-out evaluation uses it.

Images of a batch are zero-padded to one size; that changes nothing, since
padding is outside both masks (no IoU change) and counts as boundary for the
distance transforms, as the image border does. Encoding, decoding,
upsampling and IoU run jitted for a whole batch (B images x M masks); only
the click placement (an exact distance transform around each error region)
runs on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.evaluation.clicks import next_click
from sam_jax.evaluation.instances import Instances
from sam_jax.metrics import mask_iou
from sam_jax.modeling import Sam, decode_batch, encode_images, valid_region
from sam_jax.modeling.interpolate import resize_bilinear
from sam_jax.modeling.prompt_encoder import FOREGROUND, PADDING
from sam_jax.prompts import bucket

FIRST_CLICKS = ("center", "random")
REPORTED_CLICKS = (1, 2, 3, 5, 9)  # the paper's columns
# Mask area as a share of its image: the bins mIoU is also reported by.
SIZE_BINS = ((0.0, 0.002), (0.002, 0.01), (0.01, 0.03), (0.03, 0.1), (0.1, 1.0))


def size_bin(area_fraction: float) -> str:
    """The SIZE_BINS name ("0.2-1%") of a mask covering `area_fraction` of its image."""
    for low, high in SIZE_BINS:
        if low <= area_fraction < high or (high == 1.0 and area_fraction == 1.0):
            return f"{100 * low:g}-{100 * high:g}%"
    raise ValueError(f"area fraction {area_fraction} outside [0, 1]")


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    num_clicks: int = 9
    first_click: str = "center"  # "center": farthest from the boundary; "random": uniform over the mask
    seed: int = 0  # for first_click="random"

    def __post_init__(self):
        if not isinstance(self.num_clicks, int) or self.num_clicks < 1:
            raise ValueError(f"num_clicks must be an int >= 1, got {self.num_clicks!r}")
        if self.first_click not in FIRST_CLICKS:
            raise ValueError(f"first_click must be one of {FIRST_CLICKS}, got {self.first_click!r}")


_PER_MASK = ("iou", "oracle_iou", "image_ids", "mask_fraction", "first_click_predicted_iou",
             "first_click_output_iou")  # the fields parts concatenate


def _pearson(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Pearson's r of two flat arrays; None where it is undefined (under 2 values, or no spread)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


@dataclasses.dataclass
class ProtocolResult:
    """Per-mask IoUs (num_masks, num_clicks) of the most confident mask and of the oracle,
    and the first click's C outputs: the IoU head's predictions and their actual IoUs."""

    iou: np.ndarray
    oracle_iou: np.ndarray
    image_ids: np.ndarray  # (num_masks,) the image of each mask
    mask_fraction: np.ndarray  # (num_masks,) each mask's area over its image's
    first_click_predicted_iou: np.ndarray  # (num_masks, C) the IoU head's scores of the multimask outputs
    first_click_output_iou: np.ndarray  # (num_masks, C) those outputs' IoU against the target
    # With evaluate_batch(keep_clicks=...): the batch's (B, M, T, T) predictions after those
    # clicks ({click count: masks}), and every click, coords (B, M, n, 2) and labels (B, M, n).
    predictions: Optional[Dict[int, np.ndarray]] = None
    click_coords: Optional[np.ndarray] = None
    click_labels: Optional[np.ndarray] = None

    @property
    def num_masks(self) -> int:
        return int(self.iou.shape[0])

    def miou(self, oracle: bool = False) -> np.ndarray:
        """(num_clicks,) mean IoU over masks after 1, 2, ... clicks."""
        values = self.oracle_iou if oracle else self.iou
        return values.mean(axis=0) if len(values) else np.full(values.shape[1], np.nan)

    def summary(self) -> Dict[str, Any]:
        clicks = [c for c in REPORTED_CLICKS if c <= self.iou.shape[1]]
        miou, oracle = self.miou(), self.miou(oracle=True)
        return {
            "num_masks": self.num_masks,
            "num_images": int(len(np.unique(self.image_ids))),
            "miou": {str(c): float(miou[c - 1]) for c in clicks},
            "oracle_miou": {str(c): float(oracle[c - 1]) for c in clicks},
            "miou_per_click": [float(v) for v in miou],
            "miou_by_mask_size": self.by_mask_size(clicks),
            "iou_head_first_click": self.iou_head(),
        }

    def iou_head(self) -> Dict[str, Any]:
        """How well the IoU head's scores of the first click's C outputs predict their actual IoU:
        Pearson's r over all masks and outputs ("pearson": what ranking masks across prompts,
        as the automatic mask generator does, relies on; None without spread), the share of
        masks whose most confident output is a best one ("picks_best": what separates the
        most confident mIoU from the oracle's), the mean absolute error, and per output the
        mean predicted and actual IoU, the share of masks for which it is the most confident
        ("chosen_share") and the share for which it is the best ("best_share"; ties go to the
        first output, as the most confident mask's do): a head that always prefers one output
        whatever the object shows as a chosen share near 1 beside a spread best share."""
        predicted, actual = self.first_click_predicted_iou, self.first_click_output_iou
        if not len(actual):
            return {"pearson": None, "picks_best": None, "mean_abs_error": None,
                    "mean_predicted": [], "mean_actual": [], "chosen_share": [], "best_share": []}
        picked = predicted.argmax(axis=1)
        chosen = np.take_along_axis(actual, picked[:, None], axis=1)[:, 0]

        def share(index):
            return [float(v) for v in np.bincount(index, minlength=actual.shape[1]) / len(index)]

        return {
            "pearson": _pearson(predicted, actual),
            "picks_best": float(np.mean(chosen >= actual.max(axis=1))),
            "mean_abs_error": float(np.abs(predicted - actual).mean()),
            "mean_predicted": [float(v) for v in predicted.mean(axis=0)],
            "mean_actual": [float(v) for v in actual.mean(axis=0)],
            "chosen_share": share(picked),
            "best_share": share(actual.argmax(axis=1)),
        }

    def by_mask_size(self, clicks) -> Dict[str, Any]:
        """{size bin: {"num_masks", "miou": {clicks: value}, "first_click_mean_predicted",
        "first_click_mean_actual"}} for the bins that hold masks; the last two per output, the
        IoU head's scores and the actual IoU of the first click's outputs (whether the head
        follows the object's size as the outputs' quality does)."""
        bins = np.array([size_bin(float(f)) for f in self.mask_fraction])
        out = {}
        for low, high in SIZE_BINS:
            name = size_bin(low)
            members = bins == name
            if members.any():
                out[name] = {"num_masks": int(members.sum()),
                             "miou": {str(c): float(self.iou[members, c - 1].mean()) for c in clicks},
                             "first_click_mean_predicted": [
                                 float(v) for v in self.first_click_predicted_iou[members].mean(axis=0)],
                             "first_click_mean_actual": [
                                 float(v) for v in self.first_click_output_iou[members].mean(axis=0)]}
        return out


# predict(coords (B, M, n, 2), labels (B, M, n), mask_inputs (B, M, 1, L, L) | None, multimask)
#   -> masks (B, M, C, T, T) bool, scores (B, M, C) predicted IoU, low-res logits (B, M, C, L, L)
PredictFn = Callable[[np.ndarray, np.ndarray, Optional[jax.Array], bool], Tuple[jax.Array, jax.Array, jax.Array]]


@functools.partial(jax.jit, static_argnums=(0, 7))
def _predict(model: Sam, params, embeddings, coords, labels, mask_inputs, image_hw, multimask: bool):
    """PredictFn of a model on embeddings (B, h, w, D); image_hw (B, 2) is the
    valid size in the T x T frame, outside which masks are False."""
    t = model.config.image_size
    low_res, iou = decode_batch(model, params, embeddings, coords, labels, None, mask_inputs, multimask)
    b, m, c = iou.shape
    masks = resize_bilinear(low_res.reshape((b * m, c) + low_res.shape[-2:]), (t, t)) > model.config.mask_threshold
    return masks.reshape(b, m, c, t, t) & valid_region(image_hw, t)[:, None, None], iou, low_res


@jax.jit
def _score(masks, scores, low_res, targets):
    """Most confident mask (B, M, T, T), its low-res logits (B, M, 1, L, L), its IoU (B, M)
    and every output's IoU (B, M, C) against targets (B, M, T, T); IoU is 1 where both are empty."""
    ious = mask_iou(masks, targets[:, :, None])
    best = jnp.argmax(scores, axis=-1)[:, :, None]
    pick = lambda x: jnp.take_along_axis(x, best.reshape(best.shape + (1,) * (x.ndim - 3)), axis=2)
    return pick(masks)[:, :, 0], pick(low_res), pick(ious)[..., 0], ious


def _first_click_random(target: np.ndarray, rng: np.random.Generator):
    ys, xs = np.nonzero(target)
    k = int(rng.integers(len(ys)))
    return int(xs[k]), int(ys[k])


def run_protocol(predict: PredictFn, targets: np.ndarray, valid: np.ndarray, image_ids: np.ndarray,
                 config: ProtocolConfig, keep_clicks: tuple[int, ...] = (),
                 image_hw: Optional[np.ndarray] = None) -> ProtocolResult:
    """The protocol for targets (B, M, T, T) bool with valid (B, M), driving any `predict`.
    `keep_clicks`: click counts whose predicted masks to return (for pictures). `image_hw`
    (B, 2): each image's size within the frame (default the whole frame), for mask sizes."""
    targets = np.asarray(targets, bool)
    b, m = valid.shape
    n = config.num_clicks
    coords = np.zeros((b, m, n, 2), np.float32)
    labels = np.full((b, m, n), PADDING, np.int32)
    predicted = np.zeros_like(targets)
    mask_inputs = None
    iou = np.zeros((b, m, n), np.float32)
    oracle = np.zeros((b, m, n), np.float32)
    first_scores = first_ious = None
    device_targets = jnp.asarray(targets)
    kept: Dict[int, np.ndarray] = {}
    for click in range(n):
        for i, j in zip(*np.nonzero(valid)):
            if click == 0 and config.first_click == "random":
                rng = np.random.default_rng([config.seed, int(image_ids[i]), int(j)])
                x, y = _first_click_random(targets[i, j], rng)
                label, placed = FOREGROUND, True
            else:
                x, y, label, placed = next_click(targets[i, j], predicted[i, j])
            if placed:
                coords[i, j, click] = (x, y)
                labels[i, j, click] = label
        masks, scores, low_res = predict(coords, labels, mask_inputs, click == 0)
        best, mask_inputs, best_iou, output_ious = _score(masks, scores, low_res, device_targets)
        iou[:, :, click] = np.asarray(best_iou)
        oracle[:, :, click] = np.asarray(output_ious).max(axis=-1)
        if click == 0:
            first_scores, first_ious = np.asarray(scores, np.float32), np.asarray(output_ious, np.float32)
        predicted = np.asarray(best)
        if click + 1 in keep_clicks:
            kept[click + 1] = predicted
    per_mask_image = np.repeat(np.asarray(image_ids)[:, None], m, axis=1)[valid]
    image_hw = np.full((b, 2), targets.shape[-2:]) if image_hw is None else np.asarray(image_hw)
    fraction = targets.sum(axis=(-2, -1)) / np.maximum(np.prod(image_hw, axis=-1, keepdims=True), 1)  # padding: 0
    per_mask = (iou[valid], oracle[valid], per_mask_image, fraction[valid], first_scores[valid], first_ious[valid])
    if not keep_clicks:
        return ProtocolResult(*per_mask)
    return ProtocolResult(*per_mask, kept, coords, labels)


def evaluate_batch(model: Sam, params, batch: Dict[str, np.ndarray], config: ProtocolConfig,
                   keep_clicks: tuple[int, ...] = ()) -> ProtocolResult:
    """The protocol with a model on one batch of preprocessed examples (numpy, masks
    unpacked: (B, M, T, T) bool); the image is encoded once, each click decodes every mask."""
    image_hw = jnp.asarray(batch["image_size"])
    embeddings = encode_images(model, params, jnp.asarray(batch["image"]), image_hw)

    def predict(coords, labels, mask_inputs, multimask):
        return _predict(model, params, embeddings, jnp.asarray(coords), jnp.asarray(labels), mask_inputs,
                        image_hw, multimask)

    valid = np.asarray(batch["mask_valid"], bool)
    return run_protocol(predict, batch["masks"], valid, np.asarray(batch["image_id"]), config, keep_clicks,
                        np.asarray(batch["image_size"]))


GRAY = 128  # the uniform image value of `gray_images`


def gray_images(batches: Iterable[Dict[str, np.ndarray]]) -> Iterable[Dict[str, np.ndarray]]:
    """The batches with every image replaced by uniform grey, masks and sizes unchanged: the
    protocol on them measures what a model scores without seeing the images (from where the
    prompts fall alone)."""
    for batch in batches:
        yield dict(batch, image=np.full_like(batch["image"], GRAY))


def evaluate(model: Sam, params, batches: Iterable[Dict[str, np.ndarray]], config: ProtocolConfig,
             progress: Optional[Any] = None) -> ProtocolResult:
    """The protocol over batches of preprocessed examples; `progress` (e.g. tqdm) is updated per image."""
    parts = []
    for batch in batches:
        parts.append(evaluate_batch(model, params, batch, config))
        if progress is not None:
            progress.update(int(np.asarray(batch["image"]).shape[0]))
    if not parts:
        raise ValueError("no examples to evaluate")
    return ProtocolResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in _PER_MASK))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def evaluate_images(predictor, instances: Iterable[Instances], config: ProtocolConfig, batch_images: int = 4,
                    progress: Optional[Any] = None) -> ProtocolResult:
    """The protocol at each image's original resolution, `batch_images` images per encoder
    call. `predictor`: a `SamBatchPredictor` (or anything with its `set_images` /
    `predict_batch`). Crowd regions are not prompted; images without a mask are skipped."""
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    parts = []
    examples = iter(instances)
    while group := list(itertools.islice(examples, batch_images)):
        prompted = [x for x in group if (~x.iscrowd).any()]
        if prompted:
            parts.append(_evaluate_group(predictor, prompted, config))
        if progress is not None:
            progress.update(len(group))
    if not parts:
        raise ValueError("no images with masks to evaluate")
    return ProtocolResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in _PER_MASK))


def _evaluate_group(predictor, group: Sequence[Instances], config: ProtocolConfig) -> ProtocolResult:
    # Sizes are rounded up so that groups share the jitted scoring's shapes.
    h = _round_up(max(x.size[0] for x in group), 64)
    w = _round_up(max(x.size[1] for x in group), 64)
    counts = [int((~x.iscrowd).sum()) for x in group]
    m = bucket(max(counts))
    targets = np.zeros((len(group), m, h, w), bool)
    valid = np.zeros((len(group), m), bool)
    for i, x in enumerate(group):
        hi, wi = x.size
        targets[i, : counts[i], :hi, :wi] = x.masks[~x.iscrowd]
        valid[i, : counts[i]] = True
    predictor.set_images([x.image for x in group])

    def predict(coords, labels, mask_inputs, multimask):
        k = int(np.max(np.nonzero((labels != PADDING).any(axis=(0, 1)))[0])) + 1  # click slots used so far
        mask_inputs = None if mask_inputs is None else np.asarray(mask_inputs)
        prompts = [
            {"point_coords": coords[i, :n, :k], "point_labels": labels[i, :n, :k]}
            | ({} if mask_inputs is None else {"mask_input": mask_inputs[i, :n]})
            for i, n in enumerate(counts)
        ]
        outputs = predictor.predict_batch(prompts, multimask_output=multimask)
        c = outputs[0][1].shape[1]
        low = outputs[0][2].shape[-2:]
        masks = np.zeros((len(group), m, c, h, w), bool)
        scores = np.zeros((len(group), m, c), np.float32)
        low_res = np.zeros((len(group), m, c) + low, np.float32)
        for i, (masks_i, scores_i, low_res_i) in enumerate(outputs):
            n, _, hi, wi = masks_i.shape
            masks[i, :n, :, :hi, :wi] = masks_i
            scores[i, :n] = scores_i
            low_res[i, :n] = low_res_i
        return masks, scores, low_res

    return run_protocol(predict, targets, valid, np.array([x.image_id for x in group]), config,
                        image_hw=np.array([x.size for x in group]))
