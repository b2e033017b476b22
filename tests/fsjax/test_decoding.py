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


def test_first_argmax_is_jnp_argmax():
  """Ties go to the first maximum, a NaN wins (its first occurrence), an all -inf row
  gives 0, as jnp.argmax (and torch.argmax) do."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 50)).astype(np.float32)
  logits[1, [3, 9]] = 5.0  # a tie
  logits[2, [4, 8]] = np.nan
  logits[3] = -np.inf
  logits[4, [0, 49]] = np.inf
  logits[5, 49] = 9.0  # the last position
  for x in (logits, logits.astype(jnp.bfloat16), logits[:1, :1]):
    got = jax.jit(decoding.first_argmax)(jnp.asarray(x))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x), -1)))
  assert np.asarray(decoding.first_argmax(jnp.asarray(logits)))[[1, 2, 3, 4, 5]].tolist() == [
      3, 4, 0, 0, 49]


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
    heads_first = lambda a: jnp.asarray(a[:, lo:hi].transpose(0, 2, 1, 3).reshape(
        b * h, hi - lo, d))  # [B H, T, D]
    cache, ks, vs = cache.write(1, heads_first(k), heads_first(v))
    assert ks.shape == (b * h, 10, d)  # the cache's layout: heads first, then slots
    ks, vs = (np.asarray(a).reshape(b, h, 10, d).transpose(0, 2, 1, 3) for a in (ks, vs))
    outs.append(_attend(q[:, lo:hi], ks, vs, np.asarray(mask)))
    cache = cache.advance(pv)
  out = np.concatenate(outs, 1)
  np.testing.assert_allclose(out[1], ref[1], atol=1e-5)
  np.testing.assert_allclose(out[0, 2:], ref[0, 2:], atol=1e-5)  # padded queries: don't care
  assert int(cache.index) == 8
  np.testing.assert_array_equal(np.asarray(cache.mask)[:, :8], valid)
  assert np.all(np.asarray(cache.keys)[0] == 0)  # layer 0 untouched


def test_fresh_cache_and_causal_blocks():
  """A cache is fresh until its first advance; the blocks tile range(t), <= block long."""
  cache = decoding.KVCache.empty(num_layers=1, batch=1, capacity=4, num_kv_heads=1, head_dim=2)
  assert cache.fresh and not cache.advance(jnp.ones((1, 2), bool)).fresh
  assert jax.tree.leaves(cache)[-1].shape == ()  # fresh is static, not a leaf
  assert decoding.causal_blocks(7) == [(0, 7)]
  assert decoding.causal_blocks(592) == [(0, 120), (120, 240), (240, 360), (360, 480),
                                         (480, 592)]
  for t in (1, 128, 129, 300, 1000):
    blocks = decoding.causal_blocks(t, block=64)
    assert [s for s, _ in blocks] == [0] + [e for _, e in blocks[:-1]] and blocks[-1][1] == t
    assert all(e - s <= 64 and (e == t or (e - s) % 8 == 0) for s, e in blocks)


def _causal_reference(q, k, v, mask, scale, slopes):
  """float64 numpy: row n = (batch n // H_kv, key/value head n % H_kv), G query heads each."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n, g, t, _ = q.shape
  h_kv = n // mask.shape[0]
  logits = np.einsum("ngqd,nsd->ngqs", q, k) * scale
  if slopes is not None:
    logits += np.asarray(slopes, np.float64)[:, None, None, None] * (
        np.arange(t)[None, :] - np.arange(t)[:, None])
  rows = np.repeat(np.asarray(mask), h_kv, axis=0)[:, None]  # [N, 1, T, T]
  logits = np.where(rows, logits, -1e300)  # (a padded query sees no key: not compared)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("ngqs,nsd->ngqd", p / p.sum(-1, keepdims=True), v)


def _full_attention(q, k, v, mask, scale, slopes):
  """The same attention without blocks, in jnp: every query over every key, masked."""
  n, g, t, _ = q.shape
  logits = jnp.einsum("ngqd,nsd->ngqs", q, k) * scale
  if slopes is not None:
    logits = logits + slopes[:, None, None, None] * (jnp.arange(t)[None, :] - jnp.arange(t)[:, None])
  rows = jnp.repeat(mask, n // mask.shape[0], axis=0)[:, None]
  return jnp.einsum("ngqs,nsd->ngqd", jax.nn.softmax(jnp.where(rows, logits, -1e30), -1), v)


@pytest.mark.parametrize("t,alibi", [(260, False), (260, True), (40, True)])
def test_causal_attention_against_float64_numpy(t, alibi):
  """Causal query blocks, grouped heads, left padding and ALiBi against float64 numpy, and
  gradients against the same attention computed without blocks."""
  b, h_kv, g, d = 2, 2, 2, 8
  rng = np.random.default_rng(t)
  q = jnp.asarray(rng.normal(size=(b * h_kv, g, t, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b * h_kv, t, d)), jnp.float32) for _ in range(2))
  valid = np.ones((b, t), bool)
  valid[1, :5] = False  # row 1 left-padded by 5
  mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])
  slopes = jnp.asarray(rng.uniform(0.1, 1.0, b * h_kv), jnp.float32) if alibi else None
  attend = functools.partial(decoding.causal_attention, scale=0.3, alibi_slopes=slopes,
                             block=64)
  out = jax.jit(attend)(q, k, v, mask)
  want = _causal_reference(q, k, v, mask, 0.3, slopes)
  np.testing.assert_allclose(np.asarray(out)[:, :, 5:], want[:, :, 5:], atol=2e-6, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(out)[:2, :, :5], want[:2, :, :5], atol=2e-6, rtol=2e-5)
  assert np.isfinite(np.asarray(out)).all()  # padded queries see no key: finite all the same
  grads = [jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, mask, 0.3, slopes)[:, :, 5:] ** 2),
                            argnums=(0, 1, 2)))(q, k, v)
           for f in (lambda q, k, v, m, s, a: attend(q, k, v, m), _full_attention)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)


def test_cache_repeat_repeats_each_batch_row():
  cache = decoding.KVCache.empty(num_layers=2, batch=2, capacity=5, num_kv_heads=3, head_dim=4)
  rng = np.random.default_rng(3)
  kv = lambda: jnp.asarray(rng.normal(size=(6, 2, 4)).astype(np.float32))  # [B H, T, D]
  cache, k0, _ = cache.write(0, kv(), kv())
  cache, k1, v1 = cache.write(1, kv(), kv())
  cache = cache.advance(jnp.array([[True, True], [False, True]]))
  rep = cache.repeat(3)
  for layer, want in ((0, k0), (1, k1)):
    rows = lambda x: np.asarray(x).reshape(-1, 3, 5, 4)  # [B, H, S, D]
    np.testing.assert_array_equal(rows(rep.keys[layer]), np.repeat(rows(want), 3, axis=0))
  np.testing.assert_array_equal(rows(rep.values[1]), np.repeat(rows(v1), 3, axis=0))
  np.testing.assert_array_equal(np.asarray(rep.mask), np.repeat(np.asarray(cache.mask), 3, 0))
  assert int(rep.index) == 2


@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_loop_writes_the_cache_in_place(batch):
  """A one-layer attention model in greedy_decode: XLA compiles no copy of a cache buffer
  (a [B, H, S, D] cache was copied four times per layer and step, ~40% of the small
  LLaVA's batch-1 decoding)."""
  h, d, s, vocab = 4, 16, 40, 50
  rng = np.random.default_rng(4)
  embed, wq, wk, wv, head = (jnp.asarray(rng.normal(size=shape).astype(np.float32)) for shape in
                             ((vocab, h * d), (h * d, h * d), (h * d, h * d), (h * d, h * d),
                              (h * d, vocab)))

  def step(tokens, cache):
    x = embed[tokens]  # [B, H d]
    q, k, v = ((x @ w).reshape(batch * h, 1, d) for w in (wq, wk, wv))
    mask = cache.attention_mask(jnp.ones((batch, 1), bool))  # [B, 1, S]
    cache, keys, values = cache.write(0, k, v)
    logits = jnp.einsum("nqd,nsd->nqs", q, keys).reshape(batch, h, 1, s)
    logits = jnp.where(mask[:, None], logits, -1e9).reshape(batch * h, 1, s)
    out = jnp.einsum("nqs,nsd->nqd", jax.nn.softmax(logits), values)
    return out.reshape(batch, h * d) @ head, cache.advance(jnp.ones((batch, 1), bool))

  def run(first):
    cache = decoding.KVCache.empty(num_layers=1, batch=batch, capacity=s, num_kv_heads=h,
                                   head_dim=d)
    _, cache = step(first, cache)
    return decoding.greedy_decode(step, jnp.zeros((batch, vocab)), cache, max_new_tokens=8,
                                  eos_token_id=vocab, pad_token_id=0)[0]

  first = jnp.arange(batch, dtype=jnp.int32)
  hlo = jax.jit(run).lower(first).compile().as_text()
  buffer = f"f32[{batch * h},{s},{d}]"
  copies = [line for line in hlo.splitlines() if " copy(" in line and
            (buffer in line or f"f32[{batch},{h},{s},{d}]" in line)]
  assert not copies, copies
  assert run(first).shape == (batch, 8)


# -- option scoring ----------------------------------------------------------------------


def test_option_log_likelihoods_on_a_markov_model():
  """logits after token t = table[t]: every option's log-likelihood by hand in numpy."""
  rng = np.random.default_rng(3)
  v, b = 9, 3
  table = rng.normal(size=(v, v)).astype(np.float32)
  first = rng.normal(size=(b, v)).astype(np.float32)
  options = [[4], [2, 7, 1], [5, 5]]
  ids, valid = decoding.pad_options(options)
  assert ids.shape == (3, 3) and np.asarray(valid).sum() == 6
  calls = []

  def extend(tokens, cache):  # the cache: one row per (prompt, option), batch first
    calls.append((tokens.shape, cache["rows"].shape, cache["index"].shape))
    return jnp.asarray(table)[tokens]

  cache = {"rows": jnp.arange(b), "index": jnp.int32(0)}
  out = np.asarray(jax.jit(lambda f, c: decoding.option_log_likelihoods(extend, f, c, ids, valid))(
      jnp.asarray(first), cache))
  log_softmax = lambda x: x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1,
                                            keepdims=True)) - x.max(-1, keepdims=True)
  ref = np.zeros((b, len(options)))
  for i in range(b):
    for k, o in enumerate(options):
      ref[i, k] = log_softmax(first[i])[o[0]] + sum(
          log_softmax(table[o[j - 1]])[o[j]] for j in range(1, len(o)))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # One batched pass of B x K rows, M - 1 tokens; the scalar index is not repeated.
  assert calls == [((b * 3, 2), (b * 3,), ())]


def test_pad_options_errors():
  with pytest.raises(ValueError, match="options is empty"):
    decoding.pad_options([])
  with pytest.raises(ValueError, match=r"options \[1\] have no tokens"):
    decoding.pad_options([[3], []])


def _tiny_llava(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import fsjax.llava as fl  # pylint: disable=import-outside-toplevel
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=28, patch_size=14, projection_dim=16)
  text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, rms_norm_eps=1e-5, rope_theta=500.0)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_index=100)
  torch.manual_seed(0)
  ref = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():  # larger weights: peaked, varied next-token distributions
    for p in ref.model.language_model.parameters():
      if p.ndim == 2:
        p.mul_(4.0)
  ref.save_pretrained(tmp_path / "llava")
  return ref, fl.load(tmp_path / "llava")


def test_llava_option_scores_match_transformers_and_greedy(tmp_path):
  """Option scores = log-softmax sums of transformers' own logits over prompt + option; the
  greedy answer's prefixes score as the greedy path does and beat every other last token."""
  import torch  # pylint: disable=import-outside-toplevel
  from fsjax.clip.encoder import CLIP_MEAN, CLIP_STD  # pylint: disable=import-outside-toplevel
  ref, (model, params) = _tiny_llava(tmp_path)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 28, 28, 3)).astype(np.float32)
  ids = np.array([[1, 5, 6] + [100] * 4 + [7, 8, 9], [1, 9, 4] + [100] * 4 + [11, 3, 8]])
  with jax.default_matmul_precision("highest"):
    feats = model.image_features(params, images)
    greedy, _ = model.generate_ids(params, ids, feats, max_new_tokens=3)
    greedy = np.asarray(greedy)
    other = int(greedy[0, 2] + 1) % 128  # any token but the greedy one
    options = [[17], [40, 41, 42], [23, 99], list(greedy[0]), list(greedy[0, :2]) + [other]]
    scores = np.asarray(model.option_scores(params, ids, feats, options))
  assert scores.shape == (2, len(options))
  pix = torch.tensor(((images - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(0, 3, 1, 2),
                     dtype=torch.float32)
  want = np.zeros_like(scores)
  for k, o in enumerate(options):
    full = torch.tensor(np.concatenate([ids, np.tile(o, (2, 1))], axis=1))
    with torch.no_grad():
      logp = torch.log_softmax(ref(input_ids=full, pixel_values=pix).logits.double(), -1).numpy()
    for j, tok in enumerate(o):
      want[:, k] += logp[:, ids.shape[1] - 1 + j, tok]
  np.testing.assert_allclose(scores, want, atol=2e-4, rtol=1e-5)
  # Row 0's greedy answer (option 3) beats the same prefix with another last token (4).
  assert scores[0, 3] > scores[0, 4]


def test_flamingo_option_scores_equal_a_full_forward():
  """Cached option scoring = log-softmax of one uncached forward over prompt + option."""
  from configs import openflamingo_tiny  # pylint: disable=import-outside-toplevel
  from fsjax import flamingo  # pylint: disable=import-outside-toplevel
  of, params = flamingo.build(openflamingo_tiny.get_config())
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  feats = of.image_features(params, images)
  ids = np.array([[128, 9, 10, 11], [128, 5, 6, 7]])
  options = [[20], [30, 31, 32], [40, 41]]
  scores = np.asarray(of.option_scores(params, ids, feats, options))
  # One jitted uncached forward of every (prompt, option) pair, options right-padded with
  # token 0 (causal: padding after an option changes none of its logits).
  padded = np.array([o + [0] * (3 - len(o)) for o in options])
  full = np.concatenate([np.repeat(ids, 3, 0), np.tile(padded, (2, 1))], axis=1)
  logits = jax.jit(of.model.apply)({"params": params["language"]}, full,
                                   np.repeat(np.asarray(feats)[:, None], 3, 0))
  logp = np.asarray(jax.nn.log_softmax(logits, -1)).reshape(2, 3, full.shape[1], -1)
  for k, o in enumerate(options):
    want = sum(logp[:, k, ids.shape[1] - 1 + j, t] for j, t in enumerate(o))
    np.testing.assert_allclose(scores[:, k], want, atol=1e-4, rtol=1e-5)

