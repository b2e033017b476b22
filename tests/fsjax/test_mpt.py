"""fsjax.flamingo.mpt against transformers' MptForCausalLM (the oracle) on tiny random models."""

import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from fsjax import flamingo
from fsjax.flamingo import mpt

VOCAB = 130


def _random_mpt(tmp_path, *, n_heads=4, d_model=64, seed=0, scale=0.15, max_seq_len=64):
  """A tiny MptForCausalLM with large random weights (so greedy tokens vary), saved to disk."""
  torch.manual_seed(seed)
  config = transformers.MptConfig(d_model=d_model, n_heads=n_heads, n_layers=3,
                                  expansion_ratio=4, vocab_size=VOCAB, max_seq_len=max_seq_len,
                                  no_bias=True)
  model = transformers.MptForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, scale)
  model.save_pretrained(tmp_path)
  return model


def _prompt(seed=1):
  """Two prompts, the first left-padded by 3."""
  ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
  mask = torch.ones(2, 9, dtype=torch.long)
  mask[0, :3] = 0
  return ids, mask


@pytest.mark.parametrize("n_heads,d_model", [(4, 64), (6, 48)])  # 6: interleaved ALiBi slopes
def test_logits_match_transformers(tmp_path, n_heads, d_model):
  ref_model = _random_mpt(tmp_path, n_heads=n_heads, d_model=d_model)
  model, params = flamingo.load_mpt(tmp_path)
  ids, mask = _prompt()
  with torch.no_grad():
    ref = ref_model(input_ids=ids, attention_mask=mask).logits.numpy()
  out, _ = jax.jit(model.apply)({"params": params}, ids.numpy(), valid=mask.numpy() > 0)
  out = np.asarray(out)
  np.testing.assert_allclose(out[1], ref[1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, 3:], ref[0, 3:], atol=1e-5, rtol=0)  # not the pad rows


def test_long_prompt_prefill_matches_transformers(tmp_path):
  """270 tokens: the prefill attends in three causal blocks, with the ALiBi bias of each
  head (6 heads: interleaved slopes) and left padding."""
  ref_model = _random_mpt(tmp_path, n_heads=6, d_model=48, max_seq_len=300, scale=0.05)
  model, params = flamingo.load_mpt(tmp_path)
  ids = torch.randint(0, VOCAB, (2, 270), generator=torch.Generator().manual_seed(2))
  mask = torch.ones(2, 270, dtype=torch.long)
  mask[0, :7] = 0
  with torch.no_grad():
    ref = ref_model(input_ids=ids, attention_mask=mask).logits.numpy()
  out, _ = jax.jit(model.apply)({"params": params}, ids.numpy(), valid=mask.numpy() > 0)
  out = np.asarray(out)
  np.testing.assert_allclose(out[1], ref[1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, 7:], ref[0, 7:], atol=1e-5, rtol=0)


def test_cached_steps_equal_full_forward(tmp_path):
  """Prefill 6 tokens, then 3 single-token steps: the logits of one transformers pass."""
  ref_model = _random_mpt(tmp_path)
  model, params = flamingo.load_mpt(tmp_path)
  ids, mask = _prompt(seed=2)
  with torch.no_grad():
    ref = ref_model(input_ids=ids, attention_mask=mask).logits.numpy()
  cache = mpt.empty_cache(model.config, batch=2, capacity=12)
  valid = mask.numpy() > 0
  outs = []
  forward = jax.jit(model.apply)
  for lo, hi in [(0, 6), (6, 7), (7, 8), (8, 9)]:
    out, cache = forward({"params": params}, ids.numpy()[:, lo:hi], cache=cache,
                         valid=valid[:, lo:hi])
    outs.append(np.asarray(out))
  out = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(out[1], ref[1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, 3:], ref[0, 3:], atol=1e-5, rtol=0)
  assert int(cache.index) == 9


def test_greedy_generation_equals_transformers_generate(tmp_path):
  ref_model = _random_mpt(tmp_path)
  model, params = flamingo.load_mpt(tmp_path)
  ids, mask = _prompt(seed=3)
  with torch.no_grad():
    free = ref_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                              do_sample=False, eos_token_id=VOCAB - 1, pad_token_id=0)
  eos = int(free[0, 9 + 4])  # row 0's 5th token as EOS: row 0 stops early, row 1 goes on
  with torch.no_grad():
    ref = ref_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 9:].numpy()
  tokens, num_steps = mpt.generate(model, params, ids.numpy(), mask.numpy(), max_new_tokens=12,
                                   eos_token_id=eos, pad_token_id=0)
  assert len(set(ref[1].tolist())) > 2  # the random model does not just repeat one token
  assert int(num_steps) == ref.shape[1]
  np.testing.assert_array_equal(np.asarray(tokens)[:, :ref.shape[1]], ref)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_bfloat16_shards_load(tmp_path, fmt):
  """MPT-7B ships bf16 ``pytorch_model-0000N-of-0000M.bin`` shards + index (read with the
  restricted unpickler, no torch.load); converted copies hold bf16 safetensors shards.
  Both match the oracle on the same (bf16-rounded) weights."""
  ref_model = _random_mpt(tmp_path / "ref")
  state = {k: v.to(torch.bfloat16) for k, v in ref_model.state_dict().items()
           if k != "lm_head.weight"}
  names = sorted(state)
  ext = ".bin" if fmt == "bin" else ".safetensors"
  prefix = "pytorch_model" if fmt == "bin" else "model"
  shards = {f"{prefix}-00001-of-00002{ext}": names[:len(names) // 2],
            f"{prefix}-00002-of-00002{ext}": names[len(names) // 2:]}
  folder = tmp_path / fmt
  folder.mkdir()
  for file, keys in shards.items():
    part = {k: state[k].contiguous() for k in keys}
    if fmt == "bin":
      torch.save(part, folder / file)
    else:
      safetensors.torch.save_file(part, folder / file)
  (folder / f"{prefix}{ext}.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  (folder / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
  model, params = flamingo.load_mpt(folder)
  with torch.no_grad():
    ref_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    ids, mask = _prompt()
    ref = ref_model(input_ids=ids, attention_mask=mask).logits.numpy()
  out, _ = jax.jit(model.apply)({"params": params}, ids.numpy(), valid=mask.numpy() > 0)
  np.testing.assert_allclose(np.asarray(out)[1], ref[1], atol=1e-5, rtol=0)


def test_alibi_slopes_closed_form():
  np.testing.assert_allclose(mpt.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  # 6 heads: the 8-head slopes 2^(-1..-8), odd positions first, then even, first six.
  np.testing.assert_allclose(mpt.alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]))


def test_config_errors():
  with pytest.raises(ValueError, match="alibi=False"):
    mpt.MPTConfig.from_hf_dict({"d_model": 64, "n_heads": 4, "attn_config": {"alibi": False}})
  with pytest.raises(ValueError, match="no_bias=False"):
    mpt.MPTConfig.from_hf_dict({"d_model": 64, "n_heads": 4, "no_bias": False})
  remote = {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
            "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True,
            "logit_scale": None, "attn_config": {"alibi": True, "alibi_bias_max": 8,
                                                 "clip_qkv": None, "qk_ln": False,
                                                 "softmax_scale": None}}
  assert mpt.MPTConfig.from_hf_dict(remote) == mpt.MPTConfig()  # MPT-7B's remote-code config


def test_prompt_errors(tmp_path):
  _random_mpt(tmp_path)
  model, params = flamingo.load_mpt(tmp_path)
  ids, mask = _prompt()
  right_padded = np.flip(mask.numpy(), axis=1)
  with pytest.raises(ValueError, match="pad prompts on the left"):
    mpt.generate(model, params, ids.numpy(), right_padded, max_new_tokens=2, eos_token_id=1,
                 pad_token_id=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    mpt.generate(model, params, ids.numpy(), mask.numpy(), max_new_tokens=60, eos_token_id=1,
                 pad_token_id=0)
