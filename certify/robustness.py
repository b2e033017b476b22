r"""The paper's Table 4 for classification: FCS, ACC and ASR under targeted attacks.

  python -m certify.robustness --config configs/default.py --attack foa --workdir DIR

``--attack`` is one of ``pgd``, ``attackvlm``, ``mattack``, ``foa`` (fsjax.attacks), a
comma-separated list of them, or ``all``. Rows (models):

* ``original``: the unsmoothed base encoder f.
* ``smoothed + GSB (FS+D+M)`` when ``config.gsb.checkpoint`` is set (the fullest GSB
  variant of ``fsjax.variants.encoder_variants``), else ``smoothed`` (FS alone): the
  smoothed encoder, evaluated as the Monte Carlo mean ``mean_i f(x + delta_i)`` of
  ``config.attack.n`` samples and attacked white-box: every attack averages
  ``config.attack.eot_samples`` fresh noise draws per step (EOT) and differentiates
  through the denoiser and mapper.
* one row per encoder sub-config in ``config.attack.extra_encoders`` (each with a
  ``label``, e.g. FARE or TeCoA CLIP checkpoints), plus its smoothed row (FS alone)
  when ``config.attack.smooth_extra``.

Columns per attack (Section 5.2, "Evaluation metrics"):

* ``FCS``: cosine between the evaluated model's features of the clean and of the
  adversarial image (for a smoothed model both are its Monte Carlo smoothed features,
  with independent noise, so even a clean pair scores slightly below 1).
* ``ACC``: fraction of adversarial images the classifier assigns their true class.
* ``ASR``: fraction assigned the attacker's target class.
``clean ACC`` is the classifier's accuracy on the clean images.

The task mirrors the paper's (Appendix, "Image classification"): the classifier knows
the K classes ``config.attack.classes`` (None: all of the dataset's); one of them,
``config.attack.target_class`` (a class id, or negative: counted from the end of the
list; default the last), is held out as the attacker's target (the paper's class 10,
"shark"); attacked images come from the other classes, and image i is pushed towards
target image i, the i-th image of the target class in the same split (deterministic:
the data's seeded order). Every attack is targeted; ``pgd`` is fsjax's targeted feature
PGD (cosine to the target's feature, l_inf, random start).

Classifier: a cosine-prototype head on the evaluated model's features, prediction
``argmax_k <z, w_k>`` (method.md section 3). ``config.attack.head``:

* ``"zero_shot"``: CLIP zero-shot, w_k the text embeddings of the class-name prompts
  (needs a CLIP checkpoint with a text tower and tokenizer, ``pooled`` features); the
  same prototypes serve the encoder's unsmoothed and smoothed rows, as the paper's
  MLLM is the same with or without FS.
* ``"class_mean"``: w_k = the normalised mean feature of
  ``config.attack.prototypes_per_class`` clean images of class k from
  ``config.attack.prototype_split`` of the same dataset (the train split by default,
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

import dataclasses
import functools
import numbers
import pathlib
from typing import Any, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from certify import report
from fsjax import attacks
from fsjax import batching
from fsjax import checks
from fsjax import cli
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib
from fsjax import smoothing
from fsjax import variants as variants_lib
from fsjax.attacks import _common

ALL = "all"
HEADS = ("auto", "class_mean", "zero_shot")


@dataclasses.dataclass(frozen=True)
class Model:
  """One row of the table: an encoder, evaluated and attacked smoothed or not."""
  label: str
  encoder: encoders_lib.Encoder
  params: Any
  smoothed: bool
  # The unsmoothed CLIP (model, params, checkpoint) whose text tower gives zero-shot
  # prototypes, or None.
  text_source: Any = None


def attack_names(attack: str) -> list[str]:
  """``"all"`` -> every registered attack; ``"pgd,foa"`` -> those, if all are known."""
  if attack == ALL:
    return list(attacks.ATTACKS)
  names = [a.strip() for a in str(attack).split(",")]
  unknown = [a for a in names if a not in attacks.ATTACKS]
  if unknown or not names:
    raise ValueError(f"--attack={attack!r}: {unknown} not known; use one of "
                     f"{sorted(attacks.ATTACKS)}, a comma-separated list of them, or {ALL!r}.")
  return list(dict.fromkeys(names))


def _as_dict(d) -> dict:
  return d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d)


def check_attack_config(c) -> None:
  """Validates ``config.attack`` before anything is built; errors name the key."""
  _common.check_budget(budget=c.linf_budget, step_size=c.step_size, steps=c.steps,
                       norm="linf")
  for key, minimum in (("n", 1), ("eot_samples", 0), ("num_images", 1),
                       ("prototypes_per_class", 1), ("batch_size", 1), ("examples", 0)):
    checks.check_positive_int(c[key], name=f"config.attack.{key}", minimum=minimum)
  checks.check_sigma(c.sigma, name="config.attack.sigma")
  checks.check_choice(c.head, name="config.attack.head", choices=HEADS)
  if not isinstance(c.target_class, numbers.Integral):
    raise ValueError(f"config.attack.target_class={c.target_class!r} must be a class id "
                     "(negative counts from the end: -1 is the last class).")
  for i, e in enumerate(c.extra_encoders):
    if not e.get("label") or not e.get("name"):
      raise ValueError(f"config.attack.extra_encoders[{i}] needs a 'label' (the row name) "
                       "and an encoder 'name' (plus the other config.encoder keys).")


# ---------------------------------------------------------------------------------------
# Models, data, classifier heads.
# ---------------------------------------------------------------------------------------


def _text_source(encoder, params, encoder_config):
  """``(clip_model, params, checkpoint)`` if zero-shot prototypes are possible, else None."""
  from fsjax import clip  # pylint: disable=g-import-not-at-top
  checkpoint = encoder_config.get("checkpoint")
  if (isinstance(encoder, clip.ClipEncoder) and encoder.feature == "pooled" and checkpoint
      and encoder.model.config.text_config is not None):
    return encoder.model, params, checkpoint
  return None


def build_models(config) -> list[Model]:
  """The table's rows, in order (see the module docstring)."""
  c = config.attack
  variants = variants_lib.encoder_variants(config)
  _, base, base_params = variants[0]
  text = _text_source(base, base_params, config.encoder)
  models = [Model("original", base, base_params, False, text)]
  if len(variants) > 1:
    names = [v[0] for v in variants]
    name, encoder, params = variants[names.index("FS+D+M") if "FS+D+M" in names else -1]
    models.append(Model(f"smoothed + GSB ({name})", encoder, params, True, text))
  else:
    models.append(Model("smoothed", base, base_params, True, text))
  for e in c.extra_encoders:
    e = _as_dict(e)
    label = e.pop("label")
    encoder, params = encoders_lib.build(ml_collections.ConfigDict(e))
    text = _text_source(encoder, params, e)
    models.append(Model(label, encoder, params, False, text))
    if c.smooth_extra:
      models.append(Model(f"{label} + smoothed", encoder, params, True, text))
  return models


def _load(spec: dict, **overrides) -> tuple[np.ndarray, np.ndarray, list[str]]:
  spec = dict(spec, **overrides)
  dataset = data_lib.from_config(spec)
  batches = list(dataset)
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]), dataset.class_names)


def attack_data(config) -> dict[str, Any]:
  """Attacked images (not of the target class), their targets, and prototype images."""
  c = config.attack
  spec = c.get("data") or config.get("test_data")
  if spec is None:
    raise ValueError("certify.robustness needs a labelled dataset: set config.test_data or "
                     "config.attack.data (e.g. fashion_mnist).")
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
    raise ValueError(f"config.attack.classes={c.classes!r} must be >= 2 distinct class ids "
                     f"of {spec['name']} (0 .. {k - 1}), or None for all classes.")
  if c.target_class < 0:
    if c.target_class < -len(classes):
      raise ValueError(f"config.attack.target_class={c.target_class} is out of range for "
                       f"the {len(classes)} classes of the classifier.")
    target_class = classes[c.target_class]
  elif c.target_class in classes:
    target_class = int(c.target_class)
  else:
    raise ValueError(f"config.attack.target_class={c.target_class} is not one of the "
                     f"classifier's classes ({spec['name']} has {k}; config.attack.classes="
                     f"{c.get('classes')}).")
  others = [i for i in classes if i != target_class]
  x, y, _ = _load(spec, classes=others, num_examples=c.num_images)
  t, _, _ = _load(spec, classes=[target_class], num_examples=c.num_images)
  if len(t) < len(x):
    raise ValueError(f"{spec['name']} split {spec['split']!r} has only {len(t)} images of "
                     f"the target class {target_class}; lower config.attack.num_images.")
  return {"images": x, "labels": y, "targets": t, "target_class": target_class,
          "classes": classes, "class_names": list(class_names), "spec": spec}


@jax.jit
def _cosine(a, b):
  return _common.cosine(a, b)


def features(model: Model, x: np.ndarray, c, key: jax.Array) -> np.ndarray:
  """``[N, D]`` features of the model: f(x), or mean_i f(x + delta_i) when smoothed."""
  out = []
  bs = int(c.batch_size)
  for sl in batching.batch_slices(x.shape[0], bs):
    start, stop = sl.start, sl.stop
    xb = batching.pad_rows(x[sl], bs)  # one shape per model: one compilation
    if model.smoothed:
      z = smoothing.smoothed_features(model.params, xb, encoder=model.encoder, sigma=c.sigma,
                                      n=c.n, key=jax.random.fold_in(key, start),
                                      chunk_size=c.n)
    else:
      z = _base_features(model.params, jnp.asarray(xb, jnp.float32), encoder=model.encoder)
    out.append(np.asarray(z)[:stop - start])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("encoder",))
def _base_features(params, x, *, encoder):
  return encoder(params, x)


@jax.jit
def _predict(z, prototypes):
  # Cosine-prototype head: argmax_k <z, w_k>; the norm of z does not change the argmax.
  return jnp.argmax(z @ prototypes.T, axis=-1)


def head(model: Model, data: dict, config, key: jax.Array,
         cache: dict) -> tuple[str, np.ndarray]:
  """``(kind, [K, D] unit prototypes)`` of the model's classifier (module docstring)."""
  c = config.attack
  if c.head in ("auto", "zero_shot") and model.text_source is not None:
    src = model.text_source
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
                        model.label, e)
        cache[id(src[0])] = None
    if cache[id(src[0])] is not None:
      return "zero_shot", cache[id(src[0])]
  if c.head == "zero_shot":
    raise ValueError(f"config.attack.head='zero_shot' but {model.label!r} is not a CLIP "
                     "checkpoint with a text tower and pooled features; use 'class_mean' or "
                     "'auto'.")
  if "prototype_images" not in cache:
    spec = dict(data["spec"], split=c.prototype_split)
    cache["prototype_images"] = _load(spec, classes=data["classes"],
                                      per_class=c.prototypes_per_class)[:2]
  x, y = cache["prototype_images"]
  z = features(model, x, c, key)
  w = np.stack([z[y == i].mean(0) for i in data["classes"]])
  return "class_mean", np.asarray(encoders_lib.normalise(jnp.asarray(w)))


# ---------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------


def attack_model(model: Model, name: str, x: np.ndarray, targets: np.ndarray, c,
                 key: jax.Array) -> np.ndarray:
  """Adversarial images for ``model`` under attack ``name``, batch by batch."""
  out = []
  bs = int(c.batch_size)
  for sl in batching.batch_slices(x.shape[0], bs):
    kwargs = dict(budget=c.linf_budget, step_size=c.step_size, steps=c.steps,
                  key=jax.random.fold_in(key, sl.start))
    if model.smoothed:  # white-box through the smoothing: EOT over its noise
      kwargs.update(sigma=c.sigma, eot_samples=c.eot_samples)
    kwargs.update(_as_dict((c.get("options") or {}).get(name) or {}))
    adv = attacks.run(name, model.params, batching.pad_rows(x[sl], bs),
                      batching.pad_rows(targets[sl], bs), encoder=model.encoder, **kwargs)
    out.append(np.asarray(adv)[:sl.stop - sl.start])
  return np.concatenate(out)


def run(config, workdir: str, attack: str = ALL) -> list[dict]:
  """Runs the attacks on every model; writes the files; returns the table rows."""
  names = attack_names(attack)
  c = config.attack
  check_attack_config(c)
  workdir = pathlib.Path(workdir)
  report.save_config(config, workdir, "robustness_config.json")
  models = build_models(config)
  data = attack_data(config)
  x, y, t = data["images"], data["labels"], data["targets"]
  tc, classes = data["target_class"], np.asarray(data["classes"])
  key = jax.random.PRNGKey(config.seed)
  cache, table, examples = {}, [], {n: {} for n in names}
  with report.rows(workdir / "robustness.jsonl") as write:
    for m, model in enumerate(models):
      mk = jax.random.fold_in(key, m)
      kind, prototypes = head(model, data, config, jax.random.fold_in(mk, 0), cache)
      z_clean = features(model, x, c, jax.random.fold_in(mk, 1))
      # Prototype k is class classes[k]: predictions are dataset class ids.
      pred_clean = classes[np.asarray(_predict(jnp.asarray(z_clean), jnp.asarray(prototypes)))]
      row = {"variant": model.label, "head": kind,
             "clean ACC": float(attacks.accuracy(pred_clean, y))}
      for a, name in enumerate(tqdm.tqdm(names, desc=model.label, unit="attack")):
        # The same attack noise/crops for every model: fold in the attack, not the model.
        adv = attack_model(model, name, x, t, c, jax.random.fold_in(key, 1000 + a))
        z_adv = features(model, adv, c, jax.random.fold_in(mk, 2 + a))
        pred = classes[np.asarray(_predict(jnp.asarray(z_adv), jnp.asarray(prototypes)))]
        fcs = np.asarray(_cosine(jnp.asarray(z_adv), jnp.asarray(z_clean)))
        row[f"{name} FCS"] = float(fcs.mean())
        row[f"{name} ACC"] = float(attacks.accuracy(pred, y))
        row[f"{name} ASR"] = float(attacks.attack_success_rate(pred, tc))
        linf = np.abs(adv - x).reshape(len(x), -1).max(-1)
        for i in range(len(x)):
          write({
              "variant": model.label, "attack": name, "image": i, "label": int(y[i]),
              "target_label": tc, "pred_clean": int(pred_clean[i]), "pred_adv": int(pred[i]),
              "fcs": float(fcs[i]), "linf": float(linf[i])})
        examples[name][model.label] = (adv[:c.examples], pred[:c.examples])
      table.append(row)
  caption = (f"Table 4 (classification) on {data['spec']['name']} "
             f"{data['spec']['split']}: {len(x)} images, target class {tc} "
             f"({data['class_names'][tc]!r}); l_inf budget {c.linf_budget:.4f} "
             f"({c.linf_budget * 255:g}/255), {c.steps} steps of {c.step_size * 255:g}/255; "
             f"smoothed rows: sigma = {c.sigma:g}, n = {c.n} Monte Carlo samples, "
             f"{c.eot_samples} EOT draws per attack step. ACC and ASR are fractions.")
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


def main(config, workdir: str, attack: str = ALL) -> None:
  run(config, workdir, attack)


if __name__ == "__main__":
  cli.run(main, workdir_help="Where the table, per-image rows and PNG strips are written.",
          define_extra=lambda: flags.DEFINE_string(
              "attack", ALL, f"One of {sorted(attacks.ATTACKS)}, a comma-separated list of "
              f"them, or {ALL!r}."))
