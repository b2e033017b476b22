r"""Greedy decoding speed of fsjax.flamingo vs open_flamingo (PyTorch) on the same OpenFlamingo.

  python benchmarks/flamingo_decode.py                      # small random OpenFlamingo, CPU
  python benchmarks/flamingo_decode.py --quick              # smoke run
  taskset -c 0 python benchmarks/flamingo_decode.py --torch-threads 1 --rounds 5
  python benchmarks/flamingo_decode.py --flops-9b --batch 8  # one 9B decoding step's GFLOP

The twin of ``benchmarks/llava_decode.py``. "small": a random OpenFlamingo built by
``open_flamingo`` 2.0.1 around transformers' ``MptForCausalLM`` (4 layers, d_model 512, 8
heads, vocabulary 50280 as OpenFlamingo-9B after its resize) and a 224-px CLIP tower of
width 64 (2 layers, 256 patch tokens); OpenFlamingo's Perceiver resampler (depth 6, 64
latents, 8 heads of 64); gated
cross-attention before every second layer (gates non-zero). fsjax loads the same weights
from the files OpenFlamingo saves (``fsjax.flamingo.load``); float32 in both.

open_flamingo's own ``generate`` fails under transformers 5 (mllm-facts.md), so the torch
side is OpenFlamingo's cached path by hand: one ``Flamingo.forward`` over the prompt with
``use_cache=True``, then one forward per token with ``past_key_values`` and the cached
media (what its ``generate`` does through ``lang_encoder.generate``).

Timed as in llava_decode.py, interleaved rounds after compilation and a warm-up call:
prefill latency = image -> tower -> resampler -> MPT over the prompt -> first token
(``max_new_tokens=1``); decode tokens/s = ``(N - 1) / (t(N) - t(1))`` per row, EOS
unreachable. Prints a Markdown table and whether the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# open_flamingo's __init__ imports open_clip (which needs torchvision) for its factory only.
sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
from open_flamingo.src.flamingo import Flamingo as TorchFlamingo  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fsjax import flamingo  # noqa: E402
from fsjax.flamingo import model as flamingo_model  # noqa: E402
from fsjax.clip.encoder import CLIP_MEAN, CLIP_STD  # noqa: E402

VOCAB = 50280
MEDIA, EOC = VOCAB - 1, VOCAB - 2
IMAGE = 224


class _Visual(torch.nn.Module):
  """OpenFlamingo's vision interface: ``x -> (pooled, last-block patch tokens)``."""

  def __init__(self, clip):
    super().__init__()
    self.clip = clip

  def forward(self, x):
    out = self.clip.vision_model(pixel_values=x)
    return out.pooler_output, out.last_hidden_state[:, 1:]


def _build(root):
  """The torch OpenFlamingo, saved as OpenFlamingo does; fsjax's load of the same files."""
  g = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
      image_size=IMAGE, patch_size=14, projection_dim=64)).eval()
  clip.save_pretrained(os.path.join(root, "clip"))
  lm = transformers.MptForCausalLM(transformers.MptConfig(
      d_model=512, n_heads=8, n_layers=4, expansion_ratio=4, vocab_size=VOCAB, max_seq_len=2048,
      no_bias=True)).eval()
  lm.save_pretrained(os.path.join(root, "mpt"))
  extend_instance(lm, FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("transformer.blocks")
  model = TorchFlamingo(types.SimpleNamespace(visual=_Visual(clip)), lm, eoc_token_id=EOC,
                        media_token_id=MEDIA, vis_dim=64, cross_attn_every_n_layers=2).eval()
  with torch.no_grad():
    for p in model.perceiver.parameters():
      if p.ndim > 1:
        p.normal_(0.0, 0.05, generator=g)
    for layer in lm.gated_cross_attn_layers:
      if layer is not None:  # non-zero gates, else cross-attention is a no-op
        for name, p in layer.named_parameters():
          if name.endswith("_gate"):
            p.fill_(0.5)
          elif p.ndim > 1:
            p.normal_(0.0, 0.05, generator=g)
  state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
  torch.save(state, os.path.join(root, "checkpoint.pt"))
  of = flamingo.load(os.path.join(root, "checkpoint.pt"), lang_encoder=os.path.join(root, "mpt"),
                     vision_encoder=os.path.join(root, "clip"), media_token_id=MEDIA,
                     eoc_token_id=EOC)
  return model, of


def _torch_greedy(model, vision_x, ids, k):
  """OpenFlamingo's cached greedy path: prompt forward with use_cache, then one token each."""
  lm = model.lang_encoder
  ids = torch.as_tensor(ids)
  mask = torch.ones_like(ids)
  out_tokens = []
  with torch.inference_mode():
    try:
      lm._use_cached_vision_x = False  # pylint: disable=protected-access
      out = model(vision_x, ids, attention_mask=mask, clear_conditioned_layers=False,
                  use_cache=True)
      lm._use_cached_vision_x = True  # pylint: disable=protected-access
      for i in range(k):
        token = out.logits[:, -1].argmax(-1)
        out_tokens.append(token)
        if i == k - 1:
          break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(None, token[:, None], attention_mask=mask, clear_conditioned_layers=False,
                    past_key_values=out.past_key_values, use_cache=True)
    finally:
      lm.clear_conditioned_layers()
      lm._use_cached_vision_x = False  # pylint: disable=protected-access
  return torch.stack(out_tokens, 1).numpy()


def step_gflops(config: flamingo.FlamingoConfig, *, batch: int, prompt_tokens: int = 32,
                dtype=jnp.float32) -> float:
  """GFLOP of one decoding step (one new token per row after a prompt with one image), by
  XLA's cost analysis of the compiled step: shapes only, nothing allocated or run. The
  count does not depend on the dtype, but on CPU a bfloat16 step at batch 1 runs its
  products on the row repeated twice (``fsjax.matmul``), which doubles it: float32."""
  model = flamingo.Flamingo(config, dtype=dtype)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                        flamingo_model.param_shapes(model))
  vision = jax.ShapeDtypeStruct((batch, 1, 256, config.vis_dim), dtype)
  ids = jax.ShapeDtypeStruct((batch, prompt_tokens), jnp.int32)
  ones = lambda shape: jnp.ones(shape, bool)

  def prefill(params, vision, ids):
    variables = {"params": params}
    cache = model.apply(variables, vision, capacity=prompt_tokens + 1, method="start")
    return model.apply(variables, ids, cache, ones(ids.shape), method="decode",
                       last_only=True)[1]

  def step(params, cache):
    token = jnp.zeros((batch, 1), jnp.int32)
    return model.apply({"params": params}, token, cache, ones(token.shape), method="decode")[0]

  cache = jax.eval_shape(prefill, params, vision, ids)
  return jax.jit(step).lower(params, cache).compile().cost_analysis()["flops"] / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--prompt-tokens", type=int, default=20,
                      help="text tokens after the <image> token")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="3 rounds of 16 tokens")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads (0: torch's default)")
  parser.add_argument("--flops-9b", action="store_true",
                      help="print the GFLOP of one OpenFlamingo-9B decoding step at --batch "
                           "(compiled, not run) and exit")
  args = parser.parse_args()
  if args.flops_9b:
    from configs import openflamingo_9b  # pylint: disable=import-outside-toplevel
    arch = openflamingo_9b.get_config().openflamingo.architecture.to_dict()
    gflop = step_gflops(flamingo.FlamingoConfig.from_dict(arch), batch=args.batch)
    print(f"OpenFlamingo-9B decoding step, batch {args.batch}: {gflop:.1f} GFLOP "
          f"({gflop / args.batch:.2f} per row; XLA's cost analysis of the compiled step, not run)")
    return
  if args.quick:
    args.rounds, args.new_tokens = 3, 16
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  load = os.getloadavg()[0]
  print(f"jax {jax.__version__} on {jax.default_backend()}, load average {load:.2f}",
        file=sys.stderr)
  with tempfile.TemporaryDirectory() as root:
    model, of = _build(root)
  rng = np.random.default_rng(0)
  b, n = args.batch, args.new_tokens
  images = rng.uniform(size=(b, IMAGE, IMAGE, 3)).astype(np.float32)
  ids = np.array([[MEDIA] + list(rng.integers(3, 1000, args.prompt_tokens)) for _ in range(b)])
  vision_x = torch.tensor(((images - np.array(CLIP_MEAN)) / np.array(CLIP_STD))
                          .transpose(0, 3, 1, 2)[:, None, None], dtype=torch.float32)

  def fsjax_run(k):
    def run():
      tokens, _ = of.generate(ids, images[:, None], max_new_tokens=k, eos_token_id=VOCAB)
      return np.asarray(tokens)
    return run

  def torch_run(k):
    return lambda: _torch_greedy(model, vision_x, ids, k)

  variants = {"fsjax": fsjax_run, "torch": torch_run}
  outputs = {(name, k): make(k)() for name, make in variants.items() for k in (1, n)}
  times = {key: [] for key in outputs}
  for r in range(args.rounds):  # interleaved: a load change falls on all alike
    for name, make in variants.items():
      for k in (1, n):
        run = make(k)
        t0 = time.perf_counter()
        run()
        times[(name, k)].append(time.perf_counter() - t0)
    print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
  rows = {}
  for name in variants:
    decode = [(n - 1) / max(tn - t1, 1e-9) for t1, tn in zip(times[(name, 1)], times[(name, n)])]
    best = (n - 1) / max(min(times[(name, n)]) - min(times[(name, 1)]), 1e-9)  # fastest calls
    rows[name] = (statistics.median(times[(name, 1)]), statistics.median(decode),
                  min(times[(name, 1)]), best)
  same = bool(np.array_equal(outputs[("fsjax", n)], outputs[("torch", n)]))
  print(f"### OpenFlamingo greedy decoding, small (MPT 4 layers, d_model 512, 256 vision "
        f"tokens -> 64 latents), batch {b}, {1 + args.prompt_tokens} prompt tokens, {n} new "
        "tokens\n")
  print(f"`python benchmarks/flamingo_decode.py {' '.join(sys.argv[1:])}` on "
        f"{jax.devices()[0].device_kind}; load average {load:.2f} at start; median (best) of "
        f"{args.rounds} interleaved rounds.\n")
  print("| implementation | prefill latency (ms) | decode tokens/s per row | total tokens/s |")
  print("|---|---|---|---|")
  for name, (p, d, pb, db) in rows.items():
    print(f"| {name} | {1e3 * p:.1f} ({1e3 * pb:.1f}) | {d:.1f} ({db:.1f}) | {d * b:.1f} |")
  (pf, df, pfb, dfb), (pt, dt, ptb, dtb) = rows["fsjax"], rows["torch"]
  print(f"\nfsjax vs torch: prefill {pt / pf:.2f}x faster (best rounds {ptb / pfb:.2f}x), "
        f"decoding {df / dt:.2f}x faster (best rounds {dfb / dtb:.2f}x).")
  print(f"Greedy tokens identical in both: {same}.")


if __name__ == "__main__":
  main()
