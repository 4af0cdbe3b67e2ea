"""The ViT image encoder (`segment_anything.modeling.image_encoder`), channels-last.

Windowed attention (14x14, grid zero-padded to a multiple of the window)
everywhere but the configured global blocks, decomposed relative position
bias, exact GELU, and a conv neck to the 256-channel embedding.

Parameter names follow the PyTorch state_dict (`blocks.3.attn.qkv.weight` ->
`blocks_3/attn/qkv/kernel`), so conversion is a rename plus transposes. With
`scan_blocks` the blocks run as `nn.scan` over groups of `blocks_per_group`
(windowed blocks then one global block), and their params are stacked under
`block_groups/blocks_{j}` with a leading group axis; `sam_jax.weights`
converts between the two layouts.

Training only: `drop_path_rate` > 0 adds stochastic depth to both residual
branches of every block when the call is not `deterministic`, at the
ViTDet / timm / MAE per-block rate `drop_path_rate * i / (depth - 1)`. The
released SAM code has no drop path (it is inference code); the SAM paper
trains with 0.4 (ViT-H, ViT-L) and 0.6 (ViT-B). Deterministic calls (the
default) run exactly the inference graph.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.configs import ImageEncoderConfig
from sam_jax.modeling.attention import check_attention_impl, rel_pos_attention
from sam_jax.modeling.common import Dtype, LayerNorm, MLPBlock
from sam_jax.modeling.interpolate import resize_linear

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
      rel_pos: (L, C) table; linearly resized to 2 * max(q_size, k_size) - 1
        rows when L differs (a model run at another resolution).
    Returns:
      (q_size, k_size, C).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    rel_pos = resize_linear(rel_pos, max_rel_dist, axis=0)
    # Index arithmetic in fp32 exactly as PyTorch does it, so that truncation
    # picks the same rows when q_size != k_size.
    q_scale = np.float32(max(k_size / q_size, 1.0))
    k_scale = np.float32(max(q_size / k_size, 1.0))
    q_coords = np.arange(q_size, dtype=np.float32)[:, None] * q_scale
    k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_scale
    relative = (q_coords - k_coords) + np.float32((k_size - 1) * max(q_size / k_size, 1.0))
    return rel_pos[relative.astype(np.int64)]


def drop_path_rates(rate: float, depth: int) -> tuple[float, ...]:
    """Per-block stochastic depth rates: 0 for the first block rising linearly to `rate` for the
    last, `rate * i / (depth - 1)` (ViTDet's `torch.linspace(0, rate, depth)`)."""
    if depth == 1:
        return (0.0,)
    return tuple(rate * i / (depth - 1) for i in range(depth))


def drop_path(branch: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
    """Stochastic depth on a residual branch (B, ...): each sample's branch is dropped with
    probability `rate` (one Bernoulli draw per sample, shared by all its tokens) and kept ones
    are scaled by 1 / (1 - rate), so the expectation is `branch`. `rate` may be traced."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
    # The fp32 product is rounded once to the compute dtype (a bf16 1 / keep would bias every kept sample).
    return (branch * (mask / keep)).astype(branch.dtype)


def window_partition(
    x: jax.Array, window_size: int, fill: jax.Array | float = 0.0
) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, ws, ws, C), padding H and W up to multiples of the
    window with `fill` (a scalar, or a (C,)-broadcastable token; the original pads zeros)."""
    b, h, w, c = x.shape
    hp = -(-h // window_size) * window_size
    wp = -(-w // window_size) * window_size
    # Concatenated rather than written into a filled frame: the same values, and an ONNX export
    # (jax2onnx) gets two Concats where a dynamic_update_slice becomes a ScatterND with an index
    # per element (300 MB of indices per block for vit_b).
    fill = jnp.asarray(fill, x.dtype)
    if wp != w:
        x = jnp.concatenate([x, jnp.broadcast_to(fill, (b, h, wp - w, c))], axis=2)
    if hp != h:
        x = jnp.concatenate([x, jnp.broadcast_to(fill, (b, hp - h, wp, c))], axis=1)
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: jax.Array, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> jax.Array:
    """(B * nWin, ws, ws, C) -> (B, H, W, C), dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed rel-pos bias,
    global or within `window_size` windows."""

    num_heads: int
    input_size: tuple[int, int]  # grid the rel-pos tables are sized for (the window if windowed)
    window_size: int = 0  # 0: global attention
    query_chunk_size: Optional[int] = None  # see ImageEncoderViT
    attention_impl: str = "auto"  # see sam_jax.modeling.attention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        qkv_layer = dense(3 * c, "qkv")
        qkv = qkv_layer(x)  # (B, H, W, 3C)
        if self.window_size > 0:
            # The original zero-pads the grid before qkv; a zero token's qkv is the bias,
            # so padding qkv with it is the same and skips the padded tokens' matmuls.
            fill = qkv_layer(jnp.zeros((1, 1, 1, c), x.dtype))
            qkv, pad_hw = window_partition(qkv, self.window_size, fill)
        out = self._attend(qkv)
        if self.window_size > 0:
            out = window_unpartition(out, self.window_size, pad_hw, (h, w))
        return dense(c, "proj")(out)

    def _attend(self, qkv: jax.Array) -> jax.Array:
        """(B', H', W', 3C) queries, keys, values of one grid or window -> (B', H', W', C)."""
        b, h, w, c = qkv.shape
        c //= 3
        n, head_dim = self.num_heads, c // self.num_heads
        qkv = qkv.reshape(b, h * w, 3, n, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)

        table = lambda name, size: self.param(
            name, nn.initializers.zeros, (2 * size - 1, head_dim), self.param_dtype
        ).astype(self.dtype)
        rel_h_table = get_rel_pos(h, h, table("rel_pos_h", self.input_size[0]))
        rel_w_table = get_rel_pos(w, w, table("rel_pos_w", self.input_size[1]))
        # Decomposed relative positions use the unscaled query, as the original does.
        r_q = q.reshape(b, h, w, n, head_dim)
        f32 = dict(preferred_element_type=jnp.float32)
        rel_h = jnp.einsum("bhwnc,hkc->bnhwk", r_q, rel_h_table, **f32).reshape(b, n, h * w, h)
        rel_w = jnp.einsum("bhwnc,wkc->bnhwk", r_q, rel_w_table, **f32).reshape(b, n, h * w, w)
        heads_first = lambda t: t.transpose(0, 2, 1, 3)  # (B, heads, N, d)
        out = rel_pos_attention(
            heads_first(q * head_dim**-0.5), heads_first(k), heads_first(v), rel_h, rel_w,
            impl=self.attention_impl, windowed=self.window_size > 0, dtype=self.dtype,
            query_chunk_size=self.query_chunk_size,
        )
        return out.transpose(0, 2, 1, 3).reshape(b, h, w, c)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention unless `window_size` is 0."""

    num_heads: int
    mlp_ratio: float
    window_size: int
    input_size: tuple[int, int]  # token grid of the full image
    query_chunk_size: Optional[int] = None  # global attention only; see ImageEncoderViT
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, drop_path_rate: float | jax.Array = 0.0
    ) -> jax.Array:
        """`drop_path_rate`: this block's rate, a float or (under `nn.scan`) a traced scalar;
        used only when not `deterministic`, drawing from the 'dropout' rng."""
        skip = deterministic or (isinstance(drop_path_rate, (int, float)) and drop_path_rate == 0)

        def residual(x, branch):
            return x + (branch if skip else drop_path(branch, drop_path_rate, self.make_rng("dropout")))

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        windowed = self.window_size > 0
        attention = Attention(
            self.num_heads,
            (self.window_size,) * 2 if windowed else self.input_size,
            self.window_size,
            None if windowed else self.query_chunk_size,
            self.attention_impl,
            name="attn",
            **kw,
        )
        x = residual(x, attention(LayerNorm(name="norm1", **kw)(x)))
        mlp = MLPBlock(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)
        return residual(x, mlp(LayerNorm(name="norm2", **kw)(x)))


class BlockGroup(nn.Module):
    """`blocks_per_group` blocks: windowed ones, then one global; the unit `nn.scan` repeats."""

    config: ImageEncoderConfig
    query_chunk_size: Optional[int] = None
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, drop_path_rates: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, None]:
        """`drop_path_rates`: (blocks_per_group,) this group's per-block rates (scanned input)."""
        cfg = self.config
        g = cfg.blocks_per_group
        for j in range(g):
            x = Block(
                cfg.num_heads,
                cfg.mlp_ratio,
                window_size=0 if j == g - 1 else cfg.window_size,
                input_size=(cfg.grid_size, cfg.grid_size),
                query_chunk_size=self.query_chunk_size,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{j}",
            )(x, deterministic, drop_path_rates[j])
        return x, None


class PatchEmbed(nn.Module):
    """(B, S, S, 3) -> (B, S/p, S/p, embed_dim): a p x p conv with stride p."""

    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(
            self.embed_dim, (p, p), strides=(p, p), padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
        )(x.astype(self.dtype))


class ImageEncoderViT(nn.Module):
    """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, out_chans) embeddings."""

    config: ImageEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_blocks: bool = False  # nn.scan over block groups (stacked params)
    remat_policy: Optional[str] = None  # a REMAT_POLICIES key: rematerialise each block/group
    # Global attention runs over chunks of this many queries (None: all at once).
    # Identical results; on the CPU, 32 runs vit_b's global blocks ~3x faster than all at once.
    query_chunk_size: Optional[int] = 32
    # Which attention computes the blocks (`sam_jax.modeling.attention`): "auto" picks fused
    # kernels on GPUs/TPUs and the "xla" path (the one above) on the CPU.
    attention_impl: str = "auto"
    # Training only: stochastic depth rate of the last block, block i gets rate * i / (depth - 1)
    # (`drop_path_rates`); used when called with deterministic=False, with a 'dropout' rng.
    drop_path_rate: float = 0.0

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size, **kw)
        # The official model starts from zeros (it loads MAE weights). Trained from scratch,
        # zeros make every padding token the same vector (bias + 0): LayerNorm of a
        # zero-variance input has gradients of 1 / sqrt(eps) = 1e3 per block, ~1e9 at the
        # patch embedding, and global-norm clipping then stalls every other parameter.
        # ViT's truncated normal (std 0.02) gives each position its own vector.
        self.pos_embed = self.param(
            "pos_embed", nn.initializers.truncated_normal(stddev=0.02),
            (1, cfg.grid_size, cfg.grid_size, cfg.embed_dim), self.param_dtype,
        )
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
        policy = REMAT_POLICIES.get(self.remat_policy)
        check_attention_impl(self.attention_impl)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {self.drop_path_rate}")
        if self.scan_blocks:
            if not cfg.is_periodic():
                raise ValueError(
                    f"scan_blocks needs global blocks at every {cfg.blocks_per_group}th block; "
                    f"got global_attn_indexes={cfg.global_attn_indexes} for depth {cfg.depth}"
                )
            # static_argnums count `self` as 0: `deterministic` is Python control flow.
            group = (
                nn.remat(BlockGroup, policy=policy, static_argnums=(3,)) if self.remat_policy else BlockGroup
            )
            self.block_groups = nn.scan(
                group,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},  # fresh drop-path draws per group
                in_axes=(0, nn.broadcast),  # per-group rates; `deterministic`
                length=len(cfg.global_attn_indexes),
            )(cfg, self.query_chunk_size, self.attention_impl, **kw)
        else:
            block = nn.remat(Block, policy=policy, static_argnums=(2, 3)) if self.remat_policy else Block
            self.blocks = [
                block(
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                    input_size=(cfg.grid_size, cfg.grid_size),
                    query_chunk_size=self.query_chunk_size,
                    attention_impl=self.attention_impl,
                    **kw,
                )
                for i in range(cfg.depth)
            ]
        self.neck_0 = nn.Conv(cfg.out_chans, (1, 1), use_bias=False, **kw)
        self.neck_1 = LayerNorm(**kw)
        self.neck_2 = nn.Conv(cfg.out_chans, (3, 3), padding=1, use_bias=False, **kw)
        self.neck_3 = LayerNorm(**kw)

    def neck(self, x: jax.Array) -> jax.Array:
        """(B, h, w, embed_dim) -> (B, h, w, out_chans): 1x1 conv, LN, 3x3 conv, LN."""
        return self.neck_3(self.neck_2(self.neck_1(self.neck_0(x))))

    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """`deterministic=False` with `drop_path_rate` > 0 applies drop path (needs a 'dropout' rng)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"image encoder expects (batch, {cfg.image_size}, {cfg.image_size}, 3) "
                f"normalised, padded images; got shape {images.shape}"
            )
        x = self.patch_embed(images) + self.pos_embed.astype(self.dtype)
        deterministic = deterministic or self.drop_path_rate == 0
        rates = drop_path_rates(self.drop_path_rate, cfg.depth)
        if self.scan_blocks:
            # Block i = group * blocks_per_group + j keeps its absolute-index rate.
            per_group = np.asarray(rates, np.float32).reshape(-1, cfg.blocks_per_group)
            x, _ = self.block_groups(x, jnp.asarray(per_group), deterministic)
        else:
            for block, rate in zip(self.blocks, rates):
                x = block(x, deterministic, rate)
        return self.neck(x)
