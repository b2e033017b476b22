"""fsjax.matmul: float32 accumulation, one rounding to the compute dtype, nn.* parameter trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsjax import matmul


def _bf16(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(jnp.bfloat16)


def _rounded(exact: np.ndarray) -> np.ndarray:
  """float64 numbers rounded once to bfloat16 (what float32 accumulation then a cast gives,
  up to float32's own rounding of the sum)."""
  return np.asarray(jnp.asarray(exact.astype(np.float32)).astype(jnp.bfloat16), np.float64)


def test_einsum_and_dot_are_the_exact_product_rounded_once():
  a, b = _bf16((4, 64, 96), 0), _bf16((4, 96, 32), 1)
  exact = np.einsum("bij,bjk->bik", np.asarray(a, np.float64), np.asarray(b, np.float64))
  got = matmul.einsum("bij,bjk->bik", a, b)
  assert got.dtype == jnp.bfloat16
  # Within one bfloat16 rounding of the float64 product (float32 accumulation adds ~1e-6).
  np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2 ** -8, atol=1e-5)
  assert np.mean(np.asarray(got, np.float64) == _rounded(exact)) > 0.99
  f32 = matmul.einsum("bij,bjk->bik", a, b, dtype=jnp.float32)
  assert f32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(f32, np.float64), exact, rtol=1e-5, atol=1e-5)
  d = matmul.dot(a[0], b[0])
  assert d.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(d), np.asarray(got[0]))


@pytest.mark.parametrize("fn", ["einsum", "dense", "conv"])
def test_the_dots_ask_xla_for_a_float32_result(fn):
  """What makes them fast on AMX CPUs: the dot's own result type is float32."""
  x = _bf16((2, 8, 8, 16), 2)
  if fn == "einsum":
    f = lambda x: matmul.einsum("bhwc,bhwd->bcd", x, x)
  else:
    layer = matmul.Dense(8, dtype=jnp.bfloat16) if fn == "dense" else matmul.Conv(
        8, (3, 3), dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)
    f = lambda x: layer.apply(params, x)
  prim = "conv_general_dilated" if fn == "conv" else "dot_general"
  eqns = [e for e in _equations(jax.make_jaxpr(f)(x).jaxpr) if e.primitive.name == prim]
  assert eqns and all(e.outvars[0].aval.dtype == jnp.float32 for e in eqns), eqns
  assert all(v.aval.dtype == jnp.bfloat16 for e in eqns for v in e.invars)
  assert f(x).dtype == jnp.bfloat16


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (pjit, custom_jvp) included."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      inner = getattr(p, "jaxpr", None)
      if inner is not None:
        yield from _equations(getattr(inner, "jaxpr", inner))


def test_dense_and_conv_have_nn_parameter_trees_and_float32_results_match():
  x = jax.random.normal(jax.random.key(3), (2, 6, 6, 5))
  for ours, theirs in ((matmul.Dense(7), nn.Dense(7)),
                       (matmul.Conv(7, (3, 3)), nn.Conv(7, (3, 3)))):
    params = theirs.init(jax.random.key(0), x)
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
            == jax.tree.map(jnp.shape, params))
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6,
                               atol=1e-6)


def test_dot_general_float32_keeps_the_float32_result():
  x = _bf16((3, 16), 4)
  layer = matmul.Dense(8, dtype=jnp.bfloat16, dot_general=matmul.dot_general_float32)
  params = layer.init(jax.random.key(0), x)
  y = layer.apply(params, x)
  assert y.dtype == jnp.float32
  kernel = np.asarray(jnp.asarray(params["params"]["kernel"]).astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ kernel, rtol=1e-5,
                             atol=1e-5)


def _softmax_attention_numpy(logits, v):
  """float64 softmax(logits) @ v, by hand."""
  logits, v = np.asarray(logits, np.float64), np.asarray(v, np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_softmax_einsum_is_softmax_then_einsum(dtype, tol):
  """Against numpy in float64, with a row masked to finfo.min but one key and a row masked
  everywhere (softmax's uniform weights); gradients equal those of softmax then einsum."""
  logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 3, 5, 7), jnp.float32)
  low = jnp.finfo(jnp.float32).min
  logits = logits.at[0, 0, 1, 1:].set(low).at[1, 2, 3, :].set(low)
  v = jax.random.normal(jax.random.key(1), (2, 3, 7, 4), jnp.float32).astype(dtype)
  out = matmul.softmax_einsum("bhqk,bhkd->bhqd", logits, v)
  assert out.dtype == dtype and out.shape == (2, 3, 5, 4)
  want = _softmax_attention_numpy(logits, np.asarray(v, np.float64))
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(out[1, 2, 3], np.float64),
                             np.asarray(v[1, 2], np.float64).mean(0), rtol=tol, atol=tol)
  if dtype == jnp.float32:
    ours = lambda l: jnp.sum(jnp.sin(matmul.softmax_einsum("bhqk,bhkd->bhqd", l, v)))
    theirs = lambda l: jnp.sum(jnp.sin(jnp.einsum("bhqk,bhkd->bhqd",
                                                  jax.nn.softmax(l, axis=-1), v)))
    finite = 3.0 * jax.random.normal(jax.random.key(2), logits.shape)
    np.testing.assert_allclose(jax.grad(ours)(finite), jax.grad(theirs)(finite), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("subscripts,lhs,rhs", [
    ("md,dn->mn", (1, 64), (64, 96)),                   # a dense layer at batch 1
    ("btd,dv->btv", (1, 1, 64), (64, 200)),             # the LM head of one token
    ("bkqd,bksd->bkqs", (1, 4, 1, 16), (1, 4, 40, 16)),  # attention over the cache
    ("bkqs,bksd->bkqd", (1, 4, 1, 40), (1, 4, 40, 16)),
    ("qbd,bdn->bqn", (1, 3, 16), (3, 16, 8)),           # free dimension before the batch
])
def test_single_row_bfloat16_dots_stay_bfloat16_on_cpu(subscripts, lhs, rhs):
  """XLA:CPU rewrites a one-row bfloat16 dot to float32 (a float32 copy of the weight);
  fsjax runs it on the row repeated twice: the same product, no conversion of the weight."""
  a, b = _bf16(lhs, 3), _bf16(rhs, 4)
  exact = np.einsum(subscripts, np.asarray(a, np.float64), np.asarray(b, np.float64))
  got = matmul.einsum(subscripts, a, b, dtype=jnp.float32)
  assert got.shape == exact.shape
  np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(lambda a, b: matmul.einsum(subscripts, a, b)).lower(a, b).compile().as_text()
  weight = "f32[" + ",".join(map(str, rhs)) + "]"
  assert not [line for line in hlo.splitlines() if weight in line and "convert" in line], hlo
  # The reference: plain jnp.einsum converts the weight (what the repetition avoids).
  plain = jax.jit(lambda a, b: jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32))
  if jax.default_backend() == "cpu" and subscripts == "md,dn->mn":
    assert "convert" in plain.lower(a, b).compile().as_text()


def test_single_row_repetition_only_where_it_helps():
  """float32 dots, dots with more than one row, and gradients are lax.dot_general's own."""
  dims = (((1,), (0,)), ((), ()))
  a32, b32 = jnp.ones((1, 8)), jnp.ones((8, 4))
  dot = lambda a, b: matmul.lax_dot_general(a, b, dims)
  ops = lambda *x: [e.primitive.name for e in _equations(jax.make_jaxpr(dot)(*x).jaxpr)]
  assert "concatenate" not in ops(a32, b32)
  assert "concatenate" not in ops(_bf16((2, 8), 0), _bf16((8, 4), 1))
  one = ops(_bf16((1, 8), 0), _bf16((8, 4), 1))
  assert ("concatenate" in one) == (jax.default_backend() == "cpu")
  a, b = _bf16((1, 8), 5), _bf16((8, 4), 6)
  loss = lambda a, b: jnp.sum(matmul.dot_general(a, b, dims, preferred_element_type=jnp.float32))
  ref = lambda a, b: jnp.sum(jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32))
  for got, want in zip(jax.grad(loss, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_take_rows_is_the_rows_of_the_table(dtype):
  """``take_rows`` = ``table[ids]`` (numpy) cast once; a 16-bit table is never converted
  whole (XLA:CPU gathered bfloat16 in float32, converting the table)."""
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(50, 12)), dtype)
  ids = jnp.asarray([[3, 0, 49], [7, 7, 1]])
  out = matmul.take_rows(table, ids, jnp.float32)
  assert out.dtype == jnp.float32 and out.shape == (2, 3, 12)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(table, np.float32)[np.asarray(ids)])
  assert matmul.take_rows(table, ids).dtype == dtype
  if dtype != jnp.float32:
    hlo = jax.jit(matmul.take_rows).lower(table, ids).compile().as_text()
    assert "f32[50,12]" not in hlo
    # Out of range: the bit pattern 0xFFFF, a NaN (jnp.take fills with NaN).
    assert np.isnan(np.asarray(matmul.take_rows(table, jnp.asarray([50]), jnp.float32))).all()


def _attention_reference(q, k, v, mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("t,masked,looped", [(260, False, True), (260, True, False),
                                             (20, False, False)])
def test_attention_against_float64_numpy(t, masked, looped, monkeypatch):
  """Long unmasked self-attention runs one (batch, head) at a time on CPU (a while loop
  in the compiled program), everything else in one batched pass: the same numbers, and
  the same gradients as the batched form."""
  rng = np.random.default_rng(t)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 3, t, 8)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None] if masked else None
  out = matmul.attention(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), _attention_reference(q, k, v, mask), atol=2e-6,
                             rtol=2e-5)
  hlo = jax.jit(matmul.attention).lower(q, k, v, mask).compile().as_text()
  assert (" while(" in hlo) == looped
  loss = lambda q, k, v: jnp.sum(matmul.attention(q, k, v, mask) ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  monkeypatch.setattr(matmul, "CPU_HEAD_LOOP_MIN_TOKENS", 10 ** 9)  # the batched form
  batched = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads, batched):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
