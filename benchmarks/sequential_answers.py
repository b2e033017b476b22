"""Certified MLLM answers, sequential vs fixed n, on the trained embedded LLaVA: samples and answers/minute.

    python benchmarks/sequential_answers.py --checkpoint runs/llava --images 16
    python benchmarks/sequential_answers.py --checkpoint runs/llava --images 16 --sigma 0.5

The base classifier of ``certify.certify_answers`` (randomized smoothing of the whole MLLM,
docs/method.md 3c): the Fashion-MNIST classification prompt, the ten answers "0"-"9" by
option scoring, in one run:

* fixed n: ``certify.certify_answers(n0, n)``: every image ``n0 + n`` noisy answers,
  Clopper-Pearson;
* sequential: ``certify.sequential_answers(n0, n_max=n)``: each image stops once
  "certified at r" is settled for every r of the program's radii (docs/method.md 3d).

Reports certified answer accuracy at each radius, abstentions, samples per image and
certified answers per minute (wall clock and process CPU time), compilation excluded for
both (each runs once on the first image before it is timed). The two use different noise
streams (``fold_in(key, i)`` vs ``fold_in(fold_in(key, image), chunk)``), so their answers
agree up to sampling. Markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import certify  # noqa: E402
from benchmarks import answers as answers_benchmark  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.sequential import timed  # noqa: E402  (compile-excluding timer)

RADII = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def answerer_of(checkpoint: str):
  """The trained embedded LLaVA's classification answerer (benchmarks/answers.py's model,
  prompt and options), its params and image size."""
  model, params, ids, options, size = answers_benchmark.trained_model(checkpoint)
  answerer = certify.OptionAnswerer(model, ids, np.ones(ids.shape, bool), tuple(options))
  return answerer, params, size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="the trained embedded LLaVA")
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--alpha", type=float, default=1e-3)
  parser.add_argument("--n0", type=int, default=20)
  parser.add_argument("--n", type=int, default=1000, help="fixed n, and n_max")
  parser.add_argument("--chunk", type=int, default=16)
  parser.add_argument("--slots", type=int, default=8)
  args = parser.parse_args()
  from fsjax import data as data_lib  # pylint: disable=g-import-not-at-top
  answerer, params, size = answerer_of(args.checkpoint)
  x, labels, _ = data_lib.load_arrays("fashion_mnist", split="test", image_size=size,
                                      num_examples=args.images, seed=0)
  x, labels = x[:args.images].astype(np.float32), np.asarray(labels[:args.images])
  key = jax.random.key(0)
  runs = {
      "fixed n": lambda images: certify.certify_answers(
          params, images, answerer=answerer, sigma=args.sigma, key=key, n0=args.n0, n=args.n,
          alpha=args.alpha, chunk_size=args.chunk),
      "sequential": lambda images: certify.sequential_answers(
          params, images, answerer=answerer, sigma=args.sigma, key=key, radii=RADII,
          n_max=args.n, n0=args.n0, alpha=args.alpha, chunk_size=args.chunk,
          slots=args.slots),
  }
  rows, rates = [], {}
  for name, run in runs.items():
    common.log(f"{name}: compiling (first image)")
    run(x[:1])
    with timed() as t:
      cert = run(x)
    common.log(f"{name}: {t}")
    rates[name] = (60 * len(x) / t["wall"], 60 * len(x) / t["cpu"])
    acc = cert.certified_accuracy(labels, RADII)
    samples = np.asarray(cert.samples)
    rows.append([name] + [f"{a:.3f}" for a in acc]
                + [f"{cert.abstain_rate:.3f}", f"{np.median(samples):.0f}",
                   f"{samples.mean():.0f}", f"{t['wall']:.0f} / {t['cpu']:.0f}",
                   f"{rates[name][0]:.1f} / {rates[name][1]:.1f}",
                   f"{rates[name][0] / rates['fixed n'][0]:.1f}x / "
                   f"{rates[name][1] / rates['fixed n'][1]:.1f}x"])
  print(f"Certified answers of the embedded LLaVA ({args.checkpoint}), {len(x)} Fashion-MNIST "
        f"test images, sigma = {args.sigma}, alpha = {args.alpha}, n0 = {args.n0}, n = n_max = "
        f"{args.n}, chunk {args.chunk}, {args.slots} slots; `python "
        f"benchmarks/sequential_answers.py --checkpoint {args.checkpoint} --images "
        f"{args.images} --sigma {args.sigma}`; load average {os.getloadavg()[0]:.1f}, "
        f"{jax.devices()[0].platform}. Seconds exclude compilation.\n")
  print(common.markdown_table(
      ["method"] + [f"r={r:g}" for r in RADII]
      + ["abstain", "median samples", "mean samples", "seconds wall / CPU",
         "answers / min, wall / CPU", "vs fixed n, wall / CPU"], rows))


if __name__ == "__main__":
  main()
