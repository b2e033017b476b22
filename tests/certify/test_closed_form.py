"""Closed forms and confidence bounds against independent computations (scipy, numpy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import certify
from certify import _bounds


def _fcsb_scipy(score, eps, sigma):
  return 2 * stats.norm.cdf(stats.norm.ppf(score) - eps / sigma) - 1


@pytest.mark.parametrize("score", [0.6, 0.9, 0.97, 0.999, 0.99999])
@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_fcsb_and_radius_match_scipy(score, sigma):
  score = float(np.float32(score))  # compare on the float32 value the function receives
  eps = np.array([0.0, 0.125, 0.25, 0.5, 0.75])
  np.testing.assert_allclose(certify.fcsb_from_score(score, eps=eps, sigma=sigma),
                             _fcsb_scipy(score, eps, sigma), atol=2e-5)
  for cos in (0.0, 0.5, 0.9):
    expected = sigma * (stats.norm.ppf(score) - stats.norm.ppf((1 + cos) / 2))
    np.testing.assert_allclose(certify.radius_from_score(score, sigma=sigma, cos=cos),
                               expected, rtol=1e-4, atol=1e-5)


def test_radius_is_where_bound_reaches_level():
  score, sigma, cos = 0.97, 0.25, 0.5
  r = float(certify.radius_from_score(score, sigma=sigma, cos=cos))
  assert abs(float(certify.fcsb_from_score(score, eps=r, sigma=sigma)) - cos) < 1e-5


def test_paper_table1_rows_are_consistent():
  """method.md: Phi^-1(S) = 1.9 gives 0.838 at eps 0.125, sigma 0.25, and radius 0.31."""
  score = stats.norm.cdf(1.9)
  assert float(certify.fcsb_from_score(score, eps=0.125, sigma=0.25)) == pytest.approx(0.838, abs=1e-3)
  assert float(certify.radius_from_score(score, sigma=0.25)) == pytest.approx(0.31, abs=5e-3)
  # The CLIP-L14 row 0.828 / 0.623 / 0.313 / -0.06 implies Phi^-1(S) of 1.87 .. 1.93.
  for eps, b in [(0.125, 0.828), (0.25, 0.623), (0.375, 0.313), (0.5, -0.06)]:
    z = stats.norm.ppf((1 + b) / 2) + eps / 0.25
    assert 1.86 < z < 1.94


def test_closed_form_precision_near_one():
  # float32 cannot hold 1 - 1e-9, but the deficit path can: Phi^-1 stays finite and right.
  d = jnp.float32(1e-9)
  from certify import _closed_form
  r = float(_closed_form.radius_from_deficit(d, 0.5, 0.5))
  assert r == pytest.approx(0.5 * (-stats.norm.ppf(1e-9) - stats.norm.ppf(0.75)), rel=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(score=0.9, eps=0.1, sigma=0.0), "sigma"),
    (dict(score=0.9, eps=-0.1, sigma=0.25), "eps"),
    (dict(score=1.5, eps=0.1, sigma=0.25), "score"),
    (dict(score=float("nan"), eps=0.1, sigma=0.25), "score"),
])
def test_closed_form_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    certify.fcsb_from_score(**kwargs)


def test_radius_bad_cos():
  with pytest.raises(ValueError, match="cos"):
    certify.radius_from_score(0.9, sigma=0.25, cos=1.0)


# --- confidence bounds -------------------------------------------------------------------


def _lcbs(samples, alpha, bounds=_bounds.BOUNDS, pilot=None):
  """LCBs from ``samples [R, n]`` through the summed statistics, as the engine computes them."""
  samples = jnp.asarray(samples, jnp.float32)
  pilot = samples[:, :50] if pilot is None else jnp.asarray(pilot, jnp.float32)
  center = jnp.mean(pilot, axis=1)
  lam = _bounds.betting_lambda(jnp.var(pilot, axis=1, ddof=1), n=samples.shape[1], alpha=alpha)
  per_sample = _bounds.score_statistics(samples, center, lam)
  summed = _bounds.sum_statistics(per_sample)
  return {b: 1.0 - np.asarray(_bounds.lower_confidence_bound(
      summed, center, n=samples.shape[1], alpha=alpha, bound=b)) for b in bounds}


def test_hoeffding_and_bernstein_match_formulas():
  rng = np.random.default_rng(0)
  x = rng.beta(20, 2, size=(4, 500))
  alpha = 0.01
  got = _lcbs(x, alpha)
  n = x.shape[1]
  mean, var = x.mean(1), x.var(1, ddof=1)
  np.testing.assert_allclose(got["point"], mean, atol=1e-5)
  np.testing.assert_allclose(got["hoeffding"], mean - math.sqrt(math.log(1 / alpha) / (2 * n)), atol=1e-5)
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
