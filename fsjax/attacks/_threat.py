"""The threat model of the attack tables: one config section, one checker, one attack loop.

Both empirical programs (``certify.robustness``: a prototype head judges the adversarial
features; ``certify.protection``: an MLLM's answer does) read the same section,
``config.attack`` (``configs/common.py:attack_config``):

* the threat model (:class:`ThreatModel`): l_inf ``linf_budget``, ``steps`` sign steps of
  ``step_size``, ``eot_samples`` noise draws per step against a smoothed row (EOT), and
  per-attack keyword ``options`` (e.g. ``{"foa": {"num_clusters": 3}}``);
* the smoothing of the smoothed rows: ``sigma``, and ``n`` Monte Carlo samples when a row's
  features are evaluated;
* the rows (:func:`fsjax.attacks.build_rows`): ``extra_encoders`` (encoder sub-configs
  with a ``label``) and ``smooth_extra``;
* sizes: ``num_images``, ``batch_size`` (images per attack call), ``examples`` (images in
  the PNG strips).

:func:`check_attack_config` validates all of it before anything is built;
:func:`attack_images` is the loop every table runs: batches of one shape (one
compilation), the attack's key folded with the batch's first index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from fsjax import batching
from fsjax import checks
from fsjax import smoothing
from fsjax.attacks import _common
from fsjax.attacks._ensemble import foa
from fsjax.attacks._ensemble import mattack
from fsjax.attacks._pgd import attackvlm
from fsjax.attacks._pgd import pgd

ATTACKS = {"pgd": pgd, "attackvlm": attackvlm, "mattack": mattack, "foa": foa}
ALL = "all"  # --attack=all: every registered attack


def run(name: str, params: Any, x: jax.typing.ArrayLike,
        target: jax.typing.ArrayLike | None = None, *, encoder: Any, **kwargs) -> jax.Array:
  """Runs the attack registered as ``name`` in :data:`ATTACKS`.

  Args:
    name: ``"pgd"``, ``"attackvlm"``, ``"mattack"`` or ``"foa"``.
    params: encoder parameters (a tuple for an ensemble in mattack/foa).
    x: ``[B, H, W, 3]`` clean images in [0, 1].
    target: ``[B, H', W', 3]`` target images (required except for untargeted pgd).
    encoder: the ``Encoder`` under attack (a tuple for an ensemble in mattack/foa).
    **kwargs: the attack's options (``budget``, ``step_size``, ``steps``, ``key``, ...).

  Returns:
    ``[B, H, W, 3]`` adversarial images.
  """
  if name not in ATTACKS:
    raise ValueError(f"attack {name!r} is not known; known attacks: {sorted(ATTACKS)}.")
  return ATTACKS[name](params, x, target, encoder=encoder, **kwargs)


def _as_dict(d: Any) -> dict:
  return d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d or {})


@dataclasses.dataclass(frozen=True)
class ThreatModel:
  """What the attacker may do: l_inf ``budget``, ``steps`` of ``step_size``, EOT draws.

  Attributes:
    budget: l_inf perturbation budget in [0, 1] pixel units (the paper: 16/255).
    step_size: sign-step size (the paper: 1/255).
    steps: attack steps (the paper: 300).
    eot_samples: noise draws per step when the attacked encoder is smoothed (EOT,
      Athalye et al. 2018); 0 = no EOT.
    options: per-attack keyword overrides, ``{attack name: {keyword: value}}``.
  """
  budget: float
  step_size: float
  steps: int
  eot_samples: int
  options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, c, *, name: str = "config.attack") -> "ThreatModel":
    """The threat model of a checked ``config.attack`` section (:func:`check_attack_config`)."""
    check_attack_config(c, name=name)
    return cls(budget=float(c.linf_budget), step_size=float(c.step_size),
               steps=int(c.steps), eot_samples=int(c.eot_samples),
               options={k: _as_dict(v) for k, v in _as_dict(c.get("options")).items()})

  def kwargs(self, attack: str, *, key: jax.Array, sigma: Any = None) -> dict:
    """Keyword arguments of :func:`fsjax.attacks.run` for ``attack``.

    Args:
      attack: the attack's name.
      key: the attack's PRNG key.
      sigma: the noise level of a smoothed encoder (the attack then averages
        ``eot_samples`` noise draws per step), or None for an unsmoothed one.
    """
    out = dict(budget=self.budget, step_size=self.step_size, steps=self.steps, key=key)
    if sigma is not None:  # white-box through the smoothing: EOT over its noise
      out.update(sigma=sigma, eot_samples=self.eot_samples)
    out.update(self.options.get(attack) or {})
    return out

  def describe(self) -> str:
    """The threat model in a table's caption."""
    return (f"l_inf budget {self.budget * 255:g}/255, {self.steps} steps of "
            f"{self.step_size * 255:g}/255, {self.eot_samples} EOT draws per step on a "
            "smoothed row")


def attack_names(attack: str) -> list[str]:
  """``"all"`` -> every registered attack; ``"pgd,foa"`` -> those, if all are known.

  Args:
    attack: the ``--attack`` flag: an attack name, a comma-separated list, or ``"all"``.
  """
  if attack == ALL:
    return list(ATTACKS)
  names = [a.strip() for a in str(attack).split(",")]
  unknown = [a for a in names if a not in ATTACKS]
  if unknown or not names:
    raise ValueError(f"--attack={attack!r}: {unknown} not known; use one of "
                     f"{sorted(ATTACKS)}, a comma-separated list of them, or {ALL!r}.")
  return list(dict.fromkeys(names))


def check_attack_config(c, *, name: str = "config.attack") -> None:
  """Validates a ``config.attack`` section before anything is built; errors name the key.

  Args:
    c: the section (``configs/common.py:attack_config``).
    name: how errors call it.
  """
  if c is None:
    raise ValueError(f"{name} is missing: add the threat model section, "
                     "configs/common.py:attack_config(...).")
  _common.check_budget(budget=c.linf_budget, step_size=c.step_size, steps=c.steps,
                       norm="linf")
  for key, minimum, meaning in (
      ("steps", 1, "attack steps"), ("n", 1, "Monte Carlo samples of a smoothed row"),
      ("eot_samples", 0, "noise draws per attack step on a smoothed row; 0 = no EOT"),
      ("num_images", 1, "attacked images"), ("batch_size", 1, "images per attack call"),
      ("examples", 0, "images in the PNG strips")):
    checks.check_positive_int(c[key], name=f"{name}.{key}", minimum=minimum, meaning=meaning)
  checks.check_sigma(c.sigma, name=f"{name}.sigma")
  for attack, options in _as_dict(c.get("options")).items():
    if attack not in ATTACKS:
      raise ValueError(f"{name}.options has options for {attack!r}, which is not an attack; "
                       f"the keys are attack names: {sorted(ATTACKS)}.")
    if not isinstance(options, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f"{name}.options[{attack!r}] must map keywords of the attack to "
                       f"values, e.g. {{'num_clusters': 3}}, got {options!r}.")
  if not isinstance(c.smooth_extra, bool):
    raise ValueError(f"{name}.smooth_extra={c.smooth_extra!r} must be True or False.")
  for i, e in enumerate(c.extra_encoders):
    if not e.get("label") or not e.get("name"):
      raise ValueError(f"{name}.extra_encoders[{i}] needs a 'label' (the row name) and an "
                       "encoder 'name' (plus the other config.encoder keys).")


def table_sections(config, judge: str, *, program: str) -> tuple[Any, Any]:
  """``(config.attack, config.<judge>)`` of an attack table, ``config.attack`` checked.

  Args:
    config: the experiment config.
    judge: the section of what judges the adversarial features (``"robustness"``,
      ``"protection"``).
    program: the table's program, for the error (``"certify.robustness"``).

  Raises:
    ValueError: ``config.attack`` is invalid or the judge's section is missing.
  """
  check_attack_config(config.get("attack"))
  section = config.get(judge)
  if section is None:
    raise ValueError(f"{program} needs a config.{judge} section (what judges the attack: "
                     f"configs/common.py:{judge}_config).")
  return config.attack, section


def attack_images(attack: str, encoder: Any, params: Any, x: np.ndarray,
                  targets: np.ndarray, *, threat: ThreatModel, key: jax.Array,
                  batch_size: int) -> np.ndarray:
  """Adversarial images of ``x`` under ``attack``, batch by batch.

  Every batch is padded to ``batch_size`` rows (one shape: one compilation) and attacked
  with ``key`` folded with its first index. A :class:`fsjax.smoothing.SmoothedEncoder` is
  attacked white-box through its smoothing: the attack runs on its base encoder (through
  GSB's denoiser and mapper when boosted) with the smoothing's ``sigma`` and averages
  ``threat.eot_samples`` fresh noise draws per step (EOT, the adaptive attack).

  Args:
    attack: the attack's name (:data:`fsjax.attacks.ATTACKS`).
    encoder: the attacked ``Encoder`` (a row's encoder, smoothed or not).
    params: its parameters.
    x: ``[N, H, W, 3]`` clean images in [0, 1].
    targets: ``[N, H', W', 3]`` target images.
    threat: the threat model.
    key: the attack's PRNG key.
    batch_size: images per attack call.

  Returns:
    ``[N, H, W, 3]`` adversarial images (numpy).
  """
  sigma = None
  if isinstance(encoder, smoothing.SmoothedEncoder):
    encoder, params, sigma = encoder.base, params["encoder"], encoder.sigma
  out = []
  for sl in batching.batch_slices(x.shape[0], batch_size):
    kwargs = threat.kwargs(attack, key=jax.random.fold_in(key, sl.start), sigma=sigma)
    adv = run(attack, params, batching.pad_rows(x[sl], batch_size),
              batching.pad_rows(targets[sl], batch_size), encoder=encoder, **kwargs)
    out.append(np.asarray(adv)[:sl.stop - sl.start])
  return np.concatenate(out)


def linf_distances(adversarial: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``[N]``: the l_inf distance of each adversarial image from its clean image."""
  return np.abs(np.asarray(adversarial) - np.asarray(x)).reshape(len(x), -1).max(-1)
