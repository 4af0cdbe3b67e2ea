"""Where the first click's gap to the oracle comes from: a linear readout of the decoder's tokens.

The point protocol scores a first click's most confident output (the IoU head's choice); its
`iou_head_first_click` summary says how often that is the best of the three. This asks why not
more often. It fits, on the training split's first clicks, a ridge regression from the decoder's
output tokens to the three outputs' actual IoU, and scores the held-out split's first clicks by
the readout's choice:

- `iou_token`: the IoU head's only input (the transformer's output for token 0). A readout well
  above the head means the head is not trained to what its input holds; one near the head, that
  the input lacks it (linearly).
- `mask_tokens`: the three outputs' own tokens (which the head does not read).
- `all_tokens`: both.

    python -m experiments.iou_head_probe --checkpoint workdir/synthetic_cpu/model
        [--dataset sam_synthetic/cpu] [--train-images 300] [--test-images 50]
        [--output workdir/synthetic_cpu/iou_head_probe.json]

Frame and clicks are the training run's held-out evaluation (`sam_jax.training.loop.evaluate`):
images preprocessed to the model's input size, the first click farthest from the mask's
boundary, masks compared at that size. The ridge strength is chosen by a 2-fold split of the
training masks, never by the held-out ones.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.data.pipeline import DEFAULT_DATA_DIR
from sam_jax.evaluation.clicks import next_click
from sam_jax.metrics import mask_iou
from sam_jax.modeling import Sam, encode_images, valid_region
from sam_jax.modeling.interpolate import resize_bilinear
from sam_jax.modeling.prompt_encoder import PADDING
from sam_jax.modeling.transformer import TwoWayTransformer

READOUTS = ("iou_token", "mask_tokens", "all_tokens")
RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def first_click_tokens(model, params, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The first click on every valid mask of a preprocessed batch (numpy, masks (B, M, T, T)
    bool) -> per valid mask n: "tokens" (n, 4, D) the transformer's outputs for the IoU token and
    the three multimask tokens, "predicted" (n, 3) the head's scores, "actual" (n, 3) the
    outputs' IoU against the mask."""
    targets = np.asarray(batch["masks"], bool)
    valid = np.asarray(batch["mask_valid"], bool)
    b, m = valid.shape
    coords = np.zeros((b, m, 1, 2), np.float32)
    labels = np.full((b, m, 1), PADDING, np.int32)
    for i, j in zip(*np.nonzero(valid)):
        x, y, label, _ = next_click(targets[i, j], np.zeros_like(targets[i, j]))
        coords[i, j, 0], labels[i, j, 0] = (x, y), label
    image_hw = jnp.asarray(batch["image_size"])
    embeddings = encode_images(model, params, jnp.asarray(batch["image"]), image_hw)
    tokens, predicted, actual = _decode_first_click(model, params, embeddings, jnp.asarray(coords),
                                                    jnp.asarray(labels), image_hw, jnp.asarray(targets))
    return {"tokens": np.asarray(tokens)[valid], "predicted": np.asarray(predicted)[valid],
            "actual": np.asarray(actual)[valid]}


@functools.partial(jax.jit, static_argnums=0)
def _decode_first_click(model, params, embeddings, coords, labels, image_hw, targets):
    def one_image(embedding, c, l):
        (low_res, iou), state = model.apply(
            {"params": params}, embedding[None], c, l, None, None, True, None, method=Sam.decode,
            capture_intermediates=lambda module, method: isinstance(module, TwoWayTransformer),
            mutable=["intermediates"])
        (hs, _), = state["intermediates"]["mask_decoder"]["transformer"]["__call__"]
        return low_res, iou, hs

    low_res, iou, hs = jax.vmap(one_image)(embeddings, coords, labels)
    t = model.config.image_size
    b, m, c = iou.shape
    masks = resize_bilinear(low_res.reshape((b * m, c) + low_res.shape[-2:]), (t, t)) > model.config.mask_threshold
    masks = masks.reshape(b, m, c, t, t) & valid_region(image_hw, t)[:, None, None]
    # The transformer returns only the tokens the decoder reads: the IoU token, then the c
    # multimask ones.
    return hs, iou, mask_iou(masks, targets[:, :, None])


def collect(model, params, batches: Iterable[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    parts = [first_click_tokens(model, params, batch) for batch in batches]
    if not parts:
        raise ValueError("no examples to probe")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def features(tokens: np.ndarray, readout: str) -> np.ndarray:
    """(n, 4, D) tokens -> (n, F) inputs of a readout."""
    if readout == "iou_token":
        return tokens[:, 0]
    if readout == "mask_tokens":
        return tokens[:, 1:].reshape(len(tokens), -1)
    if readout == "all_tokens":
        return tokens.reshape(len(tokens), -1)
    raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")


def fit_ridge(x: np.ndarray, y: np.ndarray, strength: float) -> np.ndarray:
    """(n, F), (n, K) -> (F + 1, K) weights (the last row the bias, not penalised) minimising
    |[x 1] w - y|^2 + strength |w[:-1]|^2, in float64."""
    x1 = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    penalty = strength * np.eye(x1.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(x1.T @ x1 + penalty, x1.T @ np.asarray(y, np.float64))


def predict_ridge(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ w[:-1] + w[-1]


def chosen_iou(scores: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """The actual IoU of each row's highest-scored output (ties to the first, as argmax)."""
    return np.take_along_axis(actual, np.argmax(scores, axis=1)[:, None], axis=1)[:, 0]


def choose_strength(x: np.ndarray, y: np.ndarray, strengths: Sequence[float] = RIDGE_STRENGTHS) -> float:
    """The strength whose readout, fitted on one half of the rows and scored on the other (both
    ways), picks outputs of the highest mean IoU; the first of equals."""
    half = len(x) // 2
    if half < 1:
        raise ValueError(f"choosing a ridge strength needs at least 2 training masks, got {len(x)}")
    folds = ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half)))

    def score(strength):
        return np.mean([chosen_iou(predict_ridge(fit_ridge(x[a], y[a], strength), x[b]), y[b]).mean()
                        for a, b in folds])

    scores = [score(s) for s in strengths]
    return float(strengths[int(np.argmax(scores))])


def share(scores: np.ndarray) -> List[float]:
    counts = np.bincount(np.argmax(scores, axis=1), minlength=scores.shape[1])
    return [float(v) for v in counts / len(scores)]


def probe(train: Dict[str, np.ndarray], test: Dict[str, np.ndarray]) -> Dict[str, object]:
    """Readouts fitted on `train`, scored on `test` (both from `collect`), beside the head."""
    actual = test["actual"]
    results: Dict[str, object] = {
        "num_train_masks": int(len(train["actual"])), "num_test_masks": int(len(actual)),
        "head": {"miou": float(chosen_iou(test["predicted"], actual).mean()),
                 "chosen_share": share(test["predicted"]),
                 "pearson_r": float(np.corrcoef(test["predicted"].ravel(), actual.ravel())[0, 1])},
        "oracle_miou": float(actual.max(axis=1).mean()),
        "best_share": share(actual),
    }
    for readout in READOUTS:
        x_train, x_test = features(train["tokens"], readout), features(test["tokens"], readout)
        strength = choose_strength(x_train, train["actual"])
        scores = predict_ridge(fit_ridge(x_train, train["actual"], strength), x_test)
        results[readout] = {"miou": float(chosen_iou(scores, actual).mean()), "chosen_share": share(scores),
                            "pearson_r": float(np.corrcoef(scores.ravel(), actual.ravel())[0, 1]),
                            "ridge_strength": strength}
    return results


def run(checkpoint: str, dataset: str, data_dir: Optional[str], train_images: int, test_images: int,
        batch_images: int = 8) -> Dict[str, object]:
    from sam_jax.data.pipeline import evaluation_batches, open_source
    from sam_jax.data.preprocess import PreprocessConfig
    from sam_jax.training.config import DataConfig
    from sam_jax.weights import load_sam

    for name, value in (("--train-images", train_images), ("--test-images", test_images),
                        ("--batch-images", batch_images)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model, params = load_sam(checkpoint)
    size = model.config.image_size
    preprocess = PreprocessConfig(image_size=size, low_res_size=model.config.low_res_mask_size,
                                  max_masks=DataConfig.eval_max_masks, input_res_masks=True)
    sources = {split: open_source(dataset, split, data_dir) for split in ("train", "validation")}  # fail early
    counts = {"train": min(train_images, len(sources["train"])),
              "validation": min(test_images, len(sources["validation"]))}
    train, test = (collect(model, params, evaluation_batches(sources[s], preprocess, batch_images, counts[s]))
                   for s in ("train", "validation"))
    return {"checkpoint": str(checkpoint), "model": model.config.name, "dataset": dataset,
            "train_images": counts["train"], "test_images": counts["validation"], **probe(train, test)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a converted or trained sam_jax checkpoint")
    parser.add_argument("--dataset", default="sam_synthetic/cpu", help="a prepared data set with train and validation")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--train-images", type=int, default=300, help="training images the readouts are fitted on")
    parser.add_argument("--test-images", type=int, default=50, help="held-out images they are scored on")
    parser.add_argument("--batch-images", type=int, default=8)
    parser.add_argument("--output", help="JSON file (default: iou_head_probe.json beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        results = run(args.checkpoint, args.dataset, args.data_dir, args.train_images, args.test_images,
                      args.batch_images)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / "iou_head_probe.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    rows = [("head", results["head"])] + [(r, results[r]) for r in READOUTS]
    for name, row in rows:
        print(f"{name:12s} 1-click mIoU {row['miou']:.3f}  picks {' / '.join(f'{v:.2f}' for v in row['chosen_share'])}")
    print(f"{'oracle':12s} 1-click mIoU {results['oracle_miou']:.3f}  best  "
          f"{' / '.join(f'{v:.2f}' for v in results['best_share'])}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
