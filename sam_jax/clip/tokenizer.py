"""CLIP's byte-level BPE tokenizer in pure Python (no torch), for text prompts.

Token ids match OpenAI CLIP's ``SimpleTokenizer`` and open_clip's
``SimpleTokenizer`` / ``open_clip.tokenize`` (open-clip-torch 3.3.0) exactly,
over-long and unicode text included; ``tests/test_clip_tokenizer.py`` checks
that. The cleaning, the pre-tokenizing pattern, the ``bytes_to_unicode`` table
and the BPE loop follow OpenAI's MIT-licensed CLIP code (see VOCAB_LICENSE).

Cleaning, as CLIP does it: ``ftfy.fix_text``, ``html.unescape`` twice, strip,
collapse whitespace, lowercase. Then ``regex`` splits the text into
contractions, runs of letters (``\\p{L}``), single digits (``\\p{N}``) and runs
of anything else; each piece's UTF-8 bytes are mapped to printable characters
and merged by BPE, the last symbol of a word carrying ``</w>``.

Like open_clip (and unlike HF's ``CLIPTokenizer``), the literal strings
``<start_of_text>`` / ``<end_of_text>`` inside a text are read as the special
tokens; OpenAI CLIP's spelling ``<|startoftext|>`` is ordinary text here.

Needs ``ftfy`` and ``regex`` (``pip install 'sam_jax[text]'``).
"""

from __future__ import annotations

import gzip
import html
import json
import os
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "ClipTokenizer",
    "DEFAULT_CONTEXT_LENGTH",
    "SOT_TOKEN_ID",
    "EOT_TOKEN_ID",
    "default_vocab_path",
]

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
# Lines [1, _NUM_MERGES] of the merges file (line 0 is the "#version" header)
# make CLIP's 49408-token vocabulary: 256 bytes, 256 bytes + "</w>", the
# merges, and the two special tokens.
_NUM_MERGES = 49152 - 256 - 2
_HF_SOT_TOKEN = "<|startoftext|>"
_HF_EOT_TOKEN = "<|endoftext|>"
_CACHE_LIMIT = 1 << 16
_PREVIEW_CHARS = 60

_INSTALL_HINT = "pip install ftfy regex  (or pip install 'sam_jax[text]')"


def default_vocab_path() -> str:
    """The shipped merges file, CLIP's ``bpe_simple_vocab_16e6.txt.gz``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "bpe_simple_vocab_16e6.txt.gz")


def _import_text_deps():
    try:
        import ftfy
    except ImportError as e:
        raise ImportError(
            "sam_jax.clip.ClipTokenizer cleans text with ftfy, as CLIP does, "
            f"and ftfy is not installed: {_INSTALL_HINT}") from e
    try:
        import regex
    except ImportError as e:
        raise ImportError(
            "sam_jax.clip.ClipTokenizer splits text with the 'regex' package "
            f"(for \\p{{L}} / \\p{{N}}), which is not installed: {_INSTALL_HINT}") from e
    return ftfy, regex


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to
    printable unicode characters: printable Latin-1 bytes map to themselves,
    the rest to chr(256 + n)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


def _preview(text: str) -> str:
    if len(text) > _PREVIEW_CHARS:
        text = text[:_PREVIEW_CHARS - 3] + "..."
    return repr(text)


def _read_lines(path) -> list[str]:
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8").split("\n")


class ClipTokenizer:
    """CLIP's BPE tokenizer: ``encode``, ``decode`` and ``__call__`` (open_clip's
    ``tokenize``: start/end tokens, zero padding to ``context_length``).

    Args:
      vocab_path: CLIP's merges file (``.txt.gz`` or plain text, first line a
        header). Default: the copy shipped in this package.
    """

    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        if vocab_path is None:
            vocab_path = default_vocab_path()
        lines = _read_lines(vocab_path)
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{os.fspath(vocab_path)!r} is not CLIP's merges file: expected a "
                f"header line and at least {_NUM_MERGES} lines of two symbols")
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend([SOT_TOKEN, EOT_TOKEN])
        self._setup(dict(zip(vocab, range(len(vocab)))), merges)

    @classmethod
    def from_huggingface(cls, folder: str | os.PathLike | None = None, *,
                         vocab_file: str | os.PathLike | None = None,
                         merges_file: str | os.PathLike | None = None) -> "ClipTokenizer":
        """From a Hugging Face CLIP tokenizer's ``vocab.json`` + ``merges.txt``
        (a folder holding both, or the two paths). Only the vocabulary and the
        merges are read; cleaning and splitting stay CLIP's own (HF's
        ``CLIPTokenizer`` skips ``html.unescape``). HF's special tokens
        ``<|startoftext|>`` / ``<|endoftext|>`` become the start/end ids."""
        if folder is not None:
            vocab_file = vocab_file or os.path.join(folder, "vocab.json")
            merges_file = merges_file or os.path.join(folder, "merges.txt")
        if vocab_file is None or merges_file is None:
            raise ValueError("from_huggingface needs a folder, or both vocab_file and merges_file")
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
        merges = [tuple(line.split()) for line in _read_lines(merges_file)
                  if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{os.fspath(merges_file)!r}: every merge line needs two symbols")
        for hf_name, name, want in ((_HF_SOT_TOKEN, SOT_TOKEN, SOT_TOKEN_ID),
                                    (_HF_EOT_TOKEN, EOT_TOKEN, EOT_TOKEN_ID)):
            token_id = encoder.pop(hf_name, None)
            if token_id is None:
                token_id = encoder.get(name)
            if token_id != want:
                raise ValueError(
                    f"{os.fspath(vocab_file)!r}: expected {hf_name!r} (or {name!r}) "
                    f"with id {want}, found {token_id!r}")
            encoder[name] = token_id
        self = cls.__new__(cls)
        self._setup(encoder, merges)
        return self

    def _setup(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]):
        ftfy, regex = _import_text_deps()
        self._fix_text = ftfy.fix_text
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.vocab_size = len(encoder)
        # open_clip puts its special-token strings first in the pattern, so a
        # literal "<end_of_text>" in a text is read as that token.
        self._specials = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.cache: dict[str, str] = dict(self._specials)
        self._pat = regex.compile(
            SOT_TOKEN + "|" + EOT_TOKEN
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    # ------------------------------------------------------------------ text

    def clean(self, text: str) -> str:
        """CLIP's cleaning: ftfy, HTML entities (twice), whitespace collapsed,
        lowercase."""
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer expects text as str, got {type(text).__name__}")
        text = self._fix_text(text)
        text = html.unescape(html.unescape(text))
        return " ".join(text.strip().split()).lower()

    def bpe(self, token: str) -> str:
        """BPE of one pre-token (already byte-mapped): its symbols, space-joined."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        inf = float("inf")
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            n = len(word)
            while i < n:
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < n - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(first)
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        out = " ".join(word)
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache = dict(self._specials)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after cleaning, without start/end tokens
        (``[]`` for text that cleans to nothing)."""
        text = self.clean(text)
        ids: list[int] = []
        byte_encoder, encoder = self.byte_encoder, self.encoder
        for token in self._pat.findall(text):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: open_clip's ``decode`` (every word ends in a space,
        so punctuation comes out space-separated) with the surrounding
        whitespace stripped, as HF's decode does. Invalid UTF-8 becomes
        U+FFFD. ``skip_special_tokens`` drops the start/end ids; padding zeros
        (``"!"``) are not dropped, so slice a row of ``__call__``'s output to
        its end token first."""
        if not isinstance(ids, (np.ndarray, Sequence)):
            ids = list(ids)
        pieces = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if skip_special_tokens and i in (SOT_TOKEN_ID, EOT_TOKEN_ID):
                continue
            piece = self.decoder.get(i)
            if piece is None:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            pieces.append(piece)
        text = "".join(pieces)
        # The special tokens' strings are printable ASCII, so they map back to
        # their own text, as in open_clip.
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    # ---------------------------------------------------------------- batch

    def __call__(self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
                 truncate: bool = False) -> np.ndarray:
        """open_clip's ``tokenize``: ``[SOT] + encode(text) + [EOT]``, zero
        padded to ``context_length``; int32 of shape (N, context_length).

        A text longer than ``context_length`` tokens (start/end included)
        raises ValueError, or with ``truncate=True`` is cut to
        ``context_length`` with the end token in the last position (exactly
        open_clip's truncation). A text with no tokens after cleaning (empty,
        whitespace only) raises ValueError: a text prompt needs a phrase.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, np.ndarray) and texts.ndim == 1:
            texts = texts.tolist()
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
            raise TypeError(
                f"ClipTokenizer expects a str or a sequence of str, got {type(texts).__name__}")
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        result = np.zeros((len(texts), int(context_length)), dtype=np.int32)
        for row, text in enumerate(texts):
            where = f"text {row} " if len(texts) > 1 else "text "
            if not isinstance(text, str):
                raise TypeError(f"ClipTokenizer expects text as str; {where}is {type(text).__name__}")
            ids = self.encode(text)
            if not ids:
                raise ValueError(
                    f"{where}{_preview(text)} is empty after cleaning (ftfy, HTML entities, "
                    "whitespace); a CLIP text prompt needs at least one word")
            tokens = [SOT_TOKEN_ID] + ids + [EOT_TOKEN_ID]
            if len(tokens) > context_length:
                if not truncate:
                    raise ValueError(
                        f"{where}{_preview(text)} is {len(tokens)} tokens long (start and end "
                        f"tokens included), over the context length of {context_length}; "
                        "shorten it, or pass truncate=True to cut it")
                tokens = tokens[:context_length]
                tokens[-1] = EOT_TOKEN_ID
            result[row, :len(tokens)] = tokens
        return result

