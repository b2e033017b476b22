"""The prediction heads of Table 2: the modules, their data, and their format on disk.

``python -m train.head`` trains, per sigma, a cosine-prototype head (certified by FS,
:func:`certify.certify_prediction`) and a linear head (the RS base classifier,
:func:`certify.rs_certify`) on the unit features of the frozen encoder, and stores them
here; ``python -m certify.table2`` reads them back. The format, known only to this module:

* ``WORKDIR/heads/<step>/``: an orbax checkpoint of ``{"heads": [per sigma
  {"cosine": variables, "linear": variables}]}``;
* ``WORKDIR/heads.json``: the sidecar saying what the checkpoint holds (sigmas, classes,
  class names, feature dimension, encoder variant, training settings and history).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import checkpointing
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib

HEADS_DIR = "heads"  # orbax checkpoints, workdir/heads/<step>
SIDECAR = "heads.json"  # what the checkpoint holds, in words



class CosinePrototypeHead(nn.Module):
  """Cosine-prototype classifier (Eq. A.38): ``logits_k = scale * <z/||z||, w_k/||w_k||>``.

  Parameters: ``prototypes`` ``[K, D]``, stored unnormalised (initialised from a standard
  normal, i.e. uniform directions) and normalised on use, so gradient steps never leave
  the sphere. Initialise them from CLIP text embeddings of class prompts to get
  zero-shot CLIP. Certify it with ``certify.certify_prediction(..., head=variables)``
  (:func:`fs_classifier`).

  With ``projection_dim`` d, a linear map ``projection`` ``[D, d]`` (no bias) comes first:
  ``z -> P^T (z / ||z||)``, then the prototypes ``[K, d]``. The FS certificate then smooths
  the projected encoder (:class:`ProjectedEncoder`, :func:`fs_encoder`): the projection is
  part of the encoder FS certifies, which lets the head choose a low-dimensional space
  where the classes are far apart in angle and the noisy features gather -- what the
  certificate needs (Theorem A.3.2: certified iff ``2 arccos(gamma) < Delta``). An
  encoder's raw features, e.g. a CNN's non-negative pooled ones, can sit in a narrow cone
  where no prototypes have the margin.

  ``scale`` is a fixed temperature (default 16, as in NormFace/CosFace-style training):
  cosines live in [-1, 1], and without a scale the softmax stays too flat for
  cross-entropy to separate classes; a learnable scale tends to grow without bound
  instead. It changes neither the argmax nor the certificate.

  Attributes:
    num_classes: ``K``.
    dim: feature dimension ``D``.
    scale: logit scale.
    projection_dim: ``d``, or None for prototypes on the feature itself (CLIP zero-shot).
  """
  num_classes: int
  dim: int
  scale: float = 16.0
  projection_dim: int | None = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """``[B, D]`` features -> ``[B, K]`` logits."""
    if z.shape[-1] != self.dim:
      raise ValueError(f"CosinePrototypeHead expects features of dimension {self.dim}, got "
                       f"{z.shape[-1]}.")
    if self.projection_dim is not None:
      kernel = self.param("projection", nn.initializers.lecun_normal(),
                          (self.dim, self.projection_dim), jnp.float32)
      z = project(encoders_lib.normalise(z), kernel)
    w = self.param("prototypes", nn.initializers.normal(stddev=1.0),
                   (self.num_classes, z.shape[-1]), jnp.float32)
    return self.scale * jnp.matmul(encoders_lib.normalise(z), encoders_lib.normalise(w).T,
                                   precision=jax.lax.Precision.HIGHEST)


def project(z: jax.Array, kernel: jax.Array) -> jax.Array:
  """``z @ kernel`` at HIGHEST precision: the head and the certified encoder agree exactly."""
  return jnp.matmul(z, jnp.asarray(kernel, jnp.float32), precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectedEncoder(encoders_lib.Encoder):
  """A base encoder followed by a head's linear projection: ``x -> P^T f(x)`` (one token).

  ``params`` is ``{"encoder": base_params, "projection": P [D, d]}``; :func:`fs_encoder`
  builds both from a trained :class:`CosinePrototypeHead`. Deterministic and fixed, so
  FS's certificates hold for it unchanged (docs/method.md section 2).
  """

  base: encoders_lib.Encoder
  resolution: int = dataclasses.field(init=False)

  def __post_init__(self):
    object.__setattr__(self, "resolution", self.base.resolution)

  def tokens(self, params, x, *, sigma=None):
    return project(self.base(params["encoder"], x, sigma=sigma), params["projection"])[:, None]


@functools.cache
def _projected(base: encoders_lib.Encoder) -> ProjectedEncoder:
  # One wrapper per base encoder: jit caches by the encoder's identity.
  return ProjectedEncoder(base)


def fs_encoder(encoder: encoders_lib.Encoder, params: Any, cosine_head: Any
               ) -> tuple[encoders_lib.Encoder, Any]:
  """The ``(encoder, params)`` FS certifies for a cosine head: projected when it projects."""
  head = cosine_head.get("params", cosine_head)
  if "projection" not in head:
    return encoder, params
  return _projected(encoder), {"encoder": params, "projection": head["projection"]}


def fs_classifier(encoder: encoders_lib.Encoder, params: Any, cosine_head: Any
                  ) -> tuple[encoders_lib.Encoder, Any, jax.Array]:
  """``(encoder, params, prototypes)`` FS certifies for a cosine head: the classifier it is.

  With a projection, the encoder is :func:`fs_encoder`'s ``P^T f`` and the prototypes
  live in its space; without one, the encoder itself and the head's unit prototypes.
  The one way from a head to what ``certify.certify_prediction(..., head=...)`` smooths,
  so prototypes of a projected head are never paired with the base encoder.
  """
  encoder, params = fs_encoder(encoder, params, cosine_head)
  head = cosine_head.get("params", cosine_head)
  return encoder, params, encoders_lib.normalise(jnp.asarray(head["prototypes"], jnp.float32))


def unit_prototypes(params: Any) -> jax.Array:
  """The unit prototypes ``w_k`` ``[K, D]`` of a :class:`CosinePrototypeHead` without projection.

  A projected head's prototypes score ``P^T f``, not the feature ``f``: certified against
  the base encoder they would certify another classifier (silently, when the projection
  is square), so they are refused here; certify such a head with
  ``certify.certify_prediction(..., head=variables)`` (:func:`fs_classifier`).

  Args:
    params: the head's parameters, ``head.init(...)["params"]`` (the whole variables
      dict ``{"params": ...}`` is accepted too).
  """
  if "params" in params:
    params = params["params"]
  if "projection" in params:
    raise ValueError("this cosine head projects the feature before its prototypes (it has "
                     "a 'projection'), so its prototypes do not classify the encoder's "
                     "feature: pass the head itself, certify.certify_prediction(..., "
                     "head=variables), or use fsjax.heads.fs_classifier(encoder, params, "
                     "variables) for the (encoder, params, prototypes) it certifies.")
  return encoders_lib.normalise(jnp.asarray(params["prototypes"], jnp.float32))


class LinearHead(nn.Module):
  """Linear classifier on the unit feature: the RS base classifier's head (Table 2).

  ``logits = Dense(K)(z / ||z||)``. The normalisation is a no-op on the encoder's unit
  features; it makes the head, like the cosine head, a function of the direction only.

  Attributes:
    num_classes: ``K``.
  """
  num_classes: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """``[B, D]`` features -> ``[B, K]`` logits."""
    return nn.Dense(self.num_classes, name="dense")(encoders_lib.normalise(z))


def check_num_classes(num_classes: Any) -> int:
  """``num_classes`` as an int, or ValueError: a prediction needs ``K >= 2`` classes."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise ValueError(f"config.prediction.num_classes must be an integer >= 2, got "
                     f"{num_classes!r}.")
  if num_classes < 2:
    raise ValueError(f"config.prediction.num_classes must be >= 2 (a certified prediction "
                     f"needs a runner-up class), got {num_classes}.")
  return int(num_classes)


def check_labels(labels: Any, num_classes: int, *, name: str = "labels") -> np.ndarray:
  """``labels`` as int32 ``[N]``, or ValueError unless every label is in ``[0, K)``."""
  lab = np.asarray(labels)
  if lab.ndim != 1:
    raise ValueError(f"{name} must have shape [N], got shape {lab.shape}.")
  if lab.size and not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"{name} must be integer class ids, got dtype {lab.dtype}.")
  if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), got range "
                     f"[{lab.min()}, {lab.max()}]; restrict the data to the first "
                     "num_classes classes (classes=range(num_classes)).")
  return lab.astype(np.int32)


def load_subset(data_config: Mapping[str, Any], *, num_classes: int,
                per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The first ``num_classes`` class ids of a dataset, ``per_class`` images each.

  ``num_examples`` of ``data_config`` is ignored (it sizes GSB's training set).

  Args:
    data_config: ``config.train_data`` or ``config.test_data``.
    num_classes: ``K``; class ids ``0 .. K-1`` are kept.
    per_class: images per class.

  Returns:
    ``(images [K * per_class, S, S, 3] float32 in [0, 1], labels [K * per_class] int32,
    class_names [K])``, in the dataset's seeded order.
  """
  num_classes = check_num_classes(num_classes)
  kwargs = dict(data_config.items())
  kwargs.pop("num_examples", None)
  kwargs.update(classes=list(range(num_classes)), per_class=int(per_class))
  name = kwargs.get("name")
  try:
    dataset = data_lib.from_config(kwargs)
  except ValueError as e:
    if "out of range" in str(e):
      raise ValueError(f"config.prediction.num_classes={num_classes} exceeds the classes of "
                       f"dataset {name!r}: {e}") from e
    raise
  batches = list(dataset)
  images = np.concatenate([b["image"] for b in batches])
  labels = check_labels(np.concatenate([b["label"] for b in batches]), num_classes)
  return images, labels, list(dataset.class_names[:num_classes])


def _abstract_heads(meta: Mapping[str, Any]) -> dict[str, Any]:
  """Zero heads with the structure, shapes and dtypes of the stored ones."""
  k, d = len(meta["classes"]), int(meta["dim"])
  projection_dim = meta.get("projection_dim")
  cosine = {"prototypes": np.zeros((k, projection_dim or d), np.float32)}
  if projection_dim:
    cosine["projection"] = np.zeros((d, projection_dim), np.float32)
  one = {"cosine": {"params": cosine},
         "linear": {"params": {"dense": {"kernel": np.zeros((d, k), np.float32),
                                         "bias": np.zeros((k,), np.float32)}}}}
  return {"heads": [one for _ in meta["sigmas"]]}


def save_heads(workdir: str | os.PathLike, meta: Mapping[str, Any], heads: list[Any]) -> None:
  """Writes ``heads`` (one ``{"cosine", "linear"}`` per sigma of ``meta["sigmas"]``) + sidecar.

  ``meta`` must hold at least ``sigmas``, ``classes``, ``dim`` and ``step``; it is written
  as ``heads.json`` after the checkpoint, so a sidecar always describes a whole checkpoint.
  """
  workdir = pathlib.Path(workdir)
  mngr = checkpointing.manager(str(workdir), HEADS_DIR)
  try:
    checkpointing.save(mngr, int(meta["step"]), {"heads": list(heads)}, force=True)
  finally:
    checkpointing.close(mngr)
  (workdir / SIDECAR).write_text(json.dumps(dict(meta), indent=2) + "\n")


def load_heads(workdir: str | os.PathLike) -> tuple[dict[str, Any], dict[float, dict]]:
  """The heads :func:`train` stored in ``workdir``.

  Returns:
    ``(meta, heads)``: ``meta`` is the ``heads.json`` sidecar (``sigmas``, ``classes``,
    ``class_names``, ``dim``, ``encoder``, settings, training ``history``);
    ``heads[sigma] = {"cosine": variables, "linear": variables}`` for each trained sigma.
    Certify with ``certify.certify_prediction(..., head=heads[sigma]["cosine"])`` (FS)
    and ``certify.rs_certify(..., head=heads[sigma]["linear"])`` (RS).
  """
  workdir = pathlib.Path(workdir)
  sidecar = workdir / SIDECAR
  if not sidecar.is_file():
    raise FileNotFoundError(f"no trained heads in {workdir} ({SIDECAR} is missing); run "
                            f"python -m train.head --config ... --workdir {workdir} first.")
  meta = json.loads(sidecar.read_text())
  mngr = checkpointing.manager(str(workdir), HEADS_DIR)
  try:
    step, state = checkpointing.restore_latest(mngr, _abstract_heads(meta))
  finally:
    checkpointing.close(mngr)
  if step != meta["step"]:
    raise ValueError(f"{workdir / HEADS_DIR} holds step {step} but {SIDECAR} describes step "
                     f"{meta['step']}; the workdir is inconsistent, rerun train.head in a "
                     "fresh workdir.")
  heads = {float(s): jax.tree.map(jnp.asarray, h) for s, h in zip(meta["sigmas"], state["heads"])}
  return meta, heads


