"""Closed forms of the feature certificate (Theorem 3.2, Corollary 3.3; method.md section 2).

For any fixed unit vector u, ``h_u(x) = (1 + <f_s(x), u>) / 2`` is the mean of a [0, 1]
function under Gaussian noise, so ``sigma * Phi^-1(h_u(x))`` is 1-Lipschitz in x
(Salman et al. 2019). Hence for ``||x' - x|| <= eps``:

    <f_s(x'), u>  >=  2 Phi( Phi^-1(h_u(x)) - eps / sigma ) - 1  =: B(eps)

and, because ``||f_s(x')|| <= 1``, ``cos(f_s(x'), u) >= B`` when ``B >= 0``. With u = f(x)
the score h_u is the Gaussian robustness score S(x) (Eq. 5) and B is the paper's FCSB.
Solving ``B(R) = c`` gives the radius for cosine level c (Corollary 3.3 is c = 0.5):

    R_c = sigma * ( Phi^-1(h_u(x)) - Phi^-1((1 + c) / 2) ).

Functions here take the score (a point estimate or a lower confidence bound) and work in
float32. Internally they use the deficit ``1 - score``, which keeps precision near 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri
from jax.scipy.stats import norm

from certify import _bounds


def _check_sigma(sigma) -> None:
  if not np.all(np.isfinite(sigma)) or np.any(np.asarray(sigma) <= 0):
    raise ValueError(f"sigma must be finite and > 0 (noise level in pixel units), got {sigma}.")


def _check_eps(eps) -> None:
  if not np.all(np.isfinite(eps)) or np.any(np.asarray(eps) < 0):
    raise ValueError(f"eps must be finite and >= 0 (an l2 radius in [0, 1] pixel units), got {eps}.")


def _check_cos(cos) -> None:
  if not 0.0 <= cos < 1.0:
    raise ValueError(f"cos must be in [0, 1): the inner-product bound certifies a cosine only "
                     f"when it is >= 0; got {cos}.")


def _check_score(score) -> None:
  s = np.asarray(score, np.float64)
  if not np.all(np.isfinite(s)):
    raise ValueError("score contains NaN or Inf; a score is a Gaussian robustness score or "
                     "its lower confidence bound, in [0, 1].")
  if np.any(s < 0) or np.any(s > 1):
    raise ValueError("score must be in [0, 1] (a Gaussian robustness score or its lower "
                     f"confidence bound); got values in [{s.min()}, {s.max()}].")


def bound_from_deficit(deficit: jax.Array, eps: jax.Array, sigma) -> jax.Array:
  """``2 Phi(Phi^-1(1 - deficit) - eps / sigma) - 1``; broadcasts deficit against eps."""
  z = _bounds.probit_of_deficit(jnp.clip(deficit, _bounds.MIN_DEFICIT, 1.0))
  return 2.0 * norm.cdf(z - eps / sigma) - 1.0


def radius_from_deficit(deficit: jax.Array, sigma, cos: float) -> jax.Array:
  """``sigma * (Phi^-1(1 - deficit) - Phi^-1((1 + cos) / 2))``."""
  z = _bounds.probit_of_deficit(jnp.clip(deficit, _bounds.MIN_DEFICIT, 1.0))
  return sigma * (z - ndtri(jnp.float32((1.0 + cos) / 2.0)))


def fcsb_from_score(score: jax.typing.ArrayLike, *, eps: jax.typing.ArrayLike,
                    sigma: float) -> jax.Array:
  """Feature cosine similarity bound from a score (Theorem 3.2).

  Args:
    score: ``[...]`` h_u(x) in [0, 1]: S(x) for the paper's FCSB, or a lower confidence
      bound of it for a certificate that holds with probability 1 - alpha.
    eps: l2 radius (scalar or ``[E]``) in [0, 1] pixel units.
    sigma: smoothing noise level.

  Returns:
    ``[...]`` (scalar eps) or ``[..., E]``: the bound B on ``<f_s(x'), u>``. It bounds
    the cosine only where it is >= 0.
  """
  _check_score(score)
  _check_eps(eps)
  _check_sigma(sigma)
  deficit = 1.0 - jnp.asarray(score, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  if eps.ndim:
    deficit = deficit[..., None]
  return bound_from_deficit(deficit, eps, jnp.float32(sigma))


def radius_from_score(score: jax.typing.ArrayLike, *, sigma: float, cos: float = 0.5) -> jax.Array:
  """Certified l2 radius for ``cos(f_s(x'), u) >= cos`` (Corollary 3.3 at cos = 0.5).

  Args:
    score: ``[...]`` h_u(x) in [0, 1] (point estimate or lower confidence bound).
    sigma: smoothing noise level.
    cos: certified cosine level, in [0, 1).

  Returns:
    ``[...]`` radius; <= 0 means not certified at that level.
  """
  _check_score(score)
  _check_sigma(sigma)
  _check_cos(cos)
  return radius_from_deficit(1.0 - jnp.asarray(score, jnp.float32), jnp.float32(sigma), cos)
