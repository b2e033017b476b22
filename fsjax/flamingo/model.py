"""OpenFlamingo in Flax: vision tokens -> Perceiver resampler -> gated cross-attention into MPT.

As ``open_flamingo`` 2.0.1 (``Flamingo`` + ``FlamingoLMMixin``): the images of a row are
resampled to ``num_latents`` latents each; before every decoder layer ``i`` with
``(i + 1) % cross_attn_every_n_layers == 0`` a :class:`GatedCrossAttentionBlock` lets each
text token attend to the latents of its most recent ``<image>`` token (tokens before the
first image get nothing). Generation stops at ``<|endofchunk|>``.

The vision features are not part of this module: they come from an
:class:`fsjax.encoders.Encoder`'s token view (``encoder.tokens``), so a smoothed,
GSB-boosted, FARE or TeCoA encoder plugs in unchanged. For OpenFlamingo-9B that is
CLIP ViT-L/14 at 224 px, last-block patch tokens without the final LayerNorm
(``ClipEncoder(feature="patch_tokens", layer=-1)``: ``[B, 256, 1024]``).

Parameter tree (torch state-dict names, dots -> slashes)::

  perceiver/...                                   (fsjax.flamingo.resampler)
  lang_encoder/transformer/...                    (fsjax.flamingo.mpt)
  lang_encoder/gated_cross_attn_layers/{i}/...    (i: the layers with cross-attention)

Use: ``of = fsjax.flamingo.load(...)`` then ``of.caption(images)``; or, for any prompt,
``of.generate(input_ids, images, attention_mask=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import decoding
from fsjax import encoders
from fsjax import random_init
from fsjax.flamingo import mpt
from fsjax.flamingo import resampler

Dtype = Any
# OpenFlamingo's own captioning prompt (its COCO evaluation, zero-shot).
CAPTION_PROMPT = "<image>Output:"


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
  """An OpenFlamingo architecture (OpenFlamingo-9B's values except the language model).

  Attributes:
    lang: the MPT decoder.
    media_token_id: id of ``<image>``.
    eoc_token_id: id of ``<|endofchunk|>`` (the end of generation).
    vis_dim: width of the vision tokens (CLIP ViT-L/14: 1024).
    cross_attn_every_n_layers: a gated cross-attention block before each decoder layer i
      with (i + 1) % n == 0 (OpenFlamingo-9B: 4).
    perceiver_depth, num_latents: the resampler's layers and latents per image.
    dim_head, heads, ff_mult: of the resampler and the cross-attention blocks alike.
  """

  lang: mpt.MPTConfig
  media_token_id: int
  eoc_token_id: int
  vis_dim: int = 1024
  cross_attn_every_n_layers: int = 4
  perceiver_depth: int = 6
  num_latents: int = 64
  dim_head: int = 64
  heads: int = 8
  ff_mult: int = 4

  def __post_init__(self):
    for name in ("media_token_id", "eoc_token_id"):
      value = getattr(self, name)
      if not 0 <= value < self.lang.vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.lang.vocab_size}).")
    if not 1 <= self.cross_attn_every_n_layers <= self.lang.n_layers:
      raise ValueError(f"cross_attn_every_n_layers={self.cross_attn_every_n_layers} must be in "
                       f"[1, n_layers={self.lang.n_layers}].")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FlamingoConfig":
    """From a plain dict (e.g. a config file's ``architecture``); ``lang`` is a dict of
    :class:`~fsjax.flamingo.mpt.MPTConfig` fields."""
    d = dict(d)
    lang = d.pop("lang", None)
    if not isinstance(lang, Mapping):
      raise ValueError("architecture.lang must be a dict of MPT config fields (d_model, "
                       f"n_heads, n_layers, vocab_size, ...), got {lang!r}.")
    fields = {f.name for f in dataclasses.fields(cls)} - {"lang"}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"architecture: unknown fields {unknown}; known: {sorted(fields)}.")
    lang_fields = {f.name for f in dataclasses.fields(mpt.MPTConfig)}
    unknown = sorted(set(lang) - lang_fields)
    if unknown:
      raise ValueError(f"architecture.lang: unknown fields {unknown}; known: "
                       f"{sorted(lang_fields)}.")
    return cls(lang=mpt.MPTConfig(**lang), **d)

  @property
  def cross_attn_layers(self) -> tuple[int, ...]:
    """Indices of the decoder layers preceded by gated cross-attention."""
    n = self.cross_attn_every_n_layers
    return tuple(i for i in range(self.lang.n_layers) if (i + 1) % n == 0)


@flax.struct.dataclass
class FlamingoCache:
  """What generation carries between steps.

  Attributes:
    kv: the decoder's keys and values.
    media_keys, media_values: per gated cross-attention layer (in the order of
      :attr:`FlamingoConfig.cross_attn_layers`), ``[B, heads, M num_latents, dim_head]``:
      the keys and values of each row's resampled images, computed once per prompt.
    media_count: int32 ``[B]``, the ``<image>`` tokens seen so far: the 1-based index of
      the image that the next tokens attend to (0: none yet).
  """

  kv: decoding.KVCache
  media_keys: tuple[jax.Array, ...]
  media_values: tuple[jax.Array, ...]
  media_count: jax.Array


class _GatedLayers(nn.Module):
  """The ``gated_cross_attn_layers`` scope, children named by their decoder layer index."""

  config: FlamingoConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.layers = [
        resampler.GatedCrossAttentionBlock(cfg.lang.d_model, cfg.vis_dim, cfg.dim_head, cfg.heads,
                                           cfg.ff_mult, self.dtype, name=str(i))
        for i in cfg.cross_attn_layers]


class FlamingoLM(nn.Module):
  """``lang_encoder``: MPT's ``transformer`` plus ``gated_cross_attn_layers``."""

  config: FlamingoConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.transformer = mpt.MPTModel(cfg.lang, self.dtype)
    self.gated_cross_attn_layers = _GatedLayers(cfg, self.dtype)

  def media_keys_values(self, media: jax.Array) -> tuple[tuple[jax.Array, ...], ...]:
    """``[B, M, n, vis_dim]`` latents -> ``(keys, values)``, one ``[B, heads, M n, dim_head]``
    each per gated cross-attention layer."""
    pairs = [layer.keys_values(media) for layer in self.gated_cross_attn_layers.layers]
    return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)

  def __call__(self, input_ids, media_keys, media_values, text_time, cache, valid,
               last_only=False):
    cfg = self.config
    blocks = {i: (layer, k, v) for i, layer, k, v in zip(
        cfg.cross_attn_layers, self.gated_cross_attn_layers.layers, media_keys, media_values)}

    def before_block(i, x):
      if i not in blocks:
        return x
      layer, k, v = blocks[i]
      return layer(x, k, v, text_time, cfg.num_latents)

    return mpt.decode(self.transformer, input_ids, cache, valid, before_block,
                      last_only=last_only)


class Flamingo(nn.Module):
  """OpenFlamingo without its vision tower (see the module docstring).

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); LayerNorms, softmaxes and logits float32.
  """

  config: FlamingoConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.perceiver = resampler.PerceiverResampler(
        cfg.vis_dim, cfg.perceiver_depth, cfg.dim_head, cfg.heads, cfg.num_latents, cfg.ff_mult,
        self.dtype)
    self.lang_encoder = FlamingoLM(cfg, self.dtype)

  def __call__(self, input_ids: jax.Array, vision_tokens: jax.Array,
               valid: jax.Array | None = None) -> jax.Array:
    """Full forward pass: ``[B, T]`` ids and ``[B, M, v, vis_dim]`` tokens -> ``[B, T, V]`` logits.

    ``valid`` (bool ``[B, T]``, transformers' ``attention_mask``) marks left padding.
    """
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    cache = self.start(vision_tokens, capacity=t)
    if valid is None:
      valid = jnp.ones((b, t), bool)
    return self.decode(input_ids, cache, valid)[0]

  def encode_media(self, vision_tokens: jax.Array) -> jax.Array:
    """``[B, M, v, vis_dim]`` vision tokens -> ``[B, M, num_latents, vis_dim]`` latents."""
    if vision_tokens.ndim != 4 or vision_tokens.shape[-1] != self.config.vis_dim:
      raise ValueError(f"vision_tokens must be [B, M, v, {self.config.vis_dim}] (M images per "
                       f"row), got shape {tuple(vision_tokens.shape)}.")
    return self.perceiver(vision_tokens)

  def start(self, vision_tokens: jax.Array, *, capacity: int) -> FlamingoCache:
    """A fresh :class:`FlamingoCache` with room for ``capacity`` tokens per row."""
    b = vision_tokens.shape[0]
    kv = mpt.empty_cache(self.config.lang, batch=b, capacity=capacity, dtype=self.dtype)
    keys, values = self.lang_encoder.media_keys_values(self.encode_media(vision_tokens))
    return FlamingoCache(kv=kv, media_keys=keys, media_values=values,
                         media_count=jnp.zeros((b,), jnp.int32))

  def decode(self, input_ids: jax.Array, cache: FlamingoCache, valid: jax.Array, *,
             last_only: bool = False) -> tuple[jax.Array, FlamingoCache]:
    """``[B, T]`` new tokens after the cached ones -> ``([B, T, V] logits, cache)``.

    ``last_only``: the last position's logits only (``[B, 1, V]``: what a prefill needs).
    """
    is_media = input_ids == self.config.media_token_id
    # Each token attends to its most recent image (open_flamingo: media_locations.cumsum).
    text_time = cache.media_count[:, None] + jnp.cumsum(is_media, axis=1, dtype=jnp.int32)
    logits, kv = self.lang_encoder(input_ids, cache.media_keys, cache.media_values, text_time,
                                   cache.kv, valid, last_only)
    return logits, cache.replace(kv=kv, media_count=text_time[:, -1])


def param_shapes(model: Flamingo) -> dict:
  """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
  ids = jnp.zeros((1, 1), jnp.int32)
  tokens = jnp.zeros((1, 1, 1, model.config.vis_dim), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), ids, tokens)["params"]


def init(config: FlamingoConfig, *, seed: int = 0, gate: float = 0.5,
         dtype: Dtype = jnp.float32) -> tuple[Flamingo, dict]:
  """Random ``(model, params)`` for smoke runs and tests, drawn with numpy.

  Weights N(0, 0.02), LayerNorm scales 1 and biases 0, latents N(0, 1) (as
  OpenFlamingo's ``torch.randn``); the cross-attention gates are ``gate`` rather than
  OpenFlamingo's initial 0, so that the images matter in a random model.
  """
  model = Flamingo(config, dtype=dtype)
  return model, random_init.numpy_init(param_shapes(model), seed=seed, special={
      "_gate": lambda rng, shape: np.full(shape, gate),
      "latents": lambda rng, shape: rng.normal(0.0, 1.0, shape)})


# A plain jax.jit, not fsjax.cpu.jit: on CPU the tied LM head ([B, 512] x [512, 50280],
# fsjax.flamingo.mpt.decode) dominates a decode step, and XLA's own float32 dot runs it 3x
# slower than YNNPACK (jax's default); FLOAT32_OPTIONS halved decode tokens/s (measured,
# batch 8).
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id",
                                             "pad_token_id"))
def _generate(model, params, ids, valid, vision_tokens, *, max_new_tokens, eos_token_id,
              pad_token_id):
  variables = {"params": params}
  b, t = ids.shape
  cache = model.apply(variables, vision_tokens, capacity=t + max_new_tokens - 1, method="start")
  logits, cache = model.apply(variables, ids, cache, valid, method="decode", last_only=True)

  def step(tokens, cache):
    logits, cache = model.apply(variables, tokens[:, None], cache, jnp.ones((b, 1), bool),
                                method="decode")
    return logits[:, -1], cache

  return decoding.greedy_decode(step, logits[:, -1], cache, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@functools.partial(jax.jit, static_argnames="model")
def _score_options(model, params, ids, valid, vision_tokens, options, option_valid):
  variables = {"params": params}
  cache = model.apply(variables, vision_tokens, capacity=ids.shape[1] + options.shape[1] - 1,
                      method="start")
  logits, cache = model.apply(variables, ids, cache, valid, method="decode", last_only=True)

  def extend(tokens, cache):  # T option tokens after the prompt, for fsjax.decoding
    return model.apply(variables, tokens, cache, jnp.ones(tokens.shape, bool), method="decode")[0]

  return decoding.option_log_likelihoods(extend, logits[:, -1], cache, options, option_valid)


def generate(model: Flamingo, params, input_ids, vision_tokens, attention_mask=None, *,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy generation (one jitted prefill + :func:`fsjax.decoding.greedy_decode`).

  New tokens attend to the last image of their row, as in OpenFlamingo's ``generate``.

  Args:
    model, params: the Flamingo model.
    input_ids: int ``[B, T]``, left-padded; row b holds M ``<image>`` tokens (fewer is
      allowed: those images are then never attended to).
    vision_tokens: ``[B, M, v, vis_dim]``, the encoder tokens of each row's images in
      order (``OpenFlamingo.vision_tokens``).
    attention_mask: ``[B, T]`` 0/1, or None without padding.
    max_new_tokens: tokens to generate.
    eos_token_id: default ``<|endofchunk|>``.
    pad_token_id: what finished rows emit; default ``eos_token_id``'s first id.

  Returns:
    ``(tokens int32 [B, max_new_tokens], num_steps)`` as ``fsjax.decoding.greedy_decode``.
  """
  cfg = model.config
  ids, valid = mpt.check_prompt(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                max_seq_len=cfg.lang.max_seq_len)
  vision_tokens = jnp.asarray(vision_tokens)
  if vision_tokens.ndim != 4 or vision_tokens.shape[0] != ids.shape[0]:
    raise ValueError(f"vision_tokens must be [B={ids.shape[0]}, M, v, {cfg.vis_dim}], got shape "
                     f"{tuple(vision_tokens.shape)}.")
  counts = np.sum(ids == cfg.media_token_id, axis=1)
  if np.any(counts > vision_tokens.shape[1]):
    raise ValueError(f"input_ids hold up to {counts.max()} <image> tokens (id "
                     f"{cfg.media_token_id}) per row but vision_tokens has only "
                     f"{vision_tokens.shape[1]} images per row.")
  eos = cfg.eoc_token_id if eos_token_id is None else eos_token_id
  eos = eos if isinstance(eos, int) else tuple(int(e) for e in eos)
  pad = (eos if isinstance(eos, int) else eos[0]) if pad_token_id is None else int(pad_token_id)
  return _generate(model, params, ids, valid, vision_tokens, max_new_tokens=int(max_new_tokens),
                   eos_token_id=eos, pad_token_id=pad)


@dataclasses.dataclass(frozen=True, eq=False)
class OpenFlamingo:
  """A loaded OpenFlamingo: the model, its vision encoder and tokenizer, ready to caption.

  It is also an :class:`fsjax.mllm.MLLM` (``image_features``, ``prompt_ids``,
  ``generate_ids``, ``detokenize``: pure functions of :attr:`mllm_params`), the surface
  ``certify.protection`` queries. Its ``image_features`` are the vision encoder's tokens
  *before* the Perceiver resampler: smoothing smooths the vision tower, and the resampler,
  the gated cross-attention and MPT run once, on the smoothed tokens.

  Attributes:
    model: the :class:`Flamingo` module.
    params: its parameters.
    encoder: any :class:`fsjax.encoders.Encoder` whose ``tokens`` are ``[B, v, vis_dim]``
      (swap in a smoothed / GSB / FARE / TeCoA encoder with ``of.replace(encoder=...,
      encoder_params=...)``; a :class:`fsjax.smoothing.SmoothedEncoder` draws its noise
      from the ``key`` of each call).
    encoder_params: the encoder's parameters.
    tokenizer: a transformers tokenizer with ``<image>`` and ``<|endofchunk|>`` (for
      :meth:`caption`), or None.
    prompt_format: how :meth:`prompt_ids` formats a task's prompt (the user's text):
      ``"<image>{prompt}"``, zero-shot (no in-context examples), as OpenFlamingo's own
      evaluation formats its queries ("<image>Output:" for captions, "<image>Question:
      ... Short answer:" for VQA, with the prompt text "Question: ... Short answer:").
  """

  model: Flamingo
  params: Any
  encoder: encoders.Encoder
  encoder_params: Any
  tokenizer: Any = None
  prompt_format: str = "<image>{prompt}"

  def replace(self, **changes) -> "OpenFlamingo":
    return dataclasses.replace(self, **changes)

  @property
  def mllm_params(self) -> dict:
    """``{"vision": encoder_params, "language": params}``: the parameters of the pure
    :class:`fsjax.mllm.MLLM` methods, as a LLaVA's."""
    return {"vision": self.encoder_params, "language": self.params}

  def with_encoder(self, encoder: encoders.Encoder) -> "OpenFlamingo":
    """The same language side on another encoder, for the pure methods (its parameters go
    in ``params["vision"]``); :meth:`replace` with ``encoder_params`` for :meth:`caption`."""
    return self.replace(encoder=encoder, encoder_params=None)

  # -- vision side ------------------------------------------------------------------------

  def _encode(self, encoder_params, flat, *, sigma, key) -> jax.Array:
    """``[N, H, W, 3]`` -> ``[N, v, vis_dim]`` encoder tokens (``key``: the encoder's noise)."""
    if encoder_params is None:
      raise ValueError("this OpenFlamingo's encoder came from with_encoder(): pass its "
                       "parameters as params['vision'] to image_features, or use "
                       "replace(encoder=..., encoder_params=...).")
    encoders.check_images(flat, name="images")
    if key is not None:
      encoder_params = self.encoder.with_key(encoder_params, key)
    tokens = self.encoder.jitted_tokens(encoder_params, flat, sigma=sigma)
    if tokens.shape[-1] != self.model.config.vis_dim:
      raise ValueError(f"the encoder gives tokens of width {tokens.shape[-1]}, the model expects "
                       f"{self.model.config.vis_dim}: use the CLIP tower it was trained with.")
    return tokens

  def image_features(self, params, images, *, key: jax.Array | None = None) -> jax.Array:
    """``[B, H, W, 3]`` images in [0, 1] -> ``[B, v, vis_dim]`` vision tokens, the input of
    the Perceiver resampler (one image per prompt; ``params["vision"]`` the encoder's)."""
    if np.ndim(images) != 4:
      raise ValueError(f"images must be [B, H, W, 3] (one image per prompt), got shape "
                       f"{np.shape(images)}.")
    return self._encode(params["vision"], images, sigma=None, key=key)

  def vision_tokens(self, images, *, sigma: Any = None, key: jax.Array | None = None
                    ) -> jax.Array:
    """Images ``[B, H, W, 3]`` or ``[B, M, H, W, 3]`` in [0, 1] -> ``[B, M, v, vis_dim]``.

    ``sigma`` is passed to a plain encoder (a GSB-boosted one conditions on it); a
    smoothed encoder uses its own sigma and draws its noise from ``key`` (required: no
    default key).
    """
    # Kept as given (numpy or jax) up to the jitted call: checking a numpy batch reads it in
    # place, a jax array made here would be copied back for the check (a batch of 8
    # images of 224 px: 5.2 -> 0.9 ms before the tower).
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    if images.ndim == 4:
      images = images[:, None]
    if images.ndim != 5:
      raise ValueError(f"images must be [B, H, W, 3] or [B, M, H, W, 3] (M images per prompt), "
                       f"got shape {images.shape}.")
    b, m = images.shape[:2]
    flat = images.reshape(b * m, *images.shape[2:])
    tokens = self._encode(self.encoder_params, flat, sigma=sigma, key=key)
    return tokens.reshape(b, m, *tokens.shape[1:])

  # -- prompts ----------------------------------------------------------------------------

  def _tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("this OpenFlamingo has no tokenizer: load it with tokenizer=<path of the "
                       "gpt-neox-20b tokenizer folder>, or use generate() with token ids.")
    tok = self.tokenizer
    tok.padding_side = "left"  # generation continues from the last position of every row
    return tok

  def prompt_ids(self, prompt: str | Sequence[str], *, batch: int,
                 num_image_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A task's prompts in :attr:`prompt_format` -> left-padded ``(input_ids int32 [B, L],
    valid bool [B, L])``.

    Args:
      prompt: the user's text (one for all rows or one per row), without ``<image>``.
      batch: the number of rows B.
      num_image_tokens: unused (one ``<image>`` token per image, whatever the number of
        vision tokens: the resampler makes the latents); accepted as every MLLM's.
    """
    del num_image_tokens
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
      raise ValueError(f"prompt: got {len(prompts)} prompts for {batch} images; pass one "
                       "string (used for every image) or one per image.")
    for p in prompts:
      if not isinstance(p, str) or "<image>" in p:
        raise ValueError(f"prompt {p!r} must be the user's text without <image>: "
                         f"prompt_format {self.prompt_format!r} places the image.")
    if self.prompt_format.count("<image>") != 1 or "{prompt}" not in self.prompt_format:
      raise ValueError(f"prompt_format={self.prompt_format!r} must hold one <image> and "
                       "'{prompt}', e.g. '<image>{prompt}'.")
    texts = [self.prompt_format.replace("{prompt}", p) for p in prompts]
    out = self._tokenizer()(texts, return_tensors="np", padding=True)
    return (np.asarray(out["input_ids"], np.int32),
            np.asarray(out["attention_mask"]).astype(bool))

  # -- language side ----------------------------------------------------------------------

  def generate_ids(self, params, input_ids, features, *, valid=None, max_new_tokens: int = 20
                   ) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding from ids and injected vision tokens ``[B, v, vis_dim]`` (one image per
    row, the resampler's input): ``(tokens int32 [B, max_new_tokens], num_steps)``."""
    features = jnp.asarray(features)
    if features.ndim != 3:
      raise ValueError(f"features must be [B, v, {self.model.config.vis_dim}] (one image per "
                       f"prompt), got shape {tuple(features.shape)}.")
    pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
    return generate(self.model, params["language"], input_ids, features[:, None], valid,
                    max_new_tokens=max_new_tokens, pad_token_id=pad)

  def option_scores(self, params, input_ids, features, options: Sequence[Sequence[int]], *,
                    valid=None) -> jax.Array:
    """Log-likelihood of each option's ids after each prompt: ``float32 [B, K]``.

    ``features`` as :meth:`generate_ids`. One prefill per prompt, then all K options in
    one batched pass over its cache (:func:`fsjax.decoding.option_log_likelihoods`).
    """
    features = jnp.asarray(features)
    if features.ndim != 3:
      raise ValueError(f"features must be [B, v, {self.model.config.vis_dim}] (one image per "
                       f"prompt), got shape {tuple(features.shape)}.")
    opts, opts_valid = decoding.pad_options(options)
    ids, valid = mpt.check_prompt(input_ids, valid, max_new_tokens=opts.shape[1],
                                  max_seq_len=self.model.config.lang.max_seq_len)
    return _score_options(self.model, params["language"], ids, valid, features[:, None], opts,
                          opts_valid)

  def detokenize(self, tokens) -> list[str]:
    """Generated ids ``[B, N]`` -> B strings up to ``<|endofchunk|>``, special tokens removed."""
    tok = self._tokenizer()
    eoc = self.model.config.eoc_token_id
    rows = [row[:row.index(eoc)] if eoc in row else row for row in np.asarray(tokens).tolist()]
    return [tok.decode(row, skip_special_tokens=True).strip() for row in rows]

  def generate(self, input_ids, images=None, *, attention_mask=None, vision_tokens=None,
               max_new_tokens: int = 20, sigma: Any = None, key: jax.Array | None = None,
               eos_token_id=None, pad_token_id=None) -> tuple[jax.Array, jax.Array]:
    """Greedy generation from token ids and images (or precomputed ``vision_tokens``).

    See :func:`generate`; ``images`` go through :meth:`vision_tokens` with ``sigma`` and
    ``key``.
    """
    if (images is None) == (vision_tokens is None):
      raise ValueError("pass exactly one of images and vision_tokens.")
    if vision_tokens is None:
      vision_tokens = self.vision_tokens(images, sigma=sigma, key=key)
    if pad_token_id is None and self.tokenizer is not None:
      pad_token_id = self.tokenizer.pad_token_id
    return generate(self.model, self.params, input_ids, vision_tokens, attention_mask,
                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id)

  def caption(self, images, prompt: str | Sequence[str] = CAPTION_PROMPT, *,
              max_new_tokens: int = 20, sigma: Any = None, key: jax.Array | None = None,
              vision_tokens=None) -> list[str]:
    """Greedy captions, one per image: ``of.caption(images)``.

    Args:
      images: ``[B, H, W, 3]`` in [0, 1] (or ``[B, M, H, W, 3]`` with M ``<image>``
        tokens in each prompt).
      prompt: one prompt for all rows or one per row, with ``<image>`` where each image
        goes (default OpenFlamingo's ``"<image>Output:"``).
      max_new_tokens: caption length limit in tokens.
      sigma, key: as :meth:`vision_tokens`.
      vision_tokens: precomputed ``[B, M, v, vis_dim]`` instead of ``images`` (e.g. the
        Monte Carlo mean of a smoothed encoder's tokens); then ``images`` may be None.

    Returns:
      B strings: the generated text up to ``<|endofchunk|>``, special tokens removed.
    """
    tok = self._tokenizer()
    if vision_tokens is None:
      vision_tokens = self.vision_tokens(images, sigma=sigma, key=key)
    b = vision_tokens.shape[0]
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    if len(prompts) != b:
      raise ValueError(f"got {len(prompts)} prompts for {b} images.")
    batch = tok(prompts, return_tensors="np", padding=True)
    tokens, num_steps = self.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                      vision_tokens=vision_tokens, max_new_tokens=max_new_tokens)
    return self.detokenize(np.asarray(tokens)[:, :int(num_steps)])
