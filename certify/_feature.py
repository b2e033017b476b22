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

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from certify import _bounds
from certify import _closed_form
from fsjax import checks
from fsjax import cpu
from fsjax import encoders as encoders_lib
from fsjax import smoothing

REFERENCES = ("clean", "mean")
DEFAULT_ALPHA = 0.001  # Cohen et al. 2019


def check_certify_args(*, sigma, n: int | None = None, n0: int | None = None,
                       alpha: float | None = None, bound: str | None = None,
                       reference: str | None = None, eps=None, cos: float | None = None,
                       chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                       progress: Any = None) -> None:
  """Validates certification settings; each error names the argument and the fix.

  The one validation of the pipeline: every public entry calls it once, before any
  Monte Carlo or jit, and the private steps after it trust their arguments. Programs call
  it on their config (before data or models load).
  """
  if n is None:
    checks.check_sigma(sigma)
  else:
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
    _closed_form.check_eps(eps)
  if cos is not None:
    _closed_form.check_cos(cos)
  check_progress(progress)


def check_progress(progress: Any) -> None:
  """Raises ValueError unless ``progress`` is None or callable, before the Monte Carlo starts
  (a bad one would otherwise fail late, inside the host callback of the first chunk)."""
  if progress is not None and not callable(progress):
    raise ValueError(f"progress must be None or a callable taking the number of noise "
                     f"samples done (e.g. a tqdm bar's update), got {progress!r}.")


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


@cpu.jit(static_argnames=("encoder", "n", "chunk_size"))
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
  check_progress(progress)
  return smoothing.with_progress(
      progress, _robustness_score, params, jnp.asarray(x, jnp.float32), key,
      jnp.float32(sigma), encoder=encoder, n=int(n), chunk_size=int(chunk_size))


@cpu.jit(static_argnames=("encoder", "n0", "n", "alpha", "bounds", "chunk_size"))
def _score_deficits(params, x, key, sigma, *, encoder, n0, n, alpha, bounds, chunk_size,
                    reporter=None):
  """Both stages; returns ``{bound: deficit [B, 2]}`` for references (clean, mean), the
  references ``[B, 2, D]`` and the :class:`ScoreStatistics` every bound was computed from.

  Every bound needs only sums over the stage-2 samples (the betting wealth too: a sum of
  logs, with bets fixed by stage 1), so the engine's running sums are all there is.
  """
  clean = encoder(params, x, sigma=sigma)  # f(x), [B, D]
  stage1 = smoothing.monte_carlo_sum(
      params, x, key, (clean,), encoder=encoder, sigma=sigma, n=n0, chunk_size=chunk_size,
      statistic=_stage1_statistic, reporter=reporter)
  mean = stage1["feature"] / n0  # estimate of f_s(x), Eq. 3
  mean_norm = jnp.linalg.norm(mean, axis=-1)
  u_mean = encoders_lib.unit(mean)
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
  return deficits, references, ScoreStatistics(center, stats)


class ScoreStatistics(NamedTuple):
  """The stage-2 sums behind every fixed-n bound: what re-derives an estimate's deficit.

  ``certify._bounds.lower_confidence_bound(stats, center, n=n, alpha=alpha, bound=bound)``
  of these (one reference's slice) is the estimate's deficit, bit for bit (certify.verify).
  Leaves ``[B, 2, ...]``, references in :data:`REFERENCES` order (clean, mean).

  Attributes:
    center: ``[B, 2]`` the stage-1 mean each reference's sums are centred on.
    stats: ``certify._bounds.ScoreStats`` summed over the n stage-2 samples: ``total`` and
      ``total_sq`` ``[B, 2]``; ``log_capital`` ``[B, 2, NUM_BETS, BETTING_GRID]`` (None
      unless ``"betting"`` was among the bounds).
  """
  center: jax.Array
  stats: _bounds.ScoreStats


def _is_certificate(self) -> bool:
  """False for ``bound="point"``: the paper's plug-in estimate, not a certificate."""
  return self.bound != "point"


# The one mark of "estimate, not a certificate", on every result type with a ``bound``.
IS_CERTIFICATE = property(_is_certificate)


class ScoreEstimate(NamedTuple):
  """What the Monte Carlo says about ``h_u(x) = (1 + <f_s(x), u>) / 2``: the input of a certificate.

  One reference direction u and one bound, for a batch of images. It carries what it was
  computed with (bound, sigma, alpha, samples), so a certificate built from it
  (:func:`feature_certificate`, ``certify.prediction_certificate``) can neither be
  labelled with another bound nor rescaled by another sigma. The fixed-n two-stage run
  (:func:`estimate_scores`) and a sequential run produce the same type.

  Attributes:
    deficit: ``[B]`` ``1 - L``, L the ``bound``'s (1 - alpha) lower confidence bound of
      h_u(x) (the Monte Carlo mean for ``bound="point"``). The deficit keeps the precision
      float32 loses in L near 1.
    direction: ``[B, D]`` the unit reference u (fixed before the samples that bound h_u).
    samples: ``[B]`` int32, the noise samples drawn for each image (n0 + n at fixed n).
    reference: ``"clean"`` (u = f(x), the paper's) or ``"mean"`` (the stage-1 direction).
    bound: one of ``certify.BOUNDS``; ``"point"`` is the paper's plug-in estimate.
    sigma: the noise level the samples were drawn with.
    alpha: the failure probability of the bound.
  """
  deficit: jax.Array
  direction: jax.Array
  samples: jax.Array
  reference: str
  bound: str
  sigma: float
  alpha: float

  is_certificate = IS_CERTIFICATE

  @property
  def score(self) -> jax.Array:
    """``[B]`` L = 1 - deficit (see ``deficit`` for why the deficit is kept)."""
    return 1.0 - self.deficit

  def take(self, index) -> ScoreEstimate:
    """The estimate of the images ``index`` (an int array or a slice) of the batch."""
    return self._replace(deficit=self.deficit[index], direction=self.direction[index],
                         samples=self.samples[index])


def register_labelled(cls: type, labels: Sequence[str]) -> type:
  """Registers a NamedTuple of arrays and labels as a pytree whose leaves are the arrays.

  The labels (bound names, sigma, ...) are static, so jit can return the type and
  ``jax.tree.map`` never sees a string. The labels must be the last fields.
  """
  data = cls._fields[:len(cls._fields) - len(labels)]
  assert cls._fields[len(data):] == tuple(labels), (cls._fields, labels)
  jax.tree_util.register_pytree_node(
      cls, lambda t: (tuple(t[:len(data)]), tuple(t[len(data):])),
      lambda meta, leaves: cls(*leaves, *meta))
  return cls


register_labelled(ScoreEstimate, ("reference", "bound", "sigma", "alpha"))


def estimate_property(name: str) -> property:
  """A read-only attribute of a result that is its ``estimate``'s own (one source of truth)."""
  doc = f"``estimate.{name}``: " + (getattr(ScoreEstimate, name).__doc__ or "see ScoreEstimate.")
  return property(lambda self: getattr(self.estimate, name), doc=doc)


def _check_estimate(estimate: Any, name: str = "estimate") -> None:
  if not isinstance(estimate, ScoreEstimate):
    raise ValueError(f"{name} must be a certify.ScoreEstimate (from certify.estimate_scores), "
                     f"got {type(estimate).__name__}.")
  checks.check_choice(estimate.bound, name=f"{name}.bound", choices=_bounds.BOUNDS)
  checks.check_choice(estimate.reference, name=f"{name}.reference", choices=REFERENCES)
  checks.check_sigma(estimate.sigma, name=f"{name}.sigma")
  checks.check_alpha(estimate.alpha, name=f"{name}.alpha")
  if np.ndim(estimate.deficit) != 1 or np.shape(estimate.direction)[:1] != np.shape(
      estimate.deficit) or np.ndim(estimate.direction) != 2:
    raise ValueError(f"{name}.deficit must be [B] and {name}.direction [B, D], got shapes "
                     f"{np.shape(estimate.deficit)} and {np.shape(estimate.direction)}.")
  checks.check_deficit(estimate.deficit, name=f"{name}.deficit")


def _estimate(params, x, key, *, encoder, sigma, n, n0, alpha, bounds, references,
              chunk_size, progress, statistics=False):
  """The two-stage Monte Carlo of validated arguments (:func:`estimate_scores`)."""
  deficits, directions, sums = smoothing.with_progress(
      progress, _score_deficits, params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma),
      encoder=encoder, n0=int(n0), n=int(n), alpha=float(alpha), bounds=tuple(bounds),
      chunk_size=int(chunk_size))
  samples = jnp.full(directions.shape[:1], int(n0) + int(n), jnp.int32)
  estimates = tuple(ScoreEstimate(deficits[bound][:, REFERENCES.index(ref)],
                                  directions[:, REFERENCES.index(ref)], samples, ref, bound,
                                  float(sigma), float(alpha))
                    for ref in references for bound in bounds)
  return (estimates, sums) if statistics else estimates


def estimate_scores(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                    sigma: float, key: jax.Array, n: int = 10_000, n0: int = 100,
                    alpha: float = DEFAULT_ALPHA, bounds: Sequence[str] = ("bernstein",),
                    references: Sequence[str] = ("mean",),
                    chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                    progress: smoothing.Progress | None = None, statistics: bool = False
                    ) -> tuple[ScoreEstimate, ...]:
  """The Monte Carlo step of every feature and prediction certificate: two stages, once.

  Stage 1 (samples ``0 .. n0-1``) picks the mean direction, stage 2 (``n0 .. n0+n-1``)
  bounds h_u for each reference u; every bound follows from one pass over the noise
  (``"betting"`` adds a few thousand logs per sample and reference; the others are nearly
  free). What ``certify.run`` uses to fill a whole table. ``progress``, if given, is called
  with the number of noise samples done as the chunks of both stages finish (n0 + n in
  all; :func:`fsjax.smoothing.with_progress`): the results are the same bits. Other
  arguments as in :func:`fcsb`.

  Returns:
    One :class:`ScoreEstimate` per (reference, bound), references outermost, e.g.
    ``(mean_est,) = estimate_scores(...)`` with the defaults. Turn one into a certificate
    with :func:`feature_certificate` (or ``certify.prediction_margin`` for predictions).
    With ``statistics=True``: ``(estimates, sums)``, ``sums`` the :class:`ScoreStatistics`
    the deficits were computed from (what ``certify.run`` records so that
    ``python -m certify.verify`` can re-derive every certificate); the same numbers.
  """
  encoders_lib.check_images(x)
  check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, chunk_size=chunk_size,
                     progress=progress)
  for name, values, choices in (("bounds", bounds, _bounds.BOUNDS),
                                ("references", references, REFERENCES)):
    if isinstance(values, str) or not len(values):  # pylint: disable=g-explicit-length-test
      raise ValueError(f"{name} must be a non-empty sequence of names from {choices}, got "
                       f"{values!r}.")
    for v in values:
      checks.check_choice(v, name=name[:-1], choices=choices)
  return _estimate(params, x, key, encoder=encoder, sigma=sigma, n=n, n0=n0, alpha=alpha,
                   bounds=tuple(bounds), references=tuple(references), chunk_size=chunk_size,
                   progress=progress, statistics=bool(statistics))


class FeatureCertificate(NamedTuple):
  """The certified bound of Theorem 3.2 and the radius of Corollary 3.3 for a batch of images.

  An estimate, not a certificate, where ``is_certificate`` is False (``bound="point"``).

  Attributes:
    inner_product_bound: ``[B]`` (scalar eps) or ``[B, E]``: B(eps), a bound on
      ``<f_s(x'), u>`` for every ``||x' - x|| <= eps``.
    cosine_bound: same shape: the certified cosine ``cos(f_s(x'), u) >= cosine_bound``;
      where B < 0 the cosine is not certified and this is the vacuous -1.
    certified: same shape, bool: B >= 0 (the cosine bound is meaningful).
    radius: ``[B]`` the l2 radius within which ``cos(f_s(x'), u) >= cos``; <= 0 where
      that level is not certified at all.
    eps: the radii (float32, scalar or ``[E]``) of the bounds.
    estimate: the :class:`ScoreEstimate` it was computed from.
    cos: the cosine level of ``radius``.
  """
  inner_product_bound: jax.Array
  cosine_bound: jax.Array
  certified: jax.Array
  radius: jax.Array
  eps: jax.Array
  estimate: ScoreEstimate
  cos: float

  is_certificate = estimate_property("is_certificate")
  bound = estimate_property("bound")
  sigma = estimate_property("sigma")
  score = estimate_property("score")
  direction = estimate_property("direction")


register_labelled(FeatureCertificate, ("cos",))


def _feature_certificate(estimate: ScoreEstimate, eps, cos) -> FeatureCertificate:
  """:func:`feature_certificate` of validated arguments."""
  eps = jnp.asarray(eps, jnp.float32)
  sigma = jnp.float32(estimate.sigma)
  d = estimate.deficit[:, None] if eps.ndim else estimate.deficit
  inner = _closed_form.bound_from_deficit(d, eps, sigma)  # Theorem 3.2
  certified = inner >= 0.0
  radius = _closed_form.radius_from_deficit(estimate.deficit, sigma, float(cos))  # Cor. 3.3
  return FeatureCertificate(inner_product_bound=inner,
                            cosine_bound=jnp.where(certified, inner, -1.0),
                            certified=certified, radius=radius, eps=eps, cos=float(cos),
                            estimate=estimate)


def feature_certificate(estimate: ScoreEstimate, *, eps: float | Sequence[float],
                        cos: float = 0.5) -> FeatureCertificate:
  """The feature certificate (Theorem 3.2, Corollary 3.3) a :class:`ScoreEstimate` gives.

  ``B(eps) = 2 Phi(Phi^-1(L) - eps / sigma) - 1`` and
  ``R = sigma * (Phi^-1(L) - Phi^-1((1 + cos) / 2))``, with L and sigma those of the
  estimate; an estimate with ``bound="point"`` gives the paper's plug-in numbers, marked
  ``is_certificate=False``.

  Args:
    estimate: from :func:`estimate_scores` (or a sequential run).
    eps: l2 radius, scalar or ``[E]``.
    cos: the cosine level of the radius, in [0, 1).
  """
  _check_estimate(estimate)
  check_certify_args(sigma=estimate.sigma, eps=eps, cos=cos)
  return _feature_certificate(estimate, eps, cos)


def fcsb(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
         sigma: float, eps: float | Sequence[float], key: jax.Array, n: int = 10_000,
         n0: int = 100, alpha: float = DEFAULT_ALPHA, bound: str = "bernstein",
         reference: str = "mean", cos: float = 0.5,
         chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
         progress: smoothing.Progress | None = None) -> FeatureCertificate:
  """Feature cosine similarity bound (Theorem 3.2), certified with probability 1 - alpha.

  For every adversarial x' with ``||x' - x||_2 <= eps`` (pixel space [0, 1]):
  ``<f_s(x'), u> >= B = 2 Phi(Phi^-1(L) - eps / sigma) - 1`` where L is the lower
  confidence bound of ``h_u(x) = (1 + <f_s(x), u>) / 2`` from n fresh samples, and hence
  ``cos(f_s(x'), u) >= B`` where B >= 0. :func:`estimate_scores` then
  :func:`feature_certificate`, in one call.

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder (static; a GSB-boosted encoder works unchanged).
    sigma: noise level > 0 (pixel units).
    eps: l2 radius, scalar or ``[E]``.
    key: PRNG key.
    n: second-stage samples (>= 2).
    n0: first-stage samples (choose the mean direction u; >= 1).
    alpha: failure probability of the certificate, in (0, 1).
    bound: "bernstein" (default), "betting", "hoeffding", or "point" (the paper's plug-in
      estimate, not a certificate).
    reference: "mean" (u = smoothed mean direction; never worse) or "clean" (u = f(x),
      the paper's FCSB).
    cos: the cosine level of the certificate's ``radius`` (Corollary 3.3 is 0.5).
    chunk_size: samples per vectorised chunk.
    progress: optional callable, called with the number of noise samples done (n0 + n in
      all) as the Monte Carlo runs, e.g. a tqdm bar's ``update``; the results do not
      change (:func:`estimate_scores`).

  Returns:
    A :class:`FeatureCertificate`.

  References:
    Salman et al. 2019, https://arxiv.org/abs/1906.04584 (the Lipschitz lemma);
    Cohen et al. 2019, https://arxiv.org/abs/1902.02918 (two-stage certification).
  """
  encoders_lib.check_images(x)
  check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, bound=bound, reference=reference,
                     eps=eps, cos=cos, chunk_size=chunk_size, progress=progress)
  (estimate,) = _estimate(params, x, key, encoder=encoder, sigma=sigma, n=n, n0=n0,
                          alpha=alpha, bounds=(bound,), references=(reference,),
                          chunk_size=chunk_size, progress=progress)
  return _feature_certificate(estimate, eps, cos)


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
  For the paper's plug-in radius use ``certify.fcsb(..., bound="point").radius`` (marked
  ``is_certificate=False``) or ``certify.radius_from_score`` of a point estimate.
  """
  if bound == "point":
    raise ValueError("certified_radius(bound='point') would return the paper's plug-in "
                     "estimate as if it were certified; use bound='bernstein', 'betting' or "
                     "'hoeffding', or for the estimate certify.fcsb(..., bound='point')"
                     ".radius (marked is_certificate=False).")
  return fcsb(params, x, encoder=encoder, sigma=sigma, eps=0.0, key=key, n=n, n0=n0,
              alpha=alpha, bound=bound, reference=reference, cos=cos, chunk_size=chunk_size,
              progress=progress).radius
