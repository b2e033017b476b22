r"""Greedy decoding speed of fsjax.llava vs transformers (PyTorch) on the same LLaVA.

  python benchmarks/llava_decode.py                    # small random LLaVA, CPU, both
  python benchmarks/llava_decode.py --quick            # < 1 minute smoke run
  python benchmarks/llava_decode.py --size 7b --skip-torch   # LLaVA-1.5-7B shapes (GPU)
  python benchmarks/llava_decode.py --size 7b --memory       # generate's memory, compiled only
  python benchmarks/llava_decode.py --batch 8 --new-tokens 16 --faults   # + page faults

"small" (default): a random LLaVA with a 336-px CLIP tower of width 64 (2 layers, 576
image tokens) and a 4-layer LLaMA of hidden 512 (8 heads, MLP 1376, vocabulary 32064),
built by transformers and loaded by ``fsjax.llava.load``; float32 in both frameworks, or
``--dtype bfloat16`` in both (torch: the model cast to bfloat16; fsjax: bfloat16 compute
and storage, its norms, softmax and logits in float32).
"7b": LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336, LLaMA-7B) with random weights drawn on
the device, bfloat16 compute and storage; the torch row (if not skipped and torch sees
CUDA) uses the same shapes in bfloat16 with its own random weights.

What is timed, the same way for both, each a median over interleaved rounds, after
compilation (fsjax) and a warm-up call (both):

* prefill latency: image -> vision tower -> projector -> LLaMA over the prompt -> the
  first token (``max_new_tokens=1``);
* decode tokens/s: ``(N - 1) / (t(N) - t(1))`` per row with ``max_new_tokens=N``, EOS
  unreachable so that every call generates exactly N tokens; times the batch for the
  total rate.

The prompt is BOS, 5 words, the image tokens, 10 words. Prints a Markdown table.

The prefill floor (``--no-floor`` to skip) is what no implementation on XLA's dot can beat
here: the weight matmuls a prefill needs (``weight_products``: the LLaMA layers on every
prompt row, but for the last layer's query, output projection and MLP, needed at the last
position only; the projector on the image tokens; the LM head on the last position), run
back to back as fsjax runs them (``common.matmul_floor``), in the same run. A prefill
ratio over torch above ``torch / floor`` is out of reach on this machine, whatever the
code. (Decoding has no such floor here: the weights of a small model stay partly in the
CPU's caches between steps, and the weight matmuls alone in another executable ran slower
than whole steps.)

On CPU, fsjax's generate/score executables are compiled by ``fsjax.cpu.jit``: float32
matmuls go to XLA's own (Eigen) dot, reductions to YNNPACK (``fsjax.cpu.FLOAT32_OPTIONS``);
the prefill attends over its own keys in causal query blocks and gathers its rotary
cosines and sines from a table computed once (see ``fsjax/llava/llama.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import fsjax.llava as fl  # pylint: disable=g-import-not-at-top
from common import matmul_floor  # pylint: disable=g-import-not-at-top

IMAGE = 32000
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SMALL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64),
    text=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0))
SEVEN_B = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def _hf_dict(shapes, image_token=IMAGE):
  return dict(model_type="llava", image_token_index=image_token, vision_feature_layer=-2,
              vision_feature_select_strategy="default", projector_hidden_act="gelu",
              text_config=dict(shapes["text"], model_type="llama"),
              vision_config=dict(shapes["vision"], model_type="clip_vision_model"))


def _torch_model(shapes, device, dtype):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**shapes["vision"]),
      text_config=transformers.LlamaConfig(**shapes["text"]), image_token_index=IMAGE)
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.LlavaForConditionalGeneration(config).to(dtype).eval()
  return model


def _fsjax_small(torch_model, dtype=jnp.float32):
  """The torch model's own weights through save_pretrained + fsjax.llava.load, computed and
  stored in ``dtype``."""
  with tempfile.TemporaryDirectory() as d:
    torch_model.save_pretrained(d)
    return fl.load(d, dtype=dtype, param_dtype=dtype)


def _fsjax_random(shapes, dtype, image_token=IMAGE):
  """Random weights drawn on the device (no host copy of a 7B tree)."""
  config = fl.LlavaConfig.from_hf_dict(_hf_dict(shapes, image_token))
  encoder = fl.clip_tower_encoder(config, dtype=dtype)
  size = shapes["vision"]["image_size"]
  vision = jax.eval_shape(encoder.model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))["params"]["vision_model"]
  def draw(key):
    leaves, tree = jax.tree.flatten(vision)
    out = [jnp.ones(l.shape, dtype) if len(l.shape) == 1 else
           (0.02 * jax.random.normal(jax.random.fold_in(key, i), l.shape)).astype(dtype)
           for i, l in enumerate(leaves)]
    return jax.tree.unflatten(tree, out)
  vision_params = {"vision_model": jax.jit(draw)(jax.random.key(1))}
  language = fl.init_language(config, seed=0, dtype=dtype)
  model = fl.Llava(config=config, encoder=encoder, dtype=dtype, eos_token_id=2, pad_token_id=0)
  return model, {"vision": vision_params, "language": language}


def weight_products(language, batch: int, length: int, image_tokens: int
                    ) -> list[tuple[int, int, int]]:
  """``(rows, K, N)`` of the weight matmuls a prefill of ``length`` tokens needs (see
  ``common.matmul_floor``): every LLaMA layer's keys and values on every prompt row, the
  other projections and the MLP on every row but in the last layer (whose output is
  needed at the last position only), the projector on the image tokens, the LM head on
  the last position (the embedding table when tied)."""
  last = str(max(int(k) for k in language["language_model"]["layers"]))
  products = []
  for path, w in jax.tree_util.tree_leaves_with_path(language):
    names = [getattr(k, "key", "") for k in path]
    if names[-1] != "kernel" or len(w.shape) != 2:
      continue
    if "multi_modal_projector" in names:
      rows = image_tokens
    elif "lm_head" in names or (last in names and not {"k_proj", "v_proj"} & set(names)):
      rows = 1
    else:
      rows = length
    products.append((batch * rows, *w.shape))
  if "lm_head" not in language:
    vocab, hidden = language["language_model"]["embed_tokens"]["embedding"].shape
    products.append((batch, hidden, vocab))
  return products


def memory_report(shapes, dtype, batch: int, new_tokens: int) -> str:
  """The compiled ``generate``'s temporaries against its language weights, for these
  shapes: compiled on abstract parameters, nothing allocated or run (7B shapes fit)."""
  from fsjax.llava import model as llava_model  # pylint: disable=g-import-not-at-top
  config = fl.LlavaConfig.from_hf_dict(_hf_dict(shapes))
  vision = shapes["vision"]
  feature, t = vision["hidden_size"], (vision["image_size"] // vision["patch_size"]) ** 2
  language = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                          fl.language_param_shapes(config, feature_size=feature))
  ids = jnp.asarray([[1] + [5] * 5 + [IMAGE] * t + [7] * 10] * batch, jnp.int32)
  compiled = llava_model._generate.lower(  # pylint: disable=protected-access
      llava_model.LlavaLanguageModel(config=config, dtype=dtype), language, ids,
      jnp.ones(ids.shape, bool), jax.ShapeDtypeStruct((batch, t, feature), dtype),
      jnp.atleast_1d(jnp.int32(2)), jnp.int32(0), max_new_tokens=new_tokens,
      projected=False).compile()
  weights = sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(language))
  temp = compiled.memory_analysis().temp_size_in_bytes
  return (f"generate ({jnp.dtype(dtype).name}, batch {batch}, {new_tokens} new tokens) on "
          f"{jax.default_backend()}: temporaries {temp / 1e9:.2f} GB against language weights "
          f"{weights / 1e9:.2f} GB (compiled, not run).")


def faults_of(fn) -> tuple[int, float]:
  """(minor page faults, seconds of system time) of this process during one ``fn()``
  (``resource.getrusage``): memory a call maps afresh and touches page by page."""
  import resource  # pylint: disable=g-import-not-at-top
  before = resource.getrusage(resource.RUSAGE_SELF)
  fn()
  after = resource.getrusage(resource.RUSAGE_SELF)
  return after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def _timed(fn, rounds):
  out = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=("small", "7b"), default="small")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", choices=tuple(JAX_DTYPES), default="float32",
                      help="small model: compute and storage dtype of both frameworks (torch: "
                           "the model cast with .to(dtype); fsjax: dtype = param_dtype)")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="3 rounds of 16 tokens")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--options", type=int, default=4,
                      help="option-scoring row: this many options (0: no row)")
  parser.add_argument("--option-tokens", type=int, default=4,
                      help="option-scoring row: tokens per option (= greedy tokens compared)")
  parser.add_argument("--memory", action="store_true",
                      help="only compile generate for these shapes (nothing allocated) and "
                           "print its temporaries against the weights")
  parser.add_argument("--no-floor", action="store_true",
                      help="skip the prefill floor (the weight matmuls alone, "
                           "common.matmul_floor)")
  parser.add_argument("--faults", action="store_true",
                      help="also count one prefill call's minor page faults and system time "
                           "per framework (resource.getrusage)")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads (0: torch's default); under heavy load "
                      "torch's OpenMP loop loses more than XLA's thread pool")
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.new_tokens = 3, 16
  shapes = SMALL if args.size == "small" else SEVEN_B
  if args.memory:
    dtype = JAX_DTYPES[args.dtype] if args.size == "small" else jnp.bfloat16
    print(memory_report(shapes, dtype, args.batch, args.new_tokens))
    return
  backend = jax.default_backend()
  load = os.getloadavg()[0]
  _log(f"jax {jax.__version__} on {backend}, load average {load:.2f}")

  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    if args.size == "small":
      raise  # the small model is built by transformers
    torch = None
  if torch is not None and args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch_device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
  run_torch = not args.skip_torch and (args.size == "small" or torch_device == "cuda")
  if args.size == "small":
    torch_model = _torch_model(shapes, "cpu", torch.float32)
    model, params = _fsjax_small(torch_model, JAX_DTYPES[args.dtype])
    torch_dtype = getattr(torch, args.dtype)
    torch_model = torch_model.to(torch_dtype)
  else:
    model, params = _fsjax_random(shapes, jnp.bfloat16)
    torch_dtype = torch.bfloat16 if torch is not None else None
    torch_model = _torch_model(shapes, torch_device, torch_dtype) if run_torch else None

  rng = np.random.default_rng(0)
  b, n = args.batch, args.new_tokens
  images = rng.uniform(size=(b, 336, 336, 3)).astype(np.float32)
  t = (336 // 14) ** 2
  ids = np.array([[1] + list(rng.integers(3, 1000, 5)) + [IMAGE] * t
                  + list(rng.integers(3, 1000, 10)) for _ in range(b)])
  # EOS = vocab_size: never emitted, so every call makes exactly N tokens.
  fs = dataclasses.replace(model, eos_token_id=shapes["text"]["vocab_size"])

  def fsjax_run(k):
    def run():
      feats = fs.image_features(params, images)
      tokens, _ = fs.generate_ids(params, ids, feats, max_new_tokens=k)
      return np.asarray(tokens)
    return run

  def torch_run(k):
    from fsjax.clip.encoder import CLIP_MEAN, CLIP_STD  # pylint: disable=g-import-not-at-top
    pix = torch.tensor(((images - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(0, 3, 1, 2),
                       dtype=torch_dtype, device=torch_device)
    input_ids = torch.tensor(ids, device=torch_device)
    def run():
      with torch.inference_mode():
        out = torch_model.generate(input_ids=input_ids, pixel_values=pix, do_sample=False,
                                   max_new_tokens=k, min_new_tokens=k, pad_token_id=0,
                                   eos_token_id=shapes["text"]["vocab_size"])
      if torch_device == "cuda":
        torch.cuda.synchronize()
      return out[:, ids.shape[1]:].cpu().numpy()
    return run

  variants = {"fsjax": fsjax_run}
  if run_torch:
    variants["torch"] = torch_run
  t0 = time.perf_counter()
  outputs = {}
  for name, make in variants.items():  # compile and warm up
    for k in (1, n):
      outputs[(name, k)] = make(k)()
  _log(f"compiled and warmed up in {time.perf_counter() - t0:.1f} s")
  times = {key: [] for key in outputs}
  for r in range(args.rounds):  # interleaved rounds: load changes fall on all alike
    for name, make in variants.items():
      for k in (1, n):
        times[(name, k)] += _timed(make(k), 1)
    _log(f"round {r + 1}/{args.rounds}")

  rows = {}
  for name in variants:
    prefill = [a for a in times[(name, 1)]]
    decode = [(n - 1) / max(tn - t1, 1e-9) for t1, tn in zip(times[(name, 1)], times[(name, n)])]
    best = (n - 1) / max(min(times[(name, n)]) - min(prefill), 1e-9)  # the fastest calls
    rows[name] = (statistics.median(prefill), statistics.median(decode), min(prefill), best)
  # The prefill floor: the language side's weight matmuls alone, as fsjax runs them.
  floor = None
  if not args.no_floor:
    dtype = JAX_DTYPES[args.dtype] if args.size == "small" else jnp.bfloat16
    floor = matmul_floor(weight_products(params["language"], b, ids.shape[1], t), dtype)
  same = None
  if run_torch and args.size == "small":
    same = float(np.mean(outputs[("fsjax", n)] == outputs[("torch", n)]))

  faults = {name: faults_of(make(1)) for name, make in variants.items()} if args.faults else None

  # Option scoring vs greedy decoding of the same answers (language side only, fsjax): K
  # options of M tokens scored in one prefill + one batched pass, against greedy decoding
  # of M tokens; the greedy answer is one of the options.
  option_row = None
  if args.options:
    k, m = args.options, args.option_tokens
    feats = fs.image_features(params, images)
    greedy = np.asarray(fs.generate_ids(params, ids, feats, max_new_tokens=m)[0])
    options = [list(greedy[0])] + [list(rng.integers(3, 1000, m)) for _ in range(k - 1)]
    score = lambda: fs.option_scores(params, ids, feats, options).block_until_ready()
    decode = lambda: fs.generate_ids(params, ids, feats, max_new_tokens=m)[0].block_until_ready()
    chosen = int(np.argmax(np.asarray(score())[0]))
    decode()
    t_score, t_decode = [], []
    for _ in range(args.rounds):
      t_score += _timed(score, 1)
      t_decode += _timed(decode, 1)
    option_row = (k, m, statistics.median(t_score), statistics.median(t_decode), min(t_score),
                  min(t_decode), chosen == 0)

  device = jax.devices()[0].device_kind
  print(f"### LLaVA greedy decoding, {args.size} ({'4 layers, hidden 512' if args.size == 'small' else '7B shapes'}, "
        f"{t} image tokens), batch {b}, {n} new tokens\n")
  print(f"`python benchmarks/llava_decode.py {' '.join(sys.argv[1:])}` on {device} "
        f"({backend}); load average {load:.2f} at start; median of {args.rounds} rounds.\n")
  print("| implementation | prefill latency (ms), median (best) | decode tokens/s per row, "
        "median (best) | total tokens/s |")
  print("|---|---|---|---|")
  for name, (p, d, pb, db) in rows.items():
    print(f"| {name} | {1e3 * p:.1f} ({1e3 * pb:.1f}) | {d:.1f} ({db:.1f}) | {d * b:.1f} |")
  if "torch" in rows:
    (pf, df, pfb, dfb), (pt, dt, ptb, dtb) = rows["fsjax"], rows["torch"]
    print(f"\nfsjax vs torch: prefill {pt / pf:.2f}x faster (best rounds {ptb / pfb:.2f}x), "
          f"decoding {df / dt:.2f}x faster (best rounds {dfb / dtb:.2f}x).")
  if floor is not None:
    shares = ", ".join(f"{name} at {100 * floor / rows[name][0]:.0f}%" for name in rows)
    print(f"Prefill floor, the weight matmuls a prefill needs, alone, as fsjax runs them "
          f"({'float32' if args.size == 'small' and args.dtype == 'float32' else 'bfloat16'}; "
          f"attention, norms and the vision tower come on top): {1e3 * floor:.1f} ms; "
          f"{shares} of its speed.", end="")
    if "torch" in rows:
      print(f" No implementation on XLA's dot gets past {rows['torch'][0] / floor:.2f}x torch "
            "at prefill here.", end="")
    print()
  if same is not None and args.dtype == "float32":
    print(f"Greedy tokens identical in both: {same == 1.0}.")
  elif same is not None:  # bfloat16 roundings differ between the frameworks
    print(f"Greedy tokens equal in both ({args.dtype}; the frameworks round differently): "
          f"{100 * same:.0f}% of {outputs[('fsjax', n)].size}.")
  if faults is not None:
    print("Page faults of one prefill call (`resource.getrusage`): " + "; ".join(
        f"{name} {count:,} minor faults, {1e3 * system:.0f} ms of system time"
        for name, (count, system) in faults.items()) + ".")
  if option_row is not None:
    k, m, ts, td, tsb, tdb, greedy_wins = option_row
    print(f"\nOption scoring (fsjax, language side, batch {b}): {k} options of {m} tokens in "
          f"{1e3 * ts:.1f} ms (best {1e3 * tsb:.1f}) vs greedy decoding of {m} tokens in "
          f"{1e3 * td:.1f} ms (best {1e3 * tdb:.1f}): {td / ts:.2f}x; the greedy answer scores "
          f"highest among the options: {greedy_wins}.")


if __name__ == "__main__":
  main()
