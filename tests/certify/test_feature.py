"""The feature certificate end to end on a toy encoder: soundness, determinism, errors."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import certify
from certify import _bounds
from certify import _feature
from fsjax import encoders
from fsjax import smoothing

KEY = jax.random.PRNGKey(0)


def _images(b=2, seed=3):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, 8, 8, 3), minval=0.2, maxval=0.8)


def _estimates(params, x, **kwargs):
  """``{(reference, bound): ScoreEstimate}`` of every bound for both references."""
  kwargs.setdefault("bounds", certify.BOUNDS)
  out = certify.estimate_scores(params, x, references=certify.REFERENCES, **kwargs)
  return {(e.reference, e.bound): e for e in out}


def test_robustness_score_matches_direct_monte_carlo(toy):
  enc, params = toy
  x = _images()
  n, sigma = 200, 0.25
  got = certify.gaussian_robustness_score(params, x, encoder=enc, sigma=sigma, n=n, key=KEY,
                                          chunk_size=32)
  # Independent computation with the documented noise: sample i uses fold_in(key, i).
  clean = np.asarray(enc(params, x))
  scores = []
  for i in range(n):
    d = sigma * jax.random.normal(jax.random.fold_in(KEY, i), x.shape)
    f = np.asarray(enc(params, x + d))
    scores.append((1 + np.sum(f * clean, -1)) / 2)
  np.testing.assert_allclose(got, np.mean(scores, 0), atol=2e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_results_do_not_depend_on_chunk_size(toy, chunk_size):
  enc, params = toy
  x = _images()
  ref = _estimates(params, x, encoder=enc, sigma=0.5, key=KEY, n=100, n0=20, chunk_size=16)
  got = _estimates(params, x, encoder=enc, sigma=0.5, key=KEY, n=100, n0=20,
                   chunk_size=chunk_size)
  for rb in ref:
    # Same samples; only the summation order differs (float32 rounding).
    np.testing.assert_allclose(got[rb].deficit, ref[rb].deficit, rtol=2e-5, atol=2e-6,
                               err_msg=str(rb))
    np.testing.assert_allclose(got[rb].direction, ref[rb].direction, atol=2e-6)


def test_results_do_not_depend_on_device_count(toy, tmp_path):
  enc, params = toy
  x = _images()
  ref = _estimates(params, x, encoder=enc, sigma=0.5, key=KEY, n=100, n0=20, chunk_size=8)
  script = textwrap.dedent(f"""
      import json, jax, numpy as np, certify, sys
      sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})  # tests/conftest.py
      from conftest import ToyEncoder, toy_params
      assert jax.local_device_count() == 8, jax.local_device_count()
      x = jax.random.uniform(jax.random.PRNGKey(3), (2, 8, 8, 3), minval=0.2, maxval=0.8)
      d = certify.estimate_scores(toy_params(), x, encoder=ToyEncoder(resolution=8), sigma=0.5,
                                  key=jax.random.PRNGKey(0), n=100, n0=20, chunk_size=8,
                                  bounds=certify.BOUNDS, references=certify.REFERENCES)
      print(json.dumps([[e.reference, e.bound, np.asarray(e.deficit).tolist()] for e in d]))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(got) == len(ref)
  for r, b, deficit in got:
    np.testing.assert_allclose(deficit, ref[r, b].deficit, rtol=2e-5, atol=2e-6,
                               err_msg=f"{r}/{b}")


def test_one_compilation_for_repeated_calls(toy):
  enc, params = toy
  before = _feature._score_deficits._cache_size()
  for seed in range(3):
    certify.fcsb(params, _images(seed=seed), encoder=enc, sigma=0.25, eps=0.1,
                 key=jax.random.PRNGKey(seed), n=50, n0=10, alpha=0.01)
  assert _feature._score_deficits._cache_size() == before + 1


def test_fcsb_fields_and_vacuous_cosine(toy):
  enc, params = toy
  cert = certify.fcsb(params, _images(), encoder=enc, sigma=0.25, eps=[0.0, 0.25, 5.0],
                      key=KEY, n=200, n0=20, alpha=0.01)
  assert cert.inner_product_bound.shape == (2, 3) and cert.is_certificate
  assert np.all(np.diff(np.asarray(cert.inner_product_bound), axis=1) < 0)  # decreasing in eps
  # eps = 5 sigma... far: the inner-product bound is negative and the cosine is vacuous (-1).
  assert not np.any(cert.certified[:, 2]) and np.all(cert.cosine_bound[:, 2] == -1.0)
  np.testing.assert_allclose(jnp.linalg.norm(cert.direction, axis=-1), 1.0, atol=1e-5)
  point = certify.fcsb(params, _images(), encoder=enc, sigma=0.25, eps=0.25, key=KEY, n=200,
                       n0=20, bound="point")
  assert not point.is_certificate
  assert np.all(point.inner_product_bound >= cert.inner_product_bound[:, 1])


def test_fcsb_is_the_estimate_then_its_certificate(toy):
  """The one pipeline: fcsb == feature_certificate(estimate_scores(...)), same bits, and the
  certificate's radius is Corollary 3.3 of its estimate's deficit and sigma (scipy)."""
  enc, params = toy
  x = _images()
  mc = dict(encoder=enc, sigma=0.25, key=KEY, n=200, n0=20, alpha=0.01)
  cert = certify.fcsb(params, x, eps=[0.0, 0.25], cos=0.6, **mc)
  (est,) = certify.estimate_scores(params, x, **mc)
  assert (est.reference, est.bound, est.sigma, est.alpha) == ("mean", "bernstein", 0.25, 0.01)
  np.testing.assert_array_equal(est.samples, [220, 220])
  two_step = certify.feature_certificate(est, eps=[0.0, 0.25], cos=0.6)
  for a, b in zip(jax.tree.leaves(cert), jax.tree.leaves(two_step)):
    np.testing.assert_array_equal(a, b)
  from scipy import stats
  want = 0.25 * (stats.norm.isf(np.asarray(est.deficit, np.float64)) - stats.norm.ppf(0.8))
  np.testing.assert_allclose(cert.radius, want, rtol=1e-5)
  np.testing.assert_array_equal(
      certify.certified_radius(params, x, cos=0.6, **mc), cert.radius)
  # A pytree of its arrays (labels static): jit can return it.
  jitted = jax.jit(lambda e: e)(est)
  assert jitted.bound == "bernstein" and jitted.sigma == 0.25
  np.testing.assert_array_equal(jitted.take(np.array([1])).deficit, est.deficit[1:])


def test_each_setting_is_validated_once(toy, monkeypatch):
  """Issue 19.3: one sigma was validated 22 times per batch; now once per public call."""
  from fsjax import checks
  enc, params = toy
  calls = []
  real = checks.check_sigma
  monkeypatch.setattr(checks, "check_sigma", lambda *a, **k: (calls.append(1), real(*a, **k)))
  mc = dict(encoder=enc, sigma=0.25, eps=0.1, key=KEY, n=50, n0=10, alpha=0.01)
  certify.fcsb(params, _images(), **mc)  # compiles (tracing may check more)
  calls.clear()
  certify.fcsb(params, _images(), **mc)
  assert len(calls) == 1


def test_two_stage_point_scores_match_direct_loop(toy):
  """Both references and both stages against a float64 loop over the documented noise.

  Stage 1 is samples 0 .. n0-1 (u = their normalised mean), stage 2 samples n0 .. n0+n-1;
  sample i is fold_in(key, i). The point scores, the direction and the Hoeffding and
  Bernstein bounds all follow from the loop's own scores.
  """
  enc, params = toy
  x = _images(3)
  sigma, n0, n, alpha = 0.5, 30, 120, 0.01
  got = _estimates(params, x, encoder=enc, sigma=sigma, key=KEY, n=n, n0=n0, alpha=alpha,
                   bounds=("point", "hoeffding", "bernstein"), chunk_size=16)
  feats = np.stack([np.asarray(enc(params, x + smoothing.noise(KEY, i, x.shape, sigma)),
                               np.float64) for i in range(n0 + n)], axis=1)  # [B, n0 + n, D]
  clean = np.asarray(enc(params, x), np.float64)
  mean = feats[:, :n0].mean(1)
  u = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  np.testing.assert_allclose(got["mean", "point"].direction, u, atol=2e-6)
  for ref, direction in (("clean", clean), ("mean", u)):
    scores = (1 + np.einsum("bkd,bd->bk", feats[:, n0:], direction)) / 2  # [B, n]
    mu, var = scores.mean(1), scores.var(1, ddof=1)
    np.testing.assert_allclose(got[ref, "point"].deficit, 1 - mu, atol=2e-6, err_msg=ref)
    np.testing.assert_allclose(got[ref, "hoeffding"].deficit,
                               1 - mu + np.sqrt(np.log(1 / alpha) / (2 * n)), atol=2e-6)
    lt = np.log(2 / alpha)
    np.testing.assert_allclose(got[ref, "bernstein"].deficit,
                               1 - mu + np.sqrt(2 * var * lt / n) + 7 * lt / (3 * (n - 1)),
                               atol=2e-6, err_msg=ref)


def test_mean_reference_not_worse_than_clean_two_stage(toy):
  enc, params = toy
  d = _estimates(params, _images(4), encoder=enc, sigma=0.5, key=KEY, n=2000, n0=200,
                 bounds=("bernstein",))
  # Two-stage: u is estimated from n0 samples, so "never worse" holds up to Monte Carlo error.
  assert np.all(d["mean", "bernstein"].deficit <= d["clean", "bernstein"].deficit + 2e-3)


@pytest.mark.parametrize("reference", ["clean", "mean"])
def test_soundness_against_gradient_attack(toy, reference):
  """A large-n estimate of <f_s(x'), u> at an adversarial x' never falls below the bound."""
  enc, params = toy
  x = _images(3)
  sigma, eps, alpha = 0.25, 0.3, 0.001
  cert = certify.fcsb(params, x, encoder=enc, sigma=sigma, eps=eps, key=KEY, n=2000, n0=100,
                      alpha=alpha, reference=reference, bound="bernstein")
  u = cert.direction
  # Attack: l2 PGD on <f_s(x'), u> with a fixed batch of 64 noise draws (an EOT estimate).
  deltas = sigma * jax.random.normal(jax.random.PRNGKey(9), (64,) + x.shape)

  def objective(xa):
    f = jax.vmap(lambda d: enc(params, xa + d))(deltas).mean(0)
    return jnp.sum(f * u)

  grad = jax.grad(objective)
  xa = x
  for _ in range(20):
    g = grad(xa)
    g = g / jnp.linalg.norm(g.reshape(3, -1), axis=1)[:, None, None, None]
    xa = xa - 0.05 * g
    delta = xa - x
    norm = jnp.linalg.norm(delta.reshape(3, -1), axis=1)[:, None, None, None]
    xa = x + delta * jnp.minimum(1.0, eps / norm)
  assert np.all(np.linalg.norm(np.asarray(xa - x).reshape(3, -1), axis=1) <= eps * (1 + 1e-5))
  n_check = 20_000
  f_adv = smoothing.smoothed_features(params, xa, encoder=enc, sigma=sigma, n=n_check,
                                      key=jax.random.PRNGKey(77), chunk_size=500)
  measured = np.sum(np.asarray(f_adv) * np.asarray(u), -1)
  clean_inner = np.sum(np.asarray(smoothing.smoothed_features(
      params, x, encoder=enc, sigma=sigma, n=n_check, key=jax.random.PRNGKey(78),
      chunk_size=500)) * np.asarray(u), -1)
  assert np.all(measured < clean_inner)  # the attack did something
  mc_error = 4.0 / np.sqrt(n_check)  # |<f, u>| <= 1: a generous 4-sigma Monte Carlo margin
  assert np.all(measured >= np.asarray(cert.inner_product_bound) - mc_error), (
      measured, cert.inner_product_bound)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(eps=-0.1), "eps"),
    (dict(n=1), "n must"), (dict(n0=0), "n0"), (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.0), "alpha"), (dict(bound="chernoff"), "bound"),
    (dict(reference="target"), "reference"),
    (dict(n=0), "n must"), (dict(n0=2.5), "n0"), (dict(alpha=float("nan")), "alpha"),
    (dict(sigma=float("inf")), "sigma"), (dict(chunk_size=0), "chunk_size"),
    # Issue 20.5: no eps, a grid of grids, a flag or a string as sigma, a flag as progress.
    (dict(eps=[]), r"eps must be one l2 radius or a non-empty list"),
    (dict(eps=[[0.1, 0.2]]), r"shape \[E\]"), (dict(sigma=True), "sigma .* bool"),
    (dict(sigma="0.25"), "sigma .* str"), (dict(alpha=True), "alpha"),
    (dict(progress=True), "progress must be None or a callable"),
    (dict(cos=1.0), "cos"), (dict(cos=float("nan")), "cos"),
])
def test_bad_arguments(toy, kwargs, match):
  enc, params = toy
  args = dict(sigma=0.25, eps=0.1, n=10, n0=5, alpha=0.01)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    certify.fcsb(params, _images(), encoder=enc, key=KEY, **args)


@pytest.mark.parametrize("x, match", [
    (np.full((1, 8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((1, 8, 8, 3), 200.0, np.float32), "255"),
    (np.zeros((8, 8, 3), np.float32), "shape"),
    (np.zeros((1, 8, 8, 1), np.float32), "shape"),
    (np.zeros((1, 8, 8, 3), np.uint8), "dtype"),
    (np.zeros((0, 8, 8, 3), np.float32), r"x is empty \(shape \(0, 8, 8, 3\)\)"),
    (jnp.full((1, 8, 8, 3), 1.5, jnp.bfloat16), r"must lie in \[0, 1\] pixel space"),
])
def test_bad_images(toy, x, match):
  enc, params = toy
  with pytest.raises(ValueError, match=match):
    certify.fcsb(params, x, encoder=enc, sigma=0.25, eps=0.1, key=KEY, n=10, n0=5)


def test_bfloat16_images_are_certified_as_their_float32_values(toy):
  """Issue 13 (d): bf16 images were refused as "not floating point"; bf16 -> f32 is exact."""
  enc, params = toy
  x16 = jnp.asarray(_images(), jnp.bfloat16)
  x32 = np.asarray(x16).astype(np.float32)  # numpy's conversion, independent of fsjax
  args = dict(encoder=enc, sigma=0.25, eps=[0.1, 0.3], key=KEY, n=100, n0=10, alpha=0.01)
  got, want = certify.fcsb(params, x16, **args), certify.fcsb(params, x32, **args)
  np.testing.assert_array_equal(got.inner_product_bound, want.inner_product_bound)
  np.testing.assert_array_equal(got.direction, want.direction)


def test_certified_radius_refuses_the_point_estimate(toy):
  enc, params = toy
  with pytest.raises(ValueError, match="plug-in estimate"):
    certify.certified_radius(params, _images(), encoder=enc, sigma=0.25, key=KEY, n=10, n0=5,
                             bound="point")


# ------------------------------------------------------------ precision on accelerators


@dataclasses.dataclass(frozen=True, eq=False)
class _ElementwiseEncoder(encoders.Encoder):
  """An encoder without a matmul: every dot in a certificate's program is the certificate's."""

  def tokens(self, params, x, *, sigma=None):
    return jnp.tanh(x.reshape(x.shape[0], 1, -1) * params["w"] + params["b"])


def _dots(jaxpr):
  """Every dot_general of a (closed) jaxpr, nested jaxprs (jit, loops, shard_map) included."""
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _dots(sub)


@pytest.mark.parametrize("precision", ["bfloat16", "tensorfloat32"])
def test_certificate_is_exact_whatever_the_default_matmul_precision(precision):
  """Issue 13 (a): the score dots ran at the default precision (TF32 on GPUs, ~1e-3 error).

  CPUs ignore jax_default_matmul_precision, so the test checks the program: every dot of
  the two-stage certificate carries HIGHEST precision, and the results do not move.
  """
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  enc = _ElementwiseEncoder(resolution=8)
  params = {"w": 3 * jax.random.normal(k1, (192,)), "b": jax.random.normal(k2, (192,))}
  x = _images(2)
  args = dict(encoder=enc, sigma=0.5, key=KEY, n=64, n0=16, alpha=0.01, chunk_size=16)
  want = _estimates(params, x, **args)
  with jax.default_matmul_precision(precision):
    got = _estimates(params, x, **args)
    jaxpr = jax.make_jaxpr(lambda p, x, k, s: _feature._score_deficits(  # pylint: disable=protected-access
        p, x, k, s, encoder=enc, n0=16, n=64, alpha=0.01, bounds=_bounds.BOUNDS,
        chunk_size=16))(params, x, KEY, jnp.float32(0.5))
  for rb in want:
    np.testing.assert_array_equal(got[rb].deficit, want[rb].deficit, err_msg=str(rb))
    np.testing.assert_array_equal(got[rb].direction, want[rb].direction, err_msg=str(rb))
  dots = list(_dots(jaxpr))
  assert len(dots) >= 2  # stage 1's clean score and stage 2's scores
  assert all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots), [
      e.params["precision"] for e in dots]


def test_progress_counts_every_sample_and_changes_no_bit(toy):
  """Issue 14: with ``progress`` the samples done arrive chunk by chunk and sum to n0 + n,
  and every bound (betting included) and direction is the same bits as without it.

  Stage 1 (n0 = 20 < chunk_size) is a one-chunk loop, which XLA removes; stage 2 is a
  full chunk and a partial one. (The arguments of test_results_do_not_depend_on_chunk_size
  [64]: the call without progress reuses its compilation.)
  """
  enc, params = toy
  x = _images()
  args = dict(encoder=enc, sigma=0.5, key=KEY, n=100, n0=20, chunk_size=64)
  want = _estimates(params, x, **args)
  done = []
  got = _estimates(params, x, progress=done.append, **args)
  assert sorted(done) == [20, 36, 64]
  for rb in want:
    np.testing.assert_array_equal(got[rb].deficit, want[rb].deficit, err_msg=str(rb))
    np.testing.assert_array_equal(got[rb].direction, want[rb].direction, err_msg=str(rb))
  assert not smoothing._reporters  # pylint: disable=protected-access  # unregistered


def test_with_progress_unregisters_when_the_call_fails():
  def failing(reporter):
    raise ValueError(f"boom {reporter}")
  with pytest.raises(ValueError, match="boom"):
    smoothing.with_progress(lambda samples: None, failing)
  assert not smoothing._reporters  # pylint: disable=protected-access
