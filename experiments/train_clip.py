"""Trains the tiny CLIP of the text-prompt demonstration on (object crop, caption) pairs of the synthetic scenes.

    python -m experiments.train_clip --workdir workdir/clip_tiny                 # the defaults: ~4 min on 2 cores
    python -m experiments.train_clip --workdir DIR --steps 2000 --batch 64 --seed 0

The SAM paper (section 7.5, appendix D.5) trains SAM with CLIP *image* embeddings of mask crops as
prompts and prompts it with CLIP *text* embeddings at inference. With no real CLIP here, a tiny one
(`CLIP_CONFIGS["tiny"]`) learns the captions of `sam_jax.data.captions` ("large red ellipse") for
the objects of the synthetic main job's data:

  data    scenes of `sam_synthetic/cpu` (the dataset of `experiments.train_configs.synthetic_cpu`),
          each rebuilt from its seed by `example_scene`: training pairs from its train split's
          first `--train-images` scenes, held-out pairs from its validation split's first
          `--heldout-images` (the first 100 are the main job's validation images; the streams never
          share a seed). Each scene goes to the input frame as SAM's training pipeline puts it
          (`synthetic_cpu`'s PreprocessConfig: longest side to 256, zero padding, a horizontal flip
          with probability 1/2, masks resampled bilinearly and thresholded, the 64x64 low-res mask
          by block majority, the box tight on the input-frame mask); objects covering more than
          90% of the image are dropped as there (`max_mask_fraction`).
  pairs   every captioned object (`captioned_objects`: wholes, own colour on >= half the mask) of
          at least `--min-area` input-frame pixels (625 = 25^2 at 256, the paper's 100^2 at 1024)
          with its caption. The pool is made once, in a plain numpy loop, before training; batches
          are drawn from it uniformly.
  crops   made on the fly in the jitted step with exactly SAM's training-prompt recipe
          (`sam_jax.training.text_prompts`: `crop_windows` expands the box by U[1, 2] and squares it,
          `sample_crop` resamples it to 64x64 bilinearly, pixels outside the mask are zeroed with
          probability 1/2, and the crop's mask is the `region` CLIP's last layer attends to), from
          one fresh key per pair per step; held-out crops from fixed keys.
  loss    the symmetric InfoNCE loss of CLIP over the batch with the learned temperature
          (exp(logit_scale), logit_scale kept in [0, log 100] after each update as CLIP clamps it).
          Pairs with the same caption are positives for each other: each row's target is uniform
          over the batch's pairs with its caption (label-equality targets), so duplicate captions
          in a batch are never pushed apart.
  optim   AdamW (b1 0.9, b2 0.98, eps 1e-6 as CLIP), weight decay on matrices only, linear warmup
          then cosine decay to zero.

Evaluation: every held-out crop is classified to the nearest (cosine) text embedding among all
distinct held-out captions; `accuracy` is the share whose caption is right, `accuracy_size` /
`_colour` / `_shape` the share whose predicted caption has the right word of that attribute.
`accuracy_all_captions` does the same over every size x colour x shape phrase (180), and
`text_to_crop_top1` is the share of distinct captions whose nearest held-out crop carries them;
`train_accuracy` is `accuracy` on the first 1,000 training pairs (fresh crops, their own captions).

Measured (the defaults: 2,000 steps of 64 pairs, peak lr 3e-3, 5,242 pairs from 1,468 of the first 1,500
train scenes, built in 20 s; 702 held-out pairs from 200 validation scenes, 157 distinct captions) on a
shared 2-core CPU host: 236 s in all (205 s training, ~0.1 s a step). Held-out caption accuracy 0.091
(chance 1/157 = 0.006): colour 0.82, size 0.47 (3 words, ~1/3 each), shape 0.26 (5 words; the commonest
is ~24% of the objects), training pairs 0.14. Colour is learned; size and especially shape are barely
above chance at this budget (the crop is rescaled to 64 px, so size shows only as texture scale and
the image border; shapes are often occluded or clipped, and 2 layers on an 8x8 patch grid see
silhouettes coarsely). Positives: label equality (see `loss`).

Writes `metrics.json` and the CLIP checkpoint `clip/` (`sam_jax.clip.load_clip`) in the workdir and
prints a one-line summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_jax.clip import CLIP, CLIP_CONFIGS, ClipTokenizer, init_clip_params, preprocess, save_clip
from sam_jax.data import captions as captions_lib
from sam_jax.data.builders.sam_synthetic import SPLIT_CODES, SamSynthetic, example_scene
from sam_jax.data.preprocess import PreprocessConfig, sample_geometry
from sam_jax.clip.crops import crop_windows, sample_crop
from sam_jax.training.text_prompts import ZERO_OUTSIDE_STREAM, TextPromptConfig

CLIP_CONFIG = "tiny"
DATASET = "sam_synthetic/cpu"
MIN_AREA = 625  # input-frame pixels: 25^2 at 256, the paper's 100^2 at 1024
METRIC_KEYS = ("accuracy", "accuracy_size", "accuracy_colour", "accuracy_shape")


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class PairPool:
    """(crop source, caption) pairs: the input-frame images and, per pair, what SAM's crop needs.

    images    (I, S, S, 3) uint8 input frames (zero padded)
    image     (P,) int32 index of each pair's image
    low_res   (P, L, L) bool the object's low-res mask (block majority of its input-frame mask)
    boxes     (P, 4) float32 XYXY, tight on the input-frame mask (x1, y1 exclusive)
    captions  (P,) str
    """

    images: np.ndarray
    image: np.ndarray
    low_res: np.ndarray
    boxes: np.ndarray
    captions: List[str]

    def __len__(self) -> int:
        return len(self.captions)


def dataset_config(dataset: str = DATASET):
    """The `SamSyntheticConfig` of a `sam_synthetic/<name>` dataset."""
    name = dataset.split("/", 1)[1] if "/" in dataset else "default"
    for config in SamSynthetic.BUILDER_CONFIGS:
        if config.name == name:
            return config
    raise ValueError(f"unknown sam_synthetic config {name!r}")


def main_job_preprocess() -> PreprocessConfig:
    """The synthetic main job's input-frame recipe (`experiments.train_configs.synthetic_cpu`)."""
    from experiments.train_configs import synthetic_cpu
    return synthetic_cpu().data.preprocess


def frame_pairs(scene, preprocess_config: PreprocessConfig, rng: np.random.Generator, min_area: float):
    """One scene in the input frame: (frame (S, S, 3) uint8, [(low_res, box, caption), ...])."""
    h, w = scene.image.shape[:2]
    size, low = preprocess_config.image_size, preprocess_config.low_res_size
    block = size // low
    geometry = sample_geometry(h, w, preprocess_config, rng)
    frame = np.zeros((size, size, 3), np.uint8)
    frame[:geometry.valid_h, :geometry.valid_w] = geometry.resample(scene.image)
    scale = (geometry.scale_y * geometry.scale_x)
    pairs = []
    for i in captions_lib.captioned_objects(scene, int(math.ceil(min_area / scale))):
        if scene.masks[i].sum() > preprocess_config.max_mask_fraction * h * w:
            continue
        canvas = np.zeros((size, size), bool)
        canvas[:geometry.valid_h, :geometry.valid_w] = geometry.resample(scene.masks[i].astype(np.uint8) * 255) >= 128
        if canvas.sum() < min_area:
            continue
        low_res = 2 * canvas.reshape(low, block, low, block).sum(axis=(1, 3)) >= block * block
        if not low_res.any():
            continue
        rows, cols = np.flatnonzero(canvas.any(axis=1)), np.flatnonzero(canvas.any(axis=0))
        box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
        pairs.append((low_res, box, captions_lib.caption(scene, i)))
    return frame, pairs


def make_pool(split: str, num_images: int, *, data_seed: Optional[int] = None, dataset: str = DATASET,
              min_area: float = MIN_AREA, preprocess_config: Optional[PreprocessConfig] = None) -> PairPool:
    """The pairs of the first `num_images` scenes of `split` ("train" / "validation") of `dataset`;
    `data_seed` replaces the dataset config's seed. Images without a pair are not kept."""
    config = dataset_config(dataset)
    if data_seed is not None:
        config = dataclasses.replace(config, seed=data_seed)
    preprocess_config = preprocess_config or main_job_preprocess()
    images, image, low_res, boxes, texts = [], [], [], [], []
    for index in range(num_images):
        scene = example_scene(config, split, index)
        rng = np.random.default_rng([config.seed, SPLIT_CODES[split], index, 7])  # the flip draw
        frame, pairs = frame_pairs(scene, preprocess_config, rng, min_area)
        if not pairs:
            continue
        for mask, box, text in pairs:
            image.append(len(images))
            low_res.append(mask)
            boxes.append(box)
            texts.append(text)
        images.append(frame)
    size, low = preprocess_config.image_size, preprocess_config.low_res_size
    return PairPool(
        images=np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        image=np.array(image, np.int32),
        low_res=np.stack(low_res) if low_res else np.zeros((0, low, low), bool),
        boxes=np.stack(boxes) if boxes else np.zeros((0, 4), np.float32),
        captions=texts,
    )


def prompt_crops(images: jax.Array, low_res: jax.Array, boxes: jax.Array, keys: jax.Array,
                 size: int, config: TextPromptConfig = TextPromptConfig()):
    """SAM's training-prompt crops (`sam_jax.training.text_prompts.crop_embedder`'s recipe, same key
    use): images (K, S, S, 3) uint8 / float in [0, 255], low_res (K, L, L) bool, boxes (K, 4), keys
    (K,) -> (crops (K, size, size, 3) float in [0, 255], regions (K, size, size) bool)."""
    windows = crop_windows(keys, boxes, config.expand_range)
    crops, regions = jax.vmap(lambda image, mask, window: sample_crop(image.astype(jnp.float32), mask, window, size))(
        images, low_res, windows)
    zero = jax.vmap(lambda key: jax.random.bernoulli(jax.random.fold_in(key, ZERO_OUTSIDE_STREAM),
                                                     config.zero_outside_probability))(keys)
    crops = jnp.where(zero[:, None, None, None] & ~regions[..., None], 0.0, crops)
    return crops, regions


# ---------------------------------------------------------------- loss and step


def contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, labels: jax.Array,
                     logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE loss with label-equality targets: pairs with equal `labels` are
    positives for each other (each row's target uniform over them). Embeddings L2-normalised (B, E)."""
    logits = jnp.exp(logit_scale) * image_embeddings @ text_embeddings.T
    same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    target = same / same.sum(axis=1, keepdims=True)
    image_to_text = -jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1)
    text_to_image = -jnp.sum(target * jax.nn.log_softmax(logits.T, axis=1), axis=1)  # `same` is symmetric
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def make_optimizer(learning_rate: float, steps: int, warmup: int, weight_decay: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup, 1), max(steps, warmup + 1), 0.0)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # not gains, biases, scale
    return optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay, mask=decay_mask), schedule


def make_train_step(model: CLIP, optimizer, crop_size: int):
    def loss_fn(params, images, low_res, boxes, keys, tokens, labels):
        crops, regions = prompt_crops(images, low_res, boxes, keys, crop_size)
        image_embeddings = model.apply({"params": params}, preprocess(crops), regions, method=CLIP.encode_image)
        text_embeddings = model.apply({"params": params}, tokens, method=CLIP.encode_text)
        return contrastive_loss(image_embeddings, text_embeddings, labels, params["logit_scale"])

    @jax.jit
    def step(params, opt_state, pool_images, pair_image, pool_low_res, pool_boxes, pair_tokens, pair_labels,
             batch, key):
        idx = batch
        loss, grads = jax.value_and_grad(loss_fn)(
            params, pool_images[pair_image[idx]], pool_low_res[idx], pool_boxes[idx],
            jax.random.split(key, idx.shape[0]), pair_tokens[idx], pair_labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, math.log(100.0)))  # CLIP's clamp
        return params, opt_state, loss

    return step


# ---------------------------------------------------------------- evaluation


def retrieval_metrics(image_embeddings: np.ndarray, true_captions: Sequence[str], candidate_captions: Sequence[str],
                      text_embeddings: np.ndarray) -> Dict[str, float]:
    """Each image embedding (N, E) classified to the nearest (cosine) of the candidate captions' text
    embeddings (C, E): `accuracy` (the caption right) and `accuracy_size` / `_colour` / `_shape` (the
    predicted caption's word of that attribute right; captions are "<size> <colour> <shape>")."""
    image_embeddings = np.asarray(image_embeddings, np.float64)
    text_embeddings = np.asarray(text_embeddings, np.float64)
    image_embeddings = image_embeddings / np.linalg.norm(image_embeddings, axis=1, keepdims=True)
    text_embeddings = text_embeddings / np.linalg.norm(text_embeddings, axis=1, keepdims=True)
    predicted = [candidate_captions[j] for j in np.argmax(image_embeddings @ text_embeddings.T, axis=1)]
    right = np.array([[a == b for a, b in zip(p.split(), t.split())] + [p == t]
                      for p, t in zip(predicted, true_captions)], np.float64).reshape(-1, 4)
    size, colour, shape, whole = right.mean(axis=0) if len(right) else (math.nan,) * 4
    return {"accuracy": float(whole), "accuracy_size": float(size), "accuracy_colour": float(colour),
            "accuracy_shape": float(shape)}


def text_to_crop_top1(image_embeddings: np.ndarray, true_captions: Sequence[str], candidate_captions: Sequence[str],
                      text_embeddings: np.ndarray) -> float:
    """The share of candidate captions whose nearest image embedding is one of a crop with that caption."""
    nearest = np.argmax(np.asarray(text_embeddings) @ np.asarray(image_embeddings).T, axis=1)
    return float(np.mean([true_captions[j] == c for j, c in zip(nearest, candidate_captions)]))


def all_phrases() -> List[str]:
    return [" ".join(words) for words in itertools.product(captions_lib.SIZE_WORDS, captions_lib.COLOURS,
                                                            captions_lib.SHAPE_WORDS)]


def embed_pool(model: CLIP, params, pool: PairPool, key: jax.Array, crop_size: int, chunk: int = 256) -> np.ndarray:
    """(P, E) image embeddings of the pool's crops, crop k from fold_in(key, k)."""

    @jax.jit
    def embed(params, images, low_res, boxes, keys):
        crops, regions = prompt_crops(images, low_res, boxes, keys, crop_size)
        return model.apply({"params": params}, preprocess(crops), regions, method=CLIP.encode_image)

    keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(len(pool)))
    out = []
    for start in range(0, len(pool), chunk):
        sl = slice(start, min(start + chunk, len(pool)))
        n = sl.stop - sl.start
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], chunk - n, axis=0)]) if n < chunk else x
        out.append(np.asarray(embed(params, pad(pool.images[pool.image[sl]]), pad(pool.low_res[sl]), pad(pool.boxes[sl]),
                                    pad(np.asarray(keys[sl]))))[:n])
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def embed_texts(model: CLIP, params, tokenizer: ClipTokenizer, texts: Sequence[str]) -> np.ndarray:
    tokens = tokenizer(list(texts), context_length=model.config.text.context_length)
    return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIP.encode_text))(params, tokens))


def evaluate(model: CLIP, params, tokenizer: ClipTokenizer, pool: PairPool, key: jax.Array) -> Dict[str, Any]:
    crop_size = model.config.vision.image_size
    image_embeddings = embed_pool(model, params, pool, key, crop_size)
    candidates = sorted(set(pool.captions))
    text_embeddings = embed_texts(model, params, tokenizer, candidates)
    metrics = retrieval_metrics(image_embeddings, pool.captions, candidates, text_embeddings)
    phrases = all_phrases()
    every = retrieval_metrics(image_embeddings, pool.captions, phrases, embed_texts(model, params, tokenizer, phrases))
    metrics.update({f"{k.replace('accuracy', 'accuracy_all_captions')}": v for k, v in every.items()})
    metrics["text_to_crop_top1"] = text_to_crop_top1(image_embeddings, pool.captions, candidates, text_embeddings)
    metrics["heldout_captions"] = len(candidates)
    metrics["chance"] = 1.0 / max(len(candidates), 1)
    return metrics


# ---------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="init, batch order and crop draws")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--train-images", type=int, default=1500, help="train-split scenes in the pair pool")
    parser.add_argument("--heldout-images", type=int, default=200, help="validation-split scenes evaluated")
    parser.add_argument("--min-area", type=float, default=MIN_AREA, help="input-frame pixels of a captioned object")
    parser.add_argument("--data-seed", type=int, default=None, help="replaces the dataset config's seed")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2:
        parser.error("--steps must be >= 1 and --batch >= 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    config = CLIP_CONFIGS[CLIP_CONFIG]
    crop_size = config.vision.image_size

    train = make_pool("train", args.train_images, data_seed=args.data_seed, dataset=args.dataset,
                      min_area=args.min_area)
    heldout = make_pool("validation", args.heldout_images, data_seed=args.data_seed, dataset=args.dataset,
                        min_area=args.min_area)
    if len(train) == 0 or len(heldout) == 0:
        raise SystemExit(f"no pairs: {len(train)} train, {len(heldout)} held-out; use more images")
    data_seconds = time.perf_counter() - start
    print(f"pool: {len(train)} train pairs from {len(train.images)} images ({len(set(train.captions))} captions), "
          f"{len(heldout)} held-out pairs from {len(heldout.images)} images; {data_seconds:.1f} s", flush=True)

    tokenizer = ClipTokenizer()
    distinct = sorted(set(train.captions))
    label_of = {text: k for k, text in enumerate(distinct)}
    caption_tokens = tokenizer(distinct, context_length=config.text.context_length)
    labels = np.array([label_of[text] for text in train.captions], np.int32)
    # Training feeds only the columns up to the longest caption's end token: the text tower is causal
    # and pools at the end token, so the padding after it changes nothing (evaluation uses the full
    # context, as SAM's text prompts will).
    length = int(np.max(np.count_nonzero(caption_tokens, axis=1)))
    tokens = caption_tokens[labels][:, :length]

    model = CLIP(config)
    params = init_clip_params(config, seed=args.seed)
    optimizer, schedule = make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay)
    opt_state = optimizer.init(params)
    step = make_train_step(model, optimizer, crop_size)
    pool_arrays = tuple(jnp.asarray(x) for x in (train.images, train.image, train.low_res, train.boxes, tokens, labels))

    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    losses = []
    train_start = time.perf_counter()
    for i in range(args.steps):
        batch = rng.choice(len(train), size=args.batch, replace=len(train) < args.batch)
        params, opt_state, loss = step(params, opt_state, *pool_arrays, jnp.asarray(batch, jnp.int32),
                                       jax.random.fold_in(key, i))
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            losses.append((i + 1, float(loss)))
            print(f"step {i + 1}/{args.steps}: loss {float(loss):.3f}, logit scale "
                  f"{math.exp(float(params['logit_scale'])):.1f}, lr {float(schedule(i)):.2e}, "
                  f"{time.perf_counter() - train_start:.0f} s", flush=True)
    train_seconds = time.perf_counter() - train_start

    metrics = evaluate(model, params, tokenizer, heldout, jax.random.PRNGKey(10_000 + args.seed))
    train_metrics = evaluate(model, params, tokenizer, _subset(train, 1000), jax.random.PRNGKey(20_000 + args.seed))
    checkpoint = save_clip(workdir / "clip", params, config, source=f"experiments.train_clip {' '.join(argv or sys.argv[1:])}",
                           overwrite=True)
    metrics.update({
        "train_accuracy": train_metrics["accuracy"],
        "final_loss": losses[-1][1],
        "loss_curve": losses,
        "logit_scale": math.exp(float(params["logit_scale"])),
        "positives": "label_equality",
        "steps": args.steps, "batch": args.batch, "seed": args.seed, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "min_area": args.min_area, "dataset": args.dataset,
        "train_images": int(args.train_images), "train_pairs": len(train), "train_captions": len(distinct),
        "heldout_images": int(args.heldout_images), "heldout_pairs": len(heldout),
        "data_seconds": data_seconds, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "checkpoint": str(checkpoint), "clip_config": CLIP_CONFIG,
    })
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"tiny CLIP, {args.steps} steps x {args.batch}: held-out caption accuracy {metrics['accuracy']:.3f} "
          f"over {metrics['heldout_captions']} captions (size {metrics['accuracy_size']:.3f}, colour "
          f"{metrics['accuracy_colour']:.3f}, shape {metrics['accuracy_shape']:.3f}; train "
          f"{metrics['train_accuracy']:.3f}), {len(heldout)} crops; {metrics['total_seconds']:.0f} s "
          f"({train_seconds:.0f} s training) -> {workdir}", flush=True)
    return metrics


def _subset(pool: PairPool, n: int) -> PairPool:
    return dataclasses.replace(pool, image=pool.image[:n], low_res=pool.low_res[:n], boxes=pool.boxes[:n],
                               captions=pool.captions[:n])


if __name__ == "__main__":
    main()
