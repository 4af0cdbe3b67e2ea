"""Text prompts measured (the paper's section 7.5): mIoU of the mask a phrase gives, against
a click, a random embedding, and the CLIP embedding of the object's own crop.

For every object of an image that carries a caption no other object of the image shares
(`sam_jax.data.captions.unique_captions`), at the image's original resolution:

  text              the CLIP text embedding of its caption, alone (3 masks, the most confident)
  text_1_click      then one corrective click (`clicks.next_click` on that mask's errors) with
                    the text kept and the previous low-res logits fed back (1 mask)
  point             one click farthest from the boundary (3 masks, the most confident)
  point_2_clicks    then one corrective click, as for text (1 mask)
  random_embedding  a random unit vector in the text's place (the control: what the head does
                    with an embedding that names nothing)
  crop_embedding    the CLIP image embedding of a crop around the object made as in training
                    (`sam_jax.clip.crops`, with the box expanded 1.5x and no blacking out): what the model was trained on, so the ceiling of a perfectly aligned
                    text embedding
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.clip import CLIP
from sam_jax.clip.crops import crop_windows, sample_crop
from sam_jax.clip.model import preprocess as clip_preprocess
from sam_jax.evaluation.clicks import next_click
from sam_jax.metrics import mask_iou
from sam_jax.modeling.prompt_encoder import FOREGROUND

PROMPTS = ("text", "text_1_click", "point", "point_2_clicks", "random_embedding", "crop_embedding")
ORACLE_EXPAND = (1.5, 1.5)  # the box expansion of the crop embedding: the middle of training's U[1, 2]


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """An image and the objects to prompt by text: masks (K, H, W) bool, their K captions."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (K, H, W) bool
    captions: Sequence[str]


@dataclasses.dataclass
class TextPromptResult:
    num_images: int
    num_objects: int
    miou: Dict[str, float]  # PROMPTS -> mean IoU over the objects
    per_object: List[Dict[str, Any]]  # caption and each prompt's IoU

    def summary(self) -> Dict[str, Any]:
        return {"num_images": self.num_images, "num_objects": self.num_objects, "miou": self.miou}


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def crop_embeddings(clip: CLIP, clip_params: Any, image: np.ndarray, masks: np.ndarray,
                    expand_range: tuple[float, float] = ORACLE_EXPAND) -> np.ndarray:
    """(K, E) CLIP image embeddings of crops around K masks (K, H, W) of `image` (H, W, 3), made by
    the training recipe on the image zero-padded to a square, as the input frame pads it."""
    h, w = masks.shape[1:]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.float32)
    square[:h, :w] = image
    square_masks = np.zeros((len(masks), side, side), bool)
    square_masks[:, :h, :w] = masks
    boxes = np.stack([_box(m) for m in masks])
    keys = jax.random.split(jax.random.PRNGKey(0), len(masks))
    windows = crop_windows(keys, jnp.asarray(boxes), expand_range)
    size = clip.config.vision.image_size
    crops, regions = jax.vmap(lambda m, wdw: sample_crop(jnp.asarray(square), m, wdw, size))(
        jnp.asarray(square_masks), windows)
    return np.asarray(clip.apply({"params": clip_params}, clip_preprocess(crops), regions, method=CLIP.encode_image))


def _best(masks: np.ndarray, scores: np.ndarray, low_res: np.ndarray):
    best = np.argmax(scores, axis=1)
    pick = lambda x: x[np.arange(len(x)), best]
    return pick(masks), pick(low_res)


def _ious(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.asarray(mask_iou(jnp.asarray(predicted), jnp.asarray(targets)))


def _corrected(predictor, targets, first_masks, first_low_res, **prompt):
    """One corrective click on each first mask's errors, the first prompt kept, logits fed back."""
    clicks = [next_click(t, p) for t, p in zip(targets, first_masks)]
    coords = np.array([[[c.x, c.y]] for c in clicks], np.float32)
    labels = np.array([[c.label] for c in clicks], np.int32)
    extra = prompt.pop("points", None)
    if extra is not None:
        coords = np.concatenate([extra[0], coords], axis=1)
        labels = np.concatenate([extra[1], labels], axis=1)
    masks, _, _ = predictor.predict_batch(coords, labels, mask_input=first_low_res[:, None],
                                          multimask_output=False, **prompt)
    return masks[:, 0]


def evaluate_text_prompts(predictor, clip: CLIP, clip_image_params: Any, images: Iterable[CaptionedImage],
                          seed: int = 0, progress: Optional[Any] = None) -> TextPromptResult:
    """Runs every prompt of PROMPTS on every captioned object. `predictor`: a `SamPredictor` of a
    model with a text head and a `text_encoder`; `clip` / `clip_image_params`: the CLIP whose
    image tower makes the crop embeddings (`{"visual", "logit_scale"}` params suffice)."""
    rng = np.random.default_rng(seed)
    rows: List[Dict[str, Any]] = []
    num_images = 0
    embed_dim = predictor.model.config.text_embed_dim
    for item in images:
        num_images += 1
        if progress is not None:
            progress.update(1)
        if not len(item.captions):
            continue
        targets = np.asarray(item.masks, bool)
        predictor.set_image(item.image)
        captions = list(item.captions)
        ious = {}

        masks, scores, low_res = predictor.predict_batch(text=captions)
        text_masks, text_low_res = _best(masks, scores, low_res)
        ious["text"] = _ious(text_masks, targets)
        ious["text_1_click"] = _ious(_corrected(predictor, targets, text_masks, text_low_res, text=captions), targets)

        first = [next_click(t, np.zeros_like(t)) for t in targets]
        points = (np.array([[[c.x, c.y]] for c in first], np.float32), np.full((len(first), 1), FOREGROUND, np.int32))
        masks, scores, low_res = predictor.predict_batch(*points)
        point_masks, point_low_res = _best(masks, scores, low_res)
        ious["point"] = _ious(point_masks, targets)
        ious["point_2_clicks"] = _ious(_corrected(predictor, targets, point_masks, point_low_res, points=points),
                                       targets)

        random = rng.normal(size=(len(targets), embed_dim)).astype(np.float32)
        random /= np.linalg.norm(random, axis=1, keepdims=True)
        masks, scores, low_res = predictor.predict_batch(text_embeddings=random)
        ious["random_embedding"] = _ious(_best(masks, scores, low_res)[0], targets)

        crops = crop_embeddings(clip, clip_image_params, item.image, targets)
        masks, scores, low_res = predictor.predict_batch(text_embeddings=crops)
        ious["crop_embedding"] = _ious(_best(masks, scores, low_res)[0], targets)

        for k, caption in enumerate(captions):
            rows.append({"image": num_images - 1, "caption": caption, **{p: float(ious[p][k]) for p in PROMPTS}})
    miou = {p: float(np.mean([r[p] for r in rows])) if rows else float("nan") for p in PROMPTS}
    return TextPromptResult(num_images=num_images, num_objects=len(rows), miou=miou, per_object=rows)
