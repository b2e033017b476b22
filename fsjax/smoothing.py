"""Monte Carlo over Gaussian noise: the engine under every smoothed quantity.

Feature-space smoothing (method.md section 1, Eq. 3) is an expectation over
``delta ~ N(0, sigma^2 I)`` added in [0, 1] pixel space. Everything fsjax estimates
(the smoothed feature ``f_s(x)``, the Gaussian robustness score ``S(x)`` of Eq. 5, the
scores ``h_u`` the certificate bounds, class counts of randomized smoothing) is a *sum
over noise samples of a per-sample statistic of the unit feature f(x + delta)*.
:func:`monte_carlo_sum` computes such sums:

* samples are drawn in chunks; inside a chunk the encoder is ``vmap``-ed over the
  samples; the per-sample statistic is summed at once into running sums, so memory
  does not grow with ``n`` (only the chunk's features are ever materialised);
* the noise of sample ``i`` comes from ``jax.random.fold_in(key, i)``, so the samples,
  and therefore the results, do not depend on the chunk size or the device count
  (sums are re-associated, so equal to float32 rounding, ~1e-7 relative);
* chunks are split over all local devices with ``jax.shard_map`` (contiguous blocks of
  chunks per device), with one ``psum`` at the end; the image batch rides along;
* with a ``reporter`` (:func:`with_progress`), each device reports every chunk it
  finishes to the host, so a program can show a progress bar with an ETA during one
  long jitted call; the sums are equal bit for bit with or without it.

The noise is not clipped to [0, 1]: the smoothed function is E[f(x + delta)] with
Gaussian delta, exactly as the certificate's lemma needs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import checks
from fsjax import cpu
from fsjax import encoders as encoders_lib

PyTree = Any
# statistic(features [B, chunk, D], *aux) -> pytree of per-sample values [B, chunk, ...].
Statistic = Callable[..., PyTree]

DEFAULT_CHUNK_SIZE = 64
SAMPLES_AXIS = "samples"


def noise(key: jax.Array, index: jax.Array, shape: tuple[int, ...], sigma) -> jax.Array:
  """The Gaussian noise of sample ``index`` (one draw for the whole image batch)."""
  return sigma * jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)


def sigma_key(key: jax.Array, sigma: float) -> jax.Array:
  """The key of noise level ``sigma``: ``fold_in(key, round(sigma * 1e6))``.

  Every program derives its per-sigma stream this way, so the same seed gives the same
  noise at a sigma whatever else is in the list of sigmas (and the heads of Table 2, the
  certificates of Table 1 and the audit draw comparable noise). A sigma <= 0 raises
  ValueError (it would not fit ``fold_in``'s unsigned data anyway).
  """
  checks.check_sigma(sigma)
  return jax.random.fold_in(key, int(round(float(sigma) * 1e6)))


def check_sampling(*, sigma, n: int, chunk_size: int, name_n: str = "n") -> None:
  """Validates smoothing settings with errors that name the argument (before any jit)."""
  checks.check_sigma(sigma)
  checks.check_positive_int(n, name=name_n, meaning="noise samples")
  checks.check_positive_int(chunk_size, name="chunk_size",
                            meaning="noise samples per vectorised chunk")


def local_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all local devices whose axis carries the noise samples."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), (SAMPLES_AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,), devices=devices)


# A callable advanced by the number of noise samples just done (e.g. a tqdm bar's update).
Progress = Callable[[int], Any]

_reporters: dict[int, Progress] = {}  # the runs in flight that report progress, by id
_reporter_ids = itertools.count(1)
_reporters_lock = threading.Lock()


def _report(reporter, samples, _) -> None:
  """Host side of a loop's progress callback: ``samples`` more done for ``reporter``."""
  progress = _reporters.get(int(reporter))
  if progress is not None and int(samples) > 0:
    progress(int(samples))


def with_progress(progress: Progress | None, fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)``, a jitted Monte Carlo, reporting to ``progress`` as it runs.

  With ``progress`` None this is the plain call. Otherwise ``fn`` gets a ``reporter``
  keyword (an int32 id, a traced argument, so the id does not recompile) that it hands to
  :func:`monte_carlo_sum`, whose loop then calls ``progress(samples)`` from the device
  after each chunk; the call blocks until the results are ready, so every report has
  arrived when it returns.
  """
  if progress is None:
    return fn(*args, **kwargs)
  with _reporters_lock:
    reporter = next(_reporter_ids) % 2**31
    _reporters[reporter] = progress
  try:
    return jax.block_until_ready(fn(*args, reporter=jnp.int32(reporter), **kwargs))
  finally:
    with _reporters_lock:
      del _reporters[reporter]


def monte_carlo_sum(params: PyTree, x: jax.Array, key: jax.Array, aux: PyTree = (), *,
                    encoder: encoders_lib.Encoder, sigma: float, n: int,
                    statistic: Statistic, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    first_index: int = 0, reporter: jax.Array | None = None) -> PyTree:
  """Sums ``statistic(f(x + delta_i), *aux)`` over noise samples ``i < n``.

  Traceable (call it inside ``jax.jit``); sharded over local devices.

  Args:
    params: the encoder's parameters (replicated on every device).
    x: ``[B, H, W, 3]`` clean images in [0, 1].
    key: PRNG key; sample ``i`` uses ``fold_in(key, first_index + i)``.
    aux: arrays the statistic needs besides the features (e.g. reference directions).
    encoder: the (static) encoder, called as ``encoder(params, x_noisy, sigma=sigma)``.
    sigma: noise standard deviation in pixel units.
    n: number of noise samples (static).
    statistic: ``(features [B, chunk, D], *aux) -> pytree of [B, chunk, ...]``.
    chunk_size: samples per vectorised chunk (static); trades memory for speed.
    first_index: offset of the sample indices, so two stages of one certification
      (n0 then n) can draw disjoint samples from one key.
    reporter: None, or the id :func:`with_progress` gives: then each device reports the
      samples of every chunk it finishes to the host (a ``jax.debug.callback`` that
      reads the chunk index and one element of the running sums: the sums are the same
      bits as without it).

  Returns:
    The statistic's pytree with the chunk axis summed away: leaves ``[B, ...]``.
  """
  mesh = local_mesh()
  num_devices = mesh.devices.size
  chunk_size = min(chunk_size, n)
  chunks_per_device = math.ceil(math.ceil(n / chunk_size) / num_devices)

  def chunk_statistic(chunk_index, x, key, params, aux):
    index = first_index + chunk_index * chunk_size + jnp.arange(chunk_size)
    valid = index < first_index + n  # the last chunks may run past n: masked out
    deltas = jax.vmap(lambda i: noise(key, i, x.shape, sigma))(index)  # [chunk, B, H, W, 3]
    feats = jax.vmap(lambda d: encoder(params, x + d, sigma=sigma))(deltas)  # [chunk, B, D]
    per_sample = statistic(jnp.swapaxes(feats, 0, 1), *aux)  # leaves [B, chunk, ...]

    def masked_sum(v):
      w = valid.reshape((1, chunk_size) + (1,) * (v.ndim - 2)).astype(v.dtype)
      return jnp.sum(v * w, axis=1)
    return jax.tree.map(masked_sum, per_sample)

  def chunk_samples(chunk_index):
    return jnp.clip(n - chunk_index * chunk_size, 0, chunk_size)

  def report(reporter, samples, total):
    """Reports ``samples`` done; ``total`` holds their sums, which orders the callback
    after them (it reads one element; the sums are not changed)."""
    jax.debug.callback(_report, reporter, samples, jax.tree.leaves(total)[0].reshape(-1)[0])

  def per_device(x, key, params, aux, reporter):
    device = jax.lax.axis_index(SAMPLES_AXIS)
    # Start from zeros rather than a peeled first chunk: the encoder then appears once in
    # the program, not twice (half the HLO to compile; the sums are the same).
    shapes = jax.eval_shape(chunk_statistic, 0, x, key, params, aux)
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # Each iteration reports the chunk before it (whose sums it receives), the last chunk
    # is reported after the loop. A loop of one chunk has no callback inside: XLA removes
    # such a loop and simplifies its body, and a callback would prevent that (other bits).
    report_each = reporter is not None and chunks_per_device > 1
    def body(i, total):
      chunk_index = device * chunks_per_device + i
      if report_each:
        report(reporter, jnp.where(i > 0, chunk_samples(chunk_index - 1), 0), total)
      part = chunk_statistic(chunk_index, x, key, params, aux)
      return jax.tree.map(jnp.add, total, part)
    total = jax.lax.fori_loop(0, chunks_per_device, body, total)
    if reporter is not None:
      report(reporter, chunk_samples((device + 1) * chunks_per_device - 1), total)
    return jax.lax.psum(total, SAMPLES_AXIS)

  replicated = jax.P()
  return jax.shard_map(per_device, mesh=mesh, in_specs=replicated, out_specs=replicated,
                       check_vma=False)(x, key, params, aux, reporter)


def feature_sum(features: jax.Array) -> dict[str, jax.Array]:
  """Statistic: the unit features themselves (their sum / n is f_s(x), Eq. 3)."""
  return {"feature": features}


# ------------------------------------------------------------------------------------------
# The smoothed encoder: f_s(x) and the smoothed token view, one implementation.
# ------------------------------------------------------------------------------------------

# What the smoothed token view hands on (see smoothed_tokens); "mean" is f_s itself.
SMOOTHED_FEATURES = ("direction", "raw_mean")
_SUMS = {"mean": ("unit",), "direction": ("unit", "norm"), "raw_mean": ("raw",)}


@dataclasses.dataclass(frozen=True, eq=False)
class _RawFlat(encoders_lib.Encoder):
  """The raw token view of ``base`` flattened to ``[B, T * D]`` (no normalisation), so
  that :func:`monte_carlo_sum` hands the statistic raw features."""

  base: encoders_lib.Encoder = None

  def __call__(self, params, x, *, sigma=None):
    z = self.base.tokens(params, x, sigma=sigma)
    return z.reshape(z.shape[0], -1).astype(jnp.float32)


def _smoothed(params, x, key, sigma, *, encoder, n, features, chunk_size):
  """``[B, T * D]`` float32: f_s(x) (``"mean"``) or the smoothed token view, flattened."""
  names = _SUMS[features]

  def statistic(raw):  # per sample: f = g / ||g|| (method.md 1), ||g||, g itself
    norm = jnp.linalg.norm(raw, axis=-1, keepdims=True)
    stats = {"unit": raw / jnp.maximum(norm, encoders_lib.TINY_NORM), "norm": norm, "raw": raw}
    return {k: stats[k] for k in names}

  total = monte_carlo_sum(params, x, key, encoder=_RawFlat(encoder.resolution, encoder),
                          sigma=sigma, n=n, statistic=statistic, chunk_size=chunk_size)
  if features == "raw_mean":
    return total["raw"] / n
  f_s = total["unit"] / n  # Eq. 3
  if features == "mean":
    return f_s
  return encoders_lib.unit(f_s) * (total["norm"] / n)


def smoothed_tokens(params: PyTree, x: jax.Array, key: jax.Array, sigma, *,
                    encoder: encoders_lib.Encoder, n: int, features: str = "direction",
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """The smoothed encoder's token view: what an MLLM's language side consumes (traceable).

  The encoder runs ``n`` times on ``x + delta_i`` (the noise of :func:`noise`, sample
  ``i`` from ``fold_in(key, i)``), the language side then runs once on the result. With
  ``features="direction"`` (default) the result is the direction of the smoothed feature
  ``f_s(x) = E[f(x + delta)]`` (Eq. 3, f the unit flattened token view), rescaled to the
  Monte Carlo mean raw norm ``E||g(x + delta)||`` so a projector sees features of the
  scale it was trained on. The certificate bounds the direction of the *exact* f_s
  (``cos(f_s(x'), f_s(x))``, method.md 2, mean reference; a positive rescaling does not
  change it); what the language side receives is its ``n``-sample estimate, and the norm
  is not certified. ``features="raw_mean"`` gives the plain Monte Carlo mean of the raw
  features ``E[g(x + delta)]``, which no certificate covers.

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    key: PRNG key of the noise.
    sigma: noise level in [0, 1] pixel units.
    encoder: the (static) base encoder; its ``tokens`` view is ``[B, T, D]``.
    n: noise samples (static; the paper uses 8 at inference).
    features: "direction" or "raw_mean".
    chunk_size: samples per vectorised chunk.

  Returns:
    ``[B, T, D]`` float32.
  """
  if features not in SMOOTHED_FEATURES:
    raise ValueError(f"features={features!r} must be one of {SMOOTHED_FEATURES}.")
  t_d = jax.eval_shape(lambda p, y: encoder.tokens(p, y, sigma=0.0), params, x).shape[1:]
  z = _smoothed(params, x, key, sigma, encoder=encoder, n=n, features=features,
                chunk_size=chunk_size)
  return z.reshape((x.shape[0],) + tuple(t_d))


@cpu.jit(static_argnames=("encoder", "n", "chunk_size"))
def _smoothed_features(params, x, key, sigma, *, encoder, n, chunk_size):
  return _smoothed(params, x, key, sigma, encoder=encoder, n=n, features="mean",
                   chunk_size=chunk_size)


def smoothed_features(params: PyTree, x: jax.typing.ArrayLike, *,
                      encoder: encoders_lib.Encoder, sigma: float, n: int, key: jax.Array,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """Monte Carlo estimate of the smoothed encoder f_s(x) = E[f(x + delta)] (Eq. 3).

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    encoder: the encoder.
    sigma: noise level (> 0).
    n: number of noise samples.
    key: PRNG key.
    chunk_size: samples per vectorised chunk.

  Returns:
    ``[B, D]`` float32, norm <= 1.
  """
  encoders_lib.check_images(x)
  check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  return _smoothed_features(params, jnp.asarray(x, jnp.float32), key, jnp.float32(sigma),
                            encoder=encoder, n=int(n), chunk_size=int(chunk_size))


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothedEncoder(encoders_lib.Encoder):
  """The smoothed encoder as a value: ``base`` seen through ``n`` Gaussian noise samples.

  An :class:`fsjax.encoders.Encoder` like any other (as ``fsjax.gsb.BoostedEncoder``
  wraps one): its token view is :func:`smoothed_tokens` of ``base`` (the view an MLLM's
  language side consumes), its feature ``normalise(tokens)`` the direction of the
  ``n``-sample estimate of f_s. An MLLM is smoothed by
  ``model.with_encoder(SmoothedEncoder(model.encoder, sigma=...))``
  (:func:`fsjax.mllm.smoothed`); an attack through the smoothing (EOT) attacks a
  ``SmoothedEncoder`` whose ``n`` is the number of EOT draws.

  **The noise key travels in the params** (the decision of issue 19, kept for issue 22):
  ``params = {"encoder": base_params, "key": key}``. The encoder contract stays
  ``(params, x, sigma=)``, so every function of ``(encoder, params)`` (attacks and their
  gradients, :func:`monte_carlo_sum`, the MLLMs) takes a smoothed encoder unchanged.
  There is no default key: params without ``"key"`` raise ValueError, so no call
  silently reuses one fixed draw (a deterministic function an attacker could target).
  Put a fresh key per call with :meth:`with_key` (``Encoder.with_key`` is the identity
  for deterministic encoders, so callers need not ask which encoder they hold).

  Attributes:
    base: the encoder being smoothed (a plain or GSB-boosted one; it sees ``sigma``).
    sigma: noise level in [0, 1] pixel units (> 0).
    n: noise samples per call (the paper uses 8 at inference).
    features: the token view handed on, "direction" or "raw_mean" (:func:`smoothed_tokens`).
    chunk_size: samples per vectorised chunk (capped at ``n``).
  """

  base: encoders_lib.Encoder
  sigma: float
  n: int = 8
  features: str = "direction"
  chunk_size: int = DEFAULT_CHUNK_SIZE
  resolution: int = dataclasses.field(init=False)

  def __post_init__(self):
    if not isinstance(self.base, encoders_lib.Encoder):
      raise ValueError(f"base must be an fsjax.encoders.Encoder, got {type(self.base)}.")
    check_sampling(sigma=self.sigma, n=self.n, chunk_size=self.chunk_size)
    if self.features not in SMOOTHED_FEATURES:
      raise ValueError(f"features={self.features!r} must be one of {SMOOTHED_FEATURES}.")
    object.__setattr__(self, "resolution", self.base.resolution)
    object.__setattr__(self, "sigma", float(self.sigma))

  def with_key(self, params: PyTree, key: jax.Array) -> dict[str, PyTree]:
    """``{"encoder": base params, "key": key}`` from this encoder's params (with or
    without a key already): the next call draws its noise from ``key``."""
    self._check(params, need_key=False)
    if key is None:
      raise ValueError("key=None: a SmoothedEncoder needs a PRNG key for its noise; pass "
                       "a fresh one per call, e.g. jax.random.fold_in(key, call_index).")
    return {"encoder": params["encoder"], "key": key}

  def _check(self, params: PyTree, *, need_key: bool = True) -> None:
    keys = set(params) if isinstance(params, Mapping) else None
    if keys is None or not keys <= {"encoder", "key"} or "encoder" not in keys:
      got = sorted(keys) if keys is not None else type(params).__name__
      raise ValueError(f"params of a SmoothedEncoder must be {{'encoder': base params, "
                       f"'key': PRNG key}}, got {got}.")
    if need_key and "key" not in keys:
      raise ValueError("params of this SmoothedEncoder hold no noise key: there is no default "
                       "key (a fixed one would give the same noise every call); pass "
                       "encoder.with_key(params, key) with a fresh key per call, or key= to "
                       "the MLLM's image_features.")

  def tokens(self, params: PyTree, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, H, W, 3]`` -> the smoothed token view ``[B, T, D]`` float32 (traceable).

    ``sigma`` is not used: the base encoder sees this encoder's own :attr:`sigma`.
    """
    del sigma
    self._check(params)
    return smoothed_tokens(params["encoder"], x, params["key"], jnp.float32(self.sigma),
                           encoder=self.base, n=self.n, features=self.features,
                           chunk_size=min(self.chunk_size, self.n))

  def jitted_tokens(self, params: PyTree, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """:meth:`tokens`, jitted, re-sharded once as a plain replicated array.

    The Monte Carlo sum comes back replicated on the engine's explicit ``"samples"``
    mesh, which a language side's own jitted functions (and their parameters' meshes)
    reject; this hands it over on an ``Auto`` mesh of all local devices.
    """
    if sigma is not None and not isinstance(sigma, jax.core.Tracer) \
        and float(np.asarray(sigma)) != self.sigma:
      raise ValueError(f"sigma={sigma!r}: this SmoothedEncoder uses its smoothing's sigma "
                       f"({self.sigma}); do not pass another.")
    self._check(params)
    z = super().jitted_tokens(params, x)
    return jax.device_put(z, jax.NamedSharding(_replicated_mesh(), jax.P()))


@functools.cache
def _replicated_mesh() -> jax.sharding.Mesh:
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), ("replicated",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


@cpu.jit(static_argnames=("encoder", "n", "chunk_size"))
def _measure(params, x, u, key, sigma, *, encoder, n, chunk_size, reporter=None):
  # Centre the sums at the base feature's value, so the float32 variance does not cancel.
  center = jnp.sum(encoder(params, x, sigma=sigma) * u, axis=-1)

  def statistic(features, u, center):
    # HIGHEST: TF32/bf16 default dots on accelerators would err by ~1e-3, more than the
    # margins the audit resolves.
    d = jnp.einsum("bkd,bd->bk", features, u,
                   precision=jax.lax.Precision.HIGHEST) - center[:, None]
    return {"d": d, "d2": d * d}

  total = monte_carlo_sum(params, x, key, (u, center), encoder=encoder, sigma=sigma, n=n,
                          statistic=statistic, chunk_size=chunk_size, reporter=reporter)
  mean_d = total["d"] / n
  var = jnp.maximum(total["d2"] - n * mean_d**2, 0.0) / (n - 1)
  return center + mean_d, jnp.sqrt(var / n)


def measure_inner_product(params: Any, x: jax.typing.ArrayLike, u: jax.typing.ArrayLike, *,
                          encoder: encoders_lib.Encoder, sigma: float, n: int,
                          key: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          progress: Progress | None = None) -> tuple[jax.Array, jax.Array]:
  """Monte Carlo ``<f_s(x), u>`` and its standard error, from n samples.

  A measurement, not a bound: the soundness audit compares it with certified bounds.
  Sums are centred at ``<f(x), u>`` so the float32 variance does not cancel.

  Args:
    params: encoder parameters.
    x: ``[B, H, W, 3]`` images in [0, 1].
    u: ``[B, D]`` directions (e.g. a certificate's reference).
    encoder: the encoder.
    sigma: noise level > 0.
    n: samples >= 2.
    key: PRNG key; sample i uses ``fold_in(key, i)`` (:func:`noise`).
    chunk_size: samples per vectorised chunk.
    progress: optional callable, called with the number of noise samples done as the
      chunks finish (:func:`with_progress`; the results do not change).

  Returns:
    ``([B] mean of <f(x + delta_i), u>, [B] sample std / sqrt(n))``.
  """
  encoders_lib.check_images(x)
  check_sampling(sigma=sigma, n=n, chunk_size=chunk_size)
  checks.check_positive_int(n, name="n", minimum=2, meaning="a standard error needs a "
                            "sample variance")
  return with_progress(progress, _measure, params, jnp.asarray(x, jnp.float32),
                       jnp.asarray(u, jnp.float32), key, jnp.float32(sigma), encoder=encoder,
                       n=int(n), chunk_size=int(chunk_size))
