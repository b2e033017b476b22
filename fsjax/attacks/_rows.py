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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from fsjax import encoders as encoders_lib
from fsjax import gsb as gsb_lib
from fsjax import variants as variants_lib


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of an attack table: an encoder value, its parameters and its name.

  Attributes:
    label: the row's name in the table (``"original"``, ``"smoothed + GSB (FS+D+M)"``).
    encoder: the attacked and evaluated ``Encoder``.
    params: its parameters.
    tower: the label of the tower the row is built on (``"original"``, ``"FARE"``).
    smoothed: evaluated and attacked through the smoothing (``config.attack.sigma``).
  """
  label: str
  encoder: encoders_lib.Encoder
  params: Any
  tower: str = ""
  smoothed: bool = False


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
    config: the experiment config: ``config.attack`` (``smooth_extra``) and
      ``config.gsb.checkpoint`` (optional booster).
    towers: ``[(label, encoder, params)]``: the experiment's own tower first (its label
      is ``"original"``), then the extra towers (:func:`extra_towers`).

  Returns:
    The rows, tower by tower.
  """
  gsb = config.get("gsb")
  booster = None
  if gsb is not None and gsb.get("checkpoint"):
    booster = gsb_lib.checkpoint.load(gsb.checkpoint, config=config)
  rows = []
  for i, (label, encoder, params) in enumerate(towers):
    rows.append(Row(label, encoder, params, label))
    if i and not config.attack.smooth_extra:
      continue
    smoothed = "smoothed" if i == 0 else f"{label} + smoothed"
    rows.append(Row(smoothed, encoder, params, label, True))
    if booster is not None:
      name, b_encoder, b_params = variants_lib.boost(encoder, params, booster, config)
      rows.append(Row(f"{smoothed} + GSB ({name})", b_encoder, b_params, label, True))
  return rows
