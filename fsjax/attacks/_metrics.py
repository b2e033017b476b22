"""The paper's attack metrics (Section 5.2): FCS, ACC and ASR."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import encoders as encoders_lib
from fsjax.attacks import _common


def feature_cosine_similarity(params: Any, x_adv: jax.typing.ArrayLike,
                              x_ref: jax.typing.ArrayLike, *,
                              encoder: encoders_lib.Encoder, sigma: Any = None, n: int = 0,
                              key: jax.Array | None = None) -> jax.Array:
  """FCS: the cosine between the features of adversarial and reference images.

  The reference is the clean image (the paper's FCS) or the target image. With
  ``sigma`` and ``n > 0`` both features are the smoothed encoder's Monte Carlo estimates
  ``mean_j f(x + delta_j)`` (method.md Eq. 3) with independent noise for the two images;
  with ``n = 0`` they are the base features f (called with ``sigma`` so a GSB encoder
  conditions on it).

  Args:
    params: the encoder's parameters.
    x_adv: ``[B, H, W, 3]`` adversarial images in [0, 1].
    x_ref: ``[B, H', W', 3]`` reference images in [0, 1].
    encoder: the ``Encoder`` (static under jit).
    sigma: smoothing noise level, or None.
    n: Monte Carlo samples per image (0 = no smoothing).
    key: PRNG key, needed when ``n > 0``.

  Returns:
    ``[B]`` float32 cosines in [-1, 1].
  """
  _common.check_smoothing(sigma=sigma, eot_samples=n)
  encoders_lib.check_images(x_adv, name="x_adv")
  _common.check_target(x_adv, x_ref, name="x_ref")
  if n > 0:
    _common.check_key(key, why="n > 0 (smoothed features)")
  else:
    key = jax.random.key(0)  # Unused.
  return _fcs(params, jnp.asarray(x_adv, jnp.float32), jnp.asarray(x_ref, jnp.float32), key,
              sigma, encoder=encoder, n=int(n))


@functools.partial(jax.jit, static_argnames=("encoder", "n"))
def _fcs(params, x_adv, x_ref, key, sigma, *, encoder, n):
  k_adv, k_ref = jax.random.split(key)
  f_adv = _common.smoothed_features(encoder, params, x_adv, sigma=sigma, eot_samples=n,
                                    key=k_adv)
  f_ref = _common.smoothed_features(encoder, params, x_ref, sigma=sigma, eot_samples=n,
                                    key=k_ref)
  return encoders_lib.cosine(f_adv, f_ref)


def _check_labels(a, b, names):
  if np.shape(a) != np.shape(b) or len(np.shape(a)) != 1:
    raise ValueError(f"{names[0]} and {names[1]} must be 1-D label arrays of the same "
                     f"shape [B], got {np.shape(a)} and {np.shape(b)}.")


def accuracy(pred: jax.typing.ArrayLike, label: jax.typing.ArrayLike) -> jax.Array:
  """ACC: the fraction of predictions equal to the true label. ``[B], [B] -> []``."""
  _check_labels(pred, label, ("pred", "label"))
  return jnp.mean(jnp.asarray(pred) == jnp.asarray(label), dtype=jnp.float32)


def attack_success_rate(pred: jax.typing.ArrayLike,
                        target_label: jax.typing.ArrayLike) -> jax.Array:
  """ASR: the fraction of predictions equal to the attacker's target label.

  ``target_label`` may be one label for all images (the paper's classification target,
  class 10 "shark") or one per image. ``[B], [B] or [] -> []``.
  """
  pred = jnp.asarray(pred)
  if isinstance(target_label, numbers.Integral) or np.ndim(target_label) == 0:
    target_label = jnp.full(pred.shape, target_label, pred.dtype)
  _check_labels(pred, target_label, ("pred", "target_label"))
  return jnp.mean(pred == jnp.asarray(target_label), dtype=jnp.float32)
