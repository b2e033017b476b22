r"""The paper's Table 4 for classification: FCS, ACC and ASR under targeted attacks.

  python -m certify.robustness --config configs/default.py --attack foa --workdir DIR

``--attack`` is one of ``pgd``, ``attackvlm``, ``mattack``, ``foa`` (fsjax.attacks), a
comma-separated list of them, or ``all``.

The threat model, the smoothing and the rows are ``config.attack``, the section
``certify.protection`` reads too (``fsjax.attacks.ThreatModel``); the two programs differ
only in what judges the adversarial features: here a prototype head
(``config.robustness``), there an MLLM's answer. Rows (``fsjax.attacks.build_rows``):

* ``original``: the unsmoothed base encoder f (``config.encoder``).
* ``smoothed`` (FS alone): the smoothed encoder, evaluated as the Monte Carlo mean
  ``mean_i f(x + delta_i)`` of ``config.attack.n`` samples and attacked white-box: every
  attack averages ``config.attack.eot_samples`` fresh noise draws per step (EOT).
* ``smoothed + GSB (FS+D+M)`` when ``config.gsb.checkpoint`` is set (the most boosted GSB
  variant, ``fsjax.variants.boost``): the same through the denoiser and mapper. (Before
  issue 19 this row replaced the ``smoothed`` row; both are shown now, as in
  ``certify.protection``.)
* one row per encoder sub-config in ``config.attack.extra_encoders`` (each with a
  ``label``, e.g. FARE or TeCoA CLIP checkpoints), plus, when
  ``config.attack.smooth_extra``, its smoothed row and, with a booster, its smoothed row
  boosted by the booster of ``config.encoder``.

Columns per attack (Section 5.2, "Evaluation metrics"):

* ``FCS``: cosine between the evaluated model's features of the clean and of the
  adversarial image (for a smoothed model both are its Monte Carlo smoothed features,
  with independent noise, so even a clean pair scores slightly below 1).
* ``ACC``: fraction of adversarial images the classifier assigns their true class.
* ``ASR``: fraction assigned the attacker's target class.
``clean ACC`` is the classifier's accuracy on the clean images.

The task mirrors the paper's (Appendix, "Image classification"): the classifier knows
the K classes ``config.robustness.classes`` (None: all of the dataset's); one of them,
``config.robustness.target_class`` (a class id, or negative: counted from the end of the
list; default the last), is held out as the attacker's target (the paper's class 10,
"shark"); attacked images come from the other classes, and image i is pushed towards
target image i, the i-th image of the target class in the same split (deterministic:
the data's seeded order). Every attack is targeted; ``pgd`` is fsjax's targeted feature
PGD (cosine to the target's feature, l_inf, random start).

Classifier: a cosine-prototype head on the evaluated model's features, prediction
``argmax_k <z, w_k>`` (method.md section 3). ``config.robustness.head``:

* ``"zero_shot"``: CLIP zero-shot, w_k the text embeddings of the class-name prompts
  (needs a CLIP checkpoint with a text tower and tokenizer, ``pooled`` features); the
  same prototypes serve the encoder's unsmoothed and smoothed rows, as the paper's
  MLLM is the same with or without FS.
* ``"class_mean"``: w_k = the normalised mean feature of
  ``config.robustness.prototypes_per_class`` clean images of class k from
  ``config.robustness.prototype_split`` of the same dataset (the train split by default,
  disjoint from the attacked test images), computed with the evaluated model itself
  (smoothed features for a smoothed row): a nearest-class-mean head, the embedded
  default's stand-in for an MLLM's answer.
* ``"auto"``: zero-shot where possible, else class means. The ``head`` column says which.

The budget is l_inf ``config.attack.linf_budget`` (16/255) with ``config.attack.steps`` sign
steps of ``config.attack.step_size``. Writes ``robustness.md``, ``robustness.csv``,
``robustness.jsonl`` (one row per model, attack and image) and ``examples_<attack>.png``
(clean / adversarial per model / target for a few images) into the workdir.
"""

from __future__ import annotations

import numbers
import pathlib
from typing import Any, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from certify import report
from fsjax import attacks
from fsjax import batching
from fsjax import checks
from fsjax import cli
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib

HEADS = ("auto", "class_mean", "zero_shot")


def check_robustness_config(config) -> None:
  """Validates ``config.attack`` and ``config.robustness`` before anything is built."""
  _, c = attacks.table_sections(config, "robustness", program="certify.robustness")
  checks.check_positive_int(c.prototypes_per_class,
                            name="config.robustness.prototypes_per_class",
                            meaning="clean images per class of a class-mean prototype")
  checks.check_choice(c.head, name="config.robustness.head", choices=HEADS)
  if isinstance(c.target_class, bool) or not isinstance(c.target_class, numbers.Integral):
    raise ValueError(f"config.robustness.target_class={c.target_class!r} must be a class id "
                     "(negative counts from the end: -1 is the last class).")


# ---------------------------------------------------------------------------------------
# Rows, data, classifier heads.
# ---------------------------------------------------------------------------------------


def _text_source(encoder, params, encoder_config):
  """``(clip_model, params, checkpoint)`` if zero-shot prototypes are possible, else None."""
  from fsjax import clip  # pylint: disable=g-import-not-at-top
  checkpoint = encoder_config.get("checkpoint")
  if (isinstance(encoder, clip.ClipEncoder) and encoder.feature == "pooled" and checkpoint
      and encoder.model.config.text_config is not None):
    return encoder.model, params, checkpoint
  return None


def build_rows(config) -> tuple[list[attacks.Row], dict[str, Any]]:
  """The table's rows (``fsjax.attacks.build_rows`` on ``config.encoder`` and the extra
  encoders) and, per tower, the unsmoothed CLIP ``(model, params, checkpoint)`` whose text
  tower gives zero-shot prototypes (or None): the same prototypes serve every row of a
  tower, as the paper's MLLM is the same with or without FS."""
  encoder, params = encoders_lib.build(config.encoder)
  towers = [(("original", encoder, params), config.encoder)]
  towers += attacks.extra_towers(config.attack)
  text = {tower[0]: _text_source(tower[1], tower[2], spec) for tower, spec in towers}
  return attacks.build_rows(config, [tower for tower, _ in towers]), text


def _load(spec: dict, **overrides) -> tuple[np.ndarray, np.ndarray, list[str]]:
  spec = dict(spec, **overrides)
  dataset = data_lib.from_config(spec)
  batches = list(dataset)
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]), dataset.class_names)


def attack_data(config) -> dict[str, Any]:
  """Attacked images (not of the target class), their targets, and prototype images."""
  c = config.robustness
  spec = c.get("data") or config.get("test_data")
  if spec is None:
    raise ValueError("certify.robustness needs a labelled dataset: set config.test_data or "
                     "config.robustness.data (e.g. fashion_mnist).")
  spec = dict(spec.items())
  for k in ("num_examples", "classes", "per_class"):
    spec.pop(k, None)
  class_names = data_lib.load(spec["name"], split=spec["split"], image_size=1,
                              batch_size=1, num_examples=1, seed=0,
                              data_dir=spec.get("data_dir"),
                              manual_dir=spec.get("manual_dir")).class_names
  k = len(class_names)
  classes = list(range(k)) if c.get("classes") is None else [int(i) for i in c.classes]
  if len(classes) < 2 or len(set(classes)) != len(classes) or not all(
      0 <= i < k for i in classes):
    raise ValueError(f"config.robustness.classes={c.classes!r} must be >= 2 distinct class "
                     f"ids of {spec['name']} (0 .. {k - 1}), or None for all classes.")
  if c.target_class < 0:
    if c.target_class < -len(classes):
      raise ValueError(f"config.robustness.target_class={c.target_class} is out of range "
                       f"for the {len(classes)} classes of the classifier.")
    target_class = classes[c.target_class]
  elif c.target_class in classes:
    target_class = int(c.target_class)
  else:
    raise ValueError(f"config.robustness.target_class={c.target_class} is not one of the "
                     f"classifier's classes ({spec['name']} has {k}; "
                     f"config.robustness.classes={c.get('classes')}).")
  others = [i for i in classes if i != target_class]
  n = config.attack.num_images
  x, y, _ = _load(spec, classes=others, num_examples=n)
  t, _, _ = _load(spec, classes=[target_class], num_examples=n)
  if len(t) < len(x):
    raise ValueError(f"{spec['name']} split {spec['split']!r} has only {len(t)} images of "
                     f"the target class {target_class}; lower config.attack.num_images.")
  return {"images": x, "labels": y, "targets": t, "target_class": target_class,
          "classes": classes, "class_names": list(class_names), "spec": spec}


@jax.jit
def _cosine(a, b):
  return encoders_lib.cosine(a, b)


def features(row: attacks.Row, x: np.ndarray, c, key: jax.Array) -> np.ndarray:
  """``[N, D]`` features of the row (``fsjax.attacks.row_features``): f(x), or the Monte
  Carlo f_s(x) = mean_i f(x + delta_i) of a smoothed row (``c``: ``config.attack``)."""
  return attacks.row_features(row, x, key=key, batch_size=int(c.batch_size))


@jax.jit
def _predict(z, prototypes):
  # Cosine-prototype head: argmax_k <z, w_k>; the norm of z does not change the argmax.
  return jnp.argmax(z @ prototypes.T, axis=-1)


def head(row: attacks.Row, text_source: Any, data: dict, config, key: jax.Array,
         cache: dict) -> tuple[str, np.ndarray]:
  """``(kind, [K, D] unit prototypes)`` of the row's classifier (module docstring);
  ``text_source``: the row's tower's CLIP for zero-shot prototypes, or None."""
  c = config.robustness
  if c.head in ("auto", "zero_shot") and text_source is not None:
    src = text_source
    if id(src[0]) not in cache:
      from fsjax import clip  # pylint: disable=g-import-not-at-top
      try:
        cache[id(src[0])] = np.asarray(clip.text_prototypes(
            src[0], src[1], src[2], [data["class_names"][i] for i in data["classes"]],
            templates=tuple(c.templates)))
      except (ValueError, OSError, ImportError) as e:
        if c.head == "zero_shot":
          raise
        # "auto": e.g. an OpenCLIP file without tokenizer files next to it.
        logging.warning("%s: no zero-shot prototypes (%s); using class means.",
                        row.label, e)
        cache[id(src[0])] = None
    if cache[id(src[0])] is not None:
      return "zero_shot", cache[id(src[0])]
  if c.head == "zero_shot":
    raise ValueError(f"config.robustness.head='zero_shot' but {row.label!r} is not a CLIP "
                     "checkpoint with a text tower and pooled features; use 'class_mean' or "
                     "'auto'.")
  if "prototype_images" not in cache:
    spec = dict(data["spec"], split=c.prototype_split)
    cache["prototype_images"] = _load(spec, classes=data["classes"],
                                      per_class=c.prototypes_per_class)[:2]
  x, y = cache["prototype_images"]
  z = features(row, x, config.attack, key)
  w = np.stack([z[y == i].mean(0) for i in data["classes"]])
  return "class_mean", np.asarray(encoders_lib.normalise(jnp.asarray(w)))


# ---------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------


def run(config, workdir: str, attack: str = attacks.ALL) -> list[dict]:
  """Runs the attacks on every row; writes the files; returns the table rows."""
  names = attacks.attack_names(attack)
  check_robustness_config(config)
  c = config.attack
  threat = attacks.ThreatModel.from_config(c)
  workdir = pathlib.Path(workdir)
  report.check_workdir(config, workdir / "robustness.jsonl", "robustness_config.json")
  rows, text = build_rows(config)
  data = attack_data(config)
  x, y, t = data["images"], data["labels"], data["targets"]
  tc, classes = data["target_class"], np.asarray(data["classes"])
  key = jax.random.PRNGKey(config.seed)
  cache, table, examples = {}, [], {n: {} for n in names}
  with report.rows(workdir / "robustness.jsonl", config,
                   config_name="robustness_config.json") as write:
    for m, row in enumerate(rows):
      mk = jax.random.fold_in(key, m)
      kind, prototypes = head(row, text[row.tower], data, config, jax.random.fold_in(mk, 0),
                              cache)
      z_clean = features(row, x, c, jax.random.fold_in(mk, 1))
      # Prototype k is class classes[k]: predictions are dataset class ids.
      pred_clean = classes[np.asarray(_predict(jnp.asarray(z_clean), jnp.asarray(prototypes)))]
      line = {"variant": row.label, "head": kind,
              "clean ACC": float(attacks.accuracy(pred_clean, y))}
      for a, name in enumerate(tqdm.tqdm(names, desc=row.label, unit="attack")):
        # The same attack noise/crops for every row: fold in the attack, not the row.
        adv = attacks.attack_images(
            name, row.encoder, row.params, x, t, threat=threat,
            key=jax.random.fold_in(key, 1000 + a), batch_size=c.batch_size)
        z_adv = features(row, adv, c, jax.random.fold_in(mk, 2 + a))
        pred = classes[np.asarray(_predict(jnp.asarray(z_adv), jnp.asarray(prototypes)))]
        fcs = np.asarray(_cosine(jnp.asarray(z_adv), jnp.asarray(z_clean)))
        line[f"{name} FCS"] = float(fcs.mean())
        line[f"{name} ACC"] = float(attacks.accuracy(pred, y))
        line[f"{name} ASR"] = float(attacks.attack_success_rate(pred, tc))
        linf = attacks.linf_distances(adv, x)
        for i in range(len(x)):
          write({
              "variant": row.label, "attack": name, "image": i, "label": int(y[i]),
              "target_label": tc, "pred_clean": int(pred_clean[i]), "pred_adv": int(pred[i]),
              "fcs": float(fcs[i]), "linf": float(linf[i])})
        examples[name][row.label] = (adv[:c.examples], pred[:c.examples])
      table.append(line)
  caption = (f"Table 4 (classification) on {data['spec']['name']} "
             f"{data['spec']['split']}: {len(x)} images, target class {tc} "
             f"({data['class_names'][tc]!r}); {threat.describe()}; smoothed rows: "
             f"sigma = {c.sigma:g}, n = {c.n} Monte Carlo samples. ACC and ASR are "
             "fractions.")
  print(report.write_table(table, workdir, "robustness", caption=caption))
  if c.examples:
    for name in names:
      plot_examples(x[:c.examples], t[:c.examples], y[:c.examples], examples[name],
                    data["class_names"], workdir / f"examples_{name}.png", title=name)
  return table


def plot_examples(x, targets, labels, adversarial: dict, class_names: Sequence[str],
                  path: pathlib.Path, *, title: str) -> None:
  """PNG strip: per image, clean | adversarial for each model | target."""
  report.image_strip(
      [[(x[i], f"clean: {class_names[labels[i]]}")]
       + [(adv[i], f"{label}\n-> {class_names[pred[i]]}")
          for label, (adv, pred) in adversarial.items()]
       + [(targets[i], "target")] for i in range(len(x))], path, title=title, scale=2.0)


def main(config, workdir: str, attack: str = attacks.ALL) -> None:
  run(config, workdir, attack)


if __name__ == "__main__":
  cli.run(main, workdir_help="Where the table, per-image rows and PNG strips are written.",
          define_extra=lambda: flags.DEFINE_string(
              "attack", attacks.ALL, f"One of {sorted(attacks.ATTACKS)}, a comma-separated "
              f"list of them, or {attacks.ALL!r}."))
