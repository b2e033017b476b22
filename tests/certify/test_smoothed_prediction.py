"""Monte Carlo prediction certificates (FS prototypes and RS) on the toy encoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import certify
from fsjax import smoothing

KEY = jax.random.PRNGKey(0)


def _images(b=4, seed=3):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, 8, 8, 3), minval=0.2, maxval=0.8)


def _prototypes(enc, params, x):
  """Prototypes around the images' own smoothed features, so predictions are stable."""
  f = np.asarray(smoothing.smoothed_features(params, x, encoder=enc, sigma=0.25, n=200, key=KEY))
  w = f / np.linalg.norm(f, axis=1, keepdims=True)
  return jnp.asarray(w)


def test_fs_certified_prediction_matches_closed_form(toy):
  enc, params = toy
  x = _images()
  w = _prototypes(enc, params, x)
  cls, radius = certify.certify_prediction(params, x, encoder=enc, prototypes=w, sigma=0.25,
                                           key=KEY, n0=50, n=500, alpha=0.01)
  d = certify.score_deficits(params, x, encoder=enc, sigma=0.25, key=KEY, n=500, n0=50,
                             alpha=0.01, bounds=("bernstein",))["mean"]
  u = np.asarray(d["direction"])
  theta = np.arccos(np.clip(u @ np.asarray(w).T, -1, 1))
  expect_cls = np.argmax(u @ np.asarray(w).T, 1)
  margin = np.sort(theta, 1)[:, 1] - np.sort(theta, 1)[:, 0]
  from scipy import stats
  expect_r = 0.25 * (stats.norm.isf(np.asarray(d["bernstein"], np.float64))
                     - stats.norm.ppf((1 + np.cos(margin / 2)) / 2))
  certified = expect_r > 0
  np.testing.assert_array_equal(cls, np.where(certified, expect_cls, -1))
  np.testing.assert_allclose(radius[certified], expect_r[certified], rtol=1e-3, atol=1e-4)


def test_fs_abstains_with_identical_prototypes(toy):
  enc, params = toy
  x = _images(2)
  w = _prototypes(enc, params, x)[:1]
  w = jnp.concatenate([w, w], 0)  # margin 0: never certifiable
  cls, radius = certify.certify_prediction(params, x, encoder=enc, prototypes=w, sigma=0.25,
                                           key=KEY, n0=20, n=100)
  assert np.all(cls == -1)


def test_prototype_dimension_error(toy):
  enc, params = toy
  with pytest.raises(ValueError, match="dim"):
    certify.certify_prediction(params, _images(1), encoder=enc, prototypes=jnp.eye(3, 5),
                               sigma=0.25, key=KEY, n0=5, n=10)


def _head(enc, params, x, k=3):
  head = certify.LinearHead(k)
  f = enc(params, x)
  variables = head.init(KEY, f)
  return variables


def test_rs_counts_match_direct_loop(toy):
  enc, params = toy
  x = _images(2)
  head = _head(enc, params, x)
  counts = certify.class_counts(params, x, encoder=enc, head=head, sigma=0.5, n=30, key=KEY,
                                first_index=5, chunk_size=7)
  direct = np.zeros_like(counts)
  for i in range(5, 35):
    xn = x + smoothing.noise(KEY, i, x.shape, 0.5)
    pred = np.argmax(certify.LinearHead(3).apply(head, enc(params, xn)), -1)
    direct[np.arange(2), pred] += 1
  np.testing.assert_array_equal(counts, direct)


def test_rs_certify_and_abstain(toy):
  enc, params = toy
  x = _images(3)
  # A head that always says class 1 by a wide bias: certified with radius sigma*Phi^-1(pA).
  head = {"params": {"dense": {"kernel": jnp.zeros((16, 3)), "bias": jnp.array([0., 5., 0.])}}}
  rs = certify.rs_certify(params, x, encoder=enc, head=head, sigma=0.25, key=KEY, n0=10,
                          n=1000, alpha=0.001)
  assert type(rs).__name__ == "PredictionCertificate" and rs.is_certificate
  cls, radius = rs
  assert np.all(cls == 1)
  from scipy import stats
  pa = 0.001 ** (1 / 1000)  # Clopper-Pearson lower bound when all n agree
  np.testing.assert_allclose(radius, 0.25 * stats.norm.ppf(pa), rtol=1e-6)


def test_tied_logits_are_not_a_tie_in_counts(toy):
  """Equal logits go to the first class (argmax), so the base classifier is not tied.

  docs/method.md section 3 (Cohen et al.): the smoothed classifier abstains when its
  *counts* cannot tell the top two classes apart; a head whose logits always tie says
  class 0 on every noisy sample, and that is a confident prediction.
  """
  enc, params = toy
  x = _images(3)
  head = {"params": {"dense": {"kernel": jnp.zeros((16, 2)), "bias": jnp.zeros(2)}}}
  counts = certify.class_counts(params, x, encoder=enc, head=head, sigma=0.25, n=50, key=KEY)
  np.testing.assert_array_equal(counts, [[50, 0]] * 3)
  from scipy import stats
  assert stats.binomtest(50, 50, 0.5).pvalue <= 0.001
  np.testing.assert_array_equal(certify.rs_predict(params, x, encoder=enc, head=head,
                                                   sigma=0.25, key=KEY, n=50), [0, 0, 0])


def test_a_tie_in_counts_abstains(toy):
  """A head that splits the noise samples exactly in half: PREDICT abstains.

  CERTIFY, given the same tied selection counts, picks the first class (argmax) and must
  abstain unless the fresh samples' Clopper-Pearson bound for it exceeds 1/2.
  """
  enc, params = toy
  x = _images(2)
  sigma, n, alpha = 0.5, 50, 0.001
  v = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (16,)))
  # Direct loop over the documented samples (fold_in(key, i)): the threshold at the median
  # projection of samples i < n puts exactly n / 2 of them on each side, for each image.
  proj = np.stack([np.asarray(enc(params, x + smoothing.noise(KEY, i, x.shape, sigma)),
                              np.float64) @ v for i in range(2 * n)], axis=1)  # [B, 2n]
  t = np.median(proj[:, :n], axis=1)
  assert np.all(np.sum(proj[:, :n] > t[:, None], axis=1) == n // 2)
  assert np.all(np.min(np.abs(proj - t[:, None]), axis=1) > 1e-5)  # no sample on the edge
  from scipy import stats
  assert stats.binomtest(n // 2, n, 0.5).pvalue > alpha
  for i in range(2):  # one head per image: its own threshold
    head = {"params": {"dense": {"kernel": jnp.asarray(np.stack([v, -v], 1), jnp.float32),
                                 "bias": jnp.asarray([-t[i], t[i]], jnp.float32)}}}
    counts = certify.class_counts(params, x, encoder=enc, head=head, sigma=sigma, n=n, key=KEY)
    assert counts[i, 0] == counts[i, 1] == n // 2
    assert certify.rs_predict(params, x, encoder=enc, head=head, sigma=sigma, key=KEY, n=n,
                              alpha=alpha)[i] == certify.ABSTAIN
    cls, radius = certify.rs_certify(params, x, encoder=enc, head=head, sigma=sigma, key=KEY,
                                     n0=n, n=n, alpha=alpha)
    k = int(np.sum(proj[i, n:] > t[i]))  # class 0 on the fresh samples n .. 2n - 1
    p_a = stats.beta.ppf(alpha, k, n - k + 1) if k else 0.0
    if p_a > 0.5:
      assert cls[i] == 0 and radius[i] == pytest.approx(sigma * stats.norm.ppf(p_a), rel=1e-6)
    else:
      assert cls[i] == certify.ABSTAIN and radius[i] == 0.0


def test_point_estimate_is_marked_as_such(toy):
  """Issue 13 (d): bound="point" returned something that looked like a certificate."""
  enc, params = toy
  x = _images(2)
  w = _prototypes(enc, params, x)
  mc = dict(encoder=enc, prototypes=w, sigma=0.25, key=KEY, n0=20, n=100, alpha=0.01)
  point = certify.certify_prediction(params, x, bound="point", **mc)
  cert = certify.certify_prediction(params, x, bound="bernstein", **mc)
  assert type(point).__name__ == "PredictionEstimate" and not point.is_certificate
  assert type(cert).__name__ == "PredictionCertificate" and cert.is_certificate
  assert "PredictionEstimate(" in repr(point)
  cls, radius = point  # unpacks like a certificate, for code that handles both
  d = certify.score_deficits(params, x, encoder=enc, sigma=0.25, key=KEY, n=100, n0=20,
                             alpha=0.01, bounds=("point",))["mean"]
  u, wn = np.asarray(d["direction"], np.float64), np.asarray(w, np.float64)
  theta = np.sort(np.arccos(np.clip(u @ wn.T, -1, 1)), 1)
  from scipy import stats
  want = 0.25 * (stats.norm.isf(np.asarray(d["point"], np.float64))
                 - stats.norm.ppf((1 + np.cos((theta[:, 1] - theta[:, 0]) / 2)) / 2))
  np.testing.assert_allclose(radius[cls >= 0], want[cls >= 0], rtol=1e-3, atol=1e-4)
  assert np.all((cls >= 0) == (want > 0))


@pytest.mark.parametrize("x, match", [
    (np.zeros((0, 8, 8, 3), np.float32), r"x is empty"),
    (np.full((1, 8, 8, 3), 255.0, np.float32), "divide by 255"),
])
def test_prediction_bad_images(toy, x, match):
  enc, params = toy
  w = jnp.eye(2, 16)
  with pytest.raises(ValueError, match=match):
    certify.certify_prediction(params, x, encoder=enc, prototypes=w, sigma=0.25, key=KEY,
                               n0=5, n=10)
  with pytest.raises(ValueError, match=match):
    certify.rs_certify(params, x, encoder=enc, head=_head(enc, params, _images(1)), sigma=0.25,
                       key=KEY, n0=5, n=10)


def test_prediction_of_bfloat16_images_is_that_of_their_float32_values(toy):
  enc, params = toy
  x16 = jnp.asarray(_images(2), jnp.bfloat16)
  x32 = np.asarray(x16).astype(np.float32)
  w = _prototypes(enc, params, jnp.asarray(x32))
  mc = dict(encoder=enc, prototypes=w, sigma=0.25, key=KEY, n0=20, n=100, alpha=0.01)
  for a, b in zip(certify.certify_prediction(params, x16, **mc),
                  certify.certify_prediction(params, x32, **mc)):
    np.testing.assert_array_equal(a, b)


def test_class_counts_progress_counts_samples_and_changes_nothing(toy):
  """Issue 14: counting with ``progress`` reports the n samples chunk by chunk and counts
  exactly as without it (the arguments of test_rs_counts_match_direct_loop)."""
  enc, params = toy
  x = _images(2)
  head = _head(enc, params, x)
  args = dict(encoder=enc, head=head, sigma=0.5, n=30, key=KEY, first_index=5, chunk_size=7)
  want = certify.class_counts(params, x, **args)
  done = []
  got = certify.class_counts(params, x, progress=done.append, **args)
  assert sorted(done) == [2, 7, 7, 7, 7]
  np.testing.assert_array_equal(got, want)
