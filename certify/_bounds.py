"""Lower confidence bounds on the mean of [0, 1]-valued scores (docs/method.md section 2).

The paper plugs Monte Carlo point estimates into Phi^-1, which certifies nothing. A
certificate needs a lower confidence bound (LCB) ``L`` with ``P(E[h] >= L) >= 1 - alpha``.
Every bound here is computed from *sums over samples*, so the Monte Carlo engine can
accumulate it in running sums, in any order, over any number of devices:

* ``count``: n (static).
* ``total`` / ``total_sq``: sums of ``h - center`` and ``(h - center)^2``. ``center`` is a
  first-stage estimate of the mean: shifting makes the float32 variance exact enough
  when scores are near 1 with variance ~1e-5 (the naive ``E[h^2] - E[h]^2`` cancels).
* ``log_capital``: the betting bound's wealth, see :func:`betting_bound`.

Bounds:

* ``"point"``: the sample mean. NOT a certificate; the paper's plug-in estimate.
* ``"hoeffding"``: ``mean - sqrt(log(1/alpha) / (2 n))``.
* ``"bernstein"``: empirical Bernstein (Maurer & Pontil 2009, Thm 4):
  ``mean - sqrt(2 V log(2/alpha) / n) - 7 log(2/alpha) / (3 (n - 1))``, V the sample
  variance. Far tighter than Hoeffding when scores concentrate near 1.
* ``"betting"``: a betting (test-martingale) bound in the style of Waudby-Smith & Ramdas
  (2023), made order-free so it can be summed across devices; see :func:`betting_bound`.
  One of its bets is Hoeffding's, so it is never much looser than Hoeffding, whatever the
  first stage says about the variance.

All results are returned as *deficits* ``1 - L`` clipped to ``[1e-12, 1]``: near 1, the
deficit keeps the precision float32 loses in ``L`` itself, and ``Phi^-1(L)`` is then
computed as ``-Phi^-1(1 - L)`` (clipping the deficit at 1e-12 is the "clip the LCB below
1" of docs/method.md, which is sound for any clip below 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jax.scipy.stats import norm

from fsjax import checks

BOUNDS = ("point", "hoeffding", "bernstein", "betting")
CERTIFYING_BOUNDS = BOUNDS[1:]
MIN_DEFICIT = 1e-12

# Betting grid: candidate means m_k = 1 - d_k, d_k = Phi(-z_k), z_k uniform in [-Z, Z].
# Uniform in probit space because what the certificate uses is Phi^-1(L): the grid costs
# at most 2 Z / BETTING_GRID = 0.012 in Phi^-1(L), i.e. 0.012 sigma of radius.
BETTING_GRID = 1024
BETTING_Z = 6.0
# Bets per grid cell: lambda* times these factors (guarding against a first-stage variance
# that is off by 3x either way), plus Hoeffding's bet (see bet_sizes); the wealths are
# averaged (a mixture of test martingales is one).
BETTING_SCALES = (1.0 / 3.0, 1.0, 3.0)
NUM_BETS = len(BETTING_SCALES) + 1
# Cap on lambda * m, so a factor 1 + lambda (h - m) >= 1 - BETTING_CAP > 0 for any h >= 0.
BETTING_CAP = 0.9
# Floor of the first-stage variance in lambda*: only avoids a division by zero (the
# Hoeffding bet is what keeps a zero first-stage variance from hurting).
_MIN_VARIANCE = 1e-10


class ScoreStats(NamedTuple):
  """Sums over samples of scores h in [0, 1]; leaves ``[...]`` (any batch shape)."""
  total: jax.Array         # sum(h - center)
  total_sq: jax.Array      # sum((h - center)^2)
  log_capital: jax.Array | None  # [..., NUM_BETS, BETTING_GRID]; None: no betting


def betting_grid() -> jax.Array:
  """Deficits ``d_k = 1 - m_k`` of the grid's candidate means, ``[BETTING_GRID]``, decreasing.

  The deficit is the one representation of a candidate mean: the wealth tests
  ``m_k = 1 - d_k`` (:func:`score_statistics`) and :func:`betting_bound` reports exactly
  ``d_k``, so the bound reported is the mean that was tested. (float32 cannot hold
  ``1 - d_k`` for small ``d_k``, so the test never rounds ``m_k`` to a float32 itself.)
  """
  z = jnp.linspace(-BETTING_Z, BETTING_Z, BETTING_GRID, dtype=jnp.float32)
  return norm.cdf(-z)


def bet_sizes(variance: jax.typing.ArrayLike, *, n: int, alpha: float) -> jax.Array:
  """The bets ``[..., NUM_BETS]`` of the betting bound, from a first-stage variance ``[...]``.

  * ``lambda* * scale`` for each of :data:`BETTING_SCALES`, with
    ``lambda* = sqrt(2 log(1/alpha) / (n var))`` (Waudby-Smith & Ramdas 2023), the bet
    that is near-optimal when the second-stage variance is ``var``;
  * ``sqrt(8 log(1/alpha) / n)``, the bet of Hoeffding's inequality (variance <= 1/4 for
    scores in [0, 1]). It does not depend on the first stage: when all ``n0`` first-stage
    scores are equal (variance 0, e.g. scores that are 0 or 1), lambda* hits its cap and
    one deviating score in the second stage ruins those bets; this one still gives, to
    second order, Hoeffding's bound at level ``alpha / NUM_BETS`` with the range term
    replaced by the actual variance.

  ``variance`` must come from samples independent of the n scores bet on (the first
  stage), so that the bets are fixed given them and each wealth is a martingale. Any
  variance keeps the bound valid; it only affects tightness.
  """
  var = jnp.maximum(jnp.asarray(variance, jnp.float32), _MIN_VARIANCE)
  lam = jnp.sqrt(2.0 * math.log(1.0 / alpha) / (n * var))
  scaled = lam[..., None] * jnp.asarray(BETTING_SCALES, jnp.float32)
  hoeffding = jnp.full(lam.shape + (1,), math.sqrt(8.0 * math.log(1.0 / alpha) / n),
                       jnp.float32)
  return jnp.concatenate([scaled, hoeffding], axis=-1)


def score_statistics(scores: jax.Array, center: jax.Array,
                     bets: jax.Array | None = None) -> ScoreStats:
  """Per-sample statistics; sum them over samples (any order) to get :class:`ScoreStats`.

  Args:
    scores: ``[B, k, ...]`` scores in [0, 1], the k samples on axis 1.
    center: ``[B, ...]`` first-stage mean estimate.
    bets: ``[B, ..., NUM_BETS]`` from :func:`bet_sizes`; None skips the betting wealth
      (``log_capital`` is None), which costs ``NUM_BETS * BETTING_GRID`` logs per score.

  Returns:
    ScoreStats with leaves ``[B, k, ...]`` and ``[B, k, ..., NUM_BETS, BETTING_GRID]``
    (sum over axis 1).
  """
  center = jnp.expand_dims(center, 1)
  d = scores - center
  if bets is None:
    return ScoreStats(d, d * d, None)
  deficits = betting_grid()
  means = 1.0 - deficits  # exact for d_k >= 1/2 (Sterbenz), rounded above 1/2
  # Bet lambda on cell k, capped so that lambda m_k <= BETTING_CAP (the cap need not be
  # exact: it leaves 1 - BETTING_CAP of room).
  bet = jnp.minimum(jnp.expand_dims(bets, 1)[..., None], BETTING_CAP / means)
  # h - m_k for m_k = 1 - d_k exactly, the mean reported when cell k is the last rejected
  # one: (h - 1) + d_k where m_k > 1/2 (h - 1 is exact for h >= 1/2, Sterbenz), else
  # h - m_k. Either way one rounding of the result itself whenever h >= 1/2 or m_k <= 1/2,
  # i.e. for every score that can certify anything (Phi^-1(L) > 0 needs L > 1/2).
  h = scores[..., None, None]
  gap = jnp.where(deficits < 0.5, (h - 1.0) + deficits, h - means)  # [B, k, ..., 1, G]
  return ScoreStats(d, d * d, jnp.log1p(bet * gap))


def sum_statistics(stats: ScoreStats, axis: int = 1) -> ScoreStats:
  """Sums per-sample :class:`ScoreStats` over the sample axis."""
  return jax.tree.map(lambda v: jnp.sum(v, axis=axis), stats)


def mean_deficit(stats: ScoreStats, center: jax.Array, n: int) -> jax.Array:
  """``1 - mean``, computed from the centred sums."""
  return (1.0 - center) - stats.total / n


def sample_variance(stats: ScoreStats, n: int) -> jax.Array:
  return jnp.maximum(stats.total_sq - stats.total**2 / n, 0.0) / (n - 1)


def betting_bound(stats: ScoreStats, *, alpha: float) -> jax.Array:
  """Deficit ``1 - L`` of the betting lower confidence bound.

  For a candidate mean m and a bet lambda in [0, 1/m) fixed before the n scores are seen,
  the wealth ``K(m) = prod_i (1 + lambda (h_i - m))`` is a nonnegative supermartingale with
  ``E K <= 1`` whenever ``E h <= m``, so ``P(K(m) >= 1/alpha) <= alpha`` (Markov / Ville);
  an average of such wealths over a few bets is one too. Each grid cell
  ``(m_{k-1}, m_k]`` is tested at its right end with bets capped by ``1/m_k``: the wealth
  decreases in m, so rejecting ``m_k`` rejects every mean in the cell. The LCB is the
  right end of the longest run of rejected cells starting from 0; if the true mean were
  below it, its own cell would have been rejected, which has probability <= alpha. The
  wealth is a product over samples, i.e. a *sum* of logs, so it accumulates in running
  sums independent of sample order, chunking and device count.
  """
  deficits = betting_grid()
  num_bets = stats.log_capital.shape[-2]
  log_wealth = jax.nn.logsumexp(stats.log_capital, axis=-2) - math.log(num_bets)
  rejected = log_wealth >= math.log(1.0 / alpha)  # [..., G]
  leading = jnp.cumprod(rejected.astype(jnp.int32), axis=-1)  # 1 while every cell so far is rejected
  count = jnp.sum(leading, axis=-1)  # number of leading rejected cells
  # L = m_{count - 1} (the right end of the last rejected cell), or 0 if none.
  return jnp.where(count > 0, deficits[jnp.maximum(count - 1, 0)], 1.0)


def lower_confidence_bound(stats: ScoreStats, center: jax.Array, *, n: int, alpha: float,
                           bound: str) -> jax.Array:
  """Deficit ``1 - L`` of the lower confidence bound named ``bound`` (see module doc).

  Args:
    stats: :class:`ScoreStats` summed over the n samples.
    center: the centre the sums were taken about.
    n: number of samples (static; >= 2 for "bernstein", which needs a sample variance).
    alpha: the bound fails with probability at most alpha, in (0, 1) (checked for every
      bound, though "point" does not use it).
    bound: one of :data:`BOUNDS`; "point" is the sample mean, an estimate, not a bound.

  Returns:
    ``1 - L`` clipped to ``[MIN_DEFICIT, 1]``, float32.
  """
  checks.check_choice(bound, name="bound", choices=BOUNDS)
  checks.check_alpha(alpha)
  checks.check_positive_int(n, name="n", minimum=2 if bound == "bernstein" else 1,
                            meaning="the number of scores summed in stats")
  deficit = mean_deficit(stats, center, n)
  if bound == "hoeffding":
    deficit = deficit + math.sqrt(math.log(1.0 / alpha) / (2.0 * n))
  elif bound == "bernstein":
    log_term = math.log(2.0 / alpha)
    var = sample_variance(stats, n)
    deficit = deficit + jnp.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
  elif bound == "betting":
    if stats.log_capital is None:
      raise ValueError("bound='betting' needs statistics accumulated with bets "
                       "(score_statistics(..., bets=bet_sizes(...))).")
    deficit = betting_bound(stats, alpha=alpha)
  return jnp.clip(deficit, MIN_DEFICIT, 1.0)


def probit_of_deficit(deficit: jax.Array) -> jax.Array:
  """``Phi^-1(1 - deficit)`` of a bound's deficit, precise for tiny deficits.

  The deficit is clipped to ``[MIN_DEFICIT, 1]`` first: docs/method.md's "clip the LCB below
  1" (sound for any clip below 1), so ``Phi^-1`` is at most ``Phi^-1(1 - 1e-12) = 7.03``.
  """
  return -ndtri(jnp.clip(deficit, MIN_DEFICIT, 1.0))
