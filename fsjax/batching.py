"""Fixed-shape batches: every jitted call sees one batch shape, whatever the data size.

One compilation serves a whole run when the last, smaller batch is padded to the full
size; the padded rows' results are dropped. Padding repeats the last real row, so padded
rows are valid inputs (finite, in range) and never change a real row's result: the noise
of smoothing is drawn per batch position, independent of the other rows' content.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from fsjax import checks


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 of ``a`` to ``size`` rows by repeating its last row.

  Args:
    a: ``[b, ...]`` with ``1 <= b <= size``.
    size: the batch size every call is compiled for.

  Returns:
    ``[size, ...]``: ``a`` itself when ``b == size``.
  """
  a = np.asarray(a)
  if a.shape[0] == size:
    return a
  if not 1 <= a.shape[0] < size:
    raise ValueError(f"pad_rows needs 1 <= rows <= size, got {a.shape[0]} rows for size "
                     f"{size}.")
  return np.concatenate([a, np.repeat(a[-1:], size - a.shape[0], axis=0)])


def batch_slices(total: int, size: int) -> Iterator[slice]:
  """``slice(start, start + size)`` covering ``range(total)`` in order (the last shorter)."""
  size = checks.check_positive_int(size, name="batch size")
  for start in range(0, int(total), size):
    yield slice(start, min(start + size, int(total)))
