"""The GSB-boosted encoder ``f(x) = normalise(M(g(D(x, sigma)), sigma))`` (Eq. 14-15).

:class:`BoostedEncoder` plugs the denoiser D in front of a frozen base encoder g and the
smoothness mapper M behind it. Either module may be absent, so the four rows of the
paper's ablation (Table 6: FS, +D, +M, +D+M) are one class. D and M are deterministic,
so the certificate of method.md section 2 applies to the boosted encoder unchanged.

Also here: :func:`default_gsb_config` (every default the paper leaves unprinted), the
factories :func:`build_denoiser` / :func:`build_mapper` from ``config.gsb`` and
:func:`ablation_variants`, the FS+D / FS+M / FS+D+M encoders from trained parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
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
  """Defaults of ``config.gsb``: the modules' architecture, the loss weights, training.

  The paper prints neither lambda, lambda_1, lambda_2 (Eq. 9, 13), nor K (Eq. 10), nor the
  learning rates, nor the number of noise draws per image: those values are ours.
  Printed by the paper: Adam, batch 8, 8 epochs for D; AdamW with a cosine schedule,
  batch 16, 8 epochs for M; D about 10 MB.

  Returns:
    A ConfigDict with ``sigma_range``, ``noise_samples`` and the sub-dicts ``denoiser``
    (the keyword arguments of :class:`~fsjax.gsb.denoiser.Denoiser`, ``lam_rob`` and D's
    training) and ``mapper`` (those of :class:`~fsjax.gsb.mapper.SmoothnessMapper`,
    ``lam_id``, ``lam_stat``, ``id_sigma`` and M's training).
  """
  def architecture(module) -> dict[str, Any]:
    # The modules' own field defaults (D: 2,489,603 float32 parameters = 9.96 MB, the
    # paper's "approximately 10 MB", Appendix A.2.1).
    out = {f.name: f.default for f in dataclasses.fields(module)
           if f.name not in ("parent", "name")}
    return {**out, "dtype": "float32"}

  c = ml_collections.ConfigDict()
  c.sigma_range = (0.25, 0.5)  # training sigma, uniform per example (Table 1's sigmas)
  c.noise_samples = 2  # Monte Carlo draws of delta per image per step
  # Adam for D (lambda of Eq. 9; warmup_epochs of L_rec alone first, 0 = the paper's L_D
  # from the start); AdamW with a cosine schedule for M (lambda_1, lambda_2 of Eq. 13;
  # id_sigma: L_id's sigma, the paper's 0 -- for our mapper M(z, 0) = z exactly).
  c.denoiser = ml_collections.ConfigDict({
      **architecture(Denoiser), "lam_rob": losses.LAM_ROB, "warmup_epochs": 0,
      "batch_size": 8, "epochs": 8, "learning_rate": 2e-4})
  c.mapper = ml_collections.ConfigDict({
      **architecture(SmoothnessMapper), "lam_id": losses.LAM_ID,
      "lam_stat": losses.LAM_STAT, "id_sigma": 0.0, "batch_size": 16, "epochs": 8,
      "learning_rate": 1e-4, "weight_decay": 1e-4})
  return c


def resolved_gsb_config(config) -> ml_collections.ConfigDict:
  """``config.gsb`` over :func:`default_gsb_config`: the one place the defaults are merged.

  Every reader of ``config.gsb`` (the module factories here, ``train.gsb``) goes through
  this, so a key missing from a config means the same default everywhere. A key of
  ``config.gsb.denoiser`` / ``config.gsb.mapper`` that is not known but close to a known
  one (a typo) raises.

  Args:
    config: an experiment config, with or without a ``gsb`` section.

  Returns:
    A new ConfigDict with every key of :func:`default_gsb_config` (and any extra keys
    of ``config.gsb``, e.g. ``checkpoint``, ``log_every``).
  """
  merged = default_gsb_config().to_dict()
  gsb = config.get("gsb") if hasattr(config, "get") else None
  given = {} if gsb is None else (gsb.to_dict() if hasattr(gsb, "to_dict") else dict(gsb))
  for which in ("denoiser", "mapper"):
    sub = given.pop(which, None)
    if sub is None:
      continue
    sub = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)
    for k in sub:
      close = difflib.get_close_matches(k, merged[which], n=1, cutoff=0.85)
      if k not in merged[which] and close:
        raise ValueError(f"config.gsb.{which}.{k} is not a key; did you mean {close[0]!r}?")
    merged[which].update(sub)
  merged.update(given)
  return ml_collections.ConfigDict(merged)


def _module_kwargs(config, module: type[nn.Module], which: str) -> dict[str, Any]:
  """``module``'s fields from :func:`resolved_gsb_config` (training keys skipped)."""
  fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name"}
  merged = resolved_gsb_config(config)[which].to_dict()
  kwargs = {k: v for k, v in merged.items() if k in fields}
  kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return kwargs


def build_denoiser(config) -> Denoiser:
  """The denoiser D from ``config.gsb.denoiser`` (missing keys: :func:`default_gsb_config`)."""
  kwargs = _module_kwargs(config, Denoiser, "denoiser")
  kwargs["channel_mults"] = tuple(kwargs["channel_mults"])
  return Denoiser(**kwargs)


def build_mapper(config, token_dim: int) -> SmoothnessMapper:
  """The mapper M from ``config.gsb.mapper`` for token features of width ``token_dim``."""
  kwargs = _module_kwargs(config, SmoothnessMapper, "mapper")
  if token_dim % kwargs["num_heads"]:
    raise ValueError(f"config.gsb.mapper.num_heads={kwargs['num_heads']} must divide the "
                     f"encoder's token dim {token_dim}.")
  return SmoothnessMapper(**kwargs)


def ablation_variants(encoder: Encoder, encoder_params: Params,
                      gsb_params: Mapping[str, Params], config
                      ) -> list[tuple[str, Encoder, Params]]:
  """The GSB rows of the Table 6 ablation: ``[(name, encoder, params)]``.

  Args:
    encoder: the base encoder g.
    encoder_params: its parameters.
    gsb_params: trained ``{"denoiser": ..., "mapper": ...}`` (either may be missing).
    config: the experiment config (``config.gsb`` gives the architectures).

  Returns:
    ``("FS+D", ...)``, ``("FS+M", ...)``, ``("FS+D+M", ...)``, those the trained
    modules allow, in that order. The plain "FS" row is the base encoder itself.
  """
  d = build_denoiser(config) if "denoiser" in gsb_params else None
  m = None
  if "mapper" in gsb_params:
    x = jax.ShapeDtypeStruct((1, encoder.resolution, encoder.resolution, 3), jnp.float32)
    token_dim = jax.eval_shape(lambda x: encoder.tokens(encoder_params, x), x).shape[-1]
    m = build_mapper(config, token_dim)
  def variant(name, den, mapper):
    params = {"encoder": encoder_params}
    params.update({k: gsb_params[k] for k, mod in (("denoiser", den), ("mapper", mapper))
                   if mod is not None})
    return name, BoostedEncoder(encoder, denoiser=den, mapper=mapper), params

  out = []
  if d is not None:
    out.append(variant("FS+D", d, None))
  if m is not None:
    out.append(variant("FS+M", None, m))
  if d is not None and m is not None:
    out.append(variant("FS+D+M", d, m))
  return out


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
    """``[B, H, W, 3]`` -> D(x, sigma) ``[B, r, r, 3]`` float32, r the resolution, unclipped.

    What L_rec (Eq. 7) compares with the clean image (at the same resolution); the
    identity after the resize when there is no denoiser.
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
