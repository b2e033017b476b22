"""Sequential vs fixed-n certification on the embedded default: samples and certificates/minute.

The decisions "cos(f_s(x'), u) >= 0.5 for every ||x' - x|| <= eps" over Table 1's eps grid,
on the embedded default's encoder (EfficientNet-Lite0, configs/default.py, no booster) and
its Fashion-MNIST test images, in one run:

* fixed n: ``certify.fcsb(bound="betting", reference="mean", n=N)``, every image N samples;
* sequential: ``certify.sequential_fcsb(n_max=N)``, inner-product and norm-aware.

Reports the decisions each certifies, where they disagree, samples per image (median and
mean) and wall-clock certificates (images) per minute, compile time included for both (one
call each; the machine is shared, so compare rows of one run only).

    python benchmarks/sequential.py                  # N = 10,000, 8 images, sigma 0.25
    python benchmarks/sequential.py --sigma 0.5 --images 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import certify  # noqa: E402
from benchmarks import common  # noqa: E402
from configs import default as default_config  # noqa: E402
from fsjax import data as data_lib  # noqa: E402
from fsjax import encoders  # noqa: E402

EPS = [0.125, 0.25, 0.375, 0.5, 0.75]  # Table 1's grid
COS = 0.5


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000, help="fixed n, and n_max")
  parser.add_argument("--n0", type=int, default=100)
  parser.add_argument("--images", type=int, default=8)
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--alpha", type=float, default=1e-3)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--slots", type=int, default=8)
  args = parser.parse_args()
  config = default_config.get_config()
  encoder, params = encoders.build(config.encoder)
  x, _, _ = data_lib.load_arrays(config.data.name, split=config.data.split,
                                 image_size=config.data.image_size,
                                 num_examples=args.images, seed=config.data.seed)
  key = jax.random.PRNGKey(0)
  rows, decisions = [], {}

  common.log(f"fixed n = {args.n} on {len(x)} images")
  start = time.perf_counter()
  fixed = certify.fcsb(params, x, encoder=encoder, sigma=args.sigma, eps=EPS, key=key,
                       n=args.n, n0=args.n0, alpha=args.alpha, bound="betting",
                       reference="mean", chunk_size=args.chunk)
  cos_fixed = np.asarray(jax.block_until_ready(fixed.cosine_bound))
  seconds = time.perf_counter() - start
  decisions["fixed"] = cos_fixed >= COS
  samples = np.full(len(x), args.n0 + args.n)
  rows.append(["fixed n, betting", f"{decisions['fixed'].mean():.3f}", "-",
               f"{np.median(samples):.0f}", f"{samples.mean():.0f}", f"{seconds:.1f}",
               f"{60 * len(x) / seconds:.2f}"])

  for name, norm_aware in (("sequential, inner product", False),
                           ("sequential, norm-aware", True)):
    common.log(f"{name}, n_max = {args.n}")
    start = time.perf_counter()
    seq = certify.sequential_fcsb(params, x, encoder=encoder, sigma=args.sigma, eps=EPS,
                                  key=key, cos=COS, n_max=args.n, n0=args.n0,
                                  alpha=args.alpha, norm_aware=norm_aware,
                                  chunk_size=args.chunk, slots=args.slots)
    seconds = time.perf_counter() - start
    decisions[name] = np.asarray(seq.certified)
    samples = np.asarray(seq.samples)
    differ = int(np.sum(decisions[name] != decisions["fixed"]))
    rows.append([name, f"{decisions[name].mean():.3f}", str(differ),
                 f"{np.median(samples):.0f}", f"{samples.mean():.0f}", f"{seconds:.1f}",
                 f"{60 * len(x) / seconds:.2f}"])
    common.log(f"samples per image: {samples.tolist()}")

  print(f"Decisions cos >= {COS} at eps in {EPS} on {len(x)} images of the embedded default "
        f"(EfficientNet-Lite0, no booster), sigma = {args.sigma}, alpha = {args.alpha}, "
        f"n (fixed) = n_max = {args.n}, n0 = {args.n0}, chunk {args.chunk}, "
        f"{args.slots} slots; `python benchmarks/sequential.py --n {args.n} --images "
        f"{args.images} --sigma {args.sigma}`; load average {os.getloadavg()[0]:.1f}, "
        f"{jax.devices()[0].platform}. Seconds include compilation.\n")
  print(common.markdown_table(
      ["method", "fraction certified", "decisions differing from fixed n",
       "median samples / image", "mean samples / image", "seconds", "certificates / min"],
      rows))


if __name__ == "__main__":
  main()
