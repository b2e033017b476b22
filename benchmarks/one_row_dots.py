r"""The one-row products of batch-1 decoding on XLA:CPU: what fsjax.matmul and MPT's tied
head avoid, timed in one run (medians of 20 calls after a warm-up).

  taskset -c 1 python benchmarks/one_row_dots.py

Rows: a [1, K] x [K, N] product in float32, in bfloat16 as XLA compiles it (rewritten to
float32, the weight converted in the call), and in bfloat16 on the row repeated twice
(``fsjax.matmul.lax_dot_general``); then a tied LM head inside a 10-step loop after a
LayerNorm, as flax's ``attend`` (``x @ table.T``) and as ``matmul.einsum``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fsjax import matmul  # noqa: E402


def _ms(fn, *args, calls=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def main():
  print(f"jax {jax.__version__} on {jax.default_backend()}, load average "
        f"{os.getloadavg()[0]:.2f}\n")
  print("| [1, K] x [K, N] | float32 (ms) | bfloat16, XLA's rewrite (ms) | bfloat16, row "
        "repeated (ms) |")
  print("|---|---|---|---|")
  dims = (((1,), (0,)), ((), ()))
  plain = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims,
                                                   preferred_element_type=jnp.float32))
  repeated = jax.jit(lambda x, w: matmul.lax_dot_general(x, w, dims,
                                                          preferred_element_type=jnp.float32))
  for k, n in ((512, 32064), (512, 1376), (4096, 11008)):
    w = jax.random.normal(jax.random.key(0), (k, n))
    x = jnp.ones((1, k))
    w16, x16 = w.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
    print(f"| [1, {k}] x [{k}, {n}] | {_ms(plain, x, w):.2f} | {_ms(plain, x16, w16):.2f} | "
          f"{_ms(repeated, x16, w16):.2f} |")

  table = jax.random.normal(jax.random.key(1), (50280, 512))
  scale = jnp.ones(512)
  heads = {"flax attend (x @ table.T)": lambda y, t: jnp.dot(y, t.T),
           "matmul.einsum": lambda y, t: matmul.einsum("btd,vd->btv", y, t)}
  print("\n| tied LM head [1, 512] x [512, 50280], in a loop | ms per step |")
  print("|---|---|")
  for name, head in heads.items():
    def run(t, s, x0, head=head):
      def body(_, x):
        y = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * s
        token = jnp.argmax(head(y, t)[:, -1], -1)
        return x + 1e-3 * t[token][:, None]
      return jax.lax.fori_loop(0, 10, body, x0)
    print(f"| {name} | {_ms(jax.jit(run), table, scale, jnp.ones((1, 1, 512))) / 10:.2f} |")


if __name__ == "__main__":
  main()
