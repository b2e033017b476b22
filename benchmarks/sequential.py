"""Sequential vs fixed-n certification on the embedded default: samples and certificates/minute.

The decisions "cos(f_s(x'), u) >= 0.5 for every ||x' - x|| <= eps" over Table 1's eps grid,
on the embedded default's encoder (EfficientNet-Lite0, configs/default.py, no booster) and
its Fashion-MNIST test images, in one run:

* fixed n: ``certify.norm_aware_fcsb(bound="betting", n=N)``, every image N samples (its
  inner product bound B is the baseline of the inner-product rows, its cosine B / U that of
  the norm-aware rows);
* sequential: ``certify.sequential_fcsb(n_max=N)``, inner-product and norm-aware, with
  each futility rule of ``--futility`` (``predictive``, the default, and ``confident``:
  when a decision is given up; docs/method.md 2b).

Reports the decisions each certifies, where they disagree, samples per image (median and
mean) and certificates (images) per minute, compilation *excluded* for both (a long run
compiles once and certifies thousands of images): each method's program is compiled
before it is timed (fixed n: ``jit``'s ahead-of-time ``lower(...).compile()`` of its
program, which the call then reuses; sequential: one device call of the engine, stopped by
its progress callback), and what still compiles in the timed call (the small programs that
assemble the certificate; ``jax.monitoring``'s compile events) is shown in brackets. Two
rates: wall clock, and process CPU time (on a machine shared with other jobs the wall clock
of two calls minutes apart differs with the load, the CPU time a call needs much less so).
The machine is shared, so compare rows of one run only. ``--fixed-images K``
runs fixed n on the first K images only (its work per image does not depend on the image,
so its certificates per minute do not either): decisions are compared on those K, samples
and certificates per minute of the sequential rows are over all images.

    python benchmarks/sequential.py                  # N = 10,000, 8 images, sigma 0.25
    python benchmarks/sequential.py --sigma 0.5 --images 32 --fixed-images 8
    python benchmarks/sequential.py --images 32 --fixed-images 8 --futility predictive confident
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

import certify  # noqa: E402
from benchmarks import common  # noqa: E402
from configs import default as default_config  # noqa: E402
from fsjax import data as data_lib  # noqa: E402
from fsjax import encoders  # noqa: E402

EPS = [0.125, 0.25, 0.375, 0.5, 0.75]  # Table 1's grid
COS = 0.5

_COMPILE_SECONDS = [0.0]


def _on_event(event: str, seconds: float, **_) -> None:
  # Tracing, lowering and XLA compilation: what the first call of a new shape pays.
  if event.startswith("/jax/core/compile/"):
    _COMPILE_SECONDS[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def timed():
  """Yields a dict that gets the ``wall`` and ``cpu`` seconds of the block and the seconds
  of the compile events inside it (``compile``, already part of both)."""
  out = {}
  compile0, wall0, cpu0 = _COMPILE_SECONDS[0], time.perf_counter(), time.process_time()
  yield out
  out["wall"] = time.perf_counter() - wall0
  out["cpu"] = time.process_time() - cpu0
  out["compile"] = _COMPILE_SECONDS[0] - compile0


class _Compiled(Exception):
  """Raised by the progress callback of the warm-up call: the engine has compiled."""


def _stop_after_one_call(samples: int) -> None:
  raise _Compiled


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000, help="fixed n, and n_max")
  parser.add_argument("--n0", type=int, default=100)
  parser.add_argument("--images", type=int, default=8)
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--alpha", type=float, default=1e-3)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--stop", default="decision",
                      choices=["decision", "radius", "decision_and_radius"],
                      help="sequential stop rule (radius: within --tolerance of n_max's)")
  parser.add_argument("--tolerance", type=float, default=0.03)
  parser.add_argument("--futility", nargs="+", default=["predictive"],
                      choices=["predictive", "confident"],
                      help="sequential futility rules to run (when to give up a decision)")
  parser.add_argument("--steps-per-call", type=int, default=8,
                      help="sequential engine steps per device call")
  parser.add_argument("--fixed-images", type=int, default=None,
                      help="run fixed n on the first K images only (default: all)")
  parser.add_argument("--fixed-repeat", action="store_true",
                      help="run fixed n once more with another key and count the decisions "
                      "that differ between the two fixed-n runs (fixed n's own noise floor)")
  parser.add_argument("--variants", nargs="+", default=["inner", "norm-aware"],
                      choices=["inner", "norm-aware"], help="sequential variants to run")
  args = parser.parse_args()
  config = default_config.get_config()
  encoder, params = encoders.build(config.encoder)
  x, _, _ = data_lib.load_arrays(config.data.name, split=config.data.split,
                                 image_size=config.data.image_size,
                                 num_examples=args.images, seed=config.data.seed)
  key = jax.random.PRNGKey(0)
  rows, decisions = [], {}

  k = len(x) if args.fixed_images is None else min(args.fixed_images, len(x))
  common.log(f"fixed n = {args.n} on {k} images")
  with timed() as warm:  # compile the fixed-n program without running it
    certify._norm._bounds_of.lower(
        params, jnp.asarray(x[:k], jnp.float32), key, jnp.float32(args.sigma),
        encoder=encoder, n0=args.n0, n=args.n, alpha=args.alpha, bound="betting",
        chunk_size=args.chunk).compile()
  common.log(f"fixed n compiled: {warm}")
  with timed() as t:
    fixed = certify.norm_aware_fcsb(params, x[:k], encoder=encoder, sigma=args.sigma,
                                    eps=EPS, key=key, n=args.n, n0=args.n0, alpha=args.alpha,
                                    bound="betting", chunk_size=args.chunk)
    jax.block_until_ready(fixed.cosine_bound)
  common.log(f"fixed n: {t}")
  # One fixed-n run gives both baselines: the norm-aware cosine and the inner product
  # bound B (each at level alpha / 2 there, so B is a little below fcsb's at alpha).
  base = {False: np.asarray(fixed.inner_product_bound) >= COS,
          True: np.asarray(fixed.cosine_bound) >= COS}
  z = -stats.norm.ppf(np.clip(np.asarray(fixed.deficit, np.float64), 1e-12, 1.0))
  base_radius = {False: np.maximum(args.sigma * (z - stats.norm.ppf((1 + COS) / 2)), 0.0),
                 True: np.asarray(certify.norm_aware_radius(
                     fixed.deficit, fixed.norm_upper, args.sigma, COS))}
  if args.fixed_repeat:  # the same program with key 1: how repeatable is fixed n itself?
    again = certify.norm_aware_fcsb(params, x[:k], encoder=encoder, sigma=args.sigma, eps=EPS,
                                    key=jax.random.PRNGKey(1), n=args.n, n0=args.n0,
                                    alpha=args.alpha, bound="betting", chunk_size=args.chunk)
    for name, first, second in (("norm-aware", fixed.cosine_bound, again.cosine_bound),
                                ("inner product", fixed.inner_product_bound,
                                 again.inner_product_bound)):
      first, second = np.asarray(first), np.asarray(second)
      differ = (first >= COS) != (second >= COS)
      common.log(f"fixed n, key 0 vs key 1, {name}: {int(differ.sum())} of {differ.size} "
                 "decisions differ" + "".join(
                     f"; image {i}, eps {EPS[j]}: {first[i, j]:.4f} vs {second[i, j]:.4f}"
                     for i, j in zip(*np.nonzero(differ))))
  samples = np.full(k, args.n0 + args.n)
  fixed_rate = 60 * k / t["wall"]
  fixed_cpu_rate = 60 * k / t["cpu"]
  # Encoder passes: fixed n draws the n0 + n samples in chunks of `chunk` (padded).
  fixed_drawn = k * args.chunk * (-(-args.n0 // args.chunk) - (-args.n // args.chunk))

  def seconds(t):
    return f"{t['wall']:.0f} / {t['cpu']:.0f} ({t['compile']:.0f})"
  rows.append([f"fixed n, betting, norm-aware ({k} images)", f"{base[True].mean():.3f}", "-",
               "-", f"{np.median(samples):.0f}", f"{samples.mean():.0f}",
               f"{fixed_drawn / k:.0f}", seconds(t), f"{fixed_drawn / t['cpu']:.0f}",
               f"{fixed_rate:.2f} / {fixed_cpu_rate:.2f}", "1 / 1"])

  stop = "" if args.stop == "decision" else f", stop={args.stop} ({args.tolerance:g})"
  runs = [(f"sequential, {variant}{stop}, {futility}", variant == "norm-aware", futility)
          for variant in ("inner product", "norm-aware") for futility in args.futility
          if ("norm-aware" if variant == "norm-aware" else "inner") in args.variants]
  for name, norm_aware, futility in runs:
    common.log(f"{name}, n_max = {args.n}")
    run = functools.partial(
        certify.sequential_fcsb, params, x, encoder=encoder, sigma=args.sigma, eps=EPS,
        key=key, cos=COS, n_max=args.n, n0=args.n0, alpha=args.alpha, norm_aware=norm_aware,
        chunk_size=args.chunk, slots=args.slots, steps_per_call=args.steps_per_call,
        stop=args.stop, tolerance=args.tolerance, futility=futility)
    with timed() as warm:  # one device call compiles the engine (its shapes do not
      try:                 # depend on the number of images)
        run(progress=_stop_after_one_call)
      except _Compiled:
        pass
    common.log(f"{name} compiled: {warm}")
    drawn = []
    with timed() as t:
      seq = run(progress=drawn.append)
      jax.block_until_ready(seq.radius)
    common.log(f"{name}: {t}")
    decisions[name] = np.asarray(seq.certified)
    samples = np.asarray(seq.samples)
    differ = int(np.sum(decisions[name][:k] != base[norm_aware]))
    fixed_radius = base_radius[norm_aware]
    # Radius within 5%: where both certify the largest eps they share, compare radii.
    ratio = np.asarray(seq.radius)[:k] / np.maximum(np.asarray(fixed_radius), 1e-12)
    both = (np.asarray(seq.radius)[:k] > 0) & (np.asarray(fixed_radius) > 0)
    ratio_text = (f"{np.min(ratio[both]):.3f}-{np.max(ratio[both]):.3f} "
                  f"({np.sum(ratio[both] >= 0.95)} of {np.sum(both)} >= 0.95)" if both.any()
                  else "-")
    rate, cpu_rate = 60 * len(x) / t["wall"], 60 * len(x) / t["cpu"]
    rows.append([f"{name} ({len(x)} images)", f"{decisions[name].mean():.3f}",
                 f"{differ} of {base[norm_aware].size}", ratio_text,
                 f"{np.median(samples):.0f}", f"{samples.mean():.0f}",
                 f"{sum(drawn) / len(x):.0f}", seconds(t),
                 f"{sum(drawn) / t['cpu']:.0f}", f"{rate:.2f} / {cpu_rate:.2f}",
                 f"{rate / fixed_rate:.1f}x / {cpu_rate / fixed_cpu_rate:.1f}x"])
    common.log(f"samples per image: {samples.tolist()}")
    fixed_cos = np.asarray(fixed.cosine_bound if norm_aware else fixed.inner_product_bound)
    # How close each fixed-n image sits to a decision: the hard images are those whose
    # fixed-n bound is within a hair of cos at some eps (no method can match that decision
    # cheaply).
    gap = np.min(np.abs(fixed_cos - COS), axis=1)
    common.log("fixed-n images, samples used / closest |fixed-n cosine - cos|: "
               + ", ".join(f"{samples[i]} / {gap[i]:.4f}" for i in range(k)))
    for i, j in zip(*np.nonzero(decisions[name][:k] != base[norm_aware])):
      common.log(f"differs: image {i}, eps {EPS[j]}: fixed n {fixed_cos[i, j]:.4f}, "
                 f"sequential {np.asarray(seq.cosine_bound)[i, j]:.4f} after {samples[i]} "
                 f"samples")

  print(f"Decisions cos >= {COS} at eps in {EPS} on {len(x)} images of the embedded default "
        f"(EfficientNet-Lite0, no booster), sigma = {args.sigma}, alpha = {args.alpha}, "
        f"n (fixed) = n_max = {args.n}, n0 = {args.n0}, chunk {args.chunk}, "
        f"{args.slots} slots, {args.steps_per_call} steps per call; `python "
        f"benchmarks/sequential.py --n {args.n} --images {args.images} --fixed-images {k} "
        f"--sigma {args.sigma} --stop {args.stop} --futility {' '.join(args.futility)}`; load average {os.getloadavg()[0]:.1f}, "
        f"{jax.devices()[0].platform}. Seconds exclude compilation (what still compiled in "
        f"brackets); rates are "
        f"wall clock / CPU time; encoder passes include chunk padding (and, sequential, "
        f"the steps' f(x) passes are not counted).\n")
  print(common.markdown_table(
      ["method", "fraction certified", "decisions differing from fixed n",
       "radius / fixed n's radius (min-max)", "median samples / image",
       "mean samples / image", "encoder passes / image", "seconds wall / CPU (compile)",
       "passes / CPU s", "certificates / min, wall / CPU", "vs fixed n, wall / CPU"], rows))


if __name__ == "__main__":
  main()
