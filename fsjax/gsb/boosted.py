"""The GSB-boosted encoder ``f(x) = normalise(M(g(D(x, sigma)), sigma))`` (Eq. 14-15).

:class:`BoostedEncoder` plugs the denoiser D in front of a frozen base encoder g and the
smoothness mapper M behind it. Either module may be absent, so the four rows of the
paper's ablation (Table 6: FS, +D, +M, +D+M) are one class. D and M are deterministic,
so the certificate of method.md section 2 applies to the boosted encoder unchanged.

Also here: :func:`default_gsb_config` (every default the paper leaves unprinted) and the
factories :func:`build_denoiser` / :func:`build_mapper` from ``config.gsb``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fsjax.encoders import Encoder, Params, resize
from fsjax.gsb import losses
from fsjax.gsb.denoiser import Denoiser
from fsjax.gsb.mapper import SmoothnessMapper


def default_gsb_config() -> ml_collections.ConfigDict:
  """Defaults of ``config.gsb``; assign with ``config.gsb = default_gsb_config()``.

  The paper prints neither lambda, lambda_1, lambda_2 (Eq. 9, 13), nor K (Eq. 10), nor the
  learning rates, nor the number of noise draws per image: the values below are ours.
  Printed by the paper: Adam, batch 8, 8 epochs for D; AdamW with a cosine schedule,
  batch 16, 8 epochs for M; D about 10 MB.

  Returns:
    A ConfigDict with sub-dicts ``denoiser`` (keyword arguments of
    :class:`~fsjax.gsb.denoiser.Denoiser`) and ``mapper`` (of
    :class:`~fsjax.gsb.mapper.SmoothnessMapper`), the loss weights ``lam_rob``,
    ``lam_id``, ``lam_stat``, ``id_sigma`` and the training hyper-parameters.
  """
  c = ml_collections.ConfigDict()
  # D: 2,489,603 float32 parameters = 9.96 MB (Appendix A.2.1: "approximately 10 MB").
  c.denoiser = ml_collections.ConfigDict(dict(
      width=32, channel_mults=(1, 2, 4), blocks_per_level=2, emb_dim=128, num_groups=8,
      dtype="float32"))
  # M: K = 3 blocks (attention in the first only).
  c.mapper = ml_collections.ConfigDict(dict(
      num_blocks=3, num_heads=8, mlp_ratio=2.0, kernel_size=3, sigma_hidden=64,
      damping_init=1e-3, dtype="float32"))
  c.lam_rob = losses.LAM_ROB  # lambda, Eq. 9
  c.lam_id = losses.LAM_ID  # lambda_1, Eq. 13
  c.lam_stat = losses.LAM_STAT  # lambda_2, Eq. 13
  # sigma at which L_id evaluates M on clean features. The paper's 0 makes L_id
  # identically zero for our mapper (M(z, 0) = z exactly); a value > 0 turns it into a
  # "leave clean features alone at the working sigma" regulariser.
  c.id_sigma = 0.0
  c.num_noise_samples = 4  # Monte Carlo draws of delta per image during training
  c.denoiser_learning_rate = 1e-4  # Adam
  c.denoiser_batch_size = 8
  c.denoiser_epochs = 8
  c.mapper_learning_rate = 1e-4  # AdamW, cosine decay to 0
  c.mapper_weight_decay = 1e-2
  c.mapper_batch_size = 16
  c.mapper_epochs = 8
  return c


def _module_kwargs(config, which: str) -> dict[str, Any]:
  """Defaults of ``gsb.<which>`` overridden by ``config.gsb.<which>`` (unknown keys raise)."""
  kwargs = default_gsb_config()[which].to_dict()
  gsb = config.get("gsb") if hasattr(config, "get") else getattr(config, "gsb", None)
  given = gsb.get(which) if gsb is not None and hasattr(gsb, "get") else None
  if given is not None:
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    unknown = sorted(set(given) - set(kwargs))
    if unknown:
      raise ValueError(f"config.gsb.{which} has unknown keys {unknown}; known: "
                       f"{sorted(kwargs)}.")
    kwargs.update(given)
  kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return kwargs


def build_denoiser(config) -> Denoiser:
  """The denoiser D from ``config.gsb.denoiser`` (missing keys: :func:`default_gsb_config`)."""
  kwargs = _module_kwargs(config, "denoiser")
  kwargs["channel_mults"] = tuple(kwargs["channel_mults"])
  return Denoiser(**kwargs)


def build_mapper(config, token_dim: int) -> SmoothnessMapper:
  """The mapper M from ``config.gsb.mapper`` for token features of width ``token_dim``."""
  kwargs = _module_kwargs(config, "mapper")
  if token_dim % kwargs["num_heads"]:
    raise ValueError(f"config.gsb.mapper.num_heads={kwargs['num_heads']} must divide the "
                     f"encoder's token dim {token_dim}.")
  return SmoothnessMapper(**kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class BoostedEncoder(Encoder):
  """A base encoder with the GSB denoiser before it and the mapper after it (Eq. 14).

  ``params`` is ``{"encoder": base_params, "denoiser": ..., "mapper": ...}`` with a key
  for each present module only (:meth:`init_params` builds it). ``resolution`` is the
  base encoder's.

  Choices:

  * Images are resized to the encoder's resolution BEFORE the denoiser (a no-op for
    inputs already there; feed them so, so that D sees noise of standard deviation sigma).
  * D's output is clipped to [0, 1], the range the base encoder expects. Clipping is
    deterministic, so the certified function stays a fixed function of x; its gradient is
    0 at clipped pixels, which L_rec (computed on the unclipped output) does not suffer.

  Attributes:
    base: the frozen base encoder g.
    denoiser: the denoiser module D, or None.
    mapper: the smoothness mapper module M, or None.
  """

  base: Encoder
  denoiser: nn.Module | None = None
  mapper: nn.Module | None = None
  resolution: int = dataclasses.field(init=False)

  def __post_init__(self):
    if not isinstance(self.base, Encoder):
      raise ValueError(f"base must be an fsjax.encoders.Encoder, got {type(self.base)}.")
    object.__setattr__(self, "resolution", self.base.resolution)

  def _expected_keys(self) -> set[str]:
    keys = {"encoder"}
    if self.denoiser is not None:
      keys.add("denoiser")
    if self.mapper is not None:
      keys.add("mapper")
    return keys

  def _check(self, params: Params, sigma: Any) -> None:
    expected = self._expected_keys()
    if not isinstance(params, Mapping) or set(params) != expected:
      got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
      raise ValueError(
          f"params of this BoostedEncoder must be a dict with keys {sorted(expected)} "
          f"(one per present module), got {got}. Build it with "
          "encoder.init_params(rng, base_params) or {'encoder': base_params, ...}.")
    if sigma is None and expected != {"encoder"}:
      raise ValueError("sigma is required: the GSB denoiser and mapper are conditioned on "
                       "the smoothing noise level; pass sigma=... (scalar or [B]).")

  def denoise(self, params: Params, x: jax.Array, *, sigma: Any) -> jax.Array:
    """``[B, H, W, 3]`` -> D(x, sigma) at the encoder's resolution, unclipped, float32.

    The identity (after the resize) when there is no denoiser.
    """
    self._check(params, sigma)
    x = resize(jnp.asarray(x, jnp.float32), self.resolution)
    if self.denoiser is None:
      return x
    return self.denoiser.apply({"params": params["denoiser"]}, x, sigma)

  def tokens(self, params: Params, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, H, W, 3]`` (possibly noisy) -> ``M(g(clip(D(x, sigma))), sigma)`` ``[B, N, D]``.

    Args:
      params: ``{"encoder": ..., "denoiser": ..., "mapper": ...}`` (present modules only).
      x: ``[B, H, W, 3]`` images in pixel space, ``x + delta`` under smoothing.
      sigma: scalar or ``[B]`` noise level; required when a GSB module is present.

    Returns:
      ``[B, N, D]`` float32 token features.
    """
    self._check(params, sigma)
    if self.denoiser is not None:
      x = jnp.clip(self.denoise(params, x, sigma=sigma), 0.0, 1.0)
    z = self.base.tokens(params["encoder"], x, sigma=sigma)
    if self.mapper is not None:
      z = self.mapper.apply({"params": params["mapper"]}, z, sigma)
    return z.astype(jnp.float32)

  def init_params(self, rng: jax.Array, encoder_params: Params) -> dict[str, Params]:
    """Random GSB parameters around the given base parameters.

    Args:
      rng: a PRNG key.
      encoder_params: the frozen base encoder's parameters.

    Returns:
      ``{"encoder": encoder_params, "denoiser": ..., "mapper": ...}`` (present modules).
    """
    params = {"encoder": encoder_params}
    k_d, k_m = jax.random.split(rng)
    x = jnp.zeros((1, self.resolution, self.resolution, 3), jnp.float32)
    # Jitted: one compilation instead of one per operation of an eager init.
    if self.denoiser is not None:
      params["denoiser"] = jax.jit(self.denoiser.init)(k_d, x, 0.0)["params"]
    if self.mapper is not None:
      z = jax.eval_shape(lambda: self.base.tokens(encoder_params, x, sigma=0.0))
      z = jnp.zeros(z.shape, jnp.float32)
      params["mapper"] = jax.jit(self.mapper.init)(k_m, z, 0.0)["params"]
    return params
