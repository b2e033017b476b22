r"""Verifiable certificate records: what a Table 1 row needs to re-derive its numbers.

Every row ``certify.run`` writes to ``results.jsonl`` carries a ``"record"``: the
statistics its bound was computed from, the settings of the bound, the noise that was
drawn (the key, as data), sigma's units, and what computed it (package version, git
revision, the encoder's and booster's checkpoints and a hash of the parameters).
``python -m certify.verify DIR`` (:mod:`certify.verify`) re-derives every certificate from
these records with the same certify maths and reports any mismatch.

What each kind of row records as ``record["statistics"]`` (the minimal sufficient
statistics of its bound, fixed-n rows; docs/method.md section 2):

* fixed n (``kind="fixed"``; the inner-product rows of every bound): the stage-2 sums of
  the ``ScoreStatistics`` of ``certify.estimate_scores(..., statistics=True)`` for the row's reference: ``center`` (the
  stage-1 mean the sums are centred on), ``total = sum(h - center)`` and
  ``total_sq = sum((h - center)^2)``, three numbers that are all ``"point"``,
  ``"hoeffding"`` and ``"bernstein"`` use (with n and alpha). A ``"betting"`` row adds
  ``log_capital``, the log-wealth of each bet at each grid cell, ``[NUM_BETS,
  BETTING_GRID] = [4, 1024]`` float32 (16 KiB; 21.8 KB as base64 in the JSON line): the
  wealth is a product over *all* n scores, so no smaller summary re-derives it, and it is
  smaller than the scores themselves once n > 4096.
* norm-aware (``kind="norm-aware"``): the two confidence bounds ``deficit`` (1 - L, level
  alpha / 2) and ``norm_upper`` (N); certify.verify re-derives the cosine bounds and the
  radius from them. Their own stage-2 sums live inside ``certify._norm.norm_aware_fcsb``,
  which does not return them yet, so this kind checks the certificate step, not the bound.
* sequential (``kind="sequential"``): ``deficit`` and ``norm_upper``, the anytime bounds
  at the image's stopping time, and ``samples``. A confidence sequence's bound depends on
  the whole sample path (predictable bets re-sized after every chunk; a cell stays
  rejected once its wealth crossed 1 / alpha), so the statistic that re-derives it is the
  path itself: the stage-2 deficits (and pair values, norm-aware) in order, with the
  chunk size and the stage-1 prior, 4 (n + n / 2) bytes per image, which
  ``certify.sequential_fcsb`` does not return. certify.verify checks that each bound is a
  cell of the sequence's grid and re-derives the certificate from it.

Every record also names the noise: sample j of a fixed-n batch is
``sigma * normal(fold_in(sigma_key, j), [B, H, W, 3])``, image ``position`` of the batch
its slice (samples ``0 .. n0-1`` stage 1, ``n0 .. n0+n-1`` stage 2), ``sigma_key =
fold_in(PRNGKey(seed), round(sigma * 1e6))``; a sequential image's chunk c is
``fold_in(fold_in(sigma_key, image), c)`` with ``chunk_size`` samples. With the
checkpoints the record names, a re-run re-derives the statistics themselves.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import pathlib
import subprocess
from typing import Any

import jax
import numpy as np

import certify
from certify import report

# Bump when a record's fields change meaning; certify.verify refuses formats it does not know.
FORMAT = 1
KINDS = ("fixed", "norm-aware", "sequential")

SIGMA_CONVENTION = (
    "sigma: standard deviation of the isotropic Gaussian noise added to each pixel of the "
    "image in [0, 1] units at the data's resolution (config.data.image_size, after the data "
    "pipeline's resize), before the encoder's own resize to its input resolution and its "
    "mean/std normalisation; eps and radius are l2 norms in the same units.")


def encode_array(a: Any) -> dict:
  """A float32 array as JSON data: ``{"dtype", "shape", "base64"}`` (little-endian, exact)."""
  a = np.ascontiguousarray(np.asarray(a, np.float32).astype("<f4"))
  return {"dtype": "float32", "shape": list(a.shape),
          "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
  """The array :func:`encode_array` wrote (ValueError if the data does not fit the shape)."""
  if not isinstance(d, dict) or d.get("dtype") != "float32" or "base64" not in d:
    raise ValueError("not an encoded float32 array (want {'dtype': 'float32', 'shape', "
                     "'base64'})")
  raw = base64.b64decode(d["base64"], validate=True)
  shape = tuple(int(s) for s in d["shape"])
  if len(raw) != 4 * int(np.prod(shape)):
    raise ValueError(f"encoded array holds {len(raw)} bytes, its shape {list(shape)} needs "
                     f"{4 * int(np.prod(shape))}")
  return np.frombuffer(raw, "<f4").reshape(shape).astype(np.float32)


def key_data(key: jax.Array) -> list[int]:
  """A PRNG key as plain integers (``jax.random.key_data``), e.g. ``[0, 0]`` for seed 0."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key).ravel()]


@functools.cache
def code_version() -> dict:
  """``{"fsjax": version, "git": revision or None, "git_dirty": bool or None}``.

  The revision is that of the checkout the package runs from (None outside a git
  checkout or without git); ``git_dirty`` says whether tracked files differ from it.
  """
  try:
    version = importlib.metadata.version("fsjax")
  except importlib.metadata.PackageNotFoundError:
    version = None
  root = pathlib.Path(__file__).resolve().parents[1]
  revision = dirty = None
  try:
    run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True,
                            timeout=10, check=True)
    revision = run(["git", "rev-parse", "HEAD"]).stdout.strip() or None
    if revision:
      dirty = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    pass
  return {"fsjax": version, "git": revision, "git_dirty": dirty}


# id(params) -> (params, digest): the hash of a variant's parameters, once per run (a
# parameter tree is hashed in ~1 s per GB; certify.run asks once per batch and sigma).
_PARAM_HASHES: dict[int, tuple[Any, str]] = {}


def params_hash(params: Any) -> str:
  """``sha256:<hex>`` of a parameter tree: every leaf's path, dtype, shape and bytes.

  The checkpoint's identity as the program saw it (after loading and any conversion), so a
  random-init encoder (no checkpoint file) is named too.
  """
  cached = _PARAM_HASHES.get(id(params))
  if cached is not None and cached[0] is params:
    return cached[1]
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  digest = "sha256:" + h.hexdigest()
  if len(_PARAM_HASHES) > 16:
    _PARAM_HASHES.clear()
  _PARAM_HASHES[id(params)] = (params, digest)
  return digest


def provenance(config, variant: str, params: Any) -> dict:
  """What computed a row: code version, encoder, checkpoints, parameter hash, dtype."""
  encoder = config.get("encoder") or {}
  gsb = config.get("gsb") or {}
  return {**code_version(), "variant": variant, "encoder": encoder.get("name"),
          "encoder_checkpoint": encoder.get("checkpoint"),
          "gsb_checkpoint": gsb.get("checkpoint") if variant != "FS" else None,
          "params_sha256": params_hash(params),
          "compute_dtype": report.compute_dtype(config), "backend": jax.default_backend()}


def group(config, *, variant: str, params: Any, sigma_key: jax.Array, sigma: float,
          first_image: int, images: int, kind: str) -> dict:
  """The part of a record shared by one (variant, sigma, batch) of rows of ``kind``.

  Args:
    config: the run's config (``config.certify`` gives n0, n, alpha, eps, cos).
    variant: the row's variant (FS, FS+D, ...).
    params: the variant's parameters (hashed once, :func:`params_hash`).
    sigma_key: the key the noise was drawn from (``smoothing.sigma_key(PRNGKey(seed),
      sigma)`` in certify.run), recorded as data.
    sigma: the noise level.
    first_image: index of the batch's first image in the data.
    images: the batch size.
    kind: one of :data:`KINDS`.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  c = config.certify
  sequential = kind == "sequential"
  noise = {"seed": int(config.seed), "sigma_key": key_data(sigma_key),
           "key_rule": "sigma_key = fold_in(PRNGKey(seed), round(sigma * 1e6))",
           "prng_impl": str(jax.config.jax_default_prng_impl),
           "batch_first": int(first_image), "batch_size": int(images),
           "chunk_size": int(c.sequential_chunk_size if sequential else c.chunk_size)}
  out = {"format": FORMAT, "kind": kind, "n0": int(c.n0), "n": int(c.n),
         "alpha": float(c.alpha),
         "eps": [float(e) for e in np.asarray(c.eps, np.float32)], "cos": float(c.cos),
         "sigma": float(sigma), "sigma_convention": SIGMA_CONVENTION, "noise": noise,
         "provenance": provenance(config, variant, params)}
  if sequential:
    out.update(stop=c.stop, futility=c.get("futility", "predictive"), slots=int(c.slots))
  if kind == "norm-aware":
    out["norm_aware_bound"] = c.norm_aware_bound
  return out


def record(base: dict, position: int, statistics: dict) -> dict:
  """One row's record: :func:`group`'s ``base``, the image's place in its batch, statistics."""
  return {**base, "noise": {**base["noise"], "position": int(position)},
          "statistics": statistics}


def host_sums(sums) -> dict[str, np.ndarray | None]:
  """the ``ScoreStatistics`` of ``certify.estimate_scores(..., statistics=True)`` on the host, as ``{name: [B, 2, ...]}``."""
  stats = sums.stats
  return {"center": np.asarray(sums.center), "total": np.asarray(stats.total),
          "total_sq": np.asarray(stats.total_sq),
          "log_capital": None if stats.log_capital is None else np.asarray(stats.log_capital)}


def fixed_statistics(sums: dict, *, reference: str, bound: str, i: int) -> dict:
  """A fixed-n row's statistics: :func:`host_sums` of the run at image ``i`` of the batch
  and ``reference``; ``log_capital`` only for ``bound="betting"`` (the only bound using it)."""
  r = certify.REFERENCES.index(reference)
  out = {name: float(sums[name][i, r]) for name in ("center", "total", "total_sq")}
  if bound == "betting":
    out["log_capital"] = encode_array(sums["log_capital"][i, r])
  return out
