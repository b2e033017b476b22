"""What the benchmark scripts share: progress on stderr, Markdown tables on stdout."""

from __future__ import annotations

import sys
import time
from typing import Any

from fsjax import tables


def log(msg: str) -> None:
  """Progress to stderr, so that stdout holds only the Markdown report."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """:func:`fsjax.tables.markdown` with every cell as ``str`` (no final newline)."""
  return tables.markdown(header, rows, digits=None).rstrip("\n")


def matmul_floor(products, dtype, reps: int = 5) -> float:
  """Seconds for a model's weight matmuls alone: the floor under its forward pass on XLA.

  ``products``: ``(rows, K, N)`` per weight matmul of one pass (a ``[K, N]`` weight applied
  to ``rows`` rows). They run back to back in one executable on random operands of
  ``dtype``, as the models run them (``fsjax.matmul.dot_general``: float32 accumulation,
  one-row bfloat16 dots repeated; compiled by ``fsjax.cpu.jit``, which picks the models'
  XLA:CPU options), each output kept. Attention, norms, activations and whatever the
  caller leaves out (vision tower, cross-attention) come on top, so no implementation on
  XLA's dot runs a compute-bound pass (a long prefill) faster. Not a floor for a
  bandwidth-bound pass (one-row decoding steps), whose weights may sit in the CPU's caches
  between steps. Best of ``reps`` calls after a warm-up call.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from fsjax import cpu  # pylint: disable=g-import-not-at-top
  from fsjax import matmul  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.key(0), 2 * len(products))
  xs = [jax.random.normal(k, (m, kk), dtype) for k, (m, kk, _) in zip(keys[::2], products)]
  ws = [jax.random.normal(k, (kk, n), dtype) for k, (_, kk, n) in zip(keys[1::2], products)]
  dims = (((1,), (0,)), ((), ()))

  @cpu.jit
  def run(xs, ws):
    return [matmul.dot_general(x, w, dims) for x, w in zip(xs, ws)]

  jax.block_until_ready(run(xs, ws))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(run(xs, ws))
    best = min(best, time.perf_counter() - t)
  return best
