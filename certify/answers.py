r"""Certified MLLM answers: a radius on what the model says (issue 22).

  python -m certify.answers --config configs/llava_embedded.py --workdir DIR \
      --config.llava.checkpoint=/tmp/fsjax_llava [--config.gsb.checkpoint=/tmp/fsjax_llava_gsb]
  python -m certify.answers --config configs/llava_embedded.py --workdir DIR --audit ...

Randomized smoothing of the whole MLLM (:func:`certify.certify_answers`): the noise on the
image, the option the MLLM scores highest as the base classifier's label, Cohen et al.'s
CERTIFY on the answer counts. The task is the embedded Fashion-MNIST classification
(``config.protection.data``, the questions of ``certify.protection --task=classify``): one
prompt, ten options (nine clothes, "bag" the attacker's target), answered by option
scoring (one prefill, no decoding).

Rows (``config.answers.rows``; the vision sides of ``fsjax.attacks.build_rows``, the rows
``certify.protection`` attacks):

* ``original``: the MLLM as it is;
* ``gsb``: the MLLM on the GSB-boosted encoder (``config.gsb.checkpoint``; the denoiser
  and mapper condition on the certification noise sigma): denoised smoothing;
* ``smoothed``: the MLLM on the FS-smoothed encoder (``config.attack.sigma``,
  ``config.answers.inner_n`` inner samples, inner key fixed per certification), its
  answer randomized again over the outer noise; on the first ``smoothed_images`` images
  (it costs ``inner_n`` times more);
* ``smoothed_gsb``: the same on the boosted encoder.

Per row and sigma: clean accuracy (no noise), the certified answer accuracy at each radius
of ``config.answers.radii`` (answer = label and radius >= r), the abstain rate, the mean
radius, and beside them the feature certificate of the row's encoder on the same images
(``certify.fcsb``: mean FCSB at ``feature_eps``, mean R(cos >= 0.5), mean reference;
``feature_n`` samples, 0 to skip). Writes ``answers.jsonl`` (one row per row, sigma and
image: counts, pA, radius; a rerun of the same config certifies only the missing images,
and Ctrl-C stops after the batch in progress with one line, exit status 130),
``answers.md`` / ``answers.csv``
(rewritten after each row and sigma), ``answers_config.json`` and ``answers.png``
(certified answer accuracy against r per row and sigma).

``config.answers.mode = "sequential"`` certifies with :func:`certify.sequential_answers`
instead: each image stops once "certified at r" is settled for every r of ``radii``
(n_max = ``n``, an anytime-valid betting confidence sequence, docs/method.md 3d; noise
named by the image's index in the task, so results do not depend on batching); rows keep
``samples`` (no counts) and the table gains ``mean samples``.

``--audit`` (after a run, same workdir and config): every certified (image, radius) of the
first ``audit_images`` images of each row is attacked with ``fsjax.attacks.pgd`` (l2, budget
= the certified radius, white-box through the noise with ``audit_eot`` draws per step,
margin loss on the option probabilities, :func:`certify.answer_margin_loss`); it counts as
flipped when the smoothed answer at the adversarial image, re-estimated from
``audit_n`` fresh samples (Cohen's PREDICT, abstention not a flip), differs from the
certified one. Writes ``answers_audit.jsonl`` / ``.md`` / ``.csv``.
"""

from __future__ import annotations

import copy
import pathlib
import time
from typing import Any

from absl import flags
import jax
import numpy as np
import tqdm

import certify
from certify import report
from fsjax import attacks
from fsjax import batching
from fsjax import checkpointing
from fsjax import checks
from fsjax import cli
from fsjax import data as data_lib
from fsjax import mllm
from fsjax import smoothing
from fsjax import tasks

ROWS = ("original", "gsb", "smoothed", "smoothed_gsb")
STEM = "answers"


def check_answers_config(config) -> None:
  """Validates ``config.answers`` before any model or data is loaded."""
  c = config.get("answers")
  if c is None:
    raise ValueError("the config has no `answers` section (configs/llava_embedded.py has one).")
  if not c.sigmas:
    raise ValueError("config.answers.sigmas is empty: give the noise levels, e.g. (0.25, 0.5).")
  for s in c.sigmas:
    checks.check_sigma(s, name="config.answers.sigmas")
  certify.check_certify_args(sigma=c.sigmas[0], n=c.n, n0=c.n0, alpha=c.alpha,
                             chunk_size=c.chunk_size)
  for key, meaning in (("num_images", "images certified per row"),
                       ("batch_size", "images per certify call"),
                       ("inner_n", "inner noise samples of the FS-smoothed encoder"),
                       ("smoothed_images", "images of the FS-smoothed rows"),
                       ("audit_steps", "PGD steps of the audit"),
                       ("audit_n", "fresh samples of the audit's smoothed answer")):
    checks.check_positive_int(c[key], name=f"config.answers.{key}", meaning=meaning)
  for key, meaning in (("feature_n", "feature-certificate samples (0: skip)"),
                       ("audit_images", "images audited per row (0: none)"),
                       ("audit_eot", "EOT noise draws per attack step")):
    checks.check_positive_int(c[key], name=f"config.answers.{key}", minimum=0, meaning=meaning)
  if not c.rows or any(r not in ROWS for r in c.rows):
    raise ValueError(f"config.answers.rows={tuple(c.rows)!r} must be a non-empty subset of "
                     f"{ROWS}.")
  checks.check_choice(c.get("mode", "fixed"), name="config.answers.mode",
                      choices=("fixed", "sequential"))
  if any(r < 0 for r in c.radii) or list(c.radii) != sorted(c.radii):
    raise ValueError(f"config.answers.radii={tuple(c.radii)!r} must be increasing radii >= 0.")


# ---------------------------------------------------------------------------------------
# The task, the rows, the answerer.
# ---------------------------------------------------------------------------------------


def _round_robin(labels: np.ndarray, n: int) -> np.ndarray:
  """Indices of the first ``n`` images ordered by rank within their class, then class:
  any prefix is balanced (the order of ``certify.protection``'s evaluation sets)."""
  seen, rank = {}, np.zeros(len(labels), int)
  for i, l in enumerate(np.asarray(labels).tolist()):
    rank[i] = seen.get(l, 0)
    seen[l] = rank[i] + 1
  return np.lexsort((labels, rank))[:n]


def task_data(config) -> dict[str, Any]:
  """The classification images and questions of ``config.protection.data`` (the sets of
  ``certify.protection --task=classify``: the embedded Fashion-MNIST questions, or the
  paper's ImageNet classes from local files), ``config.answers.num_images`` of them.

  Returns:
    ``images`` ``[N, S, S, 3]``, ``labels`` (dataset classes), ``answers`` (the correct
    option per image), ``prompt`` (shared by all images), ``answer_texts`` (how each
    option is answered).
  """
  spec, n = config.protection.data, int(config.answers.num_images)
  source = spec.get("source", "embedded")
  if source == "embedded":
    clean = list(tasks.instructions.CLEAN_LABELS)
    images, labels, names = data_lib.load_arrays(
        spec.name, split=spec.split, image_size=spec.image_size, classes=clean,
        per_class=-(-n // len(clean)), seed=int(spec.get("seed", 0)),
        data_dir=spec.get("data_dir"), manual_dir=spec.get("manual_dir"))
    if len(names) != 10:
      raise ValueError(f"config.protection.data.name={spec.name!r} has {len(names)} classes; "
                       "the embedded questions need Fashion-MNIST's ten (labels 0-9).")
    questions = [tasks.instructions.classify_question(int(l)) for l in labels]
  elif source == "paper":
    d = tasks.classification_images(
        image_size=int(spec.image_size), per_class=-(-n // len(tasks.PAPER_CLASSES)),
        dataset=spec.dataset, split=spec.split, seed=int(spec.get("seed", 0)),
        data_dir=spec.get("data_dir"), manual_dir=spec.get("manual_dir"))
    images, labels = d.images, d.labels
    questions = [tasks.classification_question(tasks.PAPER_CLASSES, int(l)) for l in labels]
  else:
    raise ValueError(f"config.protection.data.source={source!r} must be 'embedded' or 'paper'.")
  order = _round_robin(labels, n)
  if len(order) < n:
    raise ValueError(f"config.protection.data has only {len(order)} images for "
                     f"config.answers.num_images={n}; lower num_images or add images.")
  questions = [questions[i] for i in order]
  q = questions[0]
  if len({x.prompt for x in questions}) != 1:
    raise ValueError("the classification questions must share one prompt.")
  return {"images": images[order], "labels": labels[order], "prompt": q.prompt,
          "answers": np.array([x.answer for x in questions]),
          "answer_texts": [q.answer_text(k) for k in range(q.num_options)]}


def build_mllm(config) -> tuple[Any, dict]:
  """The unsmoothed MLLM ``(model, params)`` the config names (``fsjax.mllm.build``)."""
  model, params = mllm.build(config)
  if getattr(model, "tokenizer", None) is None:
    name = mllm.name_of(config)
    raise ValueError(f"config.{name}.tokenizer is not set: the options are scored as "
                     f"tokens; pass --config.{name}.tokenizer=/path/to/tokenizer.")
  return model, params


def _mllm_name(config) -> str:
  section = mllm.name_of(config)
  checkpoint = (config.get(section) or {}).get("checkpoint")
  return f"{section} {checkpoint}" if checkpoint else f"{section} (random init)"


def build_rows(config, model, params) -> list[tuple[str, Any, Any]]:
  """``[(label, vision encoder, vision params)]`` of ``config.answers.rows``, in order, from
  ``fsjax.attacks.build_rows`` (inner smoothing: ``config.attack.sigma``, ``inner_n``)."""
  c = config.answers
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.attack.n = int(c.inner_n)
    cfg.attack.extra_encoders = ()
  if not config.get("gsb") or not config.gsb.get("checkpoint"):
    if any(r in ("gsb", "smoothed_gsb") for r in c.rows):
      print("certify.answers: no --config.gsb.checkpoint: the GSB rows are skipped.")
  towers = attacks.build_rows(cfg, [("original", model.encoder, params["vision"])])
  by_kind = {"original": towers[0], "smoothed": towers[1]}
  if len(towers) > 2:
    boosted = towers[2]
    name = boosted.label.split("(")[-1].rstrip(")")
    by_kind["smoothed_gsb"] = boosted
    by_kind["gsb"] = attacks.Row(f"GSB ({name})", boosted.encoder.base,
                                 boosted.params["encoder"], "original")
  out = []
  for kind in c.rows:
    if kind in by_kind:
      r = by_kind[kind]
      label = {"original": "original", "smoothed": f"smoothed (FS, n={c.inner_n})",
               "gsb": r.label, "smoothed_gsb": f"smoothed + GSB, n={c.inner_n}"}[kind]
      out.append((label, r.encoder, r.params))
  return out


def _eos(model) -> int:
  eos = model.eos_token_id
  return int(eos if np.ndim(eos) == 0 else np.ravel(eos)[0])


def answerer_of(model, params, data, encoder) -> certify.OptionAnswerer:
  """The row's base classifier: the MLLM on ``encoder`` answering the task's prompt."""
  options = certify.option_ids(model.tokenizer, data["answer_texts"], eos_token_id=_eos(model))
  t = model.image_features(params, data["images"][:1]).shape[1]
  return certify.mllm_answerer(model.with_encoder(encoder), data["prompt"], options,
                               num_image_tokens=t)


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------


def _images_of(c, label: str, n: int) -> int:
  return min(n, int(c.smoothed_images)) if label.startswith("smoothed") else n


def _feature_columns(c, encoder, vparams, x, sigma, key) -> dict[str, np.ndarray]:
  """Per image: FCSB at ``feature_eps`` and R(cos >= 0.5) of the row's encoder
  (``certify.fcsb``, mean reference, Bernstein); a smoothed row's certificate is its base's."""
  if isinstance(encoder, smoothing.SmoothedEncoder):
    encoder, vparams = encoder.base, vparams["encoder"]
  cert = certify.fcsb(vparams, x, encoder=encoder, sigma=sigma, eps=float(c.feature_eps),
                      key=key, n=int(c.feature_n), n0=int(c.n0), alpha=float(c.alpha),
                      chunk_size=int(c.chunk_size))
  return {"fcsb": np.asarray(cert.cosine_bound), "feature_radius": np.maximum(
      np.asarray(cert.radius), 0.0)}


def run(config, workdir: str) -> list[dict]:
  """Certifies the answers of every row at every sigma; writes the files; returns the table."""
  check_answers_config(config)
  c = config.answers
  workdir = pathlib.Path(workdir)
  report.check_workdir(config, workdir / f"{STEM}.jsonl", f"{STEM}_config.json")
  model, params = build_mllm(config)
  rows = build_rows(config, model, params)
  data = task_data(config)
  x, truth = data["images"], data["answers"]
  key = jax.random.PRNGKey(config.seed)
  done = report.done_rows(workdir / f"{STEM}.jsonl", ("row", "sigma", "image"))
  results = dict(done)
  t_start = time.time()
  sequential = c.get("mode", "fixed") == "sequential"
  total = sum(_images_of(c, label, len(x)) for label, *_ in rows) * len(c.sigmas)
  with checkpointing.lock_workdir(workdir, "certify.answers"), report.rows(
      workdir / f"{STEM}.jsonl", config, config_name=f"{STEM}_config.json"
  ) as write, cli.interruptible() as stop:
    answerers = {}  # one per row, for every sigma: one compilation
    for sigma, r in _order(c, rows):
      label, encoder, vparams = rows[r]
      skey = smoothing.sigma_key(key, sigma)
      m = _images_of(c, label, len(x))
      todo = [i for i in range(m) if (label, float(sigma), i) not in results]
      if not todo:
        continue
      p = dict(params, vision=vparams)
      if r not in answerers:
        answerers[r] = answerer_of(model, params, data, encoder)
      answerer = answerers[r]
      rkey = jax.random.fold_in(skey, r)
      bar = tqdm.tqdm(total=len(todo) * (c.n0 + c.n), desc=f"{label} sigma={sigma:g}",
                      unit="sample", unit_scale=True)
      for sl in batching.batch_slices(len(todo), c.batch_size):
        idx = np.array(todo[sl])
        xb = batching.pad_rows(x[idx], c.batch_size)
        bkey = jax.random.fold_in(rkey, int(idx[0]))
        t0 = time.time()
        if sequential:  # noise named by the image's index: the same whatever its batch
          drawn = []
          cert = certify.sequential_answers(
              p, x[idx], answerer=answerer, sigma=float(sigma), key=rkey, radii=c.radii,
              n_max=int(c.n), n0=int(c.n0), alpha=float(c.alpha),
              chunk_size=int(c.chunk_size), slots=int(c.batch_size), image_ids=idx,
              progress=lambda k: (drawn.append(k), bar.update(k)))
          bar.total -= len(idx) * (c.n0 + c.n) - sum(drawn)  # what it did not draw
          bar.refresh()
        else:
          cert = certify.certify_answers(
              p, xb, answerer=answerer, sigma=float(sigma), key=bkey, n0=int(c.n0),
              n=int(c.n), alpha=float(c.alpha), chunk_size=int(c.chunk_size),
              progress=lambda k, b=len(idx): bar.update(k * b))
        seconds = (time.time() - t0) / len(idx)
        clean = certify.clean_answers(p, xb, answerer=answerer, key=bkey, sigma=float(sigma))
        feats = (_feature_columns(c, encoder, vparams, xb, float(sigma), bkey)
                 if c.feature_n else {})
        for j, i in enumerate(idx):
          row = {"row": label, "sigma": float(sigma), "image": int(i),
                 "label": int(data["labels"][i]), "correct_answer": int(truth[i]),
                 "clean_answer": int(clean[j]), "answer": int(cert.answer[j]),
                 "top": int(cert.top[j]), "p_lower": float(cert.p_lower[j]),
                 "radius": float(cert.radius[j]), "samples": int(cert.samples[j]),
                 "seconds": seconds, "batch": idx.tolist()}
          if sequential:
            row["mode"] = "sequential"
          else:
            row.update(counts0=cert.counts0[j].tolist(), counts=cert.counts[j].tolist())
          row.update({k: float(v[j]) for k, v in feats.items()})
          write(row)
          results[(label, float(sigma), int(i))] = row
        if stop():  # pressed while this batch ran: its rows are written, stop here
          bar.close()
          raise cli.stopped("certify.answers", f"{len(results)} of {total} answers are "
                            "certified", workdir / (STEM + ".jsonl"), "certify the rest")
      bar.close()
      table = write_outputs(config, workdir, rows, results)
  print(f"certify.answers: {time.time() - t_start:.0f} s")
  table = write_outputs(config, workdir, rows, results)
  return table


def _order(c, rows) -> list[tuple[float, int]]:
  """``(sigma, row index)`` in the order they run: the unsmoothed rows at every sigma first
  (cheap), then the FS-smoothed ones (``inner_n`` times the cost), so a run cut short
  has the comparisons that matter most."""
  cheap = [(s, r) for s in c.sigmas for r, row in enumerate(rows)
           if not row[0].startswith("smoothed")]
  dear = [(s, r) for s in c.sigmas for r, row in enumerate(rows) if row[0].startswith("smoothed")]
  return cheap + dear


def summarize(c, label: str, sigma: float, rows: list[dict]) -> dict:
  """One table row from the per-image rows of one row and sigma."""
  answer = np.array([r["answer"] for r in rows])
  radius = np.array([r["radius"] for r in rows])
  truth = np.array([r["correct_answer"] for r in rows])
  acc = certify.certified_accuracy(answer, radius, truth, np.asarray(c.radii, np.float32))
  out = {"row": label, "sigma": sigma, "images": len(rows),
         "clean acc": float(np.mean([r["clean_answer"] == r["correct_answer"] for r in rows]))}
  out.update({f"cert acc r={r:g}": float(a) for r, a in zip(c.radii, np.asarray(acc))})
  out["abstain"] = float(np.mean(answer == certify.ABSTAIN))
  out["mean radius"] = float(np.mean(radius))
  if rows and "fcsb" in rows[0]:
    out[f"FCSB@{c.feature_eps:g}"] = float(np.mean([r["fcsb"] for r in rows]))
    out["R(cos>=0.5)"] = float(np.mean([r["feature_radius"] for r in rows]))
  if rows and rows[0].get("mode") == "sequential":  # what each image drew, n0 included
    out["mean samples"] = int(round(float(np.mean([r["samples"] for r in rows]))))
  out["s/image"] = float(np.mean([r["seconds"] for r in rows]))
  return out


def table_of(config, rows, results) -> list[dict]:
  c = config.answers
  table = []
  for sigma in c.sigmas:
    for label, *_ in rows:
      mine = [results[k] for k in sorted(results) if k[0] == label and k[1] == float(sigma)]
      if mine:
        table.append(summarize(c, label, float(sigma), mine))
  return table


def write_outputs(config, workdir: pathlib.Path, rows, results) -> list[dict]:
  """The table (md/csv) and the plot from every per-image row so far."""
  c = config.answers
  table = table_of(config, rows, results)
  if not table:
    return table
  caption = (f"Certified answers of the MLLM {_mllm_name(config)} "
             f"(classification by option scoring): "
             + report.monte_carlo_caption(sigma=tuple(c.sigmas), n0=c.n0, n=c.n, alpha=c.alpha,
                                          images=int(c.num_images), bound="clopper-pearson")
             + f"; cert acc r: certified answer = correct option at radius >= r (l2, [0, 1] "
             f"pixels); smoothed rows: inner sigma {config.attack.sigma:g}, n = {c.inner_n}, "
             f"first {c.smoothed_images} images"
             + (f"; FCSB / R(cos>=0.5): feature certificate of the row's encoder, n = "
                f"{c.feature_n}, mean reference, Bernstein" if c.feature_n else "") + ".")
  report.write_table(table, workdir, STEM, caption=caption)
  plot(table, c.radii, workdir / f"{STEM}.png")
  return table


def plot(table: list[dict], radii, path: pathlib.Path) -> None:
  """Certified answer accuracy against r, one line per row and sigma."""
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for t in table:
    ax.plot(list(radii), [t[f"cert acc r={r:g}"] for r in radii], marker="o",
            label=f"{t['row']}, sigma={t['sigma']:g} ({t['images']} images)")
  ax.set_xlabel("l2 radius r ([0, 1] pixels)")
  ax.set_ylabel("certified answer accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  report.save_figure(fig, path)
  plt.close(fig)


# ---------------------------------------------------------------------------------------
# The audit.
# ---------------------------------------------------------------------------------------


def audit(config, workdir: str) -> list[dict]:
  """Attacks every certified answer of the first ``audit_images`` images (module docstring)."""
  check_answers_config(config)
  c = config.answers
  workdir = pathlib.Path(workdir)
  report.check_workdir(config, workdir / f"{STEM}.jsonl", f"{STEM}_config.json")
  results = report.done_rows(workdir / f"{STEM}.jsonl", ("row", "sigma", "image"))
  if not results:
    raise ValueError(f"{workdir / (STEM + '.jsonl')} holds no certified answers: run "
                     "certify.answers without --audit first.")
  model, params = build_mllm(config)
  rows = build_rows(config, model, params)
  data = task_data(config)
  x = data["images"]
  base_key = jax.random.PRNGKey(config.seed)
  done = report.done_rows(workdir / f"{STEM}_audit.jsonl", ("row", "sigma", "image"))
  out = dict(done)
  with checkpointing.lock_workdir(workdir, "certify.answers --audit"), report.rows(
      workdir / f"{STEM}_audit.jsonl", config, config_name=f"{STEM}_config.json"
  ) as write, cli.interruptible() as stop:
    for sigma in c.sigmas:
      skey = smoothing.sigma_key(base_key, sigma)
      for r, (label, encoder, vparams) in enumerate(rows):
        certified = [results[k] for k in sorted(results)
                     if k[0] == label and k[1] == float(sigma) and k[2] < c.audit_images
                     and results[k]["answer"] != certify.ABSTAIN and k not in out]
        if not certified:
          continue
        p = dict(params, vision=vparams)
        answerer = answerer_of(model, params, data, encoder)
        batches = {}
        for row in certified:  # attack each certification batch as it was certified
          batches.setdefault(tuple(row["batch"]), []).append(row)
        for batch, mine in tqdm.tqdm(batches.items(), desc=f"audit {label} sigma={sigma:g}"):
          idx = np.array(batch)
          xb = batching.pad_rows(x[idx], c.batch_size)
          # The certified classifier: the certification's key (its inner noise, if any).
          bkey = jax.random.fold_in(jax.random.fold_in(skey, r), int(idx[0]))
          budget = np.zeros(len(xb), np.float32)
          where = {row["image"]: list(idx).index(row["image"]) for row in mine}
          for row in mine:
            budget[where[row["image"]]] = row["radius"]
          answers = np.zeros(len(xb), np.int64)
          for row in mine:
            answers[where[row["image"]]] = row["answer"]
          onehot = np.eye(answerer.num_options, dtype=np.float32)[answers]
          pk = answerer.with_key(p, jax.random.fold_in(bkey, certify.INNER_STREAM))
          adv = np.asarray(attacks.pgd(
              pk, xb, encoder=answerer, reference=onehot, loss=certify.answer_margin_loss,
              norm="l2", budget=budget, step_size=np.maximum(2.5 * budget / c.audit_steps,
                                                             1e-4),
              steps=int(c.audit_steps), key=jax.random.fold_in(bkey, 7), sigma=float(sigma),
              eot_samples=int(c.audit_eot)))
          counts = certify.answer_counts(p, adv, answerer=answerer, sigma=float(sigma),
                                         n=int(c.audit_n), key=bkey,
                                         first_index=int(c.n0 + c.n),
                                         chunk_size=int(c.chunk_size))
          predicted = certify.rs_predict_from_counts(counts, alpha=float(c.alpha))
          dist = np.sqrt(np.sum((adv - xb) ** 2, axis=(1, 2, 3)))
          for row in mine:
            j = where[row["image"]]
            line = {"row": label, "sigma": float(sigma), "image": row["image"],
                    "certified": row["answer"], "radius": row["radius"], "l2": float(dist[j]),
                    "counts": counts[j].tolist(), "predicted": int(predicted[j]),
                    "flipped": bool(predicted[j] not in (certify.ABSTAIN, row["answer"]))}
            write(line)
            out[(label, float(sigma), row["image"])] = line
          if stop():  # pressed while this batch was attacked: its rows are written
            raise cli.stopped("certify.answers --audit",
                              f"{len(out)} certified answers are audited",
                              workdir / (STEM + "_audit.jsonl"), "audit the rest")
  table = []
  for sigma in c.sigmas:
    for label, *_ in rows:
      mine = [v for k, v in out.items() if k[0] == label and k[1] == float(sigma)]
      if mine:
        flips = sum(v["flipped"] for v in mine)
        table.append({"row": label, "sigma": float(sigma), "certified attacked": len(mine),
                      "mean radius": float(np.mean([v["radius"] for v in mine])),
                      "flipped": flips, "allowed (alpha * N)": float(c.alpha) * len(mine)})
  caption = (f"Audit of the certified answers: l2 PGD through the noise ({c.audit_steps} steps, "
             f"EOT {c.audit_eot}), budget = the certified radius, margin loss on the option "
             f"probabilities; flipped: the smoothed answer at the adversarial image "
             f"({c.audit_n} fresh samples, PREDICT at alpha = {c.alpha:g}) differs.")
  print(report.write_table(table, workdir, f"{STEM}_audit", caption=caption))
  return table


def main(config, workdir: str, audit_flag: bool = False) -> None:
  if audit_flag:
    audit(config, workdir)
    return
  table = run(config, workdir)
  print(report.markdown(table))
  w = pathlib.Path(workdir)
  print(f"Wrote {w / (STEM + '.md')}, {w / (STEM + '.csv')}, {w / (STEM + '.jsonl')}, "
        f"{w / (STEM + '.png')}")


if __name__ == "__main__":
  def _flags():
    flags.DEFINE_bool("audit", False, "Attack the certified answers of a finished run.")
  cli.run(lambda config, workdir, audit=False: main(config, workdir, audit),
          workdir_help="Where answers.jsonl / .md / .csv / .png are written.",
          define_extra=_flags)
