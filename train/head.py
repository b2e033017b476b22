r"""Trains the prediction heads of Table 2 on the frozen encoder's unit features.

  python -m train.head --config configs/default.py --workdir /tmp/fsjax_default
  python -m certify.table2 --config configs/default.py --workdir /tmp/fsjax_default

Paper Appendix A.3 and Table 2; method.md section 3. Two heads per sigma of
``config.certify.sigmas``, both on the unit feature ``f`` of the frozen encoder (the most
boosted GSB variant, "FS+D+M", when ``config.gsb.checkpoint`` is set; else the base
encoder):

* the cosine-prototype head (:class:`heads_lib.CosinePrototypeHead`) that FS certifies,
  with ``prediction.head_dim`` a linear projection first (part of the encoder FS then
  certifies, :func:`fsjax.heads.fs_encoder`), trained with CosFace's margin
  ``prediction.head_margin`` at logit scale ``prediction.head_scale``: the certificate
  needs wide angular margins and noisy features that gather;
* the linear head (:class:`heads_lib.LinearHead`), the base classifier of the RS baseline.

Data: ``config.train_data`` restricted to the first ``config.prediction.num_classes``
class ids, ``train_per_class`` images each. With ``prediction.head_noise`` the heads of
sigma see ``f(x + delta)``, ``delta ~ N(0, sigma^2 I)``, as Cohen et al. train the RS
base classifier at the noise it will be smoothed with; the features of
``prediction.noise_draws`` draws per image are computed once and cached (the encoder is
frozen, so this is exact, and it is where the time goes), then both heads train on the
cache for ``head_steps`` Adam steps of cross-entropy. With ``prediction.zero_shot`` (CLIP)
the prototypes are CLIP's text embeddings of the class names
(:func:`fsjax.clip.text_prototypes`), not trained: zero-shot CLIP is exactly a
cosine-prototype head. The RS linear head still trains.

Writes ``workdir/heads/`` (the format of :mod:`fsjax.heads`) and the sidecar
``workdir/heads.json`` (sigmas, classes, dimensions, settings, training losses);
:func:`load_heads` reads both back for ``certify.table2``. A second run with the same
settings finds the heads and does not retrain; with other settings it refuses to
overwrite them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import certify
from fsjax import batching
from fsjax import checkpointing
from fsjax import cli
from fsjax import encoders as encoders_lib
from fsjax import heads as heads_lib
from fsjax import smoothing
from fsjax import variants as variants_lib
from train import loop

_FEATURE_BATCH = 64  # images per encoder call when caching features (one compilation)
# Settings that must match for stored heads to be reused (and that certify.table2 checks).
_SETTINGS = ("encoder", "sigmas", "classes", "dim", "head_noise", "noise_draws", "margin",
             "scale", "projection_dim",
             "zero_shot", "steps", "learning_rate", "batch_size", "seed", "train_data")


# ----------------------------------------------------------------------------------------
# Features: computed once, cached.
# ----------------------------------------------------------------------------------------


def unit_features(params: Any, images: np.ndarray, *, encoder: encoders_lib.Encoder,
                  sigma: float, key: jax.Array, draws: int, noise: bool,
                  batch_size: int = _FEATURE_BATCH, desc: str | None = None) -> np.ndarray:
  """Unit features ``f(x + delta)`` of ``draws`` noise draws per image (cached for training).

  Draw ``d`` of the images ``[b * batch_size, (b + 1) * batch_size)`` uses the noise
  ``sigma * normal(fold_in(fold_in(key, d), b))``. The encoder always gets ``sigma`` (a
  GSB encoder is conditioned on it); ``noise=False`` gives the clean features (one draw).

  Args:
    params: encoder parameters.
    images: ``[N, H, W, 3]`` in [0, 1].
    encoder: the (frozen) encoder.
    sigma: the smoothing noise level.
    key: PRNG key.
    draws: noise draws per image (>= 1).
    noise: add the noise (else clean features, ``draws`` is taken as 1).
    batch_size: images per encoder call.
    desc: show a progress bar with this description.

  Returns:
    ``[draws * N, D]`` float32, draw-major (row ``d * N + i`` is image ``i``).
  """
  encoders_lib.check_images(images, name="images")
  draws = int(draws) if noise else 1
  if draws < 1:
    raise ValueError(f"config.prediction.noise_draws must be >= 1, got {draws}.")
  scale = jnp.float32(sigma if noise else 0.0)
  starts = range(0, len(images), batch_size)
  out = []
  with tqdm.tqdm(total=draws * len(starts), desc=desc, unit="batch",
                 disable=desc is None) as bar:
    for d in range(draws):
      for b, start in enumerate(starts):
        x = images[start:start + batch_size]
        z = _features(params, jnp.asarray(batching.pad_rows(x, batch_size)),
                      jax.random.fold_in(key, d), b, scale, jnp.float32(sigma),
                      encoder=encoder)
        out.append(np.asarray(z)[:len(x)])
        bar.update(1)
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("encoder",))
def _features(params, x, key, index, scale, sigma, *, encoder):
  # The library's noise protocol: sample ``index`` of stream ``key`` (fsjax.smoothing).
  return encoder(params, x + smoothing.noise(key, index, x.shape, scale), sigma=sigma)


# ----------------------------------------------------------------------------------------
# Heads and their training loop.
# ----------------------------------------------------------------------------------------


def _head_modules(num_classes: int, dim: int, *, scale: float = 16.0,
                  projection_dim: int | None = None) -> dict[str, nn.Module]:
  return {"cosine": heads_lib.CosinePrototypeHead(num_classes, dim, scale=scale,
                                                  projection_dim=projection_dim),
          "linear": heads_lib.LinearHead(num_classes)}


def init_heads(key: jax.Array, *, num_classes: int, dim: int, scale: float = 16.0,
               projection_dim: int | None = None) -> dict[str, Any]:
  """Fresh ``{"cosine": variables, "linear": variables}`` for ``[B, dim]`` features."""
  modules = _head_modules(num_classes, dim, scale=scale, projection_dim=projection_dim)
  z = jnp.zeros((1, dim), jnp.float32)
  return {name: m.init(k, z) for (name, m), k in zip(modules.items(), jax.random.split(key))}


def _losses(heads, z, labels, *, modules, margin: float = 0.0):
  """Mean cross-entropy and accuracy of each head on ``z [B, D]``.

  With ``margin`` m > 0 the cosine head's loss is CosFace's large-margin cosine loss:
  the true class's cosine enters the softmax as ``cos(theta_y) - m``, so training pushes
  the angular gap to the runner-up wider -- what the FS prediction certificate needs
  (Theorem A.3.2: certified iff 2 arccos(gamma) < Delta). Accuracy is of the plain logits.
  """
  out = {}
  for name, variables in heads.items():
    logits = modules[name].apply(variables, z)
    train_logits = logits
    if name == "cosine" and margin:
      train_logits = logits - margin * modules[name].scale * jax.nn.one_hot(
          labels, logits.shape[-1], dtype=logits.dtype)
    out[name] = (optax.softmax_cross_entropy_with_integer_labels(train_logits, labels).mean(),
                 jnp.mean(jnp.argmax(logits, -1) == labels))
  return out


@dataclasses.dataclass(frozen=True)
class HeadLoss:
  """Both heads' summed cross-entropy on a minibatch: ``loss(params, (z, y), _, key)``.

  Step t's minibatch is drawn with replacement from ``fold_in(key, t)`` (train.loop's
  step key). Hashable: one compilation per head shape and setting.
  """

  num_classes: int
  dim: int
  scale: float
  projection_dim: int | None
  margin: float
  batch_size: int

  def __call__(self, params, data, _, step_key):
    z, y = data
    modules = _head_modules(self.num_classes, self.dim, scale=self.scale,
                            projection_dim=self.projection_dim)
    idx = jax.random.randint(step_key, (self.batch_size,), 0, len(z))
    losses = _losses(params, z[idx], y[idx], modules=modules, margin=self.margin)
    return (sum(l for l, _ in losses.values()),
            {f"loss_{name}": l for name, (l, _) in losses.items()})


def train_heads(features: Any, labels: Any, *, num_classes: int, steps: int,
                learning_rate: float, batch_size: int, key: jax.Array,
                prototypes: Any = None, margin: float = 0.0, scale: float = 16.0,
                projection_dim: int | None = None,
                writer: loop.MetricsWriter | None = None, desc: str | None = None,
                **row_fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains the cosine-prototype and linear heads on cached unit features.

  Adam on the mean cross-entropy of minibatches drawn with replacement (step ``t`` draws
  with ``fold_in(key, t)``); both heads in one jitted step (their parameters are
  disjoint, so this is two independent trainings). A NaN or Inf loss stops training.

  Args:
    features: ``[N, D]`` unit features.
    labels: ``[N]`` class ids in ``[0, num_classes)``.
    num_classes: ``K >= 2``.
    steps: optimiser steps (>= 1).
    learning_rate: Adam learning rate.
    batch_size: examples per step (capped at ``N``).
    key: PRNG key (initialisation and minibatches).
    margin: CosFace margin m of the cosine head's loss (0: plain cross-entropy).
    scale: the cosine head's logit scale (:class:`fsjax.heads.CosinePrototypeHead`).
    projection_dim: the cosine head's projection dimension, or None (no projection).
    writer: where to append metrics rows (``row_fields`` go into each row).
    desc: the progress bar's label.
    prototypes: ``[K, D]`` fixed unit prototypes (CLIP zero-shot); then the cosine head is
      not trained, its ``prototypes`` parameter is these.

  Returns:
    ``(heads, history)``: ``heads = {"cosine": variables, "linear": variables}``;
    ``history`` has, per head, the full-data ``loss_initial``, ``loss_final`` and
    ``accuracy_final``, plus ``steps`` and whether the prototypes were ``trained``.
  """
  num_classes = heads_lib.check_num_classes(num_classes)
  z = np.asarray(features, np.float32)
  if z.ndim != 2:
    raise ValueError(f"features must have shape [N, D], got shape {z.shape}.")
  labels = heads_lib.check_labels(labels, num_classes)
  if len(labels) != len(z):
    raise ValueError(f"features ({len(z)}) and labels ({len(labels)}) must have the same N.")
  if not len(z):
    raise ValueError("features must hold at least one example.")
  if not np.all(np.isfinite(z)):
    raise ValueError("features contain NaN or Inf.")
  if int(steps) != steps or steps < 1:
    raise ValueError(f"config.prediction.head_steps must be an integer >= 1, got {steps}.")
  if not learning_rate > 0:
    raise ValueError(f"config.prediction.head_learning_rate must be > 0, got {learning_rate}.")
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"config.prediction.head_batch_size must be an integer >= 1, got "
                     f"{batch_size}.")
  dim = z.shape[1]
  if projection_dim is not None and (int(projection_dim) != projection_dim
                                     or projection_dim < 2):
    raise ValueError(f"config.prediction.head_dim must be an integer >= 2 or None, got "
                     f"{projection_dim!r}.")
  if not scale > 0:
    raise ValueError(f"config.prediction.head_scale must be > 0, got {scale}.")
  modules = _head_modules(num_classes, dim, scale=scale, projection_dim=projection_dim)
  k_init, k_data = jax.random.split(key)
  heads = init_heads(k_init, num_classes=num_classes, dim=dim, scale=scale,
                     projection_dim=projection_dim)
  fixed = {}
  if prototypes is not None:
    if projection_dim is not None:
      raise ValueError("fixed (zero-shot) prototypes live in the encoder's feature space: "
                       "set config.prediction.head_dim=None with zero_shot=True.")
    certify.check_prototypes(prototypes, dim)
    fixed["cosine"] = {"params": {"prototypes": jnp.asarray(prototypes, jnp.float32)}}
    del heads["cosine"]
  optimizer = loop.Optimizer.of(optax.adam, learning_rate=float(learning_rate))
  state = loop.init_state(heads, optimizer)
  z, y = jnp.asarray(z), jnp.asarray(labels)
  batch_size = min(int(batch_size), len(z))
  loss = HeadLoss(num_classes=num_classes, dim=dim, scale=float(scale),
                  projection_dim=projection_dim, margin=float(margin),
                  batch_size=batch_size)
  evaluate = jax.jit(lambda heads: _losses(heads, z, y, modules=modules))
  initial = evaluate({**state["params"], **fixed})
  # The data is the step's "frozen" argument; each step draws its own minibatch.
  state = loop.run(what="head training", desc=desc or "heads", state=state,
                   total=int(steps), batches=itertools.repeat(None), frozen=(z, y),
                   key=k_data, loss=loss, optimizer=optimizer, examples=batch_size,
                   fix="Lower config.prediction.head_learning_rate.", writer=writer,
                   fields=lambda step: row_fields, stop_on_interrupt=False)
  heads = {**state["params"], **fixed}
  final = evaluate(heads)
  history = {"steps": int(steps), "prototypes_trained": prototypes is None}
  for name in ("cosine", "linear"):
    history[name] = {"loss_initial": float(initial[name][0]),
                     "loss_final": float(final[name][0]),
                     "accuracy_final": float(final[name][1])}
  return {"cosine": heads["cosine"], "linear": heads["linear"]}, history


# ----------------------------------------------------------------------------------------
# Zero-shot prototypes (CLIP).
# ----------------------------------------------------------------------------------------


def zero_shot_prototypes(config, encoder: encoders_lib.Encoder, params: Any,
                         class_names: Sequence[str]) -> jax.Array:
  """CLIP's text embeddings of "a photo of a {class name}." as unit prototypes ``[K, D]``."""
  from fsjax import clip  # pylint: disable=g-import-not-at-top
  from fsjax import gsb  # pylint: disable=g-import-not-at-top
  if isinstance(encoder, gsb.BoostedEncoder):  # the text tower is the base CLIP's
    encoder, params = encoder.base, params["encoder"]
  if not isinstance(encoder, clip.ClipEncoder) or encoder.feature != "pooled":
    raise ValueError("config.prediction.zero_shot=True needs a CLIP encoder "
                     "(config.encoder.name='clip') with feature='pooled': text prototypes "
                     "live in the projected image-text space.")
  if not config.encoder.get("checkpoint"):
    raise ValueError("config.prediction.zero_shot=True needs config.encoder.checkpoint (a "
                     "local CLIP checkpoint with its text tower and tokenizer files).")
  return clip.text_prototypes(encoder.model, params, config.encoder.checkpoint, class_names)


# ----------------------------------------------------------------------------------------
# Checkpoint + sidecar.
# ----------------------------------------------------------------------------------------


def _settings(config, encoder_name: str, dim: int) -> dict[str, Any]:
  p = config.prediction
  k = heads_lib.check_num_classes(p.num_classes)
  td = config.train_data
  return {
      "encoder": encoder_name,
      "sigmas": [float(s) for s in config.certify.sigmas],
      "classes": list(range(k)),
      "dim": int(dim),
      "head_noise": bool(p.head_noise),
      "noise_draws": int(p.noise_draws) if p.head_noise else 1,
      "zero_shot": bool(p.zero_shot),
      "steps": int(p.head_steps),
      "learning_rate": float(p.head_learning_rate),
      "batch_size": int(p.head_batch_size),
      "margin": float(p.get("head_margin", 0.0)),
      "scale": float(p.get("head_scale", 16.0)),
      "projection_dim": None if p.get("head_dim") is None else int(p.head_dim),
      "seed": int(config.seed),
      "train_data": {"name": td.name, "split": td.split, "image_size": int(td.image_size),
                     "seed": int(td.get("seed") or 0), "per_class": int(p.train_per_class)},
  }


# ----------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------


def train(config, workdir: str) -> tuple[dict[str, Any], dict[float, dict]]:
  """Trains (or finds) the heads of every sigma; writes ``heads/`` and ``heads.json``.

  Returns:
    ``(meta, heads)`` as :func:`load_heads` returns them.
  """
  with checkpointing.lock_workdir(workdir, "train.head"):  # one writer per workdir
    return _train(config, workdir)


def _train(config, workdir: str) -> tuple[dict[str, Any], dict[float, dict]]:
  p = config.prediction
  num_classes = heads_lib.check_num_classes(p.num_classes)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  name, encoder, params = variants_lib.most_boosted(config)
  images, labels, class_names = heads_lib.load_subset(config.train_data, num_classes=num_classes,
                                            per_class=p.train_per_class)
  x = jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32)
  dim = jax.eval_shape(lambda x: encoder(params, x, sigma=1.0), x).shape[-1]
  settings = _settings(config, name, dim)
  sidecar = workdir / heads_lib.SIDECAR
  trained, history = [], {}
  if sidecar.is_file() or (workdir / heads_lib.HEADS_DIR).exists():
    old = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    same = {k: old.get(k) for k in _SETTINGS if k != "sigmas"} == {
        k: v for k, v in settings.items() if k != "sigmas"}
    done = old.get("sigmas") or []
    if same and done == settings["sigmas"]:
      print(f"train.head: heads with these settings are already in {workdir}; not "
            "retraining.")
      return heads_lib.load_heads(workdir)
    if not (same and done == settings["sigmas"][:len(done)] and not old.get("complete", True)):
      raise ValueError(f"{workdir} already holds heads trained with other settings: delete "
                       f"{workdir / heads_lib.HEADS_DIR} and {sidecar}, or use another workdir.")
    _, stored = heads_lib.load_heads(workdir)  # an interrupted run: keep its sigmas
    trained, history = [stored[float(s)] for s in done], dict(old["history"])
    print(f"train.head: resuming {workdir}: heads of sigma {done} are done.")
  prototypes = (zero_shot_prototypes(config, encoder, params, class_names)
                if p.zero_shot else None)
  key = jax.random.PRNGKey(config.seed)
  writer = loop.MetricsWriter(str(workdir), every=max(settings["steps"] // 10, 1))
  meta = {**settings, "num_classes": num_classes, "class_names": class_names,
          "train_images": int(len(images))}
  with loop.interruptible() as interrupted:
    for sigma in settings["sigmas"][len(trained):]:
      if interrupted():  # e.g. pressed while the data and encoder loaded
        raise loop.Interrupted("train.head", len(trained), unit="sigma number")
      # The same fold-in as certify.run: one key per sigma, whatever the list of sigmas.
      k_sigma = smoothing.sigma_key(key, sigma)
      k_feat, k_train = jax.random.split(k_sigma)
      z = unit_features(params, images, encoder=encoder, sigma=sigma, key=k_feat,
                        draws=settings["noise_draws"], noise=settings["head_noise"],
                        desc=f"features sigma={sigma:g}")
      y = np.tile(labels, len(z) // len(labels))  # draw-major, as unit_features stacks them
      heads, hist = train_heads(z, y, num_classes=num_classes, steps=settings["steps"],
                                learning_rate=settings["learning_rate"],
                                batch_size=settings["batch_size"], key=k_train,
                                margin=settings["margin"], scale=settings["scale"],
                                projection_dim=settings["projection_dim"],
                                prototypes=prototypes, writer=writer,
                                desc=f"heads sigma={sigma:g}", sigma=sigma)
      trained.append(heads)
      history[str(sigma)] = hist
      logging.info("sigma %g: %s", sigma, hist)
      done = settings["sigmas"][:len(trained)]
      complete = len(trained) == len(settings["sigmas"])
      # Saved after every sigma: an interrupted run resumes at the next one.
      # (The checkpoint's step counts the sigmas done.)
      heads_lib.save_heads(workdir, {**meta, "sigmas": done, "step": len(trained),
                                     "complete": complete, "history": history}, trained)
      if interrupted() and not complete:
        raise loop.Interrupted("train.head", len(trained), unit="sigma number")
  meta = {**meta, "step": len(trained), "complete": True, "history": history}
  return meta, dict(zip(settings["sigmas"], trained))


def summary(meta: dict[str, Any], workdir: str) -> str:
  """One line per sigma (the heads' accuracy and loss on their training features) and
  where the heads are."""
  lines = ["train.head: done."]
  for sigma, h in meta["history"].items():
    lines.append(f"  sigma {float(sigma):g}: " + "; ".join(
        f"{name} accuracy {h[name]['accuracy_final']:.3f} (loss "
        f"{h[name]['loss_initial']:.3g} -> {h[name]['loss_final']:.3g})"
        for name in ("cosine", "linear")))
  lines.append(f"heads saved to {pathlib.Path(workdir) / heads_lib.HEADS_DIR} and "
               f"{pathlib.Path(workdir) / heads_lib.SIDECAR}")
  return "\n".join(lines)


def main(config, workdir: str) -> None:
  meta, _ = train(config, workdir)  # Ctrl-C: cli.run prints the saved sigmas, exit 130
  print(summary(meta, workdir))


if __name__ == "__main__":
  cli.run(main, workdir_help="Where the heads are saved (heads/, heads.json).")
