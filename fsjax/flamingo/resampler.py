"""OpenFlamingo's Perceiver resampler and gated cross-attention, in Flax linen.

Both follow ``open_flamingo/src/helpers.py`` (v2.0.1) line by line. Parameter names
mirror its state dict (dots -> slashes; ``nn.Sequential`` indices kept, so the
feed-forward is ``0`` LayerNorm, ``1`` up-projection, ``3`` down-projection)::

  latents                                         [num_latents, dim]
  layers/{i}/0/{norm_media, norm_latents}/{scale, bias}
  layers/{i}/0/{to_q, to_kv, to_out}/kernel       (no biases)
  layers/{i}/1/0/{scale, bias}, layers/{i}/1/{1, 3}/kernel
  norm/{scale, bias}

and for a gated cross-attention block::

  attn/norm/{scale, bias}, attn/{to_q, to_kv, to_out}/kernel, attn_gate [1]
  ff/0/{scale, bias}, ff/{1, 3}/kernel, ff_gate [1]

LayerNorms (epsilon 1e-5, with bias) and softmaxes run in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsjax import matmul

Dtype = Any
_NEG = jnp.finfo(jnp.float32).max  # torch: masked_fill(~mask, -finfo.max)


def _layer_norm(name: str):
  ln = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
  return lambda x: ln(x.astype(jnp.float32))


def _dense(features: int, name: str, dtype: Dtype):
  return matmul.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class FeedForward(nn.Module):
  """``Sequential(LayerNorm, Linear(no bias), GELU, Linear(no bias))``: names 0, 1, 3."""

  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _layer_norm("0")(x).astype(self.dtype)
    x = jax.nn.gelu(_dense(self.dim * self.mult, "1", self.dtype)(x), approximate=False)
    return _dense(self.dim, "3", self.dtype)(x)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


class PerceiverAttention(nn.Module):
  """Latents attend to [media; latents] (one media item at a time)."""

  dim: int
  dim_head: int = 64
  heads: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
    """``x`` ``[B, T, v, D]`` media features, ``latents`` ``[B, T, n, D]`` -> ``[B, T, n, D]``."""
    inner = self.dim_head * self.heads
    x = _layer_norm("norm_media")(x).astype(self.dtype)
    latents = _layer_norm("norm_latents")(latents).astype(self.dtype)
    q = _split_heads(_dense(inner, "to_q", self.dtype)(latents), self.heads)
    kv = _dense(2 * inner, "to_kv", self.dtype)(jnp.concatenate([x, latents], axis=-2))
    k, v = (_split_heads(y, self.heads) for y in jnp.split(kv, 2, axis=-1))
    sim = matmul.einsum("btihd,btjhd->bthij", q * self.dim_head ** -0.5, k, dtype=jnp.float32)
    attn = jax.nn.softmax(sim, axis=-1).astype(self.dtype)
    out = matmul.einsum("bthij,btjhd->btihd", attn, v).reshape(*latents.shape[:-1], inner)
    return _dense(self.dim, "to_out", self.dtype)(out)


class PerceiverResampler(nn.Module):
  """Maps each media item's ``v`` vision tokens to ``num_latents`` latents.

  Attributes:
    dim: vision feature width (1024 for CLIP ViT-L/14).
    depth, dim_head, heads, num_latents, ff_mult: OpenFlamingo's defaults (6, 64, 8, 64, 4).
  """

  dim: int
  depth: int = 6
  dim_head: int = 64
  heads: int = 8
  num_latents: int = 64
  ff_mult: int = 4
  dtype: Dtype = jnp.float32

  def setup(self):
    self.latents = self.param("latents", nn.initializers.normal(1.0),
                              (self.num_latents, self.dim), jnp.float32)
    self.layers = _PerceiverLayers(self.dim, self.depth, self.dim_head, self.heads, self.ff_mult,
                                   self.dtype)
    self.norm = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x`` ``[B, T, v, D]`` (T media items per row) -> ``[B, T, num_latents, D]`` float32."""
    latents = jnp.broadcast_to(self.latents.astype(self.dtype),
                               (*x.shape[:2], self.num_latents, self.dim))
    x = x.astype(self.dtype)
    for layer in self.layers.layers:
      latents = layer(x, latents)
    return self.norm(latents.astype(jnp.float32))


class _PerceiverLayers(nn.Module):
  """The ``layers`` scope, children named "0", "1", ... as in the state dict."""

  dim: int
  depth: int
  dim_head: int
  heads: int
  ff_mult: int
  dtype: Dtype

  def setup(self):
    self.layers = [_PerceiverLayer(self.dim, self.dim_head, self.heads, self.ff_mult, self.dtype,
                                   name=str(i)) for i in range(self.depth)]


class _PerceiverLayer(nn.Module):
  """``layers/{i}``: ``0`` attention and ``1`` feed-forward, both residual."""

  dim: int
  dim_head: int
  heads: int
  ff_mult: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x, latents):
    latents = PerceiverAttention(self.dim, self.dim_head, self.heads, self.dtype,
                                 name="0")(x, latents) + latents
    return FeedForward(self.dim, self.ff_mult, self.dtype, name="1")(latents) + latents


class MaskedCrossAttention(nn.Module):
  """Text tokens attend to the latents of their most recent image only.

  Attributes:
    dim: text width; dim_visual: latent width; dim_head, heads: 64 and 8 in OpenFlamingo.
  """

  dim: int
  dim_visual: int
  dim_head: int = 64
  heads: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, media: jax.Array, text_time: jax.Array) -> jax.Array:
    """Cross-attention of text to media.

    Args:
      x: ``[B, T, dim]`` text hidden states.
      media: ``[B, M, n, dim_visual]`` latents of the M images of each row.
      text_time: int ``[B, T]``, the 1-based index of each token's most recent image
        (``cumsum(ids == <image>)``), 0 before the first image.

    Returns:
      ``[B, T, dim]``; zero for tokens with ``text_time == 0``.
    """
    inner = self.dim_head * self.heads
    b, m, n = media.shape[:3]
    x = _layer_norm("norm")(x).astype(self.dtype)
    q = _split_heads(_dense(inner, "to_q", self.dtype)(x), self.heads)
    kv = _dense(2 * inner, "to_kv", self.dtype)(media.reshape(b, m * n, -1).astype(self.dtype))
    k, v = (_split_heads(y, self.heads) for y in jnp.split(kv, 2, axis=-1))
    sim = matmul.einsum("bihd,bjhd->bhij", q * self.dim_head ** -0.5, k, dtype=jnp.float32)
    media_time = jnp.repeat(jnp.arange(1, m + 1), n)  # [M * n]
    attend = text_time[:, None, :, None] == media_time[None, None, None, :]
    sim = jnp.where(attend, sim, -_NEG)
    attn = jax.nn.softmax(sim, axis=-1)
    # Text before any image sees nothing (the softmax above gave it uniform weights).
    attn = jnp.where((text_time == 0)[:, None, :, None], 0.0, attn).astype(self.dtype)
    out = matmul.einsum("bhij,bjhd->bihd", attn, v).reshape(*x.shape[:2], inner)
    return _dense(self.dim, "to_out", self.dtype)(out)


class GatedCrossAttentionBlock(nn.Module):
  """``x += tanh(attn_gate) * xattn(x, media)``, then ``x += tanh(ff_gate) * ff(x)``.

  The gates start at 0 in OpenFlamingo (the block is then the identity) and are learnt.
  """

  dim: int
  dim_visual: int
  dim_head: int = 64
  heads: int = 8
  ff_mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, media: jax.Array, text_time: jax.Array) -> jax.Array:
    """``x`` ``[B, T, dim]``, ``media`` ``[B, M, n, dim_visual]``, ``text_time`` ``[B, T]``."""
    attn_gate = self.param("attn_gate", nn.initializers.zeros, (1,), jnp.float32)
    ff_gate = self.param("ff_gate", nn.initializers.zeros, (1,), jnp.float32)
    y = MaskedCrossAttention(self.dim, self.dim_visual, self.dim_head, self.heads, self.dtype,
                             name="attn")(x, media, text_time)
    x = x + (jnp.tanh(attn_gate) * y.astype(jnp.float32)).astype(x.dtype)
    y = FeedForward(self.dim, self.ff_mult, self.dtype, name="ff")(x)
    return x + (jnp.tanh(ff_gate) * y.astype(jnp.float32)).astype(x.dtype)
