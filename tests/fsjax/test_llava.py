"""fsjax.llava against transformers' LlavaForConditionalGeneration (PyTorch, CPU).

Tiny random LLaVAs built by transformers and saved with save_pretrained; fsjax loads the
directory. Oracle: the PyTorch model's logits and generate(do_sample=False).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

import fsjax.llava as fl
from fsjax import decoding
from fsjax import mllm
from fsjax import smoothing
from fsjax.clip.encoder import CLIP_MEAN, CLIP_STD
from fsjax.llava import llama
from fsjax.llava import model as llava_model

IMAGE = 100  # the <image> id of the tiny configs


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _tiny(tmp_path, *, image_size=28, kv_heads=2, layer=-2, strategy="default", eps=1e-5,
          seed=0):
  """A random transformers LLaVA saved to ``tmp_path``; returns (torch model, directory)."""
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=image_size, patch_size=14, projection_dim=16)
  text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=kv_heads, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, rope_theta=500.0)
  if eps is not None:  # None: LlamaConfig's default (1e-6)
    text["rms_norm_eps"] = eps
  config = transformers.LlavaConfig(vision_config=vision,
                                    text_config=transformers.LlamaConfig(**text),
                                    image_token_index=IMAGE, vision_feature_layer=layer,
                                    vision_feature_select_strategy=strategy)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  path = tmp_path / "llava"
  model.save_pretrained(path)
  return model, path


def _pixels(x):
  """[0, 1] NHWC -> CLIP-normalised NCHW torch tensor (what the image processor gives)."""
  return torch.tensor(((x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(0, 3, 1, 2),
                      dtype=torch.float32)


def _prompt_ids(num_image_tokens, rng, *, before=(5, 6), after=(7, 8, 9), batch=2):
  """[B, L] ids: BOS, words, the image tokens in the middle, words."""
  rows = []
  for _ in range(batch):
    b = list(rng.integers(4, 99, len(before)))
    a = list(rng.integers(4, 99, len(after)))
    rows.append([1] + b + [IMAGE] * num_image_tokens + a)
  return np.array(rows)


@pytest.mark.parametrize("image_size,kv_heads,layer,strategy,eps", [
    (28, 2, -2, "default", 1e-5),   # GQA, LLaVA-1.5's layer and strategy
    (28, 4, -1, "full", 1e-5),      # no GQA, last layer, CLS kept
    (28, 2, -1, "default", None),   # rms_norm_eps absent: LlamaConfig's 1e-6
    (28, 4, -2, "full", None),
    (336, 2, -2, "default", 1e-5),  # the 336-px tower: 576 image tokens
])
def test_prefill_logits_match_transformers(tmp_path, image_size, kv_heads, layer, strategy, eps):
  torch_model, path = _tiny(tmp_path, image_size=image_size, kv_heads=kv_heads, layer=layer,
                            strategy=strategy, eps=eps)
  model, params = fl.load(path)
  assert model.config.text_config.rms_norm_eps == (eps or 1e-6)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, image_size, image_size, 3)).astype(np.float32)
  features = model.image_features(params, x)
  t = (image_size // 14) ** 2 + (strategy == "full")
  assert features.shape == (2, t, 32)
  ids = _prompt_ids(t, rng)
  ours = np.asarray(model.logits(params, ids, features))
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(ids), pixel_values=_pixels(x)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  if image_size == 336:  # the prefill of a fresh KV cache, in causal query blocks (T > 128)
    last, _, _ = fl.model.prefill(model.language, params["language"], jnp.asarray(ids),
                                  jnp.ones(ids.shape, bool), features, capacity=ids.shape[1] + 3)
    np.testing.assert_allclose(np.asarray(last), ref[:, -1], atol=1e-5, rtol=0)


def _first_new_token_not_before(row, k):
  """An id that row emits first at step k (so making it EOS stops the row there)."""
  for j in range(k, len(row)):
    if row[j] not in row[:j]:
      return int(row[j]), j
  raise AssertionError("no fresh token to turn into EOS")


def test_greedy_tokens_match_generate(tmp_path):
  """Batch 2, 20 new tokens; then with an EOS that stops row 0 early (padded after it)."""
  torch_model, path = _tiny(tmp_path)
  model, params = fl.load(path)
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(2, 28, 28, 3)).astype(np.float32)
  features = model.image_features(params, x)
  ids = _prompt_ids(4, rng)

  def reference(eos, max_new_tokens=20):
    with torch.no_grad():
      out = torch_model.generate(input_ids=torch.tensor(ids), pixel_values=_pixels(x),
                                 do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()

  ref = reference(2)
  tokens, steps = model.generate_ids(params, ids, features, max_new_tokens=20)
  assert ref.shape == (2, 20)  # nothing stopped: compare all 20
  np.testing.assert_array_equal(np.asarray(tokens), ref)
  assert int(steps) == 20

  eos, at = _first_new_token_not_before(ref[0], 3)
  # The premise of the early-stop case (true for this seed): row 1 never emits that EOS.
  assert eos not in ref[1], "the chosen EOS also occurs in row 1: pick another seed"
  ref_early = reference(eos)
  early = dataclasses.replace(model, eos_token_id=eos)
  tokens, steps = early.generate_ids(params, ids, features, max_new_tokens=20)
  np.testing.assert_array_equal(np.asarray(tokens)[:, :int(steps)], ref_early)
  assert ref_early[0, at] == eos and np.all(ref_early[0, at + 1:] == 0)  # padded after EOS

  # Both rows stop: transformers returns fewer columns, num_steps says how many.
  eos_both = (eos, int(ref[1, 2]))
  ref_both = reference(list(eos_both))
  both = dataclasses.replace(model, eos_token_id=eos_both)
  tokens, steps = both.generate_ids(params, ids, features, max_new_tokens=20)
  assert int(steps) == ref_both.shape[1] < 20
  np.testing.assert_array_equal(np.asarray(tokens)[:, :int(steps)], ref_both)
  assert np.all(np.asarray(tokens)[:, int(steps):] == 0)


def test_left_padded_batch_matches_generate(tmp_path):
  """Prompts of different lengths: left padding, positions from the attention mask."""
  torch_model, path = _tiny(tmp_path, seed=3)
  model, params = fl.load(path)
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(2, 28, 28, 3)).astype(np.float32)
  features = model.image_features(params, x)
  long = [1, 11, 12, 13, 14] + [IMAGE] * 4 + [15, 16]
  short = [1, 21] + [IMAGE] * 4 + [22]
  ids = np.array([long, [0] * (len(long) - len(short)) + short])
  valid = ids != 0
  with torch.no_grad():
    ref = torch_model.generate(input_ids=torch.tensor(ids),
                               attention_mask=torch.tensor(valid.astype(np.int64)),
                               pixel_values=_pixels(x), do_sample=False, max_new_tokens=16,
                               pad_token_id=0)[:, ids.shape[1]:].numpy()
  tokens, steps = model.generate_ids(params, ids, features, valid=valid, max_new_tokens=16)
  np.testing.assert_array_equal(np.asarray(tokens)[:, :int(steps)], ref)


def test_last_only_prefill_equals_the_full_pass_at_the_last_position(tmp_path):
  """The prefill's last layer runs its query, attention and MLP on the last position only;
  its logits and the cached keys and values are the full pass's (left padding, GQA)."""
  _, path = _tiny(tmp_path, seed=4)
  model, params = fl.load(path)
  rng = np.random.default_rng(4)
  features = model.image_features(params, rng.uniform(size=(2, 28, 28, 3)).astype(np.float32))
  long = [1, 11, 12, 13, 14] + [IMAGE] * 4 + [15, 16]
  short = [1, 21] + [IMAGE] * 4 + [22]
  ids = jnp.asarray([long, [0] * (len(long) - len(short)) + short])
  valid = ids != 0
  positions = llava_model._positions(valid)  # pylint: disable=protected-access
  cfg = model.language.config.text_config
  cache = lambda: decoding.KVCache.empty(num_layers=cfg.num_hidden_layers, batch=2, capacity=16,
                                         num_kv_heads=cfg.num_key_value_heads,
                                         head_dim=cfg.head_dim)
  apply = functools.partial(model.language.apply, {"params": params["language"]}, ids, features,
                            positions, valid)
  full, full_cache = apply(cache())
  last, last_cache = apply(cache(), last_only=True)
  assert last.shape == (2, 1, full.shape[-1])
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-5,
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(last_cache), jax.tree.leaves(full_cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  no_cache, _ = apply(None, last_only=True)  # a plain causal pass
  np.testing.assert_allclose(np.asarray(no_cache[:, 0]), np.asarray(full[:, -1]), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize("head_dim,theta", [(16, 500.0), (128, 10000.0)])
def test_rotary_tables_match_transformers(head_dim, theta):
  """The gathered cos/sin tables are transformers' LlamaRotaryEmbedding at the positions."""
  config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                    rope_theta=theta, max_position_embeddings=4096)
  positions = np.array([[0, 1, 2, 3, 700], [0, 0, 5, 4094, 4095]])
  ref_cos, ref_sin = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)(
      torch.zeros(1), torch.tensor(positions))
  cos, sin = llama.rotary_tables(jnp.asarray(positions), head_dim, theta, 4096)
  assert cos.shape == sin.shape == (2, 5, 1, head_dim // 2)
  for table, ref in ((cos, ref_cos.numpy()), (sin, ref_sin.numpy())):  # ref: [B, T, D]
    np.testing.assert_array_equal(ref[..., :head_dim // 2], ref[..., head_dim // 2:])
    np.testing.assert_allclose(np.asarray(table[:, :, 0]), ref[..., :head_dim // 2], rtol=0,
                               atol=1e-6)


def test_prefill_computes_no_cosine_or_sine(tmp_path):
  """The rotary angles' cos and sin come from a table: computed in the graph, XLA:CPU fused
  them into every query's and key's rotation and recomputed them in each causal block."""
  _, path = _tiny(tmp_path, seed=5)
  model, params = fl.load(path)
  rng = np.random.default_rng(5)
  features = model.image_features(params, rng.uniform(size=(1, 28, 28, 3)).astype(np.float32))
  ids, valid = model._check_ids(  # pylint: disable=protected-access
      _prompt_ids(4, rng, batch=1), None, features, False)
  hlo = llava_model.prefill.lower(model.language, params["language"], ids, valid, features,
                                  capacity=32).compile().as_text()
  assert " cosine(" not in hlo and " sine(" not in hlo


def test_feature_injection_matches_mm_encoder_outputs(tmp_path):
  """Given the same projected features, the same logits (transformers' injection hook)."""
  torch_model, path = _tiny(tmp_path, seed=4)
  model, params = fl.load(path)
  rng = np.random.default_rng(3)
  ids = _prompt_ids(4, rng)
  projected = rng.normal(size=(2, 4, 64)).astype(np.float32)
  ours = np.asarray(model.logits(params, ids, projected, projected=True))
  injected = {"image": BaseModelOutputWithPooling(pooler_output=[torch.tensor(projected)])}
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(ids), mm_encoder_outputs=injected).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def _smoothed_reference(encoder, params, x, key, sigma, n):
  """Python loop over the n noise draws of the library's noise protocol."""
  units, norms = [], []
  tokens = jax.jit(encoder.tokens)
  for i in range(n):
    g = np.asarray(tokens(params, x + smoothing.noise(key, i, x.shape, sigma)))
    g = g.reshape(len(x), -1).astype(np.float64)
    norm = np.linalg.norm(g, axis=-1, keepdims=True)
    units.append(g / norm)
    norms.append(norm)
  f_s = np.mean(units, 0)
  return f_s / np.linalg.norm(f_s, axis=-1, keepdims=True) * np.mean(norms, 0)


def test_smoothed_path(tmp_path):
  """Smoothed features equal a plain loop over the noise; the LLM then sees exactly them
  (transformers fed the same features through its own projector and injection hook)."""
  torch_model, path = _tiny(tmp_path, seed=5)
  model, params = fl.load(path)
  rng = np.random.default_rng(4)
  x = rng.uniform(size=(2, 28, 28, 3)).astype(np.float32)
  key, sigma, n = jax.random.key(7), 0.25, 5
  smoothed, sparams = mllm.smoothed(model, params, sigma=sigma, n=n, chunk_size=2)
  assert isinstance(smoothed.encoder, smoothing.SmoothedEncoder)
  assert smoothed.encoder.base is model.encoder and sparams["language"] is params["language"]
  features = np.asarray(smoothed.image_features(sparams, x, key=key))
  ref = _smoothed_reference(model.encoder, params["vision"], x, key, sigma, n)
  np.testing.assert_allclose(features, ref.reshape(features.shape), rtol=1e-5, atol=1e-5)
  # The key travels in the params just as well; without one there is no default.
  keyed = {"vision": smoothed.encoder.with_key(sparams["vision"], key)}
  np.testing.assert_array_equal(np.asarray(smoothed.image_features(keyed, x)), features)
  with pytest.raises(ValueError, match="no noise key"):
    smoothed.image_features(sparams, x)
  # (features="raw_mean" is checked on the toy encoder: tests/fsjax/test_smoothed_encoder.py)

  ids = _prompt_ids(4, rng)
  ours = np.asarray(smoothed.logits(sparams, ids, features))
  with torch.no_grad():
    projected = torch_model.model.multi_modal_projector(torch.tensor(features))
    injected = {"image": BaseModelOutputWithPooling(pooler_output=[projected])}
    want = torch_model(input_ids=torch.tensor(ids), mm_encoder_outputs=injected).logits.numpy()
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)


def test_generate_strings_and_smoothed_generate(tmp_path):
  """The three-line API: load, generate(params, images, prompt) -> strings; smoothed too."""
  _, path = _tiny(tmp_path, seed=6)
  words = ["describe", "this", "image", "what", "is", "it"]
  tok = fl.prompt.word_level_tokenizer(words, vocab_size=128, image_token_id=IMAGE)
  tok.save_pretrained(path)
  model, params = fl.load(path)
  with_system, _ = fl.load(path, system_prompt="describe it")
  ids_system, _ = with_system.prompt_ids("what is it", batch=1, num_image_tokens=4)
  np.testing.assert_array_equal(  # BOS, the system prompt, then "USER:"
      ids_system[0, :5], [1] + tok.convert_tokens_to_ids(["describe", "it", "USER", ":"]))
  x = np.random.default_rng(5).uniform(size=(2, 28, 28, 3)).astype(np.float32)
  answers = model.generate(params, x, "describe this image", max_new_tokens=8)
  # The same answer from the ids: prompt -> ids -> tokens -> strings by hand.
  ids = np.array([[1, tok.convert_tokens_to_ids("USER"), 6] + [IMAGE] * 4
                  + [tok.convert_tokens_to_ids(w) for w in ("describe", "this", "image")]
                  + [tok.convert_tokens_to_ids("ASSISTANT"), 6]] * 2)
  tokens, _ = model.generate_ids(params, ids, model.image_features(params, x), max_new_tokens=8)
  assert answers == [tok.decode(r, skip_special_tokens=True) for r in np.asarray(tokens)]
  assert all(isinstance(a, str) and a for a in answers)

  smoothed, sparams = mllm.smoothed(model, params, sigma=0.25, n=3)
  key = jax.random.key(1)
  answers_s = smoothed.generate(sparams, x, "describe this image", max_new_tokens=8, key=key)
  tokens_s, _ = model.generate_ids(params, ids, smoothed.image_features(sparams, x, key=key),
                                   max_new_tokens=8)
  assert answers_s == [tok.decode(r, skip_special_tokens=True) for r in np.asarray(tokens_s)]


def test_param_shardings_on_a_cpu_mesh(tmp_path):
  _, path = _tiny(tmp_path, seed=7)
  model, params = fl.load(path)
  mesh = fl.make_mesh(1)
  shardings = fl.param_shardings(params, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(params)
  leaves = jax.tree.leaves(shardings)
  assert all(isinstance(s, jax.NamedSharding) and s.mesh == mesh for s in leaves)
  # On one device every leaf is replicated; a 2-way axis would split the big matrices.
  spec = fl.param_shardings(params["language"], jax.make_mesh(
      (1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,)))
  assert spec["language_model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].spec == \
      jax.P(None, "model")
  assert spec["language_model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"].spec == \
      jax.P("model", None)
  assert spec["language_model"]["norm"]["scale"].spec == jax.P()
  sharded = jax.device_put(params, shardings)
  x = np.random.default_rng(6).uniform(size=(2, 28, 28, 3)).astype(np.float32)
  features = model.image_features(sharded, x)
  ids = _prompt_ids(4, np.random.default_rng(7))
  a, _ = model.generate_ids(sharded, ids, features, max_new_tokens=6)
  b, _ = model.generate_ids(params, ids, model.image_features(params, x), max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_close_to_float32(tmp_path):
  """bf16 matmuls with float32 norms/softmax/logits: logits near the float32 ones."""
  _, path = _tiny(tmp_path, seed=8)
  model32, params = fl.load(path)
  model16, params16 = fl.load(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert params16["language"]["lm_head"]["kernel"].dtype == jnp.bfloat16
  rng = np.random.default_rng(8)
  x = rng.uniform(size=(1, 28, 28, 3)).astype(np.float32)
  ids = _prompt_ids(4, rng, batch=1)
  l32 = np.asarray(model32.logits(params, ids, model32.image_features(params, x)))
  l16 = model16.logits(params16, ids, model16.image_features(params16, x))
  assert l16.dtype == jnp.float32
  assert np.abs(np.asarray(l16) - l32).max() < 0.05 * np.abs(l32).max()


def test_bfloat16_batch_one_generate_makes_no_float32_copy_of_the_model(tmp_path):
  """On CPU a one-row bfloat16 dot, or a bfloat16 gather, was run in float32 with its
  weight converted, and the decoding loop hoisted every conversion: a float32 copy of the
  model per call (LLaVA-1.5-7B: 28 GB). Now: temporaries below the weights' own size, and
  the same greedy tokens as the float32 model on this tiny one."""
  _, path = _tiny(tmp_path, seed=9)
  model32, params32 = fl.load(path)
  model16, params16 = fl.load(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  rng = np.random.default_rng(9)
  x = rng.uniform(size=(1, 28, 28, 3)).astype(np.float32)
  ids = _prompt_ids(4, rng, batch=1)
  feats = model16.image_features(params16, x)
  tokens16, _ = model16.generate_ids(params16, ids, feats, max_new_tokens=4)
  tokens32, _ = model32.generate_ids(params32, ids, model32.image_features(params32, x),
                                     max_new_tokens=4)
  assert np.asarray(tokens16)[0, 0] == np.asarray(tokens32)[0, 0]
  ids16, valid = model16._check_ids(ids, None, feats, False)  # pylint: disable=protected-access
  compiled = llava_model._generate.lower(  # pylint: disable=protected-access
      model16.language, params16["language"], ids16, valid, feats,
      jnp.atleast_1d(jnp.int32(model16.eos_token_id)), jnp.int32(0), max_new_tokens=4,
      projected=False).compile()
  weights = sum(leaf.nbytes for leaf in jax.tree.leaves(params16["language"]))
  assert compiled.memory_analysis().temp_size_in_bytes < weights
  # The embedding rows gathered as bit patterns are nn.Embed's rows.
  language = model16.language.bind({"params": params16["language"]})
  table = params16["language"]["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(np.asarray(language.language_model.embed(jnp.asarray(ids))),
                                np.asarray(table[ids]))


def test_bad_inputs(tmp_path):
  _, path = _tiny(tmp_path, seed=9)
  model, params = fl.load(path)
  x = np.random.default_rng(9).uniform(size=(2, 28, 28, 3)).astype(np.float32)
  features = model.image_features(params, x)
  ids = _prompt_ids(3, np.random.default_rng(0))  # 3 image tokens, 4 features
  with pytest.raises(ValueError, match=r"\[3, 3\] <image> tokens .* 4 features"):
    model.logits(params, ids, features)
  with pytest.raises(ValueError, match="width 5, the projector expects 32"):
    model.logits(params, _prompt_ids(4, np.random.default_rng(0)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match="exactly one"):
    fl.prompt.tokenize(None, ["USER: hello ASSISTANT:"], num_image_tokens=4, pad_token_id=0)
  with pytest.raises(ValueError, match="contains <image>"):
    fl.format_prompt("<image> what is it")
  with pytest.raises(ValueError, match="no tokenizer"):
    model.generate(params, x, "what is it")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    model.image_features(params, x * 255)
  with pytest.raises(ValueError, match="sigma"):
    mllm.smoothed(model, params, sigma=0.0)
  with pytest.raises(ValueError, match="features='mean' must be one of"):
    mllm.smoothed(model, params, sigma=0.25, features="mean")
  with pytest.raises(ValueError, match="max_new_tokens"):
    model.generate_ids(params, _prompt_ids(4, np.random.default_rng(0)), features,
                       max_new_tokens=0)


def test_smoothed_gsb_boosted_encoder_feeds_the_language_side(toy):
  """The boosted encoder (a mapper behind the toy encoder, conditioned on sigma) through
  the smoothed path, against a plain loop; then a language side trained on its width."""
  from fsjax import gsb  # pylint: disable=g-import-not-at-top
  base, base_params = toy  # tokens [B, 1, 16]
  boosted = gsb.BoostedEncoder(base=base, mapper=gsb.SmoothnessMapper(
      num_blocks=1, num_heads=2, sigma_hidden=8, damping_init=0.5))
  vision = boosted.init_params(jax.random.key(0), base_params)
  x = np.random.default_rng(10).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  key, sigma, n = jax.random.key(3), 0.5, 4
  text = fl.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=4, pad_token_id=0)
  config = fl.LlavaConfig(text_config=text, vision_config=None, image_token_id=IMAGE,
                          vision_feature_size=16)
  plain = fl.Llava(config=config, encoder=boosted)
  model, params = mllm.smoothed(
      plain, {"vision": vision, "language": fl.init_language(config, seed=1)}, sigma=sigma, n=n)
  features = model.image_features(params, x, key=key)
  got = np.asarray(features)
  tokens = jax.jit(lambda p, y: boosted.tokens(p, y, sigma=sigma))
  units, norms = [], []
  for i in range(n):
    g = np.asarray(tokens(vision, x + smoothing.noise(key, i, x.shape, sigma)), np.float64)
    g = g.reshape(2, -1)
    units.append(g / np.linalg.norm(g, axis=-1, keepdims=True))
    norms.append(np.linalg.norm(g, axis=-1, keepdims=True))
  f_s = np.mean(units, 0)
  want = f_s / np.linalg.norm(f_s, axis=-1, keepdims=True) * np.mean(norms, 0)
  np.testing.assert_allclose(got.reshape(2, -1), want, rtol=1e-5, atol=1e-5)
  # The mapper acts: the boosted tokens are not the base encoder's.
  assert not np.allclose(tokens(vision, x), base.tokens(base_params, x), atol=1e-3)

  tokens_out, _ = model.generate_ids(params, np.array([[1, 5, IMAGE, 6]] * 2), features,
                                     max_new_tokens=4)
  assert tokens_out.shape == (2, 4)
  with pytest.raises(ValueError, match="sigma is required"):
    plain.image_features({"vision": vision}, x)
