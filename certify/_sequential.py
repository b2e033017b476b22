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

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from certify import _bounds
from certify import _norm
from certify import _prediction
from certify import _smoothed_prediction
from fsjax import checks
from fsjax import cpu
from fsjax import encoders as encoders_lib
from fsjax import heads as heads_lib

GRID = 1024
GRID_Z = 6.0
CAP = 0.9
# The aGRAPA bet is scaled by each of these; the wealths are averaged (a mixture of test
# supermartingales is one). aGRAPA's second-order bet overshoots the Kelly bet for skewed
# values (a Bernoulli deficit of 1% tested at 2%: aGRAPA bets 1.0, Kelly 0.51, and the
# full bet *loses* wealth), so the smaller scales carry the growth there.
BET_SCALES = (1.0, 0.5, 0.25)
# Bet rules of :func:`bets`: aGRAPA for stopping early, STaR-Bets for a fixed horizon.
BET_RULES = ("agrapa", "star")
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
    scales: ``[..., S]`` the bet scales (:data:`BET_SCALES` by default; fixed).
    log_wealth: ``[..., 2, S, G]`` log K_t of every side, bet scale and grid
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
  scales: jax.Array
  log_wealth: jax.Array
  rejected: jax.Array


def init(center: jax.typing.ArrayLike, variance: jax.typing.ArrayLike, *,
         grid_size: int = GRID, scales: Sequence[float] = BET_SCALES) -> SequenceState:
  """A fresh state from a prior mean and variance ``[...]`` of the deficits.

  The prior must not depend on the values the sequence will see (e.g. it comes from a
  first stage of other samples); any prior keeps the sequence valid, a good one tightens it.
  ``scales``: the aGRAPA bet is multiplied by each and the wealths averaged (any positive
  scales keep it valid; fewer cost less of alpha, ``log(len(scales))`` of log-wealth).
  """
  center = jnp.clip(jnp.asarray(center, jnp.float32), 0.0, 1.0)
  variance = jnp.broadcast_to(jnp.asarray(variance, jnp.float32), center.shape)
  zeros = jnp.zeros(center.shape, jnp.float32)
  scales = jnp.broadcast_to(jnp.asarray(scales, jnp.float32), center.shape + (len(scales),))
  return SequenceState(count=zeros, steps=zeros, center=center, prior_variance=variance,
                       total=zeros, total_sq=zeros, scales=scales,
                       log_wealth=jnp.zeros(center.shape + (2, scales.shape[-1], grid_size),
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


def bets(state: SequenceState, *, rule: str = "agrapa", alpha: float | None = None,
         horizon: int | None = None) -> jax.Array:
  """Bets ``[..., 2, S, G]`` for the next chunk, from the state *before* it.

  Predictable: they depend on earlier chunks and the prior only. Side 1 bets on the
  values 1 - e, whose mean is 1 - mu.

  Rules (any predictable bet in ``[0, CAP / (1 - d_k)]`` keeps the sequence valid):

  * ``"agrapa"``: ``lambda = g / (v + g^2)``, ``g = d_k - mu_hat`` (growth-optimal for the
    running estimates; Waudby-Smith & Ramdas 2023), for a sequence to stop early.
  * ``"star"``: STaR-Bets (Voracek & Orabona 2025), for a fixed horizon n: the bet that
    reaches the target wealth ``1 / alpha`` exactly at n if the per-sample log-growth
    ``lambda g - lambda^2 S / 2`` is spent evenly, recalculated from what is still missing:
    ``lambda = sqrt(2 (log(1/alpha) - log K_t(d_k))_+ / ((n - t) S_k))`` with ``S_k`` the
    predicted second moment ``E (d_k - e)^2 = v + g^2`` capped by ``d_k (1 - d_k)`` (its
    largest value under the null). A cell that has reached its target bets 0 (its wealth
    stays put). Needs ``alpha`` and ``horizon`` (n).
  """
  d = grid(state.log_wealth.shape[-1])
  mean, var = estimates(state)
  side_mean = jnp.stack([mean, 1.0 - mean], axis=-1)  # [..., 2]
  g = d - side_mean[..., None]
  if rule == "agrapa":
    lam = g / (var[..., None, None] + g * g)
    lam = lam[..., None, :] * state.scales[..., None, :, None]
  elif rule == "star":
    if alpha is None or horizon is None:
      raise ValueError("rule='star' needs alpha and horizon (the fixed n it aims at).")
    second = jnp.minimum(var[..., None, None] + g * g, d * (1.0 - d)) + _MIN_VARIANCE
    remaining = jnp.maximum(horizon - state.count, 1.0)[..., None, None, None]
    missing = jnp.maximum(math.log(1.0 / alpha) - state.log_wealth, 0.0)  # [..., 2, S, G]
    lam = jnp.sqrt(2.0 * missing / (remaining * second[..., None, :]))
    lam = lam * state.scales[..., None, :, None]
  else:
    raise ValueError(f"rule must be one of {BET_RULES}, got {rule!r}.")
  return jnp.clip(lam, 0.0, CAP / (1.0 - d))


def update(state: SequenceState, values: jax.Array, *, alpha: float,
           weights: jax.Array | None = None,
           active: jax.Array | None = None, rule: str = "agrapa",
           horizon: int | None = None) -> SequenceState:
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
    rule, horizon: the bet rule of :func:`bets` ("star" aims at ``horizon`` samples).

  Returns:
    The new state.
  """
  d = grid(state.log_wealth.shape[-1])
  lam = bets(state, rule=rule, alpha=alpha, horizon=horizon)
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
  mixture = jax.nn.logsumexp(log_wealth, axis=-2) - math.log(log_wealth.shape[-2])
  rejected = state.rejected | (mixture >= math.log(1.0 / alpha))
  dev = values - state.center[..., None]
  new = SequenceState(count=state.count + jnp.sum(w, -1), steps=state.steps + 1.0,
                      center=state.center, prior_variance=state.prior_variance,
                      total=state.total + jnp.sum(w * dev, -1),
                      total_sq=state.total_sq + jnp.sum(w * dev * dev, -1),
                      scales=state.scales, log_wealth=log_wealth, rejected=rejected)
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
      state.log_wealth.shape[-2])
  # k* for each threshold: cells are decreasing, so count the cells with d_k >= tau.
  k = jnp.sum(d >= thresholds[..., None], axis=-1) - 1  # [..., E]
  kc = jnp.maximum(k, 0)
  wealth = jnp.take_along_axis(mixture, kc, axis=-1)
  done = jnp.take_along_axis(state.rejected[..., 0, :], kc, axis=-1)
  dk = d[kc]
  best = wealth + (n_max - state.count[..., None]) * jnp.log1p(CAP * dk / (1.0 - dk))
  return (k < 0) | (~done & (best < math.log(1.0 / alpha)))


# Futility rules of :func:`decide` (when to give up; neither ever certifies).
FUTILITY = ("confident", "predictive")
# The predictive rule: the running mean is taken this many standard errors optimistic...
FUTILITY_Z = 3.0
# ...and it waits for this many samples (a variance estimate worth the name).
FUTILITY_MIN_SAMPLES = 128


def predicted_out_of_reach(state: SequenceState, thresholds: jax.Array, *, level: float,
                           n_max: int) -> jax.Array:
  """Whether ``D <= threshold`` is predicted out of reach by n_max ``[..., E]``.

  A bound from test martingales (the fixed-n betting bound and this sequence alike) needs
  the wealth ``1 / level``; a bet lambda on n values of variance v at a gap g grows the
  log-wealth by at most about ``n (lambda g - lambda^2 v / 2) <= n g^2 / (2 v)``, so at
  n_max its width is not expected below ``sqrt(2 v log(1 / level) / n_max)`` (its leading
  term; skewed deficits and the mixture only widen it). The rule takes the running mean
  ``FUTILITY_Z`` standard errors *optimistic* (lower) plus that width: if even this misses
  the threshold (the largest grid cell at or below it: a bound of this family is a cell of
  :func:`grid`), a run to n_max is predicted not to certify. A prediction, not a proof:
  an image whose running mean is ``FUTILITY_Z`` standard errors too high may be given up
  although n_max would have certified it. Never certifies, so soundness is untouched;
  only agreement with a run to n_max is (``benchmarks/sequential.py`` measures it;
  Clopper-Pearson, exact for Bernoulli values, can be narrower, so this is a prediction
  about fsjax's bounds, not about every valid one).
  """
  mean, var = estimates(state)
  n = state.count[..., None]
  sd = jnp.sqrt(var)[..., None]
  optimistic = mean[..., None] - FUTILITY_Z * sd / jnp.sqrt(n + PRIOR_WEIGHT)
  smallest_width = sd * math.sqrt(2.0 * math.log(1.0 / level) / n_max)
  # The bound is a grid cell: certifying needs the largest cell <= the threshold (the
  # fixed-n betting bound has the same grid).
  d = grid(state.log_wealth.shape[-1])
  first = jnp.sum(d > jnp.asarray(thresholds, jnp.float32)[..., None], axis=-1)
  cell = jnp.where(first < d.shape[0], d[jnp.minimum(first, d.shape[0] - 1)], -1.0)
  return (n >= FUTILITY_MIN_SAMPLES) & (optimistic + smallest_width > cell)


class Decision(NamedTuple):
  """Status of a decision ``mean deficit <= threshold`` (certify when true)."""
  certified: jax.Array  # the anytime upper bound is at or below the threshold
  futile: jax.Array     # given up: the threshold is out of reach by n_max
  settled: jax.Array    # certified | futile


def decide(state: SequenceState, thresholds: jax.Array, *, alpha: float,
           n_max: int, futility: str = "predictive") -> Decision:
  """Decisions ``D_t <= threshold`` for thresholds ``[..., E]`` (deficits).

  Futile (``futility="confident"``): :func:`unreachable` (a proof), or the mean is
  bounded above the threshold by :func:`lower_deficit`, i.e. the decision is false and no
  valid method would certify it but with probability about alpha. ``"predictive"`` also
  gives up where :func:`predicted_out_of_reach` says n_max is not expected to certify.
  Futility trades samples against agreement with a fixed-n run and has no effect on
  soundness (it never certifies).
  """
  upper = upper_deficit(state)[..., None]
  certified = upper <= thresholds
  return _decision(state, certified, thresholds, alpha=alpha, n_max=n_max, futility=futility)


def _decision(state, certified, reach, *, alpha, n_max, futility) -> Decision:
  """Certified where ``certified``; futile where the deficit threshold ``reach`` (the most
  lenient one the data allow) is out of reach (see :func:`decide`)."""
  low = lower_deficit(state)[..., None]
  # A threshold <= 0 is a proof too: D is a grid cell, > 0 (e.g. a tie in a prediction).
  futile = (low > reach) | (reach <= 0) | unreachable(state, reach, alpha=alpha, n_max=n_max)
  if futility == "predictive":
    futile |= predicted_out_of_reach(state, reach, level=alpha, n_max=n_max)
  elif futility != "confident":
    raise ValueError(f"futility must be one of {FUTILITY}, got {futility!r}.")
  futile &= ~certified
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
                         alpha: float, n_max: int, futility: str = "predictive") -> Decision:
  """Decisions "cos(f_s(x'), u) >= cos for every ||x' - x|| <= eps" ``[..., E]``, Theorem 3.2.

  ``state`` bounds the deficits ``1 - h_u`` at level ``alpha``; ``futility`` as :func:`decide`.
  """
  return decide(state, deficit_threshold(eps, sigma, cos), alpha=alpha, n_max=n_max,
                futility=futility)


def norm_aware_decide(state: SequenceState, pair_state: SequenceState, eps: jax.Array,
                      sigma, cos: float, *, alpha: float, n_max: int,
                      futility: str = "predictive") -> Decision:
  """The same decisions with the norm-aware certificate B / U (docs/method.md section 2c).

  ``state`` bounds the deficits ``1 - h_u`` and ``pair_state`` the pair values
  ``(1 + <f_a, f_b>) / 2`` (mean ``(1 + ||f_s(x)||^2) / 2``), each at level ``alpha / 2``
  (the union bound). Certified where ``D <= threshold(c U(eps))`` with U from the norm's
  upper bound. Given up where even the smallest norm the data allow (``||f_s|| >= <f_s, u>
  >= 1 - 2 D``) leaves the deficit provably above its threshold, or out of reach;
  ``futility="predictive"`` (:func:`decide`) also when it is predicted out of reach.
  """
  d = upper_deficit(state)[..., None]
  n_upper = _norm.norm_upper_from_pair_deficit(upper_deficit(pair_state))[..., None]
  u = _norm.norm_bound(n_upper, eps, sigma)
  certified = d <= deficit_threshold(eps, sigma, cos * u)
  n_low = jnp.clip(1.0 - 2.0 * d, 0.0, 1.0)
  best = deficit_threshold(eps, sigma, cos * _norm.norm_bound(n_low, eps, sigma))
  return _decision(state, certified, best, alpha=alpha / 2, n_max=n_max, futility=futility)


# ---------------------------------------------------------------------------------------
# The engine: sequential certification of an image batch with cross-image dynamic batching.
# ---------------------------------------------------------------------------------------

STOPS = ("decision", "radius", "decision_and_radius", "never")
DEFAULT_SLOTS = 8
# Engine steps per device call (:func:`_run`): fewer host round trips; results unchanged.
DEFAULT_STEPS_PER_CALL = 8


class _Slots(NamedTuple):
  """Device state of the fixed batch of slots ``[S, ...]`` (one jitted step updates it)."""
  x: jax.Array          # [S, H, W, 3] the slot's image
  image: jax.Array      # [S] int32 the image's noise stream id (``image_ids``)
  index: jax.Array      # [S] int32 index of the image in the caller's batch (its results)
  active: jax.Array     # [S] bool, holds an image that is not finished
  chunk: jax.Array      # [S] int32 chunks drawn so far (stage 1 first)
  feature_sum: jax.Array  # [S, D] stage-1 sum of f(x + delta)
  stage1_sq: jax.Array  # [S] stage-1 sum of squared clean deficits (the prior variance)
  stage1_dev: jax.Array  # [S] stage-1 sum of clean deficits
  direction: jax.Array  # [S, D] the reference u (set at the end of stage 1)
  state: SequenceState  # [S] deficits 1 - h_u
  pair_state: SequenceState  # [S] pair values (1 + <f_a, f_b>) / 2 (norm-aware only)
  done: jax.Array       # [S] bool, finished at this step (read back by the host)
  # Prediction tasks (set at the end of stage 1): the class, and the probit
  # Phi^-1((1 + level) / 2) of the level the bound must clear (the task's "cos").
  label: jax.Array      # [S] int32
  probit: jax.Array     # [S]
  class_counts: jax.Array  # [S, K] stage-1 votes of the linear head ("classes" only)


def _slot_noise(key, image, chunk, shape, sigma):
  """Noise of one image's chunk: ``fold_in(fold_in(key, image), chunk)``, ``[k, H, W, 3]``.

  Depends on the image's index and the chunk's, never on the slot: any slot order draws
  the same samples for an image.
  """
  return sigma * jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, image), chunk),
                                   shape, jnp.float32)


def _empty_slots(slots, image_shape, dim, grid_size, scales, classes=1) -> _Slots:
  zeros = jnp.zeros((slots,), jnp.float32)
  seq = init(zeros, zeros, grid_size=grid_size, scales=scales)
  return _Slots(x=jnp.zeros((slots,) + image_shape, jnp.float32),
                image=jnp.zeros((slots,), jnp.int32), index=jnp.zeros((slots,), jnp.int32),
                active=jnp.zeros((slots,), bool),
                chunk=jnp.zeros((slots,), jnp.int32),
                feature_sum=jnp.zeros((slots, dim), jnp.float32), stage1_sq=zeros,
                stage1_dev=zeros, direction=jnp.zeros((slots, dim), jnp.float32),
                state=seq, pair_state=seq, done=jnp.zeros((slots,), bool),
                label=jnp.zeros((slots,), jnp.int32), probit=zeros,
                class_counts=jnp.zeros((slots, classes), jnp.float32))


def _refill(slots: _Slots, load: jax.Array, x: jax.Array, image: jax.Array,
            index: jax.Array, *, grid_size: int, scales: tuple[float, ...]) -> _Slots:
  """Puts new images in the slots where ``load [S]`` is True (fixed shapes: no recompiles)."""
  fresh = _empty_slots(load.shape[0], x.shape[1:], slots.direction.shape[-1], grid_size,
                       scales, slots.class_counts.shape[-1])
  fresh = fresh._replace(x=x, image=image, index=index, active=load)

  def pick(new, old):
    return jnp.where(load.reshape(load.shape + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(pick, fresh, slots)


def _step(params, slots: _Slots, slot_of, key, sigma, eps, head, *, encoder, chunk_size, n0,
          n_max, alpha, cos, norm_aware, reference, stop, tolerance, futility, rule, scales,
          task) -> _Slots:
  """One engine step: ``P = S`` chunks of samples, chunk ``p`` for slot ``slot_of[p]``.

  The fixed-shape jitted step: the encoder always sees ``S * chunk_size`` samples. While the
  queue is full every slot gets one chunk; once it runs dry the host hands the free
  positions to the images still running (``slot_of`` repeats their slots), so the last hard
  images of a run draw up to S chunks per step instead of leaving the device computing
  empty slots. A slot's chunks are applied in order, one by one (a scan over positions),
  each exactly as if it were a step of its own: its bets, its stopping rule and its noise
  (:func:`_slot_noise`, by image and chunk index) do not depend on how chunks are grouped
  into steps, so neither do the results. Chunks a slot draws after it stops in this step
  are ignored. ``done`` marks the slots that finished in this step.
  """
  s, k = slots.x.shape[0], chunk_size
  onehot = (slot_of[:, None] == jnp.arange(s)).astype(jnp.int32)  # [P, S]
  offset = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # earlier chunks
  chunk = slots.chunk[slot_of] + offset  # [P] the chunk index each position draws
  x = slots.x[slot_of]
  noise = jax.vmap(lambda img, j: _slot_noise(key, img, j, (k,) + x.shape[1:], sigma))(
      slots.image[slot_of], chunk)  # [P, k, H, W, 3]
  noisy = (x[:, None] + noise).reshape((slot_of.shape[0] * k,) + x.shape[1:])
  feats = encoder(params, noisy, sigma=sigma).reshape(slot_of.shape[0], k, -1)  # [P, k, D]
  clean = encoder(params, slots.x, sigma=sigma)  # [S, D] f(x)
  advance = functools.partial(
      _advance, sigma=sigma, eps=eps, chunk_size=chunk_size, n0=n0, n_max=n_max, alpha=alpha,
      cos=cos, norm_aware=norm_aware, reference=reference, stop=stop, tolerance=tolerance,
      futility=futility, rule=rule, scales=scales, task=task)

  def body(slots, position):
    o, f = position
    one = jax.tree.map(lambda a: a[o][None], slots)
    new = advance(one, f[None], clean[o][None], head)
    new = new._replace(done=one.done | new.done)
    return jax.tree.map(lambda a, b: a.at[o].set(b[0]), slots, new), None
  slots = slots._replace(done=jnp.zeros_like(slots.done))
  return jax.lax.scan(body, slots, (slot_of, feats))[0]


# What the engine certifies (docs/method.md 2b and 3d): the feature decisions "cos >= c at
# eps" of sequential_fcsb, or a prediction certificate of sequential_predict: FS's Theorem
# A.3.2 on a cosine-prototype head ("prototypes") or RS's CERTIFY on a linear head
# ("classes"), both decided at every radius of the grid.
TASKS = ("feature", "prototypes", "classes")


def _head_votes(feats, head):
  """Classes of the linear head ``(kernel [D, K], bias [K])`` on unit features ``[..., D]``."""
  kernel, bias = head
  logits = jnp.matmul(encoders_lib.unit(feats), kernel,
                      precision=jax.lax.Precision.HIGHEST) + bias
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _advance(slots: _Slots, feats, clean, head, *, sigma, eps, chunk_size, n0, n_max, alpha,
             cos, norm_aware, reference, stop, tolerance, futility, rule, scales,
             task) -> _Slots:
  """One chunk ``feats [S, k, D]`` for each slot (``clean [S, D]``: f(x)); see :func:`_step`.

  ``head``: ``()`` for the feature task, the unit prototypes ``[K, D]`` ("prototypes") or
  the linear head ``(kernel, bias)`` ("classes").
  """
  k = chunk_size
  stage1_chunks = -(-n0 // k)
  in_stage1 = slots.active & (slots.chunk < stage1_chunks)
  in_stage2 = slots.active & (slots.chunk >= stage1_chunks)

  # Stage 1: n0 samples choose u (reference "mean") and the priors of the bets.
  index1 = slots.chunk[:, None] * k + jnp.arange(k)  # [S, k]
  valid1 = (in_stage1[:, None] & (index1 < n0)).astype(jnp.float32)
  clean_dev = 0.5 * (1.0 - jnp.einsum("skd,sd->sk", feats, clean,
                                      precision=jax.lax.Precision.HIGHEST))
  feature_sum = slots.feature_sum + jnp.einsum("sk,skd->sd", valid1, feats,
                                               precision=jax.lax.Precision.HIGHEST)
  stage1_dev = slots.stage1_dev + jnp.sum(valid1 * clean_dev, -1)
  stage1_sq = slots.stage1_sq + jnp.sum(valid1 * clean_dev**2, -1)
  class_counts = slots.class_counts
  if task == "classes":  # the head's vote per sample, for stage 1's counts and stage 2
    votes = _head_votes(feats, head)  # [S, k]
    class_counts = class_counts + jnp.einsum(
        "sk,skc->sc", valid1, jax.nn.one_hot(votes, class_counts.shape[-1]))
  # At the end of stage 1: fix u, the class, the level and the priors (all independent of
  # stage 2).
  starting = slots.active & (slots.chunk == stage1_chunks - 1)
  mean_norm = jnp.linalg.norm(feature_sum, axis=-1) / n0
  m1 = stage1_dev / n0
  var1 = jnp.maximum(stage1_sq / n0 - m1**2, 0.0) * n0 / max(n0 - 1, 1)
  if reference == "mean":
    u = encoders_lib.unit(feature_sum)
    center = 0.5 * (1.0 - mean_norm)
  else:  # "clean": u = f(x), the paper's reference
    u, center = clean, m1
  label = jnp.full(slots.label.shape, -1, jnp.int32)
  probit = jnp.broadcast_to(-jax.scipy.special.ndtri((1.0 - jnp.float32(cos)) / 2.0),
                            slots.probit.shape)
  if task == "prototypes":  # Theorem A.3.2: the level cos(Delta / 2) of u's margin
    label, delta = _prediction._angle_margin(u, head)
    # Phi^-1((1 + cos(Delta / 2)) / 2) = -Phi^-1(sin^2(Delta / 4)), digits kept (as the
    # fixed-n radius computes it); a tie (Delta = 0) gives +inf: never certified.
    probit = -jax.scipy.special.ndtri(jnp.sin(jnp.clip(delta, 0.0, jnp.pi) / 4.0)**2)
  elif task == "classes":  # Cohen et al.: p_A > Phi(r / sigma), the top stage-1 class
    label = jnp.argmax(class_counts, axis=-1).astype(jnp.int32)
    center = 1.0 - jnp.take_along_axis(class_counts, label[:, None], axis=-1)[:, 0] / n0
    var1 = center * (1.0 - center)
    probit = jnp.zeros_like(probit)
  grid_size = slots.state.rejected.shape[-1]
  prior = init(center, var1, grid_size=grid_size, scales=scales)
  pair_prior = init(0.5 * (1.0 + mean_norm**2), 2.0 * var1, grid_size=grid_size,
                    scales=scales)

  def at_start(new, old):
    return jnp.where(starting.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  direction = at_start(u, slots.direction)
  state = jax.tree.map(at_start, prior, slots.state)
  pair_state = jax.tree.map(at_start, pair_prior, slots.pair_state)
  label = at_start(label, slots.label)
  probit = at_start(probit, slots.probit)

  # Stage 2: deficits (1 - h_u; for "classes" whether the head's vote is not the class)
  # and, norm-aware, pair values; the last chunk may run past n_max (weight 0).
  index2 = (slots.chunk - stage1_chunks)[:, None] * k + jnp.arange(k)
  weights = (in_stage2[:, None] & (index2 < n_max)).astype(jnp.float32)
  if task == "classes":
    deficits = (votes != label[:, None]).astype(jnp.float32)
  else:
    deficits = 0.5 * (1.0 - jnp.einsum("skd,sd->sk", feats, direction,
                                       precision=jax.lax.Precision.HIGHEST))
  level = alpha / 2 if norm_aware else alpha
  state = update(state, deficits, weights=weights, alpha=level, active=in_stage2, rule=rule,
                 horizon=n_max)
  if norm_aware:
    pair_w = weights[:, 0::2] * weights[:, 1::2]
    pair_state = update(pair_state, _norm.pair_values(feats), weights=pair_w, alpha=level,
                        active=in_stage2, rule=rule, horizon=n_max // 2)
    decision = norm_aware_decide(state, pair_state, eps, sigma, cos, alpha=alpha, n_max=n_max,
                                 futility=futility)
  elif task == "feature":
    decision = inner_product_decide(state, eps, sigma, cos, alpha=alpha, n_max=n_max,
                                    futility=futility)
  else:  # certified at radius r: D <= Phi(-(probit + r / sigma))
    decision = decide(state, norm.cdf(-(probit[:, None] + eps / sigma)), alpha=alpha,
                      n_max=n_max, futility=futility)
  if stop == "never":  # fixed n = n_max: the sequence read at n, for reporting a number
    settled = jnp.zeros_like(in_stage2)
  else:
    settled = jnp.ones_like(in_stage2)
    if stop in ("decision", "decision_and_radius"):
      settled &= jnp.all(decision.settled, axis=-1)
    if stop in ("radius", "decision_and_radius"):
      # Stop when continuing to n_max could add at most `tolerance` of the radius.
      settled &= _radius_settled(state, pair_state if norm_aware else None, sigma, cos,
                                 n_max=n_max, tolerance=tolerance,
                                 probit=None if task == "feature" else probit)
  finished = in_stage2 & (settled | (state.count >= n_max))
  return _Slots(x=slots.x, image=slots.image, index=slots.index,
                active=slots.active & ~finished,
                chunk=slots.chunk + slots.active.astype(jnp.int32), feature_sum=feature_sum,
                stage1_sq=stage1_sq, stage1_dev=stage1_dev, direction=direction, state=state,
                pair_state=pair_state, done=finished, label=label, probit=probit,
                class_counts=class_counts)


def _radius_of(state, pair_state, sigma, cos, deficit=None, probit=None):
  d = upper_deficit(state) if deficit is None else deficit
  if pair_state is None:
    z = -jax.scipy.special.ndtri(jnp.clip(d, 1e-12, 1.0))
    if probit is not None:  # a prediction task: the level's probit per image
      return sigma * (z - probit)
    return sigma * (z + jax.scipy.special.ndtri((1.0 - cos) / 2.0))
  n_upper = _norm.norm_upper_from_pair_deficit(upper_deficit(pair_state))
  return _norm.norm_aware_radius(d, n_upper, sigma, cos)


def _radius_settled(state, pair_state, sigma, cos, *, n_max, tolerance, probit=None):
  """The radius can grow by at most ``tolerance`` (relative) by n_max, or is provably 0.

  With R_t the certified radius now and R_hat the running estimate's, the certified
  radius at n_max is about ``R_hat - (R_hat - R_t) sqrt(n_t / n_max)`` (a confidence
  width shrinks as 1 / sqrt(n)); stop when R_t is within ``tolerance`` of that. A
  stopping rule only (any stopping time keeps the certificate valid).
  """
  r_now = _radius_of(state, pair_state, sigma, cos, probit=probit)
  mean, _ = estimates(state)
  r_hat = _radius_of(state, pair_state, sigma, cos, deficit=jnp.clip(mean, 1e-12, 1.0),
                     probit=probit)
  shrink = jnp.sqrt(state.count / n_max)
  r_end = r_hat - jnp.maximum(r_hat - r_now, 0.0) * shrink
  hopeless = _radius_of(state, pair_state, sigma, cos, deficit=lower_deficit(state),
                        probit=probit) <= 0.0
  return (r_now >= (1.0 - tolerance) * r_end) & (r_now > 0) | hopeless


class SequentialCertificate(NamedTuple):
  """Sequential feature certificates of a batch of images (docs/method.md section 2b).

  Attributes:
    deficit: ``[B]`` ``1 - L`` at the image's stopping time, L the anytime lower bound of
      h_u(x) (level alpha, or alpha / 2 when norm-aware).
    norm_upper: ``[B]`` the anytime upper bound on ||f_s(x)|| (level alpha / 2); 1 when
      not norm-aware (Theorem 3.2's ||f_s(x')|| <= 1).
    direction: ``[B, D]`` the unit reference u.
    samples: ``[B]`` int32, noise samples the image used (n0 of stage 1 + stage 2's).
    eps: ``[E]`` the radii of the decisions.
    inner_product_bound: ``[B, E]`` B(eps), Theorem 3.2.
    cosine_bound: ``[B, E]``: B / U(eps) norm-aware, else B; -1 (vacuous) where B < 0.
    certified: ``[B, E]`` bool, ``cosine_bound >= cos``: the decisions.
    radius: ``[B]`` the radius within which the cosine stays >= cos (0: none).
    cos: the cosine level of the decisions and the radius.
    alpha: the failure probability of each image's certificate.
    norm_aware: whether the cosine uses the norm bound.
  """
  deficit: jax.Array
  norm_upper: jax.Array
  direction: jax.Array
  samples: jax.Array
  eps: jax.Array
  inner_product_bound: jax.Array
  cosine_bound: jax.Array
  certified: jax.Array
  radius: jax.Array
  cos: float
  alpha: float
  norm_aware: bool

  @property
  def is_certificate(self) -> bool:
    return True

  @property
  def bound(self) -> str:
    """The confidence bound's name, as :attr:`certify.FeatureCertificate.bound`."""
    return "betting (sequential)"

  @property
  def score(self) -> jax.Array:
    """``[B]`` L = 1 - deficit."""
    return 1.0 - self.deficit


class _Finished(NamedTuple):
  """Results of the images that finished during one :func:`_run` call, ``[F, ...]``.

  Rows ``< count`` are filled, in the order the images finished.
  """
  index: jax.Array      # [F] int32 the image's index in the caller's batch
  deficit: jax.Array    # [F] upper bound on the deficit at the stopping time
  norm_upper: jax.Array  # [F] upper bound on ||f_s(x)||
  samples: jax.Array    # [F] stage-2 samples used
  direction: jax.Array  # [F, D] the reference u
  label: jax.Array      # [F] int32 the class (prediction tasks)
  probit: jax.Array     # [F] the level's probit (prediction tasks)
  count: jax.Array      # [] int32 rows filled


@cpu.jit(static_argnames=(
    "steps", "grid_size", "encoder", "chunk_size", "n0", "n_max", "alpha", "cos",
    "norm_aware", "reference", "stop", "tolerance", "futility", "rule", "scales", "task"))
def _run(params, slots: _Slots, queue_x, queue_id, queue_index, queue_len, key, sigma, eps,
         head, *, steps, grid_size, **step_kw
         ) -> tuple[_Slots, jax.Array, jax.Array, _Finished]:
  """Up to ``steps`` engine steps on the device, refilling slots from a queue block.

  ``queue_x [Q, H, W, 3]``, ``queue_id [Q]`` (noise ids), ``queue_index [Q]`` (batch
  indices): the next images of the host's queue, the first ``queue_len`` valid. Before
  each step the free slots (in slot order) take the next images of the block, exactly as
  the host would; the step's positions go round robin to the running slots (every slot one
  chunk while all run; once fewer run, the free positions go to those still running). The
  loop ends early once no slot runs and the block is used up. One call replaces ``steps``
  host round trips (a device sync, a refill and a read-back each), which cost about 15% of
  a step on a CPU; the results are the same bits for any ``steps`` (each image's samples
  and updates do not depend on how steps are grouped into calls).

  Returns ``(slots, taken, steps_run, finished)``: the images of the block taken, the
  steps run, and the results of the images that finished (:class:`_Finished`, ``F =
  steps * S`` rows).
  """
  s = slots.x.shape[0]
  rows = steps * s
  dim = slots.direction.shape[-1]
  empty = _Finished(index=jnp.zeros((rows,), jnp.int32), deficit=jnp.ones((rows,), jnp.float32),
                    norm_upper=jnp.ones((rows,), jnp.float32),
                    samples=jnp.zeros((rows,), jnp.float32),
                    direction=jnp.zeros((rows, dim), jnp.float32),
                    label=jnp.zeros((rows,), jnp.int32), probit=jnp.zeros((rows,), jnp.float32),
                    count=jnp.int32(0))

  def cond(carry):
    r, slots, taken, _ = carry
    return (r < steps) & (jnp.any(slots.active) | (taken < queue_len))

  def body(carry):
    r, slots, taken, out = carry
    free = ~slots.active
    rank = jnp.cumsum(free.astype(jnp.int32)) - 1
    load = free & (taken + rank < queue_len)
    src = jnp.clip(taken + rank, 0, queue_x.shape[0] - 1)
    slots = _refill(slots, load, queue_x[src], queue_id[src], queue_index[src],
                    grid_size=grid_size, scales=step_kw["scales"])
    taken = taken + jnp.sum(load.astype(jnp.int32))
    running = slots.active
    # Running slots first, in slot order (a stable sort), then round robin over them.
    order = jnp.argsort(~running, stable=True).astype(jnp.int32)
    m = jnp.maximum(jnp.sum(running.astype(jnp.int32)), 1)
    slots = _step(params, slots, order[jnp.arange(s) % m], key, sigma, eps, head, **step_kw)
    done = slots.done
    at = jnp.where(done, out.count + jnp.cumsum(done.astype(jnp.int32)) - 1, rows)
    put = lambda buf, v: buf.at[at].set(v, mode="drop")  # noqa: E731
    out = _Finished(index=put(out.index, slots.index),
                    deficit=put(out.deficit, upper_deficit(slots.state)),
                    norm_upper=put(out.norm_upper, _norm.norm_upper_from_pair_deficit(
                        upper_deficit(slots.pair_state))),
                    samples=put(out.samples, slots.state.count),
                    direction=put(out.direction, slots.direction),
                    label=put(out.label, slots.label), probit=put(out.probit, slots.probit),
                    count=out.count + jnp.sum(done.astype(jnp.int32)))
    return r + 1, slots, taken, out

  r, slots, taken, out = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, jnp.int32(0),
                                                         empty))
  return slots, taken, r, out


@functools.partial(jax.jit, static_argnames=("norm_aware",))
def certificate_from_bounds(state_d, norm_upper, eps, sigma, cos, *, norm_aware):
  """A sequential certificate's columns from its confidence bounds at the stopping time.

  ``state_d [M]``: upper bounds on the score deficits (cells of :func:`grid`, 1 when none
  is rejected); ``norm_upper [M]``: upper bounds on ``||f_s(x)||`` (1 without the norm).
  Returns ``(inner [M, E], cosine [M, E], radius [M])``: the bound on ``<f_s(x'), u>`` at
  each eps, the certified cosine (norm-aware ``B / U`` or ``B``; -1 where ``B < 0``) and
  the radius for ``cos``. What :func:`sequential_fcsb` reports, and what
  ``certify.verify`` re-derives a recorded row with.
  """
  inner = 2.0 * norm.cdf(-jax.scipy.special.ndtri(jnp.clip(state_d, 1e-12, 1.0))[:, None]
                         - eps[None] / sigma) - 1.0
  if norm_aware:
    cosine = _norm.norm_aware_cosine_bound(state_d[:, None], norm_upper[:, None], eps[None], sigma)
    radius = _norm.norm_aware_radius(state_d, norm_upper, sigma, cos)
  else:
    cosine = jnp.where(inner >= 0.0, inner, -1.0)
    z = -jax.scipy.special.ndtri(jnp.clip(state_d, 1e-12, 1.0))
    radius = jnp.maximum(sigma * (z + jax.scipy.special.ndtri((1.0 - cos) / 2.0)), 0.0)
  return inner, cosine, radius


def sequential_fcsb(params: Any, x: jax.typing.ArrayLike, *, encoder: Any, sigma: float,
                    eps: Sequence[float], key: jax.Array, cos: float = 0.5,
                    n_max: int = 10_000, n0: int = 100, alpha: float = 0.001,
                    norm_aware: bool = True, reference: str = "mean",
                    stop: str = "decision", tolerance: float = 0.03,
                    futility: str = "predictive", chunk_size: int = 64, slots: int = DEFAULT_SLOTS,
                    steps_per_call: int = DEFAULT_STEPS_PER_CALL,
                    grid_size: int = GRID, bets: str = "agrapa",
                    image_ids: jax.typing.ArrayLike | None = None,
                    progress: Any = None) -> SequentialCertificate:
  """Sequential feature certificates: each image stops once its decisions are settled.

  For each image, samples are drawn ``chunk_size`` at a time; after each chunk an
  anytime-valid betting confidence sequence on ``h_u(x)`` (and, norm-aware, one on
  ``||f_s(x)||`` from consecutive pairs) is updated, and the image stops when every
  decision "cos(f_s(x'), u) >= cos for all ||x' - x|| <= eps" is certified or given up
  (``stop="decision"``), when its radius is within ``tolerance`` of what n_max could give
  (``stop="radius"``), when both hold (``stop="decision_and_radius"``: the decisions of
  ``"decision"`` and a radius to report), or at ``n_max`` (``stop="never"``: every image uses n_max, the
  fixed-n bound for reporting a number; benchmarks/bound_limit.py measures it, tightest
  with a finer ``grid_size`` such as 4096, and ``bets="star"``). The certificate holds with
  probability 1 - alpha at the data-dependent stopping time.

  Cross-image dynamic batching: one jitted step runs a chunk for a fixed batch of
  ``slots`` images; a finished image's slot is refilled from the queue at once (same
  shapes: no recompiles), on the device, which runs up to ``steps_per_call`` steps per
  call (the host only hands it the next images and reads back the finished ones). The noise of image i's chunk j comes from
  ``fold_in(fold_in(key, id_i), j)`` (``id_i = image_ids[i]``, default i), so which slot
  an image lands in never changes its samples: with the same ``slots`` the results are
  the same bits in any order (tested); another slot count changes the encoder's batch
  shape, whose arithmetic may differ in the last bit.

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder (static).
    sigma: noise level > 0 (pixel units).
    eps: ``[E]`` the radii of the decisions (e.g. Table 1's grid).
    key: PRNG key.
    cos: the cosine level, in [0, 1) (Corollary 3.3 is 0.5).
    n_max: most stage-2 samples per image.
    n0: stage-1 samples: they choose u (reference "mean") and the priors of the bets.
    alpha: failure probability of each image's certificate.
    norm_aware: use the norm-aware cosine B / U (alpha split in halves).
    reference: "mean" (stage-1 mean direction) or "clean" (u = f(x), the paper's).
    stop: "decision", "radius", "decision_and_radius" or "never" (fixed n = n_max).
    tolerance: relative radius left on the table by ``stop="radius"`` (and
      ``"decision_and_radius"``), against the sequence's projected radius at n_max; 0.03
      keeps the radius within 5% of fixed n = 10,000's on the embedded default
      (benchmarks/sequential.py; 0.05 gave 0.94-0.955 of it).
    futility: when a decision is given up (never certified): ``"predictive"`` (default)
      once n_max is predicted not to certify it (:func:`predicted_out_of_reach`: the
      running mean 3 standard errors optimistic plus the smallest width a bound on n_max
      samples can have still misses the threshold), or as ``"confident"``, which gives up
      only when the anytime lower bound puts the value on the wrong side of the threshold
      (or no data could reach it by n_max): about alpha's chance of disagreeing with a run
      to n_max, at many more samples on images near a threshold.
    chunk_size: samples per chunk (even when norm-aware).
    slots: images in flight at once.
    steps_per_call: engine steps per device call (fewer host round trips; no effect on
      the results).
    grid_size: cells of the confidence sequence's grid.
    bets: "agrapa" (bets that stop early) or "star" (STaR-Bets, Voracek & Orabona 2025:
      bets aimed at n_max, the tightest bound at n = n_max; benchmarks/bound_limit.py; the
      natural choice with ``stop="never"``). Either keeps every certificate valid at any
      stopping time.
    image_ids: optional ``[B]`` distinct non-negative ints naming each image's noise
      stream (e.g. its index in a dataset, so a subset or a shuffled batch draws the
      same noise per image); default ``arange(B)``.
    progress: optional callable, called after every device call with the noise samples
      it drew (``slots * chunk_size`` per step, through the encoder; e.g. ``certify.report.SampleProgress
      .task(..., images=1)``); the results do not change.

  Returns:
    A :class:`SequentialCertificate`.

  References:
    Voracek 2024, https://arxiv.org/abs/2406.17830; Waudby-Smith & Ramdas 2023,
    https://arxiv.org/abs/2010.09686.
  """
  checks.check_choice(reference, name="reference", choices=("clean", "mean"))
  if isinstance(norm_aware, (bool, np.bool_)) is False:
    raise ValueError(f"norm_aware must be True or False, got {norm_aware!r}.")
  checks.check_in_range(cos, name="cos", low=0.0, high=1.0, meaning="the cosine level")
  if np.ndim(cos) or float(cos) >= 1.0:
    raise ValueError(f"cos must be one number in [0, 1), got {cos!r}.")
  if norm_aware and chunk_size % 2:
    raise ValueError(f"chunk_size must be even when norm_aware (the norm bound pairs "
                     f"consecutive samples), got {chunk_size}.")
  out = _certify_sequentially(
      params, x, encoder=encoder, sigma=sigma, eps=eps, key=key, cos=cos, n_max=n_max, n0=n0,
      alpha=alpha, norm_aware=norm_aware, reference=reference, stop=stop,
      tolerance=tolerance, futility=futility, chunk_size=chunk_size, slots=slots,
      steps_per_call=steps_per_call, grid_size=grid_size, bets=bets, image_ids=image_ids,
      progress=progress, task="feature", head=())
  sigma32, eps32 = jnp.float32(sigma), jnp.asarray(out["eps"])
  inner, cosine, radius = certificate_from_bounds(
      jnp.asarray(out["deficit"]), jnp.asarray(out["norm_upper"]), eps32, sigma32,
      jnp.float32(cos), norm_aware=bool(norm_aware))
  return SequentialCertificate(
      deficit=jnp.asarray(out["deficit"]), norm_upper=jnp.asarray(out["norm_upper"]),
      direction=jnp.asarray(out["direction"]), samples=jnp.asarray(out["samples"]),
      eps=eps32, inner_product_bound=inner, cosine_bound=cosine, certified=cosine >= cos,
      radius=radius, cos=float(cos), alpha=float(alpha), norm_aware=bool(norm_aware))


PREDICTION_METHODS = ("FS", "RS")


def sequential_predict(params: Any, x: jax.typing.ArrayLike, *, encoder: Any, head: Any,
                       method: str, sigma: float, radii: Sequence[float], key: jax.Array,
                       n_max: int = 10_000, n0: int = 100, alpha: float = 0.001,
                       stop: str = "decision", tolerance: float = 0.03,
                       futility: str = "predictive", chunk_size: int = 64,
                       slots: int = DEFAULT_SLOTS,
                       steps_per_call: int = DEFAULT_STEPS_PER_CALL, grid_size: int = GRID,
                       bets: str = "agrapa", image_ids: jax.typing.ArrayLike | None = None,
                       progress: Any = None):
  """Sequential prediction certificates: each image stops once "certified at r" is settled
  for every radius r of ``radii`` (docs/method.md 3d).

  The engine of :func:`sequential_fcsb` (chunks, an anytime-valid betting confidence
  sequence, cross-image dynamic batching, noise ``fold_in(fold_in(key, id_i), j)``) with
  a prediction as the decision:

  * ``method="FS"``: Theorem A.3.2 on a cosine-prototype head (``head`` its variables; a
    projected head certifies ``P^T f``, :func:`fsjax.heads.fs_classifier`). Stage 1 (n0
    samples) fixes the mean direction u, the class c = argmax <u, w_k> and its margin
    Delta; the sequence bounds h_u(x), and the prediction is certified at r iff
    ``Phi^-1(h_LCB) - r / sigma > Phi^-1((1 + cos(Delta / 2)) / 2)``.
  * ``method="RS"``: Cohen et al.'s CERTIFY on a linear head (``head``: variables of
    :class:`certify.LinearHead`): stage 1's top class c_A, then the sequence bounds
    ``p_A`` (its values are whether a sample's vote is c_A); certified at r iff
    ``Phi^-1(p_A) > r / sigma``.

  ``stop``, ``futility``, ``tolerance``, ``bets`` and the rest as in :func:`sequential_fcsb`
  (``stop="radius"`` reports a radius close to n_max's). The certificate holds with
  probability 1 - alpha at the data-dependent stopping time.

  Returns:
    A :class:`certify.PredictionCertificate` (bound ``"betting (sequential)"``, certificate
    ``"cosine"`` or ``"rs"`` per image, ``samples`` n0 + the image's stage 2), class -1
    (abstain) where not certified even at radius 0.
  """
  return sequential_prediction(
      params, x, encoder=encoder, head=head, method=method, sigma=sigma, radii=radii,
      key=key, n_max=n_max, n0=n0, alpha=alpha, stop=stop, tolerance=tolerance,
      futility=futility, chunk_size=chunk_size, slots=slots, steps_per_call=steps_per_call,
      grid_size=grid_size, bets=bets, image_ids=image_ids, progress=progress)[0]


def sequential_prediction(params, x, *, encoder, head, method, sigma, radii, key, n_max, n0,
                          alpha, stop, tolerance, futility, chunk_size, slots, steps_per_call,
                          grid_size, bets, image_ids, progress):
  """:func:`sequential_predict` and, per image, what the engine ended with (``label``: the
  stage-1 class even where it abstains; ``deficit``: the bound's deficit at the stop)."""
  checks.check_choice(method, name="method", choices=PREDICTION_METHODS)
  encoders_lib.check_images(x)
  checks.check_sigma(sigma)
  if method == "FS":
    encoder, params, prototypes = heads_lib.fs_classifier(encoder, params, head)
    dim = int(jax.eval_shape(lambda p, v: encoder(p, v, sigma=sigma), params,
                             jax.ShapeDtypeStruct((1,) + np.shape(x)[1:], jnp.float32)
                             ).shape[-1])
    _prediction.check_prototypes(prototypes, dim)
    task, head_arrays = "prototypes", prototypes
  else:
    kernel, bias = _smoothed_prediction._linear_head(head)
    task, head_arrays = "classes", (kernel, bias)
  out = _certify_sequentially(
      params, x, encoder=encoder, sigma=sigma, eps=radii, key=key, cos=0.0, n_max=n_max,
      n0=n0, alpha=alpha, norm_aware=False, reference="mean", stop=stop, tolerance=tolerance,
      futility=futility, chunk_size=chunk_size, slots=slots, steps_per_call=steps_per_call,
      grid_size=grid_size, bets=bets, image_ids=image_ids, progress=progress, task=task,
      head=head_arrays)
  z = np.asarray(_bounds.probit_of_deficit(jnp.asarray(out["deficit"])), np.float64)
  with np.errstate(invalid="ignore"):  # a tie's probit is +inf: radius -inf, abstain
    radius = float(sigma) * (z - out["probit"].astype(np.float64))
  certified = np.isfinite(radius) & (radius > 0)
  return _smoothed_prediction.PredictionCertificate(
      np.where(certified, out["label"], _prediction.ABSTAIN).astype(np.int32),
      np.where(certified, radius, 0.0).astype(np.float32), out["samples"],
      np.full(len(radius), "cosine" if method == "FS" else "rs"), "betting (sequential)",
      float(sigma), float(alpha)), out


def _certify_sequentially(params, x, *, encoder, sigma, eps, key, cos, n_max, n0, alpha,
                          norm_aware, reference, stop, tolerance, futility, chunk_size, slots,
                          steps_per_call, grid_size, bets, image_ids, progress, task,
                          head) -> dict[str, np.ndarray]:
  """Checks the engine's common arguments, runs it over the images and returns, per image,
  the bounds at its stopping time (``deficit``, ``norm_upper``), ``direction``,
  ``samples`` (n0 included), ``label`` and ``probit`` (prediction tasks), and ``eps``."""
  encoders_lib.check_images(x)
  checks.check_sigma(sigma)
  checks.check_alpha(alpha)
  for name, value, minimum in (("n_max", n_max, 2), ("n0", n0, 1),
                               ("chunk_size", chunk_size, 1), ("slots", slots, 1),
                               ("steps_per_call", steps_per_call, 1),
                               ("grid_size", grid_size, 2)):
    checks.check_positive_int(value, name=name, minimum=minimum)
  checks.check_choice(stop, name="stop", choices=STOPS)
  checks.check_choice(bets, name="bets", choices=BET_RULES)
  checks.check_choice(futility, name="futility", choices=FUTILITY)
  if progress is not None and not callable(progress):
    raise ValueError(f"progress must be None or a callable taking the number of noise "
                     f"samples drawn, got {progress!r}.")
  eps_arr = np.asarray(eps, np.float32)
  if eps_arr.ndim != 1 or eps_arr.size == 0 or not np.all(np.isfinite(eps_arr)) or np.any(
      eps_arr < 0):
    raise ValueError(f"{'eps' if task == 'feature' else 'radii'} must be a non-empty list "
                     f"of l2 radii >= 0 (shape [E]), got {eps!r}.")
  checks.check_in_range(tolerance, name="tolerance", low=0.0, high=1.0,
                        meaning="the relative radius stop='radius' may leave")

  x = np.asarray(x, np.float32)
  batch = x.shape[0]
  ids = np.arange(batch) if image_ids is None else np.asarray(image_ids)
  if (ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer) or np.any(ids < 0)
      or len(np.unique(ids)) != batch or np.any(ids >= 2**31)):
    raise ValueError(f"image_ids must be {batch} distinct non-negative integers (one noise "
                     f"stream per image), got {image_ids!r}.")
  dim = int(jax.eval_shape(lambda p, v: encoder(p, v, sigma=sigma), params,
                           jax.ShapeDtypeStruct((1,) + x.shape[1:], jnp.float32)).shape[-1])
  classes = int(head[0].shape[-1]) if task == "classes" else 1
  scales = tuple(BET_SCALES) if bets == "agrapa" else (1.0,)  # STaR: one bet, no mixture
  run = functools.partial(
      _run, steps=int(steps_per_call), grid_size=int(grid_size), encoder=encoder,
      chunk_size=int(chunk_size), n0=int(n0), n_max=int(n_max), alpha=float(alpha),
      cos=float(cos), norm_aware=bool(norm_aware), reference=reference, stop=stop,
      tolerance=float(tolerance), futility=futility, rule=bets, scales=scales, task=task)
  state = _empty_slots(slots, x.shape[1:], dim, grid_size, scales, classes)
  sigma32, eps32 = jnp.float32(sigma), jnp.asarray(eps_arr)

  out = {"deficit": np.ones(batch, np.float32), "norm_upper": np.ones(batch, np.float32),
         "direction": np.zeros((batch, dim), np.float32),
         "samples": np.zeros(batch, np.int32), "label": np.full(batch, -1, np.int32),
         "probit": np.zeros(batch, np.float32), "eps": eps_arr}
  block = int(slots) * int(steps_per_call)  # a call refills at most one slot per step each
  ids32 = ids.astype(np.int32)
  taken_total, running = 0, 0
  while taken_total < batch or running:
    queue = np.arange(taken_total, min(taken_total + block, batch))
    queue_x = np.zeros((block,) + x.shape[1:], np.float32)
    queue_id = np.zeros(block, np.int32)
    queue_index = np.zeros(block, np.int32)
    queue_x[:queue.size], queue_id[:queue.size], queue_index[:queue.size] = (
        x[queue], ids32[queue], queue)
    state, taken, steps_run, fin = run(params, state, queue_x, queue_id, queue_index,
                                       np.int32(queue.size), key, sigma32, eps32, head)
    taken, steps_run = int(taken), int(steps_run)
    count = int(fin.count)
    index = np.asarray(fin.index)[:count]
    out["deficit"][index] = np.asarray(fin.deficit)[:count]
    out["norm_upper"][index] = np.asarray(fin.norm_upper)[:count] if norm_aware else 1.0
    out["direction"][index] = np.asarray(fin.direction)[:count]
    out["samples"][index] = np.asarray(fin.samples)[:count].astype(np.int32) + int(n0)
    out["label"][index] = np.asarray(fin.label)[:count]
    out["probit"][index] = np.asarray(fin.probit)[:count]
    taken_total += taken
    running += taken - count
    if progress is not None and steps_run:
      progress(steps_run * int(slots) * int(chunk_size))
  return out
