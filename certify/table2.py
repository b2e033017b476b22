r"""The paper's Table 2 (prediction certification): FS cosine prototypes vs RS linear head.

  python -m train.head --config configs/default.py --workdir /tmp/fsjax_default
  python -m certify.table2 --config configs/default.py --workdir /tmp/fsjax_default

Paper Appendix A.3 and Table 2; method.md section 3. The heads come from
:mod:`train.head` (same workdir, same config). For each sigma of ``config.certify.sigmas``
and each test image (``config.test_data`` restricted to the heads' classes,
``config.prediction.test_per_class`` each):

* FS: :func:`certify.prediction_margin` with the sigma's cosine head (on the head's
  projection of the encoder when it has one, :func:`fsjax.heads.fs_classifier`): the mean
  direction from ``n0`` samples picks the class, ``n`` fresh samples give the
  ``prediction.bound`` confidence bounds, and ``prediction.certificate`` says which
  certificate follows (docs/method.md 3b): ``"select"`` (default) takes, per image, the
  one of Theorem A.3.2's cosine cap and the per-class certificate that the ``n0``
  selection samples predict to be larger; both are computed from the same samples, so
  the table also shows each alone (``"FS: A.3.2 only"``, ``"FS: per-class only"``; each
  sound on its own, at its own bounds' level).
* The paper's protocol, labelled as what it is (``"FS paper protocol (estimate)"``): the
  direction from ``prediction.paper_n0`` samples and the plug-in mean of ``h_u`` over
  ``paper_n0`` more (``bound="point"``) into Theorem A.3.2's radius: an estimate, NOT a
  certificate, on the first ``2 paper_n0`` of the same noise samples; ``paper_n0=None``
  leaves it out.
* RS: :func:`certify.rs_certify` (Cohen et al.'s CERTIFY) with the sigma's linear head as
  base classifier on ``f(x + delta)``: Clopper-Pearson ``pA``, radius ``sigma Phi^-1(pA)``.

Both methods get the same key for a batch, hence the very same noise samples (common
random numbers: the comparison is paired). The key of batch ``b`` at sigma is
``fold_in(fold_in(PRNGKey(config.seed), round(sigma * 1e6)), b)``; batches hold
``config.certify.batch_size`` images, the last one padded with copies of its last image
(not reported) so that every call has one shape. ``n0`` / ``n`` are
``config.prediction.n0`` / ``n`` when set, else ``config.certify``'s; ``alpha`` and
``chunk_size`` are ``config.certify``'s.

The table reports certified accuracy (:func:`certify.certified_accuracy`: certified class
== label and radius >= r) at each radius of ``config.prediction.radii``. Writes
``prediction_results.jsonl`` (one row per image, sigma and method, FS or RS; FS rows also
carry the certificate used, each certificate alone (``class_cosine`` / ``radius_cosine``,
``class_per_class`` / ``radius_per_class``), the paper protocol's ``paper_class`` /
``paper_radius``, the margin ``Delta``, ``h_lcb`` and the ``required_margin`` at radius
0), ``table2.md``,
``table2.csv``, ``table2.png`` (certified accuracy against radius) and
``table2_margins.png`` (each image's margin against the margin its certificate needs)
into the workdir, and ``table2_config.json`` beside the rows.

``config.certify.mode = "sequential"`` (docs/method.md 3d) certifies FS (Theorem A.3.2)
and RS with :func:`certify.sequential_predict` instead: each image stops once "certified
at r" is settled for every r of ``config.prediction.radii`` (``config.certify.stop``,
``futility``, ``sequential_chunk_size``, ``slots``), n_max = Table 2's ``n``; rows record
the ``samples`` each image drew and the table their median and mean. The per-class
certificate and the paper's plug-in have no sequential form, so those rows are left out.

Interrupted (Ctrl-C: it stops after the (sigma, batch) group being certified, exit status
130) or killed, the same command resumes: it certifies only the groups missing from
``prediction_results.jsonl`` and ends with the table and plots of an uninterrupted run.
A workdir holding rows of another config is refused in one line (use another workdir).
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import numpy as np

import certify
from certify import report
from fsjax import batching
from fsjax import checkpointing
from fsjax import checks
from fsjax import cli
from fsjax import heads as heads_lib
from fsjax import smoothing
from fsjax import variants as variants_lib

METHODS = ("FS", "RS")  # the rows of prediction_results.jsonl
RESULTS, CONFIG_NAME = "prediction_results.jsonl", "table2_config.json"
# A result row's identity: what a resumed run matches against prediction_results.jsonl.
ROW_KEY = ("sigma", "image", "method", "variant")
# The rows of the table, per sigma: (name, row method, class field, radius field). The FS
# rows after the first come from the same FS rows (same samples); the last is an estimate.
PAPER = "FS paper protocol (estimate)"
TABLE_ROWS = (("FS", "FS", "predicted_class", "radius"),
              ("FS: A.3.2 only", "FS", "class_cosine", "radius_cosine"),
              ("FS: per-class only", "FS", "class_per_class", "radius_per_class"),
              ("RS", "RS", "predicted_class", "radius"),
              (PAPER, "FS", "paper_class", "paper_radius"))


def prediction_settings(config) -> dict[str, Any]:
  """``n0``, ``n``, ``alpha``, ``bound``, ``certificate``, ``paper_n0``, ``chunk_size``,
  ``batch_size`` and the mode (``config.certify``'s ``mode``, ``stop``, ``futility``,
  ``sequential_chunk_size`` and ``slots``) of Table 2."""
  p, c = config.prediction, config.certify
  pick = lambda override, default: int(default if override is None else override)
  paper_n0 = p.get("paper_n0", 16)
  settings = {"n0": pick(p.get("n0"), c.n0), "n": pick(p.get("n"), c.n),
              "alpha": float(c.alpha), "bound": str(p.get("bound", "bernstein")),
              "certificate": str(p.get("certificate", "select")),
              "paper_n0": None if paper_n0 is None else int(paper_n0),
              "chunk_size": int(c.chunk_size), "batch_size": int(c.batch_size),
              "mode": str(c.get("mode", "fixed"))}
  checks.check_choice(settings["mode"], name="config.certify.mode",
                      choices=("fixed", "sequential"))
  if settings["mode"] == "sequential":
    settings.update(radii=[float(r) for r in config.prediction.radii],
                    stop=str(c.get("stop", "decision")),
                    futility=str(c.get("futility", "predictive")),
                    sequential_chunk_size=c.get("sequential_chunk_size", 64),
                    slots=c.get("slots", 8))
    checks.check_choice(settings["stop"], name="config.certify.stop",
                        choices=certify.SEQUENTIAL_STOPS)
    checks.check_choice(settings["futility"], name="config.certify.futility",
                        choices=certify.SEQUENTIAL_FUTILITY)
    for name in ("sequential_chunk_size", "slots"):
      checks.check_positive_int(settings[name], name=f"config.certify.{name}")
  checks.check_choice(settings["bound"], name="config.prediction.bound",
                      choices=certify.BOUNDS)
  checks.check_choice(settings["certificate"], name="config.prediction.certificate",
                      choices=certify.PREDICTION_CERTIFICATES)
  if settings["paper_n0"] is not None:
    checks.check_positive_int(settings["paper_n0"], name="config.prediction.paper_n0",
                              minimum=2, meaning="samples of the paper's plug-in protocol "
                              "(None leaves that row out)")
  checks.check_positive_int(settings["n0"], name="n0 of Table 2 (config.prediction.n0, "
                            "else config.certify.n0)")
  checks.check_positive_int(settings["n"], name="n of Table 2 (config.prediction.n, else "
                            "config.certify.n)", minimum=2)
  checks.check_positive_int(settings["batch_size"], name="config.certify.batch_size")
  return settings


def _check_heads(meta: dict, heads: dict, config, encoder_name: str) -> None:
  """Raises ValueError unless the stored heads fit this config."""
  num_classes = heads_lib.check_num_classes(config.prediction.num_classes)
  if meta["classes"] != list(range(num_classes)):
    raise ValueError(f"the heads in the workdir classify {len(meta['classes'])} classes but "
                     f"config.prediction.num_classes={num_classes}; rerun train.head with "
                     "this config.")
  missing = [s for s in config.certify.sigmas if float(s) not in heads]
  if missing:
    raise ValueError(f"no heads trained for sigma {missing} (trained: {sorted(heads)}); rerun "
                     "train.head with the same config.certify.sigmas.")
  if meta["encoder"] != encoder_name:
    raise ValueError(f"the heads were trained on encoder variant {meta['encoder']!r} but this "
                     f"config gives {encoder_name!r}; use the config train.head used.")


def certify_images(params: Any, images: np.ndarray, labels: np.ndarray, *, encoder,
                   heads: dict, sigma: float, key: jax.Array, settings: dict,
                   variant: str = "FS", progress=None,
                   batches: Sequence[int] | None = None) -> list[dict]:
  """FS and RS certificates of every image at one sigma; one row per image and method.

  Args:
    params: encoder parameters.
    images: ``[N, H, W, 3]`` test images in [0, 1].
    labels: ``[N]`` labels.
    encoder: the encoder the heads were trained on.
    heads: ``{"cosine": variables, "linear": variables}`` of this sigma.
    sigma: noise level.
    key: the sigma's key; batch ``b`` uses ``fold_in(key, b)``.
    settings: :func:`prediction_settings`.
    variant: the encoder variant's name, recorded in the rows.
    progress: an optional :class:`certify.report.SampleProgress`, advanced by noise
      samples x images (the padded batch) as the chunks of samples of each method finish.
    batches: the indices of the batches to certify (a resumed run's missing ones);
      None: all. Batch ``b`` gets the same key and rows whichever others are certified.

  Returns:
    Rows ``{"method", "variant", "sigma", "image", "label", "predicted_class", "radius",
    "certified", "correct"}`` plus the Monte Carlo settings; ``predicted_class`` is -1
    and ``radius`` 0 where the method abstains.
  """
  bs = settings["batch_size"]
  mc = {k: settings[k] for k in ("n0", "n", "alpha", "chunk_size")}
  rows = []
  for b, start in enumerate(range(0, len(images), bs)):
    if batches is not None and b not in batches:
      continue
    x = images[start:start + bs]
    if settings["mode"] == "sequential":
      rows += _sequential_rows(params, x, labels[start:start + bs], start, encoder=encoder,
                               heads=heads, sigma=sigma, key=jax.random.fold_in(key, b),
                               settings=settings, variant=variant, progress=progress,
                               label=f"sigma {sigma:g}, batch {b + 1} of "
                               f"{-(-len(images) // bs)}")
      continue
    xp = batching.pad_rows(x, bs)
    k = jax.random.fold_in(key, b)
    out = {}
    task = lambda method, enc: None if progress is None else progress.task(
        f"sigma {sigma:g}, batch {b + 1} of {-(-len(images) // bs)}: {method}, "
        f"{settings['n0']} + {settings['n']} noise samples x {bs} images", images=bs,
        compile_key=(method, enc, xp.shape))
    # FS certifies the head's own classifier (on its projection of the encoder, if any).
    margin = certify.prediction_margin(params, xp, encoder=encoder, head=heads["cosine"],
                                       sigma=sigma, key=k, bound=settings["bound"],
                                       certificate=settings["certificate"],
                                       progress=task("FS", encoder), **mc)
    out["FS"] = certify.prediction_certificate(margin)
    alone = {name: certify.prediction_certificate(margin, only=name)
             for name in ("cosine", "per-class")
             if name == "cosine" or margin.class_deficits is not None}
    need = np.asarray(certify.required_margin(deficit=margin.deficit, sigma=margin.sigma))
    paper = None
    if settings["paper_n0"] is not None:  # the paper's plug-in protocol: an estimate
      pn = settings["paper_n0"]
      paper = certify.prediction_certificate(certify.prediction_margin(
          params, xp, encoder=encoder, head=heads["cosine"], sigma=sigma, key=k,
          bound="point", n0=pn, n=pn, alpha=settings["alpha"],
          chunk_size=settings["chunk_size"], progress=task("FS paper protocol", encoder)))
    out["RS"] = certify.rs_certify(params, xp, encoder=encoder, head=heads["linear"],
                                   sigma=sigma, key=k, progress=task("RS", encoder), **mc)
    for method in METHODS:
      cls, radius = (np.asarray(a)[:len(x)] for a in (out[method].predicted_class,
                                                        out[method].radius))
      for i in range(len(x)):
        label = int(labels[start + i])
        rows.append({"method": method, "variant": variant, "sigma": float(sigma),
                     "image": start + i,
                     "label": label, "predicted_class": int(cls[i]),
                     "radius": float(radius[i]),
                     "certified": bool(int(cls[i]) != certify.ABSTAIN),
                     "correct": bool(int(cls[i]) == label),
                     "bound": out[method].bound,
                     "certificate": out[method].is_certificate,
                     "n0": settings["n0"], "n": settings["n"], "alpha": settings["alpha"],
                     "certificate_used": str(out[method].certificate[i])})
        if method == "FS":  # each certificate alone, the paper's estimate, the margins plot
          rows[-1]["rule"] = settings["certificate"]
          for name, cert in alone.items():
            field = name.replace("-", "_")
            rows[-1].update({f"class_{field}": int(cert.predicted_class[i]),
                             f"radius_{field}": float(cert.radius[i])})
          if paper is not None:
            rows[-1].update({"paper_class": int(paper.predicted_class[i]),
                             "paper_radius": float(paper.radius[i]),
                             "paper_n0": settings["paper_n0"]})
          rows[-1].update({"clean_class": int(margin.predicted_class[i]),
                           "margin": float(margin.margin[i]),
                           "h_lcb": 1.0 - float(margin.deficit[i]),
                           "required_margin": float(need[i])})
  return rows


def _sequential_rows(params, x, labels, start, *, encoder, heads, sigma, key, settings,
                     variant, progress, label) -> list[dict]:
  """``mode="sequential"``: FS and RS rows of one batch from
  :func:`certify.sequential_predict`, each image stopped once "certified at r" is settled
  for every r of ``radii`` (docs/method.md 3d). FS certifies with Theorem A.3.2 (the
  per-class certificate and the paper's plug-in have no sequential form here). The noise
  of image i is ``fold_in(fold_in(key, i), chunk)`` for both methods: paired, as at fixed
  n. The progress bar's total assumed n0 + n per image; what an image did not draw is
  taken off it.
  """
  n0, n = settings["n0"], settings["n"]
  out = {}
  for method, head in (("FS", heads["cosine"]), ("RS", heads["linear"])):
    drawn = []
    advance = None if progress is None else progress.task(
        f"{label}: {method} sequential, n0 = {n0}, n_max = {n}", images=1,
        compile_key=(method, "sequential", encoder))
    out[method] = certify.sequential_predict(
        params, x, encoder=encoder, head=head, method=method, sigma=sigma,
        radii=settings["radii"], key=key, n_max=n, n0=n0, alpha=settings["alpha"],
        stop=settings["stop"], futility=settings["futility"],
        chunk_size=settings["sequential_chunk_size"], slots=settings["slots"],
        image_ids=start + np.arange(len(x)),
        progress=None if advance is None else lambda k: (drawn.append(k), advance(k)))
    if progress is not None:
      progress.grow(sum(drawn) - len(x) * (n0 + n))
  rows = []
  for method in METHODS:
    cert = out[method]
    for i in range(len(x)):
      cls, label_i = int(cert.predicted_class[i]), int(labels[i])
      rows.append({"method": method, "variant": variant, "sigma": float(sigma),
                   "image": start + i, "label": label_i, "predicted_class": cls,
                   "radius": float(cert.radius[i]),
                   "certified": bool(cls != certify.ABSTAIN), "correct": bool(cls == label_i),
                   "bound": cert.bound, "certificate": cert.is_certificate,
                   "n0": n0, "n": n, "alpha": settings["alpha"],
                   "certificate_used": str(cert.certificate[i]), "mode": "sequential",
                   "stop": settings["stop"], "futility": settings["futility"],
                   "samples": int(cert.samples[i])})
  return rows


def summarise(rows: list[dict], radii, *, num_classes: int, encoder_name: str) -> list[dict]:
  """Table 2: certified accuracy at each radius, one row per (sigma, :data:`TABLE_ROWS` entry
  the rows hold), the paper protocol's estimate last."""
  table = []
  for sigma in sorted({r["sigma"] for r in rows}):
    for name, method, cls_field, radius_field in TABLE_ROWS:
      rs = [r for r in rows if r["sigma"] == sigma and r["method"] == method
            and cls_field in r]
      if not rs:
        continue
      acc = np.asarray(certify.certified_accuracy(
          np.array([r[cls_field] for r in rs]), np.array([r[radius_field] for r in rs]),
          np.array([r["label"] for r in rs]), np.asarray(radii, np.float32),
          num_classes=num_classes))
      row = {"method": name, "variant": encoder_name, "sigma": float(sigma),
             "images": len(rs),
             "abstain": float(np.mean([r[cls_field] == certify.ABSTAIN for r in rs]))}
      # Fractions of len(rs) images: 6 digits drop float32 noise (0.65000004 -> 0.65).
      row.update({f"{float(r):g}": round(float(a), 6) for r, a in zip(radii, acc)})
      if "samples" in rs[0]:  # sequential rows: what each image drew (n0 included)
        used = np.array([r["samples"] for r in rs])
        row.update({"median samples": int(round(float(np.median(used)))),
                    "mean samples": int(round(float(np.mean(used))))})
      table.append(row)
  return table


def plot(table: list[dict], radii, path: pathlib.Path) -> None:
  """PNG: certified accuracy against radius; colour per sigma, FS solid, RS dashed, each FS
  certificate alone dotted / dash-dotted, the paper protocol's estimate thin and grey-ish."""
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  sigmas = sorted({r["sigma"] for r in table})
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for row in table:
    colour = colours[sigmas.index(row["sigma"]) % len(colours)]
    style = {"FS": "-", "RS": "--", "FS: A.3.2 only": ":", "FS: per-class only": "-."}
    ax.plot(radii, [row[f"{float(r):g}"] for r in radii], style.get(row["method"], ":"),
            color=colour, marker="o" if row["method"] in ("FS", "RS") else None, ms=3,
            lw=0.8 if row["method"] == PAPER else 1.5,
            alpha=0.5 if row["method"] == PAPER else 1.0,
            label=f"{row['method']} sigma={row['sigma']:g}")
  ax.set(xlabel="radius (l2, [0,1] pixels)", ylabel="certified accuracy", ylim=(-0.02, 1.02),
         title="Table 2: FS (cosine prototypes, solid) vs RS (linear head, dashed)")
  ax.title.set_fontsize(9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  report.save_figure(fig, path, dpi=120)
  plt.close(fig)


def plot_margins(rows: list[dict], path: pathlib.Path, *, radius: float = 0.25) -> None:
  """PNG, one panel per sigma: each image's FS margin against the margin its certificate needs.

  x: ``Delta`` needed at radius 0 (:func:`certify.required_margin` of the image's
  ``h_LCB``), y: the measured ``Delta`` of the mean direction; images above the diagonal
  are certified (filled: the clean class is correct, hollow: wrong); the dotted curve is
  the margin needed at ``radius`` (plotted against the radius-0 need).
  """
  plt = report.pyplot()
  fs = [r for r in rows if r["method"] == "FS" and "margin" in r]
  sigmas = sorted({r["sigma"] for r in fs})
  fig, axes = plt.subplots(1, max(len(sigmas), 1), figsize=(4 * max(len(sigmas), 1), 4),
                           squeeze=False)
  for ax, sigma in zip(axes[0], sigmas):
    rs = [r for r in fs if r["sigma"] == sigma]
    need = np.array([r["required_margin"] for r in rs])
    got = np.array([r["margin"] for r in rs])
    ok = np.array([r["clean_class"] == r["label"] for r in rs])
    ax.scatter(need[ok], got[ok], s=14, color="C0", label="correct class")
    ax.scatter(need[~ok], got[~ok], s=14, facecolors="none", edgecolors="C3",
               label="wrong class")
    top = float(np.pi)
    ax.plot([0, top], [0, top], "k-", lw=0.8, label="certified above")
    h = np.linspace(0.5, 1 - 1e-6, 400)
    need0 = np.asarray(certify.required_margin(h.astype(np.float32), sigma=sigma))
    need_r = np.asarray(certify.required_margin(h.astype(np.float32), sigma=sigma,
                                                radius=radius))
    ax.plot(need0, np.minimum(need_r, 2 * top), "k:", lw=0.8,
            label=f"certified at r = {radius:g} above")
    ax.set(xlim=(0, top), ylim=(0, top), title=f"sigma = {sigma:g}",
           xlabel="margin needed at r = 0 (rad)", ylabel="measured margin Delta (rad)")
    ax.title.set_fontsize(9)
  axes[0][0].legend(fontsize=7, loc="upper left")
  fig.suptitle("Table 2, FS: each image's angular margin vs what its certificate needs",
               fontsize=9)
  fig.tight_layout()
  report.save_figure(fig, path, dpi=120)
  plt.close(fig)


def run_prediction(config, workdir: str, *, variant: tuple[str, Any, Any] | None = None
                   ) -> list[dict]:
  """Certifies the test images with FS and RS at every sigma; writes results; returns the table.

  Args:
    config: the experiment config (the one ``train.head`` used).
    workdir: where the heads are and the results go.
    variant: ``(name, encoder, params)`` to certify with; default
      ``fsjax.variants.most_boosted(config)``, the variant ``train.head`` trains on.
      Passing one that is already compiled saves the compilation (the encoder is a
      static argument, hashed by identity).

  Returns:
    The table: one row per (sigma, method) with the certified accuracy at each radius.

  Resumable (as ``certify.run``): the rows already in ``prediction_results.jsonl`` (an
  earlier run of the same config; :func:`certify.report.check_workdir` refuses another's
  in one line) are kept, and only the (sigma, batch) groups missing a row are certified
  (each batch has its own key: the same rows as in one run); the table and plots are
  built from all rows in the uninterrupted run's order, so they are the same. Ctrl-C
  stops after the group being certified (its rows written) with
  :class:`fsjax.cli.Interrupted`.
  """
  workdir = pathlib.Path(workdir)
  settings = prediction_settings(config)
  meta, heads = heads_lib.load_heads(workdir)
  encoder_name, encoder, params = variant or variants_lib.most_boosted(config)
  _check_heads(meta, heads, config, encoder_name)
  results = workdir / RESULTS
  report.check_workdir(config, results, CONFIG_NAME)  # another config's rows: refuse now
  num_classes = len(meta["classes"])
  images, labels, _ = heads_lib.load_subset(config.test_data, num_classes=num_classes,
                                           per_class=config.prediction.test_per_class)
  labels = heads_lib.check_labels(labels, num_classes)
  key = jax.random.PRNGKey(config.seed)
  sigmas = [float(s) for s in config.certify.sigmas]
  bs = settings["batch_size"]
  # The units of work, in the uninterrupted run's order: (sigma, batch); their rows.
  groups = [(sigma, b) for sigma in sigmas for b in range(-(-len(images) // bs))]
  keys = {(sigma, b): [(sigma, i, method, encoder_name) for method in METHODS
                       for i in range(b * bs, min((b + 1) * bs, len(images)))]
          for sigma, b in groups}
  done = report.done_rows(results, ROW_KEY)
  todo = [g for g in groups if not all(k in done for k in keys[g])]
  if len(todo) < len(groups):
    print(f"certify.table2: resuming {workdir}: {len(groups) - len(todo)} of {len(groups)} "
          "(sigma, batch) groups are certified"
          + ("; certifying the rest." if todo else "; nothing left to certify."), flush=True)
  # Every method draws n0 + n noise samples for each image of each (padded) batch.
  # Sequential: at most n0 + n per (image, method) row, no padding; what an image does not
  # draw is taken off as it stops.
  sequential = settings["mode"] == "sequential"
  if sequential:
    samples = sum(len(keys[g]) for g in todo) * (settings["n0"] + settings["n"])
  else:
    samples = len(todo) * bs * (len(METHODS) * (settings["n0"] + settings["n"])
                                + 2 * (settings["paper_n0"] or 0))
  fresh = {}
  with checkpointing.lock_workdir(workdir, "certify.table2"), report.rows(
      results, config, config_name=CONFIG_NAME) as write, cli.interruptible() as stop, \
      report.SampleProgress(samples, "table2") as progress:
    for finished, (sigma, b) in enumerate(todo, start=len(groups) - len(todo) + 1):
      k = smoothing.sigma_key(key, sigma)  # as certify.run and train.head
      for row in certify_images(params, images, labels, encoder=encoder, heads=heads[sigma],
                                sigma=sigma, key=k, settings=settings, variant=encoder_name,
                                progress=progress, batches=[b]):
        write(row)
        row = report.as_read(row)  # as a resumed run reads it: the same table, bit for bit
        fresh[tuple(row[c] for c in ROW_KEY)] = row
      if stop():  # pressed while this group ran: its rows are written, stop here
        rest = "certify the rest" if finished < len(groups) else "write the tables and plots"
        raise cli.stopped("certify.table2", f"{finished} of {len(groups)} (sigma, batch) "
                          "groups are certified", results, rest)
  have = {**done, **fresh}
  rows = [have[k] for g in groups for k in keys[g]]
  radii = [float(r) for r in config.prediction.radii]
  table = summarise(rows, radii, num_classes=num_classes, encoder_name=encoder_name)
  point = (f"; FS: the {settings['certificate']!r} certificate (docs/method.md 3b)"
           + ("" if settings["paper_n0"] is None else
              f"; '{PAPER}': the paper's plug-in with n0 = n = {settings['paper_n0']}, an "
              "estimate, NOT a certificate")
           + (" -- FS rows are point estimates, NOT certificates"
              if settings["bound"] == "point" else ""))
  caption = ("Table 2: certified accuracy at radius r (" + report.monte_carlo_caption(
      sigma=sigmas, n0=settings["n0"], n=settings["n"], alpha=settings["alpha"],
      images=len(images), bound=f"{settings['bound']} (FS)") + f", {num_classes} classes)"
      + point)
  if sequential:  # a whole other protocol: say so first
    caption = ("Table 2: certified accuracy at radius r, SEQUENTIAL (docs/method.md 3d: "
               f"each image stops once 'certified at r' is settled for every r; n0 = "
               f"{settings['n0']}, n_max = {settings['n']}, alpha = {settings['alpha']:g}, "
               f"stop = {settings['stop']}, futility = {settings['futility']}; anytime-valid "
               f"betting confidence sequences; FS: Theorem A.3.2, RS: Cohen et al.; "
               f"{len(images)} images, {num_classes} classes; samples per image include n0)")
  print(report.write_table(table, workdir, "table2", caption=caption))
  plot(table, radii, workdir / "table2.png")
  if not sequential:  # the margins are a fixed-n FS row's
    plot_margins(rows, workdir / "table2_margins.png")
  return table


if __name__ == "__main__":
  cli.run(run_prediction, workdir_help="The train.head workdir; results are written there.")
