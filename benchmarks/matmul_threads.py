r"""How XLA:CPU's and PyTorch's float32 matmuls scale from one core to two, same shapes.

  python benchmarks/matmul_threads.py                    # the small LLaVA's prefill shapes
  python benchmarks/matmul_threads.py --cores 1,2 --shapes 592x512x512,4736x512x1376

Each core count runs in its own child process pinned to that many cores
(``os.sched_setaffinity`` before jax is imported: XLA:CPU sizes its thread pool from the
cores a process may use; torch gets ``torch.set_num_threads``). In each child, every
``[M, K] x [K, N]`` product runs as fsjax runs a float32 weight matmul
(``fsjax.matmul.dot_general`` compiled by ``fsjax.cpu.jit``, i.e. XLA's own dot) and as
``torch.mm``: 3 rounds of ``--reps`` calls per framework, the frameworks alternating
with an idle gap and an untimed call before each block (both keep worker threads spinning
after a parallel call, which takes cores from the other's next call); median of all
timed calls. The table gives GFLOP/s per framework and core count, and each framework's
gain from the extra cores: the part of a two-thread prefill ratio that the weight matmuls
alone decide. (XLA's two-thread calls at 592 rows vary a lot from call to call: 90-320
GFLOP/s at [592, 512] x [512, 1376] on a 2-core AMX Xeon, torch's stay near 360.)

Default shapes: the weight products of the small LLaVA of ``llava_decode.py`` at batch 1
(592 prompt rows) and batch 8 (4,736 rows): the q/k/v/o projections, MLP gate/up, MLP down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_SHAPES = "592x512x512,592x512x1376,592x1376x512,4736x512x512,4736x512x1376"
ROUNDS = 3
# Idle time before each block of one framework's calls (then one untimed call): both keep
# worker threads spinning for a while after a parallel call (torch's OpenMP, XLA's Eigen
# pool), and the other framework's call in that window loses cores to them.
GAP_S = 0.3


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
  """``"MxKxN,..."`` -> ``[(M, K, N), ...]``.

  Raises:
    ValueError: a shape that is not three positive integers joined by ``x``.
  """
  shapes = []
  for item in text.split(","):
    parts = item.strip().lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"--shapes: {item!r} is not MxKxN with positive integers "
                       "(e.g. 592x512x1376)")
    shapes.append(tuple(int(p) for p in parts))
  return shapes


def measure(shapes: list[tuple[int, int, int]], reps: int, threads: int,
            gap_s: float = GAP_S) -> dict[str, list[float]]:
  """GFLOP/s of fsjax's and torch's float32 ``[M, K] x [K, N]`` per shape, in this
  process (its cores as they are; torch on ``threads`` threads): medians of
  ``ROUNDS x reps`` calls after a warm-up, in blocks of ``reps`` calls, the frameworks
  alternating, ``gap_s`` idle before each block. Returns ``{"fsjax": [...], "torch": [...]}``."""
  import torch  # pylint: disable=g-import-not-at-top

  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    return _measure(shapes, reps, gap_s)
  finally:
    torch.set_num_threads(before)


def _measure(shapes, reps, gap_s):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from fsjax import cpu  # pylint: disable=g-import-not-at-top
  from fsjax import matmul  # pylint: disable=g-import-not-at-top

  dims = (((1,), (0,)), ((), ()))
  product = cpu.jit(lambda x, w: matmul.dot_general(x, w, dims))
  rng = np.random.default_rng(0)
  out = {"fsjax": [], "torch": []}
  for m, k, n in shapes:
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    runs = {"fsjax": lambda: jax.block_until_ready(product(xj, wj)),
            "torch": lambda: torch.mm(xt, wt)}
    times = {name: [] for name in runs}
    for run in runs.values():
      run()
    for _ in range(ROUNDS):  # blocks of calls, frameworks alternating, an idle gap between
      for name, run in runs.items():
        time.sleep(gap_s)
        run()  # untimed: wakes the framework's worker threads
        for _ in range(reps):
          t = time.perf_counter()
          run()
          times[name].append(time.perf_counter() - t)
    for name in runs:
      out[name].append(2 * m * k * n / statistics.median(times[name]) / 1e9)
  return out


def _child(args) -> None:
  """Pins this process to the first ``--child`` allowed cores, then measures (JSON out)."""
  allowed = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, allowed[:args.child])
  print(json.dumps(measure(parse_shapes(args.shapes), args.reps, args.child)))


def table(shapes, results: dict[int, dict[str, list[float]]]) -> str:
  """The Markdown table: GFLOP/s per (framework, cores) and each framework's gain from
  its fewest to its most cores."""
  from common import markdown_table  # pylint: disable=g-import-not-at-top

  cores = sorted(results)
  header = ["[M, K] x [K, N]"] + [f"{name} {c} core{'s' if c > 1 else ''} (GFLOP/s)"
                                  for c in cores for name in ("fsjax", "torch")]
  if len(cores) > 1:
    header += [f"fsjax gain {cores[0]} -> {cores[-1]}", f"torch gain {cores[0]} -> {cores[-1]}"]
  rows = []
  for i, (m, k, n) in enumerate(shapes):
    row = [f"[{m}, {k}] x [{k}, {n}]"]
    row += [f"{results[c][name][i]:.0f}" for c in cores for name in ("fsjax", "torch")]
    if len(cores) > 1:
      row += [f"{results[cores[-1]][name][i] / results[cores[0]][name][i]:.2f}x"
              for name in ("fsjax", "torch")]
    rows.append(row)
  return markdown_table(header, rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="MxKxN,... (float32)")
  parser.add_argument("--cores", default="1,2", help="core counts, one child process each")
  parser.add_argument("--reps", type=int, default=10,
                      help="timed calls per product and round")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    shapes = parse_shapes(args.shapes)
  except ValueError as e:
    parser.error(str(e))
  if args.reps < 1:
    parser.error("--reps must be at least 1")
  if args.child:
    _child(args)
    return
  available = len(os.sched_getaffinity(0))
  try:
    cores = sorted({int(c) for c in args.cores.split(",")})
  except ValueError:
    parser.error(f"--cores {args.cores!r}: give core counts such as 1,2")
  if not cores or cores[0] < 1:
    parser.error("--cores: core counts must be at least 1")
  skipped = [c for c in cores if c > available]
  cores = [c for c in cores if c <= available]
  if not cores:
    parser.error(f"--cores: this process may use {available} core(s) only")
  results = {}
  for c in cores:
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", str(c), "--shapes", args.shapes,
         "--reps", str(args.reps)], capture_output=True, text=True, check=False)
    if child.returncode:
      sys.exit(f"the {c}-core child failed:\n{child.stderr[-2000:]}")
    results[c] = json.loads(child.stdout.strip().splitlines()[-1])
  print(f"### float32 matmuls on 1 and more cores: fsjax (XLA:CPU) and torch\n\n"
        f"`python benchmarks/matmul_threads.py {' '.join(sys.argv[1:] if argv is None else argv)}`;"
        f" load average {os.getloadavg()[0]:.2f}; median of {ROUNDS} x {args.reps} calls per "
        "product (blocks, the frameworks alternating), one child process per core count.\n")
  print(table(shapes, results))
  if skipped:
    print(f"\nNot run: {', '.join(map(str, skipped))} cores (this process may use {available}).")


if __name__ == "__main__":
  main()
