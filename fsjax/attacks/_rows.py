"""The rows of the attack tables: one builder for both empirical programs.

A *tower* is an unsmoothed encoder with its parameters and a name: the experiment's own
encoder (``"original"``: ``config.encoder``, or the vision tower of the MLLM) and one per
sub-config of ``config.attack.extra_encoders`` (FARE, TeCoA, ... with a ``label``). Each
tower gives, in order:

* the tower itself (``"original"``, ``"FARE"``);
* its smoothed row (``"smoothed"``, ``"FARE + smoothed"``), for an extra tower only when
  ``config.attack.smooth_extra``;
* with a booster (``config.gsb.checkpoint``, a ``train.gsb`` workdir, loaded once), its
  smoothed row on the most boosted GSB variant of the tower (``"smoothed + GSB
  (FS+D+M)"``; an extra tower is boosted by the booster trained on the experiment's own
  encoder: the paper's FARE / TeCoA "+ GSB" rows).

A smoothed row is a value, not a flag: its encoder is a
:class:`fsjax.smoothing.SmoothedEncoder` (``config.attack.sigma``, ``n`` samples) of the
tower or of its boosted variant, its params ``{"encoder": ...}`` (the noise key comes per
call). A program hands a row's encoder on as it is (an MLLM's ``with_encoder``,
:func:`row_features`, :func:`fsjax.attacks.attack_images`) and never asks whether the row
is smoothed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fsjax import batching
from fsjax import encoders as encoders_lib
from fsjax import gsb as gsb_lib
from fsjax import smoothing
from fsjax import variants as variants_lib


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of an attack table: an encoder value, its parameters and its name.

  Attributes:
    label: the row's name in the table (``"original"``, ``"smoothed + GSB (FS+D+M)"``).
    encoder: the attacked and evaluated ``Encoder`` (a ``SmoothedEncoder`` for a smoothed
      row).
    params: its parameters.
    tower: the label of the tower the row is built on (``"original"``, ``"FARE"``).
  """
  label: str
  encoder: encoders_lib.Encoder
  params: Any
  tower: str = ""


Tower = tuple[str, encoders_lib.Encoder, Any]  # (label, encoder, params)


def extra_towers(c) -> list[tuple[Tower, dict]]:
  """``[((label, encoder, params), encoder sub-config)]`` of ``c.extra_encoders``."""
  out = []
  for e in c.extra_encoders:
    e = e.to_dict() if isinstance(e, ml_collections.ConfigDict) else dict(e)
    label = e.pop("label")
    encoder, params = encoders_lib.build(ml_collections.ConfigDict(e))
    out.append(((label, encoder, params), e))
  return out


def build_rows(config, towers: list[Tower]) -> list[Row]:
  """The table's rows, in order (module docstring).

  Args:
    config: the experiment config: ``config.attack`` (``sigma``, ``n``,
      ``smooth_extra``) and ``config.gsb.checkpoint`` (optional booster).
    towers: ``[(label, encoder, params)]``: the experiment's own tower first (its label
      is ``"original"``), then the extra towers (:func:`extra_towers`).

  Returns:
    The rows, tower by tower.
  """
  a = config.attack

  def smoothed_row(label, encoder, params, tower):
    # n samples per evaluation; chunks of at most 16 samples (the programs' chunking).
    return Row(label, smoothing.SmoothedEncoder(encoder, sigma=a.sigma, n=a.n,
                                                chunk_size=min(a.n, 16)),
               {"encoder": params}, tower)

  gsb = config.get("gsb")
  booster = None
  if gsb is not None and gsb.get("checkpoint"):
    booster = gsb_lib.checkpoint.load(gsb.checkpoint, config=config)
  rows = []
  for i, (label, encoder, params) in enumerate(towers):
    rows.append(Row(label, encoder, params, label))
    if i and not a.smooth_extra:
      continue
    smoothed = "smoothed" if i == 0 else f"{label} + smoothed"
    rows.append(smoothed_row(smoothed, encoder, params, label))
    if booster is not None:
      name, b_encoder, b_params = variants_lib.boost(encoder, params, booster, config)
      rows.append(smoothed_row(f"{smoothed} + GSB ({name})", b_encoder, b_params, label))
  return rows


def row_features(row: Row, x: np.ndarray, *, key: jax.Array, batch_size: int) -> np.ndarray:
  """``[N, D]`` the features of the row's encoder that a prototype head judges.

  f(x) for a deterministic encoder; for a :class:`fsjax.smoothing.SmoothedEncoder` the
  Monte Carlo estimate of f_s(x) = E[f(x + delta)] (method.md Eq. 3, norm <= 1) from its
  ``n`` samples, the batch starting at image i drawing its noise from ``fold_in(key, i)``.
  Batches are padded to ``batch_size`` rows (one shape: one compilation).

  Args:
    row: the row.
    x: ``[N, H, W, 3]`` images in [0, 1].
    key: PRNG key of the smoothing noise (unused by a deterministic encoder).
    batch_size: images per call.
  """
  encoder, params = row.encoder, row.params
  out = []
  for sl in batching.batch_slices(x.shape[0], batch_size):
    xb = batching.pad_rows(x[sl], batch_size)
    if isinstance(encoder, smoothing.SmoothedEncoder):
      z = smoothing.smoothed_features(
          params["encoder"], xb, encoder=encoder.base, sigma=encoder.sigma, n=encoder.n,
          key=jax.random.fold_in(key, sl.start),
          chunk_size=min(encoder.chunk_size, encoder.n))
    else:
      z = _features(params, jnp.asarray(xb, jnp.float32), encoder=encoder)
    out.append(np.asarray(z)[:sl.stop - sl.start])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("encoder",))
def _features(params, x, *, encoder):
  return encoder(params, x)
