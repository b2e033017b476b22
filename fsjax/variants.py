"""The encoder variants of an experiment: FS, and with a trained booster FS+D, FS+M, FS+D+M.

Every program names its rows by *variant* (the Table 6 ablation): ``"FS"`` is the base
encoder ``config.encoder`` under smoothing; with ``config.gsb.checkpoint`` set (a
``python -m train.gsb`` workdir) the GSB rows follow, those the trained modules allow, in
the order "FS+D", "FS+M", "FS+D+M" (:func:`fsjax.gsb.ablation_variants`).
"""

from __future__ import annotations

from typing import Any

from fsjax import encoders as encoders_lib
from fsjax import gsb as gsb_lib

Variant = tuple[str, encoders_lib.Encoder, Any]  # (name, encoder, params)


def encoder_variants(config) -> list[Variant]:
  """``[(name, encoder, params)]``: the base encoder, plus the GSB ablation if configured."""
  encoder, params = encoders_lib.build(config.encoder)
  variants = [("FS", encoder, params)]
  gsb = config.get("gsb")
  if gsb is not None and gsb.get("checkpoint"):
    variants += gsb_lib.ablation_variants(
        encoder, params, gsb_lib.checkpoint.load(gsb.checkpoint, config=config), config)
  return variants


def most_boosted(config) -> Variant:
  """The last of :func:`encoder_variants`: "FS+D+M" when both modules are trained, else FS.

  Raises ValueError when ``config.gsb.checkpoint`` is set but yields no GSB variant.
  """
  encoder, params = encoders_lib.build(config.encoder)
  gsb = config.get("gsb")
  if gsb is None or not gsb.get("checkpoint"):
    return ("FS", encoder, params)
  return boost(encoder, params, gsb_lib.checkpoint.load(gsb.checkpoint, config=config),
               config)


def boost(encoder: encoders_lib.Encoder, params: Any, gsb_params: Any, config) -> Variant:
  """The most boosted GSB variant of ``(encoder, params)``: the one picker of every program.

  Args:
    encoder: the base encoder.
    params: its parameters.
    gsb_params: a loaded booster (``fsjax.gsb.checkpoint.load``).
    config: the experiment config (``config.gsb`` gives the architectures).

  Returns:
    The last of :func:`fsjax.gsb.ablation_variants`: "FS+D+M" when both modules are
    trained, else "FS+D" or "FS+M".

  Raises:
    ValueError: the booster holds no trained module.
  """
  variants = gsb_lib.ablation_variants(encoder, params, gsb_params, config)
  if not variants:
    raise ValueError(f"config.gsb.checkpoint={config.gsb.get('checkpoint')!r} is set but no "
                     "GSB variant was built from it; check that it is a trained train.gsb "
                     "workdir, or unset it to use the base encoder.")
  return variants[-1]
