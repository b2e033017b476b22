"""What every attack shares: budget checks, the projected step, smoothed features.

Pixels live in [0, 1] (the encoder interface, ``fsjax.encoders``); ``budget`` and ``sigma``
are in those units, the l2 norm taken over all pixels of one image (method.md, Notation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import checks
from fsjax import encoders as encoders_lib

NORMS = ("linf", "l2")


def _finite_reals(value: Any) -> np.ndarray | None:
  """``value`` as a float64 array of rank <= 1 if it is concrete, real and finite."""
  if isinstance(value, (jax.core.Tracer, str, bool)) or np.ndim(value) > 1:
    return None
  try:
    a = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    return None
  return a if a.size and np.all(np.isfinite(a)) else None


def check_budget(*, budget: Any, step_size: Any, steps: Any, norm: str = "linf",
                 batch: int | None = None) -> None:
  """Raises ValueError for a budget no attack can honour; runs before any jit.

  ``budget`` and ``step_size`` are scalars, or ``[B]`` arrays (one per image, ``batch``
  images) -- e.g. a soundness audit attacks each certificate at its own radius.
  """
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r} is not a known threat model; use one of {NORMS}.")
  for name, value in (("budget", budget), ("step_size", step_size)):
    a = _finite_reals(value)
    if a is None:
      raise ValueError(f"{name} must be a concrete finite real number (or one per image), "
                       f"got {value!r}.")
    if a.ndim == 1 and a.shape[0] != batch:
      raise ValueError(f"{name} has {a.shape[0]} values but there are {batch} images: pass "
                       "a scalar or one value per image.")
  if np.any(np.asarray(budget) < 0):
    raise ValueError(f"budget={budget} is a negative perturbation budget; pass budget >= 0 "
                     "(e.g. 16 / 255 for the paper's l_inf threat model).")
  if np.any(np.asarray(step_size) <= 0):
    raise ValueError(f"step_size={step_size} must be > 0 (e.g. 1 / 255).")
  checks.check_positive_int(steps, name="steps", meaning="attack steps")


def per_image(value: Any, batch: int) -> jax.Array:
  """A scalar or ``[B]`` budget/step as ``[B, 1, 1, 1]`` float32, to broadcast on images."""
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))[:, None, None, None]


def check_smoothing(*, sigma: Any, eot_samples: Any) -> None:
  """Raises ValueError unless ``(sigma, eot_samples)`` describe a valid EOT setting."""
  checks.check_positive_int(eot_samples, name="eot_samples", minimum=0,
                            meaning="noise draws per step; 0 = no EOT")
  if sigma is not None and not isinstance(sigma, jax.core.Tracer):
    s = np.asarray(sigma)
    if s.ndim != 0 or not np.isfinite(s) or s < 0:
      raise ValueError(f"sigma={sigma!r} must be a finite scalar >= 0 (the smoothing noise "
                       "level in [0, 1] pixel units), or None.")
  if eot_samples > 0 and sigma is None:
    raise ValueError(f"eot_samples={eot_samples} averages over the smoothing noise, which "
                     "needs its level: pass sigma=..., or eot_samples=0.")


def check_key(key: Any, *, why: str) -> None:
  if key is None:
    raise ValueError(f"key=None, but {why} needs randomness: pass key=jax.random.key(0).")


def check_target(x: Any, target: Any, *, name: str = "target") -> None:
  """Targets are image batches in [0, 1] with one target per image of ``x``."""
  encoders_lib.check_images(target, name=name)
  if np.shape(target)[0] != np.shape(x)[0]:
    raise ValueError(f"{name} has {np.shape(target)[0]} images but x has {np.shape(x)[0]}: "
                     f"pass one {name} image per input image.")


def as_ensemble(encoder: Any, params: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """``(encoder, params)`` or ``((e1, e2, ...), (p1, p2, ...))`` -> two equal tuples."""
  if isinstance(encoder, encoders_lib.Encoder):
    return (encoder,), (params,)
  if not isinstance(encoder, (tuple, list)) or not encoder or not all(
      isinstance(e, encoders_lib.Encoder) for e in encoder):
    raise ValueError("encoder must be an fsjax.encoders.Encoder or a non-empty tuple of them "
                     f"(an ensemble), got {type(encoder).__name__}.")
  if not isinstance(params, (tuple, list)) or len(params) != len(encoder):
    raise ValueError(f"an ensemble of {len(encoder)} encoders needs params as a tuple of "
                     f"{len(encoder)} parameter trees, one per encoder, in the same order.")
  return tuple(encoder), tuple(params)


def smoothed_tokens(encoder, params, x: jax.Array, *, sigma, eot_samples: int,
                    key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Features and tokens of ``x``, Monte Carlo smoothed over the Gaussian noise.

  With ``eot_samples = m > 0``: ``f = mean_j f(x + delta_j)`` (the smoothed encoder f_s of
  method.md Eq. 3) and ``tokens = mean_j g(x + delta_j)``, delta_j ~ N(0, sigma^2 I) drawn
  from ``key``, no clipping (the smoother does not clip). With ``m = 0``: f(x), g(x).
  The encoder always sees ``sigma``, so GSB's denoiser and mapper condition on it.

  Args:
    encoder: an ``fsjax.encoders.Encoder``.
    params: its parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    sigma: noise level (None for a base encoder without smoothing).
    eot_samples: m, the number of noise draws (static).
    key: PRNG key of the noise.

  Returns:
    ``([B, N * D] features, [B, N, D] tokens)``, float32.
  """
  if eot_samples == 0:
    tokens = encoder.tokens(params, x, sigma=sigma)
    return encoders_lib.normalise(tokens), tokens
  b = x.shape[0]
  noise = sigma * jax.random.normal(key, (eot_samples,) + x.shape, x.dtype)
  noisy = (x[None] + noise).reshape((eot_samples * b,) + x.shape[1:])
  tokens = encoder.tokens(params, noisy, sigma=sigma)
  # encoder(params, x) == normalise(encoder.tokens(params, x)) is the interface's contract.
  feats = encoders_lib.normalise(tokens).reshape(eot_samples, b, -1).mean(0)
  return feats, tokens.reshape((eot_samples, b) + tokens.shape[1:]).mean(0)


def smoothed_features(encoder, params, x: jax.Array, *, sigma, eot_samples: int,
                      key: jax.Array) -> jax.Array:
  """``[B, H, W, 3]`` -> ``[B, N * D]``: f(x), or mean_j f(x + delta_j) when m > 0."""
  if eot_samples == 0:
    return encoder(params, x, sigma=sigma)
  return smoothed_tokens(encoder, params, x, sigma=sigma, eot_samples=eot_samples, key=key)[0]


def project(x_adv: jax.Array, x: jax.Array, budget, norm: str) -> jax.Array:
  """Projects ``x_adv`` onto the budget ball around ``x``, then clips to [0, 1].

  Clipping after the ball projection never leaves the ball: x is in [0, 1], so clipping
  a coordinate only moves it towards x (both in l_inf and in l2).
  """
  if norm == "linf":
    x_adv = jnp.clip(x_adv, x - budget, x + budget)
  else:
    delta = x_adv - x
    n = jnp.sqrt(jnp.sum(delta**2, axis=(1, 2, 3), keepdims=True))
    x_adv = x + delta * jnp.minimum(1.0, budget / jnp.maximum(n, 1e-12))
  return jnp.clip(x_adv, 0.0, 1.0)


def descent_step(x_adv: jax.Array, grad: jax.Array, step_size, norm: str) -> jax.Array:
  """One steepest-descent step on a loss: sign step (l_inf), normalised gradient (l2)."""
  if norm == "linf":
    return x_adv - step_size * jnp.sign(grad)
  n = jnp.sqrt(jnp.sum(grad**2, axis=(1, 2, 3), keepdims=True))
  return x_adv - step_size * grad / jnp.maximum(n, 1e-12)


def random_start(key: jax.Array, x: jax.Array, budget, norm: str) -> jax.Array:
  """A random point of the budget ball around ``x`` (uniform per pixel in l_inf; random
  direction with radius ~ U(0, budget) in l2), clipped to [0, 1]."""
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * budget
  else:
    kd, kr = jax.random.split(key)
    d = jax.random.normal(kd, x.shape, x.dtype)
    d = d / jnp.sqrt(jnp.sum(d**2, axis=(1, 2, 3), keepdims=True))
    delta = d * budget * jax.random.uniform(kr, (x.shape[0], 1, 1, 1), x.dtype)
  return project(x + delta, x, budget, norm)
