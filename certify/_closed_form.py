"""Closed forms of the feature certificate (Theorem 3.2, Corollary 3.3; docs/method.md section 2).

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
from fsjax import checks


def check_eps(eps) -> None:
  """Raises ValueError unless ``eps`` is one radius or a non-empty list ``[E]`` of radii >= 0."""
  if np.ndim(eps) > 1 or np.size(eps) == 0:
    raise ValueError(f"eps must be one l2 radius or a non-empty list of them (shape [E]), got "
                     f"shape {np.shape(eps)}; certify each image's radii separately.")
  checks.check_nonnegative(eps, name="eps", meaning="an l2 radius in [0, 1] pixel units")


def check_cos(cos) -> None:
  """Raises ValueError unless ``cos`` is one certified cosine level in [0, 1)."""
  checks.check_in_range(cos, name="cos", low=0.0, high=1.0,
                        meaning="the cosine level to certify; the inner-product bound "
                        "certifies a cosine only when it is >= 0")
  if np.ndim(cos) or float(cos) >= 1.0:
    raise ValueError(f"cos must be one number in [0, 1) (1 is reached only at radius 0 by a "
                     f"constant encoder), got {cos!r}.")


def _check_score(score) -> None:
  checks.check_nonempty(score, name="score", item="score")
  checks.check_probability(score, name="score", meaning="a Gaussian robustness score or its "
                           "lower confidence bound")


def bound_from_deficit(deficit: jax.Array, eps: jax.Array, sigma) -> jax.Array:
  """``2 Phi(Phi^-1(1 - deficit) - eps / sigma) - 1``; broadcasts deficit against eps.

  Unchecked: the public entries (:func:`fcsb_from_score`, ``certify.feature_certificate``,
  ``certify.fcsb``) validate their arguments once and call this.

  Args:
    deficit: ``1 - L`` in [0, 1], any shape.
    eps: l2 radii >= 0, broadcast against ``deficit``.
    sigma: noise level > 0.
  """
  z = _bounds.probit_of_deficit(jnp.asarray(deficit, jnp.float32))
  return 2.0 * norm.cdf(z - jnp.asarray(eps, jnp.float32) / sigma) - 1.0


def radius_from_deficit(deficit: jax.Array, sigma, cos: float) -> jax.Array:
  """``sigma * (Phi^-1(1 - deficit) - Phi^-1((1 + cos) / 2))`` (Corollary 3.3 at cos = 0.5).

  ``Phi^-1((1 + cos) / 2)`` is computed as ``-Phi^-1((1 - cos) / 2)``, which keeps its
  digits for a level near 1. Unchecked, as :func:`bound_from_deficit`.
  """
  z = _bounds.probit_of_deficit(jnp.asarray(deficit, jnp.float32))
  return sigma * (z + ndtri(jnp.float32((1.0 - cos) / 2.0)))


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
  check_eps(eps)
  checks.check_sigma(sigma)
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
  checks.check_sigma(sigma)
  check_cos(cos)
  return radius_from_deficit(1.0 - jnp.asarray(score, jnp.float32), jnp.float32(sigma), cos)
