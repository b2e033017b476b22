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
  cls, radius = certify.rs_certify(params, x, encoder=enc, head=head, sigma=0.25, key=KEY,
                                   n0=10, n=1000, alpha=0.001)
  assert np.all(cls == 1)
  from scipy import stats
  pa = 0.001 ** (1 / 1000)  # Clopper-Pearson lower bound when all n agree
  np.testing.assert_allclose(radius, 0.25 * stats.norm.ppf(pa), rtol=1e-6)
  # A tie between two classes abstains.
  assert np.all(certify.rs_predict(params, x, encoder=enc, head={"params": {"dense": {
      "kernel": jnp.zeros((16, 2)), "bias": jnp.zeros(2)}}}, sigma=0.25, key=KEY, n=50) >= 0)
