r"""One accelerator check, one table: what a lent GPU/TPU does with fsjax in a few minutes.

  bash benchmarks/gpu_check.sh              # GPU / TPU: full shapes, under 8 minutes
  bash benchmarks/gpu_check.sh --tiny       # any device (CPU too): tiny shapes, seconds
  python benchmarks/gpu_check.py --tiny     # the same without the shell wrapper

Rows (each timed after compilation and one warm-up call, best of ``--reps`` calls):

* **peak**: one ``S x S x S`` matmul (``jnp.dot``), float32 and bfloat16 inputs with
  float32 accumulation; the device's own measured peak, the roofline's denominator.
* **smoothing**: samples/s of ``fsjax.smoothing.smoothed_features`` (jitted end to end)
  on a random-init CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower), float32 and bfloat16,
  several chunk sizes; GFLOP/s from ``analytic_vit_flops`` and % of the same dtype's peak.
* **llava prefill / decode**: a random-init LLaVA-1.5-7B-shaped model (ViT-L/14-336 +
  LLaMA-7B shapes), bfloat16: prefill (image -> tower -> projector -> LLaMA over the 576
  image tokens and the prompt -> first token) in tokens/s, and greedy decoding in new
  tokens/s (``(N - 1) / (t(N) - t(1))`` per row, EOS unreachable), for batch 1 and a batch
  of noise samples (``--noise-batch``); prefill GFLOP/s from the weight matmuls a prefill
  needs (``llava_decode.weight_products``: attention and the vision tower not counted).
* **option scoring**: the same model scoring 4 options of 3 tokens after the prompt
  (``Llava.option_scores``: one prefill + one batched pass), per image.
* **answers**: noisy answers/s of the same model as the base classifier of an
  end-to-end answer certificate (``benchmarks/answers.py``): one image plus
  ``--noise-batch`` Gaussian noise draws (sigma 0.25, unclipped) -> tower -> projector ->
  option scoring -> argmax, one by one and batched over the noise samples, with the
  ratio (the same shapes as the rows above, so no new compilation on full shapes).
* **certificate**: ``certify.fcsb`` (two-stage Monte Carlo, Bernstein bound, closed form)
  end to end on a batch of images through the ViT-L/14-336 tower in bfloat16: images/s
  and samples/s.

``--tiny`` swaps every model for a tiny one (32-px CLIP, 2-layer LLaMA of width 64),
one chunk size per dtype and one LLaVA batch (2), so the script runs in seconds on a CPU
(mostly compilation): that is what the test suite runs. Full shapes on
a CPU would take hours, so the script refuses them there. No new compilation starts after
``--budget`` seconds (its row then says "skipped: budget"); a row that fails says why
and the others still run. The table goes to stdout (and ``$OUT/gpu_check.md`` when OUT
is set), progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import log  # noqa: E402
from common import markdown_table  # noqa: E402

# Imported in main, after the device check (a refusal on CPU should not wait for them).
certify = clip = smoothing = llava_decode = smoothing_throughput = answers = None

SIGMA = 0.25
# LLaVA-1.5's tower: openai/clip-vit-large-patch14-336.
VIT_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
# As configs/clip_tiny.py (benchmarks/smoothing_throughput.py's "tiny").
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
TINY_LLAVA = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16),
    text=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0))
TINY_IMAGE_TOKEN = 200


@dataclasses.dataclass
class Settings:
  tiny: bool
  peak_size: int
  smoothing_n: int
  smoothing_chunks: dict[str, list[int]]  # dtype -> chunk sizes
  llava: dict
  image_token: int
  new_tokens: int
  noise_batch: int
  cert_images: int
  cert_n: int
  cert_n0: int
  cert_chunk: int


def settings(args) -> Settings:
  if args.tiny:
    # One chunk per dtype and one LLaVA batch: the fewest compilations that run every row.
    return Settings(True, 256, 16, {"float32": [8], "bfloat16": [8]}, TINY_LLAVA,
                    TINY_IMAGE_TOKEN, 3, 2, 2, 32, 8, 8)
  return Settings(False, 8192, 1024, {"float32": [128], "bfloat16": [128, 512]},
                  llava_decode.SEVEN_B, llava_decode.IMAGE, 32, args.noise_batch, 4, 2048, 128,
                  256)


class Check:
  """Runs the rows, keeps the table, respects the budget."""

  def __init__(self, budget: float, reps: int):
    self.t0 = time.perf_counter()
    self.budget = budget
    self.reps = reps
    self.rows: list[list[str]] = []
    self.peaks: dict[str, float] = {}

  def over_budget(self) -> bool:
    return time.perf_counter() - self.t0 > self.budget

  def best(self, fn) -> float:
    """Seconds of the fastest of ``reps`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(self.reps):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return min(times)

  def row(self, section: str, config: str, fn) -> None:
    """``fn() -> (value, unit, GFLOP/s or None, dtype of the peak)``, or an error row."""
    if self.over_budget():
      self.rows.append([section, config, "skipped: budget", "", "", ""])
      log(f"{section} {config}: skipped (budget of {self.budget:.0f} s spent)")
      return
    t = time.perf_counter()
    try:
      value, unit, gflops, dtype = fn()
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stderr)
      self.rows.append([section, config, f"error: {type(e).__name__}: {str(e)[:80]}", "", "",
                        ""])
      return
    peak = self.peaks.get(dtype) if gflops is not None else None
    self.rows.append([section, config, _num(value), unit,
                      "" if gflops is None else _num(gflops),
                      "" if not peak else f"{100 * gflops / peak:.0f}%"])
    log(f"{section} {config}: {_num(value)} {unit} ({time.perf_counter() - t:.1f} s)")


def _num(v: float) -> str:
  if v != v:  # nan
    return "n/a"
  return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def peak_rows(check: Check, s: Settings) -> None:
  size = s.peak_size
  for dtype in ("float32", "bfloat16"):
    def run(dtype=dtype):
      a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
      dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
      reps = 1 if s.tiny else 10  # back to back: one launch would hide nothing on a GPU

      def call():
        out = None
        for _ in range(reps):
          out = dot(a, a)
        out.block_until_ready()
      gflops = reps * 2 * size ** 3 / check.best(call) / 1e9
      check.peaks[dtype] = gflops
      return gflops, "GFLOP/s", gflops, dtype
    check.row("peak", f"matmul {size}^3, {dtype} inputs, float32 accumulation", run)


def smoothing_rows(check: Check, s: Settings) -> None:
  arch = TINY_VIT if s.tiny else VIT_L14_336
  name = "tiny CLIP 32 px" if s.tiny else "ViT-L/14@336"
  flops = smoothing_throughput.analytic_vit_flops(arch)
  config = clip.CLIPConfig.from_hf_dict(dict(arch, model_type="clip_vision_model"))
  x = jnp.asarray(np.random.default_rng(0).uniform(
      size=(1, arch["image_size"], arch["image_size"], 3)).astype(np.float32))
  for dtype, chunks in s.smoothing_chunks.items():
    model, params = clip.init(config, seed=0, dtype=smoothing_throughput.JAX_DTYPES[dtype])
    encoder = clip.ClipEncoder(resolution=arch["image_size"], model=model)
    for chunk in chunks:
      def run(dtype=dtype, chunk=chunk, encoder=encoder, params=params):
        smooth = jax.jit(lambda p, x, k: smoothing.smoothed_features(
            p, x, encoder=encoder, sigma=SIGMA, n=s.smoothing_n, key=k, chunk_size=chunk))
        key = jax.random.key(0)
        rate = s.smoothing_n / check.best(lambda: smooth(params, x, key).block_until_ready())
        return rate, "samples/s", rate * flops / 1e9, dtype
      check.row("smoothing", f"{name}, n = {s.smoothing_n}, {dtype}, chunk {chunk}", run)
    del params


def llava_rows(check: Check, s: Settings) -> None:
  if check.over_budget():
    check.rows.append(["llava", "all rows", "skipped: budget", "", "", ""])
    return
  shapes = s.llava
  t0 = time.perf_counter()
  model, params = llava_decode._fsjax_random(shapes, jnp.bfloat16,  # pylint: disable=protected-access
                                             image_token=s.image_token)
  vocab = shapes["text"]["vocab_size"]
  model = dataclasses.replace(model, eos_token_id=vocab)  # EOS unreachable: N tokens always
  log(f"random-init LLaVA ({'tiny' if s.tiny else '7B shapes'}) in "
      f"{time.perf_counter() - t0:.1f} s")
  size = shapes["vision"]["image_size"]
  t = (size // shapes["vision"]["patch_size"]) ** 2
  rng = np.random.default_rng(0)
  for b in ((s.noise_batch,) if s.tiny else (1, s.noise_batch)):
    images = jnp.asarray(rng.uniform(size=(b, size, size, 3)).astype(np.float32))
    ids = np.array([[1] + list(rng.integers(3, 100, 5)) + [s.image_token] * t
                    + list(rng.integers(3, 100, 10)) for _ in range(b)])
    length = ids.shape[1]

    def generate(k, images=images, ids=ids):
      feats = model.image_features(params, images)
      return lambda: model.generate_ids(params, ids, feats, max_new_tokens=k)[0].block_until_ready()

    def full(k, images=images, ids=ids):  # image -> tower -> ... -> k tokens
      def call():
        feats = model.image_features(params, images)
        model.generate_ids(params, ids, feats, max_new_tokens=k)[0].block_until_ready()
      return call

    def prefill(b=b, length=length, full=full):
      sec = check.best(full(1))
      flops = 2 * sum(m * k * n for m, k, n in llava_decode.weight_products(
          params["language"], b, length, t))
      return b * length / sec, "prompt tokens/s", flops / sec / 1e9, \
          "bfloat16"

    def decode(b=b, generate=generate):
      t1 = check.best(generate(1))
      tn = check.best(generate(s.new_tokens))
      if tn <= t1:  # timing noise swamped the N - 1 steps: no rate to report
        return float("nan"), "new tokens/s (t(N) <= t(1): noise, raise --reps)", None, "bfloat16"
      return b * (s.new_tokens - 1) / (tn - t1), "new tokens/s", None, "bfloat16"

    def options(b=b, images=images, ids=ids):
      feats = model.image_features(params, images)
      opts = [list(rng.integers(3, 100, 3)) for _ in range(4)]
      sec = check.best(lambda: model.option_scores(params, ids, feats, opts).block_until_ready())
      return b / sec, "images/s (4 options x 3 tokens)", None, "bfloat16"

    check.row("llava prefill", f"bfloat16, batch {b}, {length} tokens (image + prompt)", prefill)
    check.row("llava decode", f"bfloat16, batch {b}, {s.new_tokens} new tokens", decode)
    check.row("llava options", f"bfloat16, batch {b}, option scoring", options)
  answer_rows(check, s, model, params, ids[:1], size)
  del params


def answer_rows(check: Check, s: Settings, model, params, ids: np.ndarray, size: int) -> None:
  """Noisy answers/s by option scoring: one by one, then batched over noise samples."""
  nb = s.noise_batch
  image = np.random.default_rng(2).uniform(size=(1, size, size, 3)).astype(np.float32)
  noisy = np.asarray(answers.add_noise(jax.random.key(1), jnp.asarray(np.repeat(image, nb, 0)),
                                       jnp.float32(SIGMA)))
  opts = [list(np.random.default_rng(3 + k).integers(3, 100, 3)) for k in range(4)]
  rates = {}

  def run(b):
    ids_b = np.repeat(ids, b, 0)
    valid = np.ones_like(ids_b, bool)

    def call():
      for i in range(0, nb, b):
        out = answers.option_answers(model, params, noisy[i:i + b], ids_b, valid, opts)
      out.block_until_ready()
    rates[b] = nb / check.best(call)
    unit = "noisy answers/s"
    if b == nb and 1 in rates:
      unit += f" ({rates[nb] / rates[1]:.1f}x one by one)"
    return rates[b], unit, None, "bfloat16"
  for b, what in ((1, "one by one"), (nb, f"batched over {nb} noise samples")):
    check.row("answers", f"bfloat16, sigma {SIGMA}, 4 options, {what}",
              lambda b=b: run(b))


def certificate_rows(check: Check, s: Settings) -> None:
  arch = TINY_VIT if s.tiny else VIT_L14_336
  name = "tiny CLIP 32 px" if s.tiny else "ViT-L/14@336"
  dtype = "float32" if s.tiny else "bfloat16"
  config = clip.CLIPConfig.from_hf_dict(dict(arch, model_type="clip_vision_model"))

  def run():
    model, params = clip.init(config, seed=0, dtype=smoothing_throughput.JAX_DTYPES[dtype])
    encoder = clip.ClipEncoder(resolution=arch["image_size"], model=model)
    x = jnp.asarray(np.random.default_rng(1).uniform(
        size=(s.cert_images, arch["image_size"], arch["image_size"], 3)).astype(np.float32))
    fn = jax.jit(lambda p, x, k: certify.fcsb(
        p, x, encoder=encoder, sigma=SIGMA, eps=jnp.asarray([0.25, 0.5]), key=k, n=s.cert_n,
        n0=s.cert_n0, chunk_size=s.cert_chunk))
    key = jax.random.key(0)
    sec = check.best(lambda: jax.block_until_ready(fn(params, x, key)))
    log(f"certificate: {s.cert_images / sec:.3g} images/s, "
        f"{s.cert_images * (s.cert_n + s.cert_n0) / sec:,.0f} samples/s")
    return s.cert_images / sec, f"images/s ({s.cert_n0} + {s.cert_n} samples each)", None, dtype
  check.row("certificate", f"certify.fcsb, {name}, {dtype}, {s.cert_images} images, "
            f"chunk {s.cert_chunk}", run)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      default=bool(os.environ.get("GPU_CHECK_TINY")),
                      help="tiny shapes (seconds, any device); also GPU_CHECK_TINY=1")
  parser.add_argument("--budget", type=float, default=None,
                      help="no new row starts after this many seconds (default 400; tiny 300)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--noise-batch", type=int, default=8,
                      help="the batched LLaVA rows' batch (noise samples of one image)")
  parser.add_argument("--sections", default="peak,smoothing,llava,certificate")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  if backend == "cpu" and not args.tiny:
    print("gpu_check: JAX sees no GPU/TPU. The full shapes (ViT-L/14@336, LLaVA-7B) would take "
          "hours on a CPU: pass --tiny (or GPU_CHECK_TINY=1) for the tiny-shape run.",
          file=sys.stderr)
    return 2
  global certify, clip, smoothing, llava_decode, smoothing_throughput, answers  # pylint: disable=global-statement
  import answers  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import certify  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from fsjax import clip  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from fsjax import smoothing  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import llava_decode  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import smoothing_throughput  # pylint: disable=g-import-not-at-top,redefined-outer-name
  s = settings(args)
  budget = args.budget if args.budget is not None else (300.0 if args.tiny else 400.0)
  check = Check(budget, args.reps)
  device = jax.devices()[0]
  log(f"jax {jax.__version__} on {backend}: {device.device_kind}; tiny={s.tiny}")
  sections = args.sections.split(",")
  unknown = set(sections) - {"peak", "smoothing", "llava", "certificate"}
  if unknown:
    parser.error(f"--sections: unknown {sorted(unknown)}; choose from peak, smoothing, llava, "
                 "certificate.")
  for name, fn in (("peak", peak_rows), ("smoothing", smoothing_rows), ("llava", llava_rows),
                   ("certificate", certificate_rows)):
    if name in sections:
      fn(check, s)
  elapsed = time.perf_counter() - check.t0
  report = (f"### fsjax accelerator check ({'tiny shapes' if s.tiny else 'full shapes'})\n\n"
            f"`bash benchmarks/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" on {device.device_kind} ({backend}, jax {jax.__version__}); best of {args.reps} "
            f"calls after compilation; {elapsed:.0f} s in all. % of peak: against the same "
            "dtype's matmul row.\n\n"
            + markdown_table(["section", "configuration", "value", "unit", "GFLOP/s",
                              "% of peak"], check.rows))
  print(report, flush=True)
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.md"), "w", encoding="utf-8") as f:
      f.write(report + "\n")
  return 1 if any(r[2].startswith("error") for r in check.rows) else 0


if __name__ == "__main__":
  sys.exit(main())
