r"""MLLM protection, measured: the paper's Tables 3-5 (and Table 7) on a LLaVA.

  python -m certify.protection --config configs/llava_embedded.py --task=classify \
      --attack=attackvlm --workdir DIR --config.llava.checkpoint=/tmp/fsjax_llava
  python -m certify.protection --config configs/llava_embedded.py --task=timing \
      --workdir DIR --config.llava.checkpoint=/tmp/fsjax_llava

``--task`` is ``caption`` (Table 3), ``classify`` (Table 4), ``vqa`` (Table 5) or
``timing`` (Table 7); ``--attack`` one of ``attackvlm``, ``mattack``, ``foa``, ``pgd``
(fsjax.attacks), a comma-separated list, or ``all``.

Rows (one LLaVA language side, several vision sides; ``config.protection``):

* ``original``: the MLLM as it is, on its encoder.
* ``smoothed`` (FS alone), or ``smoothed + GSB (FS+D+M)`` when ``config.gsb.checkpoint``
  is set (a ``train.gsb`` workdir of the same encoder, ``fsjax.variants``): the LLM sees
  the smoothed encoder's features (``fsjax.llava.smoothed_tokens``: ``n`` noise samples,
  the smoothed direction at the Monte Carlo mean norm).
* one row per encoder sub-config of ``extra_encoders`` (a ``label`` plus the keys of
  ``config.encoder``: FARE, TeCoA), and its smoothed row when ``smooth_extra``.

The attacks are feature-space and white-box against the encoder the row's MLLM uses:
through the smoothing with ``eot_samples`` noise draws per step (EOT) and through GSB's
denoiser and mapper. The MLLM itself is only queried, greedily, on the adversarial
images. Columns per attack (Section 6.1):

* ``FCS``: cosine between the features of the clean and of the adversarial image that
  the LLM consumes (for a smoothed row both are smoothed features, independent noise).
* Classification / VQA: the answer is parsed (first integer / first option letter);
  ``ACC`` = share answering the correct option, ``ASR`` = share answering the attacker's
  target option (classification: the held-out target class; VQA: "None of the above").
  Unparsable answers are neither and are counted (``unparsable``).
* Captioning: a judge (``config.protection.judge``: exact match by default, ``"item"``
  (:func:`item_match`: the embedded captions name the same item), or CLIP text
  similarity, BLEU / CIDEr, an LLM endpoint; :mod:`fsjax.tasks`) scores each
  caption against the *original* MLLM's captions of the clean image (ACC) and of the
  target image (ASR); cells are "rate at ``threshold`` (mean score)", as the paper's.

Data (``config.protection.data``, local files through ``fsjax.data``): the embedded
Fashion-MNIST questions of :mod:`fsjax.tasks` (classification with "bag" as the target
option, VQA with "None of the above", the caption prompt); clean images are balanced
over the classes a task attacks, target images are bags (classify, caption) or images
of a class the VQA question does not list.

Writes ``protection_<task>.jsonl`` (one row per variant, attack and image: answers,
parsed options, scores, FCS, l_inf), ``protection_<task>.md`` / ``.csv`` (the table),
``protection_<task>_config.json`` and ``protection_<task>_<attack>.png`` (clean |
adversarial per row with its answer | target). ``--task=timing`` writes ``timing.*``:
per-image inference time of the smoothed MLLM for each ``n`` of ``timing_n`` against the
unsmoothed one, in the same run (Table 7).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np
import tqdm

from certify import report
from certify import robustness
from fsjax import attacks
from fsjax import batching
from fsjax import cli
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib
from fsjax import llava
from fsjax import tasks
from fsjax import variants as variants_lib
from fsjax.llava import prompt as llava_prompt
from fsjax.tasks import _instructions as instructions

TASKS = ("caption", "classify", "vqa", "timing")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the table: the MLLM's language side on one vision side."""
  label: str
  encoder: encoders_lib.Encoder
  params: Any          # the encoder's parameters
  smoothed: bool


# ---------------------------------------------------------------------------------------
# The MLLM and its rows.
# ---------------------------------------------------------------------------------------


def _external_tower(checkpoint: str) -> bool:
  path = pathlib.Path(os.path.expanduser(checkpoint)) / "config.json"
  return path.is_file() and json.loads(path.read_text()).get("vision_config", {}) is None


def build_mllm(config) -> tuple[llava.Llava, dict]:
  """The unsmoothed MLLM ``(model, params)``.

  A checkpoint trained on another tower (``vision_config: null``, e.g. ``train.llava``'s
  embedded model) loads with ``config.encoder``; anything else is
  :func:`fsjax.llava.build` (a LLaVA directory with its CLIP tower, or a random init).
  """
  c = config.llava
  if c.get("checkpoint") and _external_tower(c.checkpoint):
    encoder, encoder_params = encoders_lib.build(config.encoder)
    model, params = llava.load(c.checkpoint, encoder=encoder, encoder_params=encoder_params)
  elif config.get("encoder") is not None and config.encoder.get("name") != "clip" \
      and not c.get("checkpoint"):
    raise ValueError(
        f"config.llava.checkpoint is not set: certify.protection needs the trained MLLM "
        f"on config.encoder.name={config.encoder.name!r}; train it with `python -m "
        "train.llava --config ... --workdir DIR` and pass --config.llava.checkpoint=DIR.")
  else:
    model, params = llava.build(config)
  return dataclasses.replace(model, smoothing=None,
                             system_prompt=c.get("system_prompt")), params


def build_rows(config, model: llava.Llava, params: dict) -> list[Row]:
  """The table's rows, in order (see the module docstring)."""
  c = config.protection
  rows = [Row("original", model.encoder, params["vision"], False)]
  gsb = config.get("gsb")
  if gsb is not None and gsb.get("checkpoint"):
    name, encoder, encoder_params = variants_lib.most_boosted(config)
    rows.append(Row(f"smoothed + GSB ({name})", encoder, encoder_params, True))
  else:
    rows.append(Row("smoothed", model.encoder, params["vision"], True))
  for e in c.extra_encoders:
    e = e.to_dict() if isinstance(e, ml_collections.ConfigDict) else dict(e)
    label = e.pop("label")
    encoder, encoder_params = encoders_lib.build(ml_collections.ConfigDict(e))
    rows.append(Row(label, encoder, encoder_params, False))
    if c.smooth_extra:
      rows.append(Row(f"{label} + smoothed", encoder, encoder_params, True))
  return rows


def check_protection_config(c) -> None:
  """Validates ``config.protection`` before anything is built; errors name the key."""
  from fsjax.attacks import _common  # pylint: disable=g-import-not-at-top
  _common.check_budget(budget=c.linf_budget, step_size=c.step_size, steps=c.steps,
                       norm="linf")
  for key, minimum in (("n", 1), ("eot_samples", 0), ("num_images", 1), ("batch_size", 1),
                       ("examples", 0), ("max_new_tokens", 1), ("timing_images", 1),
                       ("timing_repeats", 1)):
    if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < minimum:
      raise ValueError(f"config.protection.{key}={c[key]!r} must be an integer >= {minimum}.")
  if not np.isfinite(c.sigma) or c.sigma <= 0:
    raise ValueError(f"config.protection.sigma={c.sigma!r} must be > 0 (the smoothing noise "
                     "level in [0, 1] pixel units, e.g. 0.25).")
  if not 0 <= c.threshold <= 1:
    raise ValueError(f"config.protection.threshold={c.threshold!r} must lie in [0, 1].")
  if not c.timing_n or any(int(n) != n or n < 1 for n in c.timing_n):
    raise ValueError(f"config.protection.timing_n={c.timing_n!r} must be integers >= 1.")
  for i, e in enumerate(c.extra_encoders):
    if not e.get("label") or not e.get("name"):
      raise ValueError(f"config.protection.extra_encoders[{i}] needs a 'label' (the row "
                       "name) and an encoder 'name' (plus the other config.encoder keys).")


# ---------------------------------------------------------------------------------------
# Data: clean images, their questions, target images.
# ---------------------------------------------------------------------------------------


def _images(spec, *, classes: Sequence[int], per_class: int, seed_offset: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
  images, labels, names = data_lib.load_arrays(
      spec["name"], split=spec["split"], image_size=spec["image_size"], classes=list(classes),
      per_class=per_class, seed=int(spec.get("seed", 0)) + seed_offset,
      data_dir=spec.get("data_dir"), manual_dir=spec.get("manual_dir"))
  if len(names) != len(instructions.CLASS_NAMES):
    raise ValueError(f"config.protection.data.name={spec['name']!r} has {len(names)} classes; "
                     "the embedded questions need Fashion-MNIST's ten (labels 0-9).")
  return images, labels


def task_data(config, task: str) -> dict[str, Any]:
  """Clean images, their :class:`fsjax.tasks.Question` (None for captions), targets.

  Clean images are balanced over the attacked classes (the nine clean classes; all ten
  for VQA), in a seeded interleaved order so any ``num_images`` is balanced.
  """
  c = config.protection
  spec = dict(c.data)
  n = int(c.num_images)
  attacked = [l for l in range(10) if task == "vqa" or l != instructions.TARGET_LABEL]
  per_class = -(-n // len(attacked))
  images, labels = _images(spec, classes=attacked, per_class=per_class)
  # Round robin over the classes (rank within its class, then class), so that the first
  # n images are balanced whatever n.
  seen, rank = {}, np.zeros(len(labels), int)
  for i, l in enumerate(labels.tolist()):
    rank[i] = seen.get(l, 0)
    seen[l] = rank[i] + 1
  order = np.lexsort((labels, rank))[:n]
  images, labels = images[order], labels[order]
  if len(images) < n:
    raise ValueError(f"{spec['name']} split {spec['split']!r} has too few images for "
                     f"config.protection.num_images={n}.")
  if task == "vqa":
    questions, target_labels = instructions.vqa_questions(labels, seed=int(spec.get("seed", 0)))
    counts = np.bincount(target_labels, minlength=10)
    pool, pool_labels = _images(spec, classes=range(10), per_class=int(counts.max()),
                                seed_offset=1)
    taken = np.zeros(10, int)
    targets = []
    for t in target_labels:
      targets.append(pool[np.flatnonzero(pool_labels == t)[taken[t]]])
      taken[t] += 1
    targets = np.stack(targets)
  else:
    questions = ([instructions.classify_question(int(l)) for l in labels]
                 if task == "classify" else None)
    targets, _ = _images(spec, classes=[instructions.TARGET_LABEL], per_class=n,
                         seed_offset=1)
    if len(targets) < n:
      raise ValueError(f"{spec['name']} has only {len(targets)} target images (class "
                       f"{instructions.TARGET_LABEL}); lower config.protection.num_images.")
  return {"images": images, "labels": labels, "questions": questions, "targets": targets}


def prompts_of(task: str, questions, n: int) -> list[str]:
  return [tasks.CAPTION_PROMPT] * n if task == "caption" else [q.prompt for q in questions]


# ---------------------------------------------------------------------------------------
# Querying the MLLM.
# ---------------------------------------------------------------------------------------


def llm_features(model: llava.Llava, params: dict, row: Row, x: np.ndarray, c,
                 key: jax.Array) -> np.ndarray:
  """``[N, T, D]`` features the LLM consumes for the row: the encoder's tokens, or the
  smoothed encoder's (``fsjax.llava.smoothed_tokens`` with ``c.n`` samples)."""
  m = model.with_encoder(row.encoder)
  if row.smoothed:
    m = m.smoothed(c.sigma, n=c.n, chunk_size=min(c.n, 16))
  out = []
  for sl in batching.batch_slices(len(x), c.batch_size):
    xb = batching.pad_rows(x[sl], c.batch_size)  # one shape: one compilation
    z = m.image_features({"vision": row.params}, xb, key=jax.random.fold_in(key, sl.start))
    out.append(np.asarray(z)[:sl.stop - sl.start])
  return np.concatenate(out)


def generate(model: llava.Llava, params: dict, features: np.ndarray, prompts: list[str], *,
             max_new_tokens: int, batch_size: int) -> list[str]:
  """Greedy answers from features ``[N, T, D]`` and N prompts (``params["language"]`` used)."""
  out = []
  t = features.shape[1]
  for sl in batching.batch_slices(len(prompts), batch_size):
    n = sl.stop - sl.start
    ps = prompts[sl] + [prompts[sl][-1]] * (batch_size - n)
    ids, valid = model.prompt_ids(ps, batch=batch_size, num_image_tokens=t)
    tokens, _ = model.generate_ids(params, ids, batching.pad_rows(features[sl], batch_size),
                                   valid=valid, max_new_tokens=max_new_tokens)
    out += llava_prompt.decode(model.tokenizer, np.asarray(tokens)[:n],
                               eos_token_id=model.eos_token_id)
  return [s.strip() for s in out]


# ---------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------


def item_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """Judge ``"item"`` of the embedded captions: 1 where both name the same Fashion-MNIST
  item(s) (:data:`fsjax.tasks.instructions.CAPTION_NAMES`), whatever the template or tone
  word, else 0 ("a grayscale photo of a bag" vs "a bag in the center of the image": 1)."""
  def items(text):
    text = " " + " ".join(text.lower().split()) + " "
    return {n for n in instructions.CAPTION_NAMES if f" {n} " in text} - (
        {"shirt"} if " t-shirt " in text else set())  # "t-shirt" also contains "shirt"
  if len(predictions) != len(references):
    raise ValueError(f"predictions and references must pair up, got {len(predictions)} and "
                     f"{len(references)}.")
  return np.array([float(bool(items(p)) and items(p) == items(r))
                   for p, r in zip(predictions, references)], np.float32)


def _judge(c):
  if c.judge == "item":
    return item_match
  options = c.judge_options.to_dict() if hasattr(c.judge_options, "to_dict") \
      else dict(c.judge_options or {})
  return tasks.judges.get(c.judge, **options)


def run(config, workdir: str, task: str = "classify", attack: str = "all") -> list[dict]:
  """Runs the attacks on every row and task; writes the files; returns the table rows."""
  if task not in TASKS:
    raise ValueError(f"--task={task!r} must be one of {TASKS}.")
  c = config.get("protection")
  if c is None:
    raise ValueError("certify.protection needs a config.protection section (see "
                     "configs/llava_embedded.py).")
  check_protection_config(c)
  if task == "timing":
    return timing(config, workdir)
  names = robustness.attack_names(attack)
  judge = _judge(c) if task == "caption" else None
  workdir = pathlib.Path(workdir)
  stem = f"protection_{task}"
  report.save_config(config, workdir, f"{stem}_config.json")
  model, params = build_mllm(config)
  rows = build_rows(config, model, params)
  data = task_data(config, task)
  x, t, questions = data["images"], data["targets"], data["questions"]
  prompts = prompts_of(task, questions, len(x))
  key = jax.random.PRNGKey(config.seed)
  ask = lambda z: generate(model, params, z, prompts,  # pylint: disable=g-long-lambda
                           max_new_tokens=c.max_new_tokens, batch_size=c.batch_size)

  references = None
  if task == "caption":  # the vanilla MLLM's captions of the clean and target images
    original = rows[0]
    references = (ask(llm_features(model, params, original, x, c, key)),
                  ask(llm_features(model, params, original, t, c, key)))

  table, strips = [], {n: {} for n in names}
  with report.rows(workdir / f"{stem}.jsonl") as write:
    for r, row in enumerate(rows):
      rk = jax.random.fold_in(key, r)
      z_clean = llm_features(model, params, row, x, c, jax.random.fold_in(rk, 0))
      clean_answers = ask(z_clean)
      clean = score(task, clean_answers, questions, references, judge, c.threshold,
                    np.ones(len(x)))
      line = {"variant": row.label, "clean ACC": clean.cells()["ACC"]}
      for a, name in enumerate(tqdm.tqdm(names, desc=row.label, unit="attack")):
        # The same attack randomness for every row: fold in the attack, not the row.
        adv = robustness.attack_model(
            robustness.Model(row.label, row.encoder, row.params, row.smoothed), name, x, t,
            c, jax.random.fold_in(key, 1000 + a))
        z_adv = llm_features(model, params, row, adv, c, jax.random.fold_in(rk, 1 + a))
        fcs = tasks.features_cosine(z_clean, z_adv)
        adv_answers = ask(z_adv)
        summary = score(task, adv_answers, questions, references, judge, c.threshold, fcs)
        line.update({f"{name} {k}": v for k, v in summary.cells().items()})
        if task != "caption":
          line[f"{name} unparsable"] = summary.unparsable
        linf = np.abs(adv - x).reshape(len(x), -1).max(-1)
        for i in range(len(x)):
          write(image_row(task, row.label, name, i, int(data["labels"][i]), clean_answers[i],
                          adv_answers[i], float(fcs[i]), float(linf[i]),
                          questions[i] if questions else None, references, judge))
        strips[name][row.label] = (adv[:c.examples], adv_answers[:c.examples])
      table.append(line)
  caption = (f"Table {dict(caption=3, classify=4, vqa=5)[task]} ({task}) of the MLLM at "
             f"{config.llava.get('checkpoint') or 'random init'} on {c.data.name} "
             f"{c.data.split}: {len(x)} images; l_inf budget {c.linf_budget * 255:g}/255, "
             f"{c.steps} steps of {c.step_size * 255:g}/255; smoothed rows: sigma = "
             f"{c.sigma:g}, n = {c.n}, {c.eot_samples} EOT draws per attack step. "
             + ("Captions: rate of judge scores >= "
                f"{c.threshold:g} (mean score), judge {c.judge!r} against the original "
                "model's captions of the clean (ACC) and target (ASR) images."
                if task == "caption" else
                "ACC / ASR: answers naming the correct / the target option; unparsable "
                "answers count as neither."))
  print(report.write_table(table, workdir, stem, caption=caption))
  if c.examples:
    clean_titles = [f"clean: {instructions.CLASS_NAMES[int(l)]}"
                    for l in data["labels"][:c.examples]]
    for name in names:
      plot_strip(x[:c.examples], t[:c.examples], strips[name],
                 workdir / f"{stem}_{name}.png", title=f"{task}, {name}",
                 clean_titles=clean_titles,
                 describe=describe_option if task == "classify" else None)
  return table


def score(task, answers: list[str], questions, references, judge, threshold,
          fcs) -> tasks.Summary:
  """The row's :class:`fsjax.tasks.Summary` of one set of answers."""
  if task == "caption":
    clean_scores, target_scores = tasks.judge_captions(judge, answers, *references)
    return tasks.summarize_captions(fcs, clean_scores, target_scores, threshold=threshold)
  pred = [q.parse(a) for q, a in zip(questions, answers)]
  return tasks.summarize_choices(fcs, pred, [q.answer for q in questions],
                                 [q.target for q in questions])


def image_row(task, variant, attack, i, label, clean_answer, answer, fcs, linf, question,
              references, judge) -> dict:
  """One jsonl row: everything needed to recompute the table's cells."""
  row = {"variant": variant, "attack": attack, "image": i, "label": label,
         "answer_clean": clean_answer, "answer": answer, "fcs": fcs, "linf": linf}
  if task == "caption":
    row["reference_clean"], row["reference_target"] = references[0][i], references[1][i]
    row["score_clean"] = float(judge([answer], [references[0][i]])[0])
    row["score_target"] = float(judge([answer], [references[1][i]])[0])
  else:
    row.update(option=question.parse(answer), correct_option=question.answer,
               target_option=question.target)
  return row


def describe_option(answer: str) -> str:
  """A classification answer with the class it names: ``"9"`` -> ``"9 (bag)"``."""
  option = tasks.parse_integer(answer, len(instructions.CLEAN_LABELS) + 1)
  if option == tasks.UNPARSABLE:
    return answer
  labels = list(instructions.CLEAN_LABELS) + [instructions.TARGET_LABEL]
  return f"{answer} ({instructions.CLASS_NAMES[labels[option]]})"


def plot_strip(x, targets, adversarial: dict, path: pathlib.Path, *, title: str,
               clean_titles: Sequence[str] | None = None, describe=None) -> None:
  """PNG strip: per image, clean | adversarial of each row with its answer | target."""
  describe = describe or (lambda a: a)
  report.image_strip(
      [[(x[i], clean_titles[i] if clean_titles else "clean")]
       + [(adv[i], f"{label}:\n{_wrap(describe(answers[i]))}")
          for label, (adv, answers) in adversarial.items()]
       + [(targets[i], "target")] for i in range(len(x))], path, title=title)


def _wrap(text: str, width: int = 28) -> str:
  words, lines, line = text.split(), [], ""
  for w in words:
    if line and len(line) + len(w) + 1 > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  return "\n".join(lines + [line])


# ---------------------------------------------------------------------------------------
# Table 7: inference time.
# ---------------------------------------------------------------------------------------


def timing(config, workdir: str) -> list[dict]:
  """Per-image wall time of ``generate`` (image in, answer out), smoothed with each n of
  ``timing_n`` vs unsmoothed, in the same run; the first call of each is compilation and
  not timed; the median of ``timing_repeats`` calls is reported."""
  c = config.protection
  workdir = pathlib.Path(workdir)
  report.save_config(config, workdir, "timing_config.json")
  model, params = build_mllm(config)
  data = task_data(config, "classify")
  x = data["images"][:c.timing_images]
  if len(x) < c.timing_images:
    raise ValueError("config.protection.timing_images is larger than num_images.")
  prompt = data["questions"][0].prompt
  variants = [("original", None)] + [(f"smoothed n={int(n)}", int(n)) for n in c.timing_n]
  table = []
  with report.rows(workdir / "timing.jsonl") as write:
    for label, n in variants:
      m = model if n is None else model.smoothed(c.sigma, n=n, chunk_size=min(n, 16))
      call = lambda: m.generate(params, x, prompt, max_new_tokens=c.max_new_tokens)  # pylint: disable=cell-var-from-loop
      call()  # compile
      times = []
      for _ in range(c.timing_repeats):
        t0 = time.perf_counter()
        call()  # synchronous: the answers come back as strings
        times.append((time.perf_counter() - t0) / len(x))
      row = {"variant": label, "n": n or 0, "seconds per image": float(np.median(times))}
      write(dict(row, times=times, images=len(x)))
      table.append(row)
  base = table[0]["seconds per image"]
  for row in table:
    row["x original"] = row["seconds per image"] / base
  caption = (f"Table 7: per-image inference time (image -> greedy answer of at most "
             f"{c.max_new_tokens} tokens) of the MLLM at "
             f"{config.llava.get('checkpoint') or 'random init'}, batch of {len(x)} images, "
             f"median of {c.timing_repeats} calls after compilation, on "
             f"{jax.devices()[0].platform} ({os.cpu_count()} CPUs), same run.")
  print(report.write_table(table, workdir, "timing", caption=caption))
  return table


def main(config, workdir: str, task: str = "classify", attack: str = "all") -> None:
  run(config, workdir, task, attack)


if __name__ == "__main__":
  def _flags():
    flags.DEFINE_enum("task", "classify", list(TASKS), "The MLLM task (Tables 3-5) or "
                      "'timing' (Table 7).")
    flags.DEFINE_string("attack", robustness.ALL, f"One of {sorted(attacks.ATTACKS)}, a "
                        f"comma-separated list of them, or {robustness.ALL!r}.")
  cli.run(main, workdir_help="Where the table, per-image rows and PNG strip are written.",
          define_extra=_flags)
