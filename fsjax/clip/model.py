"""CLIP (vision and text transformers) in Flax linen.

The parameter tree mirrors the Hugging Face Flax CLIP (``FlaxCLIPModel``) names exactly,
so a ``flax_model.msgpack`` written by transformers 4 restores as is, and PyTorch
checkpoints convert by a renaming and a transpose (``fsjax.clip.checkpoint``)::

  vision_model/embeddings/{class_embedding, patch_embedding/kernel, position_embedding/embedding}
  vision_model/pre_layrnorm/{scale, bias}
  vision_model/encoder/layers/{i}/self_attn/{q_proj, k_proj, v_proj, out_proj}/{kernel, bias}
  vision_model/encoder/layers/{i}/{layer_norm1, layer_norm2}/{scale, bias}
  vision_model/encoder/layers/{i}/mlp/{fc1, fc2}/{kernel, bias}
  vision_model/post_layernorm/{scale, bias}
  visual_projection/kernel
  text_model/embeddings/{token_embedding, position_embedding}/embedding
  text_model/encoder/layers/{i}/...             (as in the vision tower)
  text_model/final_layer_norm/{scale, bias}
  text_projection/kernel
  logit_scale                                    (a scalar)

Dense kernels are ``[in, out]``, the patch convolution kernel is HWIO. A vision-only
model (``CLIPConfig.text_config is None``, as ``CLIPVisionModelWithProjection``) has
only ``vision_model`` and ``visual_projection``.

``dtype`` is the compute dtype of matmuls and activations; parameters stay float32, and
LayerNorm and the attention softmax always run in float32.

Images are ``[B, H, W, 3]`` (NHWC), already CLIP-normalised, with ``H = W = image_size``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import matmul
from fsjax import random_init

Dtype = Any

_ACTIVATIONS = {
    # OpenAI CLIP's sigmoid approximation of GELU (every OpenAI-pretrained CLIP).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # transformers' "gelu" is the exact erf form, as torch.nn.functional.gelu.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _square(name: str, value: Any) -> int:
  """HF allows ``image_size``/``patch_size`` as an int or an [h, w] pair; we need squares."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{name}={value!r}: only square images and patches are supported.")
    value = value[0]
  return int(value)


def _check_tower(cfg, kind: str) -> None:
  if cfg.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"{kind}.hidden_act={cfg.hidden_act!r} is not supported; use one of "
                     f"{sorted(_ACTIVATIONS)}.")
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"{kind}.hidden_size={cfg.hidden_size} is not a multiple of "
                     f"num_attention_heads={cfg.num_attention_heads}.")


def _from_dict(cls, d: Mapping[str, Any]):
  """Builds a config dataclass from an HF dict, ignoring fields that do not shape the net."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of HF ``CLIPVisionConfig`` that define the network (same defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    object.__setattr__(self, "image_size", _square("image_size", self.image_size))
    object.__setattr__(self, "patch_size", _square("patch_size", self.patch_size))
    _check_tower(self, "vision_config")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision_config.image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}.")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  from_dict = classmethod(_from_dict)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of HF ``CLIPTextConfig`` that define the network (same defaults).

  ``eos_token_id`` picks the pooled position (see :meth:`CLIP.encode_text`).
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    _check_tower(self, "text_config")
    if not isinstance(self.eos_token_id, int):
      raise ValueError(f"text_config.eos_token_id must be one int, got {self.eos_token_id!r}.")

  from_dict = classmethod(_from_dict)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP architecture: a vision tower, an optional text tower, the projection size.

  Attributes:
    vision_config: the vision transformer.
    text_config: the text transformer, or None for a vision-only model
      (HF ``CLIPVisionModelWithProjection``).
    projection_dim: size of the joint embedding space.
    logit_scale_init_value: initial ``logit_scale`` of a random init.
  """

  vision_config: CLIPVisionConfig
  text_config: CLIPTextConfig | None = None
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    """Builds the config from a Hugging Face ``config.json`` dict.

    Accepts a full ``CLIPModel`` config (``vision_config`` / ``text_config`` sub-dicts,
    model_type "clip") and a flat vision-only ``CLIPVisionModelWithProjection`` config
    (model_type "clip_vision_model"). Legacy ``text_config_dict`` / ``vision_config_dict``
    entries are honoured as transformers does: defaults plus those entries override the
    sub-config (this is how openai/clip-vit-* checkpoints get ``eos_token_id`` 49407).
    """
    d = dict(d)
    model_type = d.get("model_type")
    if model_type == "clip_vision_model" or (
        model_type is None and "vision_config" not in d and "hidden_size" in d):
      vision = CLIPVisionConfig.from_dict(d)
      return cls(vision_config=vision, text_config=None, projection_dim=vision.projection_dim)
    if model_type not in (None, "clip"):
      raise ValueError(f"config.json has model_type={model_type!r}; expected 'clip' or "
                       "'clip_vision_model'.")
    towers = {}
    for name, tower_cls in (("vision", CLIPVisionConfig), ("text", CLIPTextConfig)):
      sub = dict(d.get(f"{name}_config") or {})
      legacy = d.get(f"{name}_config_dict")
      if legacy:
        sub.update(dataclasses.asdict(tower_cls.from_dict(legacy)))
      towers[name] = tower_cls.from_dict(sub)
    return cls(vision_config=towers["vision"], text_config=towers["text"],
               projection_dim=int(d.get("projection_dim", 512)),
               logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)))


def _layer_norm(cfg, name: str):
  """LayerNorm computed in float32 whatever the compute dtype (it is precision-critical)."""
  ln = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32,
                    name=name)
  return lambda x: ln(x.astype(jnp.float32))


class CLIPAttention(nn.Module):
  """Multi-head self-attention; logits and softmax in float32."""

  config: Any
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               num_queries: int | None = None) -> jax.Array:
    """Self-attention of ``x`` ``[B, T, D]``.

    Args:
      x: ``[B, T, D]`` tokens.
      mask: bool, broadcastable to ``[B, 1, T, T]`` (True = attend).
      num_queries: only the first ``num_queries`` tokens attend (they still attend to
        all ``T``); None: all of them.

    Returns:
      ``[B, num_queries or T, D]``.
    """
    d, h = self.config.hidden_size, self.config.num_attention_heads
    dense = functools.partial(matmul.Dense, d, dtype=self.dtype, param_dtype=jnp.float32)
    # Heads first, [B, H, T, d]: XLA's CPU dots run the two attention einsums ~1.5x faster
    # with the batch dimensions leading than on the [B, T, H, d] layout (measured, ViT-B/16).
    split = lambda y: y.reshape(*y.shape[:2], h, d // h).transpose(0, 2, 1, 3)
    queries = x if num_queries is None else x[:, :num_queries]
    q = split(dense(name="q_proj")(queries))
    k = split(dense(name="k_proj")(x))
    v = split(dense(name="v_proj")(x))
    if mask is not None and num_queries is not None and mask.shape[-2] != 1:
      mask = mask[..., :num_queries, :]
    out = matmul.attention(q, k, v, mask).transpose(0, 2, 1, 3)
    out = out.reshape(queries.shape[:2] + (d,))
    return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    # fc1's float32 result goes through the activation before rounding to the compute
    # dtype: on CPU XLA's bfloat16 sigmoid/erf cost twice the float32 ones.
    x = matmul.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1",
                     dot_general=matmul.dot_general_float32)(x)
    x = _ACTIVATIONS[cfg.hidden_act](x).astype(self.dtype)
    return matmul.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  config: Any
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               num_queries: int | None = None) -> jax.Array:
    """``[B, T, D]`` -> ``[B, T, D]``, or only its first ``num_queries`` tokens ``[B, n, D]``.

    Token ``i``'s output depends on the others only through attention, so computing the
    first ``num_queries`` outputs needs keys and values of all tokens but queries, the
    residual and the MLP only for those ``num_queries``.
    """
    cfg = self.config
    y = _layer_norm(cfg, "layer_norm1")(x).astype(self.dtype)
    if num_queries is not None:
      x = x[:, :num_queries]
    x = x + CLIPAttention(cfg, self.dtype, name="self_attn")(y, mask, num_queries=num_queries)
    y = _layer_norm(cfg, "layer_norm2")(x).astype(self.dtype)
    return x + CLIPMLP(cfg, self.dtype, name="mlp")(y)


class CLIPLayerCollection(nn.Module):
  """The ``layers`` scope, whose children are named "0", "1", ... as in HF Flax CLIP."""

  config: Any
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, num_layers=None,
               last_layer_queries=None) -> tuple[jax.Array, ...]:
    """Hidden states ``(x, layer 1, ..., layer n)``; with ``last_layer_queries=m`` the last
    one holds only the first ``m`` tokens (the others are not computed)."""
    n = self.config.num_hidden_layers if num_layers is None else num_layers
    hidden_states = [x]
    for i in range(n):
      queries = last_layer_queries if i == n - 1 else None
      x = CLIPEncoderLayer(self.config, self.dtype, name=str(i))(x, mask, num_queries=queries)
      hidden_states.append(x)
    return tuple(hidden_states)


class CLIPEncoder(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, num_layers=None,
               last_layer_queries=None) -> tuple[jax.Array, ...]:
    return CLIPLayerCollection(self.config, self.dtype, name="layers")(
        x, mask, num_layers=num_layers, last_layer_queries=last_layer_queries)


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """``[B, S, S, C]`` -> ``[B, 1 + num_patches, D]``: [CLS; patches] + positions."""
    cfg = self.config
    init = nn.initializers.normal(0.02)
    cls_emb = self.param("class_embedding", init, (cfg.hidden_size,), jnp.float32)
    p = cfg.patch_size
    patches = matmul.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                          use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    # Row-major over the patch grid, as torch's flatten(2) of an NCHW map.
    patches = patches.reshape(b, -1, cfg.hidden_size)
    cls_tok = jnp.broadcast_to(cls_emb.astype(self.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls_tok, patches], axis=1)
    n = cfg.num_patches + 1
    pos = nn.Embed(n, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                   name="position_embedding")(jnp.arange(n))
    return x + pos[None]


class CLIPVisionTransformer(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, num_layers: int | None = None,
               pooled_only: bool = False):
    """Returns ``(hidden_states, pooled)``; ``pooled`` is None when stopped early.

    ``pooled_only``: the pooled CLS feature is all the caller uses, so the last layer
    is computed for the CLS token alone (its hidden state is then ``[B, 1, D]``): the
    same pooled value, ~1/num_hidden_layers less work.
    """
    cfg = self.config
    x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
    x = _layer_norm(cfg, "pre_layrnorm")(x).astype(self.dtype)
    hidden_states = CLIPEncoder(cfg, self.dtype, name="encoder")(
        x, num_layers=num_layers, last_layer_queries=1 if pooled_only else None)
    if len(hidden_states) <= cfg.num_hidden_layers:
      return hidden_states, None
    pooled = _layer_norm(cfg, "post_layernorm")(hidden_states[-1][:, 0])
    return hidden_states, pooled


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                   name="token_embedding")(input_ids)
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                   dtype=self.dtype, name="position_embedding")(jnp.arange(input_ids.shape[1]))
    return tok + pos[None]


class CLIPTextTransformer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Returns ``(last_hidden_state [B, T, D] float32, pooled [B, D] float32)``."""
    cfg = self.config
    t = input_ids.shape[1]
    x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    # Causal, and padded keys masked out (HF create_causal_mask with an attention_mask).
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
    x = CLIPEncoder(cfg, self.dtype, name="encoder")(x, mask)[-1]
    x = _layer_norm(cfg, "final_layer_norm")(x)
    if cfg.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773) pool at the highest token id, the
      # end-of-text token of the original CLIP vocabulary; transformers keeps that rule.
      pos = jnp.argmax(input_ids, axis=-1)
    else:
      # The first end-of-text token (padding may repeat it); position 0 if there is none.
      pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return x, pooled


class CLIP(nn.Module):
  """CLIP with the Hugging Face Flax parameter tree (see the module docstring).

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); parameters are float32, LayerNorm and
      softmax run in float32.
  """

  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.vision_model = CLIPVisionTransformer(cfg.vision_config, self.dtype)
    self.visual_projection = matmul.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    if cfg.text_config is not None:
      self.text_model = CLIPTextTransformer(cfg.text_config, self.dtype)
      self.text_projection = matmul.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
      self.logit_scale = self.param(
          "logit_scale", lambda _: jnp.asarray(cfg.logit_scale_init_value, jnp.float32))

  def __call__(self, pixel_values, input_ids=None, attention_mask=None):
    """Runs every part (used by ``init``): ``(image_embeds, text_embeds, logit_scale)``."""
    image_embeds = self.encode_image(pixel_values)
    if self.config.text_config is None:
      return image_embeds, None, None
    return image_embeds, self.encode_text(input_ids, attention_mask), self.logit_scale

  def _check_pixels(self, pixel_values) -> None:
    cfg = self.config.vision_config
    s, c = cfg.image_size, cfg.num_channels
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s, s, c):
      raise ValueError(
          f"pixel_values must be [B, {s}, {s}, {c}] (NHWC, CLIP-normalised), got shape "
          f"{tuple(pixel_values.shape)}; resize to the model's image_size first.")

  def vision_hidden_states(self, pixel_values: jax.Array, *,
                           num_layers: int | None = None) -> tuple[jax.Array, ...]:
    """Hidden states of the vision tower, as HF ``output_hidden_states=True``.

    ``hidden_states[0]`` is the input of the first encoder layer, i.e. the embeddings
    ([CLS; patches] + positions) *after* ``pre_layrnorm``; ``hidden_states[i]`` is the
    output of layer ``i`` (1-based), before any ``post_layernorm`` (which HF applies to
    the pooled CLS token only). So ``hidden_states[-2]`` is LLaVA's penultimate layer.

    Args:
      pixel_values: ``[B, S, S, 3]`` CLIP-normalised images, ``S = image_size``.
      num_layers: run only the first ``num_layers`` encoder layers (the later ones are
        never computed); default all of them.

    Returns:
      A tuple of ``num_layers + 1`` arrays ``[B, 1 + num_patches, hidden_size]`` in the
      compute dtype.
    """
    self._check_pixels(pixel_values)
    n = self.config.vision_config.num_hidden_layers
    if num_layers is not None and not 0 <= num_layers <= n:
      raise ValueError(f"num_layers={num_layers} must be in [0, {n}].")
    hidden_states, _ = self.vision_model(pixel_values, num_layers=num_layers)
    return hidden_states

  def encode_image(self, pixel_values: jax.Array) -> jax.Array:
    """``[B, S, S, 3]`` -> ``[B, projection_dim]``: projection of the post-LN CLS token.

    Equals HF ``visual_projection(vision_model(pixel_values).pooler_output)`` (not
    normalised).
    """
    self._check_pixels(pixel_values)
    # Only the CLS token goes through the last layer: nothing else reaches the output.
    _, pooled = self.vision_model(pixel_values, pooled_only=True)
    return self.visual_projection(pooled.astype(self.dtype))

  def encode_text(self, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """``input_ids`` ``[B, T]`` int (and 0/1 mask) -> ``[B, projection_dim]``.

    Equals HF ``text_projection(text_model(input_ids, attention_mask).pooler_output)``:
    pooled at the first position whose id is ``eos_token_id`` (at the highest id when a
    legacy config has ``eos_token_id == 2``), not normalised.
    """
    if self.config.text_config is None:
      raise ValueError("This CLIP is vision-only (loaded from a vision checkpoint such as "
                       "CLIPVisionModelWithProjection): it has no text tower, so encode_text "
                       "is unavailable. Load a full CLIPModel checkpoint for text.")
    input_ids = jnp.asarray(input_ids)
    t_max = self.config.text_config.max_position_embeddings
    if input_ids.ndim != 2 or input_ids.shape[1] > t_max:
      raise ValueError(f"input_ids must be [B, T] with T <= {t_max}, got shape "
                       f"{tuple(input_ids.shape)}.")
    _, pooled = self.text_model(input_ids, attention_mask)
    return self.text_projection(pooled.astype(self.dtype))


def dummy_inputs(config: CLIPConfig) -> tuple[jax.Array, ...]:
  """Smallest inputs that touch every parameter (for ``init`` and ``eval_shape``)."""
  s = config.vision_config.image_size
  pixels = jnp.zeros((1, s, s, config.vision_config.num_channels), jnp.float32)
  if config.text_config is None:
    return (pixels,)
  return pixels, jnp.zeros((1, 1), jnp.int32)


def init(config: CLIPConfig, *, seed: int = 0,
         dtype: Dtype = jnp.float32) -> tuple[CLIP, dict]:
  """Random ``(model, params)`` for smoke runs and tests, drawn with numpy.

  :func:`fsjax.random_init.numpy_init`, with ``logit_scale`` at its init value.
  """
  model = CLIP(config, dtype=dtype)
  logit_scale = lambda rng, shape: np.full(shape, config.logit_scale_init_value)
  return model, random_init.numpy_init(param_shapes(model), seed=seed,
                                       special={"logit_scale": logit_scale})


def param_shapes(model: CLIP) -> dict:
  """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
  return jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))["params"]
