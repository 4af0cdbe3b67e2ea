"""`SamBatchPredictor`: many images of different sizes, many prompts each, data-parallel.

`set_images` resizes each image on the host (the official longest-side
resize), zero-pads them to one (B, S, S, 3) uint8 batch and encodes it in one
jitted call whose batch axis is sharded over a 1-D device mesh ("data"):
every local device, and on a multi-host slice every process's devices, each
process passing only its own images. `predict_batch` decodes every image's
prompts in one jitted call sharded the same way (prompt and point counts are
padded to a common power of two, padding masked out exactly as in
`SamPredictor`), then upsamples each image's logits to its original size on
the device that holds them.

The batch is padded with blank images up to a multiple of the device count;
their results are dropped. Results equal `SamPredictor`'s image by image.

Text prompts: with a `text_encoder` (see `SamPredictor`), an image's prompts
may hold "text", one phrase per prompt; every image's phrases are embedded in
one call (on each process, its own images' phrases).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_jax.modeling import Sam, decode_batch, encode_images, upsample_masks
from sam_jax.prompts import (bucket, check_prompts, check_text_encoder, pad_text, prompt_counts, require_text_prompts,
                             to_input_frame)
from sam_jax.utils.transforms import ResizeLongestSide, to_input_batch

if TYPE_CHECKING:
    from sam_jax.clip.text_encoder import ClipTextEncoder

DATA_AXIS = "data"
PROMPT_KEYS = ("point_coords", "point_labels", "boxes", "mask_input", "text")


class SamBatchPredictor:
    def __init__(self, model: Sam, params: Any, devices: Optional[Sequence[jax.Device]] = None,
                 text_encoder: Optional["ClipTextEncoder"] = None):
        """`model, params = sam_jax.load_sam(path)`. `devices`: the mesh, default all
        devices of all processes; params are replicated on each. `text_encoder`: for
        text prompts, as `SamPredictor`'s."""
        check_text_encoder(model.config, text_encoder)
        self.text_encoder = text_encoder
        self.model = model
        self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        self.transform = ResizeLongestSide(model.config.image_size)
        self.reset_images()

    def reset_images(self) -> None:
        self.features: Optional[jax.Array] = None  # (B_global, h, w, D), sharded on B
        self.original_sizes: list[tuple[int, int]] = []  # this process's images
        self.input_sizes: list[tuple[int, int]] = []

    @property
    def num_images(self) -> int:
        """Images set on this process."""
        return len(self.original_sizes)

    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Embeds this process's (H_i, W_i, 3) uint8 images (sizes may differ)."""
        if len(images) == 0:
            raise ValueError("set_images needs at least one image")
        self.reset_images()
        batch, input_sizes = to_input_batch(images, self.transform, self._local_batch(len(images)), image_format)
        self.features = encode_images(self.model, self.params, self._shard(batch), self._shard(input_sizes))
        self.original_sizes = [np.shape(image)[:2] for image in images]
        self.input_sizes = [tuple(int(v) for v in size) for size in input_sizes[: len(images)]]

    def predict_batch(
        self,
        prompts: Sequence[dict],
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decodes every image's prompts at once.

        Args:
          prompts: one dict per set image, with `SamPredictor.predict_batch`'s
            arguments in that image's original frame: point_coords (P_i, N_i, 2)
            with point_labels (P_i, N_i), boxes (P_i, 4), mask_input
            (P_i, 1, 256, 256), text (P_i phrases). Every image must give the
            same kinds of prompt.
        Returns:
          per image: masks (P_i, C, H_i, W_i) (logits if return_logits), IoU
          predictions (P_i, C) and low-res logits (P_i, C, 256, 256).
        """
        if self.features is None:
            raise RuntimeError("Images must be set with .set_images(...) before mask prediction.")
        if len(prompts) != self.num_images:
            raise ValueError(f"got prompts for {len(prompts)} images; {self.num_images} are set")
        checked, texts = [], []
        for i, p in enumerate(prompts):
            unknown = set(p) - set(PROMPT_KEYS)
            if unknown:
                raise ValueError(f"image {i}: unknown prompt keys {sorted(unknown)}")
            try:
                text = p.get("text")
                if text is not None:
                    require_text_prompts(self.model.config, self.text_encoder)
                    text = self.text_encoder.tokenize(text)  # (P_i, L) token ids
                texts.append(text)
                checked.append(check_prompts(
                    self.model.config, p.get("point_coords"), p.get("point_labels"),
                    p.get("boxes"), p.get("mask_input"), None if text is None else len(text),
                ))
            except ValueError as e:
                raise ValueError(f"image {i}: {e}") from None
        kinds = {(*(x is not None for x in c), t is not None) for c, t in zip(checked, texts)}
        if len(kinds) > 1:
            raise ValueError("every image must give the same kinds of prompt (points, boxes, masks, text)")
        counts = np.array([prompt_counts(*c, num_texts=None if t is None else len(t))
                           for c, t in zip(checked, texts)])
        num_prompts, num_points = (bucket(int(n)) for n in self._global_max(counts.max(0)))
        embeddings = self._embed_texts(texts)
        padded = [
            (*to_input_frame(self.transform, size, *c, num_prompts, num_points), pad_text(e, num_prompts))
            for c, e, size in zip(checked, embeddings, self.original_sizes)
        ]
        local_batch = self.features.shape[0] // jax.process_count()
        stacked = []
        for k, first in enumerate(padded[0]):
            if first is None:
                stacked.append(None)
                continue
            x = np.zeros((local_batch, *first.shape), first.dtype)
            x[: len(padded)] = [p[k] for p in padded]
            stacked.append(self._shard(x))
        coords, labels, boxes, masks, text = stacked
        low_res, iou = decode_batch(
            self.model, self.params, self.features, coords, labels, boxes, masks, bool(multimask_output), text,
        )
        return [
            self._finish(low_res_i, iou_i, i, int(counts[i, 0]), return_logits)
            for i, (low_res_i, iou_i) in enumerate(zip(_local_rows(low_res), _local_rows(iou)))
            if i < self.num_images
        ]

    def _embed_texts(self, tokens: list[Optional[np.ndarray]]) -> list[Optional[np.ndarray]]:
        """Per image, the (P_i, E) embeddings of its (P_i, L) phrase tokens (None where none):
        one encoder call for all images."""
        given = [t for t in tokens if t is not None]
        if not given:
            return [None] * len(tokens)
        flat = self.text_encoder.embed_tokens(np.concatenate(given))
        out, start = [], 0
        for t in tokens:
            out.append(None if t is None else flat[start:start + len(t)])
            start += 0 if t is None else len(t)
        return out

    def _finish(self, low_res, iou, i, num_prompts, return_logits):
        """One image's padded device outputs -> numpy results at its original size."""
        low_res = low_res[:num_prompts]
        cfg = self.model.config
        masks = upsample_masks(low_res, self.input_sizes[i], self.original_sizes[i], cfg.image_size,
                          None if return_logits else cfg.mask_threshold)
        return np.asarray(masks), np.asarray(iou[:num_prompts]), np.asarray(low_res)

    def _local_batch(self, n: int) -> int:
        """Rows this process contributes: the largest image count of any process, rounded
        up to a multiple of this process's devices in the mesh."""
        n = int(self._global_max(np.array([n]))[0])
        local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        return -(-n // local) * local

    def _shard(self, local: np.ndarray) -> jax.Array:
        """This process's rows -> a global array sharded over the mesh's data axis."""
        sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        return jax.make_array_from_process_local_data(sharding, local)

    @staticmethod
    def _global_max(x: np.ndarray) -> np.ndarray:
        if jax.process_count() == 1:
            return x
        return np.asarray(multihost_utils.process_allgather(x)).max(0)


def _local_rows(x: jax.Array) -> list[jax.Array]:
    """The rows of a batch-sharded array that live on this process, in order, each left on
    its device."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return [row for s in shards for row in s.data]
