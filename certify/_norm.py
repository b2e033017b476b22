"""The norm-aware cosine certificate (docs/method.md section 2c).

Theorem 3.2's cosine bound uses only ``||f_s(x')|| <= 1``. The same Lipschitz lemma bounds
the norm itself: for every fixed unit v, ``x -> sigma Phi^-1((1 + <f_s(x), v>) / 2)`` is
1-Lipschitz; take v = the direction of f_s(x') (a fixed vector once x' is fixed), so for
``||x' - x|| <= eps``

    ||f_s(x')|| = <f_s(x'), v>  <=  2 Phi(Phi^-1((1 + <f_s(x), v>) / 2) + eps / sigma) - 1
                               <=  2 Phi(Phi^-1((1 + ||f_s(x)||) / 2) + eps / sigma) - 1 =: U(eps)

(the last step: <f_s(x), v> <= ||f_s(x)|| and the map is increasing). With
``<f_s(x'), u> >= B(eps) >= 0`` from Theorem 3.2, ``cos(f_s(x'), u) >= B(eps) / U(eps)``.
U is increasing in ``||f_s(x)||``, so an upper confidence bound N on the norm keeps it
valid; N and the lower bound behind B each hold with probability 1 - alpha / 2 (union
bound).

The norm's upper bound comes from independent pairs: for samples a, b,
``E <f(x + delta_a), f(x + delta_b)> = ||f_s(x)||^2``; the pair value
``(1 + <f_a, f_b>) / 2`` lies in [0, 1] with mean ``(1 + N^2) / 2``, so an upper bound P on
its mean gives ``N <= sqrt(2 P - 1)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jax.scipy.stats import norm

from certify import _bounds
from certify import _closed_form
from fsjax import checks
from fsjax import cpu
from fsjax import encoders as encoders_lib
from fsjax import smoothing

_BISECTION_STEPS = 60


def _check_norm(norm_upper) -> None:
  checks.check_in_range(norm_upper, name="norm_upper", low=0.0, high=1.0,
                        meaning="an upper confidence bound on ||f_s(x)||")


def _check_eps(eps) -> None:
  # Any shape (eps broadcasts against the bounds); the public entry norm_aware_fcsb uses
  # certify._closed_form.check_eps (one radius or a list of them).
  checks.check_nonnegative(eps, name="eps", meaning="an l2 radius in [0, 1] pixel units")


def _check_cos(cos) -> None:
  # certify._closed_form's check where cos is known (a traced cos is checked by its caller).
  if checks.is_concrete(cos):
    _closed_form.check_cos(cos)


def norm_bound(norm_upper: jax.typing.ArrayLike, eps: jax.typing.ArrayLike,
               sigma) -> jax.Array:
  """``U(eps) = 2 Phi(Phi^-1((1 + N) / 2) + eps / sigma) - 1``, a bound on ``||f_s(x')||``.

  Args:
    norm_upper: ``[...]`` N >= ||f_s(x)||, in [0, 1].
    eps: l2 radii >= 0, broadcast against ``norm_upper``.
    sigma: noise level > 0.

  Returns:
    U, broadcast shape, in [0, 1]. Computed as ``1 - 2 Phi(-(z + eps / sigma))`` with
    ``z = -Phi^-1((1 - N) / 2)``, which keeps U's digits near 1.
  """
  _check_norm(norm_upper)
  _check_eps(eps)
  checks.check_sigma(sigma)
  n = jnp.asarray(norm_upper, jnp.float32)
  z = -ndtri(jnp.clip((1.0 - n) / 2.0, _bounds.MIN_DEFICIT, 0.5))
  return 1.0 - 2.0 * norm.cdf(-(z + jnp.asarray(eps, jnp.float32) / sigma))


def norm_aware_cosine_bound(deficit: jax.typing.ArrayLike, norm_upper: jax.typing.ArrayLike,
                 eps: jax.typing.ArrayLike, sigma) -> jax.Array:
  """Norm-aware certified cosine ``B(eps) / U(eps)`` (-1, vacuous, where B < 0).

  Args:
    deficit: ``1 - L`` with L a lower confidence bound of h_u(x), any shape.
    norm_upper: an upper confidence bound on ||f_s(x)||, broadcast against ``deficit``.
    eps: radii, broadcast against both.
    sigma: noise level.

  Returns:
    A lower bound on ``cos(f_s(x'), u)`` for every ``||x' - x|| <= eps``, in [-1, 1]; it
    is never below Theorem 3.2's B (U <= 1).
  """
  b = _closed_form.bound_from_deficit(deficit, eps, sigma)
  u = norm_bound(norm_upper, eps, sigma)
  # B <= <f_s(x), u> <= ||f_s(x)|| <= U when both bounds hold; the min only guards a
  # failed bound (probability <= alpha) from producing a cosine above 1.
  return jnp.where(b >= 0.0, jnp.minimum(b / jnp.maximum(u, 1e-30), 1.0), -1.0)


def norm_aware_radius(deficit: jax.typing.ArrayLike, norm_upper: jax.typing.ArrayLike, sigma,
           cos: float) -> jax.Array:
  """The largest eps with ``B(eps) / U(eps) >= cos``, ``[...]`` (0 if none, cos > 0).

  ``B / U`` decreases in eps (B decreases, U increases), so bisection on
  ``t = eps / sigma`` in ``[0, Phi^-1(L)]`` (B < 0 beyond) finds it. Never below
  Corollary 3.3's radius, which is the same equation with U = 1.
  """
  _check_cos(cos)
  checks.check_sigma(sigma)
  d = jnp.asarray(deficit, jnp.float32)
  n = jnp.broadcast_to(jnp.asarray(norm_upper, jnp.float32), d.shape)
  zl = _bounds.probit_of_deficit(d)
  zn = -ndtri(jnp.clip((1.0 - n) / 2.0, _bounds.MIN_DEFICIT, 0.5))

  def ok(t):
    b = 1.0 - 2.0 * norm.cdf(-(zl - t))
    u = 1.0 - 2.0 * norm.cdf(-(zn + t))
    return b >= cos * u

  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    good = ok(mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

  lo0 = jnp.zeros_like(zl)
  hi0 = jnp.maximum(zl, 0.0)
  lo, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (lo0, hi0))
  return jnp.where(ok(lo0) & (zl > 0), sigma * lo, 0.0)


def norm_upper_from_pair_deficit(pair_upper: jax.typing.ArrayLike) -> jax.Array:
  """``N = sqrt(2 P - 1)`` from an upper bound P on the mean pair value ``(1 + <f_a, f_b>) / 2``."""
  p = jnp.asarray(pair_upper, jnp.float32)
  return jnp.sqrt(jnp.clip(2.0 * p - 1.0, 0.0, 1.0))


def pair_values(features: jax.Array) -> jax.Array:
  """``(1 + <f_{2i}, f_{2i+1}>) / 2`` of consecutive samples: ``[B, k, D]`` -> ``[B, k / 2]``.

  k must be even. HIGHEST precision, as every dot that forms a score.
  """
  a, b = features[:, 0::2], features[:, 1::2]
  return 0.5 * (1.0 + jnp.einsum("bkd,bkd->bk", a, b, precision=jax.lax.Precision.HIGHEST))


class NormAwareCertificate(NamedTuple):
  """The norm-aware cosine certificate for a batch of images.

  Attributes:
    deficit: ``[B]`` ``1 - L`` (exact where L is within float32 rounding of 1).
    score: ``[B]`` the lower confidence bound L of h_u(x) (level 1 - alpha / 2).
    norm_upper: ``[B]`` the upper confidence bound N on ||f_s(x)|| (level 1 - alpha / 2).
    inner_product_bound: ``[B]`` or ``[B, E]``: B(eps), Theorem 3.2 (valid alone at 1 -
      alpha / 2).
    cosine_bound: same shape: ``B / U`` where B >= 0, else the vacuous -1.
    certified: same shape, bool: B >= 0.
    direction: ``[B, D]`` the unit reference u (the stage-1 mean direction).
    is_certificate: always True here (no point estimates).
  """
  deficit: jax.Array
  score: jax.Array
  norm_upper: jax.Array
  inner_product_bound: jax.Array
  cosine_bound: jax.Array
  certified: jax.Array
  direction: jax.Array
  is_certificate: bool


def certificate_from_bounds(deficit: jax.Array, norm_upper: jax.Array, direction: jax.Array,
                            *, eps, sigma: float) -> NormAwareCertificate:
  """Builds a :class:`NormAwareCertificate` from ``[B]`` deficit and norm bound."""
  eps = jnp.asarray(eps, jnp.float32)
  d, n = (deficit[:, None], norm_upper[:, None]) if eps.ndim else (deficit, norm_upper)
  inner = _closed_form.bound_from_deficit(d, eps, jnp.float32(sigma))
  cos = norm_aware_cosine_bound(d, n, eps, jnp.float32(sigma))
  return NormAwareCertificate(deficit=deficit, score=1.0 - deficit, norm_upper=norm_upper,
                              inner_product_bound=inner, cosine_bound=cos,
                              certified=inner >= 0.0, direction=direction,
                              is_certificate=True)


def _stage2_statistic(features, u, centers, bets=None):
  scores = 0.5 * (1.0 + jnp.einsum("bkd,bd->bk", features, u,
                                   precision=jax.lax.Precision.HIGHEST))
  # Pair scores r = (1 - <f_a, f_b>) / 2 (mean (1 - N^2) / 2): a *lower* bound on their
  # mean is the upper bound on N^2. Put pair i at sample 2i (0 at 2i + 1), so the
  # engine's mask of a partial last chunk keeps whole pairs (n and chunk are even).
  r = 1.0 - pair_values(features)
  r = jnp.stack([r, jnp.full_like(r, 0.5)], axis=2).reshape(scores.shape)
  both = jnp.stack([scores, r], axis=-1)  # [B, k, 2]
  stats = _bounds.score_statistics(both, centers, bets)
  odd = (jnp.arange(scores.shape[1]) % 2 == 1)[None, :]

  def drop_odd_pair(v):
    # The pair channel (index 1 of the last-but-statistic axis) is zero at odd samples.
    mask = jnp.stack([jnp.zeros_like(odd), odd], axis=-1)  # [1, k, 2]
    return jnp.where(mask.reshape(mask.shape + (1,) * (v.ndim - 3)), 0.0, v)

  return _bounds.ScoreStats(*(None if v is None else drop_odd_pair(v) for v in stats))


@cpu.jit(static_argnames=("encoder", "n0", "n", "alpha", "bound", "chunk_size"))
def _bounds_of(params, x, key, sigma, *, encoder, n0, n, alpha, bound, chunk_size):
  clean = encoder(params, x, sigma=sigma)
  def stage1_statistic(f):
    dev = 0.5 * (1.0 - jnp.einsum("bkd,bd->bk", f, clean, precision=jax.lax.Precision.HIGHEST))
    return {"feature": f, "dev": dev, "dev_sq": dev * dev}
  stage1 = smoothing.monte_carlo_sum(
      params, x, key, (), encoder=encoder, sigma=sigma, n=n0, chunk_size=chunk_size,
      statistic=stage1_statistic)
  mean = stage1["feature"] / n0
  mean_norm = jnp.linalg.norm(mean, axis=-1)
  u = mean / jnp.maximum(mean_norm[:, None], 1e-30)
  # Centres of the stage-2 sums: h_u ~ (1 + ||f_s||) / 2, r ~ (1 - ||f_s||^2) / 2.
  centers = jnp.stack([0.5 * (1.0 + mean_norm), 0.5 * (1.0 - mean_norm**2)], axis=1)
  aux = (u, centers)
  pairs = n // 2
  if bound == "betting":
    # Bets sized by the stage-1 variance of the clean scores (as certify.fcsb); any
    # variance independent of stage 2 keeps the bound valid.
    m1 = stage1["dev"] / n0
    var1 = jnp.maximum(stage1["dev_sq"] / n0 - m1**2, 0.0) * n0 / max(n0 - 1, 1)
    aux += (jnp.stack([_bounds.bet_sizes(var1, n=n, alpha=alpha / 2),
                       _bounds.bet_sizes(2.0 * var1, n=pairs, alpha=alpha / 2)], axis=1),)
  stage2 = smoothing.monte_carlo_sum(
      params, x, key, aux, encoder=encoder, sigma=sigma, n=n, chunk_size=chunk_size,
      statistic=_stage2_statistic, first_index=n0)
  stats = _bounds.ScoreStats(*stage2)
  pick = lambda i: jax.tree.map(lambda v: v[:, i] if v is not None else None, stats)  # noqa: E731
  score_deficit = _bounds.lower_confidence_bound(pick(0), centers[:, 0], n=n,
                                                 alpha=alpha / 2, bound=bound)
  pair_deficit = _bounds.lower_confidence_bound(pick(1), centers[:, 1], n=pairs,
                                                alpha=alpha / 2, bound=bound)
  # 1 - L_r upper-bounds the mean of 1 - r = (1 + <f_a, f_b>) / 2, i.e. (1 + N^2) / 2.
  return score_deficit, norm_upper_from_pair_deficit(pair_deficit), u


def norm_aware_fcsb(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                    sigma: float, eps: float | Sequence[float], key: jax.Array,
                    n: int = 10_000, n0: int = 100, alpha: float = 0.001,
                    bound: str = "bernstein",
                    chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE) -> NormAwareCertificate:
  """Norm-aware cosine certificate, fixed n (docs/method.md section 2c).

  Two stages as :func:`certify.fcsb` (reference ``"mean"``): n0 samples choose u; the n
  fresh samples give L (lower bound of h_u, level alpha / 2) and, from their n / 2
  consecutive pairs, N (upper bound on ||f_s(x)||, level alpha / 2).

  Args:
    params, x, encoder, sigma, eps, key, n0, chunk_size: as :func:`certify.fcsb`.
    n: second-stage samples, even (pairs), >= 4.
    alpha: failure probability of the whole certificate (split in halves).
    bound: "bernstein", "betting" or "hoeffding" (a certificate; "point" is refused).

  Returns:
    A :class:`NormAwareCertificate`.
  """
  encoders_lib.check_images(x)
  smoothing.check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  checks.check_positive_int(n, name="n", minimum=4, meaning="second-stage samples")
  checks.check_positive_int(n0, name="n0", meaning="first-stage samples")
  checks.check_alpha(alpha)
  checks.check_choice(bound, name="bound", choices=_bounds.CERTIFYING_BOUNDS)
  _closed_form.check_eps(eps)
  if n % 2 or chunk_size % 2:
    raise ValueError(f"n and chunk_size must be even (the norm bound pairs consecutive "
                     f"samples); got n={n}, chunk_size={chunk_size}.")
  score_deficit, norm_upper, u = _bounds_of(
      params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma), encoder=encoder,
      n0=int(n0), n=int(n), alpha=float(alpha), bound=bound, chunk_size=int(chunk_size))
  return certificate_from_bounds(score_deficit, norm_upper, u, eps=eps, sigma=sigma)
