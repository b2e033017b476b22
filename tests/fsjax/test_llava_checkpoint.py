"""fsjax.llava checkpoints: the three key layouts, sharded files, save/load round trips,
clear errors, and the 7B parameter count against transformers (meta device)."""

import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import fsjax.llava as fl
from fsjax import mllm
from fsjax import smoothing

IMAGE = 100


def _tiny_torch(seed=0, *, eps=1e-5):
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=28, patch_size=14, projection_dim=16)
  text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rms_norm_eps=eps, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_index=IMAGE)
  torch.manual_seed(seed)
  return transformers.LlavaForConditionalGeneration(config).eval()


def _flat(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _write(path, state, config_dict, *, shards=1):
  """Writes ``state`` (torch tensors) as safetensors, sharded with an index if shards > 1."""
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config_dict))
  keys = sorted(state)
  if shards == 1:
    safetensors.torch.save_file({k: state[k].contiguous() for k in keys},
                                str(path / "model.safetensors"))
    return
  weight_map = {}
  for s, part in enumerate(np.array_split(np.array(keys), shards)):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    safetensors.torch.save_file({k: state[k].contiguous() for k in part}, str(path / name))
    weight_map.update({k: name for k in part})
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_three_key_layouts_load_the_same_parameters(tmp_path):
  torch_model = _tiny_torch()
  torch_model.save_pretrained(tmp_path / "b")  # layout B: transformers-5 save_pretrained
  config = json.loads((tmp_path / "b" / "config.json").read_text())
  state_a = torch_model.state_dict()  # layout A: the in-memory names
  assert any(k.startswith("model.language_model.") for k in state_a)
  _write(tmp_path / "a", state_a, config)
  state_b = safetensors.torch.load_file(str(tmp_path / "b" / "model.safetensors"))
  assert any(k.startswith("language_model.model.") for k in state_b)
  # Layout C: the hub checkpoints' vision_tower.vision_model.*, here sharded in 3 files.
  state_c = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
             for k, v in state_b.items()}
  _write(tmp_path / "c", state_c, config, shards=3)
  _, params_a = fl.load(tmp_path / "a")
  _, params_b = fl.load(tmp_path / "b")
  _, params_c = fl.load(tmp_path / "c")
  _assert_same_params(params_a, params_b)
  _assert_same_params(params_a, params_c)
  # And the values are the torch tensors, transposed where torch stores [out, in].
  q = state_a["model.language_model.layers.1.self_attn.k_proj.weight"].numpy()
  np.testing.assert_array_equal(
      params_a["language"]["language_model"]["layers"]["1"]["self_attn"]["k_proj"]["kernel"], q.T)
  emb = state_a["model.language_model.embed_tokens.weight"].numpy()
  np.testing.assert_array_equal(
      params_a["language"]["language_model"]["embed_tokens"]["embedding"], emb)


def test_eps_and_rope_come_from_the_checkpoint(tmp_path):
  for eps in (1e-6, 1e-5):
    _tiny_torch(eps=eps).save_pretrained(tmp_path / str(eps))
    model, _ = fl.load(tmp_path / str(eps))
    assert model.config.text_config.rms_norm_eps == eps
    assert model.config.text_config.rope_theta == 10000.0


def test_save_load_round_trip_with_its_clip_tower(tmp_path):
  _tiny_torch(seed=1).save_pretrained(tmp_path / "orig")
  model, params = fl.load(tmp_path / "orig")
  fl.save(tmp_path / "copy", model, params)
  model2, params2 = fl.load(tmp_path / "copy")
  _assert_same_params(params, params2)
  assert model2.config == model.config
  # transformers reads what we wrote, to the same tensors.
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "copy")
  original = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "orig")
  sa, sb = original.state_dict(), reloaded.state_dict()
  assert sorted(sa) == sorted(sb)
  for k in sa:
    torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_external_encoder_round_trip_without_vision_tensors(tmp_path, toy):
  """A language side trained on another encoder: no vision tensors, vision_config null."""
  encoder, encoder_params = toy  # tokens [B, 1, 16]
  text = fl.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, pad_token_id=0)
  config = fl.LlavaConfig(text_config=text, vision_config=None, image_token_id=IMAGE)
  language = fl.init_language(config, feature_size=16, seed=3)
  model = fl.Llava(config=config, encoder=encoder)
  params = {"vision": encoder_params, "language": language}
  fl.save(tmp_path / "ext", model, params)
  written = json.loads((tmp_path / "ext" / "config.json").read_text())
  assert written["vision_config"] is None and written["mm_hidden_size"] == 16
  state = safetensors.torch.load_file(str(tmp_path / "ext" / "model.safetensors"))
  assert not any(k.startswith("vision_tower") for k in state)
  assert state["language_model.model.layers.0.mlp.up_proj.weight"].shape == (128, 64)

  with pytest.raises(ValueError, match="pass encoder= and encoder_params="):
    fl.load(tmp_path / "ext")
  model2, params2 = fl.load(tmp_path / "ext", encoder=encoder, encoder_params=encoder_params)
  _assert_same_params(params2["language"], language)
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  features = model2.image_features(params2, x)
  assert features.shape == (2, 1, 16)  # T and D from the encoder
  ids = np.array([[1, 7, IMAGE, 8, 9]] * 2)
  a, _ = model.generate_ids(params, ids, features, max_new_tokens=5)
  b, _ = model2.generate_ids(params2, ids, features, max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clip_checkpoint_with_a_supplied_encoder_ignores_its_tower(tmp_path):
  """The checkpoint's projector fits any encoder of the same width (a FARE-like swap)."""
  _tiny_torch(seed=2).save_pretrained(tmp_path / "m")
  model, params = fl.load(tmp_path / "m")
  swapped, params2 = fl.load(tmp_path / "m", encoder=model.encoder,
                             encoder_params=params["vision"])
  _assert_same_params(params, params2)


def test_errors_list_every_problem(tmp_path):
  torch_model = _tiny_torch()
  torch_model.save_pretrained(tmp_path / "b")
  config = json.loads((tmp_path / "b" / "config.json").read_text())
  state = dict(torch_model.state_dict())
  del state["model.language_model.layers.1.mlp.gate_proj.weight"]
  state["model.multi_modal_projector.linear_1.weight"] = torch.zeros(64, 31)
  state["model.vision_tower.encoder.layers.0.mlp.fc9.weight"] = torch.zeros(3, 3)
  _write(tmp_path / "bad", state, config)
  with pytest.raises(ValueError) as err:
    fl.load(tmp_path / "bad")
  msg = str(err.value)
  assert "3 problem(s)" in msg
  assert "missing    language_model/layers/1/mlp/gate_proj/kernel" in msg
  assert "mis-shaped multi_modal_projector/linear_1/kernel: expected (32, 64)" in msg
  assert "unexpected vision_model/encoder/layers/0/mlp/fc9/kernel" in msg


def test_other_architecture_and_missing_files(tmp_path):
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2))
  llama.save_pretrained(tmp_path / "llama")
  with pytest.raises(ValueError, match="model_type='llama'.*LLaVA checkpoints"):
    fl.load(tmp_path / "llama")
  with pytest.raises(ValueError, match="does not exist"):
    fl.load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="config.json"):
    fl.load(tmp_path / "empty")


def test_7b_parameter_count_matches_transformers():
  """llava-hf/llava-1.5-7b-hf's config (mllm-facts.md), counted without weights."""
  hf = dict(model_type="llava", image_token_index=32000, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            text_config=dict(model_type="llama", max_position_embeddings=4096,
                             rms_norm_eps=1e-5, vocab_size=32064),
            vision_config=dict(model_type="clip_vision_model", hidden_size=1024,
                               image_size=336, intermediate_size=4096, num_attention_heads=16,
                               num_hidden_layers=24, patch_size=14, projection_dim=768))
  with torch.device("meta"):
    ref = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**{
        k: v for k, v in hf.items() if k != "model_type"}))
  want = sum(p.numel() for p in ref.parameters())
  config = fl.LlavaConfig.from_hf_dict(hf)
  encoder = fl.clip_tower_encoder(config)
  vision = jax.eval_shape(encoder.model.init, jax.random.key(0),
                          jnp.zeros((1, 336, 336, 3)))["params"]["vision_model"]
  language = fl.language_param_shapes(config)
  got = sum(int(np.prod(l.shape)) for l in jax.tree.leaves((vision, language)))
  assert got == want
  assert 7.0e9 < got < 7.1e9


def test_configs_build():
  """configs/llava_tiny.py builds and answers; llava15_7b's variants pick the paper's towers."""
  from configs import llava15_7b, llava_tiny  # pylint: disable=g-import-not-at-top
  model, params = fl.build(llava_tiny.get_config())
  x = np.random.default_rng(0).uniform(size=(2, 40, 30, 3)).astype(np.float32)
  answers = model.generate(params, x, "describe this image", max_new_tokens=4)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  assert not isinstance(model.encoder, smoothing.SmoothedEncoder)
  # The registry builds the same model; config.smoothing smooths it in one place.
  config = llava_tiny.get_config("smoothed")
  built, built_params = mllm.build(config)
  assert isinstance(built, fl.Llava) and set(built_params) == {"vision", "language"}
  smoothed, _ = mllm.smoothed(built, built_params, **config.smoothing)
  encoder = smoothed.encoder
  assert isinstance(encoder, smoothing.SmoothedEncoder) and encoder.base is built.encoder
  assert (encoder.sigma, encoder.n, encoder.features, encoder.chunk_size) == (
      0.25, 4, "direction", 4)

  clip = llava15_7b.get_config()
  assert clip.encoder.checkpoint is None and clip.smoothing.n == 0
  assert clip.llava.dtype == "bfloat16"
  fare = llava15_7b.get_config("tower=fare,smoothed,sigma=0.5")
  assert (fare.encoder.resolution, fare.encoder.layer, fare.encoder.feature) == (
      224, -2, "patch_tokens")
  assert (fare.smoothing.n, fare.smoothing.sigma) == (8, 0.5)
  assert "10. shark" in fare.prompts.classification
  with pytest.raises(ValueError, match="tower="):
    llava15_7b.get_config("tower=siglip")
  missing = llava15_7b.get_config()
  missing.llava.checkpoint = "/nonexistent/llava"
  with pytest.raises(ValueError, match="does not exist"):
    fl.build(missing)


def _openclip_visual(path, *, width=64, layers=2, image=224, patch=14, seed=0):
  """A random OpenCLIP ``model.visual`` state dict (how FARE/TeCoA are released)."""
  g = torch.Generator().manual_seed(seed)
  r = lambda *s: 0.02 * torch.randn(*s, generator=g)
  state = {"conv1.weight": r(width, 3, patch, patch), "class_embedding": r(width),
           "positional_embedding": r((image // patch) ** 2 + 1, width),
           "ln_pre.weight": 1 + r(width), "ln_pre.bias": r(width),
           "ln_post.weight": 1 + r(width), "ln_post.bias": r(width), "proj": r(width, 32)}
  for i in range(layers):
    p = f"transformer.resblocks.{i}."
    state |= {p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
              p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
              p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
              p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
              p + "mlp.c_fc.weight": r(2 * width, width), p + "mlp.c_fc.bias": r(2 * width),
              p + "mlp.c_proj.weight": r(width, 2 * width), p + "mlp.c_proj.bias": r(width)}
  safetensors.torch.save_file(state, str(path))


def test_fare_like_openclip_tower_at_224px(tmp_path):
  """configs: a robust OpenCLIP tower at 224 px, layer -2, CLS dropped -> 256 tokens."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import llava_tiny  # pylint: disable=g-import-not-at-top
  from transformers.modeling_outputs import BaseModelOutputWithPooling  # pylint: disable=g-import-not-at-top
  vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=1,
                                         image_size=28, patch_size=14)
  text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0)
  torch.manual_seed(0)
  torch_model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=IMAGE)).eval()
  torch_model.save_pretrained(tmp_path / "llava")
  _openclip_visual(tmp_path / "fare.safetensors")
  config = llava_tiny.get_config()
  config.llava.checkpoint = str(tmp_path / "llava")
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip", checkpoint=str(tmp_path / "fare.safetensors"), feature="patch_tokens",
      layer=-2, resolution=224))
  model, params = fl.build(config)
  assert model.encoder.resolution == 224 and model.encoder.layer == -2
  x = np.random.default_rng(0).uniform(size=(2, 300, 260, 3)).astype(np.float32)
  features = model.image_features(params, x)
  assert features.shape == (2, 256, 64)  # 16 x 16 patches, CLS dropped
  ids = np.array([[1, 5] + [IMAGE] * 256 + [6, 7]] * 2)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model.logits(params, ids, features))
  with torch.no_grad():
    projected = torch_model.model.multi_modal_projector(torch.tensor(np.asarray(features)))
    want = torch_model(input_ids=torch.tensor(ids), mm_encoder_outputs={
        "image": BaseModelOutputWithPooling(pooler_output=[projected])}).logits.numpy()
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)
