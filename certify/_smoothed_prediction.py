"""Certified predictions by Monte Carlo: FS with cosine prototypes, and the RS baseline.

* :func:`certify_prediction` (docs/method.md section 3, Appendix A.3): n0 samples give the mean
  direction u and the predicted class ``argmax_k <u, w_k>``; n fresh samples give the
  lower confidence bound of ``h_u(x)``; the closed-form radius
  ``sigma * (Phi^-1(h_LCB) - Phi^-1((1 + cos(Delta/2)) / 2))`` follows.
* :func:`rs_certify` / :func:`rs_predict`: Cohen et al.'s CERTIFY / PREDICT with a linear
  head on the unit feature of x + delta as the base classifier (locuslab/smoothing core.py).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from certify import _feature
from certify import _prediction
from fsjax import checks
from fsjax import encoders as encoders_lib
from fsjax import heads as heads_lib
from fsjax import smoothing


class PredictionCertificate(NamedTuple):
  """Certified predictions of a batch, FS or RS; an estimate where ``is_certificate`` is False.

  Attributes:
    predicted_class: ``[B]`` the class, or ``ABSTAIN`` (-1) where not certified even at
      radius 0.
    radius: ``[B]`` l2 radius (pixel units) within which the prediction provably cannot
      change, with probability ``1 - alpha``; 0 where it abstains.
    samples: ``[B]`` the noise samples drawn for each image.
    bound: the confidence bound behind it: FS's bound of h_u(x) (``"point"``: the paper's
      plug-in estimate, NOT a certificate), or ``"clopper-pearson"`` (RS).
    sigma: the noise level.
    alpha: the failure probability.
  """
  predicted_class: np.ndarray
  radius: np.ndarray
  samples: np.ndarray
  bound: str
  sigma: float
  alpha: float

  is_certificate = _feature.IS_CERTIFICATE


class PredictionMargin(NamedTuple):
  """The Monte Carlo half of an FS prediction certificate (Theorem A.3.2), per image.

  Attributes:
    predicted_class: ``[B]`` ``c = argmax_k <u, w_k>``, ``u`` the mean direction of the
      ``n0`` selection samples.
    margin: ``[B]`` the angular margin ``Delta`` of ``u`` (radians).
    estimate: the :class:`certify.ScoreEstimate` of ``h_u(x)`` (reference ``"mean"``),
      which carries the bound, sigma and alpha.
  The certificate: :func:`prediction_certificate` ``(margin)``; the margin it needs at
  radius r: :func:`certify.required_margin` ``(deficit=m.deficit, sigma=m.sigma, radius=r)``.
  """
  predicted_class: np.ndarray
  margin: np.ndarray
  estimate: _feature.ScoreEstimate

  is_certificate = _feature.estimate_property("is_certificate")
  bound = _feature.estimate_property("bound")
  sigma = _feature.estimate_property("sigma")

  @property
  def deficit(self) -> np.ndarray:
    """``[B]`` ``1 - L``, L the bound of ``h_u(x)`` (the mean for ``bound="point"``)."""
    return np.asarray(self.estimate.deficit)


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


def prediction_margin(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                      sigma: float, key: jax.Array, head: Any = None,
                      prototypes: jax.typing.ArrayLike | None = None,
                      n0: int = 100, n: int = 10_000, alpha: float = _feature.DEFAULT_ALPHA,
                      bound: str = "bernstein",
                      chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                      progress: smoothing.Progress | None = None) -> PredictionMargin:
  """The Monte Carlo half of :func:`certify_prediction`: class, margin and the estimate.

  Arguments as in :func:`certify_prediction`.
  """
  encoders_lib.check_images(x)
  _feature.check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, bound=bound,
                              chunk_size=chunk_size, progress=progress)
  encoder, params, prototypes = _check_classifier(encoder, params, x, prototypes, head, sigma)
  (estimate,) = _feature._estimate(  # pylint: disable=protected-access  # checked above
      params, x, key, encoder=encoder, sigma=sigma, n=n, n0=n0, alpha=alpha, bounds=(bound,),
      references=("mean",), chunk_size=chunk_size, progress=progress)
  cls, delta = _prediction.angle_margin(estimate.direction, prototypes)
  return PredictionMargin(np.asarray(cls), np.asarray(delta), estimate)


def certify_prediction(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                       sigma: float, key: jax.Array, head: Any = None,
                       prototypes: jax.typing.ArrayLike | None = None,
                       n0: int = 100, n: int = 10_000, alpha: float = _feature.DEFAULT_ALPHA,
                       bound: str = "bernstein",
                       chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                       progress: smoothing.Progress | None = None) -> PredictionCertificate:
  """FS-certified prediction of a cosine-prototype head (Theorem A.3.2, closed-form radius).

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
    n0: samples that choose the mean direction and the class.
    n: fresh samples for the lower confidence bound of h_u(x).
    alpha: failure probability.
    bound: confidence bound ("bernstein", "betting", "hoeffding"); "point" gives the
      paper's plug-in estimate, marked ``is_certificate=False``.
    chunk_size: samples per vectorised chunk.
    progress: optional callable advanced by the number of noise samples done (n0 + n in
      all); the results do not change (:func:`certify.estimate_scores`).

  Returns:
    A :class:`PredictionCertificate`: class -1 (abstain) where not certified even at
    radius 0; radius is the l2 radius within which the prediction provably cannot change.
  """
  return _prediction_certificate(prediction_margin(
      params, x, encoder=encoder, sigma=sigma, key=key, head=head, prototypes=prototypes,
      n0=n0, n=n, alpha=alpha, bound=bound, chunk_size=chunk_size, progress=progress))


def _prediction_certificate(m: PredictionMargin) -> PredictionCertificate:
  cls, radius = _prediction.certified_prediction_unchecked(m.margin, m.predicted_class,
                                                           m.deficit, m.estimate.sigma)
  return PredictionCertificate(np.asarray(cls), np.asarray(radius),
                               np.asarray(m.estimate.samples), m.estimate.bound,
                               m.estimate.sigma, m.estimate.alpha)


def prediction_certificate(margin: PredictionMargin) -> PredictionCertificate:
  """The certificate (an estimate for ``bound="point"``) a :class:`PredictionMargin` gives.

  Bound, sigma and alpha are the margin's own (those its Monte Carlo ran with), so the
  result can be neither labelled with another bound nor rescaled by another sigma.
  """
  if not isinstance(margin, PredictionMargin):
    raise ValueError(f"margin must be a certify.PredictionMargin (from certify."
                     f"prediction_margin), got {type(margin).__name__}.")
  _feature._check_estimate(margin.estimate, "margin.estimate")  # pylint: disable=protected-access
  return _prediction_certificate(margin)


def _head_counts(features, kernel, bias):
  # [B, k, K]; LinearHead = Dense on the unit feature. HIGHEST, as for the feature scores:
  # the base classifier counted is the float32 head, whatever the default matmul precision.
  logits = jnp.matmul(features, kernel, precision=jax.lax.Precision.HIGHEST) + bias
  return {"counts": jax.nn.one_hot(jnp.argmax(logits, -1), kernel.shape[-1], dtype=jnp.int32)}


@functools.partial(jax.jit, static_argnames=("encoder", "n", "first_index", "chunk_size"))
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
                               "clopper-pearson", float(sigma), float(alpha))


def rs_predict(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
               head: Any, sigma: float, key: jax.Array, n: int = 100,
               alpha: float = _feature.DEFAULT_ALPHA,
               chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Randomized smoothing PREDICT: the top class, or -1 when a binomial test can't tell."""
  _feature.check_certify_args(sigma=sigma, n=n, alpha=alpha, chunk_size=chunk_size)
  counts = class_counts(params, x, encoder=encoder, head=head, sigma=sigma, n=n, key=key,
                        chunk_size=chunk_size)
  return _prediction.rs_predict_from_counts(counts, alpha=alpha)
