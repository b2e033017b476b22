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


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs) -> jax.Array:
  """``lax.dot_general`` accumulated and returned in float32, then cast to
  ``preferred_element_type`` (default: the operands' common dtype)."""
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
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
  """``jnp.einsum`` accumulated in float32, returned in ``dtype`` (default: the operands'
  common dtype; pass ``jnp.float32`` to keep the float32 result, e.g. attention logits)."""
  out_dtype = dtype or jnp.result_type(*operands)
  return jnp.einsum(subscripts, *operands, preferred_element_type=_accumulator(*operands),
                    **kwargs).astype(out_dtype)


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


def dot(a, b, dtype=None, **kwargs) -> jax.Array:
  """``jnp.dot`` accumulated in float32, returned in ``dtype`` (default: the operands')."""
  out_dtype = dtype or jnp.result_type(a, b)
  return jnp.dot(a, b, preferred_element_type=_accumulator(a, b), **kwargs).astype(out_dtype)


#: ``nn.Dense`` with float32 accumulation (same parameters, names and shapes).
Dense = functools.partial(nn.Dense, dot_general=dot_general)
#: ``nn.Conv`` with float32 accumulation (same parameters, names and shapes).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
