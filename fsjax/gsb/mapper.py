"""The residual smoothness mapper M(z, sigma) of GSB (Section 4.2, Appendix A.2.2).

M refines the encoder's token features after extraction: ``h_0 = z``,
``h_{k+1} = h_k + Block_k(h_k, sigma)``, ``M(z, sigma) = h_K`` (Eq. 10). Each block
(method.md section 4, Eq. A.28-A.33):

1. noise-aware LayerNorm-FiLM: ``x_hat = LN(h)``, ``(gamma, beta) = MLP_GELU(sigma)``,
   ``x_tilde = (1 + gamma) * x_hat + beta`` (the LayerNorm has no affine of its own;
   the FiLM is its affine);
2. three parallel paths on ``x_tilde``: multi-head self-attention (first block only),
   a two-layer GELU MLP, a depthwise 1-D convolution along the token axis ('SAME'
   padding, so N = 1 works); fused ``u = attn + mlp + 0.5 * conv`` (Eq. A.30);
3. noise-aware residual: ``d = u / ||u||`` per token, ``a(sigma), b(sigma)`` from a small
   GELU MLP through softplus (both > 0), ``r = a * sigma^b * (gamma_c * d + beta_c) *
   lambda_c`` (Eq. A.31-A.32) with per-channel FiLM ``gamma_c = 1 + MLP(sigma)``,
   ``beta_c = MLP(sigma)`` and a learned per-channel damping ``lambda_c`` initialised to
   ``damping_init`` (1e-3, Fixup-style).

Choices the paper leaves open, written down here:

* ``sigma^b`` is computed as ``where(sigma > 0, exp(b * log(sigma)), 0)`` with a safe
  log, so ``r = 0`` exactly at sigma = 0 for ANY parameters: M(z, 0) = z bit for bit, and
  no NaN in values or gradients there. (Consequence: the identity loss L_id (Eq. 12)
  evaluated at sigma = 0 is identically zero for this mapper.)
* The FiLM output layers are zero-initialised and ``a``, ``b`` start at exactly 1, so at
  initialisation ``r = sigma * d * lambda_c``: a tiny, well-conditioned step.
* ``||u||`` is floored at 1e-6 (with a zero-gradient floor) so a zero ``u`` gives d = 0.
* The residual stream h stays float32; ``dtype`` sets the compute dtype of the
  attention / MLP / conv paths only, so the identity at sigma = 0 holds in bfloat16 too.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import matmul
from fsjax.gsb.denoiser import broadcast_sigma

Dtype = jnp.dtype

_SOFTPLUS_INV_1 = float(np.log(np.e - 1.0))  # softplus(_SOFTPLUS_INV_1) == 1


def safe_pow(sigma: jax.Array, b: jax.Array) -> jax.Array:
  """``sigma ** b`` for sigma >= 0, b > 0, exactly 0 (with finite gradients) at sigma <= 0."""
  positive = sigma > 0
  # The log sees 1 where sigma <= 0, so neither branch of the where makes a NaN/Inf
  # whose cotangent would poison the gradient.
  log_sigma = jnp.log(jnp.where(positive, sigma, 1.0))
  return jnp.where(positive, jnp.exp(b * log_sigma), 0.0)


class SigmaMLP(nn.Module):
  """``[B]`` sigma -> ``[B, features]``: Dense -> GELU -> Dense (Eq. A.29)."""

  features: int
  hidden: int = 64
  bias_init_value: float = 0.0

  @nn.compact
  def __call__(self, sigma: jax.Array) -> jax.Array:
    h = nn.gelu(matmul.Dense(self.hidden, name="hidden")(sigma[:, None]))
    # Zero kernel: the output starts at its bias whatever sigma (gamma = beta = 0, a = b = 1).
    return matmul.Dense(self.features, kernel_init=nn.initializers.zeros,
                        bias_init=nn.initializers.constant(self.bias_init_value),
                        name="out")(h)


class BlockOptions(nn.Module):
  """The options of a mapper block, declared once: :class:`SmoothnessMapper` has them
  and hands them to each of its :class:`MapperBlock` s.

  Attributes:
    num_heads: attention heads of the first block; must divide the token dim D.
    mlp_ratio: hidden width of the MLP path as a multiple of D.
    kernel_size: width of the depthwise convolution along the token axis.
    sigma_hidden: hidden width of the small sigma MLPs (FiLM, amplitude/exponent).
    damping_init: initial per-channel damping lambda_c.
    dtype: compute dtype of the paths; the residual stream and output are float32.
  """

  num_heads: int = 4
  mlp_ratio: float = 2.0
  kernel_size: int = 3
  sigma_hidden: int = 64
  damping_init: float = 1e-3
  dtype: Dtype = jnp.float32

  def block_options(self) -> dict[str, object]:
    """This module's :class:`BlockOptions` fields, by name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(BlockOptions)
            if f.name not in ("parent", "name")}


class MapperBlock(BlockOptions):
  """One block of the mapper: ``[B, N, D]``, ``[B]`` -> the residual ``r`` ``[B, N, D]``.

  See the module docstring for the maths; ``use_attention`` adds the attention path
  (the first block only).
  """

  use_attention: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, sigma: jax.Array) -> jax.Array:
    d_model = h.shape[-1]
    # 1. Noise-aware LayerNorm-FiLM (Eq. A.28-A.29).
    x_hat = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, name="norm")(h)
    gamma, beta = jnp.split(SigmaMLP(2 * d_model, self.sigma_hidden, name="film_in")(sigma),
                            2, axis=-1)
    x_tilde = (1 + gamma[:, None, :]) * x_hat + beta[:, None, :]
    x_tilde = x_tilde.astype(self.dtype)

    # 2. Parallel paths, fused (Eq. A.30): the conv path is down-weighted by 0.5.
    hidden = int(round(self.mlp_ratio * d_model))
    mlp = matmul.Dense(hidden, dtype=self.dtype, name="mlp_in")(x_tilde)
    mlp = matmul.Dense(d_model, dtype=self.dtype, name="mlp_out")(nn.gelu(mlp))
    conv = matmul.Conv(d_model, (self.kernel_size,), feature_group_count=d_model,
                       padding="SAME", dtype=self.dtype, name="dwconv")(x_tilde)
    u = mlp.astype(jnp.float32) + 0.5 * conv.astype(jnp.float32)
    if self.use_attention:
      attn = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                             name="attention")(x_tilde)
      u = u + attn.astype(jnp.float32)

    # 3. Noise-aware residual (Eq. A.31-A.32).
    norm = jnp.sqrt(jnp.maximum(jnp.sum(u * u, axis=-1, keepdims=True), 1e-12))
    direction = u / norm  # d, unit per token
    # Per-channel FiLM of the residual; gamma_c = 1 + MLP(sigma) so that it starts at 1.
    dgamma_c, beta_c = jnp.split(
        SigmaMLP(2 * d_model, self.sigma_hidden, name="film_out")(sigma), 2, axis=-1)
    a, b = jnp.split(nn.softplus(SigmaMLP(2, self.sigma_hidden, _SOFTPLUS_INV_1,
                                          name="amplitude")(sigma)), 2, axis=-1)
    damping = self.param("damping", nn.initializers.constant(self.damping_init),
                         (d_model,))  # lambda_c, Fixup-style small init
    scale = a * safe_pow(sigma[:, None], b)  # a(sigma) * sigma^b(sigma), [B, 1]
    return (scale[:, :, None] * ((1 + dgamma_c[:, None, :]) * direction + beta_c[:, None, :])
            * damping)  # r, exactly 0 at sigma = 0


class SmoothnessMapper(BlockOptions):
  """Residual smoothness mapper M(z, sigma) (Eq. 10; see module docstring).

  Attributes:
    num_blocks: K, the number of residual blocks (the paper does not print its K).
    The options of every block: :class:`BlockOptions`.
  """

  num_blocks: int = 2

  @nn.compact
  def __call__(self, z: jax.Array, sigma) -> jax.Array:
    """Refines token features.

    Args:
      z: ``[B, N, D]`` token features (N = 1 for a pooled embedding).
      sigma: scalar or ``[B]`` noise level, >= 0; sigma = 0 returns z unchanged.

    Returns:
      ``[B, N, D]`` float32 refined features.
    """
    if z.ndim != 3:
      raise ValueError(f"z must be token features [B, N, D], got shape {z.shape}; "
                       "for a pooled embedding [B, D] pass z[:, None, :].")
    if z.shape[-1] % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the token dim "
                       f"D={z.shape[-1]}.")
    sigma = broadcast_sigma(sigma, z.shape[0])
    h = z.astype(jnp.float32)
    for k in range(self.num_blocks):
      h = h + MapperBlock(  # Eq. 10: h_{k+1} = h_k + Block_k(h_k, sigma)
          use_attention=(k == 0), **self.block_options(), name=f"block_{k}")(h, sigma)
    return h
