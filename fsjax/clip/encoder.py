"""The CLIP vision encoder seen from [0, 1] pixel space (``config.encoder.name = "clip"``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fsjax import encoders
from fsjax.clip import checkpoint
from fsjax.clip import model as model_lib

# CLIP's own preprocessing statistics (OpenAI CLIP, HF CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURES = ("pooled", "tokens", "patch_tokens")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, eq=False)
class ClipEncoder(encoders.Encoder):
  """CLIP vision tower as an :class:`fsjax.encoders.Encoder`.

  Attributes:
    resolution: input side; must equal the model's ``image_size`` (no position
      embedding interpolation).
    model: the :class:`fsjax.clip.model.CLIP` module.
    feature: "pooled" (projected CLS embedding, one token ``[B, 1, projection_dim]``),
      "tokens" (hidden state ``layer``, ``[B, 1 + num_patches, hidden]``) or
      "patch_tokens" (the same without CLS, ``[B, num_patches, hidden]``; LLaVA-1.5 uses
      layer -2).
    layer: hidden-state index for token features, HF convention (0 = embeddings after
      ``pre_layrnorm``, -1 = last layer, -2 = penultimate); ignored for "pooled".
  """

  model: model_lib.CLIP
  feature: str = "pooled"
  layer: int = -1

  def __post_init__(self):
    if self.feature not in FEATURES:
      raise ValueError(f"feature={self.feature!r} is not one of {FEATURES}.")
    vision = self.model.config.vision_config
    n = vision.num_hidden_layers
    if not -(n + 1) <= self.layer <= n:
      raise ValueError(f"layer={self.layer} is out of range for a {n}-layer vision tower: use "
                       f"0..{n} or -{n + 1}..-1 (0 = embeddings, -1 = last layer).")
    if self.resolution != vision.image_size:
      raise ValueError(f"resolution={self.resolution} differs from the checkpoint's image_size="
                       f"{vision.image_size}; CLIP position embeddings fix the input size, so "
                       "leave resolution unset or set it to image_size.")

  def tokens(self, params, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> CLIP features ``[B, N, D]`` float32 (sigma unused)."""
    del sigma  # a base model does not see the noise level
    x = encoders.resize(jnp.asarray(x, jnp.float32), self.resolution)
    x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    variables = {"params": params}
    if self.feature == "pooled":
      z = self.model.apply(variables, x, method="encode_image")[:, None, :]
    else:
      index = self.layer % (self.model.config.vision_config.num_hidden_layers + 1)
      # Only the layers up to `index` are computed (LLaVA's layer -2 skips the last one).
      z = self.model.apply(variables, x, num_layers=index, method="vision_hidden_states")[index]
      if self.feature == "patch_tokens":
        z = z[:, 1:]
    return z.astype(jnp.float32)


def _to_dict(value) -> dict:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value)


@encoders.register("clip")
def build_clip_encoder(config) -> tuple[ClipEncoder, Any]:
  """Builds ``(ClipEncoder, params)`` from ``config.encoder`` (keys in CONTRIBUTING.md).

  ``checkpoint`` is a local path (see :func:`fsjax.clip.load`); ``None`` means a random
  init of ``architecture`` (a dict of HF CLIP config fields, flat vision-only or with
  ``vision_config``/``text_config``) seeded by ``seed``, for smoke runs.
  """
  dtype_name = config.get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"config.encoder.dtype={dtype_name!r} must be one of {sorted(_DTYPES)}.")
  dtype = _DTYPES[dtype_name]
  if config.get("feature", "pooled") not in FEATURES:  # before a possibly long load
    raise ValueError(f"config.encoder.feature={config.feature!r} is not one of {FEATURES}.")
  path, architecture = config.get("checkpoint"), config.get("architecture")
  if path is None:
    if architecture is None:
      raise ValueError("config.encoder needs a checkpoint path, or an architecture (dict of "
                       "CLIP config fields) for a random init.")
    model, params = model_lib.init(model_lib.CLIPConfig.from_hf_dict(_to_dict(architecture)),
                                   seed=config.get("seed", 0), dtype=dtype)
  else:
    if not os.path.exists(os.path.expanduser(path)):
      raise ValueError(f"config.encoder.checkpoint={path!r} does not exist. Point it at a local "
                       "CLIP checkpoint (e.g. --config.encoder.checkpoint=/path/to/"
                       "clip-vit-large-patch14, a Hugging Face snapshot directory).")
    model, params = checkpoint.load(path, dtype=dtype)
    if architecture is not None:
      _check_architecture(model.config, _to_dict(architecture), path)
  resolution = config.get("resolution") or model.config.vision_config.image_size
  encoder = ClipEncoder(resolution=resolution, model=model,
                        feature=config.get("feature", "pooled"), layer=config.get("layer", -1))
  return encoder, params


def _check_architecture(config: model_lib.CLIPConfig, architecture: dict, path) -> None:
  """Raises unless ``architecture`` (flat vision fields, or HF sub-configs) matches ``config``."""
  if "vision_config" in architecture or "text_config" in architecture:
    groups = [("", {k: architecture[k] for k in ("projection_dim",) if k in architecture},
               {"projection_dim": config.projection_dim}),
              ("vision_config.", architecture.get("vision_config") or {}, config.vision_config),
              ("text_config.", architecture.get("text_config") or {}, config.text_config)]
  else:  # flat: a vision-only config
    groups = [("", architecture, dataclasses.asdict(config.vision_config)
               | {"projection_dim": config.projection_dim})]
  problems = []
  for prefix, wanted, found in groups:
    if wanted and found is None:
      problems.append(f"{prefix[:-1]}: the checkpoint has no text tower")
      continue
    if dataclasses.is_dataclass(found):
      found = dataclasses.asdict(found)
    for k, v in wanted.items():
      if k not in found:
        problems.append(f"{prefix}{k}: not a CLIP config field")
      elif found[k] != v:
        problems.append(f"{prefix}{k}: config {v!r} vs checkpoint {found[k]!r}")
  if problems:
    raise ValueError(f"config.encoder.architecture disagrees with checkpoint {path}: "
                     + "; ".join(problems)
                     + ". Drop config.encoder.architecture when loading a checkpoint.")
