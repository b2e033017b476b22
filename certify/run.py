r"""The paper's Table 1 (feature certification) for the configured encoder(s).

  python -m certify.run --config configs/default.py --workdir /tmp/fsjax_certify

(Table 2 is its own program: ``python -m certify.table2``.)

For each encoder variant (the base encoder "FS"; with ``config.gsb.checkpoint`` also
"FS+D", "FS+M", "FS+D+M", the Table 6 ablation), each sigma and each image, one two-stage
Monte Carlo run gives every bound for both references (``clean``: the paper's u = f(x);
``mean``: the mean-direction certificate). The table averages over images:

* ``B@eps``: the bound on ``<f_s(x'), u>`` for ``||x' - x|| <= eps`` (the paper's FCSB
  average, negative values included, as the paper averages them);
* ``cert@eps``: the fraction of images whose cosine is certified (B >= 0);
* ``R``: the average certified radius for ``cos >= config.certify.cos`` (uncertified
  images count as radius 0).

With ``config.certify.norm_aware`` (the default) each variant and sigma gains a row of
the norm-aware cosine certificate (docs/method.md section 2c; :func:`certify.norm_aware_fcsb`,
mean reference, bound ``config.certify.norm_aware_bound``, alpha split between the score
and the norm), labelled ``<bound> + norm``, and every row gains the certified cosine
columns ``cos@eps``: ``B / U(eps)`` for the norm-aware row, Theorem 3.2's ``B`` for the
others (-1, vacuous, where B < 0), so the inner-product and cosine bounds sit side by
side; its ``R`` is the norm-aware radius.

``config.certify.mode = "sequential"`` replaces the fixed-n Monte Carlo by
:func:`certify.sequential_fcsb` (anytime-valid betting confidence sequences, cross-image
dynamic batching; docs/method.md section 2b): each image stops once its decisions
"cos >= config.certify.cos at every eps" are settled (``config.certify.stop``; a decision
is given up once n_max is predicted not to certify it, ``config.certify.futility``), or at
``n_max = config.certify.n``; rows are labelled ``betting (sequential)`` and record the
samples each image used (``samples``; the table's ``samples`` column is their mean). The
fixed-n mode (``"fixed"``, the default) is unchanged.

Rows with bound ``point`` are the paper's plug-in estimates, NOT certificates. Writes
``results.jsonl`` (one row per image, variant, sigma, reference, bound), ``table.md``
(captioned with alpha, n0, n and the number of images), ``table.csv``, ``config.json``,
``fcsb.png`` (each variant's tightest valid bound with the mean reference: the headline;
below it one panel row per variant with every bound and reference) and ``certified.png``
(the share of images certified at cos >= ``config.certify.cos`` for radius >= r, per
variant) into the workdir.

Every row carries a ``record`` (:mod:`certify.records`: the statistics its bound used,
n0, n, alpha, sigma's pixel convention, the noise key, code version and parameter hash),
from which ``python -m certify.verify WORKDIR`` re-derives its certificate.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import pathlib
from typing import Iterable

import jax
import numpy as np

import certify
from certify import records
from certify import report
from fsjax import checkpointing
from fsjax import checks
from fsjax import cli
from fsjax import data as data_lib
from fsjax import pod
from fsjax import smoothing
from fsjax import variants as variants_lib


def certify_images(variants, images: np.ndarray, labels: np.ndarray, config, key: jax.Array,
                   *, first_image: int = 0, progress=None) -> Iterable[dict]:
  """Yields one result row per (variant, sigma, image, reference, bound).

  One two-stage Monte Carlo run per (variant, sigma) gives every bound for both
  references (:func:`certify.estimate_scores`); each estimate's certificate is
  :func:`certify.feature_certificate` (Theorem 3.2 / Corollary 3.3 on the score deficit
  1 - L, which keeps float32 precision where L is within 1e-7 of 1; ``certify.fcsb``
  computes the same numbers). ``progress`` (a :class:`certify.report.SampleProgress`)
  advances by noise samples x images after each chunk of samples of the Monte Carlo (the
  results do not change). The rows of one (variant, sigma) are :func:`certify_group`'s.
  """
  for name, encoder, params in variants:
    for sigma in config.certify.sigmas:
      yield from certify_group(name, encoder, params, images, labels, config, key, sigma,
                               first_image=first_image, progress=progress)


def certify_group(name, encoder, params, images: np.ndarray, labels: np.ndarray, config,
                  key: jax.Array, sigma: float, *, first_image: int = 0,
                  progress=None) -> Iterable[dict]:
  """The rows of one variant at one sigma for one batch of images, in the order of
  :func:`row_kinds` (outer) and image (inner).

  The noise is ``smoothing.sigma_key(key, sigma)``'s: the same for every variant, and
  for the fixed-n rows one draw per sample for the whole batch (an image's noise depends
  on its position in its batch, so ``config.data.batch_size`` is part of the result;
  resuming and pod runs go by whole batches and reproduce it bit for bit). Sequential
  rows name each image's noise stream by its index in the data.
  """
  c = config.certify
  eps = np.asarray(c.eps, np.float32)
  k = smoothing.sigma_key(key, sigma)
  if c.get("mode", "fixed") == "sequential":
    yield from _sequential_rows(name, encoder, params, images, labels, config, sigma, k,
                                first_image=first_image, progress=progress)
    return
  advance = None if progress is None else progress.task(
      f"{name}, sigma {sigma:g}: {c.n0} + {c.n} noise samples x {len(images)} images",
      images=len(images), compile_key=(name, images.shape))
  estimates, sums = certify.estimate_scores(
      params, images, encoder=encoder, sigma=sigma, key=k, n=c.n, n0=c.n0, alpha=c.alpha,
      bounds=tuple(c.bounds), references=tuple(c.references), chunk_size=c.chunk_size,
      progress=advance, statistics=True)
  # What certify.verify re-derives each row from (certify.records).
  sums = records.host_sums(sums)
  record = records.group(config, variant=name, params=params, sigma_key=k, sigma=sigma,
                         first_image=first_image, images=len(images), kind="fixed")
  for estimate in estimates:
    cert = certify.feature_certificate(estimate, eps=eps, cos=c.cos)
    deficit, inner, radius, samples = (np.asarray(a) for a in (
        estimate.deficit, cert.inner_product_bound, cert.radius, estimate.samples))
    for i in range(images.shape[0]):
      yield {"variant": name, "image": first_image + i, "sigma": float(sigma),
             "reference": estimate.reference, "bound": estimate.bound,
             "certificate": estimate.is_certificate, "label": int(labels[i]),
             "score": float(1.0 - deficit[i]), "score_deficit": float(deficit[i]),
             "inner_product_bound": dict(zip(map(float, eps), map(float, inner[i]))),
             "radius": float(radius[i]), "cos": float(c.cos), "samples": int(samples[i]),
             "record": records.record(record, i, records.fixed_statistics(
                 sums, reference=estimate.reference, bound=estimate.bound, i=i))}
  if c.get("norm_aware"):
    yield from _norm_aware_rows(name, encoder, params, images, labels, config, sigma, k,
                                first_image=first_image)


# A result row's identity: what a resumed run matches against results.jsonl.
SEQUENTIAL_BOUND = "betting (sequential)"  # certify.SequentialCertificate.bound
ROW_KEY = ("variant", "sigma", "image", "reference", "bound", "cosine_kind")


def row_kinds(config) -> list[tuple[str, str, str | None]]:
  """``(reference, bound, cosine_kind)`` of the rows each image gets per variant and
  sigma, in the order :func:`certify_group` yields them."""
  c = config.certify
  if c.get("mode", "fixed") == "sequential":
    kinds = [(ref, SEQUENTIAL_BOUND, "inner product") for ref in c.references]
    return kinds + ([("mean", SEQUENTIAL_BOUND, "norm-aware")] if c.get("norm_aware") else [])
  kinds = [(ref, bound, None) for ref in c.references for bound in c.bounds]
  return kinds + ([("mean", c.norm_aware_bound, "norm-aware")] if c.get("norm_aware") else [])


def group_keys(config, variant: str, sigma: float, images: range) -> list[tuple]:
  """The :data:`ROW_KEY` of every row of one (batch, variant, sigma), in order."""
  return [(variant, float(sigma), i, ref, bound, kind)
          for ref, bound, kind in row_kinds(config) for i in images]


def _cosine_row(name, sigma, i, labels, config, *, reference, bound, deficit, norm_upper,
                inner, cosine, radius, samples, first_image, record, **extra) -> dict:
  """One norm-aware (or sequential) result row; the fixed-n rows keep their own schema.

  ``record``: :func:`certify.records.group`'s part of the row's record; the image's
  statistics (its bounds ``deficit`` and ``norm_upper``) are added here.
  """
  eps = [float(e) for e in np.asarray(config.certify.eps, np.float32)]
  return {"variant": name, "image": first_image + i, "sigma": float(sigma),
          "reference": reference, "bound": bound, "certificate": True,
          "label": int(labels[i]), "score": float(1.0 - deficit[i]),
          "score_deficit": float(deficit[i]), **extra,
          "norm_upper": float(norm_upper[i]),
          "inner_product_bound": dict(zip(eps, map(float, inner[i]))),
          "cosine_bound": dict(zip(eps, map(float, cosine[i]))),
          "radius": float(radius[i]), "cos": float(config.certify.cos),
          "samples": int(samples[i]),
          "record": records.record(record, i, {"deficit": float(deficit[i]),
                                               "norm_upper": float(norm_upper[i])})}


def _norm_aware_rows(name, encoder, params, images, labels, config, sigma, key, *,
                     first_image: int) -> Iterable[dict]:
  """Rows of the norm-aware cosine certificate (docs/method.md section 2c), mean reference.

  :func:`certify.norm_aware_fcsb` on the same noise as the inner-product rows: the score's
  lower bound L and the norm's upper bound N each at level alpha / 2. The row records
  ``1 - L`` and N, from which :func:`certify.norm_aware_cosine_bound` and
  :func:`certify.norm_aware_radius` give its cosine bounds and radius.
  """
  c = config.certify
  eps = np.asarray(c.eps, np.float32)
  cert = certify.norm_aware_fcsb(params, images, encoder=encoder, sigma=sigma, eps=eps,
                                 key=key, n=c.n, n0=c.n0, alpha=c.alpha,
                                 bound=c.norm_aware_bound, chunk_size=c.chunk_size)
  radius = certify.norm_aware_radius(cert.deficit, cert.norm_upper, sigma, c.cos)
  deficit, norm_upper, inner, cosine, radius = (np.asarray(a) for a in (
      cert.deficit, cert.norm_upper, cert.inner_product_bound, cert.cosine_bound, radius))
  samples = np.full(len(images), c.n0 + c.n)
  record = records.group(config, variant=name, params=params, sigma_key=key, sigma=sigma,
                         first_image=first_image, images=len(images), kind="norm-aware")
  for i in range(images.shape[0]):
    yield _cosine_row(name, sigma, i, labels, config, reference="mean",
                      bound=c.norm_aware_bound, cosine_kind="norm-aware", deficit=deficit,
                      norm_upper=norm_upper, inner=inner, cosine=cosine, radius=radius,
                      samples=samples, first_image=first_image, record=record)


def sequential_kinds(c) -> list[tuple[str, bool]]:
  """``(reference, norm_aware)`` of each sequential run per (variant, sigma, batch)."""
  return [(ref, False) for ref in c.references] + (
      [("mean", True)] if c.get("norm_aware") else [])


def _sequential_rows(name, encoder, params, images, labels, config, sigma, key, *,
                     first_image: int, progress=None) -> Iterable[dict]:
  """``mode="sequential"``: :func:`certify.sequential_fcsb` rows, one per reference (inner
  product cosine) and, with ``norm_aware``, one norm-aware row (mean reference).

  Each image's noise stream is named by its index in the data (``image_ids``), so the
  numbers do not depend on the batch an image falls in. ``progress`` (a
  :class:`certify.report.SampleProgress` counting n0 + n per image and run) advances by
  the samples drawn; what an image did not draw is taken off its total as it stops.
  """
  c = config.certify
  ids = first_image + np.arange(len(images))
  kinds = sequential_kinds(c)
  record = records.group(config, variant=name, params=params, sigma_key=key, sigma=sigma,
                         first_image=first_image, images=len(images), kind="sequential")
  for reference, norm_aware in kinds:
    drawn = []
    advance = None if progress is None else progress.task(
        f"{name}, sigma {sigma:g}: sequential{', norm-aware' if norm_aware else ''}, "
        f"{reference} reference, n_max = {c.n}, {len(images)} images", images=1,
        compile_key=(name, "sequential", norm_aware, reference))
    cert = certify.sequential_fcsb(
        params, images, encoder=encoder, sigma=sigma, eps=list(c.eps), key=key, cos=c.cos,
        n_max=c.n, n0=c.n0, alpha=c.alpha, norm_aware=norm_aware, reference=reference,
        stop=c.stop, futility=c.get("futility", "predictive"),
        chunk_size=c.sequential_chunk_size, slots=c.slots, image_ids=ids,
        progress=None if advance is None else lambda k: (drawn.append(k), advance(k)))
    if progress is not None:
      progress.grow(sum(drawn) - len(images) * (c.n0 + c.n))
    arrays = {k: np.asarray(getattr(cert, k)) for k in (
        "deficit", "norm_upper", "inner_product_bound", "cosine_bound", "radius", "samples")}
    for i in range(images.shape[0]):
      yield _cosine_row(
          name, sigma, i, labels, config, reference=reference, bound=cert.bound,
          cosine_kind="norm-aware" if norm_aware else "inner product", mode="sequential",
          deficit=arrays["deficit"], norm_upper=arrays["norm_upper"],
          inner=arrays["inner_product_bound"], cosine=arrays["cosine_bound"],
          radius=arrays["radius"], samples=arrays["samples"], first_image=first_image,
          record=record)


def _bound_label(bound: str, cosine_kind: str | None = None) -> str:
  label = bound if bound != "point" else "point (estimate)"
  return f"{label} + norm" if cosine_kind == "norm-aware" else label


def _cosine_bounds(r: dict, eps: float) -> float:
  """The row's certified cosine at eps: its ``cosine_bound``, or Theorem 3.2's B (-1 where
  B < 0) for a fixed-n inner-product row."""
  if "cosine_bound" in r:
    return r["cosine_bound"][float(eps)]
  b = r["inner_product_bound"][float(eps)]
  return b if b >= 0 else -1.0


def summarise(rows: list[dict], eps: Iterable[float]) -> list[dict]:
  """Averages result rows over images; one summary row per (variant, sigma, ref, bound)."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["variant"], r["sigma"], r["reference"], r["bound"],
            r.get("cosine_kind"))].append(r)
  norm_aware = any(r.get("cosine_kind") == "norm-aware" for r in rows)
  sequential = any(r.get("mode") == "sequential" for r in rows)
  table = []
  for (variant, sigma, ref, bound, kind), rs in groups.items():
    row = {"variant": variant, "sigma": sigma, "reference": ref,
           "bound": _bound_label(bound, kind), "images": len(rs)}
    for e in eps:
      b = np.array([r["inner_product_bound"][float(e)] for r in rs])
      row[f"B@{e:g}"] = float(b.mean())
      row[f"cert@{e:g}"] = float((b >= 0).mean())
    row[f"R(cos>={rs[0]['cos']:g})"] = float(np.mean([max(r["radius"], 0.0) for r in rs]))
    if norm_aware:  # the certified cosine beside the inner-product bound
      for e in eps:
        row[f"cos@{e:g}"] = float(np.mean([_cosine_bounds(r, e) for r in rs]))
    if sequential:
      row["samples"] = float(np.mean([r["samples"] for r in rs]))
    table.append(row)
  return table


def headline(table: list[dict]) -> list[dict]:
  """Per (variant, sigma): the mean-reference row of the valid bound with the largest R.

  With only the clean reference configured, its rows are used. Point estimates are
  never a headline (they are not certificates), nor are the norm-aware rows (their B is
  the inner-product bound at alpha / 2; their gain is in the cos@eps columns).
  """
  best = {}
  for r in table:
    if r["bound"].startswith("point") or r["bound"].endswith("+ norm"):
      continue
    key = (r["variant"], r["sigma"])
    radius = next(v for k, v in r.items() if k.startswith("R("))
    rank = (r["reference"] == "mean", radius)
    if key not in best or rank > best[key][0]:
      best[key] = (rank, r)
  return [r for _, r in best.values()]


def plot(table: list[dict], eps, path: pathlib.Path) -> None:
  """PNG: average bound B against eps; top row the headline per variant, then one row of
  small multiples per variant with every reference and bound.

  One panel column per sigma. Top row: one colour per variant (legend: the variants).
  Variant rows: one colour per bound, solid for the mean reference and dashed for the
  clean one, so each panel holds at most (bounds x references) lines and one shared
  legend names the bounds and references (a handful of entries, whatever the number of
  variants). Legends sit outside the axes so they never hide data.
  """
  from matplotlib import lines as mlines  # pylint: disable=g-import-not-at-top
  plt = report.pyplot()
  sigmas = sorted({r["sigma"] for r in table})
  variants = list(dict.fromkeys(r["variant"] for r in table))
  bounds = list(dict.fromkeys(r["bound"] for r in table))
  colours = plt.get_cmap("tab10")
  dashes = {"mean": "-", "clean": "--"}
  top = headline(table)
  fig, axes = plt.subplots(1 + len(variants), len(sigmas),
                           figsize=(5 * len(sigmas) + 2.5, 3.0 * (1 + len(variants))),
                           squeeze=False, sharex=True)
  for col, sigma in enumerate(sigmas):
    ax = axes[0, col]
    for r in top:
      if r["sigma"] == sigma:
        ax.plot(eps, [r[f"B@{e:g}"] for e in eps], "-", marker="o", ms=3,
                color=colours(variants.index(r["variant"]) % 10), label=r["variant"])
    ax.set_title(f"sigma = {sigma:g}: tightest valid bound per variant", fontsize=9)
    for v, variant in enumerate(variants):
      ax = axes[1 + v, col]
      for r in table:
        if r["sigma"] == sigma and r["variant"] == variant:
          ax.plot(eps, [r[f"B@{e:g}"] for e in eps], dashes.get(r["reference"], ":"),
                  color=colours(bounds.index(r["bound"]) % 10), lw=1.2)
      ax.set_title(f"sigma = {sigma:g}, {variant}: every reference and bound", fontsize=9)
    for ax in axes[:, col]:
      ax.axhline(0.0, color="gray", lw=0.5)
      ax.set_ylabel("average bound on cosine", fontsize=8)
    axes[-1, col].set_xlabel("eps (l2, [0,1] pixels)")
  last = axes[0, -1]
  last.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="variant",
              title_fontsize=7)
  handles = [mlines.Line2D([], [], color=colours(b % 10), label=bound)
             for b, bound in enumerate(bounds)]
  references = list(dict.fromkeys(r["reference"] for r in table))
  handles += [mlines.Line2D([], [], color="black", linestyle=dashes.get(ref, ":"),
                            label=f"{ref} reference") for ref in references]
  axes[1, -1].legend(handles=handles, fontsize=7, loc="upper left",
                     bbox_to_anchor=(1.02, 1.0), title="bound / reference", title_fontsize=7)
  fig.tight_layout()
  report.save_figure(fig, path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def plot_certified(rows: list[dict], config, path: pathlib.Path) -> None:
  """PNG: share of images whose cosine >= cos is certified at radius >= r, per variant.

  Uses each variant's headline bound (mean reference, tightest valid bound); one panel
  per sigma, the plot certification papers draw.
  """
  plt = report.pyplot()
  table = summarise(rows, config.certify.eps)
  picks = {(r["variant"], r["sigma"]): (r["reference"], r["bound"]) for r in headline(table)}
  sigmas = sorted({r["sigma"] for r in rows})
  fig, axes = plt.subplots(1, len(sigmas), figsize=(5 * len(sigmas) + 2, 3.8), squeeze=False)
  for ax, sigma in zip(axes[0], sigmas):
    for (variant, s), (ref, bound) in picks.items():
      if s != sigma:
        continue
      radii = np.array([r["radius"] for r in rows if r["variant"] == variant
                        and r["sigma"] == sigma and r["reference"] == ref
                        and r["bound"] == bound and r.get("cosine_kind") != "norm-aware"])
      grid = np.linspace(0.0, max(float(radii.max(initial=0.0)), 1e-3) * 1.05, 200)
      ax.plot(grid, [(radii >= g).mean() for g in grid], label=f"{variant} ({ref}, {bound})")
    ax.set(title=f"sigma = {sigma:g}", xlabel="radius r (l2, [0,1] pixels)",
           ylabel=f"share certified, cos >= {config.certify.cos:g}", ylim=(-0.02, 1.02))
  axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.tight_layout()
  report.save_figure(fig, path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def caption(config, images: int) -> str:
  c = config.certify
  sequential = c.get("mode", "fixed") == "sequential"
  text = ("Table 1: feature certificate, average over images ("
          + report.monte_carlo_caption(sigma=list(c.sigmas), n0=c.n0, n=c.n, alpha=c.alpha,
                                       images=images)
          + "). B@eps: average bound on <f_s(x'), u> for ||x' - x|| <= eps; cert@eps: share "
          f"with B >= 0; R: average certified radius for cos >= {c.cos:g}. 'point' rows are "
          "the paper's plug-in estimates, not certificates.")
  dtype = report.compute_dtype(config)
  if dtype is not None:  # "auto" says nothing of the arithmetic behind the numbers
    text += f" Encoder compute dtype: {dtype} (config.encoder.dtype = {config.encoder.dtype})."
  if c.get("norm_aware"):
    text += (" '+ norm' rows: the norm-aware cosine certificate (mean reference; score and "
             "norm bounds at alpha / 2 each); cos@eps: average certified cosine, B / U(eps) "
             "for '+ norm' rows, B for the others (-1 where B < 0); R of a '+ norm' row is "
             "its norm-aware radius.")
  if sequential:
    text += (f" Sequential mode (n = n_max, stop = {c.stop}): anytime-valid betting "
             "confidence sequences; samples: average noise samples used per image (n0 "
             "included).")
  return text


MODES = ("fixed", "sequential")
STOPS = certify.SEQUENTIAL_STOPS


def check_config(config) -> None:
  """Validates ``config.certify`` before any data or model loads (errors name the key)."""
  c = config.certify
  if not c.sigmas:
    raise ValueError("config.certify.sigmas is empty: give at least one noise level, e.g. "
                     "--config.certify.sigmas='(0.25,)'.")
  for sigma in c.sigmas:
    for bound in c.bounds:
      for reference in c.references:
        try:
          certify.check_certify_args(sigma=sigma, n=c.n, n0=c.n0, alpha=c.alpha, bound=bound,
                                     reference=reference, eps=list(c.eps), cos=c.cos,
                                     chunk_size=c.chunk_size)
        except ValueError as e:
          raise ValueError(f"config.certify: {e}") from None
  mode = c.get("mode", "fixed")
  if mode not in MODES:
    raise ValueError(f"config.certify.mode must be one of {MODES}, got {mode!r}.")
  norm_aware = c.get("norm_aware", False)
  if not isinstance(norm_aware, bool):
    raise ValueError(f"config.certify.norm_aware must be True or False, got {norm_aware!r}.")
  if norm_aware and mode == "fixed":
    if c.norm_aware_bound not in ("hoeffding", "bernstein", "betting"):
      raise ValueError("config.certify.norm_aware_bound must be 'hoeffding', 'bernstein' or "
                       f"'betting' (a certificate), got {c.norm_aware_bound!r}.")
    if c.n % 2 or c.chunk_size % 2 or c.n < 4:
      raise ValueError("config.certify.norm_aware pairs consecutive samples: n (>= 4) and "
                       f"chunk_size must be even, got n={c.n}, chunk_size={c.chunk_size}; "
                       "or set --config.certify.norm_aware=False.")
  if mode == "sequential":
    if c.stop not in STOPS:
      raise ValueError(f"config.certify.stop must be one of {STOPS}, got {c.stop!r}.")
    checks.check_choice(c.get("futility", "predictive"), name="config.certify.futility",
                        choices=certify.SEQUENTIAL_FUTILITY)
    for key in ("slots", "sequential_chunk_size"):
      if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
        raise ValueError(f"config.certify.{key} must be a positive integer, got {c[key]!r}.")
    if norm_aware and c.sequential_chunk_size % 2:
      raise ValueError("config.certify.sequential_chunk_size must be even with norm_aware "
                       f"(pairs), got {c.sequential_chunk_size}.")


def _batch(dataset: data_lib.Dataset, b: int) -> dict[str, np.ndarray]:
  """Batch ``b`` of ``dataset``, reading only its images."""
  size = dataset.batch_size
  one = dataclasses.replace(dataset, indices=dataset.indices[b * size:(b + 1) * size])
  return next(iter(one))


def _spans(dataset: data_lib.Dataset) -> list[range]:
  """The image indices of each batch."""
  size, total = dataset.batch_size, dataset.num_examples
  return [range(b * size, min((b + 1) * size, total)) for b in range(len(dataset))]


def run(config, workdir: str) -> list[dict]:
  """Certifies ``config.data`` images with every variant; writes results; returns the table.

  Resumable: the rows already in ``workdir/results.jsonl`` (an earlier run of the same
  config: :func:`certify.report.check_workdir` refuses another's) are kept, and only the
  (batch, variant, sigma) groups missing any row are certified; the table is built from
  all rows in the uninterrupted run's order, so it is the same, bit for bit. Ctrl-C
  stops after the group being certified (its rows written; a second Ctrl-C abandons it)
  with :class:`fsjax.cli.Interrupted`.

  A pod run (several processes: :mod:`fsjax.pod`) splits the batches to certify among
  the processes; process 0 gathers their rows after each round, writes them in the
  single-process order and makes the table: the same results as one process.
  """
  check_config(config)
  if config.certify.get("distributed"):
    pod.initialize()
  workdir = pathlib.Path(workdir)
  results = workdir / "results.jsonl"
  writer = pod.is_writer()
  report.check_workdir(config, results)  # another config's rows: refuse now
  variants = variants_lib.encoder_variants(config)
  dataset = data_lib.from_config(config.data)
  key = jax.random.PRNGKey(config.seed)
  c = config.certify
  sigmas = [float(s) for s in c.sigmas]
  sequential = c.get("mode", "fixed") == "sequential"
  spans = _spans(dataset)
  images = sum(map(len, spans))
  groups = [(b, v, s) for b in range(len(spans)) for v in range(len(variants))
            for s in range(len(sigmas))]
  keys = {g: group_keys(config, variants[g[1]][0], sigmas[g[2]], spans[g[0]]) for g in groups}
  done = report.done_rows(results, ROW_KEY) if writer else {}
  # Process 0's files decide what is left, for every process.
  left = pod.broadcast(np.array([not all(k in done for k in keys[g]) for g in groups],
                                 np.int32))
  todo = [g for g, missing in zip(groups, left) if missing]
  batches = sorted({b for b, _, _ in todo})
  rounds = [batches[i:i + jax.process_count()]
            for i in range(0, len(batches), jax.process_count())]
  mine = [g for g in todo if g[0] in pod.shard(batches)]
  fresh: dict[tuple, dict] = {}
  if len(todo) < len(groups) and writer:
    print(f"certify.run: resuming {workdir}: {_done_line(groups, todo, spans, images)}"
          + ("; certifying the rest." if todo else "; nothing left to certify."), flush=True)
  # Sequential: at most n0 + n per image and run (sequential_kinds); the rest is taken off.
  samples = sum(len(spans[b]) for b, _, _ in mine) * (c.n0 + c.n) * (
      len(sequential_kinds(c)) if sequential else 1)
  # One writer: process 0 holds the workdir and appends the rows.
  lock = checkpointing.lock_workdir(workdir, "certify.run") if writer else (
      contextlib.nullcontext())
  rows_file = report.rows(results, config) if writer else contextlib.nullcontext(
      lambda row: None)
  with lock, rows_file as write, cli.interruptible() as stop, report.SampleProgress(
      samples, "certify") as progress:
    for batch_round in rounds:
      stopped, rows = False, []
      for b in pod.shard(batch_round):
        data = _batch(dataset, b)
        for _, v, s in (g for g in mine if g[0] == b):
          if stop():
            stopped = True
            break
          name, encoder, params = variants[v]
          group = [report.as_read(r) for r in certify_group(
              name, encoder, params, data["image"], data["label"], config, key, sigmas[s],
              first_image=spans[b].start, progress=progress)]
          got = [tuple(r.get(k) for k in ROW_KEY) for r in group]
          if got != keys[(b, v, s)]:
            raise RuntimeError(f"certify.run: the rows of {name} at sigma {sigmas[s]:g} are "
                               "not the ones row_kinds() promises; resuming would be wrong.")
          rows += group
          if jax.process_count() == 1:
            for r in group:
              write(r)
          if stop():  # pressed while this group ran: its rows are written, stop here
            stopped = True
            break
      # Pods: process 0 writes every process's rows, in the order of one process.
      parts = pod.gather_bytes(json.dumps({"stopped": stopped, "rows": rows}).encode())
      for part in map(json.loads, parts):
        stopped = stopped or part["stopped"]
        for r in map(report.as_read, part["rows"]):
          fresh[tuple(r.get(k) for k in ROW_KEY)] = r
          if jax.process_count() > 1:
            write(r)
      if stopped:
        have = {**done, **fresh}
        left = [g for g in groups if not all(k in have for k in keys[g])]
        rest = "certify the rest" if left else "write the tables and plots"
        raise cli.stopped("certify.run", _done_line(groups, left, spans, images), results,
                          rest)
  if not writer:
    return []
  have = {**done, **fresh}
  rows = [have[k] for g in groups for k in keys[g]]
  table = summarise(rows, config.certify.eps)
  report.write_table(table, workdir, "table", caption=caption(config, images))
  plot(table, list(config.certify.eps), workdir / "fcsb.png")
  plot_certified(rows, config, workdir / "certified.png")
  # What a person reads at the end: the headline rows, not the whole table (it is on disk).
  print(report.markdown(headline(table), caption=f"Table 1, headline rows (each variant's "
                        f"tightest valid bound; {images} images):"))
  print(f"The whole table: {workdir / 'table.md'} (and table.csv); one row per image: "
        f"{workdir / 'results.jsonl'}; plots: {workdir / 'fcsb.png'}, "
        f"{workdir / 'certified.png'}.")
  return table


def _done_line(groups: list[tuple], left: list[tuple], spans: list[range], images: int
               ) -> str:
  """What is certified, for a person: whole images, and the (batch, variant, sigma) groups
  already done among the other images (each group is saved as it finishes)."""
  unfinished = {b for b, _, _ in left}
  certified = sum(len(spans[b]) for b in range(len(spans)) if b not in unfinished)
  line = f"{certified} of {images} images are certified"
  others = [g for g in groups if g[0] in unfinished]
  partial = len(others) - len(left)
  if partial:
    line += (f" ({partial} of {len(others)} variant x sigma groups of the other "
             f"{images - certified} done)")
  return line


def main(config, workdir: str) -> None:
  run(config, workdir)


if __name__ == "__main__":
  cli.run(main, workdir_help="Where results are written.")
