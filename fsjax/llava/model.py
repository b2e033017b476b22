"""LLaVA-1.5 in Flax: any encoder's tokens -> projector -> LLaMA -> greedy answers.

The model is split where the paper protects it. The *vision side* is any
:class:`fsjax.encoders.Encoder`: its token view ``[B, T, D]`` are the image features
(the checkpoint's CLIP tower at ``vision_feature_layer`` with or without CLS, a
FARE/TeCoA OpenCLIP tower, the GSB-boosted encoder, the smoothed encoder
:class:`fsjax.smoothing.SmoothedEncoder`, an EfficientNet tower...). The *language side*,
:class:`LlavaLanguageModel`, is the two-layer GELU projector, the LLaMA decoder and the
LM head; it takes features of any count ``T`` and width ``D`` (the projector's input
width fixes ``D``; ``T`` must equal the number of ``<image>`` tokens of the prompt).

:class:`Llava` ties both to a tokenizer: ``model.generate(params, images, prompt)`` ->
strings, with ``params = {"vision": encoder params, "language": language params}``. It is
an :class:`fsjax.mllm.MLLM` (``image_features``, ``prompt_ids``, ``generate_ids``,
``detokenize``), the surface ``certify.protection`` queries.

The language side's parameter tree (HF LLaVA names, kernels ``[in, out]``)::

  multi_modal_projector/{linear_1, linear_2}/{kernel, bias}
  language_model/...              (fsjax.llava.llama.LlamaModel)
  lm_head/kernel                  [hidden, vocab]   (absent when tie_word_embeddings)

Image features are merged into the token embeddings with static shapes: the k-th
``<image>`` token of a row takes the row's k-th projected feature (transformers'
``masked_scatter`` with one image per prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import cpu
from fsjax import decoding
from fsjax import encoders as encoders_lib
from fsjax import matmul
from fsjax.clip import encoder as clip_encoder
from fsjax.clip import model as clip_model
from fsjax.llava import llama
from fsjax.llava import prompt as prompt_lib

Dtype = Any
Params = Any
STRATEGIES = ("default", "full")

# transformers' LlavaConfig() default tower: CLIP ViT-L/14 at 336 px (used when a
# config.json has no vision_config at all, as transformers does).
_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, patch_size=14, image_size=336,
                       num_hidden_layers=24, num_attention_heads=16, projection_dim=768)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """A LLaVA architecture (the fields of HF ``LlavaConfig`` that matter here).

  Attributes:
    text_config: the LLaMA decoder.
    vision_config: the checkpoint's CLIP tower, or None when the vision side is an
      external encoder (a model trained in this project on another tower).
    image_token_id: id of the ``<image>`` placeholder token.
    projector_hidden_act: activation between the projector's two linears (LLaVA: "gelu",
      the exact erf form).
    multimodal_projector_bias: whether the projector's linears have biases.
    vision_feature_layer: hidden state of the CLIP tower fed to the projector (HF
      convention: -2 = penultimate layer).
    vision_feature_select_strategy: "default" drops CLS, "full" keeps it.
    vision_feature_size: width D of the features the projector takes (LLaVA's
      ``mm_hidden_size``); None means the tower's ``hidden_size``.
    tie_word_embeddings: LM head = the token embedding matrix.
  """

  text_config: llama.LlamaConfig
  vision_config: clip_model.CLIPVisionConfig | None = None
  image_token_id: int = 32000
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True
  vision_feature_layer: int = -2
  vision_feature_select_strategy: str = "default"
  vision_feature_size: int | None = None
  tie_word_embeddings: bool = False

  def __post_init__(self):
    if self.vision_feature_select_strategy not in STRATEGIES:
      raise ValueError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}"
                       f" must be one of {STRATEGIES}.")
    if not isinstance(self.vision_feature_layer, int):
      raise ValueError(f"vision_feature_layer={self.vision_feature_layer!r}: only one layer is "
                       "supported (LLaVA-1.5), not a list of layers.")
    if self.projector_hidden_act not in clip_model._ACTIVATIONS:  # pylint: disable=protected-access
      raise ValueError(f"projector_hidden_act={self.projector_hidden_act!r} must be one of "
                       f"{sorted(clip_model._ACTIVATIONS)}.")  # pylint: disable=protected-access
    if self.vision_feature_size is None and self.vision_config is not None:
      object.__setattr__(self, "vision_feature_size", self.vision_config.hidden_size)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], *, origin: str = "config.json") -> "LlavaConfig":
    """From a LLaVA ``config.json`` dict (transformers 4 or 5).

    Raises:
      ValueError: if the dict describes another architecture.
    """
    d = dict(d)
    if d.get("model_type") != "llava":
      archs = d.get("architectures")
      raise ValueError(f"{origin} has model_type={d.get('model_type')!r} (architectures "
                       f"{archs}); fsjax.llava loads LLaVA checkpoints (model_type 'llava', "
                       "LlavaForConditionalGeneration) only.")
    text = llama.LlamaConfig.from_hf_dict(d.get("text_config") or {})
    if "vision_config" not in d:
      vision = clip_model.CLIPVisionConfig(**_DEFAULT_VISION)
    elif d["vision_config"] is None:
      vision = None
    else:
      v = dict(d["vision_config"])
      if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"{origin}: vision_config.model_type={v['model_type']!r}; only CLIP "
                         "towers load from a checkpoint (pass encoder= for another tower).")
      vision = clip_model.CLIPVisionConfig(**{k: val for k, val in (_DEFAULT_VISION | v).items()
                                              if k in _vision_fields()})
    image_token = d.get("image_token_id", d.get("image_token_index", 32000))
    return cls(text_config=text, vision_config=vision, image_token_id=int(image_token),
               projector_hidden_act=d.get("projector_hidden_act", "gelu"),
               multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
               vision_feature_layer=d.get("vision_feature_layer", -2),
               vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
               vision_feature_size=d.get("mm_hidden_size"),
               tie_word_embeddings=bool(d.get("tie_word_embeddings",
                                              text.tie_word_embeddings)))

  def to_hf_dict(self) -> dict:
    """The transformers-5 ``config.json`` dict of ``LlavaForConditionalGeneration``."""
    d = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
         "text_config": self.text_config.to_hf_dict(),
         "image_token_id": self.image_token_id,
         "projector_hidden_act": self.projector_hidden_act,
         "multimodal_projector_bias": self.multimodal_projector_bias,
         "vision_feature_layer": self.vision_feature_layer,
         "vision_feature_select_strategy": self.vision_feature_select_strategy,
         "tie_word_embeddings": self.tie_word_embeddings,
         "mm_hidden_size": self.vision_feature_size}
    if self.vision_config is None:
      d["vision_config"] = None  # the vision side is an external encoder
    else:
      d["vision_config"] = dataclasses.asdict(self.vision_config) | {
          "model_type": "clip_vision_model"}
    return d


def _vision_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(clip_model.CLIPVisionConfig)}


class Projector(nn.Module):
  """``linear_2(act(linear_1(x)))``: encoder features -> LLM embeddings."""

  config: LlavaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(matmul.Dense, cfg.text_config.hidden_size, dtype=self.dtype,
                              use_bias=cfg.multimodal_projector_bias, param_dtype=jnp.float32)
    x = dense(name="linear_1", dot_general=matmul.dot_general_float32)(x.astype(self.dtype))
    activations = clip_model._ACTIVATIONS  # pylint: disable=protected-access
    x = activations[cfg.projector_hidden_act](x).astype(self.dtype)
    return dense(name="linear_2")(x)


class LMHead(nn.Module):
  """Untied LM head, float32 logits (bf16 matmul with float32 accumulation)."""

  vocab_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.vocab_size),
                        jnp.float32)
    return matmul.einsum("btd,dv->btv", x.astype(self.dtype), kernel.astype(self.dtype),
                         dtype=jnp.float32)


def merge_image_features(embeds: jax.Array, image: jax.Array, is_image: jax.Array) -> jax.Array:
  """Puts row b's k-th image feature at row b's k-th ``<image>`` token (static shapes).

  Args:
    embeds: ``[B, L, H]`` token embeddings.
    image: ``[B, T, H]`` projected image features.
    is_image: bool ``[B, L]``, True at the ``<image>`` tokens (T per row; checked by the
      caller before jit).

  Returns:
    ``[B, L, H]``.
  """
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image.shape[1] - 1)
  gathered = jnp.take_along_axis(image, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class LlavaLanguageModel(nn.Module):
  """The language side of LLaVA: projector, LLaMA decoder, LM head.

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); norms, softmax and logits are float32.
  """

  config: LlavaConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.multi_modal_projector = Projector(cfg, self.dtype)
    self.language_model = llama.LlamaModel(cfg.text_config, self.dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg.text_config.vocab_size, self.dtype)

  def _logits(self, hidden):
    if self.config.tie_word_embeddings:
      return self.language_model.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids: jax.Array, features: jax.Array, positions: jax.Array,
               valid: jax.Array, cache: decoding.KVCache | None = None, *,
               projected: bool = False, last_only: bool = False):
    """Prefill (or a plain forward): the prompt with its image, in one pass.

    Args:
      input_ids: int ``[B, L]`` with T ``<image>`` tokens per row.
      features: ``[B, T, D]`` encoder features, or ``[B, T, hidden]`` already projected
        when ``projected`` (transformers' ``mm_encoder_outputs``: feature injection).
      positions: int ``[B, L]`` rotary positions.
      valid: bool ``[B, L]``, False at left padding.
      cache: a KV cache to fill, or None.
      projected: skip the projector.
      last_only: return the logits of the last position only (``[B, 1, V]``).

    Returns:
      ``(logits float32 [B, L or 1, vocab], cache)``.
    """
    image = features if projected else self.multi_modal_projector(features)
    embeds = self.language_model.embed(input_ids)
    embeds = merge_image_features(embeds, image, input_ids == self.config.image_token_id)
    hidden, cache = self.language_model(embeds, positions, valid, cache, last_only=last_only)
    return self._logits(hidden), cache

  def step(self, tokens: jax.Array, positions: jax.Array, cache: decoding.KVCache):
    """One decoding step: ``tokens``, ``positions`` int ``[B, 1]`` -> ``(logits [B, 1, V], cache)``."""
    embeds = self.language_model.embed(tokens)
    hidden, cache = self.language_model(embeds, positions, jnp.ones(tokens.shape, bool), cache)
    return self._logits(hidden), cache


def language_param_shapes(config: LlavaConfig, *, feature_size: int | None = None) -> dict:
  """The language side's parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory)."""
  d = feature_size or config.vision_feature_size
  if d is None:
    raise ValueError("The projector's input width is unknown: give feature_size (the "
                     "encoder's token width D).")
  module = LlavaLanguageModel(config)
  ids = jnp.full((1, 1), config.image_token_id, jnp.int32)
  return jax.eval_shape(lambda: module.init(
      jax.random.key(0), ids, jnp.zeros((1, 1, d)), jnp.zeros((1, 1), jnp.int32),
      jnp.ones((1, 1), bool)))["params"]


def init_language(config: LlavaConfig, *, feature_size: int | None = None, seed: int = 0,
                  dtype: Dtype = jnp.float32, shardings: Any = None) -> dict:
  """Random language-side parameters (weights N(0, 0.02), biases 0, norm scales 1).

  Drawn by one jitted function, leaf by leaf, directly in ``dtype`` and, if given, with
  ``shardings`` (a tree like :func:`param_shardings`'), so a 7B tree never passes through
  the host. For smoke runs and benchmarks; tests load transformers' random models.
  """
  shapes = flax.traverse_util.flatten_dict(
      language_param_shapes(config, feature_size=feature_size), sep="/")

  def draw(key):
    out = {}
    for i, (path, leaf) in enumerate(sorted(shapes.items())):
      name = path.rsplit("/", 1)[-1]
      if name == "scale":
        out[path] = jnp.ones(leaf.shape, dtype)
      elif name == "bias":
        out[path] = jnp.zeros(leaf.shape, dtype)
      else:
        out[path] = (0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)).astype(dtype)
    return flax.traverse_util.unflatten_dict(out, sep="/")

  return jax.jit(draw, out_shardings=shardings)(jax.random.key(seed))


def clip_tower_encoder(config: LlavaConfig, *, dtype: Dtype = jnp.float32
                       ) -> clip_encoder.ClipEncoder:
  """The checkpoint's own tower as an Encoder: hidden state ``vision_feature_layer``,
  CLS dropped under strategy "default" (transformers' ``get_image_features``)."""
  if config.vision_config is None:
    raise ValueError("This LLaVA config has no vision_config: pass the encoder explicitly.")
  cfg = clip_model.CLIPConfig(config.vision_config, None,
                              projection_dim=config.vision_config.projection_dim)
  feature = "patch_tokens" if config.vision_feature_select_strategy == "default" else "tokens"
  return clip_encoder.ClipEncoder(resolution=config.vision_config.image_size,
                                  model=clip_model.CLIP(cfg, dtype=dtype), feature=feature,
                                  layer=config.vision_feature_layer)


def token_shape(encoder: encoders_lib.Encoder, params: Params) -> tuple[int, int]:
  """``(T, D)`` of the encoder's token view, by shape inference (nothing computed)."""
  s = encoder.resolution
  # sigma 0: base encoders ignore it, and a GSB-boosted encoder needs one (any value has
  # the same shapes).
  out = jax.eval_shape(lambda p, x: encoder.tokens(p, x, sigma=0.0), params,
                       jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  return out.shape[1], out.shape[2]


# ------------------------------------------------------------------------------------------
# Jitted pieces.
# ------------------------------------------------------------------------------------------


def _positions(valid):
  return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)


@cpu.jit(static_argnames=("module", "projected"))
def _forward(module, params, input_ids, valid, features, *, projected):
  logits, _ = module.apply({"params": params}, input_ids, features, _positions(valid), valid,
                           projected=projected)
  return logits


@functools.partial(jax.jit, static_argnames=("module", "capacity", "projected"))
def prefill(module, params, input_ids, valid, features, *, capacity, projected=False):
  """Jitted prefill into a fresh cache of ``capacity`` tokens per row.

  Returns:
    ``(logits [B, V] of the last position, cache, positions [B] of the last token)``.
  """
  cfg = module.config.text_config
  cache = decoding.KVCache.empty(num_layers=cfg.num_hidden_layers, batch=input_ids.shape[0],
                                 capacity=capacity, num_kv_heads=cfg.num_key_value_heads,
                                 head_dim=cfg.head_dim, dtype=module.dtype)
  positions = _positions(valid)
  logits, cache = module.apply({"params": params}, input_ids, features, positions, valid, cache,
                               projected=projected, last_only=True)
  return logits[:, 0], cache, positions[:, -1]


@cpu.jit(static_argnames=("module", "max_new_tokens", "projected"))
def _generate(module, params, input_ids, valid, features, eos_token_id, pad_token_id, *,
              max_new_tokens, projected):
  logits, cache, last = prefill(module, params, input_ids, valid, features,
                                capacity=input_ids.shape[1] + max_new_tokens - 1,
                                projected=projected)

  def step(tokens, state):  # the model's step for fsjax.decoding
    cache, position = state
    position = position + 1
    logits, cache = module.apply({"params": params}, tokens[:, None], position[:, None], cache,
                                 method="step")
    return logits[:, 0], (cache, position)

  return decoding.greedy_decode(step, logits, (cache, last), max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@cpu.jit(static_argnames=("module", "projected"))
def _score_options(module, params, input_ids, valid, features, options, option_valid, *,
                   projected):
  logits, cache, last = prefill(module, params, input_ids, valid, features,
                                capacity=input_ids.shape[1] + options.shape[1] - 1,
                                projected=projected)

  def extend(tokens, state):  # T option tokens after the prompt, for fsjax.decoding
    cache, position = state
    positions = position[:, None] + 1 + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return module.apply({"params": params}, tokens, positions, cache, method="step")[0]

  return decoding.option_log_likelihoods(extend, logits, (cache, last), options, option_valid)


# ------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Llava:
  """LLaVA = an encoder + the language side + a tokenizer; pure functions of ``params``.

  ``params = {"vision": encoder params, "language": language params}``. Hashed by
  identity, like encoders.

  Attributes:
    config: the architecture.
    encoder: the vision side; its token view gives the image features.
    tokenizer: a transformers tokenizer (None: only the id-level methods work).
    dtype: compute dtype of the language side.
    system_prompt: text put before "USER:" (None: none, as llava-hf's chat template).
    chat_template: the checkpoint's chat template (jinja), or None for LLaVA-1.5's format.
    eos_token_id, pad_token_id: generation ids (from generation_config.json).
  """

  config: LlavaConfig
  encoder: encoders_lib.Encoder
  tokenizer: Any = None
  dtype: Dtype = jnp.float32
  system_prompt: str | None = None
  chat_template: str | None = None
  eos_token_id: int | tuple[int, ...] = 2
  pad_token_id: int = 0

  @functools.cached_property
  def language(self) -> LlavaLanguageModel:
    return LlavaLanguageModel(self.config, self.dtype)

  def with_encoder(self, encoder: encoders_lib.Encoder) -> "Llava":
    """The same language side on another encoder (its token width must fit the projector)."""
    return dataclasses.replace(self, encoder=encoder)

  # -- vision side --------------------------------------------------------------------------

  def image_features(self, params: Params, images: Any, *, key: jax.Array | None = None
                     ) -> jax.Array:
    """``[B, H, W, 3]`` images in [0, 1] -> ``[B, T, D]`` features for the projector.

    ``key``: the noise key of this call for an encoder that draws noise (a
    :class:`fsjax.smoothing.SmoothedEncoder`: required, fresh per call); ignored by a
    deterministic encoder.
    """
    encoders_lib.check_images(images, name="images")
    vision = params["vision"] if key is None else self.encoder.with_key(params["vision"], key)
    return self.encoder.jitted_tokens(vision, images)

  # -- prompts ------------------------------------------------------------------------------

  def prompt_ids(self, prompt: str | Sequence[str], *, batch: int, num_image_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded ``(input_ids int32 [B, L], valid bool [B, L])``.

    The chat format of :func:`fsjax.llava.prompt.format_prompt` with this model's system
    prompt and template; each ``<image>`` expanded to ``num_image_tokens`` tokens, then
    tokenized, as ``LlavaProcessor`` does.
    """
    if self.tokenizer is None:
      raise ValueError("This model has no tokenizer (the checkpoint directory had no "
                       "tokenizer files): pass token ids to generate_ids instead.")
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
      raise ValueError(f"prompt: got {len(prompts)} prompts for {batch} images; pass one "
                       "string (used for every image) or one per image.")
    if self.chat_template is None:
      texts = [prompt_lib.format_prompt(p, system=self.system_prompt) for p in prompts]
    else:
      texts = [prompt_lib.apply_chat_template(self.tokenizer, self.chat_template, p,
                                              system=self.system_prompt) for p in prompts]
    return prompt_lib.tokenize(self.tokenizer, texts, num_image_tokens=num_image_tokens,
                               pad_token_id=self.pad_token_id)

  # -- language side ------------------------------------------------------------------------

  def _check_ids(self, input_ids, valid, features, projected):
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L] token ids, got shape {ids.shape}.")
    feats = np.shape(features)
    if len(feats) != 3 or feats[0] != ids.shape[0]:
      raise ValueError(f"features must be [B, T, D] with B = {ids.shape[0]} (one image per "
                       f"prompt), got shape {feats}.")
    width = self.config.text_config.hidden_size if projected else self.config.vision_feature_size
    if width is not None and feats[2] != width:
      what = "projected features" if projected else "encoder features"
      raise ValueError(f"{what} have width {feats[2]}, the projector expects {width}: use the "
                       "encoder this language side was trained with.")
    counts = np.sum(ids == self.config.image_token_id, axis=1)
    if np.any(counts != feats[1]):
      raise ValueError(
          f"input_ids hold {counts.tolist()} <image> tokens (id {self.config.image_token_id}) "
          f"per row but the encoder gives {feats[1]} features per image: each prompt needs "
          f"exactly one <image>, expanded to {feats[1]} tokens (prompt_ids does this).")
    valid = np.ones(ids.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != ids.shape:
      raise ValueError(f"valid must have the shape of input_ids {ids.shape}, got {valid.shape}.")
    # numpy, not jax: the jitted call transfers them itself (eager jnp conversions cost
    # ~0.1 ms each per call).
    return ids.astype(np.int32, copy=False), valid

  def logits(self, params: Params, input_ids: Any, features: Any, *, valid: Any = None,
             projected: bool = False) -> jax.Array:
    """Logits of every prompt position: ``float32 [B, L, vocab]`` (one jitted pass).

    ``features`` are encoder features ``[B, T, D]``, or projected ones ``[B, T, hidden]``
    when ``projected`` (transformers' ``mm_encoder_outputs``).
    """
    ids, valid = self._check_ids(input_ids, valid, features, projected)
    return _forward(self.language, params["language"], ids, valid,
                    jnp.asarray(features), projected=projected)

  def generate_ids(self, params: Params, input_ids: Any, features: Any, *, valid: Any = None,
                   max_new_tokens: int = 64, projected: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding from ids and features: ``(tokens int32 [B, max_new_tokens], num_steps)``.

    See :func:`fsjax.decoding.greedy_decode` for the padding of finished rows.
    """
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    ids, valid = self._check_ids(input_ids, valid, features, projected)
    eos = self.eos_token_id
    return _generate(self.language, params["language"], ids, valid, jnp.asarray(features),
                     np.atleast_1d(np.asarray(eos, np.int32)),
                     np.int32(self.pad_token_id), max_new_tokens=int(max_new_tokens),
                     projected=projected)

  def option_scores(self, params: Params, input_ids: Any, features: Any,
                    options: Sequence[Sequence[int]], *, valid: Any = None,
                    projected: bool = False) -> jax.Array:
    """Log-likelihood of each option's ids after each prompt: ``float32 [B, K]``.

    One prefill per prompt, then all K options in one batched pass over its cache
    (:func:`fsjax.decoding.option_log_likelihoods`); ``argmax`` over K is the answer.
    """
    ids, valid = self._check_ids(input_ids, valid, features, projected)
    opts, opts_valid = decoding.pad_options(options)
    return _score_options(self.language, params["language"], ids, valid, jnp.asarray(features),
                          opts, opts_valid, projected=projected)

  def generate(self, params: Params, images: Any, prompt: str | Sequence[str], *,
               max_new_tokens: int = 64, key: jax.Array | None = None) -> list[str]:
    """Answers: ``[B, H, W, 3]`` images in [0, 1] and a prompt (or B prompts) -> B strings.

    Args:
      params: ``{"vision": ..., "language": ...}``.
      images: images in [0, 1] pixel space; the encoder resizes them to its resolution.
      prompt: the user's text (one for all images, or one per image), without
        ``<image>``: the chat format adds it.
      max_new_tokens: the most tokens generated per answer.
      key: PRNG key of the encoder's noise (required by a smoothed encoder, see
        :meth:`image_features`).

    Returns:
      B decoded strings, special tokens and everything after EOS removed.
    """
    if self.tokenizer is None:
      raise ValueError("This model has no tokenizer: use generate_ids with token ids.")
    b = np.shape(images)[0] if np.ndim(images) == 4 else None
    features = self.image_features(params, images, key=key)
    ids, valid = self.prompt_ids(prompt, batch=b, num_image_tokens=features.shape[1])
    tokens, _ = self.generate_ids(params, ids, features, valid=valid,
                                  max_new_tokens=max_new_tokens)
    return self.detokenize(tokens)

  def detokenize(self, tokens: Any) -> list[str]:
    """Generated ids ``[B, N]`` -> B strings, cut at each row's first EOS, special tokens
    removed."""
    if self.tokenizer is None:
      raise ValueError("This model has no tokenizer: read the generated ids directly.")
    return prompt_lib.decode(self.tokenizer, np.asarray(tokens), eos_token_id=self.eos_token_id)


def param_shardings(params: Params, mesh: jax.sharding.Mesh, *, axis: str = "model") -> Any:
  """``NamedSharding`` tree for ``params`` (a Llava tree, or its "language" part).

  Megatron-style over ``axis``: q/k/v, gate/up, projector linear_1 and the LM head are
  split along their output dimension, o/down and linear_2 along their input dimension,
  the token embedding along its hidden dimension; everything else (norms, biases, the
  vision tower) is replicated, as is any matrix whose dimension is not divisible by the
  axis size. With one device every leaf is replicated.
  """
  size = mesh.shape[axis]
  column = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "linear_1", "lm_head")
  row = ("o_proj", "down_proj", "linear_2")

  def spec(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    shape = np.shape(leaf)
    if "vision" in names or len(shape) != 2:
      return jax.NamedSharding(mesh, jax.P())
    parent = names[-2] if len(names) > 1 else ""
    if parent in column:
      dim = 1
    elif parent in row:
      dim = 0
    elif parent == "embed_tokens":
      dim = 1
    else:
      return jax.NamedSharding(mesh, jax.P())
    if shape[dim] % size:
      return jax.NamedSharding(mesh, jax.P())
    return jax.NamedSharding(mesh, jax.P(*[axis if i == dim else None for i in range(2)]))

  return jax.tree_util.tree_map_with_path(spec, params)


def make_mesh(num_devices: int | None = None, *, axis: str = "model") -> jax.sharding.Mesh:
  """A 1-D mesh over ``num_devices`` local devices (default all) for :func:`param_shardings`."""
  devices = jax.local_devices()[:num_devices]
  return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)
