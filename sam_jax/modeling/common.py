"""Layers shared by the encoder, prompt encoder and decoder (channels-last)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | type


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in `torch.nn.GELU()`'s formula, x (1 + erf(x / sqrt 2)) / 2. jax.nn.gelu
    defaults to the tanh form, and its exact form goes through erfc, which XLA's CPU backend
    computes from an exp with two branches, where erf is one rational polynomial."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in fp32 whatever the compute dtype.

    Channels-last, it is also the official `LayerNorm2d`. The variance is
    E[(x - mean)^2] as in PyTorch (not flax's fast E[x^2] - mean^2).
    Half-precision LayerNorm is what breaks bf16 ViT-H, hence the fp32 path.
    """

    epsilon: float = 1e-6  # image encoder and LayerNorm2d; the decoder uses 1e-5
    dtype: Dtype = jnp.float32  # output dtype
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        var = jnp.square(centred).mean(-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class PatchConv(nn.Module):
    """A k x k conv with stride k and no padding, (B, H, W, I) -> (B, H/k, W/k, O), as one matmul
    over the non-overlapping patches. Parameters are `nn.Conv`'s: kernel (k, k, I, O), bias (O,).

    XLA's CPU backend computes a strided conv's kernel gradient as a slow generic convolution
    (the 1x1 mask-embedding conv's took 12 ms per interactive training iteration); the
    matmul's gradients are matmuls.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        *lead, h, w, c = x.shape
        if h % k or w % k:
            raise ValueError(f"PatchConv with kernel {k} needs H and W divisible by {k}, got {x.shape}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c, self.features), self.param_dtype)
        patches = x.astype(self.dtype).reshape(*lead, h // k, k, w // k, k, c)
        y = jnp.einsum("...iajbc,abco->...ijo", patches, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype).astype(self.dtype)
        return y


class MLPBlock(nn.Module):
    """lin1 -> act -> lin2 (`segment_anything.modeling.common.MLPBlock`)."""

    mlp_dim: int
    act: Callable[[jax.Array], jax.Array] = gelu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense(x.shape[-1], "lin2")(self.act(dense(self.mlp_dim, "lin1")(x)))


class MLP(nn.Module):
    """`num_layers` Dense layers with ReLU between (the decoder's hypernetwork and IoU head)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.output_dim if last else self.hidden_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x)
            if not last:
                x = nn.relu(x)
        return x


def softmax_fp32(logits: jax.Array, dtype: Dtype) -> jax.Array:
    """Softmax in fp32 (bf16 softmax loses the small attention weights), cast to `dtype`."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
