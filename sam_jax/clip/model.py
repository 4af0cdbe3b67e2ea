"""CLIP (image and text towers) in Flax linen, named after open_clip's state dict.

For the paper's text prompts (appendix D.5): CLIP ViT-L/14@336px computes L2-normalised text and
image embeddings; in training, the prompt is the image embedding of a crop around an object where
"in CLIP's last layer, masked attention restricts the output token to image positions inside the
mask": `CLIP.encode_image(images, region=masks)`.

Module and param names follow open_clip's `CLIP` / `CustomTextCLIP` state dict, so converting is a
rename plus transposes (`checkpoints_convert/clip.py`):

    visual/conv1/kernel                                 visual.conv1.weight (O, I, kh, kw), transposed
    visual/transformer/resblocks_3/attn/in_proj/kernel  visual.transformer.resblocks.3.attn.in_proj_weight, .T
    visual/transformer/resblocks_3/mlp/c_fc/kernel      ....mlp.c_fc.weight, .T
    visual/ln_post/scale                                visual.ln_post.weight
    visual/proj                                         visual.proj (copied)
    text/token_embedding/embedding                      token_embedding.weight (text.token_embedding.weight)
    text/text_projection                                text_projection (copied)
    logit_scale                                         logit_scale

Numerics as OpenAI CLIP: the class token is concatenated before the positional embedding is added,
ln_pre before the vision blocks, pre-norm residual blocks with fused q/k/v projection and softmax of
(q / sqrt(head_dim)) . k, ln_post on the class token then `@ proj`; the text tower is causal and
pools at the EOT token, the highest id in each row (argmax of the ids), after ln_final, then
`@ text_projection`. LayerNorm and softmax run in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.clip.configs import ClipConfig, ClipTextConfig, ClipVisionConfig
from sam_jax.modeling.common import LayerNorm, gelu

Dtype = Union[jnp.dtype, type]
PrecisionLike = Union[None, str, jax.lax.Precision, tuple]

# OpenAI CLIP's image normalisation (RGB, images in [0, 1]); open_clip's OPENAI_DATASET_MEAN / _STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}  # gelu: exact erf form, torch.nn.GELU()


def preprocess(images: Any, image_size: Optional[int] = None) -> jax.Array:
    """(B, H, W, 3) RGB images, uint8 or float in [0, 255], -> float32 normalised with CLIP_MEAN / CLIP_STD.

    No resizing: images must already be at the model's size; pass `image_size` (or look at
    `config.vision.image_size`) to have it checked. ValueError for any other shape or dtype.
    """
    x = images if isinstance(images, jax.Array) else np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess: images must be (B, H, W, 3) RGB; got shape {tuple(x.shape)}")
    if image_size is not None and tuple(x.shape[1:3]) != (image_size, image_size):
        raise ValueError(f"preprocess: images must be {image_size}x{image_size} for this model; got "
                         f"shape {tuple(x.shape)} (resize or crop first)")
    if not (x.dtype == np.uint8 or jnp.issubdtype(x.dtype, jnp.floating)):
        raise ValueError(f"preprocess: images must be uint8 or float in [0, 255]; got dtype {x.dtype}")
    x = jnp.asarray(x, jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


class MultiheadAttention(nn.Module):
    """Self-attention with torch.nn.MultiheadAttention's fused projection: in_proj (W -> 3W, rows
    q, k, v) and out_proj. `mask` (bool, broadcastable to (B, heads, L, L), True = may attend)."""

    heads: int
    in_std: float = 0.02
    out_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        b, length, width = x.shape
        head_dim = width // self.heads
        dense = lambda n, std, name: nn.Dense(
            n, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=nn.initializers.normal(std), name=name)
        q, k, v = jnp.split(dense(3 * width, self.in_std, "in_proj")(x), 3, axis=-1)
        q, k, v = (t.reshape(b, length, self.heads, head_dim) for t in (q, k, v))
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision).reshape(b, length, width)
        return dense(width, self.out_std, "out_proj")(out)


class Mlp(nn.Module):
    """c_fc -> activation -> c_proj (open_clip's `mlp` Sequential)."""

    hidden_dim: int
    activation: str = "quick_gelu"
    fc_std: float = 0.02
    proj_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, std, name: nn.Dense(
            n, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=nn.initializers.normal(std), name=name)
        h = _ACTIVATIONS[self.activation](dense(self.hidden_dim, self.fc_std, "c_fc")(x))
        return dense(x.shape[-1], self.proj_std, "c_proj")(h)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    eps: float = 1e-5
    stds: tuple[float, float, float] = (0.02, 0.02, 0.02)  # in_proj, c_fc, out_proj and c_proj
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        attn_std, fc_std, proj_std = self.stds
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        ln = lambda name: LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = x + MultiheadAttention(self.heads, attn_std, proj_std, name="attn", **common)(ln("ln_1")(x), mask)
        mlp = Mlp(self.mlp_dim, self.activation, fc_std, proj_std, name="mlp", **common)
        return x + mlp(ln("ln_2")(x))


class Transformer(nn.Module):
    """`layers` residual blocks (`resblocks_i`). `mask` applies in every block; `last_mask`, ANDed
    with it, only in the last one (the masked class-token attention of region embeddings)."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
                 last_mask: Optional[jax.Array] = None) -> jax.Array:
        # open_clip's TextTransformer init (its ViT keeps torch defaults; these train as well).
        stds = (self.width**-0.5, (2 * self.width) ** -0.5, self.width**-0.5 * (2 * self.layers) ** -0.5)
        for i in range(self.layers):
            block_mask = mask
            if i == self.layers - 1 and last_mask is not None:
                block_mask = last_mask if mask is None else jnp.logical_and(mask, last_mask)
            x = ResidualAttentionBlock(
                self.heads, self.mlp_dim, self.activation, self.eps, stds, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name=f"resblocks_{i}",
            )(x, block_mask)
        return x


class PatchEmbed(nn.Module):
    """conv1: a bias-free p x p conv of stride p as one matmul over the patches,
    (B, H, W, 3) -> (B, H/p * W/p, width), patches in row-major order. Kernel (p, p, 3, width)."""

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        b, h, w, c = images.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width), self.param_dtype)
        patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        out = jnp.einsum("nhpwqc,pqco->nhwo", patches, kernel.astype(self.dtype), precision=self.precision)
        return out.reshape(b, (h // p) * (w // p), self.width)


def region_to_patches(region: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W) bool pixels -> (B, H/p * W/p) bool patches, row-major: a patch is inside if any
    of its pixels is."""
    b, h, w = region.shape
    p = patch_size
    return jnp.asarray(region).reshape(b, h // p, p, w // p, p).any(axis=(2, 4)).reshape(b, -1)


class VisionTransformer(nn.Module):
    """The image tower: (B, S, S, 3) normalised images -> (B, embed_dim), unnormalised.

    `region` ((B, S, S) bool, optional) restricts the class token's attention in the LAST block to
    itself and the patches holding any pixel of the region (other tokens attend as usual; only the
    class token reaches the output).
    """

    config: ClipVisionConfig
    embed_dim: int
    activation: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, images: jax.Array, region: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        check_images(images, cfg.image_size)
        if region is not None:
            check_region(region, images.shape[0], cfg.image_size)
        scale = cfg.width**-0.5
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        ln = lambda name: LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        x = PatchEmbed(cfg.width, cfg.patch_size, name="conv1", **common)(images)
        b = x.shape[0]
        cls = self.param("class_embedding", nn.initializers.normal(scale), (cfg.width,), self.param_dtype)
        pos = self.param("positional_embedding", nn.initializers.normal(scale), (cfg.num_tokens, cfg.width),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.width)), x], axis=1)
        x = ln("ln_pre")(x + pos.astype(self.dtype))

        last_mask = None
        if region is not None:
            inside = region_to_patches(region, cfg.patch_size)  # (B, N)
            keys = jnp.concatenate([jnp.ones((b, 1), bool), inside], axis=1)  # class token sees itself
            rows = jnp.arange(cfg.num_tokens) == 0  # only the class token's row is restricted
            last_mask = jnp.logical_or(~rows[None, :, None], keys[:, None, :])[:, None]  # (B, 1, L, L)

        x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, self.activation, self.eps,
                        name="transformer", **common)(x, last_mask=last_mask)
        pooled = ln("ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (cfg.width, self.embed_dim), self.param_dtype)
        return jnp.dot(pooled, proj.astype(self.dtype), precision=self.precision)


class TextTransformer(nn.Module):
    """The text tower: (B, L) int token ids, L <= context_length, each row's EOT token (49407, the
    highest id) after its text -> (B, embed_dim), unnormalised; causal attention, pooled at the
    argmax of each row's ids."""

    config: ClipTextConfig
    embed_dim: int
    activation: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        check_tokens(tokens, cfg.context_length, cfg.vocab_size)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        length = tokens.shape[1]
        embed = nn.Embed(cfg.vocab_size, cfg.width, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="token_embedding")
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width),
                         self.param_dtype)
        x = embed(tokens).astype(self.dtype) + pos[:length].astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))  # query i sees keys <= i
        x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, self.activation, self.eps,
                        name="transformer", **common)(x, mask=causal)
        x = LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(x)
        eot = jnp.argmax(tokens, axis=-1)  # first position of each row's highest id
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        proj = self.param("text_projection", nn.initializers.normal(cfg.width**-0.5), (cfg.width, self.embed_dim),
                          self.param_dtype)
        return jnp.dot(pooled, proj.astype(self.dtype), precision=self.precision)


class CLIP(nn.Module):
    """Both towers and the learned temperature.

    `model.apply({"params": p}, images, method=CLIP.encode_image)` (images from `preprocess`),
    `method=CLIP.encode_text` (tokens from `sam_jax.clip.tokenizer`); `__call__(images, tokens)`
    gives (normalised image features, normalised text features, exp(logit_scale)) as open_clip.
    Params are `param_dtype` (fp32); `dtype` is the compute dtype; embeddings come out fp32.
    """

    config: ClipConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Matmul precision. None is XLA's default: full fp32 on CPU, TF32-like on recent GPUs, where
    # "highest" gives torch-fp32 parity (1e-5) at some speed cost.
    precision: PrecisionLike = None

    def setup(self):
        c = self.config
        common = dict(activation=c.activation, eps=c.layer_norm_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype, precision=self.precision)
        self.visual = VisionTransformer(c.vision, c.embed_dim, **common)
        self.text = TextTransformer(c.text, c.embed_dim, **common)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (),
                                      self.param_dtype)

    def encode_image(self, images: jax.Array, region: Optional[jax.Array] = None,
                     normalize: bool = True) -> jax.Array:
        """(B, S, S, 3) float normalised images -> (B, embed_dim) float32, L2-normalised if `normalize`.

        `region`: optional (B, S, S) bool mask; in the last block the class token attends only to
        itself and the patches that hold a pixel of it (SAM appendix D.5). A region covering every
        patch gives the plain embedding. ValueError for an empty region (when not traced).
        """
        features = self.visual(images, region).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        """(B, L) int token ids (L <= context_length, EOT the highest id of each row) -> (B, embed_dim)
        float32, L2-normalised if `normalize`."""
        features = self.text(tokens).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_text(tokens), jnp.exp(self.logit_scale)


def init_inputs(config: ClipConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Dummy (images, tokens) of the config's sizes, for `CLIP(config).init`."""
    s = config.vision.image_size
    return jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, config.text.context_length), jnp.int32)


def abstract_clip_params(config: ClipConfig) -> dict[str, Any]:
    """The params tree of `CLIP(config)` as ShapeDtypeStructs, without allocating it."""
    images, tokens = init_inputs(config)
    return jax.eval_shape(lambda: CLIP(config).init(jax.random.PRNGKey(0), images, tokens))["params"]


def init_clip_params(config: ClipConfig, seed: int = 0) -> dict[str, Any]:
    """Freshly initialised params of `CLIP(config)` (open_clip's initialisation scales)."""
    images, tokens = init_inputs(config)
    return jax.jit(CLIP(config).init)(jax.random.PRNGKey(seed), images, tokens)["params"]


# --- input checks: ValueError naming the argument, its shape and what was expected -----------------


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def _dtype(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    return np.asarray(x).dtype if dtype is None else dtype


def check_images(images: Any, image_size: int) -> None:
    shape = _shape(images)
    if len(shape) != 4 or shape[1:] != (image_size, image_size, 3) or shape[0] < 1:
        raise ValueError(f"images must be (B, {image_size}, {image_size}, 3) float, normalised with "
                         f"CLIP_MEAN / CLIP_STD (see preprocess); got shape {shape}")
    if not jnp.issubdtype(_dtype(images), jnp.floating):
        raise ValueError(f"images must be float (normalised with preprocess); got dtype {_dtype(images)}")


def check_region(region: Any, batch: int, image_size: int) -> None:
    shape = _shape(region)
    if shape != (batch, image_size, image_size):
        raise ValueError(f"region must be a (B, H, W) = ({batch}, {image_size}, {image_size}) boolean mask "
                         f"matching images; got shape {shape}")
    if _dtype(region) != np.bool_:
        raise ValueError(f"region must be a boolean mask of shape {shape}; got dtype {_dtype(region)}")
    if _is_concrete(region):
        empty = np.flatnonzero(~np.asarray(region).reshape(batch, -1).any(axis=1))
        if empty.size:
            raise ValueError(f"region is empty (no pixel inside) for batch element(s) {empty.tolist()} of "
                             f"region shape {shape}; the class token would attend to nothing in the image")


def check_tokens(tokens: Any, context_length: int, vocab_size: int) -> None:
    shape = _shape(tokens)
    if len(shape) != 2 or shape[0] < 1 or not 1 <= shape[1] <= context_length:
        raise ValueError(f"tokens must be (B, L) token ids with 1 <= L <= context_length {context_length}; "
                         f"got shape {shape}")
    if not jnp.issubdtype(_dtype(tokens), jnp.integer):
        raise ValueError(f"tokens must be integer token ids of shape {shape}; got dtype {_dtype(tokens)}")
    if _is_concrete(tokens):
        ids = np.asarray(tokens)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"tokens of shape {shape} hold ids outside [0, {vocab_size}): min {ids.min()}, "
                             f"max {ids.max()}")
