"""Greedy decoding with a static KV cache, for any decoder-only language model.

One loop for every MLLM of the project (LLaVA's LLaMA, OpenFlamingo's MPT): the model
supplies a *prefill* (the prompt in one forward pass, filling its cache) and a *step*
(one new token per row, reading and extending the cache); :func:`greedy_decode` runs the
``lax.while_loop`` between them. Everything is traceable: call it inside ``jax.jit``
with ``max_new_tokens`` static, so one compilation serves every prompt of a shape.

The contract of a model's step::

  step(tokens: int32 [B], cache) -> (logits: [B, V], cache)

``tokens`` are the tokens chosen at the previous step (the pad token for rows that have
finished), ``logits`` the next-token logits after them; the cache is any pytree of
fixed-shape arrays (it must carry its own write position: the loop never looks inside).
:class:`KVCache` is such a cache for the usual per-layer keys and values.

The loop reproduces transformers' ``generate(do_sample=False)``: the token is the first
argmax of the logits; a row is finished once it has emitted any EOS id, and from then on
it emits ``pad_token_id`` (transformers' ``next_tokens * unfinished + pad * (1 -
unfinished)``); decoding stops when every row has finished or after ``max_new_tokens``
tokens. transformers returns the tokens up to that stop; here the output always has
``max_new_tokens`` columns, the ones after the stop filled with the pad token, and
``num_steps`` says where transformers would have stopped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import checks
from fsjax import matmul

PyTree = Any

# step(tokens int32 [B], cache) -> (logits [B, V], cache)
Step = Callable[[jax.Array, PyTree], tuple[jax.Array, PyTree]]


def greedy_decode(step: Step, logits: jax.Array, cache: PyTree, *, max_new_tokens: int,
                  eos_token_id: int | Sequence[int] | jax.Array, pad_token_id: int | jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding from the prefill's last logits: ``tokens, num_steps``.

  Traceable; ``max_new_tokens`` is a Python int (static); ``eos_token_id`` and
  ``pad_token_id`` may be ints or (traced) int arrays, so changing them need not
  recompile. The step is called at most ``max_new_tokens - 1`` times (the first token
  comes from the prefill's logits), so a cache needs room for the prompt plus
  ``max_new_tokens - 1`` tokens.

  Args:
    step: the model's one-token step (see the module docstring).
    logits: ``[B, V]`` logits of the last prompt position, from the prefill.
    cache: the cache after the prefill.
    max_new_tokens: number of tokens to generate (>= 1).
    eos_token_id: one id or several (an int, a sequence or a 1-D array); a row finishes
      at the first of them it emits.
    pad_token_id: what a finished row emits (transformers: ``generation_config.pad_token_id``,
      which defaults to the first EOS id when the model has no pad token).

  Returns:
    ``tokens`` int32 ``[B, max_new_tokens]``: the generated ids, each row's EOS kept and
    followed by ``pad_token_id``; ``num_steps`` int32 scalar: the number of columns
    transformers returns (``tokens[:, :num_steps]`` equals its new tokens).
  """
  max_new_tokens = checks.check_positive_int(max_new_tokens, name="max_new_tokens")
  eos = jnp.atleast_1d(jnp.asarray(eos_token_id if not isinstance(eos_token_id, (list, tuple))
                                   else list(eos_token_id), jnp.int32))
  if eos.size == 0:
    raise ValueError("eos_token_id is empty: give at least one end-of-sequence id.")
  batch = logits.shape[0]

  def choose(logits, done):
    token = first_argmax(logits)  # the first maximum, as torch.argmax
    token = jnp.where(done, jnp.asarray(pad_token_id, jnp.int32), token)
    return token, done | jnp.isin(token, eos)

  token, done = choose(logits, jnp.zeros((batch,), bool))
  tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    i, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, token, done, tokens, cache = state
    logits, cache = step(token, cache)
    token, done = choose(logits, done)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    return i + 1, token, done, tokens, cache

  num_steps, _, _, tokens, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), token, done, tokens, cache))
  return tokens, num_steps


def first_argmax(logits: jax.Array) -> jax.Array:
  """``jnp.argmax(logits, axis=-1)`` as int32: the index of the first maximum of each row
  (of the first NaN if the row holds one, as ``jnp.argmax``).

  Two single-output reductions (the maximum, then the smallest index holding it) instead
  of argmax's fused (value, index) reduction, which XLA:CPU runs several times slower:
  one core, 50280 logits, 156 against 28 us per row at batch 1 and 1,143 against 227 us
  at batch 8 (a one-off script) -- at every greedy decoding step.
  """
  top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if the row holds one
  hit = (logits == top) | (jnp.isnan(logits) & jnp.isnan(top))
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


@flax.struct.dataclass
class KVCache:
  """Static-shape keys and values of every layer, and where the next token goes.

  Attributes:
    keys: one ``[B H_kv, S, D_head]`` array per layer (S = the static capacity in
      tokens; row ``b H_kv + h`` is head h of batch row b): heads first, the layout
      attention's batched matmuls read, so that no step transposes the cache (a ``[B, S,
      H, D]`` cache cost one full re-layout of every layer's keys and values per generated
      token), and with one batch axis, so that attention's batched matmuls read the
      buffer :meth:`write` updated as it is: a ``[B, H_kv, S, D]`` buffer was reshaped
      for them after each write, and XLA:CPU then duplicated the in-place write into both
      users, copying every layer's keys and values four times per step (the small
      LLaVA's batch-1 decoding: 98 -> 149 tokens/s without the copies). Separate
      buffers rather than one stacked array, so that each layer's write is an in-place
      update of its own buffer inside the decoding loop.
    values: same shapes as ``keys``.
    mask: bool ``[B, S]``, True where a slot holds a real token (False: empty, or a
      left-padding position of a shorter prompt).
    index: int32 scalar, the slot the next token is written to (shared by all rows).
    fresh: static (not a traced leaf): True for a cache from :meth:`empty` that no pass
      has advanced yet. Every slot is then empty, so the pass that fills it (the prefill)
      sees only its own T keys, in causal order: a model may attend over those T keys,
      in causal query blocks (:func:`causal_blocks`), rather than over all S slots.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  fresh: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def empty(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int,
            head_dim: int, dtype: Any = jnp.float32) -> "KVCache":
    """A cache of zeros with room for ``capacity`` tokens per row."""
    shape = (batch * num_kv_heads, capacity, head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(keys=zeros(), values=zeros(), mask=jnp.zeros((batch, capacity), bool),
               index=jnp.int32(0), fresh=True)

  @property
  def capacity(self) -> int:
    return self.keys[0].shape[1]

  def write(self, layer: int, keys: jax.Array, values: jax.Array
            ) -> tuple["KVCache", jax.Array, jax.Array]:
    """Stores ``[B H_kv, T, D_head]`` keys/values of ``layer`` at ``index``.

    Returns the updated cache and the layer's full keys and values ``[B H_kv, S, D]`` (the
    buffers themselves) to attend over, with the batch axis of the attention's matmuls
    being the buffers' first (mask them with :meth:`attention_mask`). ``index`` is not
    advanced: call :meth:`advance` once per forward pass, after the last layer.
    """
    at = (0, self.index, 0)
    k = jax.lax.dynamic_update_slice(self.keys[layer], keys.astype(self.keys[layer].dtype), at)
    v = jax.lax.dynamic_update_slice(self.values[layer], values.astype(self.values[layer].dtype),
                                     at)
    put = lambda buffers, new: buffers[:layer] + (new,) + buffers[layer + 1:]
    return self.replace(keys=put(self.keys, k), values=put(self.values, v)), k, v

  def repeat(self, k: int) -> "KVCache":
    """Each batch row's cache ``k`` times in a row: batch row ``b k + j`` is row b."""
    rows = lambda x: jnp.repeat(x.reshape(self.mask.shape[0], -1, *x.shape[1:]), k, axis=0
                                ).reshape(-1, *x.shape[1:])
    return self.replace(keys=tuple(map(rows, self.keys)), values=tuple(map(rows, self.values)),
                        mask=jnp.repeat(self.mask, k, axis=0))

  def attention_mask(self, valid: jax.Array) -> jax.Array:
    """Bool ``[B, T, S]``: query ``t`` of this pass may see slot ``s``.

    ``valid`` is bool ``[B, T]``, which of this pass's T tokens are real. A slot is
    visible if it holds a real token (earlier passes, or this pass's valid tokens) and
    is not after the query (causal).
    """
    t = valid.shape[1]
    slots = jnp.arange(self.capacity)
    mask = jax.lax.dynamic_update_slice(self.mask, valid, (0, self.index))
    causal = slots[None, :] <= (self.index + jnp.arange(t))[:, None]  # [T, S]
    return mask[:, None, :] & causal[None]

  def advance(self, valid: jax.Array) -> "KVCache":
    """Records this pass's ``valid`` ``[B, T]`` tokens and moves ``index`` past them."""
    mask = jax.lax.dynamic_update_slice(self.mask, valid, (0, self.index))
    return self.replace(mask=mask, index=self.index + valid.shape[1], fresh=False)


def causal_blocks(t: int, block: int = 128) -> list[tuple[int, int]]:
  """Static query blocks ``[(start, end), ...]`` covering ``range(t)`` for causal attention.

  In a causal pass over its own ``t`` tokens (a plain forward pass, or the prefill of a
  :attr:`KVCache.fresh` cache), the queries of block ``[start, end)`` see keys ``[0, end)``
  only: attending block by block skips the masked upper triangle (about 40% of the
  attention work and of its ``[T, T]`` logits at ``t = 592``, LLaVA's prompt with 576 image
  tokens) and gives the same softmax, since the keys left out are masked anyway. Blocks
  are near-equal, at most ``block`` long, multiples of 8 but the last; one block when ``t <=
  block``.
  """
  n = -(-t // block)
  size = -(-(-(-t // n)) // 8) * 8
  return [(start, min(start + size, t)) for start in range(0, t, size)]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     scale: float, alibi_slopes: jax.Array | None = None, block: int = 128,
                     dtype=None) -> jax.Array:
  """Causal softmax attention of a pass over its own T tokens, in causal query blocks.

  What a plain forward pass and the prefill of a :attr:`KVCache.fresh` cache compute:
  every query sees only keys of the same pass, so the queries of block ``[start, end)``
  (:func:`causal_blocks`) attend to keys ``[0, end)`` and the masked upper triangle is
  never computed. Logits and softmax in float32 (:func:`fsjax.matmul.softmax_einsum`).

  Each block is one batched pass over the N rows. (Running the rows one at a time on CPU,
  as :func:`fsjax.matmul.attention` does for long unmasked attention, made one layer of
  the small LLaVA's batch-8 prefill alone 1.9x faster, but the whole prefill no faster:
  810 against 808 ms at batch 8, 95.0 against 95.2 ms at batch 1.)

  Args:
    q: ``[N, G, T, D]``: the G query heads that share each key/value row; ``N = B H_kv``,
      row n being key/value head ``n % H_kv`` of batch row ``n // H_kv`` (the layout of
      :class:`KVCache`).
    k, v: ``[N, T, D]``.
    mask: bool ``[B, T, T]``: query t may see key s, causal part included (the blocks
      leave out keys after a query's block, the mask the rest): the pass's own slots of
      :meth:`KVCache.attention_mask`, or a lower triangle and the padding.
    scale: the logits' factor (``D ** -0.5`` for most models).
    alibi_slopes: optional float ``[N]``: ALiBi (MPT), adding ``slope_n (s - t)`` to row
      n's logit of query t and key s.
    block: the query blocks' largest length.
    dtype: the output's dtype (default ``v``'s).

  Returns:
    ``[N, G, T, D]``.
  """
  n, g, t, d = q.shape
  h_kv = n // mask.shape[0]  # rows per batch row: the mask's rows are shared by them
  outs = []
  for start, end in causal_blocks(t, block):  # queries [start, end) see keys [0, end)
    size = end - start
    logits = matmul.einsum("nqd,nsd->nqs", q[:, :, start:end].reshape(n, g * size, d),
                           k[:, :end], dtype=jnp.float32).reshape(n, g, size, end) * scale
    if alibi_slopes is not None:
      distance = (jnp.arange(end)[None, :] - jnp.arange(start, end)[:, None]).astype(jnp.float32)
      logits = logits + alibi_slopes[:, None, None, None] * distance
    logits = jnp.where(mask[:, None, None, start:end, :end],
                       logits.reshape(-1, h_kv, g, size, end), jnp.finfo(jnp.float32).min)
    outs.append(matmul.softmax_einsum("nqs,nsd->nqd", logits.reshape(n, g * size, end),
                                      v[:, :end], dtype=dtype).reshape(n, g, size, -1))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


# Extend(tokens int32 [B, T], cache) -> logits [B, T, V]: T new tokens after the cache.
Extend = Callable[[jax.Array, PyTree], jax.Array]


def pad_options(options: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Token sequences of a finite answer set -> right-padded ``(ids int32 [K, M], valid bool [K, M])``
  (numpy: a jitted call transfers them).

  Raises:
    ValueError: no options, or an option without tokens (before any jit).
  """
  options = [list(map(int, o)) for o in options]
  if not options:
    raise ValueError("options is empty: give at least one answer's token ids.")
  empty = [i for i, o in enumerate(options) if not o]
  if empty:
    raise ValueError(f"options {empty} have no tokens: every answer needs at least one token "
                     "id (tokenize it without special tokens).")
  m = max(len(o) for o in options)
  ids = np.asarray([o + [0] * (m - len(o)) for o in options], np.int32)
  valid = np.asarray([[True] * len(o) + [False] * (m - len(o)) for o in options])
  return ids, valid


def option_log_likelihoods(extend: Extend, logits: jax.Array, cache: PyTree, options: jax.Array,
                           option_valid: jax.Array) -> jax.Array:
  """Log-likelihood of every option's token sequence after each prompt, in one pass.

  Scoring a finite answer set (multiple choice, a class name, yes/no) needs no decoding:
  ``log p(option | prompt) = sum_j log p(o_j | prompt, o_<j)``. The first token's
  probability comes from the prefill's last logits; the others from one forward pass of
  all ``B x K`` (prompt, option) pairs over the prompt's cache, repeated K times, so the
  prompt (and its image tokens) is run once per row, not once per option. Traceable;
  shapes are static (options right-padded to M tokens: :func:`pad_options`).

  Args:
    extend: the model's multi-token step, ``extend(tokens int32 [B K, T], cache) ->
      logits [B K, T, V]`` (T new tokens, all valid, after what the cache holds).
    logits: ``[B, V]`` logits of the last prompt position, from the prefill.
    cache: the cache after the prefill, with room for ``M - 1`` more tokens: a pytree of
      :class:`KVCache` nodes (repeated by :meth:`KVCache.repeat`) and arrays, each with
      the batch as its first axis, repeated K times along it (scalars are shared).
    options: int32 ``[K, M]``, the options' ids, right-padded.
    option_valid: bool ``[K, M]``, True on each option's real tokens (a prefix).

  Returns:
    float32 ``[B, K]``: the log-likelihood of option k after prompt b (log-softmax of the
    float32 logits; padding contributes nothing). ``argmax`` over K is the answer.
  """
  b = logits.shape[0]
  k, m = options.shape
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
  total = logp[:, options[:, 0]]  # [B, K]
  if m == 1:
    return total
  # Row b * K + k of the repeated batch is (prompt b, option k).
  def repeat(node):
    if isinstance(node, KVCache):
      return node.repeat(k)
    return jnp.repeat(node, k, axis=0) if jnp.ndim(node) else node
  repeated = jax.tree.map(repeat, cache, is_leaf=lambda node: isinstance(node, KVCache))
  out = extend(jnp.tile(options[:, :-1], (b, 1)), repeated)  # [B K, M - 1, V]
  logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
  nxt = jnp.take_along_axis(logp, jnp.tile(options[:, 1:], (b, 1))[..., None], axis=-1)[..., 0]
  nxt = jnp.where(jnp.tile(option_valid[:, 1:], (b, 1)), nxt, 0.0)
  return total + jnp.sum(nxt, axis=-1).reshape(b, k)
