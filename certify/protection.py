r"""MLLM protection, measured: the paper's Tables 3-5 (and Table 7) on LLaVA or OpenFlamingo.

  python -m certify.protection --config configs/llava_embedded.py --task=classify \
      --attack=attackvlm --workdir DIR --config.llava.checkpoint=/tmp/fsjax_llava
  python -m certify.protection --config configs/llava_embedded.py --task=timing \
      --workdir DIR --config.llava.checkpoint=/tmp/fsjax_llava
  python -m certify.protection --config configs/openflamingo_9b.py --task=caption \
      --workdir DIR --config.protection.data.clean_dir=... --config.protection.data.target_dir=...

``--task`` is ``caption`` (Table 3), ``classify`` (Table 4), ``vqa`` (Table 5) or
``timing`` (Table 7), default ``config.protection.task``; ``--attack`` one of
``attackvlm``, ``mattack``, ``foa``, ``pgd`` (fsjax.attacks), a comma-separated list, or
``all``.

The MLLM is the one the config names (``fsjax.mllm.build``, the MLLM registry:
``config.llava``, ``config.openflamingo``, or ``config.mllm.name``); this program imports
no MLLM package. It only uses their common surface
(:class:`fsjax.mllm.MLLM`): the features the language side consumes from an encoder
(smoothed or not), a task's prompt in the model's own format, greedy answers from
injected features.

The threat model, the smoothing and the rows are ``config.attack``, the section
``certify.robustness`` reads too (``fsjax.attacks.ThreatModel``); the two programs differ
only in what judges the adversarial features: here the MLLM's answer
(``config.protection``), there a prototype head. Rows (one language side, several vision
sides; ``fsjax.attacks.build_rows``):

* ``original``: the MLLM as it is, on its encoder.
* ``smoothed`` (FS alone): the language side sees the smoothed *vision encoder*'s
  features (``fsjax.smoothing.SmoothedEncoder``: ``n`` noise samples, the smoothed direction
  at the Monte Carlo mean norm). LLaVA's projector and OpenFlamingo's Perceiver resampler
  come after the smoothed encoder.
* ``smoothed + GSB (FS+D+M)`` when ``config.gsb.checkpoint`` is set (a ``train.gsb``
  workdir of the MLLM's encoder and token view): the same, on the boosted encoder.
* one row per encoder sub-config of ``extra_encoders`` (a ``label`` plus the keys of
  ``config.encoder``: FARE, TeCoA), its smoothed row when ``smooth_extra``, and, with a
  booster, its smoothed row boosted by the booster trained on the *vanilla* encoder (the
  paper's "+ GSB" rows of FARE and TeCoA).

The attacks are feature-space and white-box against the encoder the row's MLLM uses:
through the smoothing with ``eot_samples`` noise draws per step (EOT) and through GSB's
denoiser and mapper. The MLLM itself is only queried, greedily, on the adversarial
images. Columns per attack (Section 6.1):

* ``FCS``: cosine between the features of the clean and of the adversarial image that
  the language side consumes (for a smoothed row both are smoothed features,
  independent noise).
* Smoothed rows, beside FCS (docs/method.md 2c-2d; ``config.protection.certify_n`` > 0):
  ``cert cos f_s``, the certified ``cos(f_s(x'), u)`` at each image's l2 attack distance
  (a norm-aware certificate of the clean image, ``certify_n0`` / ``certify_n`` samples,
  level ``certify_alpha``), and ``cert cos z_n``, the bound on ``cos(z_n(x'), u)`` for the
  ``n``-sample estimate the LLM actually receives (per query, a further
  ``certify_alpha``); means over the images, -1 counting an image where nothing is
  certified (a valid lower bound on any cosine). Unsmoothed rows: "-". The jsonl rows
  also hold each image's ``l2`` distance and both bounds at eps = 0 (``_clean``).
* Classification / VQA: the answer is parsed (first integer / first option letter);
  ``ACC`` = share answering the correct option, ``ASR`` = share answering the attacker's
  target option (the last one: the held-out target class, or "None of the above").
  Unparsable answers are neither and are counted (``unparsable``).
* Captioning (prompt ``caption_prompt``): a judge (``config.protection.judge``: exact
  match by default, ``"item"`` (:func:`item_match`: the embedded captions name the same
  item), or CLIP text similarity, BLEU / CIDEr, an LLM endpoint (``run(..., judge=)``);
  :mod:`fsjax.tasks`) scores each caption against the *original* MLLM's captions of the
  clean image (ACC) and of the target image (ASR); cells are "rate at ``threshold``
  (mean score)", as the paper's.

Data (``config.protection.data``, local files only; ``source``):

* ``"embedded"``: the embedded Fashion-MNIST questions of :mod:`fsjax.tasks`
  (classification with "bag" as the target option, VQA with "None of the above", the
  caption prompt) over an ``fsjax.data`` dataset with Fashion-MNIST's ten labels; clean
  images are balanced over the classes a task attacks, target images are bags (classify,
  caption) or images of a class the VQA question does not list.
* ``"paper"``: the paper's sets (``configs.common.paper_protection_data``): clean /
  target image pairs for captions (``clean_dir``, ``target_dir``), the ten ImageNet
  classes with "shark" as the target option (``dataset``, ``manual_dir``), a ScienceQA
  file (``scienceqa``, targets from ``target_dir``); the paper's prompts.

Writes ``protection_<task>.jsonl`` (one row per variant, attack and image: answers,
parsed options, scores, FCS, l_inf), ``protection_<task>.md`` / ``.csv`` (the table),
``protection_<task>_config.json``, ``protection_<task>_examples.npz`` (the adversarial
images the strips show) and ``protection_<task>_<attack>.png`` (clean |
adversarial per row with its answer, framed and captioned in the colour of its judged
outcome: red the attacker's target, green correct, orange neither | target). Progress:
one bar in image-steps (an image answered, certified, or through one attack step), each
stage named, first calls marked "compiling first". ``--task=timing`` writes ``timing.*``:
per-image inference time (image in, answer out) of the smoothed MLLM for each ``n`` of
``timing_n`` against the unsmoothed one, in the same run (Table 7).

Interrupted (Ctrl-C: it stops after the (row, attack) group being attacked, exit status
130) or killed, the same command resumes: it attacks only the groups whose rows (and
strip images) are missing and ends with the table and strips of an uninterrupted run.
A workdir holding rows of another config is refused in one line (use another workdir).
``--task=timing`` does not resume: its ratios compare timings of one run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sys
import time
from typing import Any, Sequence

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

instructions = tasks.instructions  # the embedded Fashion-MNIST questions

TASKS = ("caption", "classify", "vqa", "timing")
DATA_SOURCES = ("embedded", "paper")
# A result row's identity: what a resumed run matches against protection_<task>.jsonl
# (``attack_index``: the attack's place in --attack, folded into its keys).
ROW_KEY = ("variant", "attack", "attack_index", "image")


# ---------------------------------------------------------------------------------------
# The MLLM and its rows.
# ---------------------------------------------------------------------------------------


def build_mllm(config) -> tuple[mllm.MLLM, dict]:
  """The unsmoothed MLLM ``(model, params)`` the config names (:func:`fsjax.mllm.build`,
  the MLLM registry), ``params = {"vision": ..., "language": ...}``."""
  model, params = mllm.build(config)
  if getattr(model, "tokenizer", None) is None:
    name = mllm.name_of(config)
    raise ValueError(f"config.{name}.tokenizer is not set: certify.protection asks the "
                     f"model in words; pass --config.{name}.tokenizer=/path/to/tokenizer "
                     "(OpenFlamingo: the gpt-neox-20b tokenizer folder of mpt-7b).")
  return model, params


def _mllm_name(config) -> str:
  """The MLLM in the tables' captions: its checkpoint, or "random init"."""
  section = mllm.name_of(config)
  checkpoint = (config.get(section) or {}).get("checkpoint")
  return f"{section} {checkpoint}" if checkpoint else f"{section} (random init)"


def build_rows(config, model: mllm.MLLM, params: dict) -> list[attacks.Row]:
  """The table's rows (module docstring): ``fsjax.attacks.build_rows`` on the MLLM's
  vision tower and the extra encoders of ``config.attack``."""
  towers = [("original", model.encoder, params["vision"])]
  towers += [tower for tower, _ in attacks.extra_towers(config.attack)]
  return attacks.build_rows(config, towers)


def _caption_prompt(c) -> str:
  return c.get("caption_prompt", tasks.CAPTION_PROMPT)


def check_protection_config(config) -> None:
  """Validates ``config.attack`` and ``config.protection`` before anything is built."""
  _, c = attacks.table_sections(config, "protection", program="certify.protection")
  for key, meaning in (("max_new_tokens", "the longest answer, in tokens"),
                       ("timing_images", "images per timed call"),
                       ("timing_repeats", "timed calls per row")):
    checks.check_positive_int(c[key], name=f"config.protection.{key}", meaning=meaning)
  checks.check_probability(c.threshold, name="config.protection.threshold",
                           meaning="the judge score a caption needs to match")
  if not c.timing_n:
    raise ValueError("config.protection.timing_n is empty: give the noise sample counts "
                     "of Table 7, e.g. (1, 4, 8, 64).")
  for n in c.timing_n:
    checks.check_positive_int(n, name="config.protection.timing_n",
                              meaning="noise samples of a timed smoothed row")
  certify_n = c.get("certify_n", 0)
  if certify_n:
    checks.check_positive_int(certify_n, name="config.protection.certify_n", minimum=4,
                              meaning="samples of the smoothed rows' certificate (0: none)")
    checks.check_positive_int(c.certify_n0, name="config.protection.certify_n0",
                              meaning="first-stage samples of that certificate")
    checks.check_alpha(c.certify_alpha, name="config.protection.certify_alpha")
    if certify_n % 2:
      raise ValueError(f"config.protection.certify_n={certify_n} must be even (the norm "
                       "bound pairs consecutive samples).")
  if c.data.get("source", "embedded") not in DATA_SOURCES:
    raise ValueError(f"config.protection.data.source={c.data.source!r} must be one of "
                     f"{DATA_SOURCES}.")
  prompt = _caption_prompt(c)
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f"config.protection.caption_prompt={prompt!r} must be the caption "
                     "task's text, e.g. the paper's 'Describe this image in one concise "
                     "sentence, no longer than 20 words.' (OpenFlamingo: 'Output:').")


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


def _balanced(labels: np.ndarray, n: int) -> np.ndarray:
  """Indices of the first ``n`` images in round-robin order over the classes (rank within
  its class, then class), so that any ``n`` is balanced."""
  seen, rank = {}, np.zeros(len(labels), int)
  for i, l in enumerate(np.asarray(labels).tolist()):
    rank[i] = seen.get(l, 0)
    seen[l] = rank[i] + 1
  return np.lexsort((labels, rank))[:n]


def _too_few(what: str, have: int, n: int) -> None:
  if have < n:
    raise ValueError(f"{what} has only {have} images for config.attack.num_images={n}; "
                     "lower num_images or add images.")


def task_data(config, task: str) -> dict[str, Any]:
  """The task's evaluation set, from ``config.protection.data`` (``source``).

  Returns:
    ``images`` (clean, ``[N, S, S, 3]`` in [0, 1]), ``labels`` (int ``[N]``: the
    dataset's class, -1 where none), ``questions`` (a :class:`fsjax.tasks.Question` per
    image; None for captions), ``targets`` (the attacker's target images, ``[N, S, S,
    3]``), ``titles`` (the clean images' titles in the PNG strip) and ``option_names``
    (classification: the name of each option, the target last; else None).
  """
  c, n = config.protection, int(config.attack.num_images)
  source = c.data.get("source", "embedded")
  if source == "embedded":
    return _embedded_data(c, task, n)
  if source == "paper":
    return _paper_data(c, task, n)
  raise ValueError(f"config.protection.data.source={source!r} must be one of {DATA_SOURCES}.")


def _embedded_data(c, task: str, n: int) -> dict[str, Any]:
  """The embedded Fashion-MNIST questions; clean images balanced over the attacked classes
  (the nine clean classes; all ten for VQA), in a seeded interleaved order."""
  spec = dict(c.data)
  attacked = [l for l in range(10) if task == "vqa" or l != instructions.TARGET_LABEL]
  per_class = -(-n // len(attacked))
  images, labels = _images(spec, classes=attacked, per_class=per_class)
  order = _balanced(labels, n)
  images, labels = images[order], labels[order]
  _too_few(f"{spec['name']} split {spec['split']!r}", len(images), n)
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
    _too_few(f"{spec['name']}'s target class {instructions.TARGET_LABEL}", len(targets), n)
  options = [instructions.CLASS_NAMES[l] for l in instructions.CLEAN_LABELS]
  return {"images": images, "labels": labels, "questions": questions, "targets": targets,
          "titles": [f"clean: {instructions.CLASS_NAMES[int(l)]}" for l in labels],
          "option_names": (options + [instructions.CLASS_NAMES[instructions.TARGET_LABEL]]
                           if task == "classify" else None)}


def _path(spec, key: str, what: str) -> str:
  if not spec.get(key):
    raise ValueError(f"config.protection.data.{key} is not set: {what} "
                     f"(--config.protection.data.{key}=/path). Nothing is downloaded.")
  return spec[key]


def _paper_data(c, task: str, n: int) -> dict[str, Any]:
  """The paper's evaluation sets (``configs.common.paper_protection_data``)."""
  spec = c.data
  size = int(spec.image_size)
  if task == "classify":
    per_class = -(-n // len(tasks.PAPER_CLASSES))
    d = tasks.classification_images(
        image_size=size, per_class=per_class, dataset=spec.dataset, split=spec.split,
        seed=int(spec.get("seed", 0)), data_dir=spec.get("data_dir"),
        manual_dir=spec.get("manual_dir"))
    order = _balanced(d.labels, n)
    _too_few(f"{spec.dataset} split {spec.split!r}", len(order), n)
    labels = d.labels[order]
    return {"images": d.images[order], "labels": labels, "targets": d.target_images[order],
            "questions": [tasks.classification_question(tasks.PAPER_CLASSES, int(l))
                          for l in labels],
            "titles": [f"clean: {tasks.PAPER_CLASSES[int(l)]}" for l in labels],
            "option_names": list(tasks.PAPER_CLASSES) + [tasks.PAPER_TARGET_CLASS]}
  target_dir = _path(spec, "target_dir", "the folder of target images (M-Attack's "
                     "target_images)")
  if task == "caption":
    clean_dir = _path(spec, "clean_dir", "the folder of clean images (M-Attack's NIPS-2017 "
                      "dev images)")
    pairs = tasks.image_pairs(clean_dir, target_dir, image_size=size, num_examples=n)
    return {"images": pairs.clean, "labels": np.full(n, -1), "questions": None,
            "targets": pairs.target, "titles": pairs.clean_names, "option_names": None}
  q = tasks.load_scienceqa(_path(spec, "scienceqa", "a ScienceQA-format JSON/JSONL file"),
                           image_size=size, num_examples=n)
  _too_few(f"config.protection.data.scienceqa={spec.scienceqa}", len(q.images), n)
  # The target folder's images (image_pairs of the folder with itself), in turn: images
  # unrelated to the question, whose answer is then "None of the above" (our choice).
  targets = tasks.image_pairs(target_dir, target_dir, image_size=size).target
  targets = targets[np.arange(n) % len(targets)]
  return {"images": q.images, "labels": np.full(n, -1), "targets": targets,
          "questions": [tasks.vqa_question(q.questions[i], q.choices[i], int(q.answers[i]))
                        for i in range(n)],
          "titles": [f"clean: {i}" for i in q.ids], "option_names": None}


def prompts_of(task: str, questions, n: int, caption_prompt: str = tasks.CAPTION_PROMPT
               ) -> list[str]:
  """The N prompts of a task (the user's text; the model's format places the image)."""
  return [caption_prompt] * n if task == "caption" else [q.prompt for q in questions]


# ---------------------------------------------------------------------------------------
# Querying the MLLM.
# ---------------------------------------------------------------------------------------


def llm_features(model: mllm.MLLM, params: dict, row: attacks.Row, x: np.ndarray, c,
                 key: jax.Array) -> np.ndarray:
  """``[N, T, D]`` features the language side consumes for the row: the encoder's tokens,
  or, for a smoothed row (a ``fsjax.smoothing.SmoothedEncoder``), its smoothed token view
  (``c``: ``config.attack``). For LLaVA they feed the projector, for OpenFlamingo the Perceiver
  resampler."""
  m, p = model.with_encoder(row.encoder), {"vision": row.params}
  out = []
  for sl in batching.batch_slices(len(x), c.batch_size):
    xb = batching.pad_rows(x[sl], c.batch_size)  # one shape: one compilation
    z = m.image_features(p, xb, key=jax.random.fold_in(key, sl.start))
    out.append(np.asarray(z)[:sl.stop - sl.start])
  return np.concatenate(out)


def input_certificate(row: attacks.Row, x: np.ndarray, c, batch_size: int,
                      key: jax.Array) -> tuple[np.ndarray, np.ndarray] | None:
  """``(deficit [N], norm_upper [N])`` of the norm-aware certificate (docs/method.md 2c,
  mean reference, betting bound) of each clean image under the row's smoothing, or None
  for an unsmoothed row or ``c.certify_n == 0`` (``c``: ``config.protection``)."""
  if not isinstance(row.encoder, smoothing.SmoothedEncoder) or not c.get("certify_n", 0):
    return None
  enc = row.encoder
  chunk = min(16, int(c.certify_n))
  deficit, norm_upper = [], []
  for sl in batching.batch_slices(len(x), batch_size):
    cert = certify.norm_aware_fcsb(
        row.params["encoder"], batching.pad_rows(x[sl], batch_size), encoder=enc.base,
        sigma=enc.sigma, eps=0.0, key=jax.random.fold_in(key, sl.start), n=int(c.certify_n),
        n0=int(c.certify_n0), alpha=float(c.certify_alpha), bound="betting",
        chunk_size=chunk + chunk % 2)
    deficit.append(np.asarray(cert.deficit)[:sl.stop - sl.start])
    norm_upper.append(np.asarray(cert.norm_upper)[:sl.stop - sl.start])
  return np.concatenate(deficit), np.concatenate(norm_upper)


def input_bounds(row: attacks.Row, certificate, adversarial: np.ndarray, x: np.ndarray,
                 alpha: float) -> dict[str, np.ndarray]:
  """Per image: certified ``cos(f_s(x'), u)`` and the bound on ``cos(z_n(x'), u)`` at the
  l2 distance of ``adversarial`` from ``x`` (``certify.llm_input_bounds``), and both at
  the clean image itself (eps = 0: the concentration term alone)."""
  l2 = np.linalg.norm((np.asarray(adversarial, np.float64) - x).reshape(len(x), -1), axis=-1)
  out = {"l2": l2}
  for suffix, eps in (("", l2), ("_clean", np.zeros_like(l2))):
    fs, zn = certify.llm_input_bounds(certificate[0], certificate[1], eps, row.encoder.sigma,
                                      n=row.encoder.n, alpha=alpha)
    out.update({f"cert_cos_fs{suffix}": fs, f"cert_cos_zn{suffix}": zn})
  return out


def generate(model: mllm.MLLM, params: dict, features: np.ndarray, prompts: list[str], *,
             max_new_tokens: int, batch_size: int) -> list[str]:
  """Greedy answers from features ``[N, T, D]`` and N prompts (``params["language"]`` used),
  in batches of ``batch_size`` (the last one padded: one shape, one compilation)."""
  out = []
  for sl in batching.batch_slices(len(prompts), batch_size):
    n = sl.stop - sl.start
    ps = prompts[sl] + [prompts[sl][-1]] * (batch_size - n)
    out += mllm.answer(model, params, batching.pad_rows(features[sl], batch_size), ps,
                       max_new_tokens=max_new_tokens)[:n]
  return out


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


class _Examples:
  """The adversarial images the PNG strips show (the first ``config.attack.examples`` of
  each (row, attack) group), kept in ``<stem>_examples.npz`` (rewritten atomically after
  each group), so that a resumed run draws an uninterrupted run's strips without
  attacking again. ``fresh``: the rows file holds no rows, so a file left here is stale."""

  def __init__(self, path: pathlib.Path, *, fresh: bool):
    self.path = path
    self.arrays = {}
    if not fresh and path.exists():
      with np.load(path) as f:
        self.arrays = {name: f[name] for name in f.files}

  @staticmethod
  def _name(r: int, k: int) -> str:
    return f"row{r}_attack{k}"

  def has(self, r: int, k: int) -> bool:
    return self._name(r, k) in self.arrays

  def get(self, r: int, k: int) -> np.ndarray:
    return self.arrays[self._name(r, k)]

  def add(self, r: int, k: int, images: np.ndarray) -> None:
    self.arrays[self._name(r, k)] = np.asarray(images)
    with report.replacing(self.path) as tmp, open(tmp, "wb") as f:
      np.savez(f, **self.arrays)


class Progress:
  """The program's one bar, in *image-steps*: an image answered (clean or adversarial),
  certified or pushed through one attack step. Each stage says what it does, and the
  first call of a shape says that it compiles (an attack's first batch of each row does:
  rows differ in their encoder)."""

  def __init__(self, total: int):
    self.bar = tqdm.tqdm(total=int(total), desc="protection", unit="image-step",
                         dynamic_ncols=True)
    self._seen: set = set()

  def stage(self, label: str, compile_key=None) -> None:
    first = compile_key is not None and compile_key not in self._seen
    self._seen.add(compile_key)
    self.bar.set_postfix_str(f"{label} (compiling first)" if first else label)

  def done(self, steps: int) -> None:
    self.bar.update(int(steps))

  def close(self) -> None:
    self.bar.close()


def outcome(task: str, row: dict, threshold: float) -> str:
  """An answer's judged outcome (a key of ``report.OUTCOMES``) from its jsonl row, as the
  table counts it: "attacked" (the target option / a caption matching the target's),
  "correct" (the correct option / a caption matching the clean image's), else "other"."""
  if task == "caption":
    if row["score_target"] >= threshold:
      return "attacked"
    return "correct" if row["score_clean"] >= threshold else "other"
  if row["option"] == row["target_option"]:
    return "attacked"
  return "correct" if row["option"] == row["correct_option"] else "other"


def run(config, workdir: str, task: str | None = None, attack: str = "all", *,
        judge: tasks.Judge | None = None) -> list[dict]:
  """Runs the attacks on every row; writes the files; returns the table rows.

  Args:
    config: a config with ``protection`` and one MLLM section (``llava`` or
      ``openflamingo``).
    workdir: the output folder.
    task: ``caption``, ``classify``, ``vqa`` or ``timing``; None: ``config.protection.task``.
    attack: an attack name, a comma-separated list, or ``all``.
    judge: the caption judge, overriding ``config.protection.judge`` (e.g.
      ``fsjax.tasks.LLMJudge(complete)``, the paper's GPT judge on your endpoint).

  Resumable (as ``certify.run``): the (row, attack) groups whose rows (:data:`ROW_KEY`)
  an earlier run of the same config and ``attack`` left, with their strip images, are
  not attacked again (:func:`certify.report.check_workdir` refuses another config's
  folder in one line); the table and strips are made from all rows, in the
  uninterrupted run's order, so they are the same. Ctrl-C stops after the group being
  attacked (its rows written) with :class:`fsjax.cli.Interrupted`.
  """
  check_protection_config(config)
  c = config.protection
  task = c.get("task", "classify") if task is None else task
  if task not in TASKS:
    raise ValueError(f"--task={task!r} must be one of {TASKS}.")
  mllm.name_of(config)
  if task == "timing":
    return timing(config, workdir)
  names = attacks.attack_names(attack)
  a = config.attack
  threat = attacks.ThreatModel.from_config(a)
  judge_name = repr(c.judge) if judge is None else getattr(judge, "__name__",
                                                             type(judge).__name__)
  if task == "caption" and judge is None:
    judge = _judge(c)
  workdir = pathlib.Path(workdir)
  stem = f"protection_{task}"
  results = workdir / f"{stem}.jsonl"
  report.check_workdir(config, results, f"{stem}_config.json")  # another config's: refuse
  tqdm.tqdm.write(f"certify.protection: loading the MLLM ({_mllm_name(config)}) and the "
                  "rows' encoders...", file=sys.stderr)
  model, params = build_mllm(config)
  rows = build_rows(config, model, params)
  tqdm.tqdm.write(f"certify.protection: loading the {task} data "
                  f"({config.attack.num_images} images)...", file=sys.stderr)
  data = task_data(config, task)
  x, t, questions = data["images"], data["targets"], data["questions"]
  prompts = prompts_of(task, questions, len(x), _caption_prompt(c))
  key = jax.random.PRNGKey(config.seed)
  n = len(x)
  # Resuming: the (row, attack) groups an earlier run of this config finished (all their
  # rows, and their adversarial examples for the strips) are not attacked again.
  groups = [(r, k) for r in range(len(rows)) for k in range(len(names))]
  keys = {(r, k): [(rows[r].label, names[k], k, i) for i in range(n)] for r, k in groups}
  done = report.done_rows(results, ROW_KEY)
  examples = _Examples(workdir / f"{stem}_examples.npz", fresh=not done)
  todo = [g for g in groups if not (all(key_ in done for key_ in keys[g])
                                    and (not a.examples or examples.has(*g)))]
  if len(todo) < len(groups):
    tqdm.tqdm.write(f"certify.protection: resuming {workdir}: {len(groups) - len(todo)} of "
                    f"{len(groups)} (row, attack) groups are done"
                    + ("; attacking the rest." if todo else "; nothing left to attack."),
                    file=sys.stderr)
  certified = bool(c.get("certify_n", 0))
  todo_rows = sorted({r for r, _ in todo})
  references = None
  if task == "caption" and len(todo) < len(groups):  # the original model's, in the rows
    first = keys[next(g for g in groups if g not in todo)]
    references = tuple([done[k_][field] for k_ in first]
                       for field in ("reference_clean", "reference_target"))
  progress = Progress(
      len(todo) * n * (threat.steps + 1) + len(todo_rows) * n + (
          n * sum(isinstance(rows[r].encoder, smoothing.SmoothedEncoder) for r in todo_rows)
          if certified else 0) + (2 * n if task == "caption" and references is None else 0))

  def ask(z, label):
    progress.stage(label, ("answers", z.shape[1:]))
    out = generate(model, params, z, prompts, max_new_tokens=c.max_new_tokens,
                   batch_size=a.batch_size)
    progress.done(len(out))
    return out

  if task == "caption" and references is None:  # the vanilla MLLM's captions
    original = rows[0]
    references = (ask(llm_features(model, params, original, x, a, key),
                      "original: captioning the clean images"),
                  ask(llm_features(model, params, original, t, a, key),
                      "original: captioning the target images"))

  fresh = {}
  with checkpointing.lock_workdir(workdir, "certify.protection"), report.rows(
      results, config, config_name=f"{stem}_config.json") as write, \
      cli.interruptible() as stop, contextlib.closing(progress):
    for r in todo_rows:
      row = rows[r]
      rk = jax.random.fold_in(key, r)
      z_clean = llm_features(model, params, row, x, a, jax.random.fold_in(rk, 0))
      clean_answers = ask(z_clean, f"{row.label}: clean answers")
      if isinstance(row.encoder, smoothing.SmoothedEncoder) and certified:
        progress.stage(f"{row.label}: certifying the clean images ({c.certify_n0} + "
                       f"{c.certify_n} samples)", ("certificate", row.label))
      certificate = input_certificate(row, x, c, a.batch_size, jax.random.fold_in(rk, 999))
      if certificate is not None:
        progress.done(n)
      for k in [k_ for r_, k_ in todo if r_ == r]:  # a copy: todo shrinks as groups finish
        name = names[k]
        # The same attack randomness for every row: fold in the attack, not the row.
        progress.stage(f"{row.label}: {name}, {threat.steps} steps on {n} images",
                       ("attack", row.label, name))
        adv = attacks.attack_images(
            name, row.encoder, row.params, x, t, threat=threat,
            key=jax.random.fold_in(key, 1000 + k), batch_size=a.batch_size)
        progress.done(n * threat.steps)
        z_adv = llm_features(model, params, row, adv, a, jax.random.fold_in(rk, 1 + k))
        fcs = tasks.features_cosine(z_clean, z_adv)
        adv_answers = ask(z_adv, f"{row.label}: {name}, adversarial answers")
        bounds = None
        if certificate is not None:
          bounds = input_bounds(row, certificate, adv, x, float(c.certify_alpha))
        linf = attacks.linf_distances(adv, x)
        for i in range(n):
          out = image_row(task, row.label, name, i, int(data["labels"][i]), clean_answers[i],
                          adv_answers[i], float(fcs[i]), float(linf[i]),
                          questions[i] if questions else None, references, judge)
          out["attack_index"] = k
          if bounds is not None:
            out.update({key_: float(v[i]) for key_, v in bounds.items()})
          write(out)
          fresh[(row.label, name, k, i)] = report.as_read(out)  # as a resumed run reads it
        if a.examples:
          examples.add(r, k, adv[:a.examples])
        todo.remove((r, k))
        if stop():  # pressed while this group ran: its rows are written, stop here
          rest = "attack the rest" if todo else "write the table and strips"
          raise cli.stopped("certify.protection", f"{len(groups) - len(todo)} of "
                            f"{len(groups)} (row, attack) groups are done", results, rest)
  # The table and strips from every group's rows (the earlier run's and this one's).
  have = {**done, **fresh}
  table, strips = [], {name: {} for name in names}
  for r, row in enumerate(rows):
    mine = [[have[key_] for key_ in keys[(r, k)]] for k in range(len(names))]
    clean = score(task, [o["answer_clean"] for o in mine[0]], questions, references, judge,
                  c.threshold, np.ones(n))
    line = {"variant": row.label, "clean ACC": clean.cells()["ACC"]}
    for k, name in enumerate(names):
      adv_rows = mine[k]
      summary = score(task, [o["answer"] for o in adv_rows], questions, references, judge,
                      c.threshold, [o["fcs"] for o in adv_rows])
      cells = summary.cells()
      bounded = "cert_cos_fs" in adv_rows[0]
      cells = {"FCS": cells.pop("FCS"),
               "cert cos f_s": f"{np.mean([o['cert_cos_fs'] for o in adv_rows]):.3f}"
               if bounded else "-",
               "cert cos z_n": f"{np.mean([o['cert_cos_zn'] for o in adv_rows]):.3f}"
               if bounded else "-",
               **cells}
      line.update({f"{name} {key_}": v for key_, v in cells.items()})
      if task != "caption":
        line[f"{name} unparsable"] = summary.unparsable
      if a.examples:
        shown = adv_rows[:a.examples]
        strips[name][row.label] = (examples.get(r, k), [o["answer"] for o in shown],
                                   [outcome(task, o, c.threshold) for o in shown])
    table.append(line)
  caption = (f"Table {dict(caption=3, classify=4, vqa=5)[task]} ({task}) of the MLLM "
             f"{_mllm_name(config)} on {_data_name(c.data, task)}: {len(x)} images; "
             f"{threat.describe()}; smoothed rows: sigma = {a.sigma:g}, n = {a.n}. "
             + (f"cert cos f_s / z_n: mean certified cosine of the exact smoothed feature / "
                f"lower bound on the cosine of the n-sample estimate the LLM receives, at "
                f"each image's l2 attack distance (docs/method.md 2c-2d; certificate of "
                f"n = {c.certify_n} samples, alpha = {c.certify_alpha:g} each; -1: nothing "
                f"certified). " if c.get("certify_n", 0) else "")
             + ("Captions: rate of judge scores >= "
                f"{c.threshold:g} (mean score), judge {judge_name} against the original "
                "model's captions of the clean (ACC) and target (ASR) images."
                if task == "caption" else
                "ACC / ASR: answers naming the correct / the target option; unparsable "
                "answers count as neither."))
  print(report.write_table(table, workdir, stem, caption=caption))
  if a.examples:
    options = data["option_names"]
    for name in names:
      plot_strip(x[:a.examples], t[:a.examples], strips[name],
                 workdir / f"{stem}_{name}.png", title=f"{task}, {name}",
                 clean_titles=data["titles"][:a.examples],
                 describe=(lambda a: describe_option(a, options)) if options else None)
  return table


def _data_name(spec, task: str) -> str:
  if spec.get("source", "embedded") == "embedded":
    return f"{spec.name} {spec.split}"
  return {"caption": f"the image pairs of {spec.get('clean_dir')} / {spec.get('target_dir')}",
          "classify": f"{spec.dataset} {spec.split} (the paper's ten classes, target shark)",
          "vqa": f"ScienceQA {spec.get('scienceqa')}"}[task]


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


def describe_option(answer: str, option_names: Sequence[str]) -> str:
  """A classification answer with the class it names: ``"9"`` -> ``"9 (bag)"``
  (``option_names``: the name of each option, the target last)."""
  option = tasks.parse_integer(answer, len(option_names))
  if option == tasks.UNPARSABLE:
    return answer
  return f"{answer} ({option_names[option]})"


def plot_strip(x, targets, adversarial: dict, path: pathlib.Path, *, title: str,
               clean_titles: Sequence[str] | None = None, describe=None) -> None:
  """PNG strip: per image, clean | adversarial of each row with its answer | target.

  ``adversarial[label] = (images, answers, outcomes)``: each adversarial panel is framed
  and captioned in the colour of its judged outcome (``report.OUTCOMES``: the attacked
  answer red, a correct ("repaired") one green, anything else orange).
  """
  describe = describe or (lambda a: a)
  report.image_strip(
      [[(x[i], clean_titles[i] if clean_titles else "clean")]
       + [(adv[i], f"adversarial, {label}:\n{_wrap(describe(answers[i]))}", judged[i])
          for label, (adv, answers, judged) in adversarial.items()]
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


def _answer_images(model: mllm.MLLM, params: dict, x: np.ndarray, prompts: list[str], *,
                   key: jax.Array, max_new_tokens: int) -> list[str]:
  """Image in, answers out: the encoder (smoothed or not), then greedy generation."""
  return mllm.answer(model, params, model.image_features(params, x, key=key), prompts,
                     max_new_tokens=max_new_tokens)


def timing(config, workdir: str) -> list[dict]:
  """Per-image wall time of image in, answer out (encoder, smoothed with each n of
  ``timing_n`` or not, then greedy generation), in the same run, on the images and
  prompt of ``config.protection.task``; the first call of each is compilation and not
  timed; the median of ``timing_repeats`` calls is reported."""
  c = config.protection
  task = c.get("task", "classify")
  task = task if task in TASKS[:3] else "classify"
  workdir = pathlib.Path(workdir)
  report.check_workdir(config, workdir / "timing.jsonl", "timing_config.json")
  model, params = build_mllm(config)
  data = task_data(config, task)
  x = data["images"][:c.timing_images]
  if len(x) < c.timing_images:
    raise ValueError("config.protection.timing_images is larger than num_images.")
  prompts = prompts_of(task, data["questions"], len(x), _caption_prompt(c))[:1] * len(x)
  key = jax.random.PRNGKey(config.seed)
  variants = [("original", None)] + [(f"smoothed n={int(n)}", int(n)) for n in c.timing_n]
  table = []
  with report.rows(workdir / "timing.jsonl", config, config_name="timing_config.json") as write:
    for label, n in variants:
      m, p = (model, params) if n is None else mllm.smoothed(
          model, params, sigma=config.attack.sigma, n=n, chunk_size=min(n, 16))
      call = functools.partial(_answer_images, m, p, x, prompts, key=key,
                               max_new_tokens=c.max_new_tokens)
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
             f"{c.max_new_tokens} tokens, {task} prompt) of the MLLM {_mllm_name(config)}, "
             f"batch of {len(x)} images, median of {c.timing_repeats} calls after compilation, on "
             f"{jax.devices()[0].platform} ({os.cpu_count()} CPUs), same run.")
  print(report.write_table(table, workdir, "timing", caption=caption))
  return table


def main(config, workdir: str, task: str | None = None, attack: str = "all") -> None:
  run(config, workdir, task, attack)


if __name__ == "__main__":
  def _flags():
    flags.DEFINE_enum("task", None, list(TASKS), "The MLLM task (Tables 3-5) or 'timing' "
                      "(Table 7); default config.protection.task.")
    flags.DEFINE_string("attack", attacks.ALL, f"One of {sorted(attacks.ATTACKS)}, a "
                        f"comma-separated list of them, or {attacks.ALL!r}.")
  cli.run(main, workdir_help="Where the table, per-image rows and PNG strip are written.",
          define_extra=_flags)
