r"""How XLA:CPU's and PyTorch's float32 matmuls scale from one core to two, same shapes.

  python benchmarks/matmul_threads.py                    # the small LLaVA's prefill shapes
  python benchmarks/matmul_threads.py --cores 1,2 --shapes 592x512x512,4736x512x1376

Every (framework, core count) runs in a child process of its own, pinned to that many
cores (``os.sched_setaffinity`` before the framework is imported: XLA:CPU sizes its
thread pool from the cores a process may use; torch also gets ``torch.set_num_threads``)
and importing that framework only: both keep worker threads spinning for a while after a
parallel call, so in one process either one's calls lose cores to the other's threads.
In its child every ``[M, K] x [K, N]`` product runs back to back as fsjax runs a float32
weight matmul (``fsjax.matmul.dot_general`` compiled by ``fsjax.cpu.jit``: XLA's own dot)
or as ``torch.mm``, ``--reps`` calls after a warm-up call; a child's figure is the
median call, the table's the median over ``--rounds`` rounds of all children (the
children alternate, so a load change falls on all alike). The table gives GFLOP/s per
framework and core count and each framework's gain from the extra cores: what the weight
matmuls alone make of a two-thread prefill ratio.

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
FRAMEWORKS = ("fsjax", "torch")


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


def _products(framework: str, shapes, threads: int):
  """One zero-argument callable per shape: the framework's float32 product, run to
  completion, on random operands."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  operands = [(rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32))
              for m, k, n in shapes]
  if framework == "fsjax":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from fsjax import cpu  # pylint: disable=g-import-not-at-top
    from fsjax import matmul  # pylint: disable=g-import-not-at-top

    dims = (((1,), (0,)), ((), ()))
    product = cpu.jit(lambda x, w: matmul.dot_general(x, w, dims))
    placed = [(jnp.asarray(x), jnp.asarray(w)) for x, w in operands]
    return [lambda x=x, w=w: jax.block_until_ready(product(x, w)) for x, w in placed]
  if framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(threads)
    placed = [(torch.from_numpy(x), torch.from_numpy(w)) for x, w in operands]
    return [lambda x=x, w=w: torch.mm(x, w) for x, w in placed]
  raise ValueError(f"framework {framework!r}: one of {FRAMEWORKS}")


def measure(framework: str, shapes: list[tuple[int, int, int]], reps: int,
            threads: int) -> list[float]:
  """GFLOP/s of ``framework``'s float32 ``[M, K] x [K, N]`` per shape in this process
  (torch on ``threads`` threads, restored after): the median of ``reps`` back-to-back
  calls after a warm-up call."""
  before = None
  if framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    before = torch.get_num_threads()
  try:
    rates = []
    for (m, k, n), run in zip(shapes, _products(framework, shapes, threads)):
      run()
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
      rates.append(2 * m * k * n / statistics.median(times) / 1e9)
    return rates
  finally:
    if before is not None:
      torch.set_num_threads(before)


def _child(args) -> None:
  """Pins this process to the first ``--child-cores`` allowed cores, then measures one
  framework (JSON on stdout)."""
  allowed = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, allowed[:args.child_cores])
  print(json.dumps(measure(args.child, parse_shapes(args.shapes), args.reps, args.child_cores)))


def table(shapes, results: dict[int, dict[str, list[float]]]) -> str:
  """The Markdown table: GFLOP/s per (framework, cores) and each framework's gain from
  its fewest to its most cores."""
  from common import markdown_table  # pylint: disable=g-import-not-at-top

  cores = sorted(results)
  header = ["[M, K] x [K, N]"] + [f"{name} {c} core{'s' if c > 1 else ''} (GFLOP/s)"
                                  for c in cores for name in FRAMEWORKS]
  if len(cores) > 1:
    header += [f"{name} gain {cores[0]} -> {cores[-1]}" for name in FRAMEWORKS]
  rows = []
  for i, (m, k, n) in enumerate(shapes):
    row = [f"[{m}, {k}] x [{k}, {n}]"]
    row += [f"{results[c][name][i]:.0f}" for c in cores for name in FRAMEWORKS]
    if len(cores) > 1:
      row += [f"{results[cores[-1]][name][i] / results[cores[0]][name][i]:.2f}x"
              for name in FRAMEWORKS]
    rows.append(row)
  return markdown_table(header, rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="MxKxN,... (float32)")
  parser.add_argument("--cores", default="1,2", help="core counts to compare")
  parser.add_argument("--reps", type=int, default=20, help="timed calls per product and child")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds of all children; the table gives their median")
  parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  parser.add_argument("--child-cores", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    shapes = parse_shapes(args.shapes)
  except ValueError as e:
    parser.error(str(e))
  if args.reps < 1 or args.rounds < 1:
    parser.error("--reps and --rounds must be at least 1")
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
  runs = {(c, name): [] for c in cores for name in FRAMEWORKS}
  for _ in range(args.rounds):
    for c, name in runs:
      child = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--child", name, "--child-cores", str(c),
           "--shapes", args.shapes, "--reps", str(args.reps)],
          capture_output=True, text=True, check=False)
      if child.returncode:
        sys.exit(f"the {name} child on {c} core(s) failed:\n{child.stderr[-2000:]}")
      runs[(c, name)].append(json.loads(child.stdout.strip().splitlines()[-1]))
  results = {c: {name: [statistics.median(r[i] for r in runs[(c, name)])
                        for i in range(len(shapes))] for name in FRAMEWORKS} for c in cores}
  command = " ".join(["python benchmarks/matmul_threads.py"]
                     + (sys.argv[1:] if argv is None else list(argv)))
  print(f"### float32 matmuls on 1 and more cores: fsjax (XLA:CPU) and torch\n\n"
        f"`{command}`; load average {os.getloadavg()[0]:.2f}; one child process per "
        f"framework and core count, {args.reps} calls each, median over {args.rounds} "
        "rounds.\n")
  print(table(shapes, results))
  if skipped:
    print(f"\nNot run: {', '.join(map(str, skipped))} cores (this process may use {available}).")


if __name__ == "__main__":
  main()
