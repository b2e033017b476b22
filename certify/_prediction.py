"""Prediction-level certification: cosine prototypes (FS) and Cohen's RS baseline.

docs/method.md section 3, paper Appendix A.3 (Lemma A.3.1, Theorem A.3.2), Table 2.

Feature-space smoothing (FS) certifies the smoothed feature; a cosine-prototype head
turns that into a certified class. Everything here is the maths after the Monte Carlo:
the caller (the smoothing code) supplies the unit mean direction ``u``, the lower
confidence bound ``L`` of ``h_u(x)`` (as ``h_lcb`` or as the deficit ``1 - L`` that
a ``certify.ScoreEstimate`` holds), or, for randomized smoothing (RS), the class counts.
Functions take arrays and return arrays:

* :func:`prototype_logit_bounds` -- Lemma A.3.1, the range of ``<z', w_k>`` over a cap.
* :func:`angle_margin` -- the clean class ``c`` and the angular margin ``Delta``.
* :func:`prediction_radius`, :func:`certified_prediction` -- the closed-form FS radius
  (beyond the paper; its derivation is in :func:`prediction_radius`).
* :func:`per_class_radius` -- the per-class certificate of the same classifier (Salman et
  al.'s soft smoothing applied to each prototype score; docs/method.md section 3b).
* :func:`clopper_pearson_lower`, :func:`rs_certify_from_counts`,
  :func:`rs_predict_from_counts` -- Cohen et al. (2019) CERTIFY and PREDICT on counts,
  as in locuslab/smoothing ``code/core.py``.
* :func:`certified_accuracy` -- the curve of Table 2.
* :class:`CosinePrototypeHead` (FS) and :class:`LinearHead` (RS base classifier).

The FS maths is jittable (float32 caveats are documented where they bite); the RS maths
is numpy/scipy, as the exact Beta quantiles and binomial tests are. Value checks run on
concrete inputs before any jit and raise ``ValueError``; traced inputs are only
shape-checked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri
from jax.typing import ArrayLike
from scipy import stats

from certify import _bounds
from fsjax import checks
from fsjax import encoders as encoders_lib

# Returned as the class when a certificate (FS) or a test (RS) abstains; core.py's value.
ABSTAIN = -1
# Prototypes whose norm is further than this from 1 are rejected by check_prototypes: a
# raw, unnormalised parameter array is a bug, float32 round-off is not.
UNIT_NORM_TOL = 1e-3


# ----------------------------------------------------------------------------------------
# Input checks (concrete values only; run before jit). The primitives are fsjax.checks.
# ----------------------------------------------------------------------------------------


def check_prototypes(prototypes: ArrayLike, dim: int | None = None) -> None:
  """Raises ValueError unless ``prototypes`` are ``[K, D]`` unit vectors, ``K >= 2``.

  Args:
    prototypes: ``[K, D]`` class prototypes ``w_k``.
    dim: the feature dimension ``D`` they must have; ``None`` skips that check.
  """
  shape = np.shape(prototypes)
  if len(shape) != 2:
    raise ValueError(f"prototypes must have shape [K, D] (one unit vector per class), got "
                     f"shape {shape}.")
  k, d = shape
  if k < 2:
    raise ValueError(f"prototypes must hold K >= 2 classes to certify a prediction, got K = {k}.")
  if dim is not None and d != dim:
    raise ValueError(f"prototypes have dimension {d} but the features have dimension {dim}; "
                     "the head must be trained on the same feature (encoder, feature, layer).")
  if not checks.is_concrete(prototypes):
    return
  w = np.asarray(prototypes, dtype=np.float64)
  if not np.all(np.isfinite(w)):
    raise ValueError("prototypes contain NaN or Inf.")
  norms = np.linalg.norm(w, axis=1)
  worst = float(np.max(np.abs(norms - 1.0)))
  if worst > UNIT_NORM_TOL:
    raise ValueError(
        f"prototypes must be unit vectors (|norm - 1| <= {UNIT_NORM_TOL}), got norms in "
        f"[{norms.min():.4g}, {norms.max():.4g}]. Pass unit_prototypes(params), not the raw "
        "'prototypes' parameter, or normalise: w / np.linalg.norm(w, axis=1, keepdims=True).")


def _check_features(z: ArrayLike, name: str = "z") -> int:
  shape = np.shape(z)
  if len(shape) != 2:
    raise ValueError(f"{name} must have shape [B, D] (a batch of feature directions), got "
                     f"shape {shape}; add a batch axis with z[None] for one feature.")
  checks.check_nonempty(z, name=name, item="feature of dimension >= 1")
  return shape[1]


def _check_batch(x: ArrayLike, name: str, b: int | None = None) -> int:
  shape = np.shape(x)
  if len(shape) != 1:
    raise ValueError(f"{name} must have shape [B], got shape {shape}.")
  if b is not None and shape[0] != b:
    raise ValueError(f"{name} has batch size {shape[0]}, expected {b} to match the other inputs.")
  checks.check_nonempty(x, name=name, item="entry (one per image)")
  return shape[0]


def _check_counts(counts: Any, name: str) -> np.ndarray:
  """Returns ``counts`` as an int64 ``[B, K]`` array, or raises ValueError."""
  c = np.asarray(counts)
  if c.ndim != 2:
    raise ValueError(f"{name} must have shape [B, K] (per-class counts of each image), got "
                     f"shape {c.shape}.")
  if c.shape[1] < 2:
    raise ValueError(f"{name} must count K >= 2 classes, got K = {c.shape[1]}.")
  checks.check_nonempty(c, name=name, item="image's counts")
  if not (np.issubdtype(c.dtype, np.integer) or
          (np.issubdtype(c.dtype, np.floating) and np.all(c == np.round(c)))):
    raise ValueError(f"{name} must hold whole numbers of Monte Carlo samples, got dtype "
                     f"{c.dtype} with non-integer values.")
  if np.any(c < 0):
    raise ValueError(f"{name} must be non-negative, got minimum {c.min()}.")
  if np.any(c.sum(axis=1) < 1):
    bad = np.flatnonzero(c.sum(axis=1) < 1)
    raise ValueError(f"every row of {name} must count at least one sample; rows {bad[:5]} "
                     "are all zero.")
  return c.astype(np.int64)


# ----------------------------------------------------------------------------------------
# FS: cosine prototypes (Lemma A.3.1, Theorem A.3.2).
# ----------------------------------------------------------------------------------------


def _angles(z: jax.Array, prototypes: jax.Array) -> jax.Array:
  """``theta_k = angle(z, w_k)`` in [0, pi], ``[B, D] x [K, D] -> [B, K]``.

  HIGHEST precision: on GPUs JAX's default float32 matmul may run in TF32 (10-bit
  mantissa), which would move the angles by ~1e-3 rad -- far more than the margin
  arithmetic below tolerates. Both inputs are renormalised (the angle is a property of
  directions), so a feature a round-off away from unit norm does no harm.
  """
  cos = jnp.matmul(encoders_lib.unit(z), encoders_lib.unit(prototypes).T, precision=jax.lax.Precision.HIGHEST)
  return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


@jax.jit
def _prototype_logit_bounds(z, prototypes, gamma):
  theta = _angles(z, prototypes)
  phi = jnp.arccos(jnp.clip(gamma, -1.0, 1.0))[:, None]
  lower = jnp.cos(jnp.minimum(theta + phi, jnp.pi))  # Eq. A.40, left
  upper = jnp.cos(jnp.maximum(theta - phi, 0.0))  # Eq. A.40, right
  return lower, upper


def prototype_logit_bounds(z: ArrayLike, prototypes: ArrayLike,
                           gamma: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Lemma A.3.1: the range of the logits ``<z', w_k>`` over all unit ``z'`` near ``z``.

  For unit ``z`` and ``z'`` with ``cos(z, z') >= gamma``, ``phi = arccos(gamma)`` and
  ``theta_k = angle(z, w_k)``, the triangle inequality of the angle metric on the sphere
  puts ``angle(z', w_k)`` in ``[max(theta_k - phi, 0), min(theta_k + phi, pi)]``, and cos
  is decreasing on [0, pi]:

      cos(min(theta_k + phi, pi)) <= <z', w_k> <= cos(max(theta_k - phi, 0)).

  Both ends are attained with ``z, w_k, z'`` in one plane (``z`` rotated by ``phi``
  towards or away from ``w_k``). The lemma holds for every ``gamma`` in [-1, 1]; the FS
  certificate supplies ``gamma >= 0`` (docs/method.md section 2). A ``gamma`` outside
  [-1, 1] (NaN included) is refused.

  Args:
    z: ``[B, D]`` clean unit features (renormalised here).
    prototypes: ``[K, D]`` unit class prototypes ``w_k`` (checked, then renormalised).
    gamma: ``[B]`` certified cosine ``cos(z, z') >= gamma``.

  Returns:
    ``(lower, upper)``, each ``[B, K]`` float32.
  """
  dim = _check_features(z)
  check_prototypes(prototypes, dim)
  _check_batch(gamma, "gamma", np.shape(z)[0])
  checks.check_in_range(gamma, name="gamma", low=-1.0, high=1.0,
                        meaning="a certified cosine cos(z, z') >= gamma")
  return _prototype_logit_bounds(jnp.asarray(z, jnp.float32),
                                 jnp.asarray(prototypes, jnp.float32),
                                 jnp.asarray(gamma, jnp.float32))


@jax.jit
def _angle_margin(z, prototypes):
  theta = _angles(z, prototypes)
  # c = argmax <z, w_k> (Eq. A.39), ties to the first class, as the head's argmax does.
  cls = jnp.argmax(jnp.matmul(encoders_lib.unit(z), encoders_lib.unit(prototypes).T,
                              precision=jax.lax.Precision.HIGHEST), axis=1)
  theta_c = jnp.take_along_axis(theta, cls[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(cls, theta.shape[1], dtype=bool), jnp.inf, theta)
  # arccos is monotone, so this is >= 0 up to round-off; the clamp makes it exact.
  delta = jnp.maximum(jnp.min(others, axis=1) - theta_c, 0.0)
  return cls.astype(jnp.int32), delta


def angle_margin(z: ArrayLike, prototypes: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """The clean class and its angular margin under a cosine-prototype head.

  ``c = argmax_k <z, w_k>`` and ``Delta = min_{k != c} theta_k - theta_c`` with
  ``theta_k = angle(z, w_k)``. ``Delta = 0`` on a tie. In float32, angles near 0 or pi
  are resolved to ~3e-4 rad (arccos of a cosine within one ulp of +-1); elsewhere to
  ~1e-7 / sin(theta).

  Args:
    z: ``[B, D]`` features; for certification the unit mean direction
      ``u = f_s(x) / ||f_s(x)||`` (renormalised here).
    prototypes: ``[K, D]`` unit prototypes.

  Returns:
    ``(predicted_class [B] int32, delta [B] float32)``, ``delta`` in radians, in [0, pi].
  """
  dim = _check_features(z)
  check_prototypes(prototypes, dim)
  return _angle_margin(jnp.asarray(z, jnp.float32), jnp.asarray(prototypes, jnp.float32))


@jax.jit
def _prediction_radius(delta, deficit, sigma):
  # Phi^-1(h_LCB) from the deficit 1 - h_LCB, clipped to [1e-12, 1] (the "clip the LCB
  # below 1" of docs/method.md section 2, sound for any clip below 1), as for the feature
  # certificate: 1 - 1e-12 is not a float32 number, 1e-12 is.
  phi_inv_h = _bounds.probit_of_deficit(deficit)
  # Phi^-1((1 + cos(Delta/2)) / 2) = Phi^-1(cos^2(Delta/4)) = -Phi^-1(sin^2(Delta/4)).
  # Computing 1 + cos(Delta/2) in float32 would lose every digit of a small margin.
  delta = jnp.clip(delta, 0.0, jnp.pi)
  phi_inv_c = -ndtri(jnp.sin(delta / 4.0)**2)
  return sigma * (phi_inv_h - phi_inv_c)


def _deficit_of(h_lcb, deficit, b) -> jax.Array:
  """The ``[B]`` float32 deficit ``1 - h_LCB`` from exactly one of the two arguments."""
  if (h_lcb is None) == (deficit is None):
    raise ValueError("pass exactly one of h_lcb (the lower confidence bound L of h_u(x)) "
                     "and deficit (1 - L, as a certify.ScoreEstimate holds it).")
  if deficit is not None:
    _check_batch(deficit, "deficit", b)
    checks.check_deficit(deficit)
    return jnp.asarray(deficit, jnp.float32)
  _check_batch(h_lcb, "h_lcb", b)
  checks.check_probability(h_lcb, name="h_lcb", meaning="a lower confidence bound of the "
                           "score h_u(x) = (1 + <f_s(x), u>) / 2")
  # 1 - h is exact in float32 for h >= 1/2 (Sterbenz), where certificates live.
  return 1.0 - jnp.asarray(h_lcb, jnp.float32)


def prediction_radius(delta: ArrayLike, h_lcb: ArrayLike | None = None, *, sigma: float,
                      deficit: ArrayLike | None = None) -> jax.Array:
  """FS certified l2 radius of a cosine-prototype prediction (docs/method.md section 3).

      R_pred = sigma * ( Phi^-1(h_LCB) - Phi^-1( (1 + cos(Delta/2)) / 2 ) )

  The prediction ``c`` is certified for every ``x'`` with ``||x' - x|| < R_pred``;
  ``R_pred <= 0`` means not certified, not even at ``x`` itself.

  Why (beyond the paper; every step is an equivalence or a sound bound):

  1. Setting. ``u`` is a unit vector fixed before the ``n`` estimation samples are drawn
     (the mean direction of the ``n0`` selection samples, ``u ~ f_s(x)/||f_s(x)||``),
     ``h_u(x) = (1 + <f_s(x), u>) / 2`` and ``h_LCB <= h_u(x)`` with probability
     ``1 - alpha``. The classifier certified is ``x' -> argmax_k <f_s(x'), w_k>``, the
     cosine-prototype head on the smoothed feature; ``c = argmax_k <u, w_k>`` and
     ``Delta = min_{k != c} theta_k - theta_c``, ``theta_k = angle(u, w_k)``.
  2. Feature certificate (Salman et al.'s lemma applied to the fixed ``h_u``, docs/method.md
     section 2). For ``||x' - x|| <= eps``, with ``v = f_s(x')``:
     ``<v, u> >= 2 Phi(Phi^-1(h_u(x)) - eps/sigma) - 1 >= 2 Phi(Phi^-1(h_LCB) - eps/sigma) - 1
     =: gamma(eps)`` (Phi is increasing; clipping h_LCB down is sound too).
  3. From inner product to the cosine of the unnormalised ``v``. ``||v|| <= 1`` since
     ``v`` is a mean of unit vectors. If ``gamma(eps) > 0`` then ``<v, u> > 0``, so
     ``v != 0``, and ``cos(v, u) = <v, u> / ||v|| >= <v, u> >= gamma(eps)`` (dividing a
     positive number by ``||v|| <= 1`` does not shrink it). If ``gamma(eps) <= 0`` nothing
     is certified.
  4. Scale invariance. ``argmax_k <v, w_k> = argmax_k <z', w_k>`` for
     ``z' = v / ||v||``, a unit vector with ``cos(u, z') >= gamma(eps)``.
  5. Lemma A.3.1 with ``z = u``, ``phi = arccos(gamma(eps))`` in [0, pi/2): class ``c``
     keeps the argmax if ``cos(min(theta_c + phi, pi)) > cos(max(theta_k - phi, 0))`` for
     all ``k != c`` (Eq. A.44). cos is strictly decreasing on [0, pi], so this reads
     ``min(theta_c + phi, pi) < max(theta_k - phi, 0)``; the right side must be positive
     (the left is >= 0) and the left below pi (the right is <= pi), so it is exactly
     ``theta_c + phi < theta_k - phi``: certified iff ``2 phi < Delta``.
  6. ``Delta/2`` and ``phi`` lie in [0, pi/2], where cos is decreasing, so
     ``2 phi < Delta  <=>  gamma(eps) = cos(phi) > cos(Delta/2)``; as
     ``cos(Delta/2) >= 0``, this also gives the ``gamma(eps) > 0`` step 3 needs.
  7. Solve: ``2 Phi(Phi^-1(h_LCB) - eps/sigma) - 1 > cos(Delta/2)``
     ``<=> Phi^-1(h_LCB) - eps/sigma > Phi^-1((1 + cos(Delta/2)) / 2)``
     ``<=> eps < R_pred``. At ``eps = 0`` this is ``R_pred > 0``.

  The certificate holds for the true smoothed classifier at ``x`` too (``eps = 0``), even
  though ``u`` is only an estimate of the direction of ``f_s(x)``: step 2 never needs
  ``u`` to be exact, only fixed before the estimation samples.

  Precision (float32): everything is computed from the deficit ``1 - h_LCB`` clipped to
  ``[1e-12, 1]`` (the project's convention, ``certify._bounds``), so the clip below 1 is
  ``1 - 1e-12`` (``Phi^-1`` capped at 7.03, radius at ``7.03 sigma``) although that
  number is not a float32; ``(1 + cos(Delta/2)) / 2`` is computed as
  ``1 - sin^2(Delta/4)``, exact for small margins. Pass ``deficit`` when you have it:
  an ``h_LCB`` in float32 is itself only known to ~6e-8 near 1 (a float64 ``h_LCB``
  rounded to float32 may move up by half an ulp, <= 3e-8, e.g. 1e-6 sigma of radius at
  ``h_LCB = 0.9999``).

  Args:
    delta: ``[B]`` angular margins ``Delta`` in radians (from :func:`angle_margin`).
    h_lcb: ``[B]`` lower confidence bounds ``L`` of ``h_u(x)``, ``u`` the direction used
      for ``delta``. Exactly one of ``h_lcb`` and ``deficit``.
    sigma: smoothing noise level (> 0), in [0, 1] pixel units.
    deficit: ``[B]`` ``1 - L`` instead of ``h_lcb`` (``certify.ScoreEstimate.deficit``).

  Returns:
    ``[B]`` float32 radii; ``-inf`` when ``Delta = 0`` or ``L = 0``.
  """
  deficit = _check_radius_args(delta, h_lcb, deficit, sigma)
  return _prediction_radius(jnp.asarray(delta, jnp.float32), deficit,
                            jnp.asarray(sigma, jnp.float32))


def _check_radius_args(delta, h_lcb, deficit, sigma) -> jax.Array:
  """Checks the arguments of :func:`prediction_radius`; returns the ``[B]`` deficit."""
  checks.check_sigma(sigma)
  b = _check_batch(delta, "delta")
  # float32(pi) is just above pi: angle_margin's largest margin must pass.
  checks.check_in_range(delta, name="delta", low=0.0, high=float(np.float32(np.pi)),
                        meaning="an angular margin in radians, from angle_margin")
  return _deficit_of(h_lcb, deficit, b)


@jax.jit
def _required_margin(deficit, radius, sigma):
  # gamma(r) = 2 Phi(Phi^-1(h_LCB) - r / sigma) - 1 and Delta_r = 2 arccos(gamma(r)); with
  # p = Phi(.) and cos(2t) = 2 cos^2(t) - 1 this is 4 arccos(sqrt(p)), and 1 - p is kept as
  # the tail Phi(-(.)) so that p near 1 keeps its digits: arcsin(sqrt(1 - p)) = arccos(sqrt(p)).
  tail = jax.scipy.special.ndtr(radius / sigma - _bounds.probit_of_deficit(deficit))
  return 4.0 * jnp.arcsin(jnp.sqrt(tail))


def required_margin(h_lcb: ArrayLike | None = None, *, sigma: float, radius: float = 0.0,
                    deficit: ArrayLike | None = None) -> jax.Array:
  """The angular margin ``Delta`` a prediction needs to be certified at ``radius``.

  The inverse of :func:`prediction_radius` in ``Delta``: ``prediction_radius(Delta, L) >
  radius`` iff ``Delta > required_margin(L, radius=radius)``, with

      Delta_r = 2 arccos(gamma(r)) = 4 arccos( sqrt( Phi(Phi^-1(L) - r / sigma) ) ),
      gamma(r) = 2 Phi(Phi^-1(L) - r / sigma) - 1  (the certified cosine at radius r).

  At ``radius = 0`` this is ``4 arccos(sqrt(L))``: the margin a prediction needs to be
  certified at all. Values ``>= pi`` can never be met (``Delta <= pi``). Table 2 plots
  each image's measured margin against it.

  Args:
    h_lcb: ``[B]`` lower confidence bounds ``L`` of ``h_u(x)``; or pass ``deficit``.
    sigma: smoothing noise level (> 0).
    radius: the l2 radius (>= 0) to certify.
    deficit: ``[B]`` ``1 - L`` instead of ``h_lcb``.

  Returns:
    ``[B]`` float32 margins in radians, in ``[0, 2 pi]``.
  """
  checks.check_sigma(sigma)
  if np.ndim(radius):
    raise ValueError(f"radius must be one l2 radius (a scalar), got shape {np.shape(radius)}; "
                     "call required_margin once per radius.")
  checks.check_in_range(radius, name="radius", low=0.0, high=np.inf,
                        meaning="an l2 radius in [0, 1] pixel units")
  given = deficit if h_lcb is None else h_lcb
  b = None if given is None else _check_batch(given, "deficit" if h_lcb is None else "h_lcb")
  return _required_margin(_deficit_of(h_lcb, deficit, b), jnp.float32(radius),
                          jnp.float32(sigma))


def certified_prediction(delta: ArrayLike, predicted_class: ArrayLike,
                         h_lcb: ArrayLike | None = None, *, sigma: float,
                         deficit: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
  """FS certified prediction: the class where ``R_pred > 0``, else abstain.

  Args:
    delta: ``[B]`` angular margins (radians) from :func:`angle_margin`.
    predicted_class: ``[B]`` classes ``c`` from :func:`angle_margin`.
    h_lcb: ``[B]`` lower confidence bounds ``L`` of ``h_u(x)``; or pass ``deficit``.
    sigma: smoothing noise level (> 0).
    deficit: ``[B]`` ``1 - L`` instead of ``h_lcb``.

  Returns:
    ``(cls [B] int32, radius [B] float32)``: ``cls = ABSTAIN (-1)`` and ``radius = 0``
    where ``R_pred <= 0`` (not certified even at ``eps = 0``; core.py's convention), else
    ``c`` and ``R_pred`` (:func:`prediction_radius`).
  """
  deficit = _check_radius_args(delta, h_lcb, deficit, sigma)
  _check_batch(predicted_class, "predicted_class", np.shape(delta)[0])
  if checks.is_concrete(predicted_class):
    c = np.asarray(predicted_class)
    if not np.issubdtype(c.dtype, np.integer) or np.any(c < 0):
      raise ValueError(f"predicted_class must be class indices >= 0 (from angle_margin), got "
                       f"dtype {c.dtype} with minimum {c.min()}.")
  return certified_prediction_unchecked(delta, predicted_class, deficit, sigma)


def certified_prediction_unchecked(delta, predicted_class, deficit, sigma
                                   ) -> tuple[jax.Array, jax.Array]:
  """:func:`certified_prediction` of arguments its caller has validated (the pipeline's)."""
  radius = _prediction_radius(jnp.asarray(delta, jnp.float32),
                              jnp.asarray(deficit, jnp.float32), jnp.asarray(sigma, jnp.float32))
  certified = radius > 0
  cls = jnp.where(certified, jnp.asarray(predicted_class, jnp.int32), ABSTAIN)
  return cls, jnp.where(certified, radius, 0.0)


@jax.jit
def _per_class_radius(deficits, predicted_class, sigma):
  # probit_of_deficit(d) = Phi^-1(1 - d): Phi^-1(L_c) for the class, -Phi^-1(U_k) for the
  # others (their deficit IS the upper bound U_k); both clipped as docs/method.md says.
  probit = _bounds.probit_of_deficit(deficits)
  is_c = jax.nn.one_hot(predicted_class, deficits.shape[1], dtype=bool)
  lower = jnp.sum(jnp.where(is_c, probit, 0.0), axis=1)
  others = jnp.min(jnp.where(is_c, jnp.inf, probit), axis=1)
  return 0.5 * sigma * (lower + others)


def per_class_radius(class_deficits: ArrayLike, predicted_class: ArrayLike, *,
                     sigma: float) -> jax.Array:
  """The per-class certified radius of a cosine-prototype prediction (docs/method.md 3b).

      R_pc = sigma / 2 * ( Phi^-1(L_c) - max_{k != c} Phi^-1(U_k) )

  where ``g_k(x) = (1 + <f_s(x), w_k>) / 2`` in [0, 1] is the smoothed score of prototype k
  (a mean of ``(1 + <f(x + delta), w_k>) / 2``, a [0, 1]-valued function of the noise),
  ``L_c <= g_c(x)`` and ``U_k >= g_k(x)`` for every ``k != c`` simultaneously. Why:
  Salman et al.'s lemma (the one behind the feature certificate) makes every
  ``x -> Phi^-1(g_k(x))`` ``1/sigma``-Lipschitz, so for ``||x' - x|| = eps``:
  ``Phi^-1(g_c(x')) >= Phi^-1(L_c) - eps/sigma`` and
  ``Phi^-1(g_k(x')) <= Phi^-1(U_k) + eps/sigma``; ``g_c(x') > g_k(x')`` for every ``k != c``
  (Phi^-1 is increasing) whenever ``eps < R_pc``. ``argmax_k g_k(x') = argmax_k
  <f_s(x'), w_k>``, the classifier Theorem A.3.2 certifies, so both certificates are about
  the same prediction. ``R_pc <= 0``: not certified.

  The deficits are those a :class:`certify.ScoreEstimate` holds, one per class: for
  ``k = c``, ``1 - L_c``, ``L_c`` a lower bound of ``g_c``; for ``k != c``, ``1 - L'_k``,
  ``L'_k`` a lower bound of ``1 - g_k = (1 + <f_s(x), -w_k>) / 2``, i.e. the upper bound
  ``U_k = 1 - L'_k`` itself. Every bound is a lower bound of ``h_v = (1 + <f_s, v>) / 2``
  for the signed prototype ``v = w_c`` or ``-w_k``; clipping each deficit to
  ``[1e-12, 1]`` only loosens them.

  Args:
    class_deficits: ``[B, K]`` deficits as above, in [0, 1].
    predicted_class: ``[B]`` the class ``c`` the bounds were taken for.
    sigma: the noise level (> 0).

  Returns:
    ``[B]`` float32 radii (``-inf`` where ``L_c = 0`` or some ``U_k = 1``).
  """
  checks.check_sigma(sigma)
  shape = np.shape(class_deficits)
  if len(shape) != 2 or shape[1] < 2:
    raise ValueError(f"class_deficits must have shape [B, K] with K >= 2 (one bound per "
                     f"class of each image), got shape {shape}.")
  _check_batch(predicted_class, "predicted_class", shape[0])
  checks.check_deficit(class_deficits, name="class_deficits")
  if checks.is_concrete(predicted_class):
    c = np.asarray(predicted_class)
    if not np.issubdtype(c.dtype, np.integer) or np.any(c < 0) or np.any(c >= shape[1]):
      raise ValueError(f"predicted_class must be class indices in [0, {shape[1]}), got dtype "
                       f"{c.dtype} with range [{c.min()}, {c.max()}].")
  return _per_class_radius(jnp.asarray(class_deficits, jnp.float32),
                           jnp.asarray(predicted_class, jnp.int32), jnp.float32(sigma))


# ----------------------------------------------------------------------------------------
# RS baseline: Cohen, Rosenfeld & Kolter (2019), on class counts.
# ----------------------------------------------------------------------------------------


def clopper_pearson_lower(k: ArrayLike, n: ArrayLike, alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion.

  ``Beta.ppf(alpha; k, n - k + 1)``, and 0 when ``k = 0``; equal to statsmodels'
  ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``, the bound of Cohen
  et al.'s ``lower_confidence_bound`` in core.py.

  Args:
    k: successes, integer array (any shape, broadcast against ``n``), ``0 <= k <= n``.
    n: trials, integer array, ``n >= 1``.
    alpha: failure probability in (0, 1).

  Returns:
    float64 array of the broadcast shape.
  """
  checks.check_alpha(alpha)
  k, n = np.broadcast_arrays(np.asarray(k), np.asarray(n))
  for name, a in (("k", k), ("n", n)):
    if not (np.issubdtype(a.dtype, np.integer) or np.all(a == np.round(a))):
      raise ValueError(f"{name} must be whole numbers (counts), got {a.dtype} non-integers.")
  if np.any(n < 1):
    raise ValueError(f"n must be >= 1 trials, got minimum {n.min()}.")
  if np.any(k < 0) or np.any(k > n):
    raise ValueError("k must satisfy 0 <= k <= n (successes out of n trials).")
  k = k.astype(np.float64)
  n = n.astype(np.float64)
  out = np.zeros(k.shape, np.float64)
  pos = k > 0
  out[pos] = stats.beta.ppf(alpha, k[pos], n[pos] - k[pos] + 1)
  return out


def rs_certify_from_counts(counts0: ArrayLike, counts: ArrayLike, *, sigma: float,
                           alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """Cohen et al.'s CERTIFY on counts (core.py ``Smooth.certify``).

  ``c = argmax counts0`` (selection, ``n0`` samples; ties to the first class), ``pA`` the
  Clopper-Pearson lower bound of ``counts[c]`` out of ``n = sum(counts)`` (estimation,
  fresh samples), radius ``sigma * Phi^-1(pA)``.

  Abstain when ``pA <= 1/2`` (docs/method.md). core.py abstains on ``pA < 0.5``; at
  ``pA = 1/2`` exactly Cohen's theorem needs ``pA > pB`` with ``pB = 1 - pA = 1/2``,
  which fails, and the radius would be 0 anyway, so the spec's ``<=`` is the sound one.
  (A Clopper-Pearson bound equal to 1/2 to the last bit is practically impossible, so
  the two agree on real data.)

  Args:
    counts0: ``[B, K]`` selection counts per class.
    counts: ``[B, K]`` estimation counts per class, from samples independent of counts0.
    sigma: smoothing noise level (> 0).
    alpha: failure probability in (0, 1) (Cohen: 0.001).

  Returns:
    ``(cls [B] int64, radius [B] float64)``; ``cls = ABSTAIN (-1)``, ``radius = 0`` on
    abstention.
  """
  checks.check_sigma(sigma)
  checks.check_alpha(alpha)
  counts0 = _check_counts(counts0, "counts0")
  counts = _check_counts(counts, "counts")
  if counts0.shape != counts.shape:
    raise ValueError(f"counts0 {counts0.shape} and counts {counts.shape} must have the same "
                     "shape [B, K] (same images, same classes).")
  return rs_certify_unchecked(counts0, counts, sigma, alpha)


def rs_certify_unchecked(counts0: np.ndarray, counts: np.ndarray, sigma: float,
                         alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """:func:`rs_certify_from_counts` of arguments its caller has validated (the pipeline's)."""
  counts0, counts = np.asarray(counts0, np.int64), np.asarray(counts, np.int64)
  c_hat = np.argmax(counts0, axis=1)
  n_a = counts[np.arange(len(c_hat)), c_hat]
  p_a = clopper_pearson_lower(n_a, counts.sum(axis=1), alpha)
  certified = p_a > 0.5
  radius = np.where(certified, float(sigma) * stats.norm.ppf(p_a), 0.0)
  return np.where(certified, c_hat, ABSTAIN), radius


def rs_predict_from_counts(counts: ArrayLike, *, alpha: float) -> np.ndarray:
  """Cohen et al.'s PREDICT on counts (core.py ``Smooth.predict``).

  Top two classes ``A``, ``B`` with counts ``nA >= nB``; abstain when the two-sided
  binomial test of ``nA`` out of ``nA + nB`` at ``p = 1/2`` has p-value ``> alpha``
  (``scipy.stats.binomtest``, the successor of core.py's ``binom_test``). The answer is
  wrong (not abstaining, not the smoothed class) with probability at most ``alpha``.

  Args:
    counts: ``[B, K]`` per-class counts of ``n`` noisy samples.
    alpha: failure probability in (0, 1).

  Returns:
    ``[B]`` int64 classes, ``ABSTAIN (-1)`` where the test abstains.
  """
  checks.check_alpha(alpha)
  counts = _check_counts(counts, "counts")
  order = np.argsort(-counts, axis=1, kind="stable")
  rows = np.arange(counts.shape[0])
  n_a, n_b = counts[rows, order[:, 0]], counts[rows, order[:, 1]]
  out = np.full(counts.shape[0], ABSTAIN, np.int64)
  for i in range(counts.shape[0]):
    if stats.binomtest(int(n_a[i]), int(n_a[i] + n_b[i]), 0.5).pvalue <= alpha:
      out[i] = order[i, 0]
  return out


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------


def certified_accuracy(pred_class: ArrayLike, radius: ArrayLike, labels: ArrayLike,
                       radii: ArrayLike, *, num_classes: int | None = None) -> jax.Array:
  """Certified accuracy at each radius (Table 2; Cohen et al.'s ``analyze.py``).

  The fraction of images whose certified class is the label and whose radius is
  ``>= r``. An abstention (``-1``) is never correct. Non-increasing in ``r``.

  Args:
    pred_class: ``[B]`` certified classes, ``-1`` for abstain.
    radius: ``[B]`` certified radii.
    labels: ``[B]`` true classes in ``[0, num_classes)``.
    radii: ``[R]`` radii at which to evaluate.
    num_classes: if given, ``labels`` and ``pred_class`` must be below it.

  Returns:
    ``[R]`` float32 certified accuracies in [0, 1].
  """
  b = _check_batch(pred_class, "pred_class")
  _check_batch(radius, "radius", b)
  _check_batch(labels, "labels", b)
  if np.ndim(radii) != 1:
    raise ValueError(f"radii must have shape [R], got shape {np.shape(radii)}.")
  if checks.is_concrete(labels):
    lab = np.asarray(labels)
    if np.any(lab < 0) or (num_classes is not None and np.any(lab >= num_classes)):
      raise ValueError(
          f"labels must lie in [0, {num_classes if num_classes is not None else 'K'}), got "
          f"range [{lab.min()}, {lab.max()}]; -1 is reserved for abstention.")
  if checks.is_concrete(pred_class) and num_classes is not None:
    p = np.asarray(pred_class)
    if np.any(p < ABSTAIN) or np.any(p >= num_classes):
      raise ValueError(f"pred_class must lie in [-1, {num_classes}), got range "
                       f"[{p.min()}, {p.max()}].")
  pred_class = jnp.asarray(pred_class)
  correct = (pred_class == jnp.asarray(labels)) & (pred_class != ABSTAIN)
  radius = jnp.asarray(radius, jnp.float32)
  radii = jnp.asarray(radii, jnp.float32)
  return jnp.mean(correct[None, :] & (radius[None, :] >= radii[:, None]), axis=1,
                  dtype=jnp.float32)
