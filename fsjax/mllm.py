"""The surface of a multimodal LLM that the MLLM programs query (LLaVA and OpenFlamingo).

Both :class:`fsjax.llava.Llava` and :class:`fsjax.flamingo.OpenFlamingo` implement
:class:`MLLM`, as pure functions of ``params = {"vision": encoder params, "language":
language-side params}`` (``fsjax.llava.build`` returns them; an OpenFlamingo's are
``of.mllm_params``). A program written against it (``certify.protection``) runs on either
model without asking which one it holds.

The split is where the paper protects the model. ``image_features`` are the features the
language side consumes *from the encoder*: the encoder's token view (``encoder.tokens``),
or, for a smoothed model, the smoothed encoder's (:func:`fsjax.llava.smoothed_tokens`:
``n`` noisy copies through the encoder, then the smoothed direction at the Monte Carlo
mean norm). For LLaVA they go into the projector; for OpenFlamingo into the Perceiver
resampler, so in both models everything after the vision encoder (projector, resampler,
cross-attention, the LLM) runs once, on smoothed features.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

from fsjax import encoders


@runtime_checkable
class MLLM(Protocol):
  """What a multimodal LLM offers the programs (see the module docstring).

  Attributes:
    encoder: the vision side.
    smoothing: the smoothing settings of the vision side, or None.
  """

  encoder: encoders.Encoder
  smoothing: Any

  def with_encoder(self, encoder: encoders.Encoder) -> "MLLM":
    """The same language side on another encoder (``params["vision"]`` must be its)."""

  def smoothed(self, sigma: float, *, n: int = 8, features: str = "direction",
               chunk_size: int = 16) -> "MLLM":
    """The same model seeing through the smoothed encoder (``n`` noise samples)."""

  def image_features(self, params: Any, images: Any, *, key: jax.Array | None = None
                     ) -> jax.Array:
    """``[B, H, W, 3]`` images in [0, 1] -> ``[B, T, D]`` features the language side
    consumes (smoothed under :attr:`smoothing`, noise from ``key``)."""

  def prompt_ids(self, prompt: str | Sequence[str], *, batch: int, num_image_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A task's prompts (the user's text, no image marker) in the model's own format
    -> left-padded ``(input_ids int32 [B, L], valid bool [B, L])``."""

  def generate_ids(self, params: Any, input_ids: Any, features: Any, *, valid: Any = None,
                   max_new_tokens: int = 64) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding from ids and injected features ``[B, T, D]``:
    ``(tokens int32 [B, max_new_tokens], num_steps)``."""

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
