"""certify._sequential: soundness of sequential certificates at data-dependent stopping times.

Exact-truth models whose noisy samples can be drawn directly (no encoder needed, so 10,000
certificates take seconds):

* the 1-D half-space encoder f(x) = sign(<w, x> - b) v: with u = v the per-sample deficit
  ``1 - h_u`` is Bernoulli(1 - Phi(t / sigma)), t = <w, x> - b, and the worst case of
  ``<f_s(x'), u>`` over ``||x' - x|| <= eps`` is exactly Theorem 3.2's B(eps) at the true
  score: a certificate fails iff its deficit bound is below the true mean deficit;
* the 2-D half-space encoder f(x) = (s_1, s_2) / sqrt(2) of tests/certify/test_norm.py with
  orthogonal normals (s_1, s_2 independent), whose worst cosine over the eps-disk is found
  by brute force: the norm-aware certificate.

Each runs >= 10,000 certificates, every one stopped as soon as its decisions are settled,
and a one-sided binomial test checks that the failure rate is not above alpha. A naive
rule (a fixed-n Clopper-Pearson bound re-evaluated after every chunk) fails the same test,
so the test can fail.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.stats import norm as sp_norm

from certify import _norm
from certify import _sequential as sq
from fsjax import encoders

ALPHA = 0.01
SIGMA = 0.25
COS = 0.5
EPS = np.array([0.125, 0.25, 0.375, 0.5, 0.75], np.float32)  # Table 1's grid
CHUNK = 200
N_MAX = 2000
N0 = 100
GRID = 64  # the soundness argument holds for any grid; a small one keeps the test fast
STREAMS = 10_000


def _thresholds():
  return np.asarray(sq.deficit_threshold(EPS, SIGMA, COS))


def _true_deficits(key, streams):
  """Mean deficits: half spread over Table 1's range, half just above a decision's threshold.

  The second half are the images a sequential rule is most tempted to certify wrongly.
  """
  k1, k2, k3 = jax.random.split(key, 3)
  spread = sp_norm.cdf(-np.asarray(jax.random.uniform(k1, (streams // 2,), minval=1.0,
                                                      maxval=3.0)))
  tau = _thresholds()
  pick = np.asarray(jax.random.randint(k2, (streams - streams // 2,), 0, len(EPS) - 1))
  near = tau[pick] * np.asarray(jax.random.uniform(k3, pick.shape, minval=1.0, maxval=1.15))
  return np.concatenate([spread, near]).astype(np.float32)


def _binomial(key, n, p):
  """Binomial(n, p) ``[R]`` as a sum of n Bernoulli draws (cheaper to compile than jax's)."""
  return jnp.sum(jax.random.uniform(key, p.shape + (n,)) < p[:, None], -1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("n_max", "chunk", "grid_size", "futility"))
def _run_bernoulli(key, mu, *, n_max, chunk, grid_size, futility="predictive"):
  """Sequential inner-product certificates of the 1-D half-space encoder, ``mu [R]``."""
  streams = mu.shape[0]
  k0, key = jax.random.split(key)
  first = _binomial(k0, N0, mu)  # stage 1: the prior
  m0 = first / N0
  state = sq.init(m0, m0 * (1.0 - m0), grid_size=grid_size)
  values = jnp.broadcast_to(jnp.array([0.0, 1.0]), (streams, 2))
  eps = jnp.asarray(EPS)

  def body(carry, j):
    state, done, counts = carry
    ones = _binomial(jax.random.fold_in(key, j), chunk, mu)
    weights = jnp.stack([chunk - ones, ones], axis=-1)
    state = sq.update(state, values, weights=weights, alpha=ALPHA, active=~done)
    decision = sq.inner_product_decide(state, eps, SIGMA, COS, alpha=ALPHA, n_max=n_max,
                                       futility=futility)
    done = done | jnp.all(decision.settled, axis=-1) | (state.count >= n_max)
    counts = counts + ones
    return (state, done, counts), counts

  init = (state, jnp.zeros(streams, bool), jnp.zeros(streams, jnp.float32))
  (state, _, _), counts = jax.lax.scan(body, init, jnp.arange(n_max // chunk))
  decision = sq.inner_product_decide(state, eps, SIGMA, COS, alpha=ALPHA, n_max=n_max)
  return sq.upper_deficit(state), decision.certified, state.count, counts


def test_inner_product_certificates_are_sound_at_stopping_times():
  mu = _true_deficits(jax.random.PRNGKey(0), STREAMS)
  d, certified, used, counts = map(np.asarray, _run_bernoulli(
      jax.random.PRNGKey(1), jnp.asarray(mu), n_max=N_MAX, chunk=CHUNK, grid_size=GRID))
  failures = int(np.sum(d < mu))  # the deficit bound below the truth: B(eps) overstated
  wrong = np.any(certified & (_thresholds()[None] < mu[:, None]), axis=-1)
  assert np.all(wrong <= (d < mu))
  assert stats.binomtest(failures, STREAMS, ALPHA, alternative="greater").pvalue > 1e-3, failures
  # The rule stops early where it can (half the images sit just above a threshold).
  assert np.mean(used < N_MAX) > 0.15
  assert np.mean(np.any(certified, -1)) > 0.3
  # The same test rejects a naive rule: a fixed-n Clopper-Pearson bound at level alpha,
  # looked at after every chunk (stopping when it first certifies below the truth).
  n = CHUNK * np.arange(1, counts.shape[0] + 1)[:, None]
  naive = stats.beta.ppf(1 - ALPHA, counts + 1, n - counts)  # upper bound on the deficit
  naive_failures = int(np.sum(np.any(naive < mu[None], axis=0)))
  assert stats.binomtest(naive_failures, STREAMS, ALPHA,
                         alternative="greater").pvalue < 1e-6, naive_failures


def test_predictive_futility_saves_samples_and_rarely_gives_up_what_n_max_certifies():
  """The same streams under both futility rules (the draws do not depend on stopping).

  Giving up never certifies, and the predictive rule stops no later than the confident
  one, so what it certifies is a subset of what the confident rule certifies (a prefix of
  the same stream). It should lose few of those (the confident rule runs to n_max on the
  images a run to n_max might certify) and save samples on the images near a threshold.
  """
  mu = jnp.asarray(_true_deficits(jax.random.PRNGKey(2), 4000))
  runs = {f: [np.asarray(a) for a in _run_bernoulli(
      jax.random.PRNGKey(3), mu, n_max=N_MAX, chunk=CHUNK, grid_size=GRID, futility=f)]
      for f in sq.FUTILITY}
  _, confident, used_c, _ = runs["confident"]
  _, predictive, used_p, _ = runs["predictive"]
  assert np.all(used_p <= used_c)
  assert np.all(predictive <= confident)
  lost = int(np.sum(confident & ~predictive))
  assert lost <= 0.02 * np.sum(confident), (lost, int(np.sum(confident)))
  assert used_p.mean() <= 0.85 * used_c.mean(), (used_p.mean(), used_c.mean())


def test_predicted_out_of_reach_matches_numpy():
  """The rule against its formula in float64: optimistic mean plus the smallest width
  against the largest grid cell at or below the threshold."""
  rng = np.random.default_rng(0)
  values = rng.beta(2, 30, (3, 256)).astype(np.float32)
  state = sq.init(jnp.full(3, 0.05), jnp.full(3, 0.002), grid_size=GRID)
  state = sq.update(state, jnp.asarray(values), alpha=ALPHA)
  thresholds = np.array([[0.02, 0.06, 0.08]] * 3, np.float32)
  got = np.asarray(sq.predicted_out_of_reach(state, jnp.asarray(thresholds), level=ALPHA,
                                             n_max=4000))
  v = values.astype(np.float64)
  w = 256 + sq.PRIOR_WEIGHT
  mean = 0.05 + np.sum(v - 0.05, -1) / w
  var = (sq.PRIOR_WEIGHT * 0.002 + np.sum((v - mean[:, None]) ** 2, -1)) / w
  edge = (mean - sq.FUTILITY_Z * np.sqrt(var / w)
          + np.sqrt(2 * var * np.log(1 / ALPHA) / 4000))
  cells = np.asarray(sq.grid(GRID), np.float64)
  below = np.array([[cells[cells <= t].max() for t in row] for row in thresholds])
  np.testing.assert_array_equal(got, edge[:, None] > below)
  assert got.any() and not got.all()
  # Too few samples: never predicted.
  few = sq.update(sq.init(jnp.full(3, 0.05), jnp.full(3, 0.002), grid_size=GRID),
                  jnp.asarray(values[:, :64]), alpha=ALPHA)
  assert not np.any(np.asarray(sq.predicted_out_of_reach(
      few, jnp.asarray(thresholds), level=ALPHA, n_max=4000)))


# The 2-D model: s_i = sign(x_i - b_i) (orthogonal unit normals), f = (s_1, s_2) / sqrt(2).
OFFSET = np.array([0.2, -0.1])
POINTS = np.array([[a, b] for a in (0.35, 0.5, 0.7, 0.9) for b in (0.1, 0.3, 0.5, 0.8, 1.0)])


def _smoothed(x):
  return (2.0 * sp_norm.cdf((x - OFFSET) / SIGMA) - 1.0) / np.sqrt(2.0)


def _worst_cosines(x0, u):
  """Brute-force ``min cos(f_s(x'), u)`` over the eps-disk, for each eps of EPS."""
  out = []
  for eps in EPS:
    r = eps * np.sqrt(np.linspace(0.0, 1.0, 40))[:, None]
    a = np.linspace(0.0, 2 * np.pi, 360, endpoint=False)[None, :]
    pts = x0 + np.stack([r * np.cos(a), r * np.sin(a)], -1).reshape(-1, 2)
    f = _smoothed(pts)
    out.append(np.min(f @ u / np.linalg.norm(f, axis=-1)))
  return np.array(out)


@functools.partial(jax.jit, static_argnames=("n_max", "chunk", "grid_size"))
def _run_two_dim(key, q, u, *, n_max, chunk, grid_size):
  """Sequential norm-aware certificates; ``q [R, 2]`` = P(s_i = +1), ``u [R, 2]`` fixed unit."""
  streams = q.shape[0]
  signs = jnp.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
  sample_deficit = 0.5 * (1.0 - (u @ signs.T) / jnp.sqrt(2.0))  # [R, 4]
  pair_value = jnp.broadcast_to(jnp.array([0.0, 0.5, 1.0]), (streams, 3))
  eps = jnp.asarray(EPS)

  def draw(k, m):
    s = jnp.where(jax.random.uniform(k, (streams, m, 2)) < q[:, None, :], 1.0, -1.0)
    return s

  def category_counts(s):
    c = (s[..., 0] > 0) * 2 + (s[..., 1] > 0)  # index into signs
    return jnp.sum(jax.nn.one_hot(c, 4), axis=1)

  k0, key = jax.random.split(key)
  s0 = draw(k0, N0)  # stage 1: the priors (independent of stage 2)
  w0 = category_counts(s0)
  m0 = jnp.sum(w0 * sample_deficit, -1) / N0
  v0 = jnp.sum(w0 * (sample_deficit - m0[:, None])**2, -1) / N0
  state = sq.init(m0, v0, grid_size=grid_size)
  pm0 = 0.5 * (1.0 + jnp.sum(jnp.mean(s0, 1)**2, -1) / 2.0)
  pair_state = sq.init(pm0, jnp.full_like(pm0, 0.05), grid_size=grid_size)

  def body(carry, j):
    state, pair_state, done = carry
    s = draw(jax.random.fold_in(key, j), chunk)
    agree = jnp.sum(s[:, 0::2] * s[:, 1::2], -1)  # s1a s1b + s2a s2b in {-2, 0, 2}
    pair_w = jnp.sum(jax.nn.one_hot((agree / 2 + 1).astype(jnp.int32), 3), axis=1)
    state = sq.update(state, sample_deficit, weights=category_counts(s), alpha=ALPHA / 2,
                      active=~done)
    pair_state = sq.update(pair_state, pair_value, weights=pair_w, alpha=ALPHA / 2,
                           active=~done)
    decision = sq.norm_aware_decide(state, pair_state, eps, SIGMA, COS, alpha=ALPHA,
                                    n_max=n_max)
    done = done | jnp.all(decision.settled, axis=-1) | (state.count >= n_max)
    return (state, pair_state, done), None

  init = (state, pair_state, jnp.zeros(streams, bool))
  (state, pair_state, _), _ = jax.lax.scan(body, init, jnp.arange(n_max // chunk))
  d = sq.upper_deficit(state)
  n_upper = _norm.norm_upper_from_pair_deficit(sq.upper_deficit(pair_state))
  cos = _norm.norm_aware_cosine_bound(d[:, None], n_upper[:, None], eps[None], SIGMA)
  return d, n_upper, cos, state.count


def test_norm_aware_certificates_are_sound_at_stopping_times():
  per_point = STREAMS // len(POINTS)
  fs = _smoothed(POINTS)
  n_true = np.linalg.norm(fs, axis=-1)
  u = fs / n_true[:, None]
  worst = np.stack([_worst_cosines(x0, v) for x0, v in zip(POINTS, u)])  # [P, E]
  mu = 0.5 * (1.0 - n_true)  # true mean deficit of h_u with u the exact mean direction
  q = sp_norm.cdf((POINTS - OFFSET) / SIGMA)
  rep = lambda a: np.repeat(a, per_point, axis=0)  # noqa: E731
  d, n_upper, cos, used = map(np.asarray, _run_two_dim(
      jax.random.PRNGKey(2), jnp.asarray(rep(q), jnp.float32), jnp.asarray(rep(u), jnp.float32),
      n_max=N_MAX, chunk=CHUNK, grid_size=GRID))
  total = per_point * len(POINTS)
  assert total >= 10_000
  # Certificate-level: a certified cosine above the brute-force worst case.
  cert_fail = np.any(cos > rep(worst) + 1e-5, axis=-1)
  # Component level (what the union bound spends alpha on): either bound wrong.
  comp_fail = (d < rep(mu) * (1 - 1e-6)) | (n_upper < rep(n_true) * (1 - 1e-6))
  for failures in (int(cert_fail.sum()), int(comp_fail.sum())):
    assert stats.binomtest(failures, total, ALPHA, alternative="greater").pvalue > 1e-3
  # It certifies something and stops early on the easy images.
  assert np.mean(np.any(cos >= COS, -1)) > 0.3
  assert np.mean(used < N_MAX) > 0.15
  # The norm pays: somewhere the certified cosine beats Theorem 3.2's B alone.
  plain = np.where(d[:, None] <= 1, 2 * sp_norm.cdf(sp_norm.ppf(1 - d)[:, None] - EPS / SIGMA)
                   - 1, -1)
  assert np.max(cos - plain) > 0.01


def test_grid_and_thresholds_match_closed_forms():
  d = np.asarray(sq.grid(64))
  np.testing.assert_allclose(d, sp_norm.cdf(-np.linspace(-6, 6, 64)), rtol=1e-5, atol=1e-9)
  got = np.asarray(sq.deficit_threshold(EPS, SIGMA, COS))
  want = sp_norm.cdf(-(sp_norm.ppf((1 + COS) / 2) + EPS / SIGMA))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # B at the threshold is exactly the level.
  b = 2 * sp_norm.cdf(sp_norm.ppf(1 - want) - EPS / SIGMA) - 1
  np.testing.assert_allclose(b, COS, atol=1e-5)


def test_wealth_matches_a_float64_oracle():
  """The state's wealth against a direct product with the same predictable bets."""
  rng = np.random.default_rng(0)
  values = rng.beta(1, 30, size=(3, 5, 20)).astype(np.float32)  # 5 chunks of 20
  state = sq.init(jnp.full((3,), 0.05), jnp.full((3,), 0.002), grid_size=32)
  log_k = np.zeros((3, 2, len(sq.BET_SCALES), 32))
  d = np.asarray(sq.grid(32), np.float64)
  update = jax.jit(functools.partial(sq.update, alpha=ALPHA))
  for j in range(5):
    lam = np.asarray(sq.bets(state), np.float64)  # fixed before the chunk is seen
    v = values[:, j].astype(np.float64)
    for side, side_values in enumerate((v, 1.0 - v)):
      log_k[:, side] += np.sum(np.log1p(lam[:, side, None] * (
          d - side_values[:, :, None, None])), axis=1)
    state = update(state, jnp.asarray(values[:, j]))
  np.testing.assert_allclose(np.asarray(state.log_wealth), log_k, rtol=1e-4, atol=2e-4)
  mix = np.log(np.mean(np.exp(log_k), axis=2))  # [3, 2, G]
  rejected = np.asarray(state.rejected)
  assert np.all(rejected >= (mix >= math.log(1 / ALPHA) + 1e-3))
  # The bounds are the last cell of the leading run of rejected cells.
  lead = np.cumprod(rejected, axis=-1).sum(-1)  # [3, 2]
  want = np.where(lead > 0, d[np.maximum(lead - 1, 0)], 1.0)
  np.testing.assert_allclose(np.asarray(sq.upper_deficit(state)), want[:, 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sq.lower_deficit(state)), 1.0 - want[:, 1], atol=1e-6)
  mean = values.reshape(3, -1).mean(-1)
  assert np.all(want[:, 0] >= mean) and np.all(1.0 - want[:, 1] <= mean)


def test_bets_are_predictable_and_capped():
  state = sq.init(jnp.array([0.01, 0.3]), jnp.array([1e-4, 0.05]), grid_size=64)
  lam = np.asarray(sq.bets(state))  # [2, 2, S, G]
  d = np.asarray(sq.grid(64))
  assert np.all(lam >= 0) and np.all(lam * (1 - d) <= sq.CAP + 1e-6)
  # Cells whose null is the likely truth are not bet on.
  mean = np.asarray(sq.estimates(state)[0])
  for i in range(2):
    assert np.all(lam[i, 0][:, d < mean[i]] == 0)
    assert np.all(lam[i, 1][:, d < 1 - mean[i]] == 0)
    assert np.any(lam[i, 0] > 0) and np.any(lam[i, 1] > 0)


def test_unreachable_is_a_proof():
  """A decision reported unreachable is not reached even by all-zero deficits."""
  state = sq.init(jnp.array([0.5]), jnp.array([0.01]), grid_size=64)
  thresholds = jnp.array([[1e-4, 1e-2, 0.2]])
  n_max = 300
  flags = np.asarray(sq.unreachable(state, thresholds, alpha=ALPHA, n_max=n_max))[0]
  update = jax.jit(functools.partial(sq.update, alpha=ALPHA))
  for _ in range(n_max // 50):
    state = update(state, jnp.zeros((1, 50)))
  reached = np.asarray(sq.upper_deficit(state))[0] <= np.asarray(thresholds)[0]
  assert not np.any(flags & reached)
  assert flags[0]  # 1e-4 in 300 samples: beyond even the ceiling alpha^(1/n)


# --- The engine on encoders -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _HalfSpace1D(encoders.Encoder):
  """f(x) = sign(x[0, 0, 0] - 0.5) e_1 (3-D features): the exact-truth encoder on images."""

  def tokens(self, params, x, *, sigma=None):
    s = jnp.sign(x[:, 0, 0, 0] - 0.5)
    return jnp.stack([s, jnp.zeros_like(s), jnp.zeros_like(s)], -1)[:, None, :]


def _half_space_images(reds):
  x = np.full((len(reds), 2, 2, 3), 0.5, np.float32)
  x[:, 0, 0, 0] = reds
  return x


def test_engine_is_sound_on_the_half_space_encoder_and_stops_early():
  reds = np.array([0.95, 0.9, 0.8, 0.7, 0.62, 0.55, 1.0, 0.85])
  x = _half_space_images(reds)
  eps = [0.05, 0.1, 0.2]
  cert = sq.sequential_fcsb({}, x, encoder=_HalfSpace1D(resolution=2), sigma=SIGMA, eps=eps,
                            key=jax.random.PRNGKey(0), n_max=4000, n0=64, chunk_size=64,
                            slots=3, alpha=0.01, norm_aware=False, reference="clean",
                            grid_size=GRID)
  p = sp_norm.cdf((reds - 0.5) / SIGMA)  # exact h_u with u = f(x) = e_1: P(sign = +1)
  assert np.all(np.asarray(cert.deficit) >= 1 - p)  # the anytime bound holds
  true_b = 2 * sp_norm.cdf((reds[:, None] - 0.5 - np.asarray(eps)[None]) / SIGMA) - 1
  assert np.all(np.asarray(cert.inner_product_bound) <= true_b + 1e-6)
  assert np.all(np.asarray(cert.certified) <= (true_b >= COS))
  used = np.asarray(cert.samples)
  assert np.all(used >= 64 + 64) and np.all(used <= 4000 + 64)
  assert np.min(used) < 1000 and np.any(np.asarray(cert.certified))


def test_engine_results_do_not_depend_on_slot_order(toy):
  encoder, params = toy
  x = np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 3)).astype(np.float32)
  kw = dict(encoder=encoder, sigma=SIGMA, eps=[0.125, 0.25], key=jax.random.PRNGKey(3),
            n_max=1024, n0=64, chunk_size=64, alpha=0.01, slots=2, grid_size=GRID)
  a = sq.sequential_fcsb(params, x, **kw)
  order = np.array([3, 0, 4, 1, 2])
  drawn = []
  # Another order and another grouping of steps into device calls: the same bits.
  b = sq.sequential_fcsb(params, x[order], image_ids=order, progress=drawn.append,
                         steps_per_call=3, **kw)
  assert drawn and all(d % (2 * 64) == 0 and d <= 3 * 2 * 64 for d in drawn)
  assert sum(drawn) >= int(np.sum(b.samples))
  inverse = np.argsort(order)
  for name in ("deficit", "norm_upper", "direction", "samples", "cosine_bound", "radius"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)),
                                  np.asarray(getattr(b, name))[inverse], err_msg=name)
  # Norm-aware: the norm bound is a real bound (<= 1) and the cosine beats B where B >= 0.
  assert np.all(np.asarray(a.norm_upper) <= 1.0)
  inner = np.asarray(a.inner_product_bound)
  assert np.all(np.asarray(a.cosine_bound)[inner >= 0] >= inner[inner >= 0] - 1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop="sometimes"), "stop"),
    (dict(chunk_size=63), "even"),
    (dict(eps=[]), "eps"),
    (dict(cos=1.0), "cos"),
    (dict(image_ids=[0, 0]), "image_ids"),
    (dict(n_max=1), "n_max"),
    (dict(bets="kelly"), "bets"),
    (dict(futility="never"), "futility"),
    (dict(progress=True), "progress"),
    (dict(steps_per_call=0), "steps_per_call"),
])
def test_engine_rejects_bad_arguments(toy, kwargs, match):
  encoder, params = toy
  args = dict(encoder=encoder, sigma=SIGMA, eps=[0.1], key=jax.random.PRNGKey(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sq.sequential_fcsb(params, np.zeros((2, 8, 8, 3), np.float32), **args)


def test_engine_fixed_n_and_radius_stops():
  reds = np.array([0.95, 0.8, 0.6, 1.0])
  x = _half_space_images(reds)
  kw = dict(encoder=_HalfSpace1D(resolution=2), sigma=SIGMA, eps=[0.1],
            key=jax.random.PRNGKey(1), n_max=1024, n0=64, chunk_size=128, slots=2,
            alpha=0.01, norm_aware=False, reference="clean", grid_size=GRID)
  fixed = sq.sequential_fcsb({}, x, stop="never", **kw)
  star = sq.sequential_fcsb({}, x, stop="never", bets="star", **kw)
  # The radius rule, here with the decisions' (stop="radius" alone is the same rule without
  # them): stops no earlier than the decisions alone, and keeps every decision they
  # certified (a rejected cell stays rejected).
  decision = sq.sequential_fcsb({}, x, stop="decision", **kw)
  radius = sq.sequential_fcsb({}, x, stop="decision_and_radius", tolerance=0.05, **kw)
  assert np.all(np.asarray(radius.samples) >= np.asarray(decision.samples))
  assert np.all(np.asarray(radius.certified) >= np.asarray(decision.certified))
  np.testing.assert_array_equal(np.asarray(fixed.samples), 64 + 1024)
  np.testing.assert_array_equal(np.asarray(star.samples), 64 + 1024)
  assert np.all(np.asarray(radius.samples) <= 64 + 1024)
  p = sp_norm.cdf((reds - 0.5) / SIGMA)
  exact_radius = np.maximum(SIGMA * (sp_norm.ppf(p) - sp_norm.ppf(0.75)), 0)
  for cert in (fixed, star, radius):
    assert np.all(np.asarray(cert.deficit) >= 1 - p)
    assert np.all(np.asarray(cert.radius) <= exact_radius + 1e-6)


# --- STaR-Bets: the fixed-horizon rule (benchmarks/bound_limit.py measures its width) -----


def test_star_bets_match_a_float64_oracle():
  """STaR's wealth against a direct float64 product with bets from its formula."""
  rng = np.random.default_rng(1)
  horizon, alpha, size = 100, 0.05, 32
  values = rng.beta(1, 20, size=(3, 5, 20))  # 5 chunks of 20
  center, prior_var = 0.05, 0.002
  state = sq.init(jnp.full((3,), center), jnp.full((3,), prior_var), grid_size=size,
                  scales=(1.0,))
  d = np.asarray(sq.grid(size), np.float64)
  log_k = np.zeros((3, 2, 1, size))
  total = np.zeros(3)
  total_sq = np.zeros(3)
  update = jax.jit(functools.partial(sq.update, alpha=alpha, rule="star", horizon=horizon))
  for j in range(5):
    t = 20.0 * j
    w = t + sq.PRIOR_WEIGHT
    shift = total / w
    mean = center + shift
    var = np.maximum((sq.PRIOR_WEIGHT * prior_var + total_sq - 2 * shift * total
                      + t * shift**2) / w, 1e-10)
    v = values[:, j]
    for side, (side_mean, side_values) in enumerate(((mean, v), (1 - mean, 1 - v))):
      g = d - side_mean[:, None]
      second = np.minimum(var[:, None] + g * g, d * (1 - d)) + 1e-10
      need = np.maximum(math.log(1 / alpha) - log_k[:, side, 0], 0.0)
      with np.errstate(divide="ignore"):  # d = 1 in float32: no cap there (as in jax)
        cap = sq.CAP / (1 - d)
      lam = np.clip(np.sqrt(2 * need / ((horizon - t) * second)), 0, cap)
      log_k[:, side, 0] += np.sum(np.log1p(lam[:, None] * (d - side_values[:, :, None])), 1)
    total += np.sum(v - center, -1)
    total_sq += np.sum((v - center) ** 2, -1)
    state = update(state, jnp.asarray(v, jnp.float32))
  np.testing.assert_allclose(np.asarray(state.log_wealth), log_k, rtol=2e-4, atol=2e-4)
  assert np.any(np.asarray(state.rejected[:, 0]))  # the oracle is not vacuous
  with pytest.raises(ValueError, match="horizon"):
    sq.bets(state, rule="star")


@functools.partial(jax.jit, static_argnames=("n", "chunk", "rule", "alpha", "grid_size"))
def _fixed_n_bounds(key, mu, *, n, chunk, rule, alpha, grid_size):
  """Upper deficit bounds at n of the sequence with ``rule``, Bernoulli(mu) deficits ``[R]``."""
  k0, key = jax.random.split(key)
  m0 = _binomial(k0, N0, mu) / N0
  scales = (1.0,) if rule == "star" else sq.BET_SCALES
  state = sq.init(m0, m0 * (1.0 - m0), grid_size=grid_size, scales=scales)
  values = jnp.broadcast_to(jnp.array([0.0, 1.0]), mu.shape + (2,))

  def body(carry, j):
    state, ones_total = carry
    ones = _binomial(jax.random.fold_in(key, j), chunk, mu)
    state = sq.update(state, values, weights=jnp.stack([chunk - ones, ones], -1),
                      alpha=alpha, rule=rule, horizon=n)
    return (state, ones_total + ones), None
  (state, ones), _ = jax.lax.scan(body, (state, jnp.zeros_like(mu)), jnp.arange(n // chunk))
  return sq.upper_deficit(state), ones / n


def test_star_bound_covers_the_mean_and_is_tighter_at_n():
  """Monte Carlo coverage with a known mean: failures <= alpha (one-sided binomial test).

  Bernoulli deficits, the largest variance a mean allows. The plug-in mean fails the same
  test (so it can fail), and STaR is tighter at n than the anytime aGRAPA sequence.
  """
  streams, alpha, n = 2000, 0.1, 400
  mu = jnp.full((streams,), 0.1, jnp.float32)
  star, mean = _fixed_n_bounds(jax.random.PRNGKey(5), mu, n=n, chunk=20, rule="star",
                               alpha=alpha, grid_size=256)
  star, mean = np.asarray(star), np.asarray(mean)
  fails = int(np.sum(star < 0.1))
  assert stats.binom.sf(fails - 1, streams, alpha) > 1e-3, fails  # P(X >= fails)
  plug_in = int(np.sum(mean < 0.1))
  assert stats.binom.sf(plug_in - 1, streams, alpha) < 1e-6, plug_in
  agrapa, _ = _fixed_n_bounds(jax.random.PRNGKey(5), mu, n=n, chunk=20, rule="agrapa",
                              alpha=alpha, grid_size=256)
  assert np.median(star) < np.median(np.asarray(agrapa))


# --- Sequential prediction certificates (certify.sequential_predict) --------------------

# The half-space encoder's feature is s e_1, s = sign(red - 0.5). The cosine head's third
# prototype makes the margin pi / 2 (a level above 0); the linear head votes the sign.
_PROTOTYPES = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
_LINEAR = {"params": {"dense": {"kernel": np.array([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]],
                                                   np.float32),
                                "bias": np.zeros(2, np.float32)}}}


def _exact_prediction_radius(reds, method):
  """The radius each certificate gives at the *exact* scores (its own ceiling).

  h_u = P(s = sign(red - 0.5)) = Phi(|red - 0.5| / sigma) for both heads (u = +-e_1 is
  the mean direction, p_A the vote's probability); FS also pays Theorem A.3.2's level
  Phi^-1((1 + cos(Delta / 2)) / 2) at Delta = pi / 2.
  """
  z = np.abs(reds - 0.5) / SIGMA
  level = -sp_norm.ppf(np.sin(np.pi / 8) ** 2) if method == "FS" else 0.0
  return np.maximum(SIGMA * (z - level), 0.0)


@pytest.mark.parametrize("method", sq.PREDICTION_METHODS)
def test_sequential_predictions_are_sound_on_the_half_space_encoder(method):
  """10,000 certificates through the engine, each stopped at its own data-dependent time.

  A failure is a radius above what the same certificate gives at the exact scores; the
  binomial test checks failures <= alpha. Images sit at |red - 0.5| = sigma z, z uniform
  in [0, 2], so many lie just beyond a decision of the radius grid.
  """
  rng = np.random.default_rng(5)
  side = np.where(rng.uniform(size=STREAMS) < 0.75, 1.0, -1.0)
  reds = 0.5 + side * SIGMA * rng.uniform(0.0, 2.0, STREAMS)
  head = {"params": {"prototypes": _PROTOTYPES}} if method == "FS" else _LINEAR
  radii = [0.0, 0.05, 0.1, 0.2, 0.3]
  alpha = 0.01
  cert = sq.sequential_predict({}, _half_space_images(reds), encoder=_HalfSpace1D(resolution=2),
                               head=head, method=method, sigma=SIGMA, radii=radii,
                               key=jax.random.PRNGKey(11), n_max=640, n0=64, chunk_size=128,
                               slots=64, alpha=alpha, grid_size=GRID)
  exact = _exact_prediction_radius(reds, method)
  radius, cls = np.asarray(cert.radius), np.asarray(cert.predicted_class)
  failures = int(np.sum(radius > exact + 1e-5))
  assert stats.binomtest(failures, len(reds), alpha, alternative="greater").pvalue > 1e-3, (
      failures)
  truth = np.where(reds > 0.5, 0, 1)
  assert np.all((cls == truth) | (cls == -1))  # a certified class is the smoothed one
  assert np.all((radius > 0) == (cls >= 0))
  # Most images the exact scores certify with room to spare are certified.
  clear = exact > 0.1
  assert np.mean(cls[clear] >= 0) > 0.75, (np.mean(cls[clear] >= 0), np.sum(clear))
  # It stops early: images whose exact radius is far from every radius of the grid (their
  # decisions are easy) take a few chunks.
  used = np.asarray(cert.samples)
  level = -sp_norm.ppf(np.sin(np.pi / 8) ** 2) if method == "FS" else 0.0
  gaps = np.abs(np.abs(reds - 0.5)[:, None] / SIGMA - level - np.asarray(radii)[None] / SIGMA)
  far = np.min(gaps, axis=1) > 0.4  # in probits
  assert np.sum(far) > 20 and np.median(used[far]) <= 64 + 2 * 128, np.median(used[far])
  assert cert.bound == "betting (sequential)" and cert.is_certificate
  assert set(np.asarray(cert.certificate)) == {"cosine" if method == "FS" else "rs"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="XS"), "method"),
    (dict(method="RS"), "LinearHead"),
    (dict(radii=[]), "radii"),
    (dict(radii=[-0.1]), "radii"),
    (dict(head={"params": {"prototypes": _PROTOTYPES[:, :2]}}), "dimension"),
    (dict(sigma=0.0), "sigma"),
])
def test_sequential_predict_rejects_bad_arguments(kwargs, match):
  args = dict(encoder=_HalfSpace1D(resolution=2), head={"params": {"prototypes": _PROTOTYPES}},
              method="FS", sigma=SIGMA, radii=[0.1], key=jax.random.PRNGKey(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sq.sequential_predict({}, _half_space_images(np.array([0.7, 0.8])), **args)
