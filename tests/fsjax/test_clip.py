"""Tests of fsjax.clip against the transformers PyTorch CLIP (the oracle), on tiny models."""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import string
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from fsjax import encoders
import fsjax.clip as clip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
VOCAB = 60  # the tiny tokenizer below has 60 tokens: bos = 58, eos = 59 (the last id)
TEXT = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=29, num_hidden_layers=2,
            num_attention_heads=3, max_position_embeddings=16, bos_token_id=58,
            eos_token_id=59, pad_token_id=59)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
TOL = 1e-4


def _perturb(model, seed):
  """HF's init is ~N(0, 0.02): outputs would be tiny and parity vacuous. Make them O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _write_tokenizer(directory):
  """A CLIP BPE vocabulary small enough to write by hand (vocab.json + merges.txt)."""
  chars = list(string.ascii_lowercase) + ["."]
  tokens = chars + [c + "</w>" for c in chars] + ["ph", "pho", "phot", "photo</w>"]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  assert len(tokens) == VOCAB
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\np h\nph o\npho t\nphot o</w>\n")


def _flax_tree_from_torch(hf):
  """The HF Flax tree, built by module type (independent of fsjax's name-based converter)."""
  tree = {}
  for name, mod in hf.named_modules():
    if isinstance(mod, torch.nn.Linear):
      leaf = {"kernel": mod.weight.T}
      if mod.bias is not None:
        leaf["bias"] = mod.bias
    elif isinstance(mod, torch.nn.LayerNorm):
      leaf = {"scale": mod.weight, "bias": mod.bias}
    elif isinstance(mod, torch.nn.Embedding):
      leaf = {"embedding": mod.weight}
    elif isinstance(mod, torch.nn.Conv2d):
      leaf = {"kernel": mod.weight.permute(2, 3, 1, 0)}
    else:
      continue
    node = tree
    for part in name.split("."):
      node = node.setdefault(part, {})
    node.update({k: v.detach().numpy().copy() for k, v in leaf.items()})
  tree["vision_model"]["embeddings"]["class_embedding"] = (
      hf.vision_model.embeddings.class_embedding.detach().numpy())
  if hasattr(hf, "logit_scale"):
    tree["logit_scale"] = hf.logit_scale.detach().numpy()
  return tree


def _openclip_state_dict(hf):
  """An OpenCLIP-format state dict with the tensors of an HF CLIPModel."""
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  out = {}

  def tower(src, dst):
    for i in range(len(getattr(hf, src).encoder.layers)):
      s, d = f"{src}.encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
      for part in ("weight", "bias"):
        out[d + f"attn.in_proj_{part}"] = np.concatenate(
            [sd[s + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2")):
          out[d + f"{a}.{part}"] = sd[s + f"{b}.{part}"]

  tower("vision_model", "visual.")
  tower("text_model", "")
  e = "vision_model.embeddings."
  out["visual.class_embedding"] = sd[e + "class_embedding"]
  out["visual.positional_embedding"] = sd[e + "position_embedding.weight"]
  out["visual.conv1.weight"] = sd[e + "patch_embedding.weight"]
  out["visual.proj"] = sd["visual_projection.weight"].T  # OpenCLIP: x @ proj, [width, out]
  out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
  out["text_projection"] = sd["text_projection.weight"].T
  out["logit_scale"] = sd["logit_scale"]
  for part in ("weight", "bias"):
    out[f"visual.ln_pre.{part}"] = sd[f"vision_model.pre_layrnorm.{part}"]
    out[f"visual.ln_post.{part}"] = sd[f"vision_model.post_layernorm.{part}"]
    out[f"ln_final.{part}"] = sd[f"text_model.final_layer_norm.{part}"]
  out["attn_mask"] = np.triu(np.full((16, 16), -np.inf, np.float32), 1)  # a buffer: ignored
  return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # keeps 0-d


@pytest.fixture(scope="module")
def hf():
  """A tiny random HF CLIPModel, its checkpoint in four formats, and its reference outputs."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
  model = _perturb(transformers.CLIPModel(config), seed=1)
  return model


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  # Row 0 is right-padded with eos (as CLIPTokenizer pads), row 1 is full length.
  ids = np.array([[58, 5, 7, 59, 59, 59, 59], [58, 3, 4, 9, 11, 12, 59]], np.int64)
  mask = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], np.int64)
  return pixels, ids, mask


def _reference(model, pixels, ids=None, mask=None):
  """HF outputs: (image embeds, text embeds, vision hidden states) as numpy."""
  with torch.no_grad():
    vision = model.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                output_hidden_states=True)
    image = model.visual_projection(vision.pooler_output).numpy()
    text = None
    if ids is not None:
      pooled = model.text_model(torch.from_numpy(ids), torch.from_numpy(mask)).pooler_output
      text = model.text_projection(pooled).numpy()
  return image, text, [h.numpy() for h in vision.hidden_states]


@pytest.fixture(scope="module")
def checkpoints(hf, tmp_path_factory):
  root = tmp_path_factory.mktemp("clip")
  dirs = {name: str(root / name) for name in ("safetensors", "sharded", "msgpack", "bin")}
  hf.save_pretrained(dirs["safetensors"], safe_serialization=True)
  hf.save_pretrained(dirs["sharded"], safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(os.path.join(dirs["sharded"], "model.safetensors.index.json"))
  for name in ("msgpack", "bin"):
    os.makedirs(dirs[name])
    shutil.copy(os.path.join(dirs["safetensors"], "config.json"), dirs[name])
  with open(os.path.join(dirs["msgpack"], "flax_model.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(_flax_tree_from_torch(hf)))
  torch.save(hf.state_dict(), os.path.join(dirs["bin"], "pytorch_model.bin"))
  _write_tokenizer(dirs["safetensors"])
  return dirs


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "msgpack", "bin"])
def test_parity_with_transformers(hf, inputs, checkpoints, fmt):
  pixels, ids, mask = inputs
  image_ref, text_ref, hidden_ref = _reference(hf, pixels, ids, mask)
  model, params = clip.load(checkpoints[fmt])
  v = {"params": params}
  assert _max_diff(model.apply(v, pixels, method="encode_image"), image_ref) <= TOL
  assert _max_diff(model.apply(v, ids, mask, method="encode_text"), text_ref) <= TOL
  hidden = model.apply(v, pixels, method="vision_hidden_states")
  assert len(hidden) == len(hidden_ref) == VISION["num_hidden_layers"] + 1
  for h, r in zip(hidden, hidden_ref):
    assert h.shape == r.shape == (2, 17, 32)
    assert _max_diff(h, r) <= TOL
  # Stopping early computes the same prefix.
  early = model.apply(v, pixels, num_layers=1, method="vision_hidden_states")
  assert len(early) == 2 and _max_diff(early[1], hidden_ref[1]) <= TOL
  np.testing.assert_allclose(params["logit_scale"], hf.logit_scale.item(), rtol=1e-6)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("eos", [2, 30])
def test_text_pooling_rules(hf, checkpoints, eos):
  # eos == 2: legacy rule, pool at the highest id; otherwise at the first eos, even when a
  # higher id follows. The ids are chosen so that the two rules pick different positions.
  model, params = clip.load(checkpoints["safetensors"])
  text = dataclasses.replace(model.config.text_config, eos_token_id=eos)
  model = clip.CLIP(dataclasses.replace(model.config, text_config=text))
  ids = np.array([[58, 2, 30, 45, 9, 1], [58, 30, 2, 3, 57, 4]], np.int64)
  mask = np.ones_like(ids)
  hf.text_model.eos_token_id = eos
  try:
    _, ref, _ = _reference(hf, np.zeros((1, 32, 32, 3), np.float32), ids, mask)
  finally:
    hf.text_model.eos_token_id = TEXT["eos_token_id"]
  assert _max_diff(model.apply({"params": params}, ids, mask, method="encode_text"), ref) <= TOL


def test_vision_only_parity(inputs, tmp_path):
  config = transformers.CLIPVisionConfig(**VISION, projection_dim=12, hidden_act="gelu")
  torch.manual_seed(0)
  hf_vision = _perturb(transformers.CLIPVisionModelWithProjection(config), seed=2)
  hf_vision.save_pretrained(tmp_path, safe_serialization=True)
  pixels = inputs[0]
  with torch.no_grad():
    out = hf_vision(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  model, params = clip.load(tmp_path)
  assert set(params) == {"vision_model", "visual_projection"}
  v = {"params": params}
  assert _max_diff(model.apply(v, pixels, method="encode_image"), out.image_embeds) <= TOL
  for h, r in zip(model.apply(v, pixels, method="vision_hidden_states"), out.hidden_states,
                  strict=True):
    assert _max_diff(h, r) <= TOL
  with pytest.raises(ValueError, match="vision-only"):
    model.apply(v, inputs[1], inputs[2], method="encode_text")


def test_long_sequence_parity(tmp_path):
  """257 tokens (16 x 16 patches and CLS): on CPU the attention runs one (image, head) at a
  time (matmul.attention); every hidden state is still transformers'."""
  config = transformers.CLIPVisionConfig(**dict(VISION, image_size=64, patch_size=4),
                                         projection_dim=12)
  torch.manual_seed(0)
  hf_vision = _perturb(transformers.CLIPVisionModelWithProjection(config), seed=3)
  hf_vision.save_pretrained(tmp_path, safe_serialization=True)
  pixels = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    out = hf_vision(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  model, params = clip.load(tmp_path)
  hidden = functools.partial(model.apply, method="vision_hidden_states")
  assert out.hidden_states[0].shape[1] == 257
  for h, r in zip(hidden({"params": params}, pixels), out.hidden_states, strict=True):
    assert _max_diff(h, r) <= TOL
  assert _max_diff(model.apply({"params": params}, pixels, method="encode_image"),
                   out.image_embeds) <= TOL
  hlo = jax.jit(hidden).lower({"params": params}, pixels).compile().as_text()
  assert (" while(" in hlo) == (jax.default_backend() == "cpu")


def test_openclip_format(hf, inputs, tmp_path):
  pixels, ids, mask = inputs
  image_ref, text_ref, hidden_ref = _reference(hf, pixels, ids, mask)
  sd = _openclip_state_dict(hf)
  path = str(tmp_path / "openclip.safetensors")
  safetensors.numpy.save_file(sd, path)
  # Tiny heads are 8 wide (OpenCLIP's are 64); the activation is OpenAI's quick_gelu.
  model, params = clip.load(path, openclip_head_width=8)
  assert model.config.vision_config.num_attention_heads == 4
  assert model.config.text_config.num_attention_heads == 3
  v = {"params": params}
  assert _max_diff(model.apply(v, pixels, method="encode_image"), image_ref) <= TOL
  assert _max_diff(model.apply(v, ids, mask, method="encode_text"), text_ref) <= TOL
  hidden = model.apply(v, pixels, method="vision_hidden_states")
  assert _max_diff(hidden[-2], hidden_ref[-2]) <= TOL

  # FARE/TeCoA-style: the bare `model.visual` state dict, pickled, under a DDP prefix.
  visual = {"module." + k[len("visual."):]: torch.from_numpy(v) for k, v in sd.items()
            if k.startswith("visual.")}
  pt = str(tmp_path / "fare.pt")
  torch.save({"state_dict": visual}, pt)
  model, params = clip.load(pt, openclip_head_width=8)
  assert model.config.text_config is None
  image = model.apply({"params": params}, pixels, method="encode_image")
  assert _max_diff(image, image_ref) <= TOL


def test_vit_l14_parameter_count():
  config = clip.CLIPConfig.from_hf_dict(dict(
      model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
      num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224,
      projection_dim=768))
  shapes = clip.model.param_shapes(clip.CLIP(config))
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert count(shapes["vision_model"]) == 303_179_776
  assert count(shapes["visual_projection"]) == 786_432


def _primitive_dtypes(jaxpr, name):
  """Input dtypes of every `name` primitive in a jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn.invars[0].aval.dtype)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _primitive_dtypes(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _primitive_dtypes(sub, name)
  return found


def test_bfloat16_compute(checkpoints, inputs):
  pixels = inputs[0]
  model32, params = clip.load(checkpoints["safetensors"])
  model16, params16 = clip.load(checkpoints["safetensors"], dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  z32 = model32.apply({"params": params}, pixels, method="encode_image")
  z16 = model16.apply({"params": params16}, pixels, method="encode_image")
  assert z16.dtype == jnp.bfloat16
  assert _max_diff(z16, z32) <= 0.05 * float(jnp.max(jnp.abs(z32)))
  jaxpr = jax.make_jaxpr(lambda p, x: model16.apply({"params": p}, x, method="encode_image"))(
      params16, pixels).jaxpr
  # Softmax (the only exp) and LayerNorm (rsqrt) in float32; the matmuls in bfloat16.
  assert _primitive_dtypes(jaxpr, "exp") and set(_primitive_dtypes(jaxpr, "exp")) == {
      jnp.dtype(jnp.float32)}
  assert set(_primitive_dtypes(jaxpr, "rsqrt")) == {jnp.dtype(jnp.float32)}
  assert jnp.dtype(jnp.bfloat16) in set(_primitive_dtypes(jaxpr, "dot_general"))


def test_encode_image_runs_only_the_cls_token_through_the_last_layer(hf, checkpoints):
  """encode_image skips the last layer's patch tokens; vision_hidden_states keeps them all.

  Oracle: transformers' CLIP vision tower (its projected pooled embedding and its full
  last hidden state); the saving is checked against an analytic FLOP count of the skipped work.
  """
  model, params = clip.load(checkpoints["safetensors"])
  cfg = model.config.vision_config
  pixels = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  image_ref, _, hidden_ref = _reference(hf, pixels)
  variables = {"params": params}
  encode = lambda x: model.apply(variables, x, method="encode_image")
  assert _max_diff(encode(pixels), image_ref) <= TOL
  states = model.apply(variables, pixels, method="vision_hidden_states")
  assert states[-1].shape == (2, cfg.num_patches + 1, cfg.hidden_size)  # unchanged
  assert _max_diff(states[-1], hidden_ref[-1]) <= TOL
  # The full last layer, minus its CLS row, is what encode_image no longer computes:
  # queries, attention output, out_proj, residual and MLP of num_patches tokens.
  d, m, t, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_patches + 1, cfg.num_patches
  skipped = 2 * p * (d * d + 2 * t * d + d * d + 2 * d * m)  # per image, 2 FLOPs per MAC
  def flops(f):
    cost = jax.jit(f).lower(pixels[:1]).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  full = flops(lambda x: model.apply(variables, x, method="vision_hidden_states")[-1])
  assert full - flops(encode) >= 0.9 * skipped


def test_loader_errors(checkpoints, tmp_path, monkeypatch):
  src = checkpoints["safetensors"]
  sd = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
  sd[fc1] = np.zeros((38, 32), np.float32)  # expected [37, 32] in torch layout
  del sd["text_model.final_layer_norm.bias"]
  sd["vision_model.extra.weight"] = np.zeros((3, 2), np.float32)
  bad = tmp_path / "bad"
  bad.mkdir()
  shutil.copy(os.path.join(src, "config.json"), bad)
  safetensors.numpy.save_file(sd, str(bad / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    clip.load(bad)
  msg = str(err.value)
  assert "3 problem(s)" in msg
  assert ("vision_model/encoder/layers/0/mlp/fc1/kernel: expected (32, 37), found (32, 38) "
          f"(from '{fc1}' of shape (38, 32))") in msg
  assert "missing    text_model/final_layer_norm/bias: expected (24,)" in msg
  assert "unexpected vision_model/extra/kernel: expected nothing, found (2, 3)" in msg

  with pytest.raises(ValueError, match="does not exist"):
    clip.load(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="none of the weight files"):
    clip.load(_only_config(src, tmp_path))
  with pytest.raises(ValueError, match="need their config"):
    clip.load(os.path.join(src, "model.safetensors"))
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ValueError, match="needs torch.*safetensors"):
    clip.load(checkpoints["bin"])


def _only_config(src, tmp_path):
  d = tmp_path / "config_only"
  d.mkdir()
  shutil.copy(os.path.join(src, "config.json"), d)
  return d


def test_hf_cache_folder(checkpoints, tmp_path):
  repo = tmp_path / "models--org--tiny-clip"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text("abc123")
  shutil.copytree(checkpoints["safetensors"], repo / "snapshots" / "abc123")
  model, _ = clip.load(repo)
  assert model.config.vision_config.image_size == 32


def test_clip_encoder_features_match_transformers(hf, checkpoints):
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  normalised = (x - np.array(clip.CLIP_MEAN, np.float32)) / np.array(clip.CLIP_STD, np.float32)
  image_ref, _, hidden_ref = _reference(hf, normalised.astype(np.float32))
  model, params = clip.load(checkpoints["safetensors"])
  cases = {"pooled": image_ref[:, None], "tokens": hidden_ref[1],
           "patch_tokens": hidden_ref[-2][:, 1:]}
  layers = {"pooled": -1, "tokens": 1, "patch_tokens": -2}
  for feature, ref in cases.items():
    enc = clip.ClipEncoder(resolution=32, model=model, feature=feature, layer=layers[feature])
    tokens = jax.jit(enc.tokens)(params, x)
    assert tokens.dtype == jnp.float32 and tokens.shape == ref.shape
    assert _max_diff(tokens, ref) <= TOL
    f = enc(params, x)
    assert f.shape == (2, math.prod(ref.shape[1:]))
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-5)


def test_build_clip_tiny():
  config = _load_config("clip_tiny")
  enc, params = encoders.build(config.encoder)
  assert isinstance(enc, clip.ClipEncoder) and enc.resolution == 32
  x = np.random.default_rng(0).uniform(size=(3, 40, 48, 3)).astype(np.float32)  # resized inside
  f = jax.jit(enc)(params, x)
  assert f.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-5)
  config.encoder.update(feature="patch_tokens", layer=-2, dtype="bfloat16")
  enc, params = encoders.build(config.encoder)
  assert jax.eval_shape(enc.tokens, params, x).shape == (3, 16, 32)


def test_build_errors(checkpoints, monkeypatch, tmp_path):
  def build(**overrides):
    config = _load_config("clip_tiny")
    for key, value in overrides.items():
      config.encoder[key] = value
    return encoders.build(config.encoder)

  with pytest.raises(ValueError, match="feature='cls'"):
    build(feature="cls")
  with pytest.raises(ValueError, match="layer=3 is out of range"):
    build(feature="tokens", layer=3)
  with pytest.raises(ValueError, match="resolution=64 differs"):
    build(resolution=64)
  with pytest.raises(ValueError, match="dtype='float16'"):
    build(dtype="float16")
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    build(architecture=dict(_load_config("clip_tiny").encoder.architecture, hidden_act="relu"))
  with pytest.raises(ValueError, match="intermediate_size: config 64 vs checkpoint 37"):
    build(checkpoint=checkpoints["safetensors"])  # clip_tiny's architecture is not VISION's
  enc, _ = build(checkpoint=checkpoints["safetensors"], architecture=None, resolution=None)
  assert enc.resolution == 32
  monkeypatch.setenv("FSJAX_CLIP_L14", str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="checkpoint=.*missing.*does not exist"):
    encoders.build(_load_config("clip_l14").encoder)
  with pytest.raises(ValueError, match="vision_config.num_hidden_layers: config 3 vs checkpoint 2"):
    build(checkpoint=checkpoints["safetensors"], resolution=None,
          architecture=dict(vision_config=dict(num_hidden_layers=3)))
  llava = _load_config("clip_l14_336").encoder
  assert (llava.feature, llava.layer, llava.resolution) == ("patch_tokens", -2, 336)


def test_text_prototypes(hf, checkpoints):
  model, params = clip.load(checkpoints["safetensors"])
  classes, templates = ["cat", "dog", "photo"], ("a photo of a {}.", "a {}.")
  protos = clip.text_prototypes(model, params, checkpoints["safetensors"], classes,
                                templates=templates)
  assert protos.shape == (3, 16) and protos.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(protos, axis=-1), 1.0, rtol=1e-5)
  tok = transformers.CLIPTokenizer.from_pretrained(checkpoints["safetensors"])
  refs = []
  with torch.no_grad():
    for c in classes:
      t = tok([tpl.format(c) for tpl in templates], padding=True, return_tensors="pt")
      z = hf.get_text_features(**t)
      z = getattr(z, "pooler_output", z)
      z = z / z.norm(dim=-1, keepdim=True)
      z = z.mean(0)
      refs.append((z / z.norm()).numpy())
  assert _max_diff(protos, np.stack(refs)) <= TOL


def test_config_from_hf_dict_matches_transformers():
  # Legacy openai/clip-vit-* configs carry *_config_dict entries: transformers rebuilds the
  # sub-configs from defaults + those entries, which resets eos_token_id 2 to 49407.
  d = dict(model_type="clip", projection_dim=768,
           text_config=dict(eos_token_id=2, bos_token_id=0, hidden_size=768),
           text_config_dict=dict(hidden_size=768, num_attention_heads=12, projection_dim=768),
           vision_config=dict(hidden_size=1024),
           vision_config_dict=dict(hidden_size=1024, image_size=336, patch_size=14,
                                   intermediate_size=4096, num_attention_heads=16,
                                   num_hidden_layers=24, projection_dim=768))
  ours, theirs = clip.CLIPConfig.from_hf_dict(d), transformers.CLIPConfig(**d)
  assert ours.projection_dim == theirs.projection_dim == 768
  for mine, ref in ((ours.vision_config, theirs.vision_config),
                    (ours.text_config, theirs.text_config)):
    for field in dataclasses.fields(mine):
      assert getattr(mine, field.name) == getattr(ref, field.name), field.name
  assert ours.text_config.eos_token_id == 49407
  vision_only = transformers.CLIPVisionConfig(hidden_size=64, num_attention_heads=4).to_dict()
  config = clip.CLIPConfig.from_hf_dict(vision_only)
  assert config.text_config is None and config.vision_config.hidden_size == 64
  assert config.projection_dim == 512
