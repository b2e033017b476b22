"""Loading a trained booster: the final D and M parameters of a ``train.gsb`` workdir.

  gsb_params = fsjax.gsb.checkpoint.load("/tmp/gsb_default", config=config)
  variants = fsjax.gsb.ablation_variants(encoder, encoder_params, gsb_params, config)

``python -m train.gsb --workdir WORKDIR`` leaves ``WORKDIR/config.json`` (the config of
the run) and orbax checkpoints ``WORKDIR/denoiser/<step>`` and ``WORKDIR/mapper/<step>``
of each stage's train state ``{"step", "params", "opt_state"}``. :func:`load` restores
the latest step of each stage WITHOUT a target structure, from the shapes and dtypes
orbax stores beside the arrays: it needs neither the optimiser nor the encoder, and works
on any device count. The parameters are then checked against the modules that the
stored ``config.json`` describes, and, when the caller passes its own ``config``,
against the architecture and encoder that config will build (a booster trained on
another encoder or token dim is refused with the difference spelled out, instead of a
shape error deep inside a jitted certify call).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from fsjax import checkpointing
from fsjax.gsb import boosted

STAGES = ("denoiser", "mapper")
CONFIG_FILE = "config.json"
# config.encoder keys that may differ between training and use: the compute dtype only
# changes the rounding of the same features (a warning, not an error).
_ENCODER_SOFT_KEYS = ("dtype",)
# Module fields that may differ: damping_init acts at initialisation only; dtype (warned).
_ARCH_SOFT_KEYS = ("damping_init", "dtype")


def _module_fields(module) -> dict[str, Any]:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name")}


def _restore_params(stage_dir: pathlib.Path) -> tuple[int, Any] | None:
  """``(step, params)`` of the latest checkpoint in ``stage_dir``, or None if it has none.

  Raises:
    fsjax.checkpointing.DamagedCheckpointError: the checkpoint cannot be read (one line
      naming its folder and the fix).
  """
  mngr = ocp.CheckpointManager(
      stage_dir, item_handlers=ocp.StandardCheckpointHandler(),
      # Reads only (no save is ever called); read_only=True would log three warnings.
      options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = mngr.latest_step()
    if step is None:
      return None
    # No target: the abstract tree comes from the checkpoint's own metadata, placed on
    # one local device whatever sharding it was saved with.
    state = checkpointing.restore_as_saved(
        mngr, step, what=f"GSB {stage_dir.name} checkpoint",
        fix=f"rerun `python -m train.gsb --workdir {stage_dir.parent}` with the config it "
        "was trained with (it retrains from the checkpoint before it).")
  finally:
    mngr.close()
  if not isinstance(state, dict) or "params" not in state:
    raise ValueError(f"{stage_dir}/{step} is not a train.gsb checkpoint: expected a train "
                     "state with a 'params' entry.")
  return step, state["params"]


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): (tuple(v.shape), str(v.dtype)) for k, v in flat}


def _check_against(params, module, example_args, what: str) -> None:
  """Raises ValueError unless ``params`` has exactly ``module``'s parameter shapes."""
  expected = jax.eval_shape(
      lambda *args: module.init(jax.random.key(0), *args), *example_args)["params"]
  got, want = _shapes(params), _shapes(expected)
  if got != want:
    diff = [f"{k}: checkpoint {got.get(k, 'missing')}, architecture {want.get(k, 'missing')}"
            for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    raise ValueError(f"{what} do not fit the architecture: " + "; ".join(diff[:5])
                     + (f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""))


def mapper_token_dim(mapper_params) -> int:
  """The token dim D a trained mapper works on (its per-channel damping has shape [D])."""
  return int(mapper_params["block_0"]["damping"].shape[0])


def _check_params(params: dict[str, Any], config, token_dim: int | None, what: str) -> None:
  """Raises ValueError unless every stage's parameters fit the modules ``config`` builds."""
  if "denoiser" in params:
    den = boosted.build_denoiser(config)
    side = 2 ** (len(den.channel_mults) - 1)  # the smallest valid image side
    _check_against(params["denoiser"], den,
                   (jax.ShapeDtypeStruct((1, side, side, 3), "float32"), 0.0),
                   f"{what}: denoiser parameters")
  if "mapper" in params:
    try:
      mapper = boosted.build_mapper(config, token_dim)
    except ValueError as e:
      raise ValueError(f"{what}: {e}") from e
    _check_against(params["mapper"], mapper,
                   (jax.ShapeDtypeStruct((1, 1, token_dim), "float32"), 0.0),
                   f"{what}: mapper parameters (token dim {token_dim})")


def _check_architecture(params: dict[str, Any], trained, given, token_dim: int | None,
                        workdir) -> None:
  """Raises ValueError if ``given`` builds D or M unlike the training run did.

  Equal shapes are not enough: ``num_groups`` (GroupNorm) changes the function, not the
  shapes. ``damping_init`` only matters at initialisation; ``dtype`` changes rounding
  only (a warning).
  """
  for which in STAGES:
    if which not in params:
      continue
    build = (boosted.build_denoiser if which == "denoiser"
             else lambda c: boosted.build_mapper(c, token_dim))
    a, b = _module_fields(build(trained)), _module_fields(build(given))
    diff = [f"config.gsb.{which}.{k}: trained with {a[k]!r}, given {b[k]!r}"
            for k in a if a[k] != b[k] and k not in _ARCH_SOFT_KEYS]
    if diff:
      raise ValueError(f"The booster in {workdir} was trained with another {which} "
                       f"architecture: {'; '.join(diff)}. Use the training config's "
                       "values (its config.json).")
    if a["dtype"] != b["dtype"]:
      logging.warning("fsjax.gsb.checkpoint: the %s in %s was trained with dtype %s, used "
                      "with %s.", which, workdir, a["dtype"], b["dtype"])


def _check_encoder(trained: dict[str, Any], given: dict[str, Any], workdir) -> None:
  """Raises ValueError if ``config.encoder`` differs from training's (beyond ``dtype``)."""
  # Through JSON, as config.json was written: tuples become lists on both sides.
  trained, given = json.loads(json.dumps(trained)), json.loads(json.dumps(given))
  hard = [k for k in sorted(set(trained) | set(given))
          if k not in _ENCODER_SOFT_KEYS and trained.get(k) != given.get(k)]
  if hard:
    diff = "; ".join(f"config.encoder.{k}: trained with {trained.get(k)!r}, "
                     f"given {given.get(k)!r}" for k in hard)
    raise ValueError(f"The booster in {workdir} was trained for another encoder: {diff}. "
                     "Its denoiser and mapper only fit the encoder (and token features) "
                     "they were trained on: certify with the training config's encoder, or "
                     "train a booster for this one.")
  for k in _ENCODER_SOFT_KEYS:
    if trained.get(k) != given.get(k):
      logging.warning("fsjax.gsb.checkpoint: %s was trained with config.encoder.%s=%r, "
                      "used with %r.", workdir, k, trained.get(k), given.get(k))


def load(workdir: str | pathlib.Path, *, config=None) -> dict[str, Any]:
  """The final (latest) trained parameters of each GSB stage in a ``train.gsb`` workdir.

  Args:
    workdir: the ``--workdir`` of ``python -m train.gsb`` (``config.gsb.checkpoint``).
    config: optional experiment config the booster will be used with; when given, its
      ``config.gsb.denoiser`` / ``config.gsb.mapper`` architecture and ``config.encoder``
      must match those of the training run (``dtype`` may differ, with a warning).

  Returns:
    ``{"denoiser": params, "mapper": params}``, the stages that have a checkpoint (a run
    stopped during stage 1 has no mapper yet), ready for
    :func:`fsjax.gsb.ablation_variants` and :class:`fsjax.gsb.BoostedEncoder`.

  Raises:
    FileNotFoundError: no such directory, or no checkpoint of either stage in it.
    ValueError: the parameters do not fit the architecture of the stored config, or the
      given ``config`` asks for another architecture or encoder.
  """
  path = pathlib.Path(workdir).expanduser().absolute()
  if not path.is_dir():
    raise FileNotFoundError(
        f"GSB checkpoint {path} does not exist; config.gsb.checkpoint must be the "
        "--workdir of a finished `python -m train.gsb` run.")
  out, steps = {}, {}
  for stage in STAGES:
    if (path / stage).is_dir():
      restored = _restore_params(path / stage)
      if restored is not None:
        steps[stage], out[stage] = restored
  if not out:
    raise FileNotFoundError(
        f"No GSB checkpoint in {path}: expected {path}/denoiser/<step> or "
        f"{path}/mapper/<step>, written by `python -m train.gsb --workdir {path}`.")
  logging.info("fsjax.gsb.checkpoint: loaded %s from %s.",
               ", ".join(f"{k} at step {v}" for k, v in steps.items()), path)

  config_path = path / CONFIG_FILE
  trained = None
  if config_path.is_file():
    trained = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  else:
    logging.warning("fsjax.gsb.checkpoint: %s has no %s; the parameters cannot be "
                    "checked against the training config.", path, CONFIG_FILE)

  token_dim = mapper_token_dim(out["mapper"]) if "mapper" in out else None
  if trained is not None:
    _check_params(out, trained, token_dim,
                  f"The GSB parameters in {path} (trained config {config_path})")
  if config is not None:
    _check_params(out, config, token_dim, f"The GSB parameters in {path} (given config)")
    if trained is not None:
      _check_architecture(out, trained, config, token_dim, path)
      if trained.get("encoder") is not None and config.get("encoder") is not None:
        _check_encoder(trained.encoder.to_dict(), config.encoder.to_dict(), path)
  return out
