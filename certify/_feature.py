"""The feature certificate, estimated honestly (docs/method.md section 2, "Estimating it honestly").

Two stages, as in Cohen et al.'s CERTIFY:

1. ``n0`` noise samples (indices ``0 .. n0-1``) give the smoothed-feature direction
   ``u_mean = f_s(x) / ||f_s(x)||`` (estimated), first-stage means (the centres of the
   second stage's sums) and the variance that sizes the betting bound's bets.
2. ``n`` fresh samples (indices ``n0 .. n0+n-1``, disjoint from stage 1) give
   ``h_u = (1 + <f(x + delta), u>) / 2`` for each reference u, summed into running sums
   from which every lower confidence bound of :mod:`certify._bounds` follows.

References: ``"clean"`` is the paper's u = f(x) (then h_u is S(x), Eq. 5);
``"mean"`` is u = the stage-1 mean direction, for which h_u = (1 + ||f_s(x)||)/2 >= S(x)
in expectation: never worse, and it bounds cos(f_s(x'), u), the smoothed-vs-smoothed
similarity a downstream model sees.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from certify import _bounds
from certify import _closed_form
from certify import _prediction
from fsjax import checks
from fsjax import encoders as encoders_lib
from fsjax import smoothing

REFERENCES = ("clean", "mean")
DEFAULT_ALPHA = 0.001  # Cohen et al. 2019


def check_certify_args(*, sigma, n: int, n0: int | None = None, alpha: float | None = None,
                       bound: str | None = None, reference: str | None = None,
                       eps=None, chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE) -> None:
  """Validates certification settings; each error names the argument and the fix."""
  smoothing.check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  checks.check_positive_int(n, name="n", minimum=2, meaning="second-stage noise samples; "
                            "the Bernstein bound needs a sample variance")
  if n0 is not None:
    checks.check_positive_int(n0, name="n0", meaning="first-stage noise samples, which "
                              "choose the mean direction")
  if alpha is not None:
    checks.check_alpha(alpha)
  if bound is not None:
    checks.check_choice(bound, name="bound", choices=_bounds.BOUNDS)
  if reference is not None:
    checks.check_choice(reference, name="reference", choices=REFERENCES)
  if eps is not None:
    _closed_form._check_eps(eps)  # pylint: disable=protected-access


def _inner(features: jax.Array, references: jax.Array) -> jax.Array:
  """``<f(x + delta_k), u_r>``: ``features [B, k, D]``, ``references [B, R, D]`` -> ``[B, k, R]``.

  HIGHEST precision whatever ``jax_default_matmul_precision`` says: on GPUs the default
  float32 matmul may run in TF32 or bfloat16 (an error of ~1e-3 in a cosine), more than
  the score deficits the bounds resolve, so an accelerator could otherwise overstate a
  certificate. The encoder itself may run at any precision: the certificate is about the
  function it computes, as long as the scores of that function are computed exactly.
  """
  return jnp.einsum("bkd,brd->bkr", features, references, precision=jax.lax.Precision.HIGHEST)


def _clean_deficit(features: jax.Array, clean: jax.Array) -> jax.Array:
  """``1 - s(x + delta, x) = (1 - cos) / 2`` for ``features [B, k, D]``, ``clean [B, D]``."""
  return 0.5 * (1.0 - _inner(features, clean[:, None, :])[..., 0])


def _stage1_statistic(features, clean):
  deficit = _clean_deficit(features, clean)
  return {"feature": features, "deficit": deficit, "deficit_sq": deficit * deficit}


def _stage2_statistic(features, references, center, bets=None):
  scores = 0.5 * (1.0 + _inner(features, references))  # [B, k, R], h_u (docs/method.md 2)
  return _bounds.score_statistics(scores, center, bets)


@functools.partial(jax.jit, static_argnames=("encoder", "n", "chunk_size"))
def _robustness_score(params, x, key, sigma, *, encoder, n, chunk_size, reporter=None):
  clean = encoder(params, x, sigma=sigma)
  total = smoothing.monte_carlo_sum(
      params, x, key, (clean,), encoder=encoder, sigma=sigma, n=n, chunk_size=chunk_size,
      statistic=lambda f, c: {"deficit": _clean_deficit(f, c)}, reporter=reporter)
  return 1.0 - total["deficit"] / n


def gaussian_robustness_score(params: Any, x: jax.typing.ArrayLike, *,
                              encoder: encoders_lib.Encoder, sigma: float, n: int,
                              key: jax.Array,
                              chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                              progress: smoothing.Progress | None = None) -> jax.Array:
  """Monte Carlo estimate of the Gaussian robustness score S(x) (Eq. 5).

  ``S(x) = E_delta[(1 + cos(f(x + delta), f(x))) / 2]``, a point estimate over n samples.

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder (static).
    sigma: noise level > 0, pixel units.
    n: number of noise samples.
    key: PRNG key.
    chunk_size: samples per vectorised chunk.
    progress: optional callable, called with the number of noise samples done as the
      chunks finish (:func:`fsjax.smoothing.with_progress`; the result does not change).

  Returns:
    ``[B]`` float32 in [0, 1].
  """
  encoders_lib.check_images(x)
  smoothing.check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  return smoothing.with_progress(
      progress, _robustness_score, params, jnp.asarray(x, jnp.float32), key,
      jnp.float32(sigma), encoder=encoder, n=int(n), chunk_size=int(chunk_size))


@functools.partial(jax.jit,
                   static_argnames=("encoder", "n0", "n", "alpha", "bounds", "chunk_size"))
def _score_deficits(params, x, key, sigma, *, encoder, n0, n, alpha, bounds, chunk_size,
                    reporter=None):
  """Both stages; returns ``{bound: deficit [B, 2]}`` for references (clean, mean).

  Every bound needs only sums over the stage-2 samples (the betting wealth too: a sum of
  logs, with bets fixed by stage 1), so the engine's running sums are all there is.
  """
  clean = encoder(params, x, sigma=sigma)  # f(x), [B, D]
  stage1 = smoothing.monte_carlo_sum(
      params, x, key, (clean,), encoder=encoder, sigma=sigma, n=n0, chunk_size=chunk_size,
      statistic=_stage1_statistic, reporter=reporter)
  mean = stage1["feature"] / n0  # estimate of f_s(x), Eq. 3
  mean_norm = jnp.linalg.norm(mean, axis=-1)
  u_mean = _prediction._unit(mean)  # pylint: disable=protected-access
  references = jnp.stack([clean, u_mean], axis=1)  # [B, 2, D] in REFERENCES order
  clean_deficit = stage1["deficit"] / n0
  center = jnp.stack([1.0 - clean_deficit, 0.5 * (1.0 + mean_norm)], axis=1)  # [B, 2]
  # Stage-1 variance of the clean scores sizes the bets for both references; any value
  # independent of stage 2 keeps the betting bound valid (it only affects tightness).
  var0 = jnp.maximum(stage1["deficit_sq"] / n0 - clean_deficit**2, 0.0) * n0 / max(n0 - 1, 1)
  aux = (references, center)
  if "betting" in bounds:
    aux += (_bounds.bet_sizes(jnp.stack([var0, var0], axis=1), n=n, alpha=alpha),)
  stage2 = smoothing.monte_carlo_sum(
      params, x, key, aux, encoder=encoder, sigma=sigma, n=n, chunk_size=chunk_size,
      statistic=_stage2_statistic, first_index=n0, reporter=reporter)
  stats = _bounds.ScoreStats(*stage2)
  deficits = {bound: _bounds.lower_confidence_bound(stats, center, n=n, alpha=alpha, bound=bound)
              for bound in bounds}
  return deficits, references


def score_deficits(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                   sigma: float, key: jax.Array, n: int = 10_000, n0: int = 100,
                   alpha: float = DEFAULT_ALPHA, bounds: Sequence[str] = _bounds.BOUNDS,
                   chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                   progress: smoothing.Progress | None = None
                   ) -> dict[str, dict[str, jax.Array]]:
  """Every bound for every reference from one two-stage Monte Carlo run.

  What ``certify.run`` uses to fill a whole table from one pass over the noise.

  ``bounds`` picks which bounds to compute ("betting" adds a few thousand logs per sample
  and reference; the others are nearly free). ``progress``, if given, is called with the
  number of noise samples done as the chunks of both stages finish (n0 + n in all; see
  :func:`fsjax.smoothing.with_progress`): the results are the same bits, and the call
  returns when they are ready. Other arguments as in :func:`fcsb`.

  Returns:
    ``{reference: {bound: deficit [B], "direction": u [B, D]}}``: ``1 - L`` where L is the
    point estimate (``"point"``) or the (1 - alpha) lower confidence bound of h_u(x), and
    the unit reference direction u itself. Deficits keep the precision near 1; feed them
    to ``certify.fcsb_from_score(1 - d, ...)`` or use :func:`fcsb` directly.
  """
  encoders_lib.check_images(x)
  check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, chunk_size=chunk_size)
  for bound in bounds:
    check_certify_args(sigma=sigma, n=n, bound=bound)
  deficits, references = smoothing.with_progress(
      progress, _score_deficits, params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma),
      encoder=encoder, n0=int(n0), n=int(n), alpha=float(alpha), bounds=tuple(bounds),
      chunk_size=int(chunk_size))
  out = {ref: {bound: d[:, i] for bound, d in deficits.items()}
         for i, ref in enumerate(REFERENCES)}
  for i, ref in enumerate(REFERENCES):
    out[ref]["direction"] = references[:, i]
  return out


class FeatureCertificate(NamedTuple):
  """The certified bound of Theorem 3.2 for a batch of images.

  Attributes:
    score: ``[B]`` the score h_u(x) the bound was computed from: the lower confidence
      bound at level 1 - alpha, or the plug-in point estimate when ``bound="point"``.
    inner_product_bound: ``[B]`` or ``[B, E]``: B(eps), a bound on ``<f_s(x'), u>`` for
      every ``||x' - x|| <= eps``.
    cosine_bound: same shape: the certified cosine ``cos(f_s(x'), u) >= cosine_bound``;
      where B < 0 the cosine is not certified and this is the vacuous -1.
    certified: same shape, bool: B >= 0 (the cosine bound is meaningful).
    direction: ``[B, D]`` the unit reference u the bound is about.
    is_certificate: False for ``bound="point"`` (the paper's plug-in estimate).
  """
  score: jax.Array
  inner_product_bound: jax.Array
  cosine_bound: jax.Array
  certified: jax.Array
  direction: jax.Array
  is_certificate: bool


def certificate_from_deficit(deficit: jax.Array, direction: jax.Array, *, eps, sigma: float,
                             is_certificate: bool) -> FeatureCertificate:
  """Builds a :class:`FeatureCertificate` from a score deficit ``1 - h`` of shape ``[B]``."""
  eps = jnp.asarray(eps, jnp.float32)
  d = deficit[:, None] if eps.ndim else deficit
  inner = _closed_form.bound_from_deficit(d, eps, jnp.float32(sigma))
  certified = inner >= 0.0
  return FeatureCertificate(score=1.0 - deficit, inner_product_bound=inner,
                            cosine_bound=jnp.where(certified, inner, -1.0),
                            certified=certified, direction=direction,
                            is_certificate=is_certificate)


def fcsb(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
         sigma: float, eps: float | Sequence[float], key: jax.Array, n: int = 10_000,
         n0: int = 100, alpha: float = DEFAULT_ALPHA, bound: str = "bernstein",
         reference: str = "mean", chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
         progress: smoothing.Progress | None = None) -> FeatureCertificate:
  """Feature cosine similarity bound (Theorem 3.2), certified with probability 1 - alpha.

  For every adversarial x' with ``||x' - x||_2 <= eps`` (pixel space [0, 1]):
  ``<f_s(x'), u> >= B = 2 Phi(Phi^-1(L) - eps / sigma) - 1`` where L is the lower
  confidence bound of ``h_u(x) = (1 + <f_s(x), u>) / 2`` from n fresh samples, and hence
  ``cos(f_s(x'), u) >= B`` where B >= 0.

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder (static; a GSB-boosted encoder works unchanged).
    sigma: noise level > 0 (pixel units).
    eps: l2 radius, scalar or sequence.
    key: PRNG key.
    n: second-stage samples (>= 2).
    n0: first-stage samples (choose the mean direction u; >= 1).
    alpha: failure probability of the certificate, in (0, 1).
    bound: "bernstein" (default), "betting", "hoeffding", or "point" (the paper's plug-in
      estimate, not a certificate).
    reference: "mean" (u = smoothed mean direction; never worse) or "clean" (u = f(x),
      the paper's FCSB).
    chunk_size: samples per vectorised chunk.
    progress: optional callable, called with the number of noise samples done (n0 + n in
      all) as the Monte Carlo runs, e.g. a tqdm bar's ``update``; the results do not
      change (:func:`score_deficits`).

  Returns:
    A :class:`FeatureCertificate`.

  References:
    Salman et al. 2019, https://arxiv.org/abs/1906.04584 (the Lipschitz lemma);
    Cohen et al. 2019, https://arxiv.org/abs/1902.02918 (two-stage certification).
  """
  check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, bound=bound, reference=reference,
                     eps=eps, chunk_size=chunk_size)
  deficits = score_deficits(params, x, encoder=encoder, sigma=sigma, key=key, n=n, n0=n0,
                            alpha=alpha, bounds=(bound,), chunk_size=chunk_size,
                            progress=progress)
  return certificate_from_deficit(deficits[reference][bound], deficits[reference]["direction"],
                                  eps=eps, sigma=sigma,
                                  is_certificate=bound != "point")


def certified_radius(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                     sigma: float, key: jax.Array, n: int = 10_000, cos: float = 0.5,
                     n0: int = 100, alpha: float = DEFAULT_ALPHA, bound: str = "bernstein",
                     reference: str = "mean", chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                     progress: smoothing.Progress | None = None) -> jax.Array:
  """Certified l2 radius for ``cos(f_s(x'), u) >= cos`` (Corollary 3.3, any level).

  ``R = sigma * (Phi^-1(L) - Phi^-1((1 + cos) / 2))`` with L the lower confidence bound of
  h_u(x) (see :func:`fcsb` for the arguments, ``progress`` included). Returns ``[B]``;
  R <= 0 means the cosine level is not certified at any radius.

  ``bound="point"`` is refused: a bare radius array could not say that it is an estimate.
  For the paper's plug-in radius use ``certify.fcsb(..., bound="point")`` (marked
  ``is_certificate=False``) or ``certify.radius_from_score`` of a point estimate.
  """
  check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, bound=bound, reference=reference,
                     chunk_size=chunk_size)
  if bound == "point":
    raise ValueError("certified_radius(bound='point') would return the paper's plug-in "
                     "estimate as if it were certified; use bound='bernstein', 'betting' or "
                     "'hoeffding', or for the estimate certify.radius_from_score("
                     "certify.gaussian_robustness_score(...)).")
  _closed_form._check_cos(cos)
  deficits = score_deficits(params, x, encoder=encoder, sigma=sigma, key=key, n=n, n0=n0,
                            alpha=alpha, bounds=(bound,), chunk_size=chunk_size,
                            progress=progress)
  return _closed_form.radius_from_deficit(deficits[reference][bound], jnp.float32(sigma), cos)
