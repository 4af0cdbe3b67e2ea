"""`SegmentationService`: one loaded model serving many images and clients, with no HTTP in it.

    service = SegmentationService(*load_sam(checkpoint), images_folder="photos/")
    image = service.embed_upload(data, "photo.jpg")           # encoder, once per content
    result = service.predict(image.image_id, point_coords=[[500, 375]], point_labels=[1])
    records = service.everything(image.image_id, pred_iou_thresh=0.86)

Images are known by `image_id`, the SHA-256 of the file's bytes: the
embedding cache (an LRU bounded in bytes) holds one entry per content, and
concurrent requests for one image encode it once. No file name is kept (two
clients sending the same bytes under different names share the embedding,
not the names). A prompt costs only the
decoder. Each prediction gets a random `prediction_id` under which its low-res
logits are kept, to be fed back as the next prompt's `mask_input` (as the
official demo does); a prediction can only be fed back on its own image.
`chosen_mask` gives one of them back as it was sent, with its prompt and its
stability score, for saving (annotations.py).

Errors are `RequestError`s carrying the HTTP status a server answers with and
a message naming the problem.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator, crop_boxes
from sam_jax.image_io import ImageError, ImageTooLargeError, decode_image, image_extensions
from sam_jax.modeling import Sam, decode_low_res, encode_images, upsample_masks
from sam_jax.predictor import SamPredictor
from sam_jax.prompts import check_inside
from sam_jax.serve.cache import ByteLRU
from sam_jax.utils.amg import (area_from_rle, batched_mask_to_box, box_xyxy_to_xywh, calculate_stability_score,
                               coco_encode_rle, mask_to_rle)

MiB = 2**20
STABILITY_OFFSET = 1.0  # chosen_mask's stability score: the generator's default offset

# The generator options a client may set per request, with the official defaults.
EVERYTHING_DEFAULTS = {
    "points_per_side": 32,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
    "min_mask_region_area": 0,
}


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class EmbeddedImage:
    """An image as the model saw it: (H, W, 3) uint8 `image`, its (1, h, w, D) `features`."""

    image_id: str
    mode: str  # the file's Pillow mode, before conversion to RGB
    image: np.ndarray
    features: jax.Array
    input_size: tuple[int, int]
    encode_seconds: float

    @property
    def original_size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.features.size * self.features.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A prompt's (C, L, L) float32 `low_res_logits` (feedback, and the full-resolution logits
    again), the `records` sent for them, and the prompt; sizes as `EmbeddedImage`'s."""

    prediction_id: str
    image_id: str
    low_res_logits: np.ndarray
    records: list[dict]
    point_coords: Optional[list[list[float]]]  # [[x, y], ...]
    point_labels: Optional[list[int]]
    box: Optional[list[float]]  # [x0, y0, x1, y1]
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.low_res_logits.nbytes + records_nbytes(self.records)


class SegmentationService:
    def __init__(self, model: Sam, params: Any, *, images_folder: Optional[str] = None,
                 cache_bytes: int = 2048 * MiB, max_upload_bytes: int = 50 * MiB,
                 max_image_pixels: int = 50_000_000) -> None:
        """`cache_bytes` bounds the embeddings (with their decoded images) kept;
        uploads over `max_upload_bytes` bytes or `max_image_pixels` pixels are refused."""
        self.model = model
        self.params = params
        # Each request decodes with a shallow copy of this one: it shares the params' positional
        # encoding, computed once here (`SamPredictor.image_pe`), and holds its own image.
        self._predictor = SamPredictor(model, params)
        self.images_folder = None if images_folder is None else Path(images_folder).resolve()
        if self.images_folder is not None and not self.images_folder.is_dir():
            raise ValueError(f"--images {images_folder}: no such folder")
        self._extensions = image_extensions()
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.embeddings = ByteLRU(cache_bytes, lambda e: e.nbytes)
        # Feedback logits, ~0.8 MB per prediction of the released models: the last few hundred.
        self.predictions = ByteLRU(256 * MiB, lambda p: p.nbytes)
        self.everything_results = ByteLRU(256 * MiB, lambda result: records_nbytes(result["records"]))
        self._encode_lock = threading.Lock()  # one encoder run at a time bounds memory
        self._everything_lock = threading.Lock()
        self.last_encode_seconds: Optional[float] = None
        self.decoder_warm = False  # warm_up_decoder has compiled the common prompt shapes

    # ----------------------------------------------------------------------------- images

    def list_images(self) -> list[str]:
        """Names of the image files directly in `images_folder` (none without one)."""
        if self.images_folder is None:
            return []
        return sorted(p.name for p in self.images_folder.iterdir() if self._servable(p.name))

    def folder_image(self, name: str) -> bytes:
        """The bytes of `images_folder/name`; only names `list_images` gives are served."""
        if self.images_folder is None:
            raise RequestError(404, "the server was started without --images: there is no folder to pick from")
        if not self._servable(name):
            raise RequestError(404, f"{name!r} is not an image in the --images folder")
        path = self.images_folder / name
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise RequestError(413, f"{name}: {size:,} bytes is over the {self.max_upload_bytes:,}-byte limit")
        return path.read_bytes()

    def _servable(self, name: str) -> bool:
        """Whether `name` is a plain name (no folder, not hidden) of an image file directly in
        `images_folder`, links resolved (a link may point outside it)."""
        if not name or name.startswith(".") or Path(name).name != name:
            return False
        path = self.images_folder / name
        try:
            return (path.suffix.lower() in self._extensions and path.is_file()
                    and path.resolve().parent == self.images_folder)
        except OSError:
            return False

    def embed_folder_image(self, name: str) -> tuple[EmbeddedImage, bool]:
        return self.embed_upload(self.folder_image(name), name)

    def embed_upload(self, data: bytes, name: str) -> tuple[EmbeddedImage, bool]:
        """(the embedded image, whether this call ran the encoder) for a file's bytes."""
        if len(data) > self.max_upload_bytes:
            raise RequestError(413, f"{name}: {len(data):,} bytes is over the {self.max_upload_bytes:,}-byte limit")
        image_id = hashlib.sha256(data).hexdigest()
        return self.embeddings.get_or_compute(image_id, lambda: self._encode(image_id, data, name))

    def _encode(self, image_id: str, data: bytes, name: str) -> EmbeddedImage:
        try:
            image, mode = decode_image(data, name, self.max_image_pixels)
        except ImageError as err:
            raise RequestError(413 if isinstance(err, ImageTooLargeError) else 415, str(err)) from None
        with self._encode_lock:
            start = time.perf_counter()
            predictor = copy.copy(self._predictor)
            predictor.set_image(image)
            predictor.features.block_until_ready()
            seconds = time.perf_counter() - start
            # Compile the decoder for this image size now, not on the first click.
            predictor.predict(np.zeros((1, 2)), np.ones(1), multimask_output=True)
        self.last_encode_seconds = seconds
        return EmbeddedImage(image_id, mode, image, predictor.features, predictor.input_size, seconds)

    def warm_up(self) -> None:
        """Compiles the encoder (one shape for every image), so the first image does not wait for it."""
        s = self.model.config.image_size
        encode_images(self.model, self.params, np.zeros((1, s, s, 3), np.uint8),
                      np.full((1, 2), s, np.int32)).block_until_ready()

    def warm_up_decoder(self) -> None:
        """Compiles the decoder for the prompts a person makes first (1 to 8 points, with or
        without a box and a fed-back mask; a box alone), so that clicks do not wait for it.
        The decoder does not depend on the image size; the page's prompts are multimask."""
        config = self.model.config
        features = jnp.zeros((1, config.embedding_size, config.embedding_size, config.prompt_embed_dim))
        box = np.zeros((1, 4), np.float32)
        mask = np.zeros((1, 1, config.low_res_mask_size, config.low_res_mask_size), np.float32)
        shapes = [(n, b, m) for n in (1, 2, 4, 8) for m in (False, True) for b in (False, True)]
        for n, with_box, with_mask in [(0, True, False), (0, True, True)] + shapes:
            coords = None if n == 0 else np.zeros((1, n, 2), np.float32)
            labels = None if n == 0 else np.ones((1, n), np.int32)
            decode_low_res(self.model, self.params, features, coords, labels, box if with_box else None,
                           mask if with_mask else None, True, None, self._predictor.image_pe)[0].block_until_ready()
        self.decoder_warm = True

    def image(self, image_id: str) -> EmbeddedImage:
        entry = self.embeddings.get(image_id)
        if entry is None:
            raise RequestError(404, f"image_id {image_id!r} is not embedded (or was evicted from the cache): "
                                    "POST the image to /embed again")
        return entry

    # ----------------------------------------------------------------------------- prompts

    def predict(self, image_id: str, point_coords: Optional[Sequence] = None,
                point_labels: Optional[Sequence] = None, box: Optional[Sequence] = None,
                mask_input: Optional[tuple[str, int]] = None, multimask_output: bool = True,
                store_logits: bool = True) -> dict:
        """Masks for one prompt, as `SamPredictor.predict` makes them. `mask_input` is
        (prediction_id, index): that earlier prediction's low-res logits fed back.

        Returns {"prediction_id", "masks": [{"segmentation": COCO RLE, "predicted_iou",
        "area", "bbox": XYWH}, ...], "decode_ms"}; prediction_id is None unless `store_logits`."""
        entry = self.image(image_id)
        h, w = entry.original_size
        coords = None if point_coords is None else np.asarray(point_coords, np.float64).reshape(-1, 2)
        labels = None if point_labels is None else np.asarray(point_labels)
        boxes = None if box is None else np.asarray(box, np.float64)
        if coords is not None and labels is not None and len(coords) != len(labels):
            raise RequestError(422, f"point_labels: {len(labels)} labels for {len(coords)} points")
        if coords is not None and len(coords) == 0:
            coords = labels = None
        try:
            check_inside(coords, boxes, w, h, f"image_id {image_id[:12]}...")
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        logits = None
        if mask_input is not None:
            prediction_id, index = mask_input
            logits = self._stored(image_id, prediction_id, index, "mask_input.",
                                  "predict again without mask_input").low_res_logits[index][None]
        if coords is None and boxes is None and logits is None:
            raise RequestError(422, "no prompt: give point_coords + point_labels, a box, or a mask_input")
        predictor = copy.copy(self._predictor)
        predictor.set_embedding(entry.features, entry.input_size, entry.original_size)
        start = time.perf_counter()
        try:
            masks, scores, low_res = predictor.predict(coords, labels, boxes, logits, multimask_output)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        decode_ms = 1000 * (time.perf_counter() - start)
        records = mask_records(masks, scores)
        prediction_id = None
        if store_logits:
            prediction_id = secrets.token_urlsafe(16)
            as_list = lambda x: None if x is None else x.tolist()
            self.predictions.put(prediction_id, Prediction(
                prediction_id, image_id, low_res.astype(np.float32), records, as_list(coords), as_list(labels),
                as_list(boxes), entry.input_size, entry.original_size))
        return {"prediction_id": prediction_id, "masks": records, "decode_ms": decode_ms}

    def chosen_mask(self, image_id: str, prediction_id: str, index: int) -> dict:
        """Mask `index` of a stored prediction on the image: its record as `predict` sent it, its
        prompt (point_coords, point_labels, box; None where not given), and its stability score,
        `calculate_stability_score` of its full-resolution logits (the config's mask_threshold,
        offset STABILITY_OFFSET), upsampled exactly as `SamPredictor.predict(return_logits=True)` does."""
        prediction = self._stored(image_id, prediction_id, index, "", "predict again")
        config = self.model.config
        logits = upsample_masks(prediction.low_res_logits[None], prediction.input_size, prediction.original_size,
                                config.image_size, None)
        stability = calculate_stability_score(np.asarray(logits[0, index]), config.mask_threshold, STABILITY_OFFSET)
        return {**prediction.records[index], "stability_score": float(stability),
                "point_coords": prediction.point_coords, "point_labels": prediction.point_labels,
                "box": prediction.box}

    def _stored(self, image_id: str, prediction_id: str, index: int, field: str, remedy: str) -> Prediction:
        """The stored prediction `prediction_id` on the image, with a mask `index`; `field`
        prefixes the request's field names in the errors."""
        prediction = self.predictions.get(prediction_id)
        if prediction is None or prediction.image_id != image_id:
            raise RequestError(422, f"{field}prediction_id {prediction_id!r} is not a prediction on this "
                                    f"image (or it was evicted): {remedy}")
        count = len(prediction.low_res_logits)
        if not 0 <= index < count:
            raise RequestError(422, f"{field}index {index} is out of range: that prediction has {count} masks")
        return prediction

    # ----------------------------------------------------------------------------- everything

    def everything(self, image_id: str, **settings) -> dict:
        """The automatic mask generator's records for the image (official layout,
        segmentation as COCO RLE), with {"records", "seconds", "settings"}; cached
        per image and settings."""
        entry = self.image(image_id)
        unknown = sorted(set(settings) - set(EVERYTHING_DEFAULTS))
        if unknown:
            raise RequestError(422, f"unknown settings {unknown}; known: {sorted(EVERYTHING_DEFAULTS)}")
        settings = {**EVERYTHING_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
        key = (image_id, tuple(sorted(settings.items())))

        def generate():
            try:
                crop_boxes(entry.original_size, settings["crop_n_layers"])
                generator = SamAutomaticMaskGenerator(self.model, self.params, output_mode="coco_rle", **settings)
            except ValueError as err:
                raise RequestError(422, str(err)) from None
            with self._everything_lock:
                start = time.perf_counter()
                records = generator.generate(entry.image, image_embedding=entry.features)
                seconds = time.perf_counter() - start
            return {"records": records, "seconds": seconds, "settings": settings}

        return self.everything_results.get_or_compute(key, generate)[0]


def records_nbytes(records: Sequence[dict]) -> int:
    """About the memory of mask records with COCO RLE segmentations."""
    return sum(len(r["segmentation"]["counts"]) + 200 for r in records)


def mask_records(masks: np.ndarray, scores: np.ndarray) -> list[dict]:
    """(C, H, W) bool masks and (C,) IoU predictions -> records with COCO RLE segmentations."""
    boxes = box_xyxy_to_xywh(batched_mask_to_box(masks)).tolist()  # as the generator's records
    return [{"segmentation": coco_encode_rle(rle), "predicted_iou": float(score), "area": area_from_rle(rle),
             "bbox": box} for rle, score, box in zip(mask_to_rle(masks), scores, boxes)]
