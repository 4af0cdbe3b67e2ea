"""SAM's interactive training loop: one encoder pass, 11 prompt-decode iterations per mask.

Iteration 1 prompts each mask with one foreground point sampled uniformly from
it or with its box plus noise (equal odds) and predicts 3 masks. Each later
iteration feeds back the previous unthresholded low-res logits of the mask
with the highest predicted IoU and, in 8 of the 10, adds one point sampled
uniformly from the previous prediction's error region (false negative ->
foreground, false positive -> background); the other 2 add nothing (one at a
random place among the first 9, one always last). Later iterations have more
than one prompt, so they use the single-mask output.

Everything runs on the device at fixed shapes: every mask has a point buffer

    slot 0              the first point (PADDING when the first prompt is a box)
    slots 1..P          correction points, filled in order (PADDING until then)
    slots P + 1, P + 2  the box corners (BOX_TOP_LEFT / BOX_BOTTOM_RIGHT, or PADDING)

which `Sam.decode` embeds exactly as the official point / box prompts (it adds
the official pad point when there are no box corners). Iterations
2..11 are a `lax.scan` whose body is rematerialised, and iteration 1 is
rematerialised as well, so memory holds one iteration's activations, not eleven
(`InteractiveConfig.remat=False` keeps them all and saves a forward pass). Fed-back logits are `stop_gradient`;
sampled points are integers of the data. Gradients reach the decoder from all
11 iterations and the encoder through the shared image embedding.

**How the 11 losses combine:** they are summed (as SAM 2's released training
code does); each iteration's loss is already a mean over valid masks.
"""

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from sam_jax.metrics import mask_iou
from sam_jax.modeling import Sam, decode_batch
from sam_jax.modeling.interpolate import resize_bilinear
from sam_jax.modeling.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, PADDING
from sam_jax.training import prompt_sampling
from sam_jax.training.losses import sam_loss
from sam_jax.training.text_prompts import TextPromptConfig

# decode(embeddings (B, h, w, D), coords (B, M, N, 2), labels (B, M, N), mask_inputs (B, M, 1, L, L) | None,
#        multimask[, text (B, M, E): only in text-prompt training]) -> low-res logits (B, M, C, L, L),
#        predicted IoU (B, M, C)
DecodeFn = Callable[..., Tuple[jax.Array, jax.Array]]


# Every random draw of a mask comes from its own key folded with one of these,
# so a mask's prompts do not depend on how the batch is split over devices.
_FIRST_PROMPT, _SCHEDULE, _CORRECTION, _TEXT_PROMPT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class InteractiveConfig:
    """The simulated interaction (defaults: the paper's 11 iterations) and the loss weights."""

    num_correction_points: int = 8
    num_mask_only: int = 2  # iterations that add no point: the last, and the rest at random places
    box_probability: float = 0.5
    box_noise_fraction: float = 0.1
    box_noise_max: float = 20.0
    loss_at_input_resolution: bool = False  # else the loss (and error regions) use the 256 low-res targets
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_kind: str = "mse"
    # Supervise the IoU predictions of all C candidates of a multimask step (SAM 2's released
    # training code), not only the lowest-loss one's, so that every candidate's score is trained
    # (on the synthetic job it did not make the head rank them better: README, Training).
    supervise_all_iou: bool = False
    # Decode an image's masks in this many rematerialised chunks (a lax.map): the decoder holds
    # one (masks / chunks) x tokens x 256 copy of the image tokens per activation, the bulk of a
    # 64-mask step's memory (`experiments/memory_plan.py`). Same losses, more recomputation.
    mask_chunks: int = 1
    # Decode the images in this many near-equal groups (at most one per image), each its own decoder
    # call with no data flow between them, so that XLA's CPU runtime runs them side by side: at a few
    # masks per image the decoder's ops are too small to keep every core busy alone (the main job's
    # full-loop step on a 2-core host: README, Training). Same losses up to float rounding. For CPUs.
    image_groups: int = 1
    # Rematerialise each iteration (and each chunk) in the backward pass: memory then holds one
    # iteration's activations instead of all of them, for one more forward pass of the decoder.
    remat: bool = True
    # Masks per image the loop trains: the first max_masks of those the input pipeline sampled
    # (a uniform random subset), None: all of them. The decoder's cost is per mask and per
    # iteration, the encoder's per image: a full loop on fewer masks than the pipeline gives
    # lets single-prompt steps (`TrainConfig.single_prompt_steps`, which train every mask)
    # learn from more masks at little cost.
    max_masks: Optional[int] = None
    # The paper's text-prompt training: CLIP crop embeddings as the first prompt of some masks
    # (`sam_jax.training.text_prompts`; needs a model with a text head and a CLIP image tower).
    text: TextPromptConfig = TextPromptConfig()

    def __post_init__(self):
        if self.mask_chunks < 1 or self.image_groups < 1:
            raise ValueError(f"mask_chunks and image_groups must be >= 1, got {self.mask_chunks}, {self.image_groups}")
        if self.num_correction_points < 0 or self.num_mask_only < 0:
            raise ValueError(
                f"num_correction_points and num_mask_only must be >= 0, got "
                f"{self.num_correction_points}, {self.num_mask_only}"
            )
        if self.max_masks is not None and self.max_masks < 1:
            raise ValueError(f"max_masks must be None or >= 1, got {self.max_masks}")
        if not 0.0 <= self.box_probability <= 1.0:
            raise ValueError(f"box_probability must be in [0, 1], got {self.box_probability}")

    @property
    def num_iterations(self) -> int:
        return 1 + self.num_correction_points + self.num_mask_only

    @property
    def num_point_slots(self) -> int:
        return self.num_correction_points + 3


# Batch entries with one row per mask (axis 1), as the input pipeline yields them.
PER_MASK_KEYS = ("masks", "masks_low_res", "boxes", "points", "point_valid", "mask_valid")


def masks_for_loop(batch: Dict[str, jax.Array], config: InteractiveConfig) -> Dict[str, jax.Array]:
    """The batch with only the masks the loop trains: the first `config.max_masks` per image."""
    if config.max_masks is None:
        return batch
    return {key: value[:, :config.max_masks] if key in PER_MASK_KEYS else value for key, value in batch.items()}


def correction_schedule(mask_keys: jax.Array, config: InteractiveConfig) -> jax.Array:
    """(num_iterations - 1, K) bool: True where iteration 2 + t adds a point to mask k.

    The last iteration adds none (if there is any mask-only iteration); the
    other mask-only iterations sit at random places among the rest, per mask.
    """
    k = mask_keys.shape[0]
    later = config.num_correction_points + config.num_mask_only
    if later == 0:
        return jnp.zeros((0, k), bool)
    if config.num_mask_only == 0:
        return jnp.ones((later, k), bool)
    # Rank random scores of the first later-1 iterations; the lowest num_mask_only-1 add no point.
    scores = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _SCHEDULE), (later - 1,)))(mask_keys)
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    adds = jnp.concatenate([ranks >= config.num_mask_only - 1, jnp.zeros((k, 1), bool)], axis=1)
    return adds.T


def initial_prompts(
    mask_keys: jax.Array, targets: jax.Array, boxes: jax.Array, image_hw: jax.Array, image_size: int,
    config: InteractiveConfig, use_text: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
    """First prompts of K masks -> point buffers: coords (K, N, 2), labels (K, N).

    Args:
      mask_keys: (K,) one PRNG key per mask.
      targets: (K, H, W) bool ground truth at the loss resolution.
      boxes: (K, 4) XYXY ground-truth boxes in the input frame.
      image_hw: (K, 2) valid image size in the input frame (noisy boxes stay inside).
      use_text: (K,) bool, masks prompted by their text token alone (no point, no box).
    """
    k = targets.shape[0]
    n, p = config.num_point_slots, config.num_correction_points

    def one(key, target, box, hw):
        choose_key, point_key, box_key = jax.random.split(jax.random.fold_in(key, _FIRST_PROMPT), 3)
        use_box = jax.random.bernoulli(choose_key, config.box_probability)
        point, _ = prompt_sampling.sample_point_in_mask(point_key, target, image_size)
        noisy = prompt_sampling.noisy_box(
            box_key, box.astype(jnp.float32), hw, config.box_noise_fraction, config.box_noise_max
        )
        return use_box, point, noisy

    with jax.named_scope("prompt_sampling"):
        use_box, point, box = jax.vmap(one)(mask_keys, targets, boxes, image_hw)
    use_point = ~use_box
    if use_text is not None:
        use_box, use_point = use_box & ~use_text, use_point & ~use_text
    coords = jnp.zeros((k, n, 2), jnp.float32)
    coords = coords.at[:, 0].set(point).at[:, p + 1].set(box[:, :2]).at[:, p + 2].set(box[:, 2:])
    labels = jnp.full((k, n), PADDING, jnp.int32)
    labels = labels.at[:, 0].set(jnp.where(use_point, FOREGROUND, PADDING))
    labels = labels.at[:, p + 1].set(jnp.where(use_box, BOX_TOP_LEFT, PADDING))
    labels = labels.at[:, p + 2].set(jnp.where(use_box, BOX_BOTTOM_RIGHT, PADDING))
    return coords, labels


def _at_loss_resolution(logits: jax.Array, size: int) -> jax.Array:
    """(K, C, L, L) -> (K, C, size, size), as SAM 2 brings logits to the target size."""
    return logits if logits.shape[-1] == size else resize_bilinear(logits, (size, size))


def _best(logits: jax.Array, iou: jax.Array) -> jax.Array:
    """(K, C, L, L), (K, C) -> (K, 1, L, L): the highest-predicted-IoU mask's logits."""
    best = jnp.argmax(iou, axis=1)
    return jnp.take_along_axis(logits, best[:, None, None, None], axis=1)


def _mask_iou(logits: jax.Array, targets: jax.Array, valid: jax.Array, num_valid=None) -> jax.Array:
    """Mean IoU over valid masks (or sum / num_valid) of (K, H, W) logits > 0 against targets."""
    iou = mask_iou(logits > 0, targets)
    count = jnp.sum(valid) if num_valid is None else num_valid
    return jnp.sum(jnp.where(valid, iou, 0.0)) / jnp.maximum(count, 1)


def interactive_loss(
    decode: DecodeFn,
    image_embeddings: jax.Array,
    batch: Dict[str, jax.Array],
    image_keys: jax.Array,
    config: InteractiveConfig,
    image_size: int,
    num_valid: Optional[jax.Array] = None,
    text_prompts: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The summed loss of the interactive iterations over a batch, and per-iteration metrics.

    Args:
      decode: see DecodeFn (the model's prompt encoder + mask decoder, params bound).
      image_embeddings: (B, h, w, D), from the encoder with gradients.
      batch: masks_low_res (B, M, L, L) bool, masks (B, M, T, T) bool if
        `loss_at_input_resolution`, boxes (B, M, 4), mask_valid (B, M),
        image_size (B, 2) (see `sam_jax.data.preprocess`).
      image_keys: (B,) PRNG keys, one per image (mask j of an image draws from
        its key folded with j, so the draws do not depend on the batch split).
      image_size: T, the model's input size.
      num_valid: divisor of each iteration's loss (default: this batch's valid
        masks; a data-parallel step passes the count over all devices).
      text_prompts: the masks' text-prompt keys (K,) -> (K, E) CLIP embeddings, zero
        rows for masks without a text prompt (`text_prompts.crop_embedder`). A mask with
        one starts from it alone; it stays the first token of every later iteration.
    Returns:
      (loss, metrics): metrics["loss"] / ["focal"] / ["dice"] / ["iou_loss"] are
      (num_iterations,) per-iteration values, metrics["miou"] the mean IoU of
      the highest-predicted-IoU mask after each iteration.
    """
    targets = batch["masks"] if config.loss_at_input_resolution else batch["masks_low_res"]
    b, m = targets.shape[:2]
    size = targets.shape[-1]
    k = b * m
    targets = targets.reshape(k, size, size).astype(bool)
    valid = batch["mask_valid"].reshape(k)
    image_hw = jnp.repeat(batch["image_size"], m, axis=0)
    mask_keys = jax.vmap(lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(m)))(image_keys)
    mask_keys = mask_keys.reshape((k,) + mask_keys.shape[2:])

    text = use_text = None
    if text_prompts is not None:
        text = jax.lax.stop_gradient(text_prompts(
            jax.vmap(lambda key: jax.random.fold_in(key, _TEXT_PROMPT))(mask_keys)))
        use_text = jnp.any(text != 0, axis=1)

    remat = jax.checkpoint if config.remat else (lambda f: f)
    chunks = config.mask_chunks
    if m % chunks:
        raise ValueError(f"interactive.mask_chunks={chunks} must divide the masks per image ({m})")

    # Group g decodes images bounds[g] .. bounds[g + 1] - 1.
    groups = min(config.image_groups, b)
    bounds = [g * b // groups for g in range(groups + 1)]

    def decode_in_groups(coords, labels, mask_inputs, multimask, *text):
        """`decode` on (B, M', ...) prompts, as independent calls on the groups of images."""
        if groups == 1:
            return decode(image_embeddings, coords, labels, mask_inputs, multimask, *text)
        outputs = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            part = lambda x: None if x is None else x[start:stop]
            outputs.append(decode(part(image_embeddings), part(coords), part(labels), part(mask_inputs), multimask,
                                  *map(part, text)))
        return tuple(jnp.concatenate(parts) for parts in zip(*outputs))

    def run(coords, labels, mask_inputs, multimask):
        if chunks == 1:
            shaped = lambda x: x.reshape((b, m) + x.shape[1:])
            logits, iou = decode_in_groups(shaped(coords), shaped(labels),
                                           None if mask_inputs is None else shaped(mask_inputs), multimask,
                                           *(() if text is None else (shaped(text),)))
            return logits.reshape((k,) + logits.shape[2:]), iou.reshape(k, -1)
        # (K, ...) -> (chunks, B, M / chunks, ...): chunk c holds masks c * M / chunks.. of every image
        split = lambda x: jnp.moveaxis(x.reshape((b, chunks, m // chunks) + x.shape[1:]), 1, 0)
        merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((k,) + x.shape[3:])
        chunk = remat(lambda args: decode_in_groups(*args[:3], multimask, *args[3:]))
        maybe = lambda x: None if x is None else split(x)
        texts = () if text is None else (split(text),)
        logits, iou = jax.lax.map(chunk, (split(coords), split(labels), maybe(mask_inputs), *texts))
        return merge(logits), merge(iou)

    @jax.named_scope("loss")
    def loss_of(logits, iou):
        total, parts = sam_loss(
            _at_loss_resolution(logits, size), iou, targets, valid,
            focal_weight=config.focal_weight, dice_weight=config.dice_weight,
            iou_weight=config.iou_weight, iou_kind=config.iou_kind,
            supervise_all_iou=config.supervise_all_iou, num_valid=num_valid,
        )
        best = _at_loss_resolution(_best(logits, iou), size)[:, 0]
        metrics = {"loss": total, "focal": parts["focal"], "dice": parts["dice"], "iou_loss": parts["iou"],
                   "miou": _mask_iou(best, targets, valid, num_valid)}
        return total, metrics

    @remat  # rematerialised too: else its activations (B x M copies of the image tokens) outlive the scan
    def first_iteration(coords, labels):
        logits, iou = run(coords, labels, None, True)
        total, metrics = loss_of(logits, iou)
        return total, metrics, jax.lax.stop_gradient(_best(logits, iou))

    coords, labels = initial_prompts(mask_keys, targets, batch["boxes"].reshape(k, 4), image_hw, image_size, config,
                                     use_text)
    total, first_metrics, previous = first_iteration(coords, labels)
    if config.num_iterations == 1:
        return total, jax.tree.map(lambda x: x[None], first_metrics)

    adds = correction_schedule(mask_keys, config)
    slots = jnp.arange(config.num_point_slots)

    @remat
    def iteration(carry, inputs):
        coords, labels, previous, added = carry
        add, t = inputs
        predicted = _at_loss_resolution(previous, size)[:, 0] > 0
        keys = jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, _CORRECTION), t))(mask_keys)
        with jax.named_scope("prompt_sampling"):
            point, label, has_error = jax.vmap(prompt_sampling.sample_correction, (0, 0, 0, None))(
                keys, predicted, targets, image_size
            )
        add = add & has_error & valid
        write = add[:, None] & (slots[None, :] == 1 + added[:, None])  # (K, N): the next correction slot
        coords = jnp.where(write[..., None], point[:, None, :], coords)
        labels = jnp.where(write, label[:, None], labels)
        logits, iou = run(coords, labels, previous, False)
        loss, metrics = loss_of(logits, iou)
        carry = (coords, labels, jax.lax.stop_gradient(logits), added + add.astype(jnp.int32))
        return carry, (loss, metrics)

    carry = (coords, labels, previous, jnp.zeros((k,), jnp.int32))
    _, (losses, metrics) = jax.lax.scan(iteration, carry, (adds, jnp.arange(adds.shape[0])))
    metrics = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), first_metrics, metrics)
    return total + jnp.sum(losses), metrics


def make_decode(model: Sam, params) -> DecodeFn:
    """DecodeFn of a `Sam` model and its params: `modeling.decode_batch` without box prompts
    (boxes travel as corner points in the point buffer)."""
    return lambda embeddings, coords, labels, mask_inputs, multimask, text=None: decode_batch(
        model, params, embeddings, coords, labels, None, mask_inputs, multimask, text)
