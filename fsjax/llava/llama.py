"""A LLaMA decoder in Flax linen, with a static KV cache.

Parameter tree (names follow the Hugging Face LLaMA; dense kernels ``[in, out]``)::

  embed_tokens/embedding                                 [vocab, hidden]
  layers/{i}/input_layernorm/scale                       [hidden]
  layers/{i}/self_attn/{q,k,v,o}_proj/kernel (+ bias if attention_bias)
  layers/{i}/post_attention_layernorm/scale
  layers/{i}/mlp/{gate,up,down}_proj/kernel  (+ bias if mlp_bias)
  norm/scale

Everything that shapes the network (eps, rope theta, heads, KV heads, head_dim, biases)
comes from the checkpoint's config (:meth:`LlamaConfig.from_hf_dict`), never from
constants: ``LlamaConfig()`` of transformers defaults ``rms_norm_eps`` to 1e-6 while
LLaVA-1.5 uses 1e-5, and a wrong eps changes greedy tokens (mllm-facts.md).

Precision: matmuls in ``dtype`` (float32 or bfloat16); RMSNorm statistics, rotary
angles, attention logits and softmax in float32 (as transformers). The LM head (in
:mod:`fsjax.llava.model`) returns float32 logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import decoding
from fsjax import matmul

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The fields of HF ``LlamaConfig`` that define the network (same defaults).

  ``num_key_value_heads`` and ``head_dim`` default (None) to ``num_attention_heads`` and
  ``hidden_size // num_attention_heads``, as in transformers.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | Sequence[int] | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.hidden_act != "silu":
      raise ValueError(f"text_config.hidden_act={self.hidden_act!r}: only LLaMA's 'silu' "
                       "(SwiGLU) MLP is implemented.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"text_config.num_attention_heads={self.num_attention_heads} is not a "
                       f"multiple of num_key_value_heads={self.num_key_value_heads}.")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    """From a ``text_config`` dict of transformers 4 (``rope_theta``) or 5 (``rope_parameters``)."""
    d = dict(d)
    if d.get("model_type", "llama") != "llama":
      raise ValueError(f"text_config.model_type={d['model_type']!r}: only 'llama' language "
                       "models are implemented.")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"text_config rope_type={rope_type!r}: only the default rotary embedding "
                       "(no scaling) is implemented.")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and k != "rope_theta"},
               rope_theta=float(theta))

  def to_hf_dict(self) -> dict:
    """The transformers-5 ``text_config`` dict (what ``save_pretrained`` writes)."""
    d = dataclasses.asdict(self)
    d.pop("rope_theta")
    if isinstance(d["eos_token_id"], tuple):
      d["eos_token_id"] = list(d["eos_token_id"])
    return d | {"model_type": "llama",
                "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"}}


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: statistics in float32, the weight applied after casting back."""

  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float, size: int
                  ) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` float32 ``[B, T, 1, D/2]`` of the rotary angles at ``positions`` ``[B, T]``.

  transformers' LlamaRotaryEmbedding ("default" type), whose ``[.., D]`` tables repeat
  these ``D/2`` angles twice; shared by every layer's queries and keys. ``size``: a static
  bound on the positions (the cache's capacity, or T without a cache); positions outside
  ``[0, size)`` are a caller's error.

  The angles are float32 as in transformers (``inv_freq`` and ``position * inv_freq``
  rounded to float32); their cosines and sines are a ``[size, D/2]`` table computed in
  numpy (float64, rounded once) and gathered at ``positions``. Computed in the graph,
  XLA:CPU fused ``cos`` and ``sin`` into every consumer and recomputed them per head of
  every query and key, and once more in each causal block's key slice: 40 of each in the
  small LLaVA's prefill (an optimization barrier does not survive XLA:CPU's pipeline). A
  gather fused into a consumer costs a load.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1) / (np.float64(theta) ** exponents).astype(np.float32)  # torch's bits
  angles = np.arange(size, dtype=np.float32)[:, None] * inv_freq  # float32, as transformers
  tables = (jnp.asarray(f(angles.astype(np.float64)).astype(np.float32)) for f in (np.cos, np.sin))
  return tuple(jnp.take(table, positions, axis=0, mode="clip")[:, :, None] for table in tables)


def rotary(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding, rotate-half convention, of ``x`` ``[B, T, H, D]`` (the projection's
  own layout), in float32.

  ``tables``: :func:`rotary_tables` at the positions of ``x``'s T tokens. With halves
  ``x = [x1, x2]`` the result is ``[x1 cos - x2 sin, x2 cos + x1 sin]`` (transformers'
  ``x cos + rotate_half(x) sin``, term for term). Applied before the heads-first transpose,
  which XLA then fuses with it (LLaVA's batch-8 prefill: 3% faster than rotating the
  transposed ``[B, H, T, D]`` heads).
  """
  cos, sin = tables
  d = x.shape[-1]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :d // 2], x32[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class LlamaAttention(nn.Module):
  """Grouped-query attention with rotary embeddings; logits and softmax in float32."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, cache: decoding.KVCache | None, layer: int,
               last_only: bool = False):
    """``last_only``: the output of the last position only (``[B, 1, hidden]``); the keys
    and values of every position are still computed (and cached)."""
    cfg = self.config
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dense = functools.partial(matmul.Dense, use_bias=cfg.attention_bias, dtype=self.dtype,
                              param_dtype=jnp.float32)
    b, t, _ = x.shape
    g = h // kv

    def heads(y, n, rope=None):  # [B, T, n D] -> [B, n, T, D] (T = 1: a reshape, no copy)
      y = y.reshape(b, y.shape[1], n, hd)
      return (y if rope is None else rotary(y, rope)).transpose(0, 2, 1, 3)

    k = heads(dense(kv * hd, name="k_proj")(x), kv, rope)
    v = heads(dense(kv * hd, name="v_proj")(x), kv)
    if last_only:  # the last query: it sees every key of the pass (causal)
      x, mask = x[:, -1:], mask[:, -1:]
      rope = tuple(table[:, -1:] for table in rope)
    q = heads(dense(h * hd, name="q_proj")(x), h, rope)
    tq = q.shape[2]
    # A pass over its own keys only (no cache, or the prefill of a fresh cache: every
    # other slot is empty) is causal: its query blocks skip the masked upper triangle.
    own = cache is None or cache.fresh
    k, v = k.reshape(b * kv, t, hd), v.reshape(b * kv, t, hd)  # the cache's [B KV, T, D]
    if cache is not None:
      cache, k_all, v_all = cache.write(layer, k, v)  # [B KV, S, D]: every slot of the cache
      if own:
        mask = mask[:, :, :t]  # a fresh cache's slots [0, T) are this pass's keys
      else:
        k, v = k_all, v_all
    s = k.shape[1]
    v = v.astype(self.dtype)
    # Query head j uses KV head j // g (transformers' repeat_kv): the g query heads of a
    # KV head and their queries form one [g T, D] block, so both products are plain
    # batched matmuls over B KV on the cache's own buffers (one batch axis: see KVCache).
    q = q.reshape(b * kv, g, tq, hd)
    if own and not last_only:
      out = decoding.causal_attention(q, k, v, mask, scale=hd ** -0.5)
    else:  # every query sees the keys of the cache (or, last_only, of the whole pass)
      logits = matmul.einsum("nqd,nsd->nqs", q.reshape(b * kv, g * tq, hd), k, dtype=jnp.float32)
      logits = logits.reshape(b, kv, g, tq, s) * hd ** -0.5
      logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)  # [B, Tq, S]
      out = matmul.softmax_einsum("nqs,nsd->nqd", logits.reshape(b * kv, g * tq, s), v)
    out = out.reshape(b, h, tq, hd).transpose(0, 2, 1, 3).reshape(b, tq, h * hd)
    return dense(cfg.hidden_size, name="o_proj")(out), cache


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(matmul.Dense, use_bias=cfg.mlp_bias, dtype=self.dtype,
                              param_dtype=jnp.float32)
    # silu on gate's float32 result, rounded once (XLA:CPU's bfloat16 sigmoid is slow).
    gate = dense(cfg.intermediate_size, name="gate_proj", dot_general=matmul.dot_general_float32)
    y = nn.silu(gate(x)).astype(self.dtype)
    y = y * dense(cfg.intermediate_size, name="up_proj")(x)
    return dense(cfg.hidden_size, name="down_proj")(y)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, cache, layer, last_only=False):
    cfg = self.config
    y = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
    y, cache = LlamaAttention(cfg, self.dtype, name="self_attn")(y, rope, mask, cache, layer,
                                                                 last_only)
    x = (x[:, -1:] if last_only else x) + y
    y = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + LlamaMLP(cfg, self.dtype, name="mlp")(y), cache


class _Layers(nn.Module):
  """The ``layers`` scope with children "0", "1", ... (as the HF names)."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, cache, last_only=False):
    n = self.config.num_hidden_layers
    for i in range(n):
      x, cache = LlamaDecoderLayer(self.config, self.dtype, name=str(i))(
          x, rope, mask, cache, i, last_only and i == n - 1)
    return x, cache


class LlamaModel(nn.Module):
  """Token embeddings, the decoder layers and the final norm (HF ``LlamaModel``).

  Attributes:
    config: the architecture.
    dtype: compute dtype; parameters are float32 unless the caller stores them otherwise.
  """

  config: LlamaConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    self.layers = _Layers(cfg, self.dtype)
    self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """``[B, T]`` ids -> ``[B, T, hidden]`` embeddings in the compute dtype
    (:func:`fsjax.matmul.take_rows`: a bfloat16 table stays bfloat16 on CPU)."""
    return matmul.take_rows(self.embed_tokens.embedding, input_ids, self.dtype)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, valid: jax.Array,
               cache: decoding.KVCache | None = None, *, last_only: bool = False):
    """Runs the decoder on ``T`` new positions.

    Args:
      inputs_embeds: ``[B, T, hidden]``.
      positions: int ``[B, T]`` rotary positions (left padding: ``cumsum(valid) - 1``).
      valid: bool ``[B, T]``, False at padding.
      cache: a :class:`fsjax.decoding.KVCache` (the new keys and values are written at
        its ``index``, which then advances by T), or None for one causal pass over the
        T positions (training, scoring).
      last_only: the hidden state of the last position only: the last layer computes its
        query, attention output and MLP for that position alone (the keys and values of
        every position are still cached). What a prefill needs; a quarter of a 4-layer
        model's prefill FLOPs, 1/32 of LLaMA-7B's, that transformers computes and drops.

    Returns:
      ``(hidden [B, T or 1, hidden] after the final norm, cache)``.
    """
    if cache is None:
      t = valid.shape[1]
      mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    else:
      mask = cache.attention_mask(valid)
    size = valid.shape[1] if cache is None else cache.capacity
    rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, size)
    x, new_cache = self.layers(inputs_embeds.astype(self.dtype), rope, mask, cache, last_only)
    if cache is not None:
      new_cache = new_cache.advance(valid)
    return self.norm(x), new_cache

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied LM head: ``x @ embedding.T`` with float32 accumulation -> float32 logits."""
    table = self.embed_tokens.embedding.astype(self.dtype)
    return matmul.einsum("btd,vd->btv", x.astype(self.dtype), table, dtype=jnp.float32)
