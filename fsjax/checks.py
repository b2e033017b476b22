"""Argument checks: the one implementation of each check every public function shares.

Bad input gets a ``ValueError`` that names the argument, says what it means and how to
fix it, before any jit (house rule). Each check runs on concrete values only: a traced
value (inside ``jax.jit``) is skipped, because its value is not known yet; shapes are
checked by the callers, which know them.

The checks are the primitives of smoothing and certification: a noise level
(:func:`check_sigma`), a count such as ``n``, ``n0`` or a chunk size
(:func:`check_positive_int`), a failure probability (:func:`check_alpha`), a value in an
interval such as a probability, a lower confidence bound, a deficit ``1 - L`` or a radius
(:func:`check_in_range` and its named cases), a non-empty batch (:func:`check_nonempty`)
and a choice among names (:func:`check_choice`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
  """False for a value traced by ``jax.jit`` (its value is unknown until it runs)."""
  return not isinstance(x, jax.core.Tracer)


def _float_array(value: Any, name: str, meaning: str) -> np.ndarray:
  # numpy would read True as 1.0 and "0.25" as 0.25: a flag or a string is never a number.
  if np.asarray(value).dtype.kind in "bcUS":
    raise ValueError(f"{name} must be a number or an array of numbers ({meaning}), got "
                     f"{value!r} of type {type(value).__name__}.")
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number or an array of numbers ({meaning}), got "
                     f"{value!r}.") from e


def _describe(a: np.ndarray) -> str:
  if a.ndim == 0:
    return repr(float(a))
  finite = a[np.isfinite(a)]
  if finite.size == 0:
    return f"no finite value (shape {a.shape})"
  return f"values in [{finite.min():.6g}, {finite.max():.6g}] (shape {a.shape})"


def check_sigma(sigma: Any, *, name: str = "sigma") -> None:
  """Raises ValueError unless ``sigma`` is a finite scalar > 0 (a noise level).

  Args:
    sigma: the standard deviation of the Gaussian noise, in [0, 1] pixel units.
    name: how the caller calls it (e.g. ``"config.certify.sigmas"``).
  """
  if not is_concrete(sigma):
    return
  meaning = "the Gaussian noise level in [0, 1] pixel units, e.g. 0.25"
  s = _float_array(sigma, name, meaning)
  if s.ndim != 0 or not np.isfinite(s) or s <= 0:
    raise ValueError(f"{name} must be one finite number > 0 ({meaning}), got {sigma!r}.")


def check_positive_int(value: Any, *, name: str, minimum: int = 1, meaning: str = "") -> int:
  """Returns ``value`` as an ``int``, or raises ValueError unless it is a whole number >= minimum.

  ``True``/``False`` are refused (they are ints to Python, but never a count); a float
  with a whole value (``1e4``) is accepted.

  Args:
    value: the count (e.g. ``n``, ``n0``, ``chunk_size``).
    name: the argument's name.
    minimum: the smallest valid value.
    meaning: what the count is, e.g. ``"noise samples"``; said in the message.
  """
  what = f" ({meaning})" if meaning else ""
  bad = isinstance(value, (bool, np.bool_))
  if not bad:
    try:
      bad = int(value) != value
    except (TypeError, ValueError, OverflowError):
      bad = True
  if bad or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}{what}, got {value!r}.")
  return int(value)


def check_alpha(alpha: Any, *, name: str = "alpha") -> None:
  """Raises ValueError unless ``alpha`` is a scalar in the open interval (0, 1)."""
  if not is_concrete(alpha):
    return
  meaning = ("the probability that the certificate is wrong, e.g. 0.001 as in Cohen et al.; "
             "0 would need infinitely many samples and 1 certifies nothing")
  a = _float_array(alpha, name, meaning)
  if a.ndim != 0 or not 0.0 < a < 1.0:
    raise ValueError(f"{name} must be one number in (0, 1) ({meaning}), got {alpha!r}.")


def check_in_range(value: Any, *, name: str, low: float, high: float, meaning: str,
                   fix: str = "") -> None:
  """Raises ValueError unless every element of ``value`` is finite and in ``[low, high]``.

  Args:
    value: a scalar or an array.
    name: the argument's name.
    low, high: the closed interval (``np.inf`` for no upper end).
    meaning: what the value is; said in the message.
    fix: an optional sentence on how to fix a bad value.
  """
  if not is_concrete(value):
    return
  a = _float_array(value, name, meaning)
  tail = f" {fix}" if fix else ""
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} contains NaN or Inf ({int(np.sum(~np.isfinite(a)))} of {a.size} "
                     f"values); it must be {meaning}, in [{low}, {high}].{tail}")
  if np.any(a < low) or np.any(a > high):
    raise ValueError(f"{name} must lie in [{low}, {high}] ({meaning}), got {_describe(a)}."
                     f"{tail}")


def check_probability(value: Any, *, name: str, meaning: str = "a probability") -> None:
  """:func:`check_in_range` on [0, 1]: a probability, a score, a lower confidence bound."""
  check_in_range(value, name=name, low=0.0, high=1.0, meaning=meaning)


def check_deficit(value: Any, *, name: str = "deficit") -> None:
  """:func:`check_in_range` on [0, 1] for a deficit ``1 - L`` of a bound ``L`` in [0, 1]."""
  check_in_range(value, name=name, low=0.0, high=1.0,
                 meaning="the deficit 1 - L of a lower confidence bound L in [0, 1], as "
                 "a certify.ScoreEstimate holds it",
                 fix="A negative deficit would claim L > 1, i.e. more than certain.")


def check_nonnegative(value: Any, *, name: str, meaning: str) -> None:
  """:func:`check_in_range` on [0, inf): e.g. an l2 radius eps."""
  check_in_range(value, name=name, low=0.0, high=np.inf, meaning=meaning)


def check_nonempty(value: Any, *, name: str, item: str = "element") -> None:
  """Raises ValueError if ``value`` (an array or its shape's leading axis) holds nothing.

  A batch of zero images, scores or counts has no certificate; numpy's own errors on it
  ("zero-size array to reduction operation") would not say which argument was empty.

  Args:
    value: an array (scalars are never empty).
    name: the argument's name.
    item: what one entry is, e.g. ``"image"``.
  """
  shape = np.shape(value)
  if shape and (shape[0] == 0 or 0 in shape):
    raise ValueError(f"{name} is empty (shape {shape}); pass at least one {item}.")


def check_choice(value: Any, *, name: str, choices: Sequence[str]) -> None:
  """Raises ValueError unless ``value`` is one of ``choices``."""
  if not isinstance(value, str) or value not in tuple(choices):
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
