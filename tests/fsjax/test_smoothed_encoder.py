"""fsjax.smoothing.SmoothedEncoder: the smoothed encoder as a value (toy encoder, seconds)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsjax import encoders
from fsjax import smoothing


def _loop(encoder, params, x, key, sigma, n):
  """Independent numpy oracle: per-sample raw features g(x + delta_i), float64."""
  tokens = jax.jit(lambda y: encoder.tokens(params, y))
  return np.stack([np.asarray(tokens(x + smoothing.noise(key, i, x.shape, sigma)), np.float64)
                   for i in range(n)])  # [n, B, T, D]


@pytest.mark.parametrize("features", ["direction", "raw_mean"])
def test_tokens_and_features_equal_a_plain_loop(toy, features):
  encoder, params = toy
  x = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  key, sigma, n = jax.random.key(2), 0.5, 5
  smoothed = smoothing.SmoothedEncoder(encoder, sigma=sigma, n=n, features=features,
                                       chunk_size=2)  # 3 chunks, the last one masked
  assert smoothed.resolution == encoder.resolution
  p = smoothed.with_key({"encoder": params}, key)
  raw = _loop(encoder, params, x, key, sigma, n)
  flat = raw.reshape(n, 3, -1)
  norms = np.linalg.norm(flat, axis=-1, keepdims=True)
  f_s = (flat / norms).mean(0)  # Eq. 3
  if features == "raw_mean":
    want = raw.mean(0)
  else:
    want = (f_s / np.linalg.norm(f_s, axis=-1, keepdims=True) * norms.mean(0)).reshape(
        raw.shape[1:])
  got = smoothed.jitted_tokens(p, x)
  # Handed over as a plain array: no explicit mesh axis of the Monte Carlo engine.
  assert jax.sharding.AxisType.Explicit not in jax.typeof(got).sharding.mesh.axis_types
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # The feature is the unit vector of the token view; under "direction" that is the
  # direction of the n-sample f_s, the quantity the certificate is about.
  feature = np.asarray(encoders.normalise(got))  # smoothed(p, x), by the contract
  np.testing.assert_allclose(np.linalg.norm(feature, axis=-1), 1.0, rtol=1e-5)
  if features == "direction":
    np.testing.assert_allclose(feature, f_s / np.linalg.norm(f_s, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    # smoothed_features (f_s itself, norm <= 1) comes from the same sums.
    np.testing.assert_allclose(np.asarray(smoothing.smoothed_features(
        params, x, encoder=encoder, sigma=sigma, n=n, key=key, chunk_size=2)), f_s,
                               rtol=1e-5, atol=1e-6)


def test_the_key_comes_in_the_params_and_there_is_no_default(toy):
  encoder, params = toy
  x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  smoothed = smoothing.SmoothedEncoder(encoder, sigma=0.25, n=3)
  with pytest.raises(ValueError, match="no noise key"):
    smoothed.jitted_tokens({"encoder": params}, x)
  with pytest.raises(ValueError, match="must be {'encoder'"):
    smoothed.jitted_tokens(params, x)
  with pytest.raises(ValueError, match="key=None"):
    smoothed.with_key({"encoder": params}, None)
  a = smoothed.jitted_tokens(smoothed.with_key({"encoder": params}, jax.random.key(0)), x)
  b = smoothed.jitted_tokens(smoothed.with_key({"encoder": params}, jax.random.key(1)), x)
  again = smoothed.jitted_tokens(smoothed.with_key({"encoder": params}, jax.random.key(0)), x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))  # reproducible from the key
  assert not np.allclose(np.asarray(a), np.asarray(b))  # fresh key, fresh noise
  # A deterministic encoder has no randomness: with_key leaves its params alone.
  assert encoder.with_key(params, jax.random.key(0)) is params
  with pytest.raises(ValueError, match="sigma"):
    smoothing.SmoothedEncoder(encoder, sigma=0.0)
  with pytest.raises(ValueError, match="features='mean' must be one of"):
    smoothing.SmoothedEncoder(encoder, sigma=0.25, features="mean")
  with pytest.raises(ValueError, match="n"):
    smoothing.SmoothedEncoder(encoder, sigma=0.25, n=0)
  with pytest.raises(ValueError, match="base must be an fsjax.encoders.Encoder"):
    smoothing.SmoothedEncoder(lambda p, x: x, sigma=0.25)
  with pytest.raises(ValueError, match="smoothing's sigma"):
    smoothed.jitted_tokens(smoothed.with_key({"encoder": params}, jax.random.key(0)), x,
                           sigma=0.5)


def test_gradients_pass_through_the_smoothing(toy):
  """What an EOT attack on the smoothed encoder differentiates: d<f(x), u>/dx against
  central finite differences (float64 arithmetic is not needed at this step size)."""
  encoder, params = toy
  smoothed = smoothing.SmoothedEncoder(encoder, sigma=0.25, n=4, chunk_size=2)
  p = smoothed.with_key({"encoder": params}, jax.random.key(3))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(2, 8, 8, 3)), jnp.float32)
  u = encoders.unit(jnp.asarray(rng.normal(size=(2, 16)), jnp.float32))
  loss = jax.jit(jax.value_and_grad(lambda y: jnp.sum(smoothed(p, y) * u)))
  _, grad = loss(x)
  d = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  eps = 1e-3
  fd = (loss(x + eps * d)[0] - loss(x - eps * d)[0]) / (2 * eps)
  np.testing.assert_allclose(float(jnp.sum(grad * d)), float(fd), rtol=2e-3, atol=1e-4)


def test_unit_and_cosine():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  np.testing.assert_allclose(np.asarray(encoders.unit(jnp.asarray(a))),
                             a / np.linalg.norm(a, axis=-1, keepdims=True), rtol=1e-6)
  want = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(np.asarray(encoders.cosine(jnp.asarray(a), jnp.asarray(b))),
                             want, rtol=1e-6)
  zero = jnp.zeros((1, 6))
  assert float(encoders.cosine(zero, jnp.asarray(a[:1]))[0]) == 0.0  # no NaN
  np.testing.assert_array_equal(np.asarray(encoders.unit(zero)), 0.0)
