"""Certified predictions by Monte Carlo: FS with cosine prototypes, and the RS baseline.

* :func:`certify_prediction` (docs/method.md section 3, Appendix A.3): n0 samples give the mean
  direction u and the predicted class ``argmax_k <u, w_k>``; n fresh samples give the
  lower confidence bound of ``h_u(x)``; the closed-form radius
  ``sigma * (Phi^-1(h_LCB) - Phi^-1((1 + cos(Delta/2)) / 2))`` follows. With
  ``certificate="per-class"`` the same samples bound every prototype score instead
  (Salman et al.'s soft smoothing per class, Bonferroni over the K bounds), with
  ``"select"`` the selection samples pick, per image, the certificate that will be tighter,
  with ``"split"`` both are computed at ``alpha / 2`` and the larger radius is kept
  (docs/method.md section 3b).
* :func:`rs_certify` / :func:`rs_predict`: Cohen et al.'s CERTIFY / PREDICT with a linear
  head on the unit feature of x + delta as the base classifier (locuslab/smoothing core.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from certify import _bounds
from certify import _feature
from certify import _prediction
from fsjax import checks
from fsjax import cpu
from fsjax import encoders as encoders_lib
from fsjax import heads as heads_lib
from fsjax import smoothing


# How a prediction margin turns into a certificate (docs/method.md section 3b):
# "cosine": Theorem A.3.2's cosine cap (the h_u bound at alpha); "per-class": a bound on every
# prototype score (each at alpha / K); "select": per image, the one the n0 selection samples
# predict to be larger, at those levels; "split": both at half those levels, the larger radius.
PREDICTION_CERTIFICATES = ("cosine", "per-class", "select", "split")
# What an image's certificate was made of (PredictionCertificate.certificate): one of the
# two FS certificates, or Cohen et al.'s RS.
USED = ("cosine", "per-class", "rs")


class PredictionCertificate(NamedTuple):
  """Certified predictions of a batch, FS or RS; an estimate where ``is_certificate`` is False.

  Attributes:
    predicted_class: ``[B]`` the class, or ``ABSTAIN`` (-1) where not certified even at
      radius 0.
    radius: ``[B]`` l2 radius (pixel units) within which the prediction provably cannot
      change, with probability ``1 - alpha``; 0 where it abstains.
    samples: ``[B]`` the noise samples drawn for each image.
    certificate: ``[B]`` str, which certificate each image's radius is: ``"cosine"``
      (Theorem A.3.2), ``"per-class"`` (docs/method.md 3b) or ``"rs"`` (Cohen et al.).
    bound: the confidence bound behind it: FS's bound of h_u(x) (``"point"``: the paper's
      plug-in estimate, NOT a certificate), or ``"clopper-pearson"`` (RS).
    sigma: the noise level.
    alpha: the failure probability (of the whole certificate, every bound it uses).
  """
  predicted_class: np.ndarray
  radius: np.ndarray
  samples: np.ndarray
  certificate: np.ndarray
  bound: str
  sigma: float
  alpha: float

  is_certificate = _feature.IS_CERTIFICATE


class PredictionMargin(NamedTuple):
  """The Monte Carlo half of an FS prediction certificate, per image.

  Attributes:
    predicted_class: ``[B]`` ``c = argmax_k <u, w_k>``, ``u`` the mean direction of the
      ``n0`` selection samples.
    margin: ``[B]`` the angular margin ``Delta`` of ``u`` (radians).
    estimate: the :class:`certify.ScoreEstimate` of ``h_u(x)`` (reference ``"mean"``),
      which carries the bound, sigma and the alpha of Theorem A.3.2's certificate.
    rule: one of :data:`PREDICTION_CERTIFICATES`, the rule the margin was computed for.
    class_deficits: ``[B, K]`` (rules other than ``"cosine"``, else None): the bounds of
      the per-class certificate, each at level ``class_alpha`` (:func:`certify.
      per_class_radius` says what they are).
    class_alpha: the level of each per-class bound (``alpha / K``, or ``alpha / (2 K)``
      for ``"split"``); None for ``"cosine"``.
    selected: ``[B]`` str (rule ``"select"``, else None): the certificate the selection
      samples chose for each image, ``"cosine"`` or ``"per-class"``.
  The certificate: :func:`prediction_certificate` ``(margin)``; the margin Theorem A.3.2
  needs at radius r: :func:`certify.required_margin` ``(deficit=m.deficit, sigma=m.sigma,
  radius=r)``.
  """
  predicted_class: np.ndarray
  margin: np.ndarray
  estimate: _feature.ScoreEstimate
  rule: str = "cosine"
  class_deficits: np.ndarray | None = None
  class_alpha: float | None = None
  selected: np.ndarray | None = None

  is_certificate = _feature.estimate_property("is_certificate")
  bound = _feature.estimate_property("bound")
  sigma = _feature.estimate_property("sigma")

  @property
  def deficit(self) -> np.ndarray:
    """``[B]`` ``1 - L``, L the bound of ``h_u(x)`` (the mean for ``bound="point"``)."""
    return np.asarray(self.estimate.deficit)

  @property
  def alpha(self) -> float:
    """The failure probability of the certificate this margin gives (all its bounds)."""
    k = 0 if self.class_deficits is None else np.shape(self.class_deficits)[1]
    if self.rule == "cosine":
      return self.estimate.alpha
    if self.rule == "split":  # union bound over both certificates
      return self.estimate.alpha + k * self.class_alpha
    return k * self.class_alpha  # "per-class" and "select": alpha / K each, K bounds


_feature.register_labelled(PredictionCertificate, ("bound", "sigma", "alpha"))


def _check_classifier(encoder, params, x, prototypes, head, sigma):
  """``(encoder, params, prototypes)`` FS certifies, checked before any Monte Carlo.

  ``head`` (a :class:`certify.CosinePrototypeHead`'s variables) certifies on the head's
  projection of the encoder when it has one; ``prototypes`` are unit prototypes on the
  encoder's own feature (e.g. CLIP zero-shot text embeddings).
  """
  if (prototypes is None) == (head is None):
    raise ValueError("pass exactly one of head (the variables of a certify."
                     "CosinePrototypeHead, projected or not) and prototypes ([K, D] unit "
                     "prototypes on the encoder's own feature, e.g. CLIP text embeddings).")
  if head is not None:
    encoder, params, prototypes = heads_lib.fs_classifier(encoder, params, head)
  feature = jax.eval_shape(lambda p, x: encoder(p, x, sigma=sigma), params,
                           jnp.asarray(x, jnp.float32))
  _prediction.check_prototypes(prototypes, feature.shape[-1])
  return encoder, params, prototypes


def _check_rule(certificate: str) -> None:
  checks.check_choice(certificate, name="certificate", choices=PREDICTION_CERTIFICATES)


def _class_scores(features, prototypes):
  """``g_k = (1 + <f(x + delta), w_k>) / 2``: ``[B, k, D] x [K, D] -> [B, k, K]`` (HIGHEST)."""
  return 0.5 * (1.0 + jnp.einsum("bsd,kd->bsk", features, prototypes,
                                 precision=jax.lax.Precision.HIGHEST))


def _class_stage1_statistic(features, clean, prototypes):
  g = _class_scores(features, prototypes)
  return dict(_feature._stage1_statistic(features, clean),  # pylint: disable=protected-access
              **{"class": g, "class_sq": g * g})


def _plug_in_probit(mean, var, *, n, alpha, upper=False):
  """``Phi^-1`` of a stage-1 guess at a stage-2 bound: the mean -+ a Bernstein-like width."""
  width = jnp.sqrt(2.0 * var * np.log(1.0 / alpha) / n) + np.log(1.0 / alpha) / n
  guess = mean + width if upper else mean - width
  return jax.scipy.special.ndtri(jnp.clip(guess, 1e-12, 1.0 - 1e-7))


@cpu.jit(static_argnames=("encoder", "n0", "n", "alpha", "class_alpha", "bound",
                          "chunk_size"))
def _class_margin(params, x, key, sigma, prototypes, *, encoder, n0, n, alpha, class_alpha,
                  bound, chunk_size, reporter=None):
  """Both stages of the per-class and the cosine certificates from one set of samples.

  Stage 1 (samples ``0 .. n0-1``) is :func:`certify.estimate_scores`' (mean direction u,
  its centre and bets) plus every prototype score's mean and variance; it fixes u, the
  class c, the signed prototypes ``v_c = w_c``, ``v_k = -w_k`` and the selection. Stage 2
  (``n0 .. n0+n-1``) bounds ``h_v = (1 + <f_s(x), v>) / 2`` for ``v = u`` (at ``alpha``)
  and every signed prototype (at ``class_alpha``), with the bounds of
  :mod:`certify._bounds`, so the cosine part is exactly the ``"mean"`` estimate.
  """
  k = prototypes.shape[0]
  clean = encoder(params, x, sigma=sigma)
  stage1 = smoothing.monte_carlo_sum(
      params, x, key, (clean, prototypes), encoder=encoder, sigma=sigma, n=n0,
      chunk_size=chunk_size, statistic=_class_stage1_statistic, reporter=reporter)
  mean = stage1["feature"] / n0
  mean_norm = jnp.linalg.norm(mean, axis=-1)
  u = encoders_lib.unit(mean)
  cls, delta = _prediction._angle_margin(u, prototypes)  # pylint: disable=protected-access
  is_c = jax.nn.one_hot(cls, k, dtype=bool)  # [B, K]
  g0 = stage1["class"] / n0  # [B, K] stage-1 means of the prototype scores
  var_g = jnp.maximum(stage1["class_sq"] / n0 - g0**2, 0.0) * n0 / max(n0 - 1, 1)
  clean_deficit = stage1["deficit"] / n0
  var0 = jnp.maximum(stage1["deficit_sq"] / n0 - clean_deficit**2, 0.0) * n0 / max(n0 - 1, 1)
  # Signed prototypes: the class's score is bounded below, the others' above (a lower bound
  # of 1 - g_k = (1 + <f_s, -w_k>) / 2).
  signed = jnp.where(is_c[..., None], prototypes[None], -prototypes[None])  # [B, K, D]
  references = jnp.concatenate([u[:, None], signed], axis=1)  # [B, 1 + K, D]
  center = jnp.concatenate([0.5 * (1.0 + mean_norm)[:, None], jnp.where(is_c, g0, 1.0 - g0)],
                           axis=1)
  aux = (references, center)
  if bound == "betting":
    aux += (jnp.concatenate([_bounds.bet_sizes(var0[:, None], n=n, alpha=alpha),
                             _bounds.bet_sizes(var_g, n=n, alpha=class_alpha)], axis=1),)
  stage2 = smoothing.monte_carlo_sum(
      params, x, key, aux, encoder=encoder, sigma=sigma, n=n, chunk_size=chunk_size,
      statistic=_feature._stage2_statistic,  # pylint: disable=protected-access
      first_index=n0, reporter=reporter)
  stats = _bounds.ScoreStats(*stage2)
  part = lambda sl: jax.tree.map(lambda v: v[:, sl], stats)
  deficit = _bounds.lower_confidence_bound(part(slice(0, 1)), center[:, :1], n=n, alpha=alpha,
                                           bound=bound)[:, 0]
  class_deficits = _bounds.lower_confidence_bound(part(slice(1, None)), center[:, 1:], n=n,
                                                  alpha=class_alpha, bound=bound)
  # Selection (stage 1 only, so it is fixed before the bounds' samples): each certificate's
  # radius with its bounds guessed from the stage-1 means and variances. ||f_s||^2 is
  # guessed without the 1/n0 bias of ||mean||^2 (unit features: E||mean||^2 =
  # ||f_s||^2 + (1 - ||f_s||^2) / n0).
  norm_sq = (mean_norm**2 * n0 - 1.0) / max(n0 - 1, 1) if n0 > 1 else mean_norm**2
  h0 = 0.5 * (1.0 + jnp.sqrt(jnp.clip(norm_sq, 0.0, 1.0)))
  guess_cosine = (_plug_in_probit(h0, var0, n=n, alpha=alpha)
                  + jax.scipy.special.ndtri(jnp.sin(delta / 4.0)**2))
  lower = _plug_in_probit(g0, var_g, n=n, alpha=class_alpha)
  upper = _plug_in_probit(g0, var_g, n=n, alpha=class_alpha, upper=True)
  guess_class = 0.5 * (jnp.sum(jnp.where(is_c, lower, 0.0), axis=1)
                       - jnp.max(jnp.where(is_c, -jnp.inf, upper), axis=1))
  return deficit, u, cls, delta, class_deficits, guess_class > guess_cosine


def prediction_margin(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                      sigma: float, key: jax.Array, head: Any = None,
                      prototypes: jax.typing.ArrayLike | None = None,
                      n0: int = 100, n: int = 10_000, alpha: float = _feature.DEFAULT_ALPHA,
                      bound: str = "bernstein", certificate: str = "cosine",
                      chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                      progress: smoothing.Progress | None = None) -> PredictionMargin:
  """The Monte Carlo half of :func:`certify_prediction`: class, margin and the estimates.

  Arguments as in :func:`certify_prediction`.
  """
  encoders_lib.check_images(x)
  _feature.check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, bound=bound,
                              chunk_size=chunk_size, progress=progress)
  _check_rule(certificate)
  encoder, params, prototypes = _check_classifier(encoder, params, x, prototypes, head, sigma)
  if certificate == "cosine":
    (estimate,) = _feature._estimate(  # pylint: disable=protected-access  # checked above
        params, x, key, encoder=encoder, sigma=sigma, n=n, n0=n0, alpha=alpha,
        bounds=(bound,), references=("mean",), chunk_size=chunk_size, progress=progress)
    cls, delta = _prediction.angle_margin(estimate.direction, prototypes)
    return PredictionMargin(np.asarray(cls), np.asarray(delta), estimate)
  k = int(np.shape(prototypes)[0])
  cos_alpha = float(alpha) / 2 if certificate == "split" else float(alpha)
  class_alpha = cos_alpha / k
  deficit, u, cls, delta, class_deficits, per_class = smoothing.with_progress(
      progress, _class_margin, params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma),
      jnp.asarray(encoders_lib.normalise(jnp.asarray(prototypes, jnp.float32))),
      encoder=encoder, n0=int(n0), n=int(n), alpha=cos_alpha, class_alpha=class_alpha,
      bound=bound, chunk_size=int(chunk_size))
  samples = jnp.full(cls.shape, int(n0) + int(n), jnp.int32)
  estimate = _feature.ScoreEstimate(deficit, u, samples, "mean", bound, float(sigma), cos_alpha)
  selected = (np.where(np.asarray(per_class), "per-class", "cosine")
              if certificate == "select" else None)
  return PredictionMargin(np.asarray(cls), np.asarray(delta), estimate, certificate,
                          np.asarray(class_deficits), class_alpha, selected)


def certify_prediction(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                       sigma: float, key: jax.Array, head: Any = None,
                       prototypes: jax.typing.ArrayLike | None = None,
                       n0: int = 100, n: int = 10_000, alpha: float = _feature.DEFAULT_ALPHA,
                       bound: str = "bernstein", certificate: str = "cosine",
                       chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                       progress: smoothing.Progress | None = None) -> PredictionCertificate:
  """FS-certified prediction of a cosine-prototype head (closed-form radius).

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder (base or GSB-boosted).
    sigma: noise level > 0.
    key: PRNG key.
    head: the variables of a :class:`certify.CosinePrototypeHead`; a head with a
      projection is certified on the projected encoder (:func:`fsjax.heads.fs_classifier`),
      the classifier it is. Or:
    prototypes: ``[K, D]`` unit prototypes on the encoder's own feature (e.g. CLIP
      zero-shot text embeddings). Exactly one of ``head`` and ``prototypes``.
    n0: samples that choose the mean direction and the class (and, for ``"select"``, the
      certificate).
    n: fresh samples for the confidence bounds.
    alpha: failure probability of the certificate (every bound it uses together).
    bound: confidence bound ("bernstein", "betting", "hoeffding"); "point" gives the
      paper's plug-in estimate, marked ``is_certificate=False``.
    certificate: which certificate (docs/method.md 3b): ``"cosine"`` (Theorem A.3.2's
      cosine cap, the bound of h_u(x) at alpha), ``"per-class"`` (every prototype score
      bounded, at alpha / K each), ``"select"`` (per image, the one of the two that the n0
      selection samples predict to be larger, at those levels: usually the tightest) or
      ``"split"`` (both at half those levels, the larger radius).
    chunk_size: samples per vectorised chunk.
    progress: optional callable advanced by the number of noise samples done (n0 + n in
      all); the results do not change (:func:`certify.estimate_scores`).

  Returns:
    A :class:`PredictionCertificate`: class -1 (abstain) where not certified even at
    radius 0; radius is the l2 radius within which the prediction provably cannot change;
    ``certificate`` says which certificate each radius is.
  """
  return _prediction_certificate(prediction_margin(
      params, x, encoder=encoder, sigma=sigma, key=key, head=head, prototypes=prototypes,
      n0=n0, n=n, alpha=alpha, bound=bound, certificate=certificate, chunk_size=chunk_size,
      progress=progress))


def _radii(m: PredictionMargin) -> dict[str, np.ndarray]:
  """``{"cosine": R_A.3.2, "per-class": R_pc}`` of the margin (the latter if it has bounds)."""
  sigma = np.float32(m.estimate.sigma)
  out = {"cosine": np.asarray(_prediction._prediction_radius(  # pylint: disable=protected-access
      jnp.asarray(m.margin, jnp.float32), jnp.asarray(m.deficit, jnp.float32), sigma))}
  if m.class_deficits is not None:
    out["per-class"] = np.asarray(_prediction._per_class_radius(  # pylint: disable=protected-access
        jnp.asarray(m.class_deficits, jnp.float32), jnp.asarray(m.predicted_class, jnp.int32),
        sigma))
  return out


def _prediction_certificate(m: PredictionMargin, which: str | None = None
                            ) -> PredictionCertificate:
  radii = _radii(m)
  rule = which or m.rule
  if rule == "select":
    used = np.asarray(m.selected)
  elif rule == "split":
    used = np.where(radii["per-class"] > radii["cosine"], "per-class", "cosine")
  else:
    used = np.full(np.shape(m.margin), rule)
  radius = np.where(used == "per-class", radii.get("per-class", 0.0), radii["cosine"])
  certified = radius > 0
  cls = np.where(certified, np.asarray(m.predicted_class, np.int32), _prediction.ABSTAIN)
  # Only the chosen certificate's own bounds stand behind it; the rule's total otherwise.
  alpha = (m.estimate.alpha if which == "cosine" else
           np.shape(m.class_deficits)[1] * m.class_alpha if which == "per-class" else m.alpha)
  return PredictionCertificate(cls.astype(np.int32), np.where(certified, radius, 0.0).astype(
      np.float32), np.asarray(m.estimate.samples), used, m.estimate.bound, m.estimate.sigma,
      float(alpha))


def prediction_certificate(margin: PredictionMargin, *, only: str | None = None
                           ) -> PredictionCertificate:
  """The certificate (an estimate for ``bound="point"``) a :class:`PredictionMargin` gives.

  Bound, sigma and alpha are the margin's own (those its Monte Carlo ran with), so the
  result can be neither labelled with another bound nor rescaled by another sigma. The
  margin's rule (``margin.rule``) says which certificate each image gets.

  Args:
    margin: from :func:`prediction_margin`.
    only: ``"cosine"`` or ``"per-class"``: that certificate alone, for every image (each
      is sound on its own, at its own bounds' level: the margin's ``estimate.alpha``, or
      K ``class_alpha``); ``"per-class"`` needs a margin computed with a rule other than
      ``"cosine"``. Taking the larger of the two afterwards is NOT a certificate at alpha
      (that is the ``"split"`` rule, which halves the levels first).
  """
  if not isinstance(margin, PredictionMargin):
    raise ValueError(f"margin must be a certify.PredictionMargin (from certify."
                     f"prediction_margin), got {type(margin).__name__}.")
  _feature._check_estimate(margin.estimate, "margin.estimate")  # pylint: disable=protected-access
  _check_rule(margin.rule)
  if only is not None:
    checks.check_choice(only, name="only", choices=USED[:2])
    if only == "per-class" and margin.class_deficits is None:
      raise ValueError("only='per-class' needs the per-class bounds: compute the margin with "
                       "certificate='per-class', 'select' or 'split'.")
  if margin.rule != "cosine" and (margin.class_deficits is None or margin.class_alpha is None
                                  or (margin.rule == "select" and margin.selected is None)):
    raise ValueError(f"margin.rule={margin.rule!r} needs its class_deficits, class_alpha (and "
                     "for 'select' selected); use the margin certify.prediction_margin returns.")
  if margin.class_deficits is not None:
    checks.check_deficit(margin.class_deficits, name="margin.class_deficits")
  return _prediction_certificate(margin, only)


def _head_counts(features, kernel, bias):
  # [B, k, K]; LinearHead = Dense on the unit feature. HIGHEST, as for the feature scores:
  # the base classifier counted is the float32 head, whatever the default matmul precision.
  logits = jnp.matmul(features, kernel, precision=jax.lax.Precision.HIGHEST) + bias
  return {"counts": jax.nn.one_hot(jnp.argmax(logits, -1), kernel.shape[-1], dtype=jnp.int32)}


@cpu.jit(static_argnames=("encoder", "n", "first_index", "chunk_size"))
def _class_counts(params, x, key, sigma, kernel, bias, *, encoder, n, first_index, chunk_size,
                  reporter=None):
  return smoothing.monte_carlo_sum(
      params, x, key, (kernel, bias), encoder=encoder, sigma=sigma, n=n, chunk_size=chunk_size,
      statistic=_head_counts, first_index=first_index, reporter=reporter)["counts"]


def _linear_head(head: Any) -> tuple[jax.Array, jax.Array]:
  """Kernel and bias of a :class:`certify.LinearHead`'s variables."""
  try:
    dense = head["params"]["dense"] if "params" in head else head["dense"]
    return jnp.asarray(dense["kernel"], jnp.float32), jnp.asarray(dense["bias"], jnp.float32)
  except (KeyError, TypeError) as e:
    raise ValueError("head must be the variables of certify.LinearHead: "
                     "{'params': {'dense': {'kernel': [D, K], 'bias': [K]}}}") from e


def class_counts(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                 head: Any, sigma: float, n: int, key: jax.Array, first_index: int = 0,
                 chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                 progress: smoothing.Progress | None = None) -> np.ndarray:
  """Counts ``[B, K]`` of the linear head's predictions on ``x + delta_i``, ``i < n``.

  ``progress``, if given, is called with the number of noise samples done as the chunks
  finish (:func:`fsjax.smoothing.with_progress`; the same counts).
  """
  encoders_lib.check_images(x)
  smoothing.check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  checks.check_positive_int(first_index, name="first_index", minimum=0,
                            meaning="the index of the first noise sample")
  _feature.check_progress(progress)
  return _counts(params, x, key, sigma, _linear_head(head), encoder=encoder, n=n,
                 first_index=first_index, chunk_size=chunk_size, progress=progress)


def _counts(params, x, key, sigma, head, *, encoder, n, first_index, chunk_size, progress):
  """:func:`class_counts` of validated arguments; ``head`` is ``(kernel, bias)``."""
  counts = smoothing.with_progress(
      progress, _class_counts, params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma),
      *head, encoder=encoder, n=int(n), first_index=int(first_index),
      chunk_size=int(chunk_size))
  return np.asarray(counts)


def rs_certify(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
               head: Any, sigma: float, key: jax.Array, n0: int = 100, n: int = 10_000,
               alpha: float = _feature.DEFAULT_ALPHA,
               chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
               progress: smoothing.Progress | None = None) -> PredictionCertificate:
  """Randomized smoothing CERTIFY (Cohen et al. 2019) with a linear head on f(x + delta).

  n0 samples select the class, n fresh samples give the one-sided Clopper-Pearson bound
  pA; radius ``sigma * Phi^-1(pA)``; abstain (-1) when pA <= 1/2.

  Args:
    head: variables of :class:`certify.LinearHead` on the encoder's unit features.
    Other arguments as in :func:`certify_prediction` (``progress`` counts n0 + n).

  Returns:
    A :class:`PredictionCertificate` (bound ``"clopper-pearson"``), class -1 where it
    abstains.
  """
  _feature.check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, chunk_size=chunk_size,
                              progress=progress)
  encoders_lib.check_images(x)
  head = _linear_head(head)
  mc = dict(encoder=encoder, chunk_size=chunk_size, progress=progress)
  counts0 = _counts(params, x, key, sigma, head, n=n0, first_index=0, **mc)
  counts = _counts(params, x, key, sigma, head, n=n, first_index=n0, **mc)
  cls, radius = _prediction.rs_certify_unchecked(counts0, counts, sigma, alpha)
  return PredictionCertificate(cls, radius, np.full(cls.shape, int(n0) + int(n)),
                               np.full(cls.shape, "rs"), "clopper-pearson", float(sigma),
                               float(alpha))


def rs_predict(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
               head: Any, sigma: float, key: jax.Array, n: int = 100,
               alpha: float = _feature.DEFAULT_ALPHA,
               chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Randomized smoothing PREDICT: the top class, or -1 when a binomial test can't tell."""
  _feature.check_certify_args(sigma=sigma, n=n, alpha=alpha, chunk_size=chunk_size)
  counts = class_counts(params, x, encoder=encoder, head=head, sigma=sigma, n=n, key=key,
                        chunk_size=chunk_size)
  return _prediction.rs_predict_from_counts(counts, alpha=alpha)
