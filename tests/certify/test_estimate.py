"""certify._estimate: the bound on what the LLM receives, cos(z_n(x'), u), against scipy,
brute force and exact truth.

The exact-truth model is the half-space encoder f(x) = e1 if <w, x - x0> >= 0 else e2
(||w|| = 1): f_s(x) = p e1 + (1 - p) e2 with p = Phi(<w, x - x0> / sigma), and the
n-sample mean the LLM receives is z_n = (K / n, 1 - K / n) with K ~ Binomial(n, p), so the
per-query failure probability of a bound is an exact finite sum.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import stats

import certify
from certify import _estimate
from fsjax import encoders
from fsjax import smoothing

SIGMA, N, ALPHA = 0.5, 8, 1e-3


def test_concentration_radius_solves_pinelis_bennett_and_hoeffding():
  for n, v, a in ((8, 0.0027, 2.0), (8, 0.3, 1.9), (64, 0.02, 1.99), (1000, 1.0, 2.0)):
    got = float(_estimate.concentration_radius(n, v, alpha=ALPHA, bound=a))
    h = lambda s: (1 + s) * np.log1p(s) - s  # noqa: E731
    bennett = lambda t: 2 * np.exp(-n * v / a**2 * h(t * a / v)) - ALPHA  # noqa: E731
    want = min(optimize.brentq(bennett, 1e-12, 10 * a), a * np.sqrt(2 * np.log(2 / ALPHA) / n), a)
    assert got == pytest.approx(want, rel=1e-6)
    assert got >= want * (1 - 1e-9)  # never understated


def test_radius_grows_with_variance_and_shrinks_with_n():
  v = np.array([1e-6, 1e-3, 0.1, 1.0])
  r8 = _estimate.concentration_radius(8, v, alpha=ALPHA)
  r64 = _estimate.concentration_radius(64, v, alpha=ALPHA)
  assert np.all(np.diff(r8) > 0) and np.all(r64 < r8)


def test_geometry_against_brute_force():
  rng = np.random.default_rng(0)
  for b, u, t in ((0.9, 0.95, 0.1), (0.7, 1.0, 0.3), (0.99, 0.99, 0.05), (0.5, 0.8, 0.45)):
    # The feasible set in the (u, perpendicular) plane and a ball of radius t around it.
    p = rng.uniform(b, u, 200_000)
    q = rng.uniform(0, 1, p.size) * np.sqrt(np.maximum(u**2 - p**2, 0))
    ang = rng.uniform(0, 2 * np.pi, p.size)
    z = np.stack([p + t * np.cos(ang), q + t * np.sin(ang)], -1)
    corner = np.array([b, np.sqrt(u**2 - b**2)])  # the worst f, and the tangent point
    zz = corner + t * np.stack([np.cos(np.linspace(0, 2 * np.pi, 100_000)),
                                np.sin(np.linspace(0, 2 * np.pi, 100_000))], -1)
    worst = min(np.min(z[:, 0] / np.linalg.norm(z, axis=-1)),
                np.min(zz[:, 0] / np.linalg.norm(zz, axis=-1)))
    got = float(_estimate.cosine_of_perturbed(b, u, t))
    assert got <= worst + 1e-9 and got == pytest.approx(worst, abs=1e-6)
  assert float(_estimate.cosine_of_perturbed(0.3, 1.0, 0.3)) == -1.0  # t >= B: vacuous
  assert float(_estimate.cosine_of_perturbed(0.9, 0.95, 0.0)) == pytest.approx(0.9 / 0.95)


def test_samples_for_tolerance_is_the_smallest_n():
  b, u = np.array([0.99, 0.9, 0.6]), np.array([1.0, 0.95, 0.7])
  n = _estimate.samples_for_tolerance(b, u, tolerance=0.05, alpha=ALPHA)
  for bi, ui, ni in zip(b, u, n):
    assert _estimate.estimate_cosine_bound(bi, ui, n=int(ni), alpha=ALPHA) >= bi / ui - 0.05
    assert _estimate.estimate_cosine_bound(bi, ui, n=int(ni) - 1, alpha=ALPHA) < bi / ui - 0.05
  assert certify.samples_for_tolerance(0.0, tolerance=0.05, alpha=ALPHA, max_n=100) == 101


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="inner_bound"):
    certify.estimate_cosine_bound(1.5, n=8, alpha=ALPHA)
  with pytest.raises(ValueError, match="norm_upper"):
    certify.estimate_cosine_bound(0.5, 2.0, n=8, alpha=ALPHA)
  with pytest.raises(ValueError, match="n must be"):
    certify.estimate_cosine_bound(0.5, n=0, alpha=ALPHA)
  with pytest.raises(ValueError, match="alpha"):
    certify.estimate_cosine_bound(0.5, n=8, alpha=0.0)


# ----------------------------------------------------------------------------------------
# Exact truth: the half-space encoder.
# ----------------------------------------------------------------------------------------


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _setup(tau, eps):
  """u, the certificate's B(eps) and U(eps) from the exact scores at x (distance tau)."""
  p = stats.norm.cdf(tau / SIGMA)
  fs = np.array([p, 1 - p])
  norm = np.linalg.norm(fs)
  u = fs / norm
  h = (1 + norm) / 2  # h_u = (1 + ||f_s||) / 2 for the mean reference
  b = 2 * stats.norm.cdf(stats.norm.ppf(h) - eps / SIGMA) - 1  # Theorem 3.2
  big_u = min(2 * stats.norm.cdf(stats.norm.ppf(h) + eps / SIGMA) - 1, 1.0)  # method.md 2c
  return u, b, big_u


def _failure_probability(tau_prime, u, bound):
  """Exact P(cos(z_n(x'), u) < bound), K ~ Binomial(N, Phi(tau' / sigma))."""
  k = np.arange(N + 1)
  z = np.stack([k / N, 1 - k / N], -1)
  cos = _unit(z) @ u
  pmf = stats.binom.pmf(k, N, stats.norm.cdf(tau_prime / SIGMA))
  return float(np.sum(pmf[cos < bound]))


@pytest.mark.parametrize("tau", [1.0, 1.25, 1.5])
def test_exact_failure_probability_is_at_most_alpha(tau):
  worst_naive = 0.0
  for eps in (0.0, 0.05, 0.1, 0.2):
    u, b, big_u = _setup(tau, eps)
    for norm_upper in (1.0, big_u):  # plain and norm-aware certificate
      bound = float(certify.estimate_cosine_bound(b, norm_upper, n=N, alpha=ALPHA))
      for tp in np.linspace(tau - eps, tau + eps, 21):  # the whole ball (f_s depends on <w, x>)
        assert _failure_probability(tp, u, bound) <= ALPHA, (tau, eps, tp, bound)
        # The certified cosine of f_s itself, read as a bound on what the LLM receives:
        worst_naive = max(worst_naive, _failure_probability(tp, u, b / norm_upper))
  assert worst_naive > 5 * ALPHA  # the audit's finding: the plug-in claim fails


@dataclasses.dataclass(frozen=True, eq=False)
class HalfSpaceEncoder(encoders.Encoder):
  """f(x) = e1 if <w, x - x0> >= 0 else e2 (||w|| = 1), as tests/certify/test_run.py."""

  def tokens(self, params, x, *, sigma=None):
    t = jnp.sum((x - params["x0"]) * params["w"], axis=(1, 2, 3))
    return jnp.where(t[:, None] >= 0, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))[:, None, :]


def test_failure_rate_through_the_smoothed_encoder_passes_a_binomial_test():
  """What SmoothedEncoder hands an LLM, 20,000 fresh-key queries at x' on the ball's edge."""
  side, tau, eps, queries = 2, 1.75, 0.1, 20_000
  rng = np.random.default_rng(0)
  w = _unit(rng.normal(size=side * side * 3)).reshape(side, side, 3)
  x0 = np.full((side, side, 3), 0.5)
  x_adv = (x0 + (tau - eps) * w)[None].astype(np.float32)  # the worst point of the ball
  params = {"w": jnp.asarray(w, jnp.float32), "x0": jnp.asarray(x0, jnp.float32)}
  enc = smoothing.SmoothedEncoder(HalfSpaceEncoder(resolution=side), sigma=SIGMA, n=N)
  # One call on a batch of copies: each copy draws its own noise (one draw per batch).
  batch = np.repeat(x_adv, queries, axis=0)
  z = enc.jitted_tokens(enc.with_key({"encoder": params}, jax.random.PRNGKey(0)), batch)
  z = np.asarray(z).reshape(queries, 2)
  tau_adv = float(np.sum((x_adv[0] - x0) * w))
  u, b, big_u = _setup(tau, eps)
  cos = _unit(z.astype(np.float64)) @ u
  bound = float(certify.estimate_cosine_bound(b, big_u, n=N, alpha=ALPHA))
  assert bound > 0.5  # not vacuous here
  fails = int(np.sum(cos < bound))
  assert stats.binomtest(fails, queries, ALPHA, alternative="greater").pvalue > 0.01
  naive = int(np.sum(cos < b / big_u))  # the plug-in claim fails the same test
  assert stats.binomtest(naive, queries, ALPHA, alternative="greater").pvalue < 1e-6
  # The Monte Carlo matches the exact sum (the encoder is the closed form's).
  exact = _failure_probability(tau_adv, u, b / big_u)
  assert naive / queries == pytest.approx(exact, abs=5 * np.sqrt(exact / queries) + 1e-4)


def test_llm_input_bounds_from_a_certificate():
  deficit, norm_upper = np.array([1e-4, 0.01, 0.3]), np.array([0.9999, 0.99, 0.5])
  eps = np.array([0.05, 0.1, 0.0])
  cos_fs, cos_zn = certify.llm_input_bounds(deficit, norm_upper, eps, SIGMA, n=N, alpha=ALPHA)
  z = stats.norm.isf(deficit)
  b = 2 * stats.norm.cdf(z - eps / SIGMA) - 1
  u = np.maximum(2 * stats.norm.cdf(stats.norm.ppf((1 + norm_upper) / 2) + eps / SIGMA) - 1, b)
  np.testing.assert_allclose(cos_fs, np.minimum(b / u, 1), atol=1e-5)
  want = [float(_estimate.estimate_cosine_bound(bi, ui, n=N, alpha=ALPHA)) for bi, ui in zip(b, u)]
  np.testing.assert_allclose(cos_zn, want, atol=1e-4)
  assert np.all(cos_zn <= cos_fs)
