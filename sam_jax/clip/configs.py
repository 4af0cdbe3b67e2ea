"""CLIP model configurations: OpenAI's ViT-L/14@336px (the paper's text prompts), ViT-B/16, and a
tiny variant for tests and small experiments.

A config holds what fixes the parameter shapes, plus the two things the weights do not show (the
attention head counts and the MLP activation). Shapes of the params these give, for
`sam_jax.clip.model.CLIP(config)`:

    visual/conv1/kernel            (patch, patch, 3, vision.width)
    visual/positional_embedding    (grid * grid + 1, vision.width)   grid = image_size // patch_size
    visual/proj                    (vision.width, embed_dim)
    text/token_embedding/embedding (vocab_size, text.width)
    text/positional_embedding      (context_length, text.width)
    text/text_projection           (text.width, embed_dim)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

ACTIVATIONS = ("quick_gelu", "gelu")  # x * sigmoid(1.702 x) (OpenAI CLIP), exact erf GELU (most open_clip)


def _require_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= 1; got {value!r}")


def _require_positive(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number > 0; got {value!r}")


def _require_whole_mlp(config: Any) -> None:
    hidden = config.width * config.mlp_ratio
    if abs(hidden - round(hidden)) > 1e-6:
        raise ValueError(f"{type(config).__name__}: width * mlp_ratio ({config.width} * {config.mlp_ratio}) "
                         f"must be a whole number")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """The image tower: a ViT over (image_size, image_size, 3) images, class-token pooled."""

    image_size: int  # square input side in pixels
    patch_size: int  # non-overlapping patches: a (image_size / patch_size)^2 token grid
    width: int  # token dim
    layers: int  # residual attention blocks
    heads: int  # attention heads (not visible in the weights; OpenAI uses width / 64)
    mlp_ratio: float = 4.0  # MLP hidden dim = width * mlp_ratio

    def __post_init__(self):
        _require_ints(self, ("image_size", "patch_size", "width", "layers", "heads"))
        _require_positive(self, "mlp_ratio")
        if self.image_size % self.patch_size or self.width % self.heads:
            raise ValueError(f"ClipVisionConfig: image_size ({self.image_size}) must divide by patch_size "
                             f"({self.patch_size}) and width ({self.width}) by heads ({self.heads})")
        _require_whole_mlp(self)

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Class token plus grid_size^2 patch tokens."""
        return self.grid_size**2 + 1

    @property
    def mlp_dim(self) -> int:
        return round(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """The text tower: a causal transformer over BPE token ids, pooled at the EOT token."""

    width: int  # token dim
    layers: int  # residual attention blocks
    heads: int  # attention heads (not visible in the weights; OpenAI uses width / 64)
    context_length: int = 77  # tokens per text, start and end tokens included
    vocab_size: int = 49408  # CLIP's BPE vocabulary; EOT (49407) is the highest id
    mlp_ratio: float = 4.0  # MLP hidden dim = width * mlp_ratio

    def __post_init__(self):
        _require_ints(self, ("width", "layers", "heads", "context_length", "vocab_size"))
        _require_positive(self, "mlp_ratio")
        if self.width % self.heads:
            raise ValueError(f"ClipTextConfig: width ({self.width}) must divide by heads ({self.heads})")
        _require_whole_mlp(self)

    @property
    def mlp_dim(self) -> int:
        return round(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Both towers and the shared embedding: image and text map to (B, embed_dim)."""

    name: str
    embed_dim: int  # joint image-text embedding dim
    vision: ClipVisionConfig
    text: ClipTextConfig
    activation: str = "quick_gelu"  # MLP activation, one of ACTIVATIONS; not visible in the weights
    layer_norm_eps: float = 1e-5  # every LayerNorm (torch's default, as in OpenAI, open_clip and HF)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"ClipConfig.name must be a str; got {self.name!r}")
        if not isinstance(self.vision, ClipVisionConfig) or not isinstance(self.text, ClipTextConfig):
            raise ValueError(f"ClipConfig needs a ClipVisionConfig and a ClipTextConfig; got "
                             f"{type(self.vision).__name__}, {type(self.text).__name__}")
        _require_ints(self, ("embed_dim",))
        _require_positive(self, "layer_norm_eps")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ClipConfig.activation must be one of {ACTIVATIONS}; got {self.activation!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClipConfig":
        d = dict(d)
        return cls(vision=ClipVisionConfig(**d.pop("vision")), text=ClipTextConfig(**d.pop("text")), **d)


CLIP_CONFIGS: dict[str, ClipConfig] = {
    # OpenAI CLIP ViT-L/14@336px (open_clip "ViT-L-14-336", HF "openai/clip-vit-large-patch14-336"):
    # the model of the SAM paper's text prompts (appendix D.5).
    "vit_l14_336": ClipConfig(
        name="vit_l14_336",
        embed_dim=768,
        vision=ClipVisionConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16),
        text=ClipTextConfig(width=768, layers=12, heads=12),
        activation="quick_gelu",
    ),
    # OpenAI CLIP ViT-B/16 (open_clip "ViT-B-16" with the openai weights, HF "openai/clip-vit-base-patch16").
    "vit_b16": ClipConfig(
        name="vit_b16",
        embed_dim=512,
        vision=ClipVisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12),
        text=ClipTextConfig(width=512, layers=12, heads=8),
        activation="quick_gelu",
    ),
    # Tests and small models trained here: an 8x8 grid of 8-pixel patches, 32-token texts, CLIP's real
    # BPE vocabulary (hence the full vocab_size), exact GELU as in open_clip's own (non-OpenAI) models.
    "tiny": ClipConfig(
        name="tiny",
        embed_dim=64,
        vision=ClipVisionConfig(image_size=64, patch_size=8, width=64, layers=2, heads=4),
        text=ClipTextConfig(width=64, layers=2, heads=4, context_length=32),
        activation="gelu",
    ),
}


def get_clip_config(name: str) -> ClipConfig:
    """The registered config `name`; ValueError listing the names otherwise."""
    if name not in CLIP_CONFIGS:
        raise ValueError(f"unknown CLIP config {name!r}; choose from {sorted(CLIP_CONFIGS)}")
    return CLIP_CONFIGS[name]
