"""fsjax.decoding: the greedy loop against a plain Python loop with transformers' rules,
and the KV cache against full causal attention in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsjax import decoding


def _reference(table, first, *, max_new_tokens, eos, pad):
  """transformers' _sample loop, greedy, on the Markov chain "logits = table[token]"."""
  tokens = [np.argmax(first, -1)]
  unfinished = ~np.isin(tokens[0], eos)
  while len(tokens) < max_new_tokens and unfinished.any():
    nxt = np.argmax(table[tokens[-1]], -1)
    nxt = np.where(unfinished, nxt, pad)
    unfinished &= ~np.isin(nxt, eos)
    tokens.append(nxt)
  return np.stack(tokens, 1)


def _markov_step(table):
  """A 'model' whose next-token logits depend on the last token only; counts its calls."""
  def step(token, cache):
    return table[token], cache + 1
  return step


@pytest.mark.parametrize("eos", [7, (7, 3)])
def test_matches_reference_loop(eos):
  rng = np.random.default_rng(0)
  v, batch, max_new = 12, 4, 16
  table = rng.normal(size=(v, v)).astype(np.float32)
  table[:, 7] -= 10.0  # EOS rare, but reachable from some tokens
  table[5, 7] = 50.0   # token 5 -> EOS: the rows that hit 5 stop early
  first = rng.normal(size=(batch, v)).astype(np.float32)
  first[1, 5] = 50.0  # row 1 starts with 5, so it ends at step 2
  eos_ids = (eos,) if isinstance(eos, int) else eos

  @functools.partial(jax.jit, static_argnames="max_new_tokens")
  def run(first, *, max_new_tokens):
    return decoding.greedy_decode(_markov_step(jnp.asarray(table)), first, jnp.int32(0),
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)

  tokens, num_steps = run(jnp.asarray(first), max_new_tokens=max_new)
  ref = _reference(table, first, max_new_tokens=max_new, eos=eos_ids, pad=0)
  assert int(num_steps) == ref.shape[1]
  np.testing.assert_array_equal(np.asarray(tokens)[:, :ref.shape[1]], ref)
  assert np.all(np.asarray(tokens)[:, ref.shape[1]:] == 0)
  assert ref[1, 1] == 7 and np.all(ref[1, 2:] == 0)  # the early row is padded after EOS


def test_stops_when_every_row_has_finished():
  v = 6
  table = np.zeros((v, v), np.float32)
  table[:, 2] = 1.0  # every step emits EOS = 2
  first = np.eye(v, dtype=np.float32)[[4, 1]]
  tokens, num_steps = decoding.greedy_decode(
      _markov_step(jnp.asarray(table)), jnp.asarray(first), jnp.int32(0),
      max_new_tokens=10, eos_token_id=2, pad_token_id=5)
  # Token 1 of each row is EOS: 2 columns, then padding; the step ran once.
  np.testing.assert_array_equal(np.asarray(tokens), [[4, 2] + [5] * 8, [1, 2] + [5] * 8])
  assert int(num_steps) == 2


def test_step_calls_counted_by_cache():
  """The cache threads through the loop: max_new_tokens - 1 steps when nobody stops."""
  table = jnp.zeros((4, 4)).at[:, 1].set(1.0)
  _, cache_steps = jax.jit(lambda f: decoding.greedy_decode(
      lambda t, c: (table[t], c + 1), f, jnp.int32(0), max_new_tokens=9, eos_token_id=3,
      pad_token_id=0))(jnp.ones((2, 4)))
  assert int(cache_steps) == 9


def test_bad_arguments():
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.greedy_decode(lambda t, c: (t, c), jnp.zeros((1, 3)), 0, max_new_tokens=0,
                           eos_token_id=1, pad_token_id=0)
  with pytest.raises(ValueError, match="eos_token_id"):
    decoding.greedy_decode(lambda t, c: (t, c), jnp.zeros((1, 3)), 0, max_new_tokens=2,
                           eos_token_id=(), pad_token_id=0)


def _attend(q, k, v, mask):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  logits = np.where(mask[:, None], logits, -np.inf)
  with np.errstate(invalid="ignore"):  # fully masked (padding) queries: NaN, never compared
    p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_kv_cache_equals_full_causal_attention():
  """Prefill 5 tokens (row 0 left-padded by 2), then 3 single steps = one causal pass."""
  rng = np.random.default_rng(1)
  b, t, h, d = 2, 8, 2, 4
  q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
  valid = np.ones((b, t), bool)
  valid[0, :2] = False
  full = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  ref = _attend(q, k, v, full)

  cache = decoding.KVCache.empty(num_layers=2, batch=b, capacity=10, num_kv_heads=h,
                                 head_dim=d)
  outs = []
  for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 8)]:
    pv = jnp.asarray(valid[:, lo:hi])
    mask = cache.attention_mask(pv)
    heads_first = lambda a: jnp.asarray(a[:, lo:hi].transpose(0, 2, 1, 3))  # [B, H, T, D]
    cache, ks, vs = cache.write(1, heads_first(k), heads_first(v))
    assert ks.shape == (b, h, 10, d)  # the cache's layout: heads first, then slots
    ks, vs = (np.asarray(a).transpose(0, 2, 1, 3) for a in (ks, vs))
    outs.append(_attend(q[:, lo:hi], ks, vs, np.asarray(mask)))
    cache = cache.advance(pv)
  out = np.concatenate(outs, 1)
  np.testing.assert_allclose(out[1], ref[1], atol=1e-5)
  np.testing.assert_allclose(out[0, 2:], ref[0, 2:], atol=1e-5)  # padded queries: don't care
  assert int(cache.index) == 8
  np.testing.assert_array_equal(np.asarray(cache.mask)[:, :8], valid)
  assert np.all(np.asarray(cache.keys)[0] == 0)  # layer 0 untouched
