"""Sequential certification: an anytime-valid confidence sequence (docs/method.md section 2b).

The fixed-n bounds of :mod:`certify._bounds` spend the same n samples on every image. A
*confidence sequence* holds at every sample count at once, so an image may stop as soon as
its decision is settled, at a time that depends on its own data, and the certificate is
still valid with probability 1 - alpha.

Values are *deficits* e_i in [0, 1] (e.g. ``1 - h_u = (1 - <f(x + delta), u>) / 2``); the
sequence bounds their mean mu = E[e] from above (a deficit upper bound D is the lower
bound ``1 - D`` of the score). On the probit-uniform grid of :func:`grid` (the grid of
the fixed-n betting bound, any size), cell k is tested for ``H0: mu >= d_k`` by the wealth

    K_t(d_k) = prod_{i <= t} (1 + lambda_{k,i} (d_k - e_i)),   0 <= lambda_{k,i} (1 - d_k) <= CAP,

with *predictable* bets (lambda_{k,i} depends only on the values before sample i's chunk,
and on a prior independent of all of them). Under H0 each factor has conditional mean
<= 1, so K is a nonnegative supermartingale and Ville's inequality gives
``P(exists t: K_t >= 1/alpha) <= alpha``: a cell, once rejected, stays rejected. The
upper bound D_t is the deficit of the last cell of the leading run of rejected cells; if
mu > D_t the first cell with d_k < mu was rejected under its own null, which has
probability <= alpha *at any time*, in particular at a data-dependent stopping time.

The bets are aGRAPA (Waudby-Smith & Ramdas 2023, section 5.3): lambda = g / (v + g^2)
with g = d_k - mu_hat, the growth-rate-optimal bet if the running estimates mu_hat, v
were exact, clipped to [0, CAP / (1 - d_k)]. Estimates use the chunks already seen plus a
prior (a first stage's mean and variance, weighted as ``prior_weight`` samples).
Everything is a running sum, updated chunk by chunk, vectorised over any batch shape.

Stopping for *futility* (the decision cannot be reached by n_max) never produces a
certificate, so it cannot make one unsound; it only decides when to give up. Its rule
uses an anytime *lower* bound on mu from the mirrored sequence (the same test on the
values ``1 - e_i``, side 1 of the state; :func:`lower_deficit`), or a proof that no data
could reach the decision by n_max (:func:`unreachable`).

References:
  Waudby-Smith & Ramdas 2023, https://arxiv.org/abs/2010.09686 (betting confidence
  sequences, aGRAPA); Voracek 2024, https://arxiv.org/abs/2406.17830 (sequential
  certification in randomized smoothing); Ville 1939.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from certify import _norm

GRID = 1024
GRID_Z = 6.0
CAP = 0.9
# The aGRAPA bet is scaled by each of these; the wealths are averaged (a mixture of test
# supermartingales is one). aGRAPA's second-order bet overshoots the Kelly bet for skewed
# values (a Bernoulli deficit of 1% tested at 2%: aGRAPA bets 1.0, Kelly 0.51, and the
# full bet *loses* wealth), so the smaller scales carry the growth there.
BET_SCALES = (1.0, 0.5, 0.25)
# Weight of the prior in the running estimates that size the bets, in samples.
PRIOR_WEIGHT = 20.0
_MIN_VARIANCE = 1e-10


def grid(size: int = GRID) -> jax.Array:
  """Cell deficits ``d_k = Phi(-z_k)``, z_k uniform in [-6, 6], ``[size]``, decreasing.

  The same grid as the fixed-n betting bound (``certify._bounds.betting_grid``), so a
  sequential and a fixed-n certificate differ only by how they bet.
  """
  z = jnp.linspace(-GRID_Z, GRID_Z, size, dtype=jnp.float32)
  return norm.cdf(-z)


class SequenceState(NamedTuple):
  """Running state of the confidence sequences of a batch ``[...]`` (any shape).

  Attributes:
    count: ``[...]`` values seen.
    steps: ``[...]`` chunks seen.
    center: ``[...]`` prior mean (fixed; the sums are centred on it for float32 precision).
    prior_variance: ``[...]`` prior variance (fixed).
    total: ``[...]`` sum of ``e - center``.
    total_sq: ``[...]`` sum of ``(e - center)^2``.
    log_wealth: ``[..., 2, len(BET_SCALES), G]`` log K_t of every side, bet and grid
      cell; side 0 tests the values e (the upper bound, the certificate), side 1 the
      values 1 - e (the lower bound, only ever used to give up).
    rejected: ``[..., 2, G]`` bool, cell ever reached ``log(1/alpha)``.
  """
  count: jax.Array
  steps: jax.Array
  center: jax.Array
  prior_variance: jax.Array
  total: jax.Array
  total_sq: jax.Array
  log_wealth: jax.Array
  rejected: jax.Array


def init(center: jax.typing.ArrayLike, variance: jax.typing.ArrayLike, *,
         grid_size: int = GRID) -> SequenceState:
  """A fresh state from a prior mean and variance ``[...]`` of the deficits.

  The prior must not depend on the values the sequence will see (e.g. it comes from a
  first stage of other samples); any prior keeps the sequence valid, a good one tightens it.
  """
  center = jnp.clip(jnp.asarray(center, jnp.float32), 0.0, 1.0)
  variance = jnp.broadcast_to(jnp.asarray(variance, jnp.float32), center.shape)
  zeros = jnp.zeros(center.shape, jnp.float32)
  return SequenceState(count=zeros, steps=zeros, center=center, prior_variance=variance,
                       total=zeros, total_sq=zeros,
                       log_wealth=jnp.zeros(center.shape + (2, len(BET_SCALES), grid_size),
                                            jnp.float32),
                       rejected=jnp.zeros(center.shape + (2, grid_size), bool))


def estimates(state: SequenceState) -> tuple[jax.Array, jax.Array]:
  """Running mean and variance of the deficits, shrunk to the prior (``[...]`` each)."""
  n = state.count
  w = n + PRIOR_WEIGHT
  shift = state.total / w  # mean - center, shrunk
  mean = state.center + shift
  # Sum of squares about the shrunk mean, plus the prior's pseudo-samples.
  ss = state.total_sq - 2.0 * shift * state.total + n * shift**2
  var = (PRIOR_WEIGHT * state.prior_variance + jnp.maximum(ss, 0.0)) / w
  return mean, jnp.maximum(var, _MIN_VARIANCE)


def bets(state: SequenceState) -> jax.Array:
  """Bets ``[..., 2, len(BET_SCALES), G]`` for the next chunk, from the state *before* it.

  Predictable: they depend on earlier chunks and the prior only. Side 1 bets on the
  values 1 - e, whose mean is 1 - mu.
  """
  d = grid(state.log_wealth.shape[-1])
  mean, var = estimates(state)
  side_mean = jnp.stack([mean, 1.0 - mean], axis=-1)  # [..., 2]
  g = d - side_mean[..., None]
  lam = g / (var[..., None, None] + g * g)  # aGRAPA
  lam = lam[..., None, :] * jnp.asarray(BET_SCALES, jnp.float32)[:, None]
  return jnp.clip(lam, 0.0, CAP / (1.0 - d))


def update(state: SequenceState, values: jax.Array, *, alpha: float,
           weights: jax.Array | None = None,
           active: jax.Array | None = None) -> SequenceState:
  """Adds one chunk of deficits ``values [..., k]`` in [0, 1] to the state.

  Args:
    state: the state before the chunk.
    values: ``[..., k]`` deficits of the chunk's samples (independent of the bets).
    alpha: level of the sequence (static float).
    weights: optional ``[..., k]`` multiplicities (non-negative integers as floats):
      value i stands for ``weights[i]`` samples; 0 drops a sample (e.g. past n_max in a
      last chunk). None: one sample each.
    active: optional ``[...]`` bool; where False the state is left unchanged (empty
      slots of the dynamic batch, images already stopped).

  Returns:
    The new state.
  """
  d = grid(state.log_wealth.shape[-1])
  lam = bets(state)
  values = jnp.asarray(values, jnp.float32)
  w = jnp.ones_like(values) if weights is None else jnp.asarray(weights, jnp.float32)
  values = jnp.where(w > 0, values, 0.0)  # a dropped sample may hold anything (even NaN)
  # log1p(lambda (d_k - e)): d_k - e is a difference of deficits, exact near 0 in float32
  # (side 0, the certificate). Side 1's 1 - e only decides when to give up.
  sides = jnp.stack([values, 1.0 - values], axis=-2)  # [..., 2, k]
  gap = d - sides[..., None]  # [..., 2, k, G]
  log_factor = jnp.sum(w[..., None, :, None, None]
                       * jnp.log1p(lam[..., :, None, :, :] * gap[..., :, :, None, :]), axis=-3)
  log_wealth = state.log_wealth + log_factor
  mixture = jax.nn.logsumexp(log_wealth, axis=-2) - math.log(len(BET_SCALES))
  rejected = state.rejected | (mixture >= math.log(1.0 / alpha))
  dev = values - state.center[..., None]
  new = SequenceState(count=state.count + jnp.sum(w, -1), steps=state.steps + 1.0,
                      center=state.center, prior_variance=state.prior_variance,
                      total=state.total + jnp.sum(w * dev, -1),
                      total_sq=state.total_sq + jnp.sum(w * dev * dev, -1),
                      log_wealth=log_wealth, rejected=rejected)
  if active is None:
    return new
  return jax.tree.map(lambda a, b: jnp.where(
      jnp.reshape(active, active.shape + (1,) * (a.ndim - active.ndim)), a, b), new, state)


def _leading_bound(rejected: jax.Array) -> jax.Array:
  d = grid(rejected.shape[-1])
  leading = jnp.cumprod(rejected.astype(jnp.int32), axis=-1)
  count = jnp.sum(leading, axis=-1)
  return jnp.where(count > 0, d[jnp.maximum(count - 1, 0)], 1.0)


def upper_deficit(state: SequenceState) -> jax.Array:
  """Anytime upper bound D on the mean deficit ``[...]`` (1 if nothing is rejected yet).

  ``1 - D`` is the lower confidence bound of the score, valid at every time at once.
  """
  return _leading_bound(state.rejected[..., 0, :])


def lower_deficit(state: SequenceState) -> jax.Array:
  """Anytime lower bound on the mean deficit ``[...]`` (side 1; 0 if nothing rejected).

  Valid at the sequence's level like :func:`upper_deficit`, but used only to give up
  (float32 rounds ``1 - e`` near 1, which a futility rule may ignore, a certificate not).
  """
  return jnp.clip(1.0 - _leading_bound(state.rejected[..., 1, :]), 0.0, 1.0)


def unreachable(state: SequenceState, thresholds: jax.Array, *, alpha: float,
                n_max: int) -> jax.Array:
  """Whether ``D_t <= threshold`` is out of reach by n_max whatever the data ``[..., E]``.

  Certifying at a threshold tau needs the cell k* (the last with d_k >= tau) rejected.
  A sample can multiply a wealth at cell k by at most ``1 + CAP d_k / (1 - d_k)`` (its
  value 0 with the largest bet allowed), so if even ``n_max - count`` such samples cannot
  lift the mixture to 1/alpha, no data can certify: a proof, no statistics involved.
  """
  d = grid(state.log_wealth.shape[-1])
  thresholds = jnp.asarray(thresholds, jnp.float32)
  thresholds = jnp.broadcast_to(thresholds, state.count.shape + thresholds.shape[-1:])
  mixture = jax.nn.logsumexp(state.log_wealth[..., 0, :, :], axis=-2) - math.log(
      len(BET_SCALES))
  # k* for each threshold: cells are decreasing, so count the cells with d_k >= tau.
  k = jnp.sum(d >= thresholds[..., None], axis=-1) - 1  # [..., E]
  kc = jnp.maximum(k, 0)
  wealth = jnp.take_along_axis(mixture, kc, axis=-1)
  done = jnp.take_along_axis(state.rejected[..., 0, :], kc, axis=-1)
  dk = d[kc]
  best = wealth + (n_max - state.count[..., None]) * jnp.log1p(CAP * dk / (1.0 - dk))
  return (k < 0) | (~done & (best < math.log(1.0 / alpha)))


class Decision(NamedTuple):
  """Status of a decision ``mean deficit <= threshold`` (certify when true)."""
  certified: jax.Array  # the anytime upper bound is at or below the threshold
  futile: jax.Array     # given up: the threshold is out of reach by n_max
  settled: jax.Array    # certified | futile


def decide(state: SequenceState, thresholds: jax.Array, *, alpha: float,
           n_max: int) -> Decision:
  """Decisions ``D_t <= threshold`` for thresholds ``[..., E]`` (deficits).

  Futile: :func:`unreachable` (a proof), or the mean is bounded above the threshold by
  :func:`lower_deficit`, i.e. the decision is false and no valid method would certify it
  but with probability about alpha. Futility trades samples against agreement with a
  fixed-n run and has no effect on soundness (it never certifies).
  """
  upper = upper_deficit(state)[..., None]
  certified = upper <= thresholds
  low = lower_deficit(state)[..., None]
  futile = ~certified & ((low > thresholds)
                         | unreachable(state, thresholds, alpha=alpha, n_max=n_max))
  return Decision(certified, futile, certified | futile)


def deficit_threshold(eps: jax.typing.ArrayLike, sigma, level: jax.typing.ArrayLike) -> jax.Array:
  """The largest deficit bound D with ``2 Phi(Phi^-1(1 - D) - eps / sigma) - 1 >= level``.

  ``D = Phi(-(Phi^-1((1 + level) / 2) + eps / sigma))``: Theorem 3.2's bound B(eps) is at
  least ``level`` iff the deficit upper bound is at most this. The inner-product decision
  "cos >= c at eps" is ``level = c``; the norm-aware one (docs/method.md section 2c) is
  ``level = c U(eps)``. Broadcasts; ``level`` in [0, 1).
  """
  z = -jax.scipy.special.ndtri((1.0 - jnp.asarray(level, jnp.float32)) / 2.0)
  return norm.cdf(-(z + jnp.asarray(eps, jnp.float32) / sigma))


def inner_product_decide(state: SequenceState, eps: jax.Array, sigma, cos: float, *,
                         alpha: float, n_max: int) -> Decision:
  """Decisions "cos(f_s(x'), u) >= cos for every ||x' - x|| <= eps" ``[..., E]``, Theorem 3.2.

  ``state`` bounds the deficits ``1 - h_u`` at level ``alpha``.
  """
  return decide(state, deficit_threshold(eps, sigma, cos), alpha=alpha, n_max=n_max)


def norm_aware_decide(state: SequenceState, pair_state: SequenceState, eps: jax.Array,
                      sigma, cos: float, *, alpha: float, n_max: int) -> Decision:
  """The same decisions with the norm-aware certificate B / U (docs/method.md section 2c).

  ``state`` bounds the deficits ``1 - h_u`` and ``pair_state`` the pair values
  ``(1 + <f_a, f_b>) / 2`` (mean ``(1 + ||f_s(x)||^2) / 2``), each at level ``alpha / 2``
  (the union bound). Certified where ``D <= threshold(c U(eps))`` with U from the norm's
  upper bound. Given up where even the smallest norm the data allow (``||f_s|| >= <f_s, u>
  >= 1 - 2 D``) leaves the deficit provably above its threshold, or out of reach.
  """
  d = upper_deficit(state)[..., None]
  n_upper = _norm.norm_upper_from_pair_deficit(upper_deficit(pair_state))[..., None]
  u = _norm.norm_bound(n_upper, eps, sigma)
  certified = d <= deficit_threshold(eps, sigma, cos * u)
  n_low = jnp.clip(1.0 - 2.0 * d, 0.0, 1.0)
  best = deficit_threshold(eps, sigma, cos * _norm.norm_bound(n_low, eps, sigma))
  low = lower_deficit(state)[..., None]
  futile = ~certified & ((low > best) | unreachable(state, best, alpha=alpha / 2, n_max=n_max))
  return Decision(certified, futile, certified | futile)
