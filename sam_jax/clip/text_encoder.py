"""`ClipTextEncoder`: phrases -> L2-normalised CLIP text embeddings, the SAM text prompts.

    encoder = ClipTextEncoder.from_directory("converted/clip_vit_l14_336")
    embeddings = encoder(["a wheel", "beaver tooth grille"])   # (2, 768) float32, unit rows

The phrases are tokenized by `ClipTokenizer` (CLIP's BPE, open_clip's ids) and encoded by
`CLIP.encode_text` in one jitted call, compiled once per batch-size bucket: the number of
phrases is padded up to a power of two (`sam_jax.prompts.bucket`), the padding rows dropped.
Only the text tower's params are kept (the image tower is not needed for text prompts).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from sam_jax.clip.configs import ClipConfig
from sam_jax.clip.model import CLIP
from sam_jax.clip.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, ClipTokenizer
from sam_jax.prompts import bucket


@functools.partial(jax.jit, static_argnums=0)
def encode_tokens(model: CLIP, params, tokens: jax.Array) -> jax.Array:
    """(B, L) token ids -> (B, embed_dim) float32 L2-normalised text embeddings."""
    return model.apply({"params": params}, tokens, method=CLIP.encode_text)


class ClipTextEncoder:
    def __init__(self, config: ClipConfig, params: Mapping[str, Any], tokenizer: Optional[ClipTokenizer] = None,
                 truncate: bool = False) -> None:
        """`config, params = sam_jax.clip.load_clip(path)`; `ClipTextEncoder(config, params)`.

        `truncate`: cut phrases longer than the context length (open_clip's truncation) instead
        of raising ValueError."""
        if not isinstance(config, ClipConfig):
            raise TypeError(f"ClipTextEncoder needs a ClipConfig; got {type(config).__name__}")
        self.config = config
        self.model = CLIP(config)
        if "text" not in params or "logit_scale" not in params:
            raise ValueError("ClipTextEncoder needs CLIP params with the text tower ('text', 'logit_scale')")
        # The text tower and the (scalar) temperature, which `CLIP.setup` declares: enough for encode_text.
        self.params = {"text": params["text"], "logit_scale": params["logit_scale"]}
        self.tokenizer = ClipTokenizer() if tokenizer is None else tokenizer
        if self.tokenizer.vocab_size != config.text.vocab_size:
            raise ValueError(f"CLIP config {config.name!r} has a vocabulary of {config.text.vocab_size} tokens; "
                             f"the tokenizer's has {self.tokenizer.vocab_size}")
        self.truncate = bool(truncate)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, truncate: bool = False) -> "ClipTextEncoder":
        """The encoder of a CLIP checkpoint folder (`sam_jax.clip.checkpoint.save_clip`'s)."""
        from sam_jax.clip.checkpoint import load_clip  # orbax only when loading

        config, params = load_clip(path)
        return cls(config, params, truncate=truncate)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, context_length) int32 token ids; ValueError naming a phrase that is not a str,
        is empty after cleaning, or (unless `truncate`) is longer than the context length."""
        texts = check_texts(texts)
        return self.tokenizer(texts, context_length=self.context_length, truncate=self.truncate)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, embed_dim) float32 L2-normalised embeddings of N phrases (a str is one phrase)."""
        return self.embed_tokens(self.tokenize(texts))

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(N, context_length) token ids (`tokenize`'s) -> (N, embed_dim) float32 L2-normalised
        embeddings; N is padded up to a power of two, so each bucket compiles once."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be (N, {self.context_length}) with N >= 1; got {tokens.shape}")
        n = tokens.shape[0]
        padded = np.zeros((bucket(n), tokens.shape[1]), np.int32)
        padded[:, :2] = SOT_TOKEN_ID, EOT_TOKEN_ID  # padding rows: the empty text, dropped below
        padded[:n] = tokens
        return np.asarray(encode_tokens(self.model, self.params, padded))[:n]


def check_texts(texts: Any) -> list[str]:
    """A str or a sequence of str -> a non-empty list of str; ValueError naming what is not."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray) and texts.ndim == 1:
        texts = texts.tolist()
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise ValueError(f"text prompts must be a str or a sequence of str; got {type(texts).__name__} {texts!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("no text prompt: got an empty sequence of phrases")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            where = f"text {i} " if len(texts) > 1 else "text "
            raise ValueError(f"{where}{text!r} is a {type(text).__name__}, not a str")
    return texts
