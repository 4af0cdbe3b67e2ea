"""`SamPredictor`: the official predictor's API on sam_jax.

Embed an image once with `set_image`, then prompt it repeatedly with
`predict` (one prompt) or `predict_batch` (many prompts at once). Inputs and
outputs are numpy arrays in the original image's frame, with the official
shapes. The encoder is compiled once per model. The decoder is compiled once
per bucket of prompt sizes: the number of points and of prompts are padded
up to powers of two (padding points are masked out of attention, padding
prompts are dropped), so an interactive session that adds clicks one by one
compiles log2(clicks) times, not once per click; also once per (box or not,
mask or not, multimask or not), whatever the image size. The upsampling of the
masks to the image compiles once per image size.

Text prompts (the paper's section 7.5) need a model with a text-prompt head
(`config.text_embed_dim`, a checkpoint trained with them) and a
`sam_jax.clip.ClipTextEncoder` of that embedding size:
`SamPredictor(model, params, text_encoder)`, then `predict(text="a wheel")`,
alone or with points, a box or a mask input (e.g. a corrective click after the
text), or `predict_batch(text=[...])`, one phrase per prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling import Sam, decode_prompts, dense_pe, encode_images
from sam_jax.prompts import (bucket, check_prompts, check_text_embeddings, check_text_encoder, pad_text, prompt_counts,
                             require_text_prompts, to_input_frame)
from sam_jax.utils.transforms import ResizeLongestSide, as_rgb, pad_to_square

if TYPE_CHECKING:
    from sam_jax.clip.text_encoder import ClipTextEncoder


class SamPredictor:
    def __init__(self, model: Sam, params: Any, text_encoder: Optional["ClipTextEncoder"] = None) -> None:
        """`model, params = sam_jax.load_sam(path)`; `SamPredictor(model, params)`.

        `text_encoder`: a `sam_jax.clip.ClipTextEncoder` for text prompts; the model must
        have a text-prompt head of the encoder's embedding size (ValueError otherwise)."""
        check_text_encoder(model.config, text_encoder)
        self.model = model
        self.params = params
        self.text_encoder = text_encoder
        self.transform = ResizeLongestSide(model.config.image_size)
        self.reset_image()

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = params
        # The decoder's positional encoding depends on the params alone: computed once per params.
        self.image_pe = dense_pe(self.model, params)

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: Optional[jax.Array] = None
        self.original_size: Optional[tuple[int, int]] = None
        self.input_size: Optional[tuple[int, int]] = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embeds an (H, W, 3) uint8 image in `image_format` "RGB" or "BGR"."""
        image = as_rgb(image, image_format)
        self.set_transformed_image(self.transform.apply_image(image), image.shape[:2])

    def set_transformed_image(
        self, transformed_image: np.ndarray, original_image_size: tuple[int, int]
    ) -> None:
        """Embeds an (H', W', 3) image already resized by `ResizeLongestSide` (the
        official `set_torch_image`, channels-last)."""
        s = self.model.config.image_size
        shape = transformed_image.shape
        if len(shape) != 3 or shape[2] != 3 or max(shape[:2]) != s:
            raise ValueError(
                f"transformed image must be (H, W, 3) with longest side {s}; got {transformed_image.shape}"
            )
        self.reset_image()
        images, sizes = pad_to_square([np.asarray(transformed_image)], s, 1)
        self.features = encode_images(self.model, self.params, images, sizes)
        self.original_size = tuple(int(x) for x in original_image_size)
        self.input_size = tuple(int(x) for x in transformed_image.shape[:2])
        self.is_image_set = True

    def set_embedding(self, features: jax.Array, input_size: tuple[int, int],
                      original_size: tuple[int, int]) -> None:
        """Sets an image embedded earlier: the `features` (1, h, w, D), `input_size` and
        `original_size` a `set_image` left (a server's cache keeps them), without encoding."""
        h, w = self.model.config.embedding_size, self.model.config.embedding_size
        if np.shape(features) != (1, h, w, self.model.config.prompt_embed_dim):
            raise ValueError(f"features must be (1, {h}, {w}, {self.model.config.prompt_embed_dim}); "
                             f"got {np.shape(features)}")
        self.features = features
        self.original_size = tuple(int(x) for x in original_size)
        self.input_size = tuple(int(x) for x in input_size)
        self.is_image_set = True

    def get_image_embedding(self) -> jax.Array:
        """(1, D, h, w) image embedding, in the official layout."""
        self._require_image()
        return jnp.transpose(self.features, (0, 3, 1, 2))

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: Optional[str] = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the set image.

        Args:
          point_coords: (N, 2) (x, y) pixels in the original image; with
            point_labels (N,): 1 foreground, 0 background.
          box: (4,) XYXY pixels in the original image.
          mask_input: (1, 256, 256) low-res logits from an earlier prediction.
          text: a phrase (needs a `text_encoder` and a model with a text-prompt
            head); alone or with the other prompts.
        Returns:
          masks (C, H, W) bool (float logits if return_logits), iou_predictions
          (C,), low_res_logits (C, 256, 256); C = 3 with multimask_output else 1.
        """
        m = self.model.config.low_res_mask_size
        if box is not None and np.ndim(box) == 2:  # (1, 4) as the official predictor also accepts
            if np.shape(box)[0] != 1:
                raise ValueError(f"predict takes one box, (4,); got {np.shape(box)}: use predict_batch for several")
            box = np.asarray(box)[0]
        for name, value, shape, wanted in (("point_coords", point_coords, (None, 2), "(N, 2)"),
                                         ("point_labels", point_labels, (None,), "(N,)"),
                                         ("box", box, (4,), "(4,) XYXY"),
                                         ("mask_input", mask_input, (1, m, m), f"(1, {m}, {m})")):
            if value is not None and not _fits(np.shape(value), shape):
                raise ValueError(f"{name} must be {wanted} (predict takes one prompt); got {np.shape(value)}")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text must be one phrase, a str (predict takes one prompt; predict_batch takes "
                             f"one phrase per prompt); got {type(text).__name__} {text!r}")
        one = lambda x: None if x is None else np.asarray(x)[None]
        masks, iou, low_res = self.predict_batch(
            one(point_coords), one(point_labels), one(box), one(mask_input), multimask_output, return_logits,
            text=None if text is None else [text])
        return masks[0], iou[0], low_res[0]

    def predict_batch(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        boxes: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: Optional[Sequence[str]] = None,
        text_embeddings: Optional[np.ndarray] = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompts on the set image at once (the official `predict_torch`, but in the
        original image's frame): point_coords (B, N, 2), point_labels (B, N),
        boxes (B, 4), mask_input (B, 1, 256, 256), text B phrases (prompt b
        takes the b-th of each given kind), or instead of text, text_embeddings
        (B, E): CLIP embeddings computed elsewhere (a mask crop's image embedding,
        as in training; L2-normalised, no text_encoder needed). Returns (B, C, H, W)
        masks, (B, C) IoU predictions and (B, C, 256, 256) low-res logits."""
        self._require_image()
        if text_embeddings is None:
            embeddings = self.embed_text(text)
        elif text is not None:
            raise ValueError("give text or text_embeddings, not both")
        else:
            embeddings = check_text_embeddings(self.model.config, text_embeddings)
        num_texts = None if embeddings is None else len(embeddings)
        prompts = check_prompts(self.model.config, point_coords, point_labels, boxes, mask_input, num_texts)
        b, n = prompt_counts(*prompts, num_texts=num_texts)
        padded = to_input_frame(self.transform, self.original_size, *prompts, bucket(b), bucket(n))
        masks, iou, low_res = decode_prompts(
            self.model, self.params, self.features, *padded,
            bool(multimask_output), self.input_size, self.original_size, bool(return_logits),
            pad_text(embeddings, bucket(b)), self.image_pe,
        )
        return tuple(np.asarray(x[:b]) for x in (masks, iou, low_res))

    def embed_text(self, text: Optional[Sequence[str]]) -> Optional[np.ndarray]:
        """(B, E) CLIP embeddings of B phrases (None for None); ValueError when this predictor
        cannot take text prompts or a phrase is bad (not a str, empty, too long)."""
        if text is None:
            return None
        require_text_prompts(self.model.config, self.text_encoder)
        return self.text_encoder(text)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")


def _fits(shape: tuple, wanted: tuple) -> bool:
    """Whether `shape` is `wanted`, None matching any size."""
    return len(shape) == len(wanted) and all(w is None or s == w for s, w in zip(shape, wanted))

