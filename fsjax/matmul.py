"""Matrix multiplies that accumulate in float32: the bfloat16 models' dots, in one place.

A bfloat16 dot whose *result* is bfloat16 and one whose result is float32 (then rounded to
bfloat16) compute the same numbers up to one rounding, but XLA does not run them alike. On
an AMX CPU (jax 0.10.2, one core, ViT-B/16 shapes, `benchmarks/smoothing_throughput.py`'s
peak table) the bfloat16-out dot runs at 140-155 GFLOP/s, no faster than float32, while the
float32-out one reaches 580-840 GFLOP/s: only the latter goes to the tiled bfloat16 kernels.
On GPUs and TPUs float32 accumulation is what the hardware does anyway. So every dense
layer, convolution and attention einsum of fsjax's models asks for a float32 result and
rounds it to the compute dtype itself; float32 models are unchanged (the float32 result is
the default there).

A bfloat16 dot with a *single row* (decoding one token per sequence at batch 1: every
dense layer, the attention over the cache and the LM head) is another case: XLA:CPU has no
bfloat16 matrix-vector kernel and rewrites the dot to float32, converting its weight; in a
decoding loop the conversion of every weight is hoisted out of the loop, so each call
makes a float32 copy of the model (LLaVA's bfloat16 ``generate``: 202 MB of temporaries
for 92 MB of weights; LLaVA-1.5-7B: ~27 GB). On CPU these dots run on the row repeated
twice (:func:`lax_dot_general`), which YNNPACK's bfloat16 kernel takes as it is.

Attention (:func:`attention`) is float32 logits and softmax around these matmuls; on CPU a
long unmasked self-attention runs one (batch, head) at a time (see
:data:`CPU_HEAD_LOOP_MIN_TOKENS`).

An embedding lookup in a 16-bit table is the same kind of case as the one-row dot: XLA:CPU
gathers bfloat16 rows in float32, and in a decoding loop it hoists the conversion of the
whole table. :func:`take_rows` gathers the rows' bit patterns instead.

Usage::

  from fsjax import matmul
  dense = functools.partial(matmul.Dense, 512, dtype=jnp.bfloat16)  # an nn.Dense
  y = matmul.einsum("bhqk,bhkd->bhqd", probs, v)                    # probs' dtype out
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _accumulator(*operands) -> jnp.dtype:
  """float32, or the operands' own dtype where it is wider (float64 under x64)."""
  return jnp.promote_types(jnp.result_type(*operands), jnp.float32)


def _single_row(lhs, rhs, dimension_numbers) -> tuple[int, int] | None:
  """For a reduced-precision dot with one LHS row on CPU: the LHS dimension to repeat and
  the output dimension it becomes; else None."""
  if jnp.result_type(lhs, rhs) not in (jnp.bfloat16, jnp.float16):
    return None
  (contracting, _), (batch, _) = dimension_numbers
  free = [d for d in range(lhs.ndim) if d not in contracting and d not in batch]
  if not free or any(lhs.shape[d] != 1 for d in free) or jax.default_backend() != "cpu":
    return None
  return free[0], len(batch)  # output dims: batch, then the LHS's free ones in order


def lax_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    **kwargs) -> jax.Array:
  """``lax.dot_general``, but on CPU a bfloat16 (or float16) dot whose LHS is a single row
  (its free dimensions all of size 1) is computed on that row repeated twice, and the first
  row of the result kept: the same numbers, without XLA:CPU's float32 rewrite of the dot
  (module docstring). Elsewhere, and for every other dot, ``lax.dot_general`` itself."""
  row = _single_row(lhs, rhs, dimension_numbers)
  if row is not None:
    lhs = jnp.concatenate([lhs, lhs], axis=row[0])
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=preferred_element_type, **kwargs)
  return out if row is None else jax.lax.slice_in_dim(out, 0, 1, axis=row[1])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs) -> jax.Array:
  """:func:`lax_dot_general` accumulated and returned in float32, then cast to
  ``preferred_element_type`` (default: the operands' common dtype)."""
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  out = lax_dot_general(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=_accumulator(lhs, rhs), **kwargs)
  return out.astype(out_dtype)


#: :func:`dot_general` returning the float32 result itself (for a layer whose output goes
#: through an activation before it is rounded: ``Dense(..., dot_general=dot_general_float32)``;
#: the bias is then added in float32 too).
dot_general_float32 = functools.partial(dot_general, preferred_element_type=jnp.float32)


def conv_general_dilated(lhs, rhs, *args, preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.conv_general_dilated`` accumulated in float32, returned in the operands' dtype."""
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  out = jax.lax.conv_general_dilated(lhs, rhs, *args,
                                     preferred_element_type=_accumulator(lhs, rhs), **kwargs)
  return out.astype(out_dtype)


def einsum(subscripts: str, *operands, dtype=None, **kwargs) -> jax.Array:
  """``jnp.einsum`` (its products by :func:`lax_dot_general`) accumulated in float32,
  returned in ``dtype`` (default: the operands' common dtype; pass ``jnp.float32`` to keep
  the float32 result, e.g. attention logits)."""
  out_dtype = dtype or jnp.result_type(*operands)
  return jnp.einsum(subscripts, *operands, preferred_element_type=_accumulator(*operands),
                    _dot_general=lax_dot_general, **kwargs).astype(out_dtype)


def softmax_einsum(subscripts: str, logits: jax.Array, v: jax.Array, dtype=None) -> jax.Array:
  """``einsum(subscripts, softmax(logits, -1), v)`` with the softmax normalised after the
  product: attention's output from its float32 logits.

  ``exp(l - max l)`` (rounded to ``dtype``, default ``v``'s) is contracted with ``v`` in
  float32 and the result divided by the float32 row sums: the numbers of ``jax.nn.softmax``
  then :func:`einsum` up to rounding, with one pass less over the ``[..., Q, K]``
  probabilities (the ``[..., Q, D]`` output is divided instead: 2-3% of ViT-B/16 smoothing
  on CPU). The output must be ``[..., Q, D]`` over the logits' leading axes ``[..., Q]``.
  A row masked everywhere (all logits equal) averages ``v``, as softmax does.
  """
  dtype = dtype or v.dtype
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = einsum(subscripts, e.astype(dtype), v, dtype=jnp.float32)
  return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype)


def take_rows(table: jax.Array, ids: jax.Array, dtype=None) -> jax.Array:
  """``table[ids]`` cast to ``dtype`` (default the table's): an embedding lookup.

  The rows are gathered in the table's own dtype and then cast (``nn.Embed`` casts the
  table first); a 16-bit float table is gathered as its bit patterns: XLA:CPU gathers
  bfloat16 in float32, and inside a decoding loop it hoists the conversion of the whole
  table (a float32 copy per ``generate`` call). Ids out of range give the bit pattern
  0xFFFF (a NaN) for 16-bit tables, as ``jnp.take``'s default fill gives NaN for others.
  """
  dtype = dtype or table.dtype
  if table.dtype.itemsize == 2 and jnp.issubdtype(table.dtype, jnp.floating):
    bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
    return jax.lax.bitcast_convert_type(bits, table.dtype).astype(dtype)
  return jnp.take(table, ids, axis=0).astype(dtype)


#: On CPU, self-attention over at least this many queries and keys runs one (batch, head)
#: at a time (:func:`attention`). XLA:CPU (jax 0.10.2) compiles a batched attention into
#: one YNNPACK fusion of both products and the softmax, which slows down 2-4x past 256
#: keys: one core of an AMX Xeon, ``[B, H, T, 64]`` float32, all heads at once against a
#: loop over heads: T = 256 9.2 against 10.5 ms (B = 4, H = 16), T = 257 27.9 against 11.9,
#: T = 577 32.9 against 14.4 ms (B = 1); at T = 197 (ViT-B/16) the batched form is 15%
#: faster (10.2 against 11.7 ms, B = 8, H = 12).
CPU_HEAD_LOOP_MIN_TOKENS = 257


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              dtype=None) -> jax.Array:
  """Softmax attention of heads-first ``q`` ``[B, H, Tq, d]`` over ``k``, ``v``
  ``[B, H, Tk, d]``: ``[B, H, Tq, d]`` in ``dtype`` (default ``v``'s).

  Logits ``q k / sqrt(d)`` and the softmax in float32 (:func:`softmax_einsum`); ``mask``
  (bool, broadcastable to ``[B, H, Tq, Tk]``, True = attend) gives masked logits the
  float32 minimum. On CPU, without a mask and with both lengths at least
  :data:`CPU_HEAD_LOOP_MIN_TOKENS`, the ``B H`` problems run one after the other
  (``lax.map``): the same numbers, 2-4x faster there; elsewhere one batched pass.
  """
  b, h, tq, d = q.shape
  tk = k.shape[2]

  def one(q, k, v, mask):
    logits = einsum("...qd,...kd->...qk", q, k, dtype=jnp.float32) * d ** -0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return softmax_einsum("...qk,...kd->...qd", logits, v, dtype=dtype)

  if (mask is None and min(tq, tk) >= CPU_HEAD_LOOP_MIN_TOKENS
      and jax.default_backend() == "cpu"):
    flat = lambda a: a.reshape((b * h,) + a.shape[2:])
    out = jax.lax.map(lambda a: one(*a, None), (flat(q), flat(k), flat(v)))
    return out.reshape(b, h, tq, out.shape[-1])
  return one(q, k, v, mask)


def dot(a, b, dtype=None, **kwargs) -> jax.Array:
  """``jnp.dot`` accumulated in float32, returned in ``dtype`` (default: the operands')."""
  out_dtype = dtype or jnp.result_type(a, b)
  return jnp.dot(a, b, preferred_element_type=_accumulator(a, b), **kwargs).astype(out_dtype)


#: ``nn.Dense`` with float32 accumulation (same parameters, names and shapes).
Dense = functools.partial(nn.Dense, dot_general=dot_general)
#: ``nn.Conv`` with float32 accumulation (same parameters, names and shapes).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
