"""The encoder interface: every base model, seen from [0, 1] pixel space.

An encoder is a pure function of ``(params, x)`` with ``x`` a ``[B, H, W, 3]`` image batch
in [0, 1] pixel space, the space where smoothing adds its Gaussian noise, so that sigma
and eps are in the paper's units (method.md, Notation). It does everything between the
pixels and the unit feature ``f(x) = g(x) / ||g(x)||`` (method.md section 1): resize, the
model's own normalisation, the forward pass, the choice of feature, the L2 normalisation.

Two views of the same computation:

* ``encoder.tokens(params, x, sigma=...)`` -> ``[B, N, D]`` float32, the raw feature g(x)
  as a token sequence (a pooled embedding is one token, N = 1). The smoothness mapper of
  GSB works on this view.
* ``encoder(params, x, sigma=...)`` -> ``[B, N * D]`` float32 unit vectors, f(x).

``sigma`` is the smoothing noise level. A base model ignores it; the GSB-boosted encoder
(``fsjax.gsb.BoostedEncoder``) feeds it to its denoiser and mapper (Eq. 14-15).

Encoders are frozen dataclasses hashed by identity, so they can be static arguments of
``jax.jit``: one compilation per encoder object and input shape.

Adding a third encoder: subclass :class:`Encoder`, set ``resolution``, implement
``tokens`` (resize with :func:`resize`, normalise, run the model, return ``[B, N, D]``),
and register a builder in ``_BUILDERS`` keyed by the ``config.encoder.name`` it answers to.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import checks

Params = Any


def check_images(x: Any, *, name: str = "x") -> None:
  """Raises ValueError unless ``x`` is a finite, non-empty ``[B, H, W, 3]`` batch in [0, 1].

  Any floating dtype is accepted (float32, float64, bfloat16, float16): the encoders take
  ``jnp.asarray(x, jnp.float32)``, which is exact for bfloat16 and float16, so a
  certificate is about exactly the pixels passed. Runs on concrete values before any jit
  (a traced ``x`` is only shape-checked).
  """
  shape = np.shape(x)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(
        f"{name} must be an image batch of shape [B, H, W, 3] (NHWC, RGB), got shape "
        f"{shape}. Add a batch axis with x[None] for one image; convert grayscale with "
        "np.repeat(x[..., None], 3, -1).")
  checks.check_nonempty(x, name=name, item="image of at least one pixel")
  if isinstance(x, jax.core.Tracer):
    return
  a = np.asarray(x)
  # jnp.issubdtype, not np.issubdtype: numpy does not count ml_dtypes' bfloat16 as floating.
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(
        f"{name} must hold floating-point pixels in [0, 1] (float32, bfloat16, float16 or "
        f"float64), got dtype {a.dtype}; for uint8 images pass x / 255.")
  # float32 is exact for every narrower float (numpy's reductions need a numpy float);
  # min and max propagate NaN and Inf, so two passes check both range and finiteness.
  a = a.astype(np.float32, copy=False)
  lo, hi = float(a.min()), float(a.max())
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f"{name} contains NaN or Inf pixels ({int(np.sum(~np.isfinite(a)))} of "
                     f"{a.size}); certificates of such inputs are meaningless.")
  if lo < 0.0 or hi > 1.0:
    hint = " It looks like 0..255 pixels: divide by 255." if hi > 1.0 and hi <= 255.0 else ""
    raise ValueError(f"{name} must lie in [0, 1] pixel space, got range [{lo:.4g}, {hi:.4g}].{hint}")


def resize(x: jax.Array, size: int) -> jax.Array:
  """Resizes ``[B, H, W, C]`` to ``[B, size, size, C]``: shorter side to ``size``, centre crop.

  Bilinear with antialiasing (as PIL does when CLIP's processor shrinks an image). A
  no-op for inputs already at ``size``; pure and differentiable, so it lives inside the
  certified function and the attacks' gradients pass through it.
  """
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  x = jax.image.resize(x, (b, nh, nw, c), method="bilinear", antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  return x[:, top:top + size, left:left + size, :]


# Norms below this count as zero: a zero vector stays zero instead of becoming NaN.
TINY_NORM = 1e-12


def unit(z: jax.Array, *, axis: int = -1) -> jax.Array:
  """``z / ||z||`` along ``axis`` (a zero vector stays zero): the one unit-vector helper."""
  return z / jnp.maximum(jnp.linalg.norm(z, axis=axis, keepdims=True), TINY_NORM)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine of ``[..., F]`` and ``[..., F]`` -> ``[...]`` (0 against a zero vector)."""
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(den, TINY_NORM)


def normalise(tokens: jax.Array) -> jax.Array:
  """``[B, N, D]`` -> ``[B, N * D]`` unit vectors in float32 (f = g / ||g||, method.md 1)."""
  return unit(tokens.reshape(tokens.shape[0], -1).astype(jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """Base class of every encoder; see the module docstring for the contract."""

  # Side of the square input the model sees; images are resized to it inside the encoder.
  resolution: int

  def tokens(self, params: Params, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> raw features ``[B, N, D]`` float32."""
    raise NotImplementedError(f"{type(self).__name__} must implement tokens()")

  def __call__(self, params: Params, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> unit features ``[B, N * D]`` float32: f(x)."""
    return normalise(self.tokens(params, x, sigma=sigma))

  def with_key(self, params: Params, key: jax.Array) -> Params:
    """``params`` carrying the PRNG ``key`` of the encoder's own randomness.

    A deterministic encoder has none and returns ``params`` unchanged; an encoder that
    draws noise (:class:`fsjax.smoothing.SmoothedEncoder`) takes its key in its params,
    so that every function of ``(encoder, params)`` (attacks, Monte Carlo sums, MLLMs)
    works on it unchanged. Pass a fresh key per call.
    """
    del key
    return params

  def jitted_tokens(self, params: Params, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """:meth:`tokens` as one jitted call on concrete arrays: what an MLLM hands its
    language side (the smoothed encoder also re-shards its output here, once)."""
    # A numpy batch goes to the jitted call as it is (one transfer, no eager conversion).
    x = x.astype(np.float32, copy=False) if isinstance(x, np.ndarray) else jnp.asarray(
        x, jnp.float32)
    return _jitted_tokens(self, params, x, sigma)


@functools.partial(jax.jit, static_argnames="encoder")
def _jitted_tokens(encoder, params, x, sigma):
  return encoder.tokens(params, x, sigma=sigma)


_BUILDERS: dict[str, Callable[..., tuple[Encoder, Params]]] = {}


def register(name: str):
  """Decorator: registers ``builder(encoder_config) -> (encoder, params)`` under ``name``."""
  def wrap(builder):
    _BUILDERS[name] = builder
    return builder
  return wrap


def build(encoder_config) -> tuple[Encoder, Params]:
  """Builds ``(encoder, params)`` from ``config.encoder`` (its ``name`` picks the model)."""
  name = encoder_config.name
  if name not in _BUILDERS:
    raise ValueError(f"config.encoder.name={name!r} is not a known encoder; known: "
                     f"{sorted(_BUILDERS)}.")
  return _BUILDERS[name](encoder_config)
