"""The surface of a multimodal LLM that the MLLM programs query, and the MLLM registry.

Every MLLM (:class:`fsjax.llava.Llava`, :class:`fsjax.flamingo.OpenFlamingo`) implements
:class:`MLLM`, as pure functions of ``params = {"vision": encoder params, "language":
language-side params}``. A program written against it (``certify.protection``) runs on
any registered model without asking which one it holds.

The split is where the paper protects the model. ``image_features`` are the features the
language side consumes *from the encoder*: its token view ``encoder.tokens``. A smoothed
MLLM is the same model on a smoothed encoder (:func:`smoothed`:
``model.with_encoder(fsjax.smoothing.SmoothedEncoder(model.encoder, sigma=...))``, whose
token view is ``n`` noisy copies through the encoder, then the smoothed direction at the
Monte Carlo mean norm). For LLaVA the features go into the projector; for OpenFlamingo
into the Perceiver resampler, so in both models everything after the vision encoder
(projector, resampler, cross-attention, the LLM) runs once, on smoothed features.

**Registry.** ``@mllm.register("name")`` registers ``builder(config) -> (model, params)``
(the model as its checkpoint or architecture describes it, never smoothed);
:func:`build` calls the one the config names: ``config.mllm.name`` if the config has an
``mllm`` section, else the one registered name that is a section of the config
(``config.llava``, ``config.openflamingo``). :func:`build` imports the registered
packages itself (``fsjax.llava``, ``fsjax.flamingo``), so a program imports none of
them. Adding an MLLM: docs/CONTRIBUTING.md, "Adding an MLLM".
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

from fsjax import encoders
from fsjax import smoothing as smoothing_lib

# The packages whose import registers an MLLM builder (name -> module). A new MLLM adds
# its package here and decorates its builder with @register.
PACKAGES = {"llava": "fsjax.llava", "openflamingo": "fsjax.flamingo"}
_BUILDERS: dict[str, Callable[[Any], tuple["MLLM", Any]]] = {}


def register(name: str):
  """Decorator: registers ``builder(config) -> (model, params)`` under ``name``."""
  def wrap(builder):
    _BUILDERS[name] = builder
    return builder
  return wrap


def _load_builders() -> None:
  for module in PACKAGES.values():
    importlib.import_module(module)


def name_of(config) -> str:
  """The MLLM a config names: ``config.mllm.name``, else its one MLLM section."""
  section = config.get("mllm")
  if section is not None and section.get("name"):
    name = section.name
    if name not in PACKAGES and name not in _BUILDERS:
      raise ValueError(f"config.mllm.name={name!r} is not a known MLLM; known: "
                       f"{sorted(set(PACKAGES) | set(_BUILDERS))}.")
    return name
  known = sorted(set(PACKAGES) | set(_BUILDERS))
  present = [n for n in known if config.get(n) is not None]
  if len(present) != 1:
    raise ValueError(f"the config must name one MLLM: set config.mllm.name, or have exactly "
                     f"one MLLM section of {known}; got {present or 'none'} (e.g. "
                     "configs/llava15_7b.py or configs/openflamingo_9b.py).")
  return present[0]


def build(config) -> tuple["MLLM", Any]:
  """``(model, params)`` of the MLLM the config names (see the module docstring), with
  ``params = {"vision": ..., "language": ...}``; unsmoothed (:func:`smoothed` smooths)."""
  name = name_of(config)
  if name not in _BUILDERS:
    _load_builders()
  return _BUILDERS[name](config)


def smoothed(model: "MLLM", params: Any, *, sigma: float, n: int = 8,
             features: str = "direction",
             chunk_size: int = smoothing_lib.DEFAULT_CHUNK_SIZE) -> tuple["MLLM", Any]:
  """The same MLLM seeing through the smoothed encoder (``n`` noise samples per image).

  ``(model.with_encoder(SmoothedEncoder(model.encoder, ...)), params)`` with the vision
  params wrapped as the smoothed encoder's (``{"encoder": ...}``; the noise key comes
  per call, ``image_features(..., key=)``). A config's ``smoothing`` section fits the
  keywords: ``smoothed(model, params, **config.smoothing)`` (for ``n > 0``).
  """
  encoder = smoothing_lib.SmoothedEncoder(model.encoder, sigma=sigma, n=n, features=features,
                                          chunk_size=chunk_size)
  return model.with_encoder(encoder), dict(params, vision={"encoder": params["vision"]})


@runtime_checkable
class MLLM(Protocol):
  """What a multimodal LLM offers the programs (see the module docstring).

  Attributes:
    encoder: the vision side (plain, GSB-boosted, smoothed: any encoder).
  """

  encoder: encoders.Encoder

  def with_encoder(self, encoder: encoders.Encoder) -> "MLLM":
    """The same language side on another encoder (``params["vision"]`` must be its)."""

  def image_features(self, params: Any, images: Any, *, key: jax.Array | None = None
                     ) -> jax.Array:
    """``[B, H, W, 3]`` images in [0, 1] -> ``[B, T, D]`` features the language side
    consumes; ``key`` is the encoder's noise key for this call (``encoder.with_key``:
    required by a smoothed encoder, ignored by a deterministic one)."""

  def prompt_ids(self, prompt: str | Sequence[str], *, batch: int, num_image_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A task's prompts (the user's text, no image marker) in the model's own format
    -> left-padded ``(input_ids int32 [B, L], valid bool [B, L])``."""

  def generate_ids(self, params: Any, input_ids: Any, features: Any, *, valid: Any = None,
                   max_new_tokens: int = 64) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding from ids and injected features ``[B, T, D]``:
    ``(tokens int32 [B, max_new_tokens], num_steps)``."""

  def option_scores(self, params: Any, input_ids: Any, features: Any,
                    options: Sequence[Sequence[int]], *, valid: Any = None) -> jax.Array:
    """Log-likelihood of each option's token ids after each prompt, ``float32 [B, K]``
    (answers from a finite set without decoding: :func:`fsjax.decoding.option_log_likelihoods`)."""

  def detokenize(self, tokens: Any) -> list[str]:
    """Generated ids ``[B, N]`` -> B answers, cut at the end of generation."""


def answer(model: MLLM, params: Any, features: Any, prompts: Sequence[str], *,
           max_new_tokens: int) -> list[str]:
  """Greedy answers of ``model`` to ``prompts`` about features ``[B, T, D]`` (one batch).

  Args:
    model: an :class:`MLLM`.
    params: ``{"vision": ..., "language": ...}`` (only the language side is used).
    features: ``[B, T, D]`` from ``model.image_features`` (or any features of that shape:
      the injection point of feature-space attacks and smoothing).
    prompts: B prompts, the user's text.
    max_new_tokens: the most tokens per answer.

  Returns:
    B stripped strings.
  """
  b, t = np.shape(features)[:2]
  if len(prompts) != b:
    raise ValueError(f"prompts: got {len(prompts)} prompts for {b} feature rows; pass one "
                     "prompt per image.")
  ids, valid = model.prompt_ids(list(prompts), batch=b, num_image_tokens=t)
  tokens, _ = model.generate_ids(params, ids, features, valid=valid,
                                 max_new_tokens=max_new_tokens)
  return [s.strip() for s in model.detokenize(np.asarray(tokens))]
