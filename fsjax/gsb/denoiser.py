"""The Gaussian denoiser D(x_noisy, sigma) of GSB (paper Section 4.1, Appendix A.2.1).

A light conditional U-Net that regresses the clean image from ``x + delta``,
``delta ~ N(0, sigma^2 I)``. It runs before the frozen encoder, so the smoothed encoder
becomes ``f(x) = normalise(g(D(x, sigma)))`` (Eq. 14); D is deterministic, so the
certificate of method.md section 2 still holds.

Architecture (the paper gives only its outline: "symmetric encoder-decoder, residual
blocks, multi-scale skip connections, a learnable sigma embedding, about 10 MB"):

* sigma embedding: sinusoidal features of ``1000 * sigma`` (diffusion-timestep style, so
  the useful range sigma in [0, 1] spans many frequencies) -> Dense -> SiLU -> Dense.
* every residual block: GroupNorm -> SiLU -> Conv3x3 -> FiLM(embedding) -> GroupNorm ->
  SiLU -> Conv3x3, plus a 1x1 projection of the input when the width changes.
* encoder path: ``len(channel_mults)`` levels of ``blocks_per_level`` blocks, a strided
  Conv3x3 between levels; one middle block; decoder path: nearest-neighbour upsample +
  Conv3x3, concatenate the skip of the same level, ``blocks_per_level`` blocks.
* output: GroupNorm -> SiLU -> zero-initialised Conv3x3 giving a residual, so
  ``D(x_noisy) = x_noisy + residual`` starts as the identity and learns a correction.

With the defaults (width 32, channel_mults (1, 2, 4), 2 blocks per level, emb_dim 128)
it has 2,489,603 float32 parameters, 9.96 MB: the paper's "approximately 10 MB".

Image sides must be divisible by ``2 ** (len(channel_mults) - 1)`` (4 by default; CLIP's
224 and 336 both are). Feed images at the encoder's resolution
(``fsjax.gsb.BoostedEncoder`` resizes before denoising) so that the noise D sees has the
per-pixel standard deviation sigma it was trained for.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import matmul

Dtype = jnp.dtype


def sigma_features(sigma: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features of the noise level: ``[B]`` -> ``[B, dim]`` float32.

  Frequencies are geometric from 1 to 1/10000 on ``1000 * sigma`` (the transformer /
  diffusion-timestep recipe); sigma = 0 is a valid input (all sines 0, cosines 1).
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * sigma.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def broadcast_sigma(sigma, batch: int, *, name: str = "sigma") -> jax.Array:
  """Scalar or ``[B]`` sigma -> ``[B]`` float32; ValueError on any other shape."""
  sigma = jnp.asarray(sigma, jnp.float32)
  if sigma.ndim == 0:
    return jnp.broadcast_to(sigma, (batch,))
  if sigma.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or have shape [B] = ({batch},), got shape "
                     f"{sigma.shape}.")
  return sigma


class ResBlock(nn.Module):
  """Residual conv block conditioned FiLM-style on the sigma embedding.

  ``[B, H, W, C_in]``, ``[B, E]`` -> ``[B, H, W, features]``.
  """

  features: int
  num_groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
    h = matmul.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(h)
    # FiLM: a per-channel scale and shift from the sigma embedding, so that one network
    # adapts its denoising strength to the noise level (Appendix A.2.1).
    film = matmul.Dense(2 * self.features, dtype=self.dtype, name="film")(nn.silu(emb))
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = h * (1 + scale) + shift
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h))
    h = matmul.Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = matmul.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class Denoiser(nn.Module):
  """Conditional U-Net denoiser D(x_noisy, sigma) (Section 4.1; see module docstring).

  Attributes:
    width: channels of the first level.
    channel_mults: width multiplier of each level; ``len(channel_mults) - 1``
      downsamplings, so image sides must be divisible by ``2 ** (len - 1)``.
    blocks_per_level: residual blocks per level, on each path.
    emb_dim: width of the sigma embedding.
    num_groups: GroupNorm groups; must divide every level's width.
    dtype: compute dtype (parameters and the output are float32).
  """

  width: int = 32
  channel_mults: Sequence[int] = (1, 2, 4)
  blocks_per_level: int = 2
  emb_dim: int = 128
  num_groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_noisy: jax.Array, sigma) -> jax.Array:
    """Denoises a batch.

    Args:
      x_noisy: ``[B, H, W, 3]`` noisy images, ``x + delta`` in pixel space (may leave
        [0, 1]); H and W divisible by ``2 ** (len(channel_mults) - 1)``.
      sigma: scalar or ``[B]`` noise standard deviation in pixel space.

    Returns:
      ``[B, H, W, 3]`` float32 estimate of the clean image (not clipped).
    """
    b, height, width, c = x_noisy.shape
    factor = 2 ** (len(self.channel_mults) - 1)
    if c != 3 or height % factor or width % factor:
      raise ValueError(
          f"x_noisy must be [B, H, W, 3] with H and W divisible by {factor} "
          f"(2 ** (len(channel_mults) - 1)), got shape {x_noisy.shape}; resize the images "
          "or use fewer levels.")
    for m in self.channel_mults:
      if (self.width * m) % self.num_groups:
        raise ValueError(f"num_groups={self.num_groups} must divide every level width "
                         f"width * mult = {self.width * m}.")
    sigma = broadcast_sigma(sigma, b)
    x_noisy = x_noisy.astype(jnp.float32)

    emb = sigma_features(sigma, self.emb_dim)
    emb = matmul.Dense(4 * self.emb_dim, dtype=self.dtype, name="sigma_mlp_0")(emb)
    emb = matmul.Dense(4 * self.emb_dim, dtype=self.dtype, name="sigma_mlp_1")(nn.silu(emb))

    block = lambda f, name: ResBlock(f, self.num_groups, self.dtype, name=name)
    h = matmul.Conv(self.width, (3, 3), dtype=self.dtype, name="conv_in")(x_noisy)
    skips = []
    levels = len(self.channel_mults)
    for i, mult in enumerate(self.channel_mults):
      for j in range(self.blocks_per_level):
        h = block(self.width * mult, f"down_{i}_{j}")(h, emb)
      if i < levels - 1:
        skips.append(h)  # multi-scale skip connection to the same level of the decoder
        h = matmul.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype,
                        name=f"downsample_{i}")(h)
    h = block(h.shape[-1], "middle")(h, emb)
    for i in reversed(range(levels - 1)):
      f = self.width * self.channel_mults[i]
      bb, hh, ww, cc = h.shape
      h = jax.image.resize(h, (bb, 2 * hh, 2 * ww, cc), method="nearest")
      h = matmul.Conv(f, (3, 3), dtype=self.dtype, name=f"upsample_{i}")(h)
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      for j in range(self.blocks_per_level):
        h = block(f, f"up_{i}_{j}")(h, emb)
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
    # Zero init: D starts as the identity, x_noisy + 0, and learns the correction.
    residual = matmul.Conv(3, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                           name="conv_out")(h)
    return x_noisy + residual.astype(jnp.float32)
