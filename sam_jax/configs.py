"""Model configurations: the released `vit_b`, `vit_l`, `vit_h` and a tiny test variant.

A config holds what fixes the parameter shapes (it is saved beside converted
params); run-time options such as the compute dtype or block scanning are
fields of the `Sam` module instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]  # blocks with global attention; others are windowed
    image_size: int = 1024  # square input side after padding
    patch_size: int = 16  # 1024 / 16 = 64x64 token grid
    window_size: int = 14  # grid padded 64 -> 70 in windowed blocks
    mlp_ratio: float = 4.0
    out_chans: int = 256  # neck output, equals the prompt embedding dim

    def __post_init__(self):
        _require_ints(self, ("embed_dim", "depth", "num_heads", "image_size", "patch_size", "window_size",
                             "out_chans"))
        _require_number(self, "mlp_ratio")
        indexes = self.global_attn_indexes
        if not isinstance(indexes, (tuple, list)) or not all(_is_int(i) and 0 <= i < self.depth for i in indexes):
            raise ValueError(f"global_attn_indexes must be block indices in [0, depth={self.depth}); got {indexes!r}")
        if self.embed_dim % self.num_heads or self.image_size % self.patch_size:
            raise ValueError(f"embed_dim ({self.embed_dim}) must divide by num_heads ({self.num_heads}) and "
                             f"image_size ({self.image_size}) by patch_size ({self.patch_size})")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def blocks_per_group(self) -> int:
        """Blocks in one scan group: the windowed blocks before a global one, plus it."""
        return self.depth // len(self.global_attn_indexes)

    def is_periodic(self) -> bool:
        """True when every group of `blocks_per_group` blocks ends in its one global block."""
        n = len(self.global_attn_indexes)
        g = self.blocks_per_group
        return n > 0 and g * n == self.depth and tuple(self.global_attn_indexes) == tuple(
            g * (i + 1) - 1 for i in range(n)
        )


@dataclasses.dataclass(frozen=True)
class SamConfig:
    name: str
    encoder: ImageEncoderConfig
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16  # hidden channels of the dense mask-prompt downscaler
    decoder_depth: int = 2  # two-way transformer blocks
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2  # cross-attention internal dim = 256 / 2
    num_multimask_outputs: int = 3  # plus one single-mask token
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0
    # Size of the CLIP embeddings a text-prompt head projects to a sparse token (the
    # paper's section 7.5); None: no text head, as in the released models.
    text_embed_dim: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not isinstance(self.encoder, ImageEncoderConfig):
            raise ValueError(f"name must be a str and encoder an ImageEncoderConfig; got {self.name!r}, "
                             f"{type(self.encoder).__name__}")
        _require_ints(self, ("prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_mlp_dim",
                             "decoder_num_heads", "attention_downsample_rate", "num_multimask_outputs",
                             "iou_head_depth", "iou_head_hidden_dim"))
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 3
                    and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in value)):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B); got {value!r}")
        if not all(v > 0 for v in self.pixel_std):
            raise ValueError(f"pixel_std must be positive; got {self.pixel_std!r}")
        if not (isinstance(self.mask_threshold, numbers.Real) and math.isfinite(self.mask_threshold)):
            raise ValueError(f"mask_threshold must be a finite number; got {self.mask_threshold!r}")
        if self.text_embed_dim is not None:
            _require_ints(self, ("text_embed_dim",))
        if self.encoder.out_chans != self.prompt_embed_dim:
            raise ValueError(
                f"encoder out_chans ({self.encoder.out_chans}) must equal prompt_embed_dim "
                f"({self.prompt_embed_dim}): the decoder adds prompt and image embeddings"
            )

    @property
    def has_text_prompts(self) -> bool:
        """Whether the model takes CLIP embeddings as prompts (a text-prompt head)."""
        return self.text_embed_dim is not None

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the released models)."""
        return self.encoder.grid_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's mask logits and of mask prompts (256 released)."""
        return 4 * self.encoder.grid_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamConfig":
        d = dict(d)
        enc = dict(d.pop("encoder"))
        enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
        for key in ("pixel_mean", "pixel_std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(encoder=ImageEncoderConfig(**enc), **d)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= 1; got {value!r}")


def _require_number(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number > 0; got {value!r}")


CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig("vit_b", ImageEncoderConfig(768, 12, 12, (2, 5, 8, 11))),
    "vit_l": SamConfig("vit_l", ImageEncoderConfig(1024, 24, 16, (5, 11, 17, 23))),
    "vit_h": SamConfig("vit_h", ImageEncoderConfig(1280, 32, 16, (7, 15, 23, 31))),
    # Every structural feature of the released models at a size tests run in
    # milliseconds: a 16x16 grid padded to 28 for 14-windows, 2 scan groups.
    "vit_tiny": SamConfig(
        "vit_tiny",
        ImageEncoderConfig(32, 4, 2, (1, 3), image_size=256, out_chans=32),
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def get_config(name: str) -> SamConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; choose one of {sorted(CONFIGS)}") from None
