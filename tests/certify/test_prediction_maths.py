"""Tests of certify/_prediction.py against independent float64 numpy/scipy/statsmodels."""

import jax
import numpy as np
import pytest
from scipy import optimize, stats
from statsmodels.stats.proportion import proportion_confint

from certify import _prediction as pred


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cap_samples(rng, z, gamma, m):
  """``m`` unit vectors z' with cos(z, z') >= gamma, including the cap's rim."""
  phi = np.arccos(gamma)
  v = rng.normal(size=(m, z.size))
  v = _unit(v - (v @ z)[:, None] * z)  # unit, orthogonal to z
  a = phi * np.concatenate([np.ones(m // 4), rng.uniform(size=m - m // 4)])
  return np.cos(a)[:, None] * z + np.sin(a)[:, None] * v


# ---------------------------------------------------------------- per-class certificate (3b)


def test_per_class_radius_matches_scipy_and_the_worst_case():
  """R_pc = sigma / 2 (Phi^-1(L_c) - max_{k != c} Phi^-1(U_k)), the deficits of k != c
  being the upper bounds U_k themselves; and at eps just below R_pc the worst case of
  Salman's lemma (every g_c pushed down, every g_k up, by eps / sigma in probit space)
  still ranks c first, just above it not."""
  rng = np.random.default_rng(0)
  b, k, sigma = 64, 5, 0.5
  deficits = rng.uniform(0.01, 0.99, size=(b, k))
  cls = rng.integers(0, k, size=b)
  deficits[np.arange(b), cls] = rng.uniform(1e-6, 0.3, size=b)
  got = np.asarray(pred.per_class_radius(deficits, cls, sigma=sigma), np.float64)
  lower = stats.norm.ppf(1 - deficits[np.arange(b), cls])
  others = np.where(np.arange(k)[None] == cls[:, None], -np.inf, stats.norm.ppf(deficits))
  want = sigma / 2 * (lower - others.max(1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.any(want > 0) and np.any(want < 0)
  for i in np.flatnonzero(want > 0.01):
    for eps, keeps in ((want[i] * 0.999, True), (want[i] * 1.001, False)):
      g_c = stats.norm.cdf(lower[i] - eps / sigma)
      g_k = stats.norm.cdf(others[i] + eps / sigma)
      assert (g_c > g_k.max()) == keeps
  # Clipping: a deficit 0 (L_c = 1, U_k = 0) is read as 1e-12, which only loosens.
  edge = np.asarray(pred.per_class_radius(np.array([[0.0, 0.0]]), np.array([0]), sigma=1.0))
  np.testing.assert_allclose(edge, [stats.norm.isf(1e-12)], rtol=1e-5)
  assert np.asarray(pred.per_class_radius(np.array([[1.0, 0.1]]), np.array([0]),
                                          sigma=1.0))[0] == -np.inf


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_deficits=np.full((2,), 0.1), predicted_class=np.zeros(2, int)),
     r"class_deficits must have shape \[B, K\]"),
    (dict(class_deficits=np.full((2, 3), 1.5), predicted_class=np.zeros(2, int)),
     "class_deficits"),
    (dict(class_deficits=np.full((2, 3), 0.1), predicted_class=np.array([0, 3])),
     r"predicted_class must be class indices in \[0, 3\)"),
    (dict(class_deficits=np.full((2, 3), 0.1), predicted_class=np.zeros(3, int)),
     "predicted_class has batch size 3"),
])
def test_per_class_radius_refuses_bad_inputs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pred.per_class_radius(sigma=0.25, **kwargs)


# ---------------------------------------------------------------------------- Lemma A.3.1


@pytest.mark.parametrize("dim", [2, 3, 16, 128])
def test_logit_bounds_hold_on_the_sphere(dim):
  rng = np.random.default_rng(dim)
  b, k = 6, 5
  z = _unit(rng.normal(size=(b, dim)))
  w = _unit(rng.normal(size=(k, dim)))
  gamma = np.concatenate([[0.0, 0.999], rng.uniform(-0.5, 1.0, size=b - 2)])
  lower, upper = map(np.asarray, pred.prototype_logit_bounds(z, w, gamma))
  for i in range(b):
    logits = _cap_samples(rng, z[i], gamma[i], 4000) @ w.T  # [m, K], float64
    assert np.all(logits >= lower[i] - 1e-5)
    assert np.all(logits <= upper[i] + 1e-5)


def test_logit_bounds_attained_in_the_plane():
  rng = np.random.default_rng(0)
  dim = 7
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # random embedding of the plane
  e1, e2 = q[:, 0], q[:, 1]
  for theta in [0.1, 0.7, 1.5, 2.5, 3.0]:
    for phi in [0.05, 0.4, 1.2]:
      z = e1
      w = np.stack([np.cos(theta) * e1 + np.sin(theta) * e2, -e1])  # K = 2
      lower, upper = map(np.asarray, pred.prototype_logit_bounds(
          z[None], w, np.array([np.cos(phi)])))
      # z rotated by phi towards w_0 (or onto it if phi >= theta), and away from it
      # (or onto -w_0 if the cap reaches it).
      toward = w[0] if phi >= theta else np.cos(phi) * e1 + np.sin(phi) * e2
      away = -w[0] if theta + phi >= np.pi else np.cos(phi) * e1 - np.sin(phi) * e2
      assert z @ toward >= np.cos(phi) - 1e-12 and z @ away >= np.cos(phi) - 1e-12  # in the cap
      np.testing.assert_allclose(upper[0, 0], toward @ w[0], atol=2e-6)
      np.testing.assert_allclose(lower[0, 0], away @ w[0], atol=2e-6)


# ------------------------------------------------------------------------ margin & radius


def test_angle_margin_matches_numpy():
  rng = np.random.default_rng(1)
  z = _unit(rng.normal(size=(50, 32)))
  w = _unit(rng.normal(size=(10, 32)))
  cls, delta = pred.angle_margin(z, w)
  cos = z @ w.T
  np.testing.assert_array_equal(cls, np.argmax(cos, axis=1))
  theta = np.sort(np.arccos(cos), axis=1)
  np.testing.assert_allclose(delta, theta[:, 1] - theta[:, 0], atol=1e-5)
  # A tie has no margin.
  _, d0 = pred.angle_margin(_unit(w[0] + w[1])[None], w)
  assert float(d0[0]) < 1e-3


def _certified_by_lemma(eps, h, sigma, z, w):
  """Theorem A.3.2 checked directly in float64: FCSB bound -> Lemma bounds -> Eq. A.44."""
  b = 2 * stats.norm.cdf(stats.norm.ppf(h) - eps / sigma) - 1
  if b <= 0:  # the cosine is not certified (docs/method.md section 2)
    return False
  phi = np.arccos(b)
  theta = np.arccos(np.clip(w @ z, -1, 1))
  c = np.argmin(theta)
  lower_c = np.cos(min(theta[c] + phi, np.pi))
  upper = np.cos(np.maximum(np.delete(theta, c) - phi, 0.0))
  return lower_c > upper.max()


def test_closed_form_radius_equals_bisection():
  rng = np.random.default_rng(2)
  sigma = 0.5
  n_checked = 0
  for trial in range(40):
    dim = 3 if trial % 2 else 24
    w = _unit(rng.normal(size=(4, dim)))
    # z near one prototype, so that margins range from tiny to large.
    z = _unit(w[trial % 4] + rng.uniform(0.05, 1.5) * _unit(rng.normal(size=dim)))
    # float32 first: the test is of the maths, not of rounding h to float32 (documented).
    h = float(np.float32(1 - 10**rng.uniform(-6, -0.5)))
    _, delta = pred.angle_margin(z[None], w)
    radius = float(pred.prediction_radius(delta, np.array([h]), sigma=sigma)[0])
    f = lambda e: 0.5 if _certified_by_lemma(e, h, sigma, z, w) else -0.5
    if f(0.0) < 0:
      assert radius <= 1e-5
      continue
    root = optimize.bisect(f, 0.0, 10 * sigma, xtol=1e-10)
    np.testing.assert_allclose(radius, root, atol=1e-5)
    n_checked += 1
  assert n_checked >= 20


def test_required_margin_inverts_the_radius_and_matches_scipy():
  sigma = 0.5
  h = np.array([0.6, 0.9, 0.99, 0.999999], np.float32)
  for radius in (0.0, 0.1, 0.25, 0.8):
    need = np.asarray(pred.required_margin(h, sigma=sigma, radius=radius), np.float64)
    # Independent float64: gamma(r) = 2 Phi(Phi^-1(h) - r / sigma) - 1, Delta = 2 arccos(gamma).
    gamma = 2 * stats.norm.cdf(stats.norm.ppf(h.astype(np.float64)) - radius / sigma) - 1
    np.testing.assert_allclose(need, 2 * np.arccos(gamma), rtol=2e-5, atol=1e-6)
    reachable = need < np.pi
    # At the required margin the radius is exactly r; a bit more margin certifies more.
    at = np.asarray(pred.prediction_radius(need[reachable].astype(np.float32),
                                           h[reachable], sigma=sigma))
    np.testing.assert_allclose(at, radius, atol=2e-4)
    more = np.asarray(pred.prediction_radius(
        np.minimum(need[reachable] + 0.01, np.pi).astype(np.float32), h[reachable], sigma=sigma))
    assert np.all(more > radius)
  # The deficit form keeps the digits that h = 1 - 1e-9 loses in float32.
  tiny = np.asarray(pred.required_margin(deficit=np.array([1e-9], np.float32), sigma=sigma))
  np.testing.assert_allclose(tiny, 4 * np.arcsin(np.sqrt(1e-9)), rtol=1e-4)
  with pytest.raises(ValueError, match="radius"):
    pred.required_margin(h, sigma=sigma, radius=-0.1)
  with pytest.raises(ValueError, match="exactly one"):
    pred.required_margin(sigma=sigma)


def test_radius_precision_and_float_edges():
  sigma = 0.25
  delta = np.array([np.pi, np.pi, 1e-3, 0.0, 1.0, 1.0], np.float32)
  h = np.array([1.0, 1 - 1e-6, 0.999, 0.999, 0.0, 0.5], np.float32)
  r = np.asarray(pred.prediction_radius(delta, h, sigma=sigma))
  c = stats.norm.ppf((1 + np.cos(delta.astype(np.float64) / 2)) / 2)
  # h = 1 is clipped to 1 - 1e-12 (through the deficit, although not a float32 number).
  np.testing.assert_allclose(r[0], sigma * (stats.norm.ppf(1 - 1e-12) - c[0]), rtol=1e-5)
  np.testing.assert_allclose(r[1], sigma * (stats.norm.ppf(np.float64(h[1])) - c[1]), rtol=1e-5)
  # A small margin keeps its digits: (1 + cos(Delta/2))/2 rounds to 1 in float32.
  want = sigma * (stats.norm.ppf(0.999) + stats.norm.ppf(np.sin(1e-3 / 4)**2))
  np.testing.assert_allclose(r[2], want, rtol=1e-4)
  assert r[3] == -np.inf and r[4] == -np.inf and r[5] < 0
  assert not np.any(np.isnan(r))


def test_radius_from_deficit_keeps_precision_near_one():
  deficit = np.array([1e-9, 3e-7, 0.01, 0.4], np.float32)
  delta = np.full(4, 2.0, np.float32)
  r = pred.prediction_radius(delta, sigma=0.5, deficit=deficit)
  want = 0.5 * (stats.norm.isf(deficit.astype(np.float64)) - stats.norm.ppf((1 + np.cos(1.0)) / 2))
  np.testing.assert_allclose(r, want, rtol=1e-5)
  np.testing.assert_allclose(r[2:], pred.prediction_radius(delta[2:], 1 - deficit[2:], sigma=0.5),
                             rtol=1e-5)
  for kwargs in ({}, {"h_lcb": 1 - deficit, "deficit": deficit}):
    with pytest.raises(ValueError, match="exactly one"):
      pred.prediction_radius(delta, sigma=0.5, **kwargs)


def test_fs_certified_prediction_and_abstain():
  delta = np.array([1.0, 0.0, 1.0, 1.0])
  h = np.array([0.99, 0.99, 0.5, 0.6])
  cls, radius = pred.certified_prediction(delta, np.array([3, 1, 2, 0]), h, sigma=0.5)
  c = stats.norm.ppf((1 + np.cos(0.5)) / 2)
  assert stats.norm.ppf(0.6) < c  # so the last one is not certified at eps = 0
  np.testing.assert_array_equal(cls, [3, -1, -1, -1])
  np.testing.assert_allclose(radius, [0.5 * (stats.norm.ppf(0.99) - c), 0, 0, 0], rtol=1e-5)


def test_fs_functions_trace_under_jit():
  rng = np.random.default_rng(3)
  z = _unit(rng.normal(size=(4, 8))).astype(np.float32)
  w = _unit(rng.normal(size=(3, 8))).astype(np.float32)
  h = np.full(4, 0.95, np.float32)

  @jax.jit
  def f(z, w, h):
    c, d = pred.angle_margin(z, w)
    return pred.certified_prediction(d, c, h, sigma=0.25)

  c1, r1 = f(z, w, h)
  c, d = pred.angle_margin(z, w)
  c2, r2 = pred.certified_prediction(d, c, h, sigma=0.25)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_allclose(r1, r2, rtol=1e-6)


# --------------------------------------------------------------------------------- RS


def test_clopper_pearson_matches_statsmodels():
  alphas = [0.001, 0.01, 0.05]
  for n in [1, 7, 100, 1000, 100_000]:
    ks = np.unique(np.linspace(0, n, 12).round().astype(int))
    for alpha in alphas:
      got = pred.clopper_pearson_lower(ks, n, alpha)
      want = np.array([proportion_confint(k, n, alpha=2 * alpha, method="beta")[0] for k in ks])
      np.testing.assert_allclose(got, np.nan_to_num(want), rtol=1e-10, atol=1e-15)
  # k = n has the closed form alpha^(1/n); k = 0 gives 0.
  np.testing.assert_allclose(pred.clopper_pearson_lower(50, 50, 0.01), 0.01**(1 / 50), rtol=1e-12)
  assert pred.clopper_pearson_lower(0, 50, 0.01) == 0.0


def test_rs_certify_radius_and_cohen_reference():
  sigma, alpha, n = 0.5, 0.001, 100_000
  counts0 = np.array([[0, 100, 0], [90, 10, 0], [100, 0, 0], [0, 0, 100]])
  counts = np.array([[0, n, 0], [80_000, 20_000, 0], [49_000, 51_000, 0], [0, 90_000, 10_000]])
  cls, radius = pred.rs_certify_from_counts(counts0, counts, sigma=sigma, alpha=alpha)
  np.testing.assert_array_equal(cls, [1, 0, -1, -1])  # abstain: pA < 1/2; selected class lost
  p_a = [proportion_confint(k, n, alpha=2 * alpha, method="beta")[0] for k in (n, 80_000)]
  np.testing.assert_allclose(radius[:2], sigma * stats.norm.ppf(p_a), rtol=1e-10)
  np.testing.assert_array_equal(radius[2:], 0.0)
  # Cohen et al.: with N = 100,000 and alpha = 0.001 the largest certifiable radius is
  # sigma * Phi^-1(alpha^(1/N)) ~ 3.8 sigma.
  np.testing.assert_allclose(radius[0] / sigma, stats.norm.ppf(alpha**(1 / n)), rtol=1e-10)
  assert 3.7 < radius[0] / sigma < 3.9


def test_rs_predict_binomial_test():
  counts = np.array([[60, 40, 0], [38, 62, 0], [50, 50, 0], [0, 3, 97], [6, 0, 0]])
  got = pred.rs_predict_from_counts(counts, alpha=0.05)
  # Two-sided exact test at p = 1/2, symmetric: p-value = min(1, 2 * P[X <= min]).
  pv = [min(1.0, 2 * stats.binom.cdf(min(a, b), a + b, 0.5)) for a, b in
        [(60, 40), (62, 38), (50, 50), (97, 3), (6, 0)]]
  assert pv[0] > 0.05 and pv[1] < 0.05 and pv[4] < 0.05
  np.testing.assert_array_equal(got, [-1, 1, -1, 2, 0])


# -------------------------------------------------------------------- certified accuracy


def test_certified_accuracy_hand_example():
  acc = pred.certified_accuracy(np.array([0, 1, -1, 2]), np.array([0.5, 0.1, 0.0, 1.0]),
                                np.array([0, 1, 1, 1]), np.array([0.0, 0.1, 0.2, 0.5, 1.0]))
  np.testing.assert_allclose(acc, [0.5, 0.5, 0.25, 0.25, 0.0])


def test_certified_accuracy_non_increasing():
  rng = np.random.default_rng(4)
  p = rng.integers(-1, 5, size=300)
  r = np.where(p >= 0, rng.exponential(0.5, size=300), 0.0)
  acc = np.asarray(pred.certified_accuracy(p, r, rng.integers(0, 5, size=300),
                                           np.linspace(0, 2, 41), num_classes=5))
  assert np.all(np.diff(acc) <= 0) and acc[0] <= np.mean(p >= 0)


# ------------------------------------------------------------------------------ errors


def test_bad_inputs_raise():
  rng = np.random.default_rng(7)
  z = _unit(rng.normal(size=(2, 4)))
  w = _unit(rng.normal(size=(3, 4)))
  good = np.array([[3, 1], [0, 4]])
  cases = [
      (lambda: pred.angle_margin(z, 2 * w), "unit vectors"),
      (lambda: pred.angle_margin(z, w[:, :3]), "dimension"),
      (lambda: pred.angle_margin(z, w[:1]), "K >= 2"),
      (lambda: pred.prototype_logit_bounds(z, w, np.ones(3)), "batch size"),
      # Issue 20.5: gamma = NaN returned NaN bounds; a vector radius was taken.
      (lambda: pred.prototype_logit_bounds(z, w, np.array([0.5, np.nan])), "gamma contains NaN"),
      (lambda: pred.prototype_logit_bounds(z, w, np.array([0.5, 1.5])), "gamma must lie in"),
      (lambda: pred.required_margin(np.array([0.9, 0.99]), sigma=0.5, radius=[0.1, 0.2]),
       "radius must be one l2 radius"),
      (lambda: pred.required_margin(np.array([0.9, 0.99]), sigma=True), "sigma .* bool"),
      (lambda: pred.prediction_radius(np.ones(2), np.ones(2), sigma="0.5"), "sigma .* str"),
      (lambda: pred.prediction_radius(np.ones(2), np.ones(2), sigma=0.0), "sigma"),
      (lambda: pred.prediction_radius(np.ones(2), np.ones(2), sigma=-1.0), "sigma"),
      (lambda: pred.rs_certify_from_counts(good, good, sigma=0.0, alpha=0.01), "sigma"),
      (lambda: pred.clopper_pearson_lower(1, 2, 0.0), "alpha"),
      (lambda: pred.rs_predict_from_counts(good, alpha=1.0), "alpha"),
      (lambda: pred.rs_certify_from_counts(good, good, sigma=1.0, alpha=1.5), "alpha"),
      (lambda: pred.rs_predict_from_counts(np.array([[3, -1]]), alpha=0.1), "non-negative"),
      (lambda: pred.rs_predict_from_counts(np.array([[0.5, 1.0]]), alpha=0.1), "whole"),
      (lambda: pred.rs_predict_from_counts(np.array([[0, 0]]), alpha=0.1), "at least one"),
      (lambda: pred.rs_certify_from_counts(good, good[:1], sigma=1.0, alpha=0.1), "same shape"),
      (lambda: pred.clopper_pearson_lower(5, 4, 0.1), "k must"),
      (lambda: pred.certified_accuracy([0, 1], [1.0, 1.0], [0, -1], [0.0]), "labels"),
      (lambda: pred.certified_accuracy([0, 1], [1.0, 1.0], [0, 3], [0.0], num_classes=3),
       "labels"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()


@pytest.mark.parametrize("kwargs, match", [
    (dict(h_lcb=np.array([0.9, 1.5])), r"h_lcb must lie in \[0.0, 1.0\]"),
    (dict(h_lcb=np.array([0.9, -0.2])), r"h_lcb must lie in \[0.0, 1.0\]"),
    (dict(h_lcb=np.array([0.9, np.nan])), "h_lcb contains NaN"),
    (dict(deficit=np.array([0.1, -0.5])), r"deficit must lie in \[0.0, 1.0\].*L > 1"),
    (dict(deficit=np.array([0.1, 2.0])), r"deficit must lie in \[0.0, 1.0\]"),
    (dict(h_lcb=np.array([0.9, 0.9]), delta=np.array([1.0, -0.1])), "delta must lie in"),
    (dict(h_lcb=np.array([0.9, 0.9]), delta=np.array([1.0, 4.0])), "delta must lie in"),
    (dict(h_lcb=np.array([0.9, 0.9]), sigma=float("inf")), "sigma"),
    (dict(h_lcb=np.zeros(0), delta=np.zeros(0)), "delta is empty"),
])
def test_radius_refuses_out_of_range_bounds(kwargs, match):
  """Issue 13 (d): an LCB of 1.5 or a negative deficit used to give the maximum radius."""
  args = dict(delta=np.array([1.0, 1.0]), sigma=0.5)
  args.update(kwargs)
  for fn in (lambda **a: pred.prediction_radius(**a),
             lambda **a: pred.certified_prediction(predicted_class=np.array([0, 1])[:len(
                 a["delta"])], **a)):
    with pytest.raises(ValueError, match=match):
      fn(**args)


def test_certified_prediction_refuses_bad_classes():
  for cls, match in ((np.array([0.5, 1.0]), "predicted_class must be class indices"),
                     (np.array([-1, 1]), "predicted_class must be class indices"),
                     (np.array([0, 1, 2]), "batch size")):
    with pytest.raises(ValueError, match=match):
      pred.certified_prediction(np.array([1.0, 1.0]), cls, np.array([0.9, 0.9]), sigma=0.5)


def test_empty_batches_name_the_argument():
  w = _unit(np.random.default_rng(8).normal(size=(3, 4)))
  cases = [
      (lambda: pred.angle_margin(np.zeros((0, 4)), w), "z is empty"),
      (lambda: pred.prototype_logit_bounds(np.zeros((0, 4)), w, np.zeros(0)), "z is empty"),
      (lambda: pred.rs_certify_from_counts(np.zeros((0, 3), int), np.zeros((0, 3), int),
                                           sigma=0.5, alpha=0.01), "counts0 is empty"),
      (lambda: pred.rs_predict_from_counts(np.zeros((0, 3), int), alpha=0.01), "counts is empty"),
      (lambda: pred.certified_accuracy([], [], [], [0.0]), "pred_class is empty"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()


def test_angles_are_exact_whatever_the_default_matmul_precision():
  """The margin's dot runs at HIGHEST precision, in the jaxpr (CPUs ignore the setting)."""
  rng = np.random.default_rng(9)
  z = _unit(rng.normal(size=(6, 64))).astype(np.float32)
  w = _unit(rng.normal(size=(4, 64))).astype(np.float32)
  theta = np.arccos(np.clip(z.astype(np.float64) @ w.T.astype(np.float64), -1, 1))
  want = np.sort(theta, 1)[:, 1] - np.sort(theta, 1)[:, 0]
  for precision in ("bfloat16", "tensorfloat32", "float32"):
    with jax.default_matmul_precision(precision):
      _, delta = pred.angle_margin(z, w)
      jaxpr = jax.make_jaxpr(pred._angle_margin)(z, w)  # pylint: disable=protected-access
    np.testing.assert_allclose(delta, want, atol=2e-6)
    dots = list(_dots(jaxpr))
    assert len(dots) == 2  # the angles and the argmax
    assert all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots)


def _dots(jaxpr):
  """Every dot_general of a (closed) jaxpr, nested jaxprs (jit, loops, shard_map) included."""
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _dots(sub)
