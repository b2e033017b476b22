"""fsjax.flamingo against the ``open_flamingo`` package (the oracle) on a tiny random model.

The oracle is open_flamingo 2.0.1's own ``Flamingo`` around transformers' MptForCausalLM
and a tiny HF CLIP vision tower (its last-block patch tokens, as OpenFlamingo's open_clip
tower gives them). The cross-attention gates are set non-zero: at their initial 0 the
gated blocks are the identity and parity would hold trivially.
"""

import functools
import sys
import types

import jax
import numpy as np
import pytest
import flax.traverse_util
import ml_dtypes
import torch
import transformers

# open_flamingo's __init__ imports open_clip (which needs torchvision) for its factory only.
sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
from open_flamingo.src.flamingo import Flamingo as OracleFlamingo  # pylint: disable=g-import-not-at-top
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # pylint: disable=g-import-not-at-top
from open_flamingo.src.utils import extend_instance  # pylint: disable=g-import-not-at-top

from configs import openflamingo_9b
from configs import openflamingo_tiny
from fsjax import clip as fsjax_clip
from fsjax import flamingo
from fsjax.flamingo import model as flamingo_model
from fsjax.flamingo import mpt
from fsjax import mllm
from fsjax import smoothing

WORDS = [f"w{i}" for i in range(124)] + ["Output", ":", "<unk>"]  # ids 0..126
EOC, MEDIA, PAD = 127, 128, 129  # added by load_tokenizer in this order, as OpenFlamingo does
VOCAB = 130
IMAGE = 28
MEAN, STD = np.array(fsjax_clip.CLIP_MEAN), np.array(fsjax_clip.CLIP_STD)


class _Visual(torch.nn.Module):
  """OpenFlamingo's vision interface: ``x -> (pooled, patch tokens of the last block)``."""

  def __init__(self, clip):
    super().__init__()
    self.clip = clip

  def forward(self, x):
    out = self.clip.vision_model(pixel_values=x)
    return out.pooler_output, out.last_hidden_state[:, 1:]  # no post-LayerNorm on tokens


def _randomise(module, generator, *, scale):
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("_gate"):
        continue
      if p.ndim == 1:  # every 1-d parameter here is a LayerNorm's (linears have no bias)
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))
      else:
        p.copy_(scale * torch.randn(p.shape, generator=generator))


def _tokenizer(folder):
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                                         unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(
      folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """``(oracle, of)``: open_flamingo's model and fsjax's, loaded from the oracle's files."""
  root = tmp_path_factory.mktemp("flamingo")
  g = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=IMAGE, patch_size=14, projection_dim=16)).eval()
  clip.save_pretrained(root / "clip")
  # The MPT folder has more embedding rows than the checkpoint, as MPT-7B (50432) vs
  # OpenFlamingo-9B (50280 after resize_token_embeddings): the checkpoint's count wins.
  lm = transformers.MptForCausalLM(transformers.MptConfig(
      d_model=64, n_heads=4, n_layers=4, expansion_ratio=4, vocab_size=136, max_seq_len=64,
      no_bias=True)).eval()
  _randomise(lm, g, scale=0.1)
  lm.save_pretrained(root / "mpt")
  lm.resize_token_embeddings(VOCAB)
  extend_instance(lm, FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("transformer.blocks")
  oracle = OracleFlamingo(types.SimpleNamespace(visual=_Visual(clip)), lm, eoc_token_id=EOC,
                          media_token_id=MEDIA, vis_dim=32, cross_attn_every_n_layers=2).eval()
  _randomise(oracle.perceiver, g, scale=0.1)
  _randomise(lm.gated_cross_attn_layers, g, scale=0.1)
  with torch.no_grad():
    for i, layer in enumerate(lm.gated_cross_attn_layers):
      if layer is not None:  # non-zero gates, else cross-attention is a no-op
        layer.attn_gate.fill_(0.8 - 0.3 * i)
        layer.ff_gate.fill_(-0.6 + 0.2 * i)
  # As OpenFlamingo saves it: the vision tower filtered out, the aliases kept.
  state = {k: v for k, v in oracle.state_dict().items() if not k.startswith("vision_encoder.")}
  assert any(k.startswith("lang_encoder.old_decoder_blocks.") for k in state)
  torch.save(state, root / "checkpoint.pt")
  _tokenizer(root / "tokenizer")
  of = flamingo.load(root / "checkpoint.pt", lang_encoder=root / "mpt",
                     vision_encoder=root / "clip", tokenizer=root / "tokenizer")
  return oracle, of, root


def _images(b, m, seed):
  return np.random.default_rng(seed).uniform(size=(b, m, IMAGE, IMAGE, 3)).astype(np.float32)


def _oracle_vision_x(images):
  """[B, M, H, W, 3] in [0, 1] -> OpenFlamingo's [B, M, F=1, 3, H, W], CLIP-normalised."""
  x = (images - MEAN) / STD
  return torch.tensor(x.transpose(0, 1, 4, 2, 3)[:, :, None], dtype=torch.float32)


def test_logits_match_open_flamingo(models):
  """One left-padded batch: an image at the start; text before the image; two images."""
  oracle, of, _ = models
  prompts = ["<image> w1 w2 w3 w4",
             "w5 w6 w7 <image> w8 w9",
             "<image> w1 w2 <|endofchunk|> <image> w3 w4 w5"]
  batch = of.tokenizer(prompts, return_tensors="np", padding=True)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert (ids == MEDIA).sum(1).tolist() == [1, 1, 2] and mask[0, 0] == 0
  images = _images(3, 2, seed=0)  # rows with one <image> never see their second image
  with torch.no_grad():
    ref = oracle(_oracle_vision_x(images), torch.tensor(ids),
                 attention_mask=torch.tensor(mask)).logits.numpy()
  tokens = of.vision_tokens(images)
  forward = jax.jit(of.model.apply)
  out = np.asarray(forward({"params": of.params}, ids, tokens, mask > 0))
  real = mask > 0  # logits at left-padding positions are meaningless in both
  np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=0)
  # The images matter: other images change the logits from the first <image> on, and
  # only from there.
  swapped = np.asarray(forward({"params": of.params}, ids, np.roll(tokens, 1, axis=0), mask > 0))
  start, first = int(np.argmax(mask[1])), int(np.argmax(ids[1] == MEDIA))
  np.testing.assert_allclose(swapped[1, start:first], out[1, start:first], atol=1e-6)
  assert np.abs(swapped[1, first:] - out[1, first:]).max() > 1e-3


def _oracle_greedy(oracle, vision_x, ids, mask, *, max_new_tokens):
  """open_flamingo's forward in a loop (its generate() fails under transformers 5),
  with transformers' greedy rules: argmax; a row that emitted EOS emits PAD after it."""
  ids, mask = torch.tensor(ids), torch.tensor(mask)
  out, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
  with torch.no_grad():
    for _ in range(max_new_tokens):
      logits = oracle(vision_x, ids, attention_mask=mask).logits[:, -1]
      token = torch.where(done, torch.tensor(PAD), logits.argmax(-1))
      done |= token == EOC
      out.append(token)
      ids = torch.cat([ids, token[:, None]], 1)
      mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
      if done.all():
        break
  return torch.stack(out, 1).numpy()


def test_cached_greedy_and_captions_equal_oracle_loop(models):
  """Cached greedy tokens = the oracle's uncached loop; ``caption`` = those tokens as text
  (prompts tokenised, left-padded, cut at <|endofchunk|>)."""
  oracle, of, _ = models
  prompts = ["w3 <image> w4 w5 <image> Output:",
             "<image> w7 <|endofchunk|> <image> w8 w9 Output:"]
  batch = of.tokenizer(prompts, return_tensors="np", padding=True)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert mask[0, 0] == 0 and ids[0, 0] == PAD  # row 0 is left-padded
  images = _images(2, 2, seed=7)
  ref = _oracle_greedy(oracle, _oracle_vision_x(images), ids, mask, max_new_tokens=10)
  tokens, num_steps = of.generate(ids, images, attention_mask=mask, max_new_tokens=10)
  assert len(set(ref[1].tolist())) > 2  # not one repeated token
  assert int(num_steps) == ref.shape[1]
  np.testing.assert_array_equal(np.asarray(tokens)[:, :ref.shape[1]], ref)

  captions = of.caption(images, prompts, max_new_tokens=10)  # the same shapes: no recompile
  expected = [" ".join(WORDS[t] for t in (row[:list(row).index(EOC)] if EOC in row else row))
              for row in ref]
  assert captions == expected and captions[1]


def test_bfloat16_generate_gathers_the_embedding_in_bfloat16(models):
  """A bfloat16 table gathered in float32 (nn.Embed on XLA:CPU) made the decoding loop
  hoist a float32 copy of the whole embedding table (OpenFlamingo-9B: 824 MB) per call."""
  _, of32, root = models
  of = flamingo.load(root, lang_encoder=root / "mpt", vision_encoder=root / "clip",
                     tokenizer=root / "tokenizer", dtype="bfloat16", param_dtype="bfloat16")
  ids = of.tokenizer(["<image> w7 w8 Output:"], return_tensors="np")["input_ids"]
  images = _images(1, 1, seed=3)
  tokens, _ = of.generate(ids, images, max_new_tokens=3)
  tokens32, _ = of32.generate(ids, images, max_new_tokens=3)
  assert np.asarray(tokens)[0, 0] == np.asarray(tokens32)[0, 0]
  ids, valid = mpt.check_prompt(ids, None, max_new_tokens=3, max_seq_len=64)
  vision = of.vision_tokens(images)
  hlo = flamingo_model._generate.lower(  # pylint: disable=protected-access
      of.model, of.params, ids, valid, vision, max_new_tokens=3, eos_token_id=EOC,
      pad_token_id=PAD).compile().as_text()
  table = of.params["lang_encoder"]["transformer"]["wte"]["embedding"]
  assert table.dtype == jax.numpy.bfloat16
  assert f"f32[{table.shape[0]},{table.shape[1]}]" not in hlo


def _dot_shapes(jaxpr, *, in_loop=False):
  """``(in a while loop, operand shapes)`` of every dot in a (closed) jaxpr, nested ones too."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield in_loop, tuple(tuple(v.aval.shape) for v in eqn.invars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _dot_shapes(sub, in_loop=in_loop or eqn.primitive.name == "while")


def test_decoding_steps_reuse_the_media_keys_and_values(models):
  """The gated cross-attention's keys and values of the images are computed once, in the
  prefill (FlamingoCache), not at every step as open_flamingo does (an OpenFlamingo-9B
  decoding step: 16.65 -> 15.57 GFLOP per row); the same tokens as the oracle's loop are
  tested above."""
  _, of, _ = models
  ids = of.tokenizer(["<image> w7 w8 Output:"], return_tensors="np")["input_ids"]
  ids, valid = mpt.check_prompt(ids, None, max_new_tokens=4, max_seq_len=64)
  vision = of.vision_tokens(_images(1, 1, seed=4))
  jaxpr = jax.make_jaxpr(lambda p, v: flamingo_model._generate(  # pylint: disable=protected-access
      of.model, p, ids, valid, v, max_new_tokens=4, eos_token_id=EOC, pad_token_id=PAD))(
          of.params, vision)
  to_kv = of.params["lang_encoder"]["gated_cross_attn_layers"]["1"]["attn"]["to_kv"]["kernel"]
  uses = [in_loop for in_loop, shapes in _dot_shapes(jaxpr) if to_kv.shape in shapes]
  # The resampler's to_kv (6 layers, same shape here) and the two gated layers', prefill only.
  assert uses and not any(uses), uses


def test_encoder_is_pluggable(models):
  """Any Encoder with [B, v, vis_dim] tokens replaces the tower (here: tokens scaled by 2)."""
  _, of, _ = models
  base = of.encoder

  class Scaled(type(base)):
    def tokens(self, params, x, *, sigma=None):
      return 2.0 * super().tokens(params, x, sigma=sigma)

  scaled = of.replace(encoder=Scaled(resolution=base.resolution, model=base.model,
                                     feature=base.feature, layer=base.layer))
  images = _images(1, 1, seed=3)
  np.testing.assert_allclose(np.asarray(scaled.vision_tokens(images)),
                             2.0 * np.asarray(of.vision_tokens(images)), rtol=1e-6)


def test_smoothed_vision_tokens(models):
  """The smoothed view: n noisy copies x + delta_i (fsjax.smoothing's noise), tokens
  averaged as the mean unit direction rescaled to the mean norm (features="raw_mean" is
  checked on the toy encoder: tests/fsjax/test_smoothed_encoder.py)."""
  _, of, _ = models
  images = _images(2, 1, seed=4)
  key, sigma, n = jax.random.PRNGKey(3), 0.25, 3
  smoothed = of.replace(  # chunks of 2: 3 masks 1
      encoder=smoothing.SmoothedEncoder(of.encoder, sigma=sigma, n=n, chunk_size=2),
      encoder_params={"encoder": of.encoder_params})
  got = smoothed.vision_tokens(images, key=key)
  # Handed to the language side as a plain array: no explicit mesh axis of the smoothing
  # engine, which the decoder's cache updates would reject (jax ShardingTypeError).
  assert jax.sharding.AxisType.Explicit not in jax.typeof(got).sharding.mesh.axis_types
  got = np.asarray(got)
  x = images[:, 0]
  tokens = jax.jit(of.encoder.tokens)
  raw = np.stack([np.asarray(tokens(of.encoder_params, x + smoothing.noise(key, i, x.shape, sigma)))
                  for i in range(n)])
  flat = raw.reshape(n, 2, -1)
  norms = np.linalg.norm(flat, axis=-1, keepdims=True)
  mean_unit = (flat / norms).mean(0)
  want = (mean_unit / np.linalg.norm(mean_unit, axis=-1, keepdims=True)
          * norms.mean(0)).reshape(raw.shape[1:])
  assert got.shape == (2, 1) + raw.shape[2:]
  np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="smoothing's sigma"):
    smoothed.vision_tokens(images, sigma=0.5, key=key)
  with pytest.raises(ValueError, match="no noise key"):  # no silent default key
    smoothed.vision_tokens(images)


def test_loader_errors(models, tmp_path, toy):
  _, _, root = models
  from fsjax import torch_pickle  # pylint: disable=g-import-not-at-top
  state = torch_pickle.load(root / "checkpoint.pt")
  kwargs = dict(lang_encoder=root / "mpt", vision_encoder=root / "clip", media_token_id=MEDIA,
                eoc_token_id=EOC)

  bad = {k: torch.tensor(v) for k, v in state.items()}
  bad["perceiver.layers.0.0.to_q.weight"] = torch.zeros(512, 31)
  del bad["lang_encoder.gated_cross_attn_layers.1.ff_gate"]
  del bad["lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff_gate"]
  torch.save(bad, tmp_path / "bad.pt")
  with pytest.raises(ValueError) as e:
    flamingo.load(tmp_path / "bad.pt", **kwargs)
  message = str(e.value)
  assert "2 problem(s)" in message
  assert ("mis-shaped perceiver/layers/0/0/to_q/kernel: expected (32, 512), found (31, 512) "
          "(from 'perceiver.layers.0.0.to_q.weight' of shape (512, 31))") in message
  assert "missing    lang_encoder/gated_cross_attn_layers/1/ff_gate: expected (1,)" in message

  conflict = {k: torch.tensor(v) for k, v in state.items()}
  conflict["lang_encoder.old_decoder_blocks.2.norm_1.weight"] += 1.0
  torch.save(conflict, tmp_path / "conflict.pt")
  with pytest.raises(ValueError, match="alias one parameter hold different values"):
    flamingo.load(tmp_path / "conflict.pt", **kwargs)

  with pytest.raises(ValueError, match="pass media_token_id"):
    flamingo.load(root / "checkpoint.pt", lang_encoder=root / "mpt", vision_encoder=root / "clip")
  with pytest.raises(ValueError, match="vision_encoder is required"):
    flamingo.load(root, lang_encoder=root / "mpt", media_token_id=MEDIA, eoc_token_id=EOC)
  with pytest.raises(ValueError, match="tokens of width 16, but .* takes 32"):
    flamingo.load(root, lang_encoder=root / "mpt", vision_encoder=toy, media_token_id=MEDIA,
                  eoc_token_id=EOC)
  with pytest.raises(ValueError, match="is not a file"):
    flamingo.load(tmp_path / "nothing.pt", **kwargs)
  # The folder that holds checkpoint.pt loads like the file itself; bf16 storage is the
  # float32 parameters rounded to bfloat16.
  of = flamingo.load(root, param_dtype="bfloat16", **kwargs)
  assert of.model.config.cross_attn_layers == (1, 3) and of.model.config.lang.vocab_size == VOCAB
  latents = of.params["perceiver"]["latents"]
  assert latents.dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(latents),
                                state["perceiver.latents"].astype(ml_dtypes.bfloat16))
  with pytest.raises(ValueError, match="param_dtype='float16' must be one of"):
    flamingo.load(root, param_dtype="float16", **kwargs)


def test_deduplicate_maps_every_alias():
  a, b = np.ones(2), np.zeros(2)
  state = {"lang_encoder.old_decoder_blocks.3.attn.Wqkv.weight": a,
           "lang_encoder.transformer.blocks.3.decoder_layer.attn.Wqkv.weight": a,
           "lang_encoder.gated_cross_attn_layers.3.attn_gate": b,
           "lang_encoder.transformer.blocks.3.gated_cross_attn_layer.attn_gate": b}
  assert sorted(flamingo.deduplicate(state, origin="x")) == [
      "lang_encoder.gated_cross_attn_layers.3.attn_gate",
      "lang_encoder.transformer.blocks.3.attn.Wqkv.weight"]


def test_9b_config_matches_open_flamingo():
  """configs/openflamingo_9b.py's architecture has exactly open_flamingo's parameters
  (names and shapes) for OpenFlamingo-9B, built on torch's meta device (no memory)."""
  arch = openflamingo_9b.get_config().openflamingo.architecture.to_dict()
  lang = arch["lang"]
  with torch.device("meta"):
    lm = transformers.MptForCausalLM(transformers.MptConfig(
        d_model=lang["d_model"], n_heads=lang["n_heads"], n_layers=lang["n_layers"],
        expansion_ratio=4, vocab_size=lang["vocab_size"], max_seq_len=lang["max_seq_len"]))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.blocks")
    oracle = OracleFlamingo(types.SimpleNamespace(visual=torch.nn.Identity()), lm,
                            eoc_token_id=arch["eoc_token_id"],
                            media_token_id=arch["media_token_id"], vis_dim=1024,
                            cross_attn_every_n_layers=4)
  # Meta tensors hold no values: stand-ins of the right shape, one object per shape (so
  # the aliases compare as identical without a 7B-element comparison).
  stand_in = functools.lru_cache(None)(lambda shape: np.broadcast_to(np.float32(0), shape))
  state = flamingo.deduplicate({k: stand_in(tuple(v.shape)) for k, v in
                                oracle.state_dict().items() if k != "lang_encoder.lm_head.weight"},
                               origin="oracle")
  ref = {}
  for key, value in state.items():  # the loader's naming rule, written out
    path, shape = key.replace(".", "/"), tuple(value.shape)
    if key.endswith(".weight"):
      leaf = ("embedding" if key.endswith("wte.weight") else "kernel" if value.ndim == 2
              else "scale")
      path = path[:-len("weight")] + leaf
      shape = shape[::-1] if leaf == "kernel" else shape
    ref[path] = shape
  config = flamingo.FlamingoConfig.from_dict(arch)
  ours = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      flamingo.param_shapes(flamingo.Flamingo(config)), sep="/").items()}
  assert ours == ref
  count = sum(p.numel() for p in oracle.parameters())  # tied and aliased tensors once
  assert sum(int(np.prod(s)) for s in ours.values()) == count
  assert config.cross_attn_layers == (3, 7, 11, 15, 19, 23, 27, 31)


def test_tiny_config_builds_and_generates():
  config = openflamingo_tiny.get_config()
  of, params = flamingo.build(config)
  assert params == of.mllm_params
  images = _images(2, 1, seed=5)[:, 0]
  images = np.asarray(jax.image.resize(images, (2, 32, 32, 3), "bilinear")).clip(0, 1)
  ids = np.array([[3, 128, 9, 10], [128, 5, 6, 7]])
  # The gates of the random init are open: the image changes the logits after <image>.
  vis = of.vision_tokens(images)
  out = np.asarray(jax.jit(of.model.apply)({"params": of.params}, np.concatenate([ids, ids]),
                                           np.concatenate([vis, vis[::-1]])))
  assert out.shape == (4, 4, 130)
  assert np.abs(out[0, 1:] - out[2, 1:]).max() > 1e-4
  np.testing.assert_array_equal(out[0, 0], out[2, 0])  # before the image: no change
  with pytest.raises(ValueError, match="takes no argument"):
    openflamingo_tiny.get_config("x")
  # The registry builds it by the config's section; the smoothing section smooths it.
  config.smoothing.n = 2
  built, built_params = mllm.build(config)
  assert isinstance(built, flamingo.OpenFlamingo) and set(built_params) == {"vision", "language"}
  smoothed, _ = mllm.smoothed(built, built_params, **config.smoothing)
  assert (smoothed.encoder.n, smoothed.encoder.sigma) == (2, 0.25)
  assert smoothed.encoder.base is built.encoder


def test_9b_config_options():
  config = openflamingo_9b.get_config("tower=fare,smoothed,sigma=0.5")
  assert (config.smoothing.n, config.smoothing.sigma) == (8, 0.5)
  assert (config.encoder.feature, config.encoder.layer, config.encoder.resolution) == (
      "patch_tokens", -1, 224)
  assert openflamingo_9b.get_config().smoothing.n == 0
  with pytest.raises(ValueError, match="tower='vit' must be one of"):
    openflamingo_9b.get_config("tower=vit")
  with pytest.raises(ValueError, match="unknown config argument 'n'"):
    openflamingo_9b.get_config("n=3")
