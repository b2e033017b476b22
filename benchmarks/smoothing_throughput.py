r"""Throughput, FLOP/s and memory of fsjax Gaussian smoothing, against a PyTorch loop.

Prints Markdown tables, all measured in one run on one machine:

1. **Matmul peak**: a large ``jnp.dot`` (float32; bfloat16 inputs with a float32 or a
   bfloat16 output), and ``torch.mm`` in both dtypes; the best of each dtype is the
   machine's measured peak. The same matmuls are timed again inside the rounds of
   table 2, so that its "% of peak" compares numbers taken under the same load.
2. **Smoothing throughput**: samples/s of ``fsjax.smoothing.smoothed_features`` (jitted,
   timed after compilation and one warm-up call) and of a plain ``transformers`` PyTorch
   loop doing the same work on the same random-init CLIP vision tower: add Gaussian noise
   to the [0, 1] images in chunks, CLIP-normalise, run ``CLIPVisionModelWithProjection``
   under ``torch.inference_mode()``, L2-normalise, accumulate the mean feature. Each
   row also gives GFLOP/s (FLOPs per sample from XLA's cost analysis of one encoder
   forward, cross-checked against the analytic count) and the share of the peak of the
   row's compute dtype. Variants are timed in interleaved rounds, so load changes on a
   shared machine hit them alike; ratios are taken within a round, then the median over
   rounds is reported. On CPU each fsjax row is compiled for each XLA:CPU dot backend
   of ``CPU_DOTS`` ("fsjax": the public function with the options fsjax.cpu.jit picks;
   jax's default YNNPACK; XLA's own Eigen matmul; "reduce"; oneDNN).
3. **Memory vs n**: XLA's ``memory_analysis()`` of the compiled two-stage certification
   (``certify.estimate_scores``, all bounds and references) on the tiny CLIP of
   ``configs/clip_tiny.py`` for several n:
   temp + argument + output bytes stay flat because samples are summed chunk by chunk.
   Each n is also run for real, with its wall time.

On a GPU (``jax.default_backend() == "gpu"``) the defaults switch to CLIP ViT-L/14 in
bfloat16 with a chunk-size sweep (128, 256, 512); the torch loop runs there only if
torch sees CUDA (then in bfloat16 on the GPU). ``benchmarks/gpu_check.sh`` runs that.

  python benchmarks/smoothing_throughput.py              # full CPU run (a few minutes)
  python benchmarks/smoothing_throughput.py --quick      # tiny everything, < 1 minute
  python benchmarks/smoothing_throughput.py --model l14 --dtypes bfloat16 \
      --chunk 128,256,512 --n 8192                        # what the GPU default does

Timings on a shared machine vary by 2x from run to run: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Before jax is imported: on a GPU, the torch loop shares the device with JAX, so JAX
# must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

import certify  # noqa: E402
from fsjax import clip  # noqa: E402
from fsjax import cpu  # noqa: E402
from fsjax import smoothing  # noqa: E402
from common import log  # noqa: E402  (benchmarks/common.py, beside this script)
from common import markdown_table  # noqa: E402

# HF CLIPVisionConfig fields (vision tower + projection); hidden_act is quick_gelu, the
# HF default, on both sides.
ARCHITECTURES = {
    # As configs/clip_tiny.py: 32 px, patch 8, width 32, 2 layers, 2 heads, projection 16.
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
    # openai/clip-vit-base-patch16.
    "b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512),
    # openai/clip-vit-large-patch14.
    "l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
}
ARCH_NAMES = {"tiny": "tiny CLIP (32 px)", "b16": "CLIP ViT-B/16", "l14": "CLIP ViT-L/14"}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SIGMA = 0.25
# XLA:CPU dot backends, as per-compile options. "default" is YNNPACK (ynn_fusion) in jax
# 0.10.2; "onednn" routes dots to oneDNN instead, the same as running with
#   XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true
#              --xla_cpu_experimental_onednn_fusion_type=dot"
# (with bfloat16 operands oneDNN converts them to float32 and runs an f32 matmul).
# Known crash (jax 0.10.2): in float32, a vmapped multi-head attention whose vmap and
# batch sizes are both > 1 dies at run time with "partition compile failed" and SIGILL,
# so the float32 oneDNN rows are skipped for --batch > 1.
# "eigen" turns the YNNPACK fusion off and nothing else: the dots go to XLA's own
# (Eigen) matmul, the same as XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=".
# "reduce" is fsjax.cpu.FLOAT32_OPTIONS: Eigen dots, YNNPACK reductions. "fsjax" is what
# a user gets: the public smoothed_features without an outer jit, whose fsjax.cpu.jit
# picks the options from the matmul dtypes ("reduce" for float32, "default" otherwise).
CPU_DOTS = {
    "fsjax": None,
    "default": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "reduce": cpu.FLOAT32_OPTIONS,
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "",
               "xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


# ----------------------------------------------------------------------------- helpers


def fmt_bytes(b: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(b) < 1024 or unit == "GiB":
      return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
    b /= 1024
  raise AssertionError


def fmt_num(v: float) -> str:
  """Three significant digits or so, with thousands separators for big numbers."""
  if not np.isfinite(v):
    return "n/a"
  return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
  """Times each (already warm) function ``reps`` times, round-robin; seconds per call.

  Round-robin rather than one variant after the other, so that a load change on a
  shared machine falls on all variants alike.
  """
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      times[k].append(timed(fn))
  return times


def analytic_vit_flops(arch: dict) -> float:
  """Matmul FLOPs of one image through a CLIP vision tower + projection (2 per MAC).

  With T = 1 + (S/p)^2 tokens, width D, MLP width M, L layers, projection P:
    patch embedding  2 (S/p)^2 (3 p^2) D
    per layer        2 T D (3D)  q, k, v      + 2 T D D  out_proj
                   + 2 T^2 D     q k^T        + 2 T^2 D  probs v
                   + 2 T D M     fc1          + 2 T M D  fc2
                   = 2 T D (4D + 2M) + 4 T^2 D
    projection       2 D P
  LayerNorms, softmax, activations and the noise are O(T D) and left out (XLA's count
  has them: it comes out ~0.3% higher for ViT-B/16).
  """
  s, p, d = arch["image_size"], arch["patch_size"], arch["hidden_size"]
  m, layers, proj = arch["intermediate_size"], arch["num_hidden_layers"], arch["projection_dim"]
  patches = (s // p) ** 2
  t = patches + 1
  per_layer = 2 * t * d * (4 * d + 2 * m) + 4 * t * t * d
  return 2 * patches * (3 * p * p) * d + layers * per_layer + 2 * d * proj


@functools.lru_cache(maxsize=None)
def build_fsjax(arch_name: str, dtype: str):
  """Random-init (encoder, params) of a vision-only CLIP, as the "clip" builder does.

  Cached: a random init of ViT-L/14 takes seconds, and every chunk size reuses it.
  """
  config = clip.CLIPConfig.from_hf_dict(
      dict(ARCHITECTURES[arch_name], model_type="clip_vision_model"))
  model, params = clip.init(config, seed=0, dtype=JAX_DTYPES[dtype])
  return clip.ClipEncoder(resolution=config.vision_config.image_size, model=model), params


def count_params(tree) -> int:
  return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(tree))


# -------------------------------------------------------------------------- section 1


@dataclasses.dataclass
class Matmul:
  name: str  # implementation, e.g. "XLA (cpu) `jnp.dot`"
  dtype: str  # input dtype: the peak of this dtype
  label: str
  run: Callable[[], Any]  # `iters` matmuls (blocks)
  flops: float  # of one run


def matmuls(size: int, *, skip_torch: bool, cpu_dots: list[str],
            bfloat16: bool = True) -> list[Matmul]:
  """Warm ``size``^3 matmuls: XLA float32, bf16 -> f32, bf16 -> bf16 (for each CPU dot
  backend); torch.mm float32 and bfloat16. ``bfloat16=False``: the float32 ones only.

  On a GPU one run is 10 back-to-back matmuls, so that dispatch does not count.
  """
  backend = jax.default_backend()
  iters = 1 if backend == "cpu" else 10
  flops = 2.0 * size**3 * iters
  out = []
  kinds = (("float32", "float32", jnp.float32),
           # bf16 -> bf16 is what flax's Dense does with dtype=bfloat16.
           ("bfloat16", "bfloat16 in, float32 out", jnp.float32),
           ("bfloat16", "bfloat16 in, bfloat16 out", None))
  if not bfloat16:
    kinds = kinds[:1]
  for dots in cpu_dots if backend == "cpu" else ["default"]:
    for dtype, label, out_dtype in kinds:
      a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)),
                      JAX_DTYPES[dtype])
      fn = jax.jit(lambda a, b, t=out_dtype: jnp.dot(a, b, preferred_element_type=t))
      options = (cpu.compiler_options({dtype}) if dots == "fsjax" else CPU_DOTS[dots])
      fn = fn.lower(a, a).compile(compiler_options=options)
      fn(a, a).block_until_ready()
      run = lambda fn=fn, a=a: jax.block_until_ready([fn(a, a) for _ in range(iters)])
      name = f"XLA ({backend}) `jnp.dot`" + (f", {dots} dots" if backend == "cpu" else "")
      out.append(Matmul(name, dtype, label, run, flops))
  torch_device = _torch_device(skip_torch)
  if torch_device is not None:
    import torch  # pylint: disable=g-import-not-at-top
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    for dtype in ("float32", "bfloat16") if bfloat16 else ("float32",):
      a = torch.randn(size, size, device=torch_device).to(getattr(torch, dtype))
      torch.mm(a, a)
      sync()
      run = lambda a=a: ([torch.mm(a, a) for _ in range(iters)], sync())
      out.append(Matmul(f"torch ({torch_device}) `torch.mm`", dtype, dtype, run, flops))
  return out


def peak_per_round(mms: list[Matmul], times: dict[str, list[float]],
                   dtype: str) -> np.ndarray:
  """``[rounds]`` best FLOP/s of the ``dtype`` matmuls in each round (NaN if none)."""
  rates = [m.flops / np.asarray(times[mm_key(m)]) for m in mms if m.dtype == dtype]
  if not rates:
    return np.full(len(next(iter(times.values()))), np.nan)
  return np.max(rates, axis=0)


def mm_key(m: Matmul) -> str:
  return f"matmul {m.name} {m.label}"


def matmul_table(mms: list[Matmul], size: int, reps: int) -> str:
  times = interleaved({mm_key(m): m.run for m in mms}, reps)
  rows = [[m.name, m.label, fmt_num(m.flops / min(times[mm_key(m)]) / 1e9)] for m in mms]
  return markdown_table(["matmul", f"dtype ({size}x{size}x{size})",
                         f"GFLOP/s (best of {reps})"], rows)


# -------------------------------------------------------------------------- section 2


def _torch_device(skip_torch: bool) -> str | None:
  """Where the torch loop runs: beside JAX on the same kind of device, or nowhere."""
  if skip_torch:
    return None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu"
  if backend == "gpu" and torch.cuda.is_available():
    return "cuda"
  return None  # torch on the CPU against JAX on an accelerator would be no comparison


@dataclasses.dataclass
class Variant:
  name: str
  dtype: str  # compute dtype, picks the peak it is compared with
  run: Callable[[], Any]  # one smoothing of n samples x batch images (blocks)
  samples: int  # n * batch


def fsjax_variant(arch_name: str, dtype: str, *, n: int, batch: int, chunk: int,
                  x: np.ndarray, dots: str | None) -> Variant:
  """``dots``: an XLA:CPU dot backend of ``CPU_DOTS``; None off the CPU."""
  encoder, params = build_fsjax(arch_name, dtype)
  key = jax.random.key(0)
  xj = jnp.asarray(x)
  # The public API, jitted end to end (the smoothing loop is a fori_loop inside it).
  smooth = jax.jit(lambda p, x, k: smoothing.smoothed_features(
      p, x, encoder=encoder, sigma=SIGMA, n=n, key=k, chunk_size=chunk))
  name = f"fsjax {dtype}{f', {dots} dots' if dots else ''}, chunk {chunk}"
  if dots == "fsjax":  # the public function as a user calls it: its own jit, its options
    run = lambda: smoothing.smoothed_features(params, xj, encoder=encoder, sigma=SIGMA, n=n,
                                              key=key, chunk_size=chunk).block_until_ready()
    t0 = time.perf_counter()
    run()
    log(f"{name}: compiled and run in {time.perf_counter() - t0:.1f} s")
    log(f"{name}: warm-up run {timed(run):.1f} s")
    return Variant(name, dtype, run, n * batch)
  t0 = time.perf_counter()
  compiled = smooth.lower(params, xj, key).compile(compiler_options=CPU_DOTS[dots or "default"])
  log(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
  run = lambda: compiled(params, xj, key).block_until_ready()
  log(f"{name}: warm-up run {timed(run):.1f} s")
  return Variant(name, dtype, run, n * batch)


def torch_variant(arch: dict, dtype: str, *, n: int, batch: int, chunk: int, x: np.ndarray,
                  device: str) -> Variant | None:
  """The plain transformers loop; ``dtype`` bfloat16 means autocast on CPU, bf16 weights on GPU."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**arch)
  model = transformers.CLIPVisionModelWithProjection(config).eval().to(device)
  autocast = contextlib.nullcontext
  if dtype == "bfloat16":
    if device == "cuda":
      model = model.to(torch.bfloat16)
    else:
      autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
  mean = torch.tensor(clip.CLIP_MEAN, device=device).view(1, 1, 3, 1, 1)
  std = torch.tensor(clip.CLIP_STD, device=device).view(1, 1, 3, 1, 1)
  images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)  # NCHW
  model_dtype = next(model.parameters()).dtype
  generator = torch.Generator(device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def smooth(n_samples: int) -> torch.Tensor:
    generator.manual_seed(0)
    total = torch.zeros(images.shape[0], arch["projection_dim"], device=device)
    with torch.inference_mode(), autocast():
      for start in range(0, n_samples, chunk):
        k = min(chunk, n_samples - start)
        noisy = images[None] + SIGMA * torch.randn((k,) + tuple(images.shape), device=device,
                                                   generator=generator)  # [k, B, 3, S, S]
        pixels = ((noisy - mean) / std).reshape((-1,) + tuple(images.shape[1:]))
        emb = model(pixel_values=pixels.to(model_dtype)).image_embeds.float()  # [k B, P]
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        total += emb.reshape(k, images.shape[0], -1).sum(0)
    sync()
    return total / n_samples

  try:
    t = timed(lambda: smooth(chunk))
  except Exception as e:  # pylint: disable=broad-except
    log(f"torch {dtype} on {device} failed ({type(e).__name__}: {e}); row skipped")
    return None
  log(f"torch {dtype} ({device}): warm-up chunk {t:.1f} s")
  label = "autocast" if autocast is not contextlib.nullcontext else "weights"
  name = f"torch {dtype}{f' ({label})' if dtype == 'bfloat16' else ''}, chunk {chunk}"
  return Variant(name, dtype, lambda: smooth(n), n * batch)


def throughput(arch_name: str, *, dtypes: list[str], chunks: list[int], n: int, batch: int,
               reps: int, skip_torch: bool, torch_dtypes: list[str], mms: list[Matmul],
               cpu_dots: list[str], budget_s: float, started: float) -> str:
  arch = ARCHITECTURES[arch_name]
  s = arch["image_size"]
  x = np.random.default_rng(0).uniform(size=(batch, s, s, 3)).astype(np.float32)

  # FLOPs per sample: XLA's count of one encoder forward (the smoothing loop's own cost
  # analysis counts a while-loop body once, whatever n), cross-checked analytically.
  # (The count does not depend on the compute dtype.)
  encoder, params = build_fsjax(arch_name, dtypes[0])
  cost = jax.jit(encoder).lower(params, jnp.asarray(x[:1])).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"])
  analytic = analytic_vit_flops(arch)
  num_params = count_params(params)

  variants: list[Variant] = []
  skipped: list[str] = []
  device = _torch_device(skip_torch)
  if device is not None:
    for dtype in torch_dtypes:
      v = torch_variant(arch, dtype, n=n, batch=batch, chunk=chunks[0], x=x, device=device)
      if v is not None:
        variants.append(v)
  all_dots = cpu_dots if jax.default_backend() == "cpu" else [None]
  for dtype in dtypes:
    for dots in all_dots:
      for i, chunk in enumerate(chunks):
        if i > 0 and time.perf_counter() - started > budget_s:  # one chunk at least
          what = f"fsjax {dtype}{f', {dots} dots' if dots else ''}, chunk {chunk}"
          log(f"time budget {budget_s:.0f} s spent: skipping {what}")
          skipped.append(f"{what} (past the {budget_s:.0f} s --budget)")
          continue
        if dots == "onednn" and dtype == "float32" and batch > 1 and min(chunk, n) > 1:
          skipped.append(f"fsjax {dtype}, onednn dots (crashes for batch > 1, see CPU_DOTS)")
          continue
        variants.append(fsjax_variant(arch_name, dtype, n=n, batch=batch, chunk=chunk, x=x,
                                      dots=dots))

  log(f"timing {len(variants)} variants (+ {len(mms)} matmuls) x {reps} interleaved rounds")
  # The matmuls ride along in every round: "% of peak" then compares numbers taken under
  # the same load (a peak measured minutes earlier on a shared machine would not be).
  fns = {v.name: v.run for v in variants} | {mm_key(m): m.run for m in mms}
  times = interleaved(fns, reps)
  # Ratios are taken within each round, then the median over rounds: the load of a shared
  # machine changes between rounds more than within one.
  rate = {v.name: v.samples / np.asarray(times[v.name]) for v in variants}  # [rounds]
  peak = {d: peak_per_round(mms, times, d) for d in JAX_DTYPES} if mms else {}
  baseline = next((rate[v.name] for v in variants if v.name.startswith("torch float32")), None)
  rows = []
  for v in variants:
    r = rate[v.name]
    ratio = f"{np.median(r / baseline):.2f}x" if baseline is not None else "n/a"
    share = np.median(r * flops / peak[v.dtype]) if mms else np.nan
    rows.append([v.name, fmt_num(np.median(r)), " ".join(fmt_num(ri) for ri in r), ratio,
                 fmt_num(np.median(r) * flops / 1e9),
                 f"{100 * share:.0f}%" if np.isfinite(share) else "n/a"])
  peaks = ", ".join(f"{d} {' '.join(fmt_num(pi / 1e9) for pi in p)} GFLOP/s"
                    for d, p in peak.items())
  title = (f"{ARCH_NAMES[arch_name]} ({fmt_num(num_params / 1e6)}M params), n = {n} samples "
           f"x {batch} image(s), sigma = {SIGMA}, {reps} interleaved rounds. FLOPs per sample: "
           f"{fmt_num(flops / 1e9)} G from XLA's cost analysis of one encoder forward; "
           f"{fmt_num(analytic / 1e9)} G analytic (matmuls only, "
           f"`analytic_vit_flops`). Ratios and % of peak are medians of per-round values; "
           f"peak = the best matmul of the row's dtype in the same round: "
           f"{peaks or 'not measured (--sections without peak)'}.")
  if skipped:
    title += f" Not run: {'; '.join(sorted(set(skipped)))}."
  table = markdown_table(
      ["variant", "samples/s (median)", "per round", "vs torch float32", "GFLOP/s",
       "% of peak (same dtype)"], rows)
  return title + "\n\n" + table


# -------------------------------------------------------------------------- section 3


def memory_vs_n(sizes: list[int], *, n0: int, chunk: int, run: bool) -> str:
  """Compiled memory of the two-stage certification for each n, and optionally its run."""
  encoder, params = build_fsjax("tiny", "float32")
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 32, 32, 3)), jnp.float32)
  key = jax.random.key(0)
  rows = []
  for n in sizes:
    certify_fn = jax.jit(lambda p, x, k, n=n: certify.estimate_scores(
        p, x, encoder=encoder, sigma=SIGMA, key=k, n=n, n0=n0, chunk_size=chunk,
        bounds=certify.BOUNDS, references=certify.REFERENCES))
    compiled = certify_fn.lower(params, x, key).compile()
    mem = compiled.memory_analysis()
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    row = [f"{n:,}", fmt_bytes(mem.temp_size_in_bytes), fmt_bytes(mem.argument_size_in_bytes),
           fmt_bytes(mem.output_size_in_bytes), fmt_bytes(total)]
    if run:
      t = timed(lambda: jax.block_until_ready(compiled(params, x, key)))
      row += [f"{t:.2f} s", f"{(n + n0) / t:,.0f}"]
      log(f"memory: n = {n} ran in {t:.2f} s")
    rows.append(row)
  header = ["n", "temp", "arguments", "outputs", "total"]
  if run:
    header += ["wall time, first call (n0 + n)", "samples/s"]
  title = (f"`certify.estimate_scores` (n0 = {n0} + n samples, all bounds, chunk {chunk}) on "
           f"the {ARCH_NAMES['tiny']}: XLA `memory_analysis()` of the compiled executable")
  return title + "\n\n" + markdown_table(header, rows)


# ------------------------------------------------------------------------------- main


def parse_ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(ARCHITECTURES), default=None,
                 help="throughput model (default: b16 on CPU, l14 on GPU, tiny with --quick)")
  p.add_argument("--n", type=int, default=None,
                 help="noise samples per timed smoothing (default 32 on CPU, 8192 on GPU)")
  p.add_argument("--batch", type=int, default=1, help="images smoothed together")
  p.add_argument("--chunk", type=parse_ints, default=None,
                 help="comma-separated chunk sizes to try for fsjax; the torch loop uses the "
                      "first (default 16 on CPU, 128,256,512 on GPU)")
  p.add_argument("--dtypes", default=None,
                 help="fsjax compute dtypes (default bfloat16 on GPU; on CPU float32, plus "
                      "bfloat16 where the CPU has it natively, see fsjax.cpu)")
  p.add_argument("--torch-dtypes", default=None,
                 help="torch loop dtypes (default: as --dtypes)")
  p.add_argument("--emulated-bf16-peak", action="store_true",
                 help="time the bfloat16 peak matmuls even on a CPU without native bfloat16 "
                      "(emulated: minutes at the default size)")
  p.add_argument("--reps", type=int, default=None,
                 help="interleaved timing rounds (default 5 on CPU, 3 on GPU)")
  p.add_argument("--sizes", type=parse_ints, default=None,
                 help="comma-separated n of the memory table (default 1000,10000,100000)")
  p.add_argument("--no-memory-run", action="store_true",
                 help="memory table from the compiled executables only, no real runs")
  p.add_argument("--peak-size", type=int, default=None,
                 help="matmul side for the peak (default 4096 on CPU, 8192 on GPU)")
  p.add_argument("--cpu-dots", default="fsjax,default,eigen",
                 help="XLA:CPU dot backends for the fsjax rows and XLA matmuls, comma-separated "
                      f"subset of {','.join(CPU_DOTS)} (ignored off the CPU)")
  p.add_argument("--sections", default="peak,throughput,memory",
                 help="comma-separated subset of peak,throughput,memory")
  p.add_argument("--skip-torch", action="store_true", help="fsjax rows only")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds after which no further fsjax variant is compiled (default: none "
                      "on CPU, 150 on GPU)")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: tiny model and sizes, < 1 minute on CPU")
  a = p.parse_args(argv)
  quick = a.quick
  a.model = a.model or ("tiny" if quick else "l14" if gpu else "b16")
  a.n = a.n or (64 if quick else 8192 if gpu else 32)
  a.chunk = a.chunk or ([16] if quick else [128, 256, 512] if gpu else [16])
  # Without native bfloat16 a CPU emulates it: slower than float32, and a 4096^3 bf16
  # matmul took over 8 minutes on an AVX2 machine. So bf16 runs only where it is native.
  native_bf16 = gpu or cpu.native_bfloat16()
  default_dtypes = "bfloat16" if gpu else "float32,bfloat16" if native_bf16 else "float32"
  a.dtypes = (a.dtypes or default_dtypes).split(",")
  a.torch_dtypes = (a.torch_dtypes or default_dtypes).split(",")
  a.bf16_peak = native_bf16 or a.emulated_bf16_peak
  a.reps = a.reps or (2 if quick else 3 if gpu else 5)
  a.sizes = a.sizes or ([1000, 10000] if quick else [1000, 10000, 100000])
  a.peak_size = a.peak_size or (512 if quick else 8192 if gpu else 4096)
  a.budget = a.budget if a.budget is not None else (150.0 if gpu else float("inf"))
  a.sections = a.sections.split(",")
  a.cpu_dots = a.cpu_dots.split(",")
  for d in a.cpu_dots:
    if d not in CPU_DOTS:
      p.error(f"--cpu-dots: unknown backend {d!r}; use {','.join(CPU_DOTS)}")
  for d in a.dtypes + a.torch_dtypes:
    if d not in JAX_DTYPES:
      p.error(f"dtype {d!r} is not one of {sorted(JAX_DTYPES)}")
  for s in a.sections:
    if s not in ("peak", "throughput", "memory"):
      p.error(f"--sections: unknown section {s!r}")
  return a


def main(argv=None) -> None:
  args = parse_args(argv)
  started = time.perf_counter()
  device = jax.devices()[0]
  versions = f"jax {jax.__version__}"
  with contextlib.suppress(ImportError):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    versions += (f", torch {torch.__version__} ({torch.get_num_threads()} threads), "
                 f"transformers {transformers.__version__}")
  print(f"## fsjax smoothing benchmark\n\n`{' '.join(['python'] + sys.argv)}`\n")
  print(f"* device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s)), {os.cpu_count()} CPU cores; {versions}")
  if jax.default_backend() == "cpu":
    print(f"* CPU: {cpu.describe()}")
  print(f"* load average at start: {os.getloadavg()[0]:.2f}\n")

  mms = []
  if "peak" in args.sections:
    log(f"matmul peak ({args.peak_size}^3)")
    if not args.bf16_peak:
      log("bfloat16 matmul peak skipped: this CPU has no native bfloat16 "
          "(--emulated-bf16-peak to time the emulation anyway)")
    mms = matmuls(args.peak_size, skip_torch=args.skip_torch, cpu_dots=args.cpu_dots,
                  bfloat16=args.bf16_peak)
    table = matmul_table(mms, args.peak_size, reps=3)
    if not args.bf16_peak:
      table += ("\n\nbfloat16 not timed: this CPU has no native bfloat16 (`fsjax.cpu`), so it "
                "would be emulated (`--emulated-bf16-peak` times it anyway).")
    print("### Matmul peak\n\n" + table + "\n", flush=True)
  if "throughput" in args.sections:
    log(f"throughput: {args.model}, n = {args.n}, batch {args.batch}, chunks {args.chunk}")
    table = throughput(args.model, dtypes=args.dtypes, chunks=args.chunk, n=args.n,
                       batch=args.batch, reps=args.reps, skip_torch=args.skip_torch,
                       torch_dtypes=args.torch_dtypes, mms=mms, cpu_dots=args.cpu_dots,
                       budget_s=args.budget, started=started)
    print("### Smoothing throughput\n\n" + table + "\n", flush=True)
  if "memory" in args.sections:
    log(f"memory: n in {args.sizes}")
    table = memory_vs_n(args.sizes, n0=100, chunk=smoothing.DEFAULT_CHUNK_SIZE,
                        run=not args.no_memory_run)
    print("### Memory vs n\n\n" + table + "\n", flush=True)
  print(f"* load average at end: {os.getloadavg()[0]:.2f}; total wall time "
        f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
