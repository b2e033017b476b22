"""Closed forms of the feature certificate against independent computations (scipy, the paper)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import certify


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
  """docs/method.md: Phi^-1(S) = 1.9 gives 0.838 at eps 0.125, sigma 0.25, and radius 0.31."""
  score = stats.norm.cdf(1.9)
  assert float(certify.fcsb_from_score(score, eps=0.125, sigma=0.25)) == pytest.approx(0.838, abs=1e-3)
  assert float(certify.radius_from_score(score, sigma=0.25)) == pytest.approx(0.31, abs=5e-3)


@pytest.mark.parametrize("eps, fcsb", [(0.125, 0.828), (0.25, 0.623), (0.375, 0.313),
                                       (0.5, -0.06)])
def test_paper_table1_row_through_fsjax(eps, fcsb):
  """The paper's CLIP-L14 row (sigma 0.25): each FCSB entry and the radius column 0.31 agree.

  scipy inverts the paper's FCSB at eps to the score S it implies; fsjax must map that S
  back to the paper's FCSB, and give the paper's radius 0.31 from it, up to the spread of
  the row (Phi^-1(S) = 1.87 .. 1.93, i.e. radii 0.298 .. 0.314: the paper averages over
  images and rounds).
  """
  sigma = 0.25
  score = stats.norm.cdf(stats.norm.ppf((1 + fcsb) / 2) + eps / sigma)
  assert float(certify.fcsb_from_score(score, eps=eps, sigma=sigma)) == pytest.approx(fcsb, abs=2e-5)
  assert float(certify.radius_from_score(score, sigma=sigma)) == pytest.approx(0.31, abs=0.015)


def test_closed_form_precision_near_one():
  # float32 cannot hold 1 - 1e-9, but the deficit path can: Phi^-1 stays finite and right.
  d = jnp.float32(1e-9)
  from certify import _closed_form
  r = float(_closed_form.radius_from_deficit(d, 0.5, 0.5))
  assert r == pytest.approx(0.5 * (-stats.norm.ppf(1e-9) - stats.norm.ppf(0.75)), rel=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(score=0.9, eps=0.1, sigma=0.0), "sigma"),
    (dict(score=0.9, eps=0.1, sigma=[0.25, 0.5]), "sigma must be one finite number"),
    (dict(score=0.9, eps=-0.1, sigma=0.25), "eps"),
    (dict(score=1.5, eps=0.1, sigma=0.25), r"score must lie in \[0.0, 1.0\]"),
    (dict(score=-0.1, eps=0.1, sigma=0.25), "score"),
    (dict(score=float("nan"), eps=0.1, sigma=0.25), "score contains NaN"),
    (dict(score=np.zeros(0), eps=0.1, sigma=0.25), "score is empty"),
])
def test_closed_form_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    certify.fcsb_from_score(**kwargs)


def test_radius_bad_cos():
  with pytest.raises(ValueError, match="cos"):
    certify.radius_from_score(0.9, sigma=0.25, cos=1.0)


def _estimate(deficit, **labels):
  d = np.asarray(deficit, np.float32)
  fields = dict(deficit=d, direction=np.eye(len(d), 4, dtype=np.float32),
                samples=np.full(len(d), 100), reference="mean", bound="bernstein", sigma=0.5,
                alpha=0.001)
  fields.update(labels)
  return certify.ScoreEstimate(**fields)


@pytest.mark.parametrize("deficit", [-1e-3, 1.5, float("nan")])
def test_certificates_refuse_a_deficit_out_of_range(deficit):
  """A negative deficit claims L > 1: it must not become the maximum radius (issue 13 d)."""
  with pytest.raises(ValueError, match="deficit"):
    certify.feature_certificate(_estimate([0.01, deficit]), eps=0.25)


@pytest.mark.parametrize("labels, match", [
    (dict(sigma=0.0), "estimate.sigma"), (dict(sigma=True), "estimate.sigma"),
    (dict(bound="chernoff"), "estimate.bound"), (dict(reference="x"), "estimate.reference"),
    (dict(alpha=1.0), "estimate.alpha"),
])
def test_certificates_refuse_a_mislabelled_estimate(labels, match):
  with pytest.raises(ValueError, match=match):
    certify.feature_certificate(_estimate([0.01, 0.02], **labels), eps=0.25)


def test_feature_certificate_of_an_estimate_against_scipy():
  """Theorem 3.2 and Corollary 3.3 from the estimate's own deficit and sigma (float64 scipy)."""
  deficit = np.array([1e-6, 1e-3, 0.05, 0.3], np.float32)
  eps, sigma, cos = np.array([0.0, 0.1, 0.5], np.float32), 0.25, 0.7
  for bound in ("bernstein", "point"):
    cert = certify.feature_certificate(_estimate(deficit, sigma=sigma, bound=bound), eps=eps,
                                       cos=cos)
    z = stats.norm.isf(deficit.astype(np.float64))
    want = 2 * stats.norm.cdf(z[:, None] - eps.astype(np.float64) / sigma) - 1
    np.testing.assert_allclose(cert.inner_product_bound, want, atol=2e-6)
    np.testing.assert_array_equal(cert.certified, want >= 0)
    np.testing.assert_allclose(cert.radius, sigma * (z - stats.norm.ppf((1 + cos) / 2)),
                               rtol=1e-5)
    assert cert.is_certificate == (bound != "point") and cert.bound == bound
    np.testing.assert_array_equal(cert.score, 1 - deficit)
