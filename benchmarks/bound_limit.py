"""How close each lower confidence bound gets to the exact score, at fixed n (issue 20).

Radius lost to sampling: ``1 - R(L) / R(exact)`` with ``R(s) = sigma (Phi^-1(s) -
Phi^-1((1 + c) / 2))`` (Corollary 3.3, c = 0.5; the ratio does not depend on sigma), for
scores in Table 1's range, against the ceiling ``x alpha^(1/n)`` (no valid bound on n
scores that all equal x can exceed it).

Scores are drawn from distributions whose mean is known exactly, as sample counts on a
finite support (a sum of per-sample terms over samples equals the count-weighted sum over
the support, so every bound is computed exactly as on the samples themselves):

* ``half-space``: the half-space encoder's scores, Bernoulli (the largest variance a
  score with that mean can have);
* ``smooth``: a discretised Beta of the deficit with standard deviation mean / 2 (a smooth
  encoder's scores concentrate near their mean).

Bounds: fsjax's fixed-n ``hoeffding``, ``bernstein``, ``betting`` (certify/_bounds.py; bets
from the n0 stage-1 samples), the confidence sequence of certify/_sequential.py read at n
(``sequence``, with its bet-scale mixture, ``sequence-1`` with the single aGRAPA bet,
``sequence-4096`` on a 4x finer grid),
and, for Bernoulli scores, Clopper-Pearson (exact for them).

    python benchmarks/bound_limit.py            # n = 10,000, alpha = 1e-3, 20 runs per cell
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks import common  # noqa: E402
from certify import _bounds  # noqa: E402
from certify import _sequential as sq  # noqa: E402

COS = 0.5
Z_C = stats.norm.ppf((1 + COS) / 2)


def _support(model: str, mu: float, size: int):
  """``(deficits [M], probabilities [M])`` of the model with mean deficit mu (exact)."""
  if model == "half-space":
    return np.array([0.0, 1.0]), np.array([1 - mu, mu])
  cv = 0.5
  var = (cv * mu) ** 2
  common_ = mu * (1 - mu) / var - 1
  a, b = mu * common_, (1 - mu) * common_
  edges = np.linspace(0.0, min(1.0, 12 * mu), size + 1)
  p = np.diff(stats.beta.cdf(edges, a, b))
  p /= p.sum()
  return 0.5 * (edges[1:] + edges[:-1]), p


def _radius_ratio(deficit, mu):
  r = stats.norm.ppf(1 - np.asarray(deficit, np.float64)) - Z_C
  return r / (stats.norm.ppf(1 - mu) - Z_C)


def _fixed_bounds(values, counts, first, alpha, n):
  """fsjax's fixed-n bounds from counts ``[R, M]`` (stage 2) and ``first [R, M]`` (stage 1)."""
  scores = jnp.asarray(1.0 - values, jnp.float32)[None].repeat(counts.shape[0], 0)
  n0 = first.sum(1)
  m1 = (first * (1.0 - values)).sum(1) / n0
  v1 = (first * ((1.0 - values) - m1[:, None]) ** 2).sum(1) / (n0 - 1)
  center = jnp.asarray(m1, jnp.float32)
  bets = _bounds.bet_sizes(jnp.asarray(v1, jnp.float32), n=n, alpha=alpha)
  per = _bounds.score_statistics(scores, center, bets)  # [R, M, ...]
  w = jnp.asarray(counts, jnp.float32)
  summed = _bounds.ScoreStats(*(jnp.einsum("rm,rm...->r...", w, v) for v in per))
  return {b: np.asarray(_bounds.lower_confidence_bound(summed, center, n=n, alpha=alpha,
                                                       bound=b))
          for b in ("hoeffding", "bernstein", "betting")}


@functools.partial(jax.jit, static_argnames=("alpha", "scales", "grid_size", "rule", "horizon"))
def _sequence_bound(values, chunk_counts, m1, v1, *, alpha, scales, grid_size=sq.GRID,
                    rule="agrapa", horizon=None):
  """The confidence sequence of certify/_sequential.py read at n: ``[R]`` deficit bounds."""
  state = sq.init(m1, v1, scales=scales, grid_size=grid_size)
  vals = jnp.broadcast_to(values, (m1.shape[0],) + values.shape)

  def body(state, w):
    return sq.update(state, vals, weights=w, alpha=alpha, rule=rule, horizon=horizon), None
  state, _ = jax.lax.scan(body, state, chunk_counts)
  return sq.upper_deficit(state)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--n0", type=int, default=100)
  parser.add_argument("--alpha", type=float, default=1e-3)
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--chunk", type=int, default=500)
  parser.add_argument("--star-chunk", type=int, default=50,
                      help="samples per bet of the STaR rows (bets recalculated per chunk)")
  parser.add_argument("--support", type=int, default=128)
  parser.add_argument("--scores", type=float, nargs="+",
                      default=[0.9, 0.95, 0.97, 0.98, 0.99])
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  n, alpha = args.n, args.alpha
  rows = []
  for model in ("half-space", "smooth"):
    for score in args.scores:
      mu = 1.0 - score
      values, p = _support(model, mu, args.support)
      mu = float(np.dot(values, p))  # the exact mean of the discretised model
      common.log(f"{model} S={1 - mu:.4f}")
      first = rng.multinomial(args.n0, p, size=args.runs)
      chunks = rng.multinomial(args.chunk, p, size=(n // args.chunk, args.runs))  # [J, R, M]
      counts = chunks.sum(0)
      out = _fixed_bounds(values, counts, first, alpha, n)
      m1 = (first * values).sum(1) / args.n0
      v1 = (first * (values - m1[:, None]) ** 2).sum(1) / (args.n0 - 1)
      star_chunks = rng.multinomial(args.star_chunk, p,
                                    size=(n // args.star_chunk, args.runs))
      for name, scales, grid_size, rule in (("sequence", sq.BET_SCALES, sq.GRID, "agrapa"),
                                            ("sequence-1", (1.0,), sq.GRID, "agrapa"),
                                            ("sequence-4096", sq.BET_SCALES, 4096, "agrapa"),
                                            ("star", (1.0,), sq.GRID, "star"),
                                            ("star-4096", (1.0,), 4096, "star")):
        star = rule == "star"
        out[name] = np.asarray(_sequence_bound(
            jnp.asarray(values, jnp.float32),
            jnp.asarray(star_chunks if star else chunks, jnp.float32),
            jnp.asarray(m1, jnp.float32), jnp.asarray(v1, jnp.float32), alpha=alpha,
            scales=scales, grid_size=grid_size, rule=rule, horizon=n if star else None))
      if model == "half-space":
        k = counts[:, 1]
        out["clopper-pearson"] = stats.beta.ppf(1 - alpha, k + 1, n - k)
      ceiling = 1.0 - (1.0 - mu) * alpha ** (1.0 / n)
      row = [model, f"{1 - mu:.4f}", f"{100 * (1 - _radius_ratio(ceiling, mu)):.2f}"]
      for name in ("hoeffding", "bernstein", "betting", "sequence", "sequence-1",
                   "sequence-4096", "star", "star-4096", "clopper-pearson"):
        if name in out:
          loss = 100 * (1 - _radius_ratio(out[name], mu))
          fails = int(np.sum(np.asarray(out[name]) < mu))
          row.append(f"{np.median(loss):.2f}" + (f" ({fails} fail)" if fails else ""))
        else:
          row.append("-")
      rows.append(row)
  print(f"Radius lost to sampling, % of the exact-score radius (median of {args.runs} runs), "
        f"n = {n}, n0 = {args.n0}, alpha = {alpha}, cos = {COS}; `python "
        f"benchmarks/bound_limit.py`; load average {os.getloadavg()[0]:.1f}.\n")
  print(common.markdown_table(
      ["scores", "S", "ceiling", "hoeffding", "bernstein", "betting", "sequence",
       "sequence-1", "sequence-4096", "star", "star-4096", "clopper-pearson"], rows))


if __name__ == "__main__":
  main()
