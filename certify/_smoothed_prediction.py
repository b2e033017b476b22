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
from fsjax import smoothing


class PredictionCertificate(NamedTuple):
  """Certified predictions of a batch: ``cls, radius = certify_prediction(...)`` unpacks it.

  Attributes:
    predicted_class: ``[B]`` the class, or ``ABSTAIN`` (-1) where not certified even at
      radius 0.
    radius: ``[B]`` l2 radius (pixel units) within which the prediction provably cannot
      change, with probability ``1 - alpha``; 0 where it abstains.
  """
  predicted_class: np.ndarray
  radius: np.ndarray

  @property
  def is_certificate(self) -> bool:
    return True


class PredictionEstimate(NamedTuple):
  """What ``certify_prediction(bound="point")`` returns: the paper's plug-in estimate.

  The same fields as :class:`PredictionCertificate`, computed from the Monte Carlo mean
  of h_u(x) instead of its lower confidence bound: NOT a certificate (``is_certificate``
  is False, and the type's name says so wherever the result is printed).
  """
  predicted_class: np.ndarray
  radius: np.ndarray

  @property
  def is_certificate(self) -> bool:
    return False


class PredictionMargin(NamedTuple):
  """What an FS prediction certificate is made of (Theorem A.3.2), per image.

  Attributes:
    predicted_class: ``[B]`` ``c = argmax_k <u, w_k>``, ``u`` the mean direction of the
      ``n0`` selection samples.
    margin: ``[B]`` the angular margin ``Delta`` of ``u`` (radians).
    deficit: ``[B]`` ``1 - L``, ``L`` the ``bound``'s lower confidence bound of ``h_u(x)``
      from ``n`` fresh samples (the Monte Carlo mean for ``bound="point"``).
  The certificate: :func:`certify.certified_prediction` ``(margin, predicted_class,
  deficit=deficit, sigma=sigma)``; the margin it needs at radius r:
  :func:`certify.required_margin` ``(deficit=deficit, sigma=sigma, radius=r)``.
  """
  predicted_class: np.ndarray
  margin: np.ndarray
  deficit: np.ndarray


def prediction_margin(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                      prototypes: jax.typing.ArrayLike, sigma: float, key: jax.Array,
                      n0: int = 100, n: int = 10_000, alpha: float = _feature.DEFAULT_ALPHA,
                      bound: str = "bernstein",
                      chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                      progress: smoothing.Progress | None = None) -> PredictionMargin:
  """The Monte Carlo half of :func:`certify_prediction`: class, margin and deficit.

  Arguments as in :func:`certify_prediction`.
  """
  _feature.check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, bound=bound,
                              chunk_size=chunk_size)
  encoders_lib.check_images(x)
  feature = jax.eval_shape(lambda p, x: encoder(p, x, sigma=sigma), params,
                           jnp.asarray(x, jnp.float32))
  _prediction.check_prototypes(prototypes, feature.shape[-1])  # before any Monte Carlo
  deficits = _feature.score_deficits(params, x, encoder=encoder, sigma=sigma, key=key, n=n,
                                     n0=n0, alpha=alpha, bounds=(bound,), chunk_size=chunk_size,
                                     progress=progress)
  cls, delta = _prediction.angle_margin(deficits["mean"]["direction"], prototypes)
  return PredictionMargin(np.asarray(cls), np.asarray(delta),
                          np.asarray(deficits["mean"][bound]))


def certify_prediction(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
                       prototypes: jax.typing.ArrayLike, sigma: float, key: jax.Array,
                       n0: int = 100, n: int = 10_000, alpha: float = _feature.DEFAULT_ALPHA,
                       bound: str = "bernstein",
                       chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                       progress: smoothing.Progress | None = None
                       ) -> PredictionCertificate | PredictionEstimate:
  """FS-certified prediction of a cosine-prototype head (Theorem A.3.2, closed-form radius).

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder (base or GSB-boosted; a head with a projection certifies on
      :func:`fsjax.heads.fs_encoder`).
    prototypes: ``[K, D]`` unit prototypes (learned, or CLIP zero-shot text embeddings).
    sigma: noise level > 0.
    key: PRNG key.
    n0: samples that choose the mean direction and the class.
    n: fresh samples for the lower confidence bound of h_u(x).
    alpha: failure probability.
    bound: confidence bound ("bernstein", "betting", "hoeffding"); "point" gives the
      paper's plug-in estimate, returned as a :class:`PredictionEstimate`.
    chunk_size: samples per vectorised chunk.
    progress: optional callable advanced by the number of noise samples done (n0 + n in
      all); the results do not change (:func:`certify.score_deficits`).

  Returns:
    A :class:`PredictionCertificate` ``(predicted_class [B], radius [B])`` (a
    :class:`PredictionEstimate` for ``bound="point"``): class -1 (abstain) where not
    certified even at radius 0; radius is the l2 radius within which the prediction
    provably cannot change.
  """
  m = prediction_margin(params, x, encoder=encoder, prototypes=prototypes, sigma=sigma,
                        key=key, n0=n0, n=n, alpha=alpha, bound=bound, chunk_size=chunk_size,
                        progress=progress)
  return certificate_of(m, sigma=sigma, bound=bound)


def certificate_of(m: PredictionMargin, *, sigma: float, bound: str
                   ) -> PredictionCertificate | PredictionEstimate:
  """The certificate (an estimate for ``bound="point"``) a :class:`PredictionMargin` gives."""
  cls, radius = _prediction.certified_prediction(m.margin, m.predicted_class, sigma=sigma,
                                                 deficit=m.deficit)
  result = PredictionEstimate if bound == "point" else PredictionCertificate
  return result(np.asarray(cls), np.asarray(radius))


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
  kernel, bias = _linear_head(head)
  counts = smoothing.with_progress(
      progress, _class_counts, params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma),
      kernel, bias, encoder=encoder, n=int(n), first_index=int(first_index),
      chunk_size=int(chunk_size))
  return np.asarray(counts)


def rs_certify(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
               head: Any, sigma: float, key: jax.Array, n0: int = 100, n: int = 10_000,
               alpha: float = _feature.DEFAULT_ALPHA,
               chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
               progress: smoothing.Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Randomized smoothing CERTIFY (Cohen et al. 2019) with a linear head on f(x + delta).

  n0 samples select the class, n fresh samples give the one-sided Clopper-Pearson bound
  pA; radius ``sigma * Phi^-1(pA)``; abstain (-1) when pA <= 1/2.

  Args:
    head: variables of :class:`certify.LinearHead` on the encoder's unit features.
    Other arguments as in :func:`certify_prediction` (``progress`` counts n0 + n).

  Returns:
    A :class:`PredictionCertificate` ``(predicted_class [B], radius [B])``, class -1
    where it abstains.
  """
  _feature.check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, chunk_size=chunk_size)
  counts0 = class_counts(params, x, encoder=encoder, head=head, sigma=sigma, n=n0, key=key,
                         chunk_size=chunk_size, progress=progress)
  counts = class_counts(params, x, encoder=encoder, head=head, sigma=sigma, n=n, key=key,
                        first_index=n0, chunk_size=chunk_size, progress=progress)
  return PredictionCertificate(*_prediction.rs_certify_from_counts(
      counts0, counts, sigma=sigma, alpha=alpha))


def rs_predict(params: Any, x: jax.typing.ArrayLike, *, encoder: encoders_lib.Encoder,
               head: Any, sigma: float, key: jax.Array, n: int = 100,
               alpha: float = _feature.DEFAULT_ALPHA,
               chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Randomized smoothing PREDICT: the top class, or -1 when a binomial test can't tell."""
  _feature.check_certify_args(sigma=sigma, n=n, alpha=alpha, chunk_size=chunk_size)
  counts = class_counts(params, x, encoder=encoder, head=head, sigma=sigma, n=n, key=key,
                        chunk_size=chunk_size)
  return _prediction.rs_predict_from_counts(counts, alpha=alpha)
