"""Certified MLLM answers: randomized smoothing of the whole model (docs/method.md section 3).

The feature certificates bound what the *encoder* sees; the language side after it is not
Lipschitz-certified, so they bound nothing about the option the MLLM picks. For a task with
a finite answer set (classification, multiple choice) the answer is a class, and Cohen et
al.'s randomized smoothing applies to the whole MLLM as the base classifier:

* base classifier ``g(x) = argmax_k s_k(x)``, ``s_k`` the log-likelihood of option k's
  tokens after the prompt and the image (:meth:`fsjax.mllm.MLLM.option_scores`: one
  prefill and one batched pass, no decoding);
* smoothed answer ``G(x) = argmax_k P(g(x + delta) = k)``, ``delta ~ N(0, sigma^2 I)`` in
  [0, 1] pixel space, not clipped: the same noise as every feature certificate, drawn by
  :func:`fsjax.smoothing.monte_carlo_sum` (sample ``i`` from ``fold_in(key, i)``), so the
  answers are reproducible from the key and independent of the chunk size;
* CERTIFY: ``n0`` samples select the top answer, ``n`` fresh samples give the one-sided
  Clopper-Pearson lower bound ``pA`` of its probability; radius ``sigma * Phi^-1(pA)``
  (l2, pixel units), abstain when ``pA <= 1/2``
  (:func:`certify.rs_certify_from_counts`). With probability ``>= 1 - alpha`` per image,
  ``G(x') = G(x)`` for every ``||x' - x||_2 < radius``.

The base classifier is an :class:`fsjax.encoders.Encoder` (:class:`OptionAnswerer`) whose
"feature" is the model's distribution over the options (softmax of the option scores), so
the Monte Carlo engine, the attacks (EOT through the noise) and the key protocol are the
ones of the feature certificates. Its vision side is any encoder: plain, GSB-boosted (it
sees ``sigma``: the denoiser conditions on the outer noise level), or FS-smoothed (a
:class:`fsjax.smoothing.SmoothedEncoder` with inner ``n``). A smoothed vision side draws
its inner noise from ``fold_in(key, INNER_STREAM)``, the same inner draws for every outer
sample: the base classifier is then a fixed, deterministic function (the FS-smoothed MLLM
with that inner key), which is all Cohen's theorem needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from certify import _feature
from certify import _prediction
from certify import _sequential
from fsjax import checks
from fsjax import encoders as encoders_lib
from fsjax import smoothing

ABSTAIN = _prediction.ABSTAIN
# The stream of an FS-smoothed vision side's inner noise: fold_in(key, INNER_STREAM), an
# index no outer sample reaches (outer sample i uses fold_in(key, i), i < n0 + n < 2**32 - 1).
INNER_STREAM = 2**32 - 1
# What the program tabulates (the radii).
RADII = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------
# The base classifier: an MLLM answering by option scoring.
# ---------------------------------------------------------------------------------------


def _check_options(options: Any) -> tuple[tuple[int, ...], ...]:
  if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
    raise ValueError(f"options must be a sequence of token-id sequences (one per answer), "
                     f"got {type(options).__name__}.")
  if len(options) < 2:
    raise ValueError(f"options must hold at least 2 answers to certify one, got {len(options)}.")
  out = []
  for k, o in enumerate(options):
    ids = np.asarray(o)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) \
        or np.any(ids < 0):
      raise ValueError(f"options[{k}]={o!r} must be a non-empty sequence of token ids >= 0 "
                       "(tokenize the answer text, e.g. option_ids(tokenizer, texts)).")
    out.append(tuple(int(i) for i in ids))
  if len(set(out)) != len(out):
    raise ValueError("options holds the same token sequence twice; each answer must differ.")
  return tuple(out)


def option_ids(tokenizer: Any, texts: Sequence[str], *, eos_token_id: int | None = None
               ) -> tuple[tuple[int, ...], ...]:
  """Token ids of each answer as the model says it: ``" " + text`` then EOS (the format
  ``fsjax.tasks.training_arrays`` trains on), so "1" and "10" are different answers."""
  checks.check_nonempty(np.asarray(list(texts), object), name="texts", item="answer text")
  eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
  return _check_options([list(tokenizer(" " + t, add_special_tokens=False)["input_ids"])
                         + ([int(eos)] if eos is not None else []) for t in texts])


@dataclasses.dataclass(frozen=True, eq=False)
class OptionAnswerer(encoders_lib.Encoder):
  """An MLLM answering one prompt about each image from a finite set: the base classifier.

  An :class:`fsjax.encoders.Encoder` whose token view is ``[B, 1, K]``, the softmax over
  the K options of :meth:`fsjax.mllm.MLLM.option_scores` (the model's answer distribution
  restricted to the options); ``argmax`` over K is the answer. Its params are the MLLM's,
  ``{"vision": ..., "language": ...}``. Hashed by identity, like encoders.

  Attributes:
    model: an :class:`fsjax.mllm.MLLM`; its ``encoder`` is the vision side (plain,
      GSB-boosted or smoothed).
    input_ids: ``[1, L]`` the prompt in the model's format with the image tokens
      (``model.prompt_ids(prompt, batch=1, num_image_tokens=T)``), the same for every image.
    valid: ``[1, L]`` its valid mask.
    options: the K answers' token ids (:func:`option_ids`).
  """

  model: Any
  input_ids: np.ndarray
  valid: np.ndarray
  options: tuple[tuple[int, ...], ...]
  resolution: int = dataclasses.field(init=False)

  def __post_init__(self):
    ids, valid = np.asarray(self.input_ids), np.asarray(self.valid, bool)
    if ids.ndim != 2 or ids.shape[0] != 1 or valid.shape != ids.shape:
      raise ValueError(f"input_ids and valid must be [1, L] (one prompt for every image), got "
                       f"shapes {ids.shape} and {valid.shape}.")
    if not isinstance(getattr(self.model, "encoder", None), encoders_lib.Encoder):
      raise ValueError("model must be an fsjax.mllm.MLLM (with an encoder), got "
                       f"{type(self.model).__name__}.")
    object.__setattr__(self, "input_ids", ids.astype(np.int32))
    object.__setattr__(self, "valid", valid)
    object.__setattr__(self, "options", _check_options(self.options))
    object.__setattr__(self, "resolution", self.model.encoder.resolution)

  @property
  def num_options(self) -> int:
    return len(self.options)

  def with_key(self, params: Any, key: jax.Array) -> dict[str, Any]:
    """The MLLM's params with the vision side's noise key (a smoothed vision side)."""
    return dict(params, vision=self.model.encoder.with_key(params["vision"], key))

  def scores(self, params: Any, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, K]`` option log-likelihoods of the images (traceable). The features are the
    vision side's token view (what ``image_features`` hands the language side), computed
    with ``sigma`` so a GSB-boosted encoder conditions on the noise level."""
    # jitted_tokens: the token view as the MLLM receives it (a smoothed encoder's Monte
    # Carlo sum re-sharded off the engine's mesh, which the language side rejects).
    features = self.model.encoder.jitted_tokens(params["vision"], x, sigma=sigma)
    b = x.shape[0]
    ids, valid = np.repeat(self.input_ids, b, 0), np.repeat(self.valid, b, 0)
    return self.model.option_scores(params, ids, features, self.options, valid=valid)

  def tokens(self, params: Any, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    return jax.nn.softmax(self.scores(params, x, sigma=sigma), axis=-1)[:, None, :]


def mllm_answerer(model: Any, prompt: str, options: Sequence[Sequence[int]], *,
                  num_image_tokens: int) -> OptionAnswerer:
  """:class:`OptionAnswerer` of ``model`` for one prompt (the user's text) and options."""
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f"prompt={prompt!r} must be the question's text.")
  ids, valid = model.prompt_ids(prompt, batch=1, num_image_tokens=int(num_image_tokens))
  return OptionAnswerer(model, ids, valid, options)


def _check_answerer(answerer: Any, params: Any) -> None:
  if not isinstance(answerer, OptionAnswerer):
    raise ValueError(f"answerer must be a certify.OptionAnswerer (certify.mllm_answerer), "
                     f"got {type(answerer).__name__}.")
  if not isinstance(params, dict) or not {"vision", "language"} <= set(params):
    raise ValueError("params must be the MLLM's {'vision': ..., 'language': ...}.")


def _inner_params(answerer: OptionAnswerer, params: Any, key: jax.Array) -> Any:
  """Params with the vision side's inner key (identity for a deterministic vision side)."""
  return answerer.with_key(params, jax.random.fold_in(key, INNER_STREAM))


# ---------------------------------------------------------------------------------------
# Monte Carlo: answer counts under noise.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("answerer", "chunk_size"))
def _chunk_counts(params, x, key, sigma, start, stop, *, answerer, chunk_size):
  """Answer counts ``[B, K]`` of samples ``start .. start+chunk_size-1`` below ``stop``."""
  index = start + jnp.arange(chunk_size)
  deltas = jax.vmap(lambda i: smoothing.noise(key, i, x.shape, sigma))(index)
  probs = jax.vmap(lambda d: answerer(params, x + d, sigma=sigma))(deltas)  # [chunk, B, K]
  answers = jax.nn.one_hot(jnp.argmax(probs, -1), answerer.num_options, dtype=jnp.int32)
  return jnp.sum(answers * (index < stop)[:, None, None].astype(jnp.int32), axis=0)


def _counts(params, x, key, sigma, *, answerer, n, first_index, chunk_size, progress):
  """Counts of validated arguments. The noise of sample i is ``smoothing.noise(key, i)``,
  as in :func:`fsjax.smoothing.monte_carlo_sum`; the chunks run from a host loop over one
  jitted chunk (one compilation; measured 4x faster on CPU than the engine's in-graph
  loop for this model, and the loop can report progress and be interrupted)."""
  x = jnp.asarray(x, jnp.float32)
  sigma = jnp.float32(sigma)
  chunk = min(int(chunk_size), int(n))
  p = _inner_params(answerer, params, key)
  stop = jnp.int32(first_index + n)
  total = None
  for start in range(int(first_index), int(first_index) + int(n), chunk):
    c = _chunk_counts(p, x, key, sigma, jnp.int32(start), stop, answerer=answerer,
                      chunk_size=chunk)
    total = c if total is None else total + c
    if progress is not None:
      progress(min(chunk, int(first_index) + int(n) - start))
  return np.asarray(total)


def _check_key(key: Any) -> None:
  if key is None:
    raise ValueError("key=None: the noise needs a PRNG key (e.g. jax.random.key(0)); the "
                     "answers are reproducible from it. There is no default key.")


def answer_counts(params: Any, x: jax.typing.ArrayLike, *, answerer: OptionAnswerer,
                  sigma: float, n: int, key: jax.Array, first_index: int = 0,
                  chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                  progress: smoothing.Progress | None = None) -> np.ndarray:
  """Counts ``[B, K]`` of the MLLM's answers on ``x + delta_i``, samples ``first_index <= i <
  first_index + n`` (noise of sample i from ``fold_in(key, i)``, as every certificate)."""
  encoders_lib.check_images(x)
  smoothing.check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  checks.check_positive_int(first_index, name="first_index", minimum=0,
                            meaning="the index of the first noise sample")
  _feature.check_progress(progress)
  _check_answerer(answerer, params)
  _check_key(key)
  return _counts(params, x, key, sigma, answerer=answerer, n=n, first_index=first_index,
                 chunk_size=chunk_size, progress=progress)


@functools.partial(jax.jit, static_argnames=("answerer",))
def _clean(params, x, key, sigma, *, answerer):
  return jnp.argmax(answerer.scores(_inner_params(answerer, params, key), x, sigma=sigma), -1)


def clean_answers(params: Any, x: jax.typing.ArrayLike, *, answerer: OptionAnswerer,
                  key: jax.Array, sigma: float | None = None) -> np.ndarray:
  """``[B]`` the base classifier's answers on the clean images (no outer noise; a
  smoothed vision side draws its inner noise from the key's inner stream; ``sigma`` is
  handed to the vision side: a GSB-boosted one needs the level it denoises for)."""
  encoders_lib.check_images(x)
  _check_answerer(answerer, params)
  _check_key(key)
  if sigma is not None:
    checks.check_sigma(sigma)
  return np.asarray(_clean(params, jnp.asarray(x, jnp.float32), key,
                           None if sigma is None else jnp.float32(sigma), answerer=answerer))


# ---------------------------------------------------------------------------------------
# The certificate.
# ---------------------------------------------------------------------------------------


class AnswerCertificate(NamedTuple):
  """Certified answers of a batch (Cohen et al.'s CERTIFY on the MLLM's answers).

  Attributes:
    answer: ``[B]`` the certified option, or ``ABSTAIN`` (-1) where ``pA <= 1/2``.
    radius: ``[B]`` l2 radius (pixel units) within which the smoothed answer provably
      does not change, with probability ``1 - alpha``; 0 where it abstains.
    p_lower: ``[B]`` the lower confidence bound pA of the top answer's probability
      (Clopper-Pearson; sequential: the anytime bound at the stop).
    top: ``[B]`` the answer the selection samples chose (also where it abstains).
    counts0: ``[B, K]`` answer counts of the ``n0`` selection samples (None when
      sequential: :func:`sequential_answers`).
    counts: ``[B, K]`` answer counts of the ``n`` estimation samples (None when sequential).
    samples: ``[B]`` noise samples drawn per image (n0 + n; sequential: n0 + its stage 2).
    bound: ``"clopper-pearson"`` (``"betting (sequential)"`` for :func:`sequential_answers`).
    sigma: the noise level.
    alpha: the failure probability.
  """
  answer: np.ndarray
  radius: np.ndarray
  p_lower: np.ndarray
  top: np.ndarray
  counts0: np.ndarray
  counts: np.ndarray
  samples: np.ndarray
  bound: str
  sigma: float
  alpha: float

  is_certificate = _feature.IS_CERTIFICATE

  def certified_accuracy(self, labels: jax.typing.ArrayLike,
                         radii: Sequence[float] = RADII) -> np.ndarray:
    """``[R]`` share of images whose certified answer is ``labels`` at radius >= r."""
    return np.asarray(_prediction.certified_accuracy(self.answer, self.radius, labels,
                                                     np.asarray(radii, np.float32)))

  @property
  def abstain_rate(self) -> float:
    return float(np.mean(self.answer == ABSTAIN))


_feature.register_labelled(AnswerCertificate, ("bound", "sigma", "alpha"))


def answer_certificate(counts0: jax.typing.ArrayLike, counts: jax.typing.ArrayLike, *,
                       sigma: float, alpha: float) -> AnswerCertificate:
  """The certificate of answer counts (selection ``counts0``, estimation ``counts``,
  independent samples): top answer ``argmax counts0``, pA its Clopper-Pearson bound in
  ``counts``, radius ``sigma * Phi^-1(pA)``, abstain at ``pA <= 1/2``."""
  cls, radius = _prediction.rs_certify_from_counts(counts0, counts, sigma=sigma, alpha=alpha)
  counts0, counts = np.asarray(counts0, np.int64), np.asarray(counts, np.int64)
  top = np.argmax(counts0, axis=1)
  p_lower = _prediction.clopper_pearson_lower(counts[np.arange(len(top)), top],
                                              counts.sum(axis=1), alpha)
  samples = counts0.sum(axis=1) + counts.sum(axis=1)
  return AnswerCertificate(cls, radius, p_lower, top, counts0, counts, samples,
                           "clopper-pearson", float(sigma), float(alpha))


def certify_answers(params: Any, x: jax.typing.ArrayLike, *, answerer: OptionAnswerer,
                    sigma: float, key: jax.Array, n0: int = 100, n: int = 1_000,
                    alpha: float = _feature.DEFAULT_ALPHA,
                    chunk_size: int = smoothing.DEFAULT_CHUNK_SIZE,
                    progress: smoothing.Progress | None = None) -> AnswerCertificate:
  """Certified answers of an MLLM (module docstring): the radius of what it says.

  Args:
    params: the MLLM's ``{"vision": ..., "language": ...}`` (the vision side's params of
      the answerer's encoder).
    x: ``[B, H, W, 3]`` images in [0, 1].
    answerer: the base classifier (:func:`mllm_answerer`).
    sigma: noise level (> 0), [0, 1] pixel units, as the feature certificates.
    key: PRNG key (required): samples ``0 .. n0-1`` select, ``n0 .. n0+n-1`` estimate.
    n0: selection samples.
    n: estimation samples.
    alpha: failure probability per image.
    chunk_size: noise samples per vectorised chunk (the results do not depend on it).
    progress: optional callable advanced by the samples done (n0 + n in all).

  Returns:
    An :class:`AnswerCertificate`.
  """
  encoders_lib.check_images(x)
  _feature.check_certify_args(sigma=sigma, n=n, n0=n0, alpha=alpha, chunk_size=chunk_size,
                              progress=progress)
  _check_answerer(answerer, params)
  _check_key(key)
  mc = dict(answerer=answerer, chunk_size=chunk_size, progress=progress)
  counts0 = _counts(params, x, key, sigma, n=n0, first_index=0, **mc)
  counts = _counts(params, x, key, sigma, n=n, first_index=n0, **mc)
  return answer_certificate(counts0, counts, sigma=sigma, alpha=alpha)


def sequential_answers(params: Any, x: jax.typing.ArrayLike, *, answerer: OptionAnswerer,
                       sigma: float, key: jax.Array, radii: Sequence[float] = RADII,
                       n_max: int = 1_000, n0: int = 100,
                       alpha: float = _feature.DEFAULT_ALPHA, stop: str = "decision",
                       futility: str = "predictive", chunk_size: int = 16, slots: int = 8,
                       image_ids: jax.typing.ArrayLike | None = None,
                       progress: Any = None) -> AnswerCertificate:
  """Certified answers, each image stopped once "certified at r" is settled for every r of
  ``radii`` (docs/method.md 2b, 3c, 3d): the sequential engine's CERTIFY
  (:func:`certify.sequential_predict`, ``method="RS"``) with the answerer as the base
  classifier (its vote is the top option: an identity head on its option distribution).

  Stage 1 (``n0`` samples) picks the top answer; an anytime-valid betting confidence
  sequence bounds its probability ``pA`` from below; certified at r iff
  ``Phi^-1(pA) > r / sigma``; abstain at ``pA <= 1/2``. Valid at the data-dependent stop
  with probability ``1 - alpha``. Noise: sample ``j`` of image ``i`` from
  ``fold_in(fold_in(key, i), chunk)`` (``image_ids`` name the images, default ``0..B-1``);
  an FS-smoothed vision side takes its inner key as in :func:`certify_answers`.
  ``stop``, ``futility``, ``chunk_size``, ``slots`` as in :func:`certify.sequential_fcsb`
  (``slots x chunk_size`` images go through the MLLM per engine step).

  Returns:
    An :class:`AnswerCertificate` with ``counts0`` / ``counts`` None (a sequence keeps
    running sums, not counts), ``p_lower`` the anytime bound on ``pA`` at the stop,
    ``samples`` per image (n0 included) and bound ``"betting (sequential)"``.
  """
  encoders_lib.check_images(x)
  _check_answerer(answerer, params)
  _check_key(key)
  k = len(answerer.options)
  identity = {"params": {"dense": {"kernel": np.eye(k, dtype=np.float32),
                                   "bias": np.zeros(k, np.float32)}}}
  cert, out = _sequential.sequential_prediction(
      _inner_params(answerer, params, key), x, encoder=answerer, head=identity, method="RS",
      sigma=sigma, radii=radii, key=key, n_max=n_max, n0=n0, alpha=alpha, stop=stop,
      tolerance=0.03, futility=futility, chunk_size=chunk_size, slots=slots,
      steps_per_call=_sequential.DEFAULT_STEPS_PER_CALL, grid_size=_sequential.GRID,
      bets="agrapa", image_ids=image_ids, progress=progress)
  return AnswerCertificate(cert.predicted_class, cert.radius,
                           (1.0 - out["deficit"]).astype(np.float32), out["label"], None, None,
                           cert.samples, cert.bound, float(sigma), float(alpha))


# ---------------------------------------------------------------------------------------
# The audit's objective.
# ---------------------------------------------------------------------------------------


def answer_margin_loss(f_adv: jax.Array, f_ref: jax.Array) -> jax.Array:
  """``[B]`` the margin an attacker minimises to flip the answer: the (EOT-averaged)
  probability of the certified answer minus the largest other one; ``f_ref`` is the
  one-hot ``[B, K]`` of the certified answer. Below 0 the soft smoothed answer flipped."""
  mine = jnp.sum(f_adv * f_ref, -1)
  other = jnp.max(jnp.where(f_ref > 0, -jnp.inf, f_adv), -1)
  return mine - other
