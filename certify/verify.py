r"""Re-derives every certificate of a Table 1 results folder from its records.

  python -m certify.verify runs/default          # a workdir of certify.run
  python -m certify.verify runs/default/results.jsonl

Each row of ``results.jsonl`` carries a record (:mod:`certify.records`): the statistics
its bound was computed from and everything that bound needs. This program recomputes,
with the same certify functions the run used (not a copy of them):

* fixed-n rows: the bound's deficit ``1 - L`` from the recorded sums
  (``certify.lower_confidence_bound``), then ``score``, every ``inner_product_bound`` and
  the ``radius`` (``certify.feature_certificate``);
* norm-aware rows: ``inner_product_bound``, ``cosine_bound`` and ``radius`` from the
  recorded bounds 1 - L and N (``certify.feature_certificate``,
  ``certify.norm_aware_cosine_bound``, ``certify.norm_aware_radius``);
* sequential rows: that 1 - L (and the norm's bound) is a cell of the confidence
  sequence's grid, then the bounds and radius as the run computes them;

and checks ``samples``, ``certificate`` and the settings against the record. It prints
one line per row that differs, and exits 1 if any row differs, cannot be read, or has
no record (a results file of an fsjax that did not record them); 0 when every
certificate is re-derived exactly (the same float32 bits). A torn last line (a run
killed mid-write) is reported and skipped, as certify.run itself drops it.

It checks the arithmetic from statistics to certificate. Whether the statistics are
those of the recorded noise is a matter of re-running the Monte Carlo: the record names
the key, the batch and the checkpoints' parameter hash for that.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import sys
import time
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import certify
from certify import records as records_lib
from fsjax import cli

RESULTS = "results.jsonl"
# A re-derived number may differ from the recorded one by this many float32 ulps: XLA
# fuses the run's jitted arithmetic differently from the verifier's (e.g. 1-2 ulps in
# ~0.03% of Bernstein deficits); every recorded edit beyond rounding is flagged.
ULPS = 4


class Report(NamedTuple):
  """What :func:`verify_file` found.

  Attributes:
    checked: rows whose record was re-derived (exactly or not).
    problems: one line per row that differs, cannot be read or cannot be verified.
    notes: lines that are no failure (a torn last line).
    seconds: time spent re-deriving (reading and parsing included).
    exact: compared numbers (a row's column) equal to the recorded ones bit for bit.
    values: compared numbers; ``values - exact`` were within :data:`ULPS` ulps.
  """
  checked: int
  problems: list[str]
  notes: list[str]
  seconds: float
  exact: int = 0
  values: int = 0

  @property
  def ok(self) -> bool:
    return not self.problems


def _f32(v) -> float:
  return float(np.float32(v))


def _same(a: float, b: Any) -> bool:
  """Bitwise float equality (NaN equal to NaN); ``b`` may be anything a row holds."""
  if not isinstance(b, (int, float)) or isinstance(b, bool):
    return False
  return a == b or (math.isnan(a) and math.isnan(b))


def _label(row: dict) -> str:
  kind = row.get("cosine_kind")
  return (f"{row.get('variant')} sigma {row.get('sigma')} image {row.get('image')} "
          f"{row.get('reference')} {row.get('bound')}" + (f" ({kind})" if kind else ""))


def _by_eps(values: Any, eps: list[float]) -> list | None:
  """A row's ``{eps: value}`` (JSON keys are strings) in the order of ``eps``."""
  if not isinstance(values, dict):
    return None
  try:
    table = {float(k): v for k, v in values.items()}
    return [table[e] for e in eps]
  except (KeyError, ValueError):
    return None


class _Checker:
  """Collects the rows of one file by kind, re-derives them in vectorised groups."""

  def __init__(self, name: str):
    self.name = name
    self.problems: list[str] = []
    self.groups: dict[tuple, list[tuple[int, dict, dict]]] = collections.defaultdict(list)
    self.checked = 0
    self.flagged: set[int] = set()
    self.exact = 0   # comparisons (a row's column) equal bit for bit
    self.values = 0  # comparisons made

  def problem(self, line: int, row: dict | None, text: str) -> None:
    """Reports a row's first problem (one line per row; later ones are not shown)."""
    if line in self.flagged:
      return
    self.flagged.add(line)
    where = f"{self.name}:{line}"
    self.problems.append(f"{where}: {_label(row)}: {text}" if row else f"{where}: {text}")

  # -- per-row checks that need no maths -------------------------------------------------

  def add(self, line: int, row: dict) -> None:
    rec = row["record"]
    if not isinstance(rec, dict) or rec.get("format") != records_lib.FORMAT:
      fmt = rec.get("format") if isinstance(rec, dict) else rec
      self.problem(line, row, f"record format {fmt!r} is not {records_lib.FORMAT} (written by "
                   "another fsjax version: verify with that version)")
      return
    kind = rec.get("kind")
    if kind not in records_lib.KINDS:
      self.problem(line, row, f"record kind {kind!r} is not one of {records_lib.KINDS}")
      return
    try:
      eps = [float(e) for e in rec["eps"]]
      settings = (float(rec["sigma"]), tuple(eps), float(rec["cos"]), float(rec["alpha"]),
                  int(rec["n0"]), int(rec["n"]))
      stats = rec["statistics"]
      bound = row["bound"]
      if kind == "fixed":
        group = (kind, bound, row["reference"], settings, "log_capital" in stats)
      elif kind == "norm-aware":
        group = (kind, bound, settings)
      else:
        group = (kind, row.get("cosine_kind") == "norm-aware", settings)
    except (KeyError, TypeError, ValueError) as e:
      self.problem(line, row, f"record incomplete ({type(e).__name__}: {e})")
      return
    sigma, _, cos, _, n0, n = settings
    for name, want in (("sigma", sigma), ("cos", cos)):
      if not _same(want, row.get(name)):
        self.problem(line, row, f"{name} {row.get(name)!r} in the row, {want!r} in its record")
        return
    if kind == "fixed":
      if row.get("samples") != n0 + n:
        self.problem(line, row, f"samples {row.get('samples')!r}, the record says n0 + n = "
                     f"{n0 + n}")
      if row.get("certificate") is not (bound != "point"):
        self.problem(line, row, f"certificate {row.get('certificate')!r} for bound {bound!r}")
    elif kind == "norm-aware":
      if bound != rec.get("norm_aware_bound") or row.get("samples") != n0 + n:
        self.problem(line, row, f"bound {bound!r} / samples {row.get('samples')!r} do not match "
                     f"the record's {rec.get('norm_aware_bound')!r} / {n0 + n}")
    else:
      samples = row.get("samples")
      if bound != certify.SequentialCertificate.bound.fget(None) or not (
          isinstance(samples, int) and n0 < samples <= n0 + n):
        self.problem(line, row, f"bound {bound!r} / samples {samples!r}: want "
                     f"'betting (sequential)' and n0 < samples <= n0 + n = {n0 + n}")
    self.groups[group].append((line, row, rec))

  # -- the maths, one vectorised call per group ------------------------------------------

  def run(self) -> None:
    for group, members in self.groups.items():
      kind = group[0]
      try:
        if kind == "fixed":
          self._fixed(group, members)
        elif kind == "norm-aware":
          self._norm_aware(group, members)
        else:
          self._sequential(group, members)
      except (KeyError, TypeError, ValueError) as e:
        for line, row, _ in members:
          self.problem(line, row, f"statistics unreadable ({type(e).__name__}: {e})")
      self.checked += len(members)

  def _compare(self, members, name: str, got: np.ndarray, want: list) -> np.ndarray:
    """Flags rows whose ``want`` (row values) differ from ``got`` by more than
    :data:`ULPS` float32 ulps; counts the bit-exact ones; returns the bad mask."""
    got = np.asarray(got, np.float32).reshape(len(members), -1)
    wanted = np.full(got.shape, np.nan)
    readable = np.ones(len(members), bool)
    for j, w in enumerate(want):
      w = w if isinstance(w, list) else [w]
      if len(w) != got.shape[1] or not all(
          isinstance(v, (int, float)) and not isinstance(v, bool) for v in w):
        readable[j] = False
      else:
        wanted[j] = w
    exact = np.all((got == wanted) | (np.isnan(got) & np.isnan(wanted)), axis=1) & readable
    ulp = np.spacing(np.abs(wanted).astype(np.float32)).astype(np.float64)
    close = np.all(np.abs(got - wanted) <= ULPS * ulp, axis=1) & readable
    self.exact += int(exact.sum())
    self.values += len(members)
    for j in np.flatnonzero(~close):
      line, row, _ = members[j]
      shown = ", ".join(f"{float(a):.9g}" for a in got[j])
      self.problem(line, row, f"{name}: recorded {want[j]!r}, re-derived [{shown}]")
    return ~close

  def _certificate_columns(self, members, eps, inner, radius, cosine=None) -> None:
    self._compare(members, "inner_product_bound", inner,
                  [_by_eps(row.get("inner_product_bound"), eps) for _, row, _ in members])
    if cosine is not None:
      self._compare(members, "cosine_bound", cosine,
                    [_by_eps(row.get("cosine_bound"), eps) for _, row, _ in members])
    self._compare(members, "radius", radius, [row.get("radius") for _, row, _ in members])

  def _fixed(self, group, members) -> None:
    _, bound, reference, (sigma, eps, cos, alpha, _, n), betting = group
    stats = [rec["statistics"] for _, _, rec in members]
    center, total, total_sq = (_padded([s[k] for s in stats])
                               for k in ("center", "total", "total_sq"))
    log_capital = None
    if betting:
      log_capital = _padded([records_lib.decode_array(s["log_capital"]) for s in stats])
    elif bound == "betting":
      raise ValueError("a betting row without log_capital")
    m = len(members)
    # Stage 1: the bound's deficit 1 - L from the recorded sums (certify._bounds), jitted
    # as in the run (certify.estimate_scores computes it inside its jitted Monte Carlo).
    deficit = np.asarray(_lower_confidence_bound(
        certify.ScoreStats(total, total_sq, log_capital), center, n=n, alpha=alpha,
        bound=bound))[:m]
    bad = self._compare(members, "score_deficit (1 - L from the statistics)", deficit,
                        [row.get("score_deficit") for _, row, _ in members])
    keep = [members[i] for i in np.flatnonzero(~bad)]
    if not keep:
      return
    # Stage 2: the certificate of the recorded deficit (Theorem 3.2, Corollary 3.3).
    recorded = _padded([row["score_deficit"] for _, row, _ in keep])
    self._compare(keep, "score", 1.0 - recorded[:len(keep)],
                  [row.get("score") for _, row, _ in keep])
    cert = certify.feature_certificate(_estimate(recorded, reference, bound, sigma, alpha),
                                       eps=np.asarray(eps, np.float32), cos=cos)
    self._certificate_columns(keep, list(eps), np.asarray(cert.inner_product_bound)[:len(keep)],
                              np.asarray(cert.radius)[:len(keep)])

  def _bounds_of(self, members):
    """The recorded bounds 1 - L and N, checked against the row's own columns."""
    stats = [rec["statistics"] for _, _, rec in members]
    deficit, norm_upper = (np.asarray([s[k] for s in stats], np.float32)
                           for k in ("deficit", "norm_upper"))
    bad = self._compare(members, "score_deficit", deficit,
                        [row.get("score_deficit") for _, row, _ in members])
    bad |= self._compare(members, "norm_upper", norm_upper,
                         [row.get("norm_upper") for _, row, _ in members])
    return deficit, norm_upper, bad

  def _norm_aware(self, group, members) -> None:
    _, _, (sigma, eps, cos, _, _, _) = group
    deficit, norm_upper, bad = self._bounds_of(members)
    keep = np.flatnonzero(~bad)
    if not len(keep):
      return
    d, nu = _padded(deficit[keep]), _padded(norm_upper[keep])
    eps32 = np.asarray(eps, np.float32)
    # The run's steps (certify.norm_aware_fcsb's certificate, then the radius): Theorem
    # 3.2's B (the expression certify.feature_certificate evaluates), B / U, the bisection.
    inner = certify.feature_certificate(_estimate(d, "mean", "betting", sigma),
                                        eps=eps32, cos=cos).inner_product_bound
    cosine = certify.norm_aware_cosine_bound(d[:, None], nu[:, None], eps32, jnp.float32(sigma))
    radius = certify.norm_aware_radius(d, nu, sigma, cos)
    k = len(keep)
    self._certificate_columns([members[i] for i in keep], list(eps), np.asarray(inner)[:k],
                              np.asarray(radius)[:k], np.asarray(cosine)[:k])

  def _sequential(self, group, members) -> None:
    _, norm_aware, (sigma, eps, cos, _, _, _) = group
    deficit, norm_upper, bad = self._bounds_of(members)
    # An anytime bound is the deficit of a grid cell (1 when no cell is rejected), and N
    # that of the pair sequence's cell through N = sqrt(2 P - 1) (1 when not norm-aware).
    cells = np.append(np.asarray(certify.sequential_grid()), np.float32(1.0))
    # N = sqrt(2 P - 1) of the pair sequence's bound P (certify._norm's map).
    norms = (np.sqrt(np.clip(2.0 * cells - 1.0, 0.0, 1.0)).astype(np.float32)
             if norm_aware else np.ones(1, np.float32))
    for j, (line, row, _) in enumerate(members):
      if bad[j]:
        continue
      if not np.isin(deficit[j], cells):
        bad[j] = True
        self.problem(line, row, f"score_deficit {float(deficit[j])!r} is no cell of the "
                     "confidence sequence's grid: no sequential run gives it")
      elif not np.isin(norm_upper[j], norms):
        bad[j] = True
        self.problem(line, row, f"norm_upper {float(norm_upper[j])!r} is not what the pair "
                     "sequence's grid gives" + ("" if norm_aware else " (1 without norm)"))
    keep = np.flatnonzero(~bad)
    if not len(keep):
      return
    inner, cosine, radius = certify.sequential_certificate_from_bounds(
        _padded(deficit[keep]), _padded(norm_upper[keep]), jnp.asarray(eps, jnp.float32),
        jnp.float32(sigma), jnp.float32(cos), norm_aware=bool(norm_aware))
    k = len(keep)
    self._certificate_columns([members[i] for i in keep], list(eps), np.asarray(inner)[:k],
                              np.asarray(radius)[:k], np.asarray(cosine)[:k])


def _estimate(deficit, reference, bound, sigma, alpha=0.5) -> certify.ScoreEstimate:
  """A :class:`certify.ScoreEstimate` of recorded deficits ``[M]`` (no direction needed)."""
  return certify.ScoreEstimate(
      deficit=jnp.asarray(deficit), direction=jnp.zeros((len(deficit), 1), jnp.float32),
      samples=jnp.zeros(len(deficit), jnp.int32), reference=reference, bound=bound,
      sigma=sigma, alpha=alpha)


_lower_confidence_bound = jax.jit(certify.lower_confidence_bound,
                                  static_argnames=("n", "alpha", "bound"))


def _padded(values) -> jax.Array:
  """``values`` stacked (float32) and padded to the next power of two (>= 8) by repeating
  the last one: every group size then reuses a few compiled shapes."""
  a = np.asarray(np.stack([np.asarray(v, np.float32) for v in values]) if len(values) and
                 np.ndim(values[0]) else np.asarray(values, np.float32))
  size = max(8, 1 << (len(a) - 1).bit_length())
  pad = np.repeat(a[-1:], size - len(a), axis=0)
  return jnp.asarray(np.concatenate([a, pad]))


def results_path(path: str | pathlib.Path) -> pathlib.Path:
  """``path`` itself if it is a file, else ``path / results.jsonl`` (ValueError if none)."""
  path = pathlib.Path(path)
  file = path / RESULTS if path.is_dir() else path
  if not file.is_file():
    raise ValueError(f"{path}: no {RESULTS} here; give a certify.run --workdir or its "
                     f"{RESULTS}.")
  return file


def verify_file(path: str | pathlib.Path) -> Report:
  """Re-derives every record of a ``results.jsonl`` (or a workdir holding one)."""
  start = time.perf_counter()
  file = results_path(path)
  checker = _Checker(str(file))
  notes: list[str] = []
  data = file.read_bytes()
  lines = data.split(b"\n")
  if lines[-1]:  # no final newline: a torn last row
    notes.append(f"{file}:{len(lines)}: the last line is torn ({len(lines[-1])} bytes, no "
                 "newline: a run killed mid-write); skipped, as certify.run drops it")
  old = []
  for number, raw in enumerate(lines[:-1], start=1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      checker.problem(number, None, f"not a JSON row ({e}); the file is damaged")
      continue
    if not isinstance(row, dict):
      checker.problem(number, None, "not a JSON object")
    elif "record" not in row:
      old.append(number)
    else:
      checker.add(number, row)
  checker.run()
  if old:
    shown = ", ".join(map(str, old[:5])) + (", ..." if len(old) > 5 else "")
    checker.problems.append(
        f"{file}: {len(old)} row(s) carry no record (lines {shown}): written by a certify.run "
        "that did not record its statistics, so their certificates cannot be re-derived; "
        "re-run certify.run into a new --workdir to get verifiable rows")
  return Report(checker.checked, checker.problems, notes, time.perf_counter() - start,
                checker.exact, checker.values)


def main(argv: Iterable[str] | None = None) -> int:
  """``python -m certify.verify PATH [PATH ...]``; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m certify.verify",
      description="Re-derive every certificate of certify.run results from their records.")
  parser.add_argument("paths", nargs="+", metavar="DIR",
                      help=f"a certify.run --workdir (or its {RESULTS})")
  args = parser.parse_args(None if argv is None else list(argv))
  cli.quiet()
  status = 0
  for path in args.paths:
    try:
      report = verify_file(path)
    except (ValueError, OSError) as e:
      print(f"certify.verify: {e}", file=sys.stderr)
      status = 1
      continue
    for line in report.notes:
      print(line, file=sys.stderr)
    for line in report.problems:
      print(line)
    rate = report.checked / max(report.seconds, 1e-9)
    verdict = (f"{len(report.problems)} problem(s)" if not report.ok else
               "every certificate re-derived" + (
                   " bit for bit" if report.exact == report.values else
                   f" ({report.exact} of {report.values} columns bit for bit, the rest "
                   f"within {ULPS} float32 ulps)"))
    print(f"certify.verify: {results_path(path)}: {report.checked} records, {verdict} "
          f"({report.seconds:.2f} s, {rate:,.0f} records/s)")
    status = status or (0 if report.ok else 1)
  return status


if __name__ == "__main__":
  sys.exit(main())
