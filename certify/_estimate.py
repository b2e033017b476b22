"""What the LLM receives: a bound on the n-sample estimate z_n (docs/method.md section 2d).

A smoothed MLLM (``fsjax.smoothing.SmoothedEncoder``) hands its language side the
direction of the Monte Carlo mean ``z_n(x') = (1/n) sum_i f(x' + delta_i)`` of ``n`` fresh
noise samples, not the exact smoothed feature ``f_s(x')`` the feature certificate bounds.
With the certificate's ``<f_s(x'), u> >= B`` and ``||f_s(x')|| <= U`` (section 2c; U = 1
without the norm), two facts give a bound on ``cos(z_n(x'), u)``:

* **Concentration (dimension-free).** The ``X_i = f(x' + delta_i) - f_s(x')`` are
  independent, mean zero, ``||X_i|| <= a = 1 + U`` and ``E||X_i||^2 = 1 - ||f_s(x')||^2 <=
  v = 1 - B^2`` (as ``||f_s(x')|| >= <f_s(x'), u> >= B >= 0``). Pinelis' Bennett
  inequality in a Hilbert space (Pinelis 1994, Theorem 3.4 with D = 1) gives
  ``P(||z_n - f_s|| >= t) <= 2 exp(-n (v / a^2) h(t a / v))``, ``h(s) = (1 + s) ln(1 + s)
  - s``, and its Hoeffding form (Theorem 3.5) ``2 exp(-n t^2 / (2 a^2))``; the radius ``t``
  is the smaller of the two solutions at ``alpha`` (each alone holds at level alpha).
* **Geometry.** Every z with ``||z - f|| <= t`` for some f in ``{<f, u> >= B, ||f|| <=
  U}`` and ``t < B`` has ``cos(z, u) >= cos(arccos(B / U) + arcsin(t / U)) = (B sqrt(U^2 -
  t^2) - t sqrt(U^2 - B^2)) / U^2`` (the worst f is the corner ``<f, u> = B``, ``||f|| =
  U``).

The bound holds per query with probability ``1 - alpha`` over the query's noise, for an
``x'`` chosen without knowing that noise (a fresh key per call), on top of the
certificate's own ``1 - alpha_certificate``. Everything here is host-side float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np

from certify import _closed_form
from certify import _norm
from fsjax import checks

_BISECTION_STEPS = 200


def _bennett_h(s: np.ndarray) -> np.ndarray:
  """``h(s) = (1 + s) ln(1 + s) - s`` for s >= 0, without cancellation at small s."""
  s = np.asarray(s, np.float64)
  small = s < 1e-3
  ss = np.where(small, s, 0.0)
  series = ss**2 / 2 - ss**3 / 6 + ss**4 / 12 - ss**5 / 20
  big = np.where(small, 1.0, s)
  return np.where(small, series, (1.0 + big) * np.log1p(big) - big)


def _check_common(n, alpha) -> int:
  n = checks.check_positive_int(n, name="n", meaning="noise samples of the estimate the "
                                "LLM receives (SmoothedEncoder.n)")
  checks.check_alpha(alpha)
  return n


def concentration_radius(n: int, variance, *, alpha: float, bound=2.0) -> np.ndarray:
  """``t`` with ``P(||z_n - f_s|| >= t) <= alpha`` for the mean of n unit-vector samples.

  Args:
    n: samples in the mean.
    variance: ``[...]`` an upper bound on ``E||f - f_s||^2 = 1 - ||f_s||^2``, in [0, 4].
    alpha: failure probability.
    bound: ``a >= ||f - f_s||`` almost surely (``1 + ||f_s||``; 2 always holds), in (0, 2].

  Returns:
    ``[...]`` float64 radii in [0, a]: Pinelis' Bennett and Hoeffding forms, the smaller.
  """
  n = _check_common(n, alpha)
  checks.check_in_range(variance, name="variance", low=0.0, high=4.0,
                        meaning="an upper bound on E||f - f_s||^2 = 1 - ||f_s||^2")
  checks.check_in_range(bound, name="bound", low=1e-12, high=2.0,
                        meaning="a bound on ||f - f_s||, 1 + ||f_s|| <= 2")
  a = np.asarray(bound, np.float64)
  v = np.maximum(np.asarray(variance, np.float64), 1e-300)
  a, v = np.broadcast_arrays(a, v)
  log_term = math.log(2.0 / alpha)
  hoeffding = a * np.sqrt(2.0 * log_term / n)
  # Bennett: smallest s = t a / v with n (v / a^2) h(s) >= log(2 / alpha); bisection on
  # log s keeps the upper end (h is increasing), so the radius is never understated.
  target = log_term * a**2 / (n * v)
  lo, hi = np.full(v.shape, -60.0), np.full(v.shape, 60.0)
  for _ in range(_BISECTION_STEPS):
    mid = 0.5 * (lo + hi)
    above = _bennett_h(np.exp(mid)) >= target
    lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
  bennett = np.exp(hi) * v / a
  return np.minimum(np.minimum(bennett, hoeffding), a)


def _check_bounds(inner_bound, norm_upper):
  checks.check_in_range(inner_bound, name="inner_bound", low=-1.0, high=1.0,
                        meaning="the certificate's B(eps), a lower bound on <f_s(x'), u>")
  checks.check_in_range(norm_upper, name="norm_upper", low=0.0, high=1.0,
                        meaning="the certificate's U(eps) >= ||f_s(x')|| (1 without the "
                        "norm-aware certificate)")
  b = np.asarray(inner_bound, np.float64)
  u = np.asarray(norm_upper, np.float64)
  b, u = np.broadcast_arrays(b, u)
  # U >= ||f_s(x')|| >= B whenever both bounds hold; a failed bound must not give U < B.
  return b, np.maximum(u, np.maximum(b, 1e-300))


def cosine_of_perturbed(inner_bound, norm_upper, radius) -> np.ndarray:
  """``min cos(z, u)`` over ``||z - f|| <= radius``, ``<f, u> >= B``, ``||f|| <= U``.

  ``(B sqrt(U^2 - t^2) - t sqrt(U^2 - B^2)) / U^2`` where ``0 <= t < B``; -1 (vacuous)
  where ``B <= 0`` or ``t >= B`` (the ball then reaches the origin's side).
  """
  b, u = _check_bounds(inner_bound, norm_upper)
  t = np.broadcast_to(np.asarray(radius, np.float64), b.shape)
  ok = (b > 0) & (t < b)
  tt = np.where(ok, t, 0.0)
  val = (b * np.sqrt(np.maximum(u**2 - tt**2, 0.0))
         - tt * np.sqrt(np.maximum(u**2 - b**2, 0.0))) / u**2
  return np.where(ok, np.clip(val, -1.0, 1.0), -1.0)


def estimate_cosine_bound(inner_bound, norm_upper=1.0, *, n: int, alpha: float) -> np.ndarray:
  """A lower bound on ``cos(z_n(x'), u)``, the direction the LLM receives (per query).

  Args:
    inner_bound: ``[...]`` the certificate's ``B(eps)`` (``inner_product_bound``).
    norm_upper: ``[...]`` its ``U(eps)`` (``certify.norm_bound``), or 1 (plain certificate).
    n: noise samples of the estimate (``SmoothedEncoder.n``).
    alpha: per-query failure probability of the concentration term (added to the
      certificate's own).

  Returns:
    ``[...]`` float64 in [-1, 1]; -1 where nothing is certified.
  """
  n = _check_common(n, alpha)
  b, u = _check_bounds(inner_bound, norm_upper)
  t = concentration_radius(n, 1.0 - np.clip(b, 0.0, 1.0)**2, alpha=alpha, bound=1.0 + u)
  return cosine_of_perturbed(b, u, t)


def samples_for_tolerance(inner_bound, norm_upper=1.0, *, tolerance: float,
                          alpha: float, max_n: int = 10**9) -> np.ndarray:
  """The smallest n with ``estimate_cosine_bound >= B / U - tolerance`` (int64 ``[...]``).

  The certified cosine of the exact ``f_s`` is ``B / U``; ``tolerance`` is what the
  estimate may lose. ``max_n + 1`` where even ``max_n`` samples do not reach it (B <= 0,
  or ``B / U - tolerance`` at or below the cosine a radius of ``B`` allows).
  """
  checks.check_in_range(tolerance, name="tolerance", low=1e-9, high=2.0,
                        meaning="the cosine the estimate may lose against B / U")
  checks.check_alpha(alpha)
  b, u = _check_bounds(inner_bound, norm_upper)
  target = b / u - tolerance
  lo = np.zeros(b.shape, np.int64)            # not enough
  hi = np.full(b.shape, int(max_n) + 1, np.int64)  # enough (or the cap)
  while np.any(hi - lo > 1):
    mid = (lo + hi) // 2
    good = np.stack([estimate_cosine_bound(bi, ui, n=max(int(m), 1), alpha=alpha)
                     for bi, ui, m in zip(b.ravel(), u.ravel(), mid.ravel())]
                    ).reshape(b.shape) >= target
    good &= hi - lo > 1
    hi = np.where(good, mid, hi)
    lo = np.where(good | (hi - lo <= 1), lo, mid)
  return hi


def llm_input_bounds(deficit, norm_upper, eps, sigma, *, n: int, alpha: float
                     ) -> tuple[np.ndarray, np.ndarray]:
  """From a norm-aware certificate to both cosines at radius ``eps`` (per image).

  Args:
    deficit: ``[...]`` ``1 - L`` of the certificate (``NormAwareCertificate.deficit``).
    norm_upper: ``[...]`` its N >= ||f_s(x)|| (``NormAwareCertificate.norm_upper``; 1 for a
      plain certificate).
    eps: ``[...]`` l2 radii, broadcast against ``deficit`` (e.g. each image's attack).
    sigma: the certificate's noise level.
    n: samples of the estimate the LLM receives.
    alpha: per-query failure probability of the concentration term.

  Returns:
    ``(cos_fs, cos_zn)`` float64: the certified ``cos(f_s(x'), u)`` (``B / U``, -1 where B
    < 0; section 2c) and the bound on ``cos(z_n(x'), u)`` (section 2d), -1 where vacuous.
  """
  checks.check_deficit(deficit)
  checks.check_nonnegative(eps, name="eps", meaning="an l2 radius in [0, 1] pixel units")
  checks.check_sigma(sigma)
  b = np.asarray(_closed_form.bound_from_deficit(deficit, eps, np.float32(sigma)), np.float64)
  u = np.asarray(_norm.norm_bound(norm_upper, eps, sigma), np.float64)
  u = np.maximum(np.minimum(u, 1.0), np.maximum(b, 0.0))
  b = np.clip(b, -1.0, 1.0)
  cos_fs = np.where(b >= 0, np.minimum(b / np.maximum(u, 1e-300), 1.0), -1.0)
  return cos_fs, estimate_cosine_bound(b, u, n=n, alpha=alpha)
