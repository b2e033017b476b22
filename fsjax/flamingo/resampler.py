"""OpenFlamingo's Perceiver resampler and gated cross-attention, in Flax linen.

Both compute what ``open_flamingo/src/helpers.py`` (v2.0.1) computes, with attention
heads first (``[B, heads, tokens, dim_head]``, :func:`fsjax.matmul.attention`), the layout
XLA's batched matmuls read: open_flamingo's ``[.., tokens, heads, dim_head]`` einsums made
XLA:CPU transpose the keys at 2 GB/s (the small OpenFlamingo's batch-8 resampler: 64 ->
45 ms, one core). Parameter names mirror its state dict (dots -> slashes;
``nn.Sequential`` indices kept, so the feed-forward is ``0`` LayerNorm, ``1``
up-projection, ``3`` down-projection)::

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


def _layer_norm(name: str):
  ln = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
  return lambda x: ln(x.astype(jnp.float32))


def _dense(features: int, name: str | None, dtype: Dtype):
  return matmul.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


def _heads(y: jax.Array, heads: int) -> jax.Array:
  """``[B, j, heads dim_head]`` -> ``[B, heads, j, dim_head]``: heads first, the layout
  attention's batched matmuls read (:func:`fsjax.matmul.attention`)."""
  return y.reshape(*y.shape[:2], heads, y.shape[2] // heads).transpose(0, 2, 1, 3)


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
    b, t, n = latents.shape[:3]
    heads = lambda y: _heads(y.reshape(b * t, *y.shape[2:]), self.heads)  # [B T, h, j, d]
    q = heads(_dense(inner, "to_q", self.dtype)(latents))
    kv = _dense(2 * inner, "to_kv", self.dtype)(jnp.concatenate([x, latents], axis=-2))
    k, v = (heads(y) for y in jnp.split(kv, 2, axis=-1))
    out = matmul.attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, t, n, inner)
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

  The latents' keys and values (:meth:`keys_values`) depend on the images alone, so a
  decoding loop computes them once per prompt and keeps them
  (:class:`fsjax.flamingo.FlamingoCache`); open_flamingo recomputes them at every step.

  Attributes:
    dim: text width; dim_visual: latent width; dim_head, heads: 64 and 8 in OpenFlamingo.
  """

  dim: int
  dim_visual: int
  dim_head: int = 64
  heads: int = 8
  dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.dim_head * self.heads
    self.norm = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    self.to_q = _dense(inner, None, self.dtype)
    self.to_kv = _dense(2 * inner, None, self.dtype)
    self.to_out = _dense(self.dim, None, self.dtype)

  def keys_values(self, media: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, M, n, dim_visual]`` latents -> keys and values ``[B, heads, M n, dim_head]``."""
    b, m, n = media.shape[:3]
    kv = self.to_kv(media.reshape(b, m * n, -1).astype(self.dtype))
    return tuple(_heads(y, self.heads) for y in jnp.split(kv, 2, axis=-1))

  def __call__(self, x: jax.Array, keys: jax.Array, values: jax.Array, text_time: jax.Array,
               num_latents: int) -> jax.Array:
    """Cross-attention of text to media.

    Args:
      x: ``[B, T, dim]`` text hidden states.
      keys, values: ``[B, heads, M n, dim_head]`` of the M images of each row
        (:meth:`keys_values`).
      text_time: int ``[B, T]``, the 1-based index of each token's most recent image
        (``cumsum(ids == <image>)``), 0 before the first image.
      num_latents: n, the latents per image.

    Returns:
      ``[B, T, dim]``; zero for tokens with ``text_time == 0``.
    """
    b, t = x.shape[:2]
    q = _heads(self.to_q(self.norm(x.astype(jnp.float32)).astype(self.dtype)), self.heads)
    media_time = jnp.arange(keys.shape[2]) // num_latents + 1  # [M n]: image 1, 1, ..., M
    attend = text_time[:, None, :, None] == media_time  # [B, 1, T, M n]
    out = matmul.attention(q, keys, values, attend, dtype=self.dtype)  # [B, heads, T, d]
    # Text before any image sees nothing (softmax gave it uniform weights).
    out = jnp.where((text_time == 0)[:, None, :, None], jnp.zeros((), out.dtype), out)
    return self.to_out(out.transpose(0, 2, 1, 3).reshape(b, t, -1))


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

  def setup(self):
    self.attn_gate = self.param("attn_gate", nn.initializers.zeros, (1,), jnp.float32)
    self.ff_gate = self.param("ff_gate", nn.initializers.zeros, (1,), jnp.float32)
    self.attn = MaskedCrossAttention(self.dim, self.dim_visual, self.dim_head, self.heads,
                                     self.dtype)
    self.ff = FeedForward(self.dim, self.ff_mult, self.dtype)

  def keys_values(self, media: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The media's keys and values for this block (:meth:`MaskedCrossAttention.keys_values`)."""
    return self.attn.keys_values(media)

  def __call__(self, x: jax.Array, keys: jax.Array, values: jax.Array, text_time: jax.Array,
               num_latents: int) -> jax.Array:
    """``x`` ``[B, T, dim]``, the media's ``keys`` and ``values`` ``[B, heads, M n,
    dim_head]``, ``text_time`` ``[B, T]``."""
    y = self.attn(x, keys, values, text_time, num_latents)
    x = x + (jnp.tanh(self.attn_gate) * y.astype(jnp.float32)).astype(x.dtype)
    y = self.ff(x)
    return x + (jnp.tanh(self.ff_gate) * y.astype(jnp.float32)).astype(x.dtype)
