"""certify._bounds: lower confidence bounds against their formulas and a float64 oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from certify import _bounds


@jax.jit
def _summed_statistics(samples, center, bets):
  """The per-sample statistics summed over samples, in one jitted computation as in the
  engine (eagerly, [R, n, NUM_BETS, BETTING_GRID] would be materialised: 2.4 GB and 10x
  the time for 1500 x 100 scores)."""
  return _bounds.sum_statistics(_bounds.score_statistics(samples, center, bets))


def _lcbs(samples, alpha, bounds=_bounds.BOUNDS, pilot=None):
  """LCBs from ``samples [R, n]`` through the summed statistics, as the engine computes them."""
  samples = jnp.asarray(samples, jnp.float32)
  pilot = samples[:, :50] if pilot is None else jnp.asarray(pilot, jnp.float32)
  center = jnp.mean(pilot, axis=1)
  bets = _bounds.bet_sizes(jnp.var(pilot, axis=1, ddof=1), n=samples.shape[1], alpha=alpha)
  summed = _summed_statistics(samples, center, bets)
  return {b: 1.0 - np.asarray(_bounds.lower_confidence_bound(
      summed, center, n=samples.shape[1], alpha=alpha, bound=b)) for b in bounds}


def _hoeffding(x, alpha):
  return x.mean(1) - math.sqrt(math.log(1 / alpha) / (2 * x.shape[1]))


def test_hoeffding_and_bernstein_match_formulas():
  rng = np.random.default_rng(0)
  x = rng.beta(20, 2, size=(4, 500))
  alpha = 0.01
  got = _lcbs(x, alpha)
  n = x.shape[1]
  mean, var = x.mean(1), x.var(1, ddof=1)
  np.testing.assert_allclose(got["point"], mean, atol=1e-5)
  np.testing.assert_allclose(got["hoeffding"], _hoeffding(x, alpha), atol=1e-5)
  lt = math.log(2 / alpha)
  np.testing.assert_allclose(got["bernstein"],
                             mean - np.sqrt(2 * var * lt / n) - 7 * lt / (3 * (n - 1)), atol=1e-5)


@pytest.mark.parametrize("a, b", [(30.0, 1.0), (2.0, 2.0), (200.0, 2.0)])
def test_bounds_coverage(a, b):
  """Each LCB exceeds the true mean in at most ~alpha of many repetitions."""
  rng = np.random.default_rng(1)
  reps, n, alpha = 1500, 100, 0.05
  mu = a / (a + b)
  x = rng.beta(a, b, size=(reps, n))
  pilot = rng.beta(a, b, size=(reps, 30))  # independent first stage, as in certification
  got = _lcbs(x, alpha, bounds=_bounds.CERTIFYING_BOUNDS, pilot=pilot)
  slack = 3 * math.sqrt(alpha * (1 - alpha) / reps)
  for name, lcb in got.items():
    rate = float(np.mean(lcb > mu))
    assert rate <= alpha + slack, (name, rate)


def test_tightness_ordering_on_low_variance_scores():
  rng = np.random.default_rng(2)
  x = 1 - rng.beta(1, 300, size=(8, 5000))  # scores near 1, variance ~1e-5
  got = _lcbs(x, 0.001)
  assert np.all(got["point"] >= got["bernstein"])
  assert np.all(got["bernstein"] > got["hoeffding"] + 0.01)
  assert np.all(got["betting"] > got["hoeffding"] + 0.01)
  # Both variance-adaptive bounds are within a few times the standard error of the mean.
  assert np.all(got["point"] - got["betting"] < 0.005)


def test_betting_is_monotone_in_alpha_and_sound_on_constant_data():
  x = np.full((1, 1000), 0.9)
  tight = _lcbs(x, 0.1)["betting"]
  loose = _lcbs(x, 1e-6)["betting"]
  assert loose <= tight <= 0.9 + 1e-6


# --------------------------------------------------------------- zero first-stage variance


@pytest.mark.parametrize("alpha", [0.05, 0.001])
def test_zero_first_stage_variance_is_not_looser_than_hoeffding(alpha):
  """Issue 13 (c): Bernoulli(0.99) scores, n = 1e4, all n0 = 100 first-stage scores equal.

  lambda* hits its cap and every 0 among the n scores ruins those bets; before the fix the
  betting bound was 0.016 below the mean against Hoeffding's 0.012 (alpha = 0.05).
  """
  rng = np.random.default_rng(3)
  x = (rng.uniform(size=(6, 10_000)) < 0.99).astype(np.float64)
  pilot = np.ones((6, 100))  # variance 0
  got = _lcbs(x, alpha, bounds=("betting",), pilot=pilot)["betting"]
  assert np.all(got >= _hoeffding(x, alpha)), (got, _hoeffding(x, alpha))


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("alpha", [0.05, 0.001])
def test_betting_never_much_looser_than_hoeffding(p, alpha):
  """Whatever the first stage says: betting >= Hoeffding - tolerance, for any Bernoulli.

  The tolerance is what the betting bound pays for being a mixture of 4 bets (one of them
  Hoeffding's, so the wealth must reach 4 / alpha) plus one cell of its grid
  (<= 0.0047 in the mean, at 1/2).
  """
  rng = np.random.default_rng(4)
  n = 10_000
  x = (rng.uniform(size=(4, n)) < p).astype(np.float64)
  tolerance = math.sqrt(math.log(4 / alpha) / (2 * n)) - math.sqrt(math.log(1 / alpha) / (2 * n))
  tolerance += 0.0047
  for pilot in (np.ones((4, 100)), (rng.uniform(size=(4, 100)) < p).astype(np.float64)):
    got = _lcbs(x, alpha, bounds=("betting",), pilot=pilot)["betting"]
    assert np.all(got >= _hoeffding(x, alpha) - tolerance), (got, _hoeffding(x, alpha))


# ------------------------------------------------------------------- exact grid (issue 13 b)


def _oracle_log_capital(h, bets):
  """float64 ``log(1 + min(bet, 0.9 / m_k) (h - m_k))`` with ``m_k = 1 - d_k`` exactly.

  ``d_k`` is the grid's deficit, the value the bound reports; ``h [B, k]``, ``bets [B, S]``.
  """
  d = np.asarray(_bounds.betting_grid(), np.float64)
  m = 1.0 - d
  with np.errstate(divide="ignore"):  # m_0 = 0: no cap
    bet = np.minimum(np.asarray(bets, np.float64)[:, None, :, None], _bounds.BETTING_CAP / m)
  return np.log1p(bet * (np.asarray(h, np.float64)[:, :, None, None] - m))  # [B, k, S, G]


def test_each_cell_tests_exactly_the_mean_it_reports():
  """The wealth of cell k is about m_k = 1 - d_k, d_k the reported deficit, to float32 precision.

  Scores sit on (the float32 rounding of) grid means, so h - m_k is ~1e-8 at some cells:
  testing a separately rounded float32 m_k, as before the fix, is off there by up to 3e-8,
  i.e. by up to 100%.
  """
  d = np.asarray(_bounds.betting_grid(), np.float64)
  cells = np.flatnonzero((d > 1e-8) & (d < 0.5))[::25]  # scores >= 1/2: where certificates live
  center = (1.0 - d[cells]).astype(np.float32)  # [B]
  h = np.clip(center[:, None] + np.array([0.0, 1e-3, -1e-3, 1e-6], np.float32), 0.5, 1)
  h = h.astype(np.float32)
  bets = np.tile(np.array([0.3, 3.0, 30.0, 0.05], np.float32), (len(cells), 1))
  assert bets.shape[1] == _bounds.NUM_BETS
  got = _bounds.score_statistics(jnp.asarray(h), jnp.asarray(center), jnp.asarray(bets))
  want = _oracle_log_capital(h, bets)
  np.testing.assert_allclose(np.asarray(got.log_capital, np.float64), want, rtol=2e-6,
                             atol=1e-12)


def _oracle_betting_deficit(h, bets, alpha):
  """float64 betting bound: the deficit reported and the log-wealths that decided it."""
  log_capital = np.stack([_oracle_log_capital(h[i:i + 1], bets[i:i + 1]).sum(axis=1)[0]
                          for i in range(len(h))])  # [B, S, G], row by row (13 MB, not 1 GB)
  log_wealth = special.logsumexp(log_capital, axis=1) - math.log(log_capital.shape[1])
  rejected = log_wealth >= math.log(1 / alpha)
  count = np.cumprod(rejected, axis=1).sum(axis=1)
  d = np.asarray(_bounds.betting_grid(), np.float64)
  return np.where(count > 0, d[np.maximum(count - 1, 0)], 1.0), log_wealth, count


def test_betting_bound_equals_float64_oracle():
  rng = np.random.default_rng(5)
  alpha, n = 0.01, 400
  x = np.concatenate([1 - rng.beta(1, 200, size=(40, n)), rng.beta(5, 1, size=(40, n))])
  x = x.astype(np.float32)
  pilot = x[:, :40] + 0.0  # any bets are valid; the oracle gets the same ones
  center = pilot.mean(1).astype(np.float32)
  bets = np.asarray(_bounds.bet_sizes(pilot.var(1, ddof=1), n=n, alpha=alpha))
  summed = _summed_statistics(jnp.asarray(x), jnp.asarray(center), jnp.asarray(bets))
  got = np.asarray(_bounds.lower_confidence_bound(summed, jnp.asarray(center), n=n, alpha=alpha,
                                                  bound="betting"))
  want, log_wealth, count = _oracle_betting_deficit(x, bets, alpha)
  # A float32 sum of n logs may land on the other side of log(1/alpha) only when the
  # wealth is within rounding of the threshold at the deciding cells.
  rows = np.arange(len(x))
  margin = np.minimum(
      np.abs(log_wealth[rows, np.maximum(count - 1, 0)] - math.log(1 / alpha)),
      np.abs(log_wealth[rows, np.minimum(count, log_wealth.shape[1] - 1)] - math.log(1 / alpha)))
  decisive = margin > 1e-3
  assert decisive.sum() >= 0.9 * len(x)
  np.testing.assert_array_equal(got[decisive].astype(np.float64), want[decisive])
  assert np.all(want < 0.5)  # the data are far from trivial: every bound certified something


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.0), r"alpha must be one number in \(0, 1\)"),
    (dict(alpha=0.0), r"alpha must be one number in \(0, 1\)"),
    (dict(alpha=1.0, bound="point"), r"alpha must be one number in \(0, 1\)"),
    (dict(n=0), r"n must be an integer >= 1"),
    (dict(n=1, bound="bernstein"), r"n must be an integer >= 2"),
    (dict(n=2.5), r"n must be an integer >= 1"),
    (dict(bound="chernoff"), r"bound must be one of \('point', 'hoeffding'"),
])
def test_lower_confidence_bound_bad_input(kwargs, match):
  """Issue 13 (d): alpha = 1 returned the sample mean as "hoeffding", n = 0 returned NaN."""
  stats = _bounds.ScoreStats(jnp.zeros(2), jnp.zeros(2), None)
  args = dict(n=10, alpha=0.01, bound="hoeffding")
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    _bounds.lower_confidence_bound(stats, jnp.full(2, 0.9), **args)


def test_betting_needs_bets():
  stats = _bounds.ScoreStats(jnp.zeros(2), jnp.zeros(2), None)
  with pytest.raises(ValueError, match="bet_sizes"):
    _bounds.lower_confidence_bound(stats, jnp.full(2, 0.9), n=10, alpha=0.01, bound="betting")
