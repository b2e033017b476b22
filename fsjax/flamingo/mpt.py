"""MPT (MosaicML's decoder, OpenFlamingo-9B's language model) in Flax linen.

Pre-LN decoder blocks with ALiBi attention (no position embeddings), a fused ``Wqkv``
projection, bias-free LayerNorms and linears, an exact-GELU MLP, and an LM head tied to
the token embedding. Every size comes from the checkpoint's ``config.json``
(:meth:`MPTConfig.from_hf_dict`, both transformers' native ``MptConfig`` and MosaicML's
remote-code config of ``mosaicml/mpt-7b``).

The parameter tree mirrors the PyTorch state-dict names (dots -> slashes, Linear
``weight`` -> transposed ``kernel``, LayerNorm ``weight`` -> ``scale``, Embedding
``weight`` -> ``embedding``)::

  transformer/wte/embedding                              [vocab, d_model]
  transformer/blocks/{i}/norm_1/scale                    [d_model]
  transformer/blocks/{i}/attn/Wqkv/kernel                [d_model, 3 d_model]  (q | k | v)
  transformer/blocks/{i}/attn/out_proj/kernel            [d_model, d_model]
  transformer/blocks/{i}/norm_2/scale
  transformer/blocks/{i}/ffn/up_proj/kernel              [d_model, expansion_ratio d_model]
  transformer/blocks/{i}/ffn/down_proj/kernel
  transformer/norm_f/scale

Every forward pass goes through a :class:`fsjax.decoding.KVCache` (a full forward is a
prefill into a fresh cache), so the cached and uncached paths are one code path. ALiBi
adds ``slope_h * (key_position - query_position)`` to the attention logits, with the slot
index of the static cache as the position; transformers adds ``slope_h * (j - (K - 1))``,
which differs by a per-row constant and so gives the same softmax.

``dtype`` is the compute dtype; LayerNorm, attention logits and softmax, and the output
logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import checks
from fsjax import decoding
from fsjax import matmul

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MPTConfig:
  """The fields of an MPT config that define the network (MPT-7B's values by default).

  Attributes:
    vocab_size: rows of the token embedding (= columns of the tied LM head).
    d_model: width.
    n_heads: attention heads (head dim = d_model / n_heads).
    n_layers: decoder blocks.
    expansion_ratio: MLP width / d_model.
    max_seq_len: the longest sequence the model was trained for (ALiBi extrapolates, but
      generation beyond it is refused).
    layer_norm_epsilon: LayerNorm epsilon (torch's default 1e-5 in MosaicML's code).
    alibi_bias_max: ALiBi's maximum bias exponent; slopes are 2^(-i * max / n_heads').
    softmax_scale: attention logit scale; None means 1 / sqrt(head_dim).
    clip_qkv: clamp the fused q/k/v projection to [-clip_qkv, clip_qkv] (None: no clamp).
    logit_scale: multiply the output logits by this (None: 1).
  """

  vocab_size: int = 50432
  d_model: int = 4096
  n_heads: int = 32
  n_layers: int = 32
  expansion_ratio: int = 4
  max_seq_len: int = 2048
  layer_norm_epsilon: float = 1e-5
  alibi_bias_max: float = 8.0
  softmax_scale: float | None = None
  clip_qkv: float | None = None
  logit_scale: float | None = None

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"MPT d_model={self.d_model} is not a multiple of n_heads={self.n_heads}.")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], *, origin: str = "config.json") -> "MPTConfig":
    """Builds the config from an MPT ``config.json`` dict (native or remote-code).

    Raises:
      ValueError: for MPT variants this implementation does not cover (learned position
        embeddings instead of ALiBi, QK LayerNorm, biases, other attention types), naming
        the field.
    """
    d = dict(d)
    if d.get("model_type", "mpt") != "mpt":
      raise ValueError(f"{origin}: model_type={d.get('model_type')!r}; an MPT config has 'mpt'.")
    attn = dict(d.get("attn_config") or {})
    unsupported = []
    if not attn.get("alibi", True):
      unsupported.append("attn_config.alibi=False (learned position embeddings)")
    if attn.get("qk_ln", False):
      unsupported.append("attn_config.qk_ln=True")
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
      unsupported.append(f"attn_config.attn_type={attn['attn_type']!r}")
    if attn.get("prefix_lm", False):
      unsupported.append("attn_config.prefix_lm=True")
    if not d.get("no_bias", True):
      unsupported.append("no_bias=False (linears and LayerNorms with biases)")
    if unsupported:
      raise ValueError(f"{origin}: this MPT variant is not supported: {'; '.join(unsupported)}. "
                       "fsjax implements the MPT-7B architecture (ALiBi, bias-free).")
    logit_scale = d.get("logit_scale")
    if logit_scale == "inv_sqrt_d_model":
      logit_scale = 1.0 / math.sqrt(d["d_model"])
    return cls(vocab_size=int(d.get("vocab_size", 50432)), d_model=int(d.get("d_model", 4096)),
               n_heads=int(d.get("n_heads", 32)), n_layers=int(d.get("n_layers", 32)),
               expansion_ratio=int(d.get("expansion_ratio", 4)),
               max_seq_len=int(d.get("max_seq_len", 2048)),
               layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
               alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
               softmax_scale=attn.get("softmax_scale"), clip_qkv=attn.get("clip_qkv"),
               logit_scale=logit_scale)


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0) -> np.ndarray:
  """ALiBi slopes ``[n_heads]`` as MPT computes them.

  ``1 / 2^(i * max / n')`` for i = 1..n' with n' the next power of two; for other head
  counts the odd-indexed slopes come first, then the even ones, truncated to n_heads.
  """
  n = 2 ** math.ceil(math.log2(n_heads))
  slopes = 1.0 / np.power(2.0, np.arange(1, n + 1, dtype=np.float32) * (alibi_bias_max / n))
  if n != n_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
  return slopes.astype(np.float32)


def layer_norm(eps: float, name: str, *, use_bias: bool = False):
  """LayerNorm in float32 whatever the compute dtype; MPT's has no bias."""
  ln = nn.LayerNorm(epsilon=eps, use_bias=use_bias, dtype=jnp.float32, param_dtype=jnp.float32,
                    name=name)
  return lambda x: ln(x.astype(jnp.float32))


class MPTAttention(nn.Module):
  """Causal self-attention with ALiBi over a :class:`~fsjax.decoding.KVCache`."""

  config: MPTConfig
  layer: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: decoding.KVCache, mask: jax.Array
               ) -> tuple[jax.Array, decoding.KVCache]:
    """``x`` ``[B, T, D]``, ``mask`` bool ``[B, T, S]`` -> ``([B, T, D], cache)``."""
    cfg = self.config
    dense = functools.partial(matmul.Dense, use_bias=False, dtype=self.dtype,
                              param_dtype=jnp.float32)
    qkv = dense(3 * cfg.d_model, name="Wqkv")(x)
    if cfg.clip_qkv is not None:
      qkv = jnp.clip(qkv, -cfg.clip_qkv, cfg.clip_qkv)
    b, t = x.shape[:2]
    h, hd = cfg.n_heads, cfg.head_dim
    # [B, T, D] -> [B H, T, D_head]: the cache's layout (for T = 1 a reshape, no copy).
    q, k, v = (y.reshape(b, t, h, hd).transpose(0, 2, 1, 3).reshape(b * h, t, hd)
               for y in jnp.split(qkv, 3, axis=-1))
    # The prefill of a fresh cache sees only its own T keys (every other slot is empty),
    # causally: its query blocks skip the masked upper triangle and the empty slots.
    own = cache.fresh
    cache, k_all, v_all = cache.write(self.layer, k, v)  # [B H, S, D_head]
    if not own:
      k, v = k_all, v_all
    scale = cfg.softmax_scale if cfg.softmax_scale is not None else hd ** -0.5
    slopes = jnp.asarray(alibi_slopes(h, cfg.alibi_bias_max))
    v = v.astype(self.dtype)
    if own:  # [B H, 1, T, D]: one query head per key/value head
      out = decoding.causal_attention(q[:, None], k, v, mask[:, :, :t], scale=scale,
                                      alibi_slopes=jnp.tile(slopes, b))[:, 0]
    else:  # every slot of the cache
      logits = matmul.einsum("nqd,nkd->nqk", q, k, dtype=jnp.float32).reshape(b, h, t, -1)
      distance = jnp.arange(k.shape[1])[None, :] - (cache.index + jnp.arange(t))[:, None]  # [T, S]
      logits = logits * scale + slopes[:, None, None] * distance.astype(jnp.float32)[None]
      logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
      out = matmul.softmax_einsum("nqk,nkd->nqd", logits.reshape(b * h, t, -1), v)
    out = out.reshape(b, h, t, hd).transpose(0, 2, 1, 3).reshape(b, t, cfg.d_model)
    return dense(cfg.d_model, name="out_proj")(out), cache


class MPTMLP(nn.Module):
  config: MPTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(matmul.Dense, use_bias=False, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = dense(cfg.expansion_ratio * cfg.d_model, name="up_proj",
              dot_general=matmul.dot_general_float32)(x)  # GELU on the float32 result
    x = jax.nn.gelu(x, approximate=False).astype(self.dtype)  # torch nn.GELU(): exact erf
    return dense(cfg.d_model, name="down_proj")(x)


class MPTBlock(nn.Module):
  """``x + attn(norm_1(x))``, then ``x + ffn(norm_2(x))``."""

  config: MPTConfig
  layer: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache, mask):
    cfg = self.config
    y = layer_norm(cfg.layer_norm_epsilon, "norm_1")(x).astype(self.dtype)
    y, cache = MPTAttention(cfg, self.layer, self.dtype, name="attn")(y, cache, mask)
    x = x + y
    y = layer_norm(cfg.layer_norm_epsilon, "norm_2")(x).astype(self.dtype)
    return x + MPTMLP(cfg, self.dtype, name="ffn")(y), cache


class MPTBlocks(nn.Module):
  """The ``blocks`` scope; its children are named "0", "1", ... as in the state dict."""

  config: MPTConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.layers = [MPTBlock(self.config, i, self.dtype, name=str(i))
                   for i in range(self.config.n_layers)]


class MPTModel(nn.Module):
  """The ``transformer`` scope: ``wte``, ``blocks/{i}``, ``norm_f``.

  Its parts are called one by one by :func:`decode` (so that OpenFlamingo can insert its
  cross-attention between them), hence ``setup`` and no ``__call__`` of its own use.
  """

  config: MPTConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                        dtype=self.dtype, param_dtype=jnp.float32)
    self.blocks = MPTBlocks(cfg, self.dtype)
    self.norm_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, use_bias=False,
                               dtype=jnp.float32, param_dtype=jnp.float32)


def empty_cache(config: MPTConfig, *, batch: int, capacity: int,
                dtype: Dtype = jnp.float32) -> decoding.KVCache:
  """A :class:`~fsjax.decoding.KVCache` for ``batch`` rows of up to ``capacity`` tokens."""
  return decoding.KVCache.empty(num_layers=config.n_layers, batch=batch, capacity=capacity,
                                num_kv_heads=config.n_heads, head_dim=config.head_dim,
                                dtype=dtype)


def decode(transformer: MPTModel, input_ids: jax.Array, cache: decoding.KVCache,
           valid: jax.Array, before_block=None, *, last_only: bool = False
           ) -> tuple[jax.Array, decoding.KVCache]:
  """Runs the decoder on ``[B, T]`` new tokens after what ``cache`` holds.

  Args:
    transformer: the bound ``transformer`` scope.
    input_ids: int ``[B, T]``.
    cache: the cache; its ``index`` is where these tokens go.
    valid: bool ``[B, T]``, False for left padding.
    before_block: optional ``f(i, x) -> x`` run before block ``i`` (OpenFlamingo's gated
      cross-attention).
    last_only: the logits of the last position only (``[B, 1, vocab]``): a prefill needs
      no more, and the tied LM head over every prompt position can cost more than the
      decoder (50280 x 512 per position).

  Returns:
    ``(logits [B, T or 1, vocab] float32, cache advanced by T)``.
  """
  cfg = transformer.config
  x = matmul.take_rows(transformer.wte.embedding, input_ids, transformer.dtype)
  mask = cache.attention_mask(valid)
  for i, block in enumerate(transformer.blocks.layers):
    if before_block is not None:
      x = before_block(i, x)
    x, cache = block(x, cache, mask)
  if last_only:
    x = x[:, -1:]
  x = transformer.norm_f(x.astype(jnp.float32))
  # The tied head as an einsum with float32 logits: flax's ``wte.attend`` (``x @ table.T``)
  # became, at batch 1 on CPU, a loop fusion that transposed the whole table every step
  # (8.1 against 4.4 ms per step at [1, 512] x [512, 50280]).
  table = transformer.wte.embedding.astype(transformer.dtype)
  logits = matmul.einsum("btd,vd->btv", x.astype(transformer.dtype), table, dtype=jnp.float32)
  if cfg.logit_scale is not None:
    logits = logits * cfg.logit_scale
  return logits, cache.advance(valid)


class MPTForCausalLM(nn.Module):
  """MPT with its tied LM head: ``apply({"params": p}, ids, cache=..., valid=...)``.

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16).
  """

  config: MPTConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.transformer = MPTModel(self.config, self.dtype)

  def __call__(self, input_ids: jax.Array, *, cache: decoding.KVCache | None = None,
               valid: jax.Array | None = None, last_only: bool = False
               ) -> tuple[jax.Array, decoding.KVCache]:
    """Logits of ``input_ids`` ``[B, T]`` after the cached tokens.

    Args:
      input_ids: int ``[B, T]``.
      cache: None for a plain forward pass (a fresh cache of capacity T is used).
      valid: bool ``[B, T]`` (transformers' ``attention_mask``); default all True.
      last_only: the last position's logits only (``[B, 1, vocab]``, see :func:`decode`).

    Returns:
      ``(logits [B, T or 1, vocab] float32, cache)``.
    """
    input_ids = jnp.asarray(input_ids)
    if valid is None:
      valid = jnp.ones(input_ids.shape, bool)
    if cache is None:
      cache = empty_cache(self.config, batch=input_ids.shape[0], capacity=input_ids.shape[1],
                          dtype=self.dtype)
    return decode(self.transformer, input_ids, cache, jnp.asarray(valid, bool),
                  last_only=last_only)


def check_prompt(input_ids, attention_mask, *, max_new_tokens: int, max_seq_len: int):
  """Validates a left-padded prompt batch before jit; returns numpy ``(ids int32, valid
  bool)`` (a jitted call transfers them)."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be an int array [B, T], got shape {ids.shape} dtype "
                     f"{ids.dtype}.")
  valid = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) > 0
  if valid.shape != ids.shape:
    raise ValueError(f"attention_mask has shape {valid.shape}, input_ids {ids.shape}: they must "
                     "match.")
  if not valid[:, -1].all():
    raise ValueError("attention_mask: the last prompt position must be a real token in every "
                     "row; pad prompts on the left (tokenizer.padding_side = 'left').")
  max_new_tokens = checks.check_positive_int(max_new_tokens, name="max_new_tokens")
  if ids.shape[1] + max_new_tokens > max_seq_len:
    raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"the model's max_seq_len {max_seq_len}.")
  return ids.astype(np.int32, copy=False), valid


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id",
                                             "pad_token_id"))
def _generate(model, params, ids, valid, *, max_new_tokens, eos_token_id, pad_token_id):
  b, t = ids.shape
  cache = empty_cache(model.config, batch=b, capacity=t + max_new_tokens - 1, dtype=model.dtype)
  logits, cache = model.apply({"params": params}, ids, cache=cache, valid=valid, last_only=True)

  def step(tokens, cache):
    logits, cache = model.apply({"params": params}, tokens[:, None], cache=cache,
                                valid=jnp.ones((b, 1), bool))
    return logits[:, -1], cache

  return decoding.greedy_decode(step, logits[:, -1], cache, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def generate(model: MPTForCausalLM, params, input_ids, attention_mask=None, *,
             max_new_tokens: int, eos_token_id, pad_token_id: int):
  """Greedy generation with :func:`fsjax.decoding.greedy_decode` (jitted).

  Args:
    model, params: the language model.
    input_ids: int ``[B, T]``, left-padded.
    attention_mask: ``[B, T]`` 0/1, or None for no padding.
    max_new_tokens, eos_token_id, pad_token_id: as transformers' ``generate``.

  Returns:
    ``(tokens int32 [B, max_new_tokens], num_steps)`` (see ``greedy_decode``).
  """
  ids, valid = check_prompt(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                            max_seq_len=model.config.max_seq_len)
  eos = eos_token_id if isinstance(eos_token_id, int) else tuple(eos_token_id)
  return _generate(model, params, ids, valid, max_new_tokens=int(max_new_tokens),
                   eos_token_id=eos, pad_token_id=int(pad_token_id))
