r"""Trains the Gaussian Smoothness Booster (GSB), paper Section 4 and Appendix A.2.

  python -m train.gsb --config configs/default.py --workdir /tmp/gsb_default
  python -m certify.run --config configs/default.py --workdir /tmp/gsb_default \
      --config.gsb.checkpoint=/tmp/gsb_default

Two stages, one after the other, the encoder g frozen throughout (method.md section 4):

1. the denoiser D: ``L_D = L_rec + lam_rob * L_rob`` (Eq. 7-9), Adam;
2. the smoothness mapper M, D frozen: ``L_M = L_mrob + lam_id * L_id + lam_stat * L_stat``
   (Eq. 11-13) on ``z_noisy = g(clip(D(x + delta)))``, ``z_clean = g(x)``; AdamW with a
   warmup-free cosine decay over the stage's steps.

Each training image gets ``config.gsb.noise_samples`` noise draws per step, each with its
own sigma drawn uniformly from ``config.gsb.sigma_range`` (the clean targets are repeated
along the batch axis). Batch sizes and epochs are per stage (``config.gsb.denoiser.*``,
``config.gsb.mapper.*``); the images are ``config.train_data`` (its ``batch_size`` is
ignored, the last incomplete batch of an epoch dropped).

What lands in ``workdir``:

* ``config.json``: the config of the run, written when it starts; a restart with a config
  that differs in what shapes the result (encoder, data, seed, ``gsb``) is refused.
* ``denoiser/<step>``, ``mapper/<step>``: orbax checkpoints of each stage's train state,
  every ``config.gsb.checkpoint_every`` steps, every ``config.gsb.checkpoint_seconds``
  seconds (default 120), at the end of the stage and on Ctrl-C (which saves, then exits
  with status 130 and one line, so ``train.gsb && certify.run`` stops). A finished stage
  keeps only its final parameters (no optimiser state, no older step): all that resuming
  and :func:`fsjax.gsb.checkpoint.load` need.
* ``.lock`` while a run is going: one writer per workdir; a second ``train.gsb`` on the
  same workdir is refused and told the pid and host of the first.
* ``metrics.jsonl``: one JSON object per ``config.gsb.log_every`` steps (and at the end
  of a stage or of a run stopped by ``max_steps``): stage, step, epoch, the loss and its
  parts, gradient and parameter norms averaged over the interval, the learning rate of
  the interval's last step, and images (not noisy copies) per second, the first
  interval of a stage including compilation.

Restarting resumes from the latest checkpoint of either stage and reproduces an
uninterrupted run exactly: the noise of step s is ``fold_in(stage_key, s)`` and the
order of epoch e is a permutation seeded by ``config.seed + e``, so the batches already
done are skipped, not re-drawn. A finished run only reports. A checkpoint that cannot be
read (a truncated file) is one line naming its folder and the fix. A NaN/Inf loss, gradient
or parameter stops training with the stage, the step and the loss parts, before
anything of that step is saved.

Data parallel over every local device: the batch is sharded along the mesh axis
``"data"``, parameters and optimiser state replicated; the step body is
:func:`train.loop.run`'s, with this module's losses (:class:`WarmupLoss`,
:class:`DenoiserLoss`, :class:`MapperLoss`: frozen dataclasses of the static encoder,
modules and weights) and optimisers as static arguments of the one jitted
:func:`train.loop.update_step`, so jit's own cache reuses a compilation for an equal
configuration (a resumed run in the same process compiles nothing again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fsjax import cli
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib
from fsjax import gsb as gsb_lib
from fsjax.gsb import losses
from fsjax import checkpointing
from train import loop

# "warmup": D trained on L_rec alone (Eq. 7; no encoder pass, so cheap), as denoised
# smoothing does, before L_D; its final parameters start the "denoiser" stage.
STAGES = ("warmup", "denoiser", "mapper")
CONFIG_FILE = loop.CONFIG_FILE
METRICS_FILE = loop.METRICS_FILE
TrainState = loop.TrainState
# config.gsb keys that change neither the result nor the shapes: a restart may change them.
_RESTART_FREE_KEYS = ("checkpoint", "log_every", "checkpoint_every", "checkpoint_seconds")

# ----------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------


def stage_options(config, which: str) -> ml_collections.ConfigDict:
  """``config.gsb.<which>`` over its defaults (:func:`fsjax.gsb.resolved_gsb_config`), checked.

  Args:
    config: the experiment config.
    which: ``"denoiser"`` or ``"mapper"``.

  Returns:
    The merged sub-config (architecture, loss weights and training keys).
  """
  merged = gsb_lib.resolved_gsb_config(config)[which]
  keys = (("batch_size", 1), ("epochs", 0)) + ((("warmup_epochs", 0),)
                                                 if which == "denoiser" else ())
  for key, minimum in keys:
    v = merged[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
      raise ValueError(f"config.gsb.{which}.{key} must be an integer >= {minimum}, got "
                       f"{v!r}.")
  if not merged.learning_rate > 0:
    raise ValueError(f"config.gsb.{which}.learning_rate must be > 0, got "
                     f"{merged.learning_rate!r}.")
  return merged


def noise_options(config) -> tuple[tuple[float, float], int]:
  """``(sigma_range, noise_samples)`` from ``config.gsb``, checked."""
  c = gsb_lib.resolved_gsb_config(config)
  lo, hi = map(float, c.sigma_range)
  n = c.noise_samples
  if not 0.0 <= lo <= hi:
    raise ValueError(f"config.gsb.sigma_range must be (low, high) with 0 <= low <= high, "
                     f"got {(lo, hi)}.")
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"config.gsb.noise_samples must be an integer >= 1, got {n!r}.")
  return (lo, hi), int(n)


def _comparable(config) -> dict[str, Any]:
  """The parts of a config that shape a GSB run, as JSON values (tuples are lists)."""
  c = loop.as_json(config) if not isinstance(config, dict) else config
  gsb = {k: v for k, v in c.get("gsb", {}).items() if k not in _RESTART_FREE_KEYS}
  # train_data.batch_size is not used here (each stage has its own).
  data = {k: v for k, v in (c.get("train_data") or {}).items() if k != "batch_size"}
  return {"seed": c.get("seed"), "encoder": c.get("encoder"), "train_data": data,
          "gsb": gsb}


def check_config(config, workdir: str) -> None:
  """Refuses to resume a run in ``workdir`` that was started with another config."""
  loop.check_config(config, workdir, comparable=_comparable, what="GSB")


# ----------------------------------------------------------------------------------------
# Data: a fixed selection, a deterministic order per epoch, sharded batches.
# ----------------------------------------------------------------------------------------


def training_images(config) -> data_lib.Dataset:
  """The training selection of ``config.train_data`` (batch size set per stage later)."""
  c = dict(config.train_data.items())
  c.update(drop_remainder=True)
  return data_lib.from_config(c)


def batches_per_epoch(dataset: data_lib.Dataset, batch_size: int) -> int:
  return dataset.num_examples // batch_size


def epoch_batches(dataset: data_lib.Dataset, *, batch_size: int, seed: int, epoch: int,
                  skip: int = 0, process: tuple[int, int] = (0, 1)
                  ) -> Iterator[dict[str, np.ndarray]]:
  """The batches of one epoch, in an order that depends only on ``seed + epoch``.

  The selection itself (which examples) is fixed by ``config.train_data``; each epoch
  visits it in the order ``np.random.default_rng(seed + epoch).permutation``. The first
  ``skip`` batches are skipped without being read (resuming mid-epoch). In a pod,
  ``process = (index, count)``: this process reads only its rows of each global batch
  (rows ``index * b .. (index + 1) * b - 1``, ``b = batch_size / count``).
  """
  order = np.random.default_rng(seed + epoch).permutation(dataset.num_examples)
  indices = dataset.indices[order][skip * batch_size:]
  index, count = process
  if count > 1:
    local = batch_size // count
    indices = indices[:len(indices) // batch_size * batch_size].reshape(-1, batch_size)
    indices, batch_size = indices[:, index * local:(index + 1) * local].reshape(-1), local
  return iter(dataclasses.replace(dataset, indices=indices, batch_size=batch_size,
                                  drop_remainder=True))


# ----------------------------------------------------------------------------------------
# Losses and the update step.
# ----------------------------------------------------------------------------------------


def noisy_copies(x: jax.Array, key: jax.Array, *, sigma_range: tuple[float, float],
                 noise_samples: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``noise_samples`` noisy copies of each image, each with its own sigma.

  Args:
    x: ``[B, H, W, 3]`` clean images.
    key: PRNG key.
    sigma_range: ``(low, high)``; sigma ~ U(low, high) per copy.
    noise_samples: n, the draws per image.

  Returns:
    ``(x_rep, x_noisy, sigma)``: ``[B * n, H, W, 3]`` clean images repeated n times
    (image i at rows ``i * n ... i * n + n - 1``), ``x_rep + delta`` with
    ``delta ~ N(0, sigma^2 I)``, and sigma ``[B * n]``.
  """
  x_rep = jnp.repeat(x, noise_samples, axis=0)
  k_sigma, k_delta = jax.random.split(key)
  sigma = jax.random.uniform(k_sigma, (x_rep.shape[0],), jnp.float32, *sigma_range)
  delta = sigma[:, None, None, None] * jax.random.normal(k_delta, x_rep.shape, jnp.float32)
  return x_rep, x_rep + delta, sigma


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  """The frozen encoder g as a static argument of the jitted step.

  Encoders hash by identity; this wrapper is equal for encoders built from an equal
  ``config.encoder`` (sorted JSON), so jit's cache holds one compilation per encoder
  config, not per build: a resumed run in the same process compiles nothing again. The
  parameters are an argument (``frozen["encoder"]``), never part of the key.
  """

  config: str
  encoder: encoders_lib.Encoder = dataclasses.field(compare=False)

  @classmethod
  def of(cls, encoder: encoders_lib.Encoder, encoder_config) -> FrozenEncoder:
    c = loop.as_json(encoder_config) if not isinstance(encoder_config, dict) else encoder_config
    return cls(json.dumps(c, sort_keys=True), encoder)


@dataclasses.dataclass(frozen=True)
class WarmupLoss:
  """``loss(params, frozen, images, key) -> (L_rec, parts)``: D's warm-up (Eq. 7 only).

  No encoder pass: a denoiser that does not yet denoise makes L_rob's gradients noise,
  and this stage costs a fraction of a full step. ``noisy_mse`` is the input's own error
  ``||x + delta - x||^2`` (per pixel): L_rec must fall below it for D to help at all.
  """

  base: FrozenEncoder
  denoiser: Any  # fsjax.gsb.Denoiser
  sigma_range: tuple[float, float]
  noise_samples: int

  def __call__(self, params, frozen, images, key):
    base = self.base.encoder
    boosted = gsb_lib.BoostedEncoder(base, denoiser=self.denoiser)
    x = encoders_lib.resize(images.astype(jnp.float32), base.resolution)
    x_rep, x_noisy, sigma = noisy_copies(x, key, sigma_range=self.sigma_range,
                                         noise_samples=self.noise_samples)
    denoised = boosted.denoise({"encoder": frozen["encoder"], "denoiser": params}, x_noisy,
                               sigma=sigma)
    rec = losses.reconstruction_loss(denoised, x_rep)  # Eq. 7
    return rec, {"rec": rec, "noisy_mse": losses.reconstruction_loss(x_noisy, x_rep)}


@dataclasses.dataclass(frozen=True)
class DenoiserLoss:
  """``loss(params, frozen, images, key) -> (L_D, parts)`` for stage 1 (Eq. 7-9).

  ``frozen`` is ``{"encoder": g's params}``. L_rec compares D's UNCLIPPED output with
  the clean image (its gradient reaches every pixel); L_rob goes through exactly the
  function that is certified, ``g(clip(D(x + delta)))`` (``BoostedEncoder.tokens``).
  """

  base: FrozenEncoder
  denoiser: Any  # fsjax.gsb.Denoiser
  lam_rob: float
  sigma_range: tuple[float, float]
  noise_samples: int

  def __call__(self, params, frozen, images, key):
    base, n = self.base.encoder, self.noise_samples
    boosted = gsb_lib.BoostedEncoder(base, denoiser=self.denoiser)
    x = encoders_lib.resize(images.astype(jnp.float32), base.resolution)
    x_rep, x_noisy, sigma = noisy_copies(x, key, sigma_range=self.sigma_range,
                                         noise_samples=n)
    z_clean = jax.lax.stop_gradient(base.tokens(frozen["encoder"], x))
    p = {"encoder": frozen["encoder"], "denoiser": params}
    denoised = boosted.denoise(p, x_noisy, sigma=sigma)  # unclipped, for Eq. 7
    z_denoised = base.tokens(frozen["encoder"], jnp.clip(denoised, 0.0, 1.0))
    loss, parts = losses.denoiser_loss(  # Eq. 9
        denoised, x_rep, z_denoised, jnp.repeat(z_clean, n, axis=0), lam_rob=self.lam_rob)
    return loss, {**parts, "noisy_mse": losses.reconstruction_loss(x_noisy, x_rep)}


@dataclasses.dataclass(frozen=True)
class MapperLoss:
  """``loss(params, frozen, images, key) -> (L_M, parts)`` for stage 2 (Eq. 11-13).

  ``frozen`` is ``{"encoder": ..., "denoiser": ...}`` (no ``"denoiser"`` when D is not
  trained). ``z_noisy = g(clip(D(x + delta)))`` and ``z_clean = g(x)`` carry no gradient:
  only M learns. L_id evaluates M on clean features at ``id_sigma`` (Eq. 12 says 0).
  """

  base: FrozenEncoder
  denoiser: Any  # fsjax.gsb.Denoiser, or None when D is not trained
  mapper: Any  # fsjax.gsb.SmoothnessMapper
  lam_id: float
  lam_stat: float
  id_sigma: float
  sigma_range: tuple[float, float]
  noise_samples: int

  def __call__(self, params, frozen, images, key):
    base, n = self.base.encoder, self.noise_samples
    front = gsb_lib.BoostedEncoder(base, denoiser=self.denoiser)
    x = encoders_lib.resize(images.astype(jnp.float32), base.resolution)
    _, x_noisy, sigma = noisy_copies(x, key, sigma_range=self.sigma_range, noise_samples=n)
    z_clean = base.tokens(frozen["encoder"], x)
    z_noisy = front.tokens(frozen, x_noisy, sigma=sigma)
    z_clean = jnp.repeat(jax.lax.stop_gradient(z_clean), n, axis=0)
    z_noisy = jax.lax.stop_gradient(z_noisy)
    mapped_noisy = self.mapper.apply({"params": params}, z_noisy, sigma)
    mapped_clean = self.mapper.apply({"params": params}, z_clean, self.id_sigma)
    return losses.mapper_loss(mapped_noisy, mapped_clean, z_clean,  # Eq. 13
                              lam_id=self.lam_id, lam_stat=self.lam_stat)


# ----------------------------------------------------------------------------------------
# A stage: state, optimiser, loop with logging and checkpoints.
# ----------------------------------------------------------------------------------------


def cosine_adamw(learning_rate: float, steps: int, weight_decay: float
                 ) -> optax.GradientTransformation:
  """M's optimiser: AdamW with a warmup-free cosine decay from the peak to 0 over
  ``steps`` (paper: "cosine schedule")."""
  return optax.adamw(optax.cosine_decay_schedule(learning_rate, max(steps, 1)),
                     weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=("module", "shape"))
def init_module(key: jax.Array, *, module, shape: tuple[int, ...]):
  """``module.init(key, zeros(shape), 0.0)["params"]``, jitted (one compilation per
  module value and shape)."""
  return module.init(key, jnp.zeros(shape), 0.0)["params"]


@dataclasses.dataclass
class Stage:
  """Everything one stage's loop needs."""

  name: str
  batch_size: int
  total_steps: int
  optimizer: loop.Optimizer
  schedule: Callable[[int], Any]
  loss: Callable  # a hashable loss (static argument of train.loop.update_step)
  init_params: Callable[[], Any]
  key: jax.Array  # the stage's noise key; the step's is fold_in(key, step)

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.optimizer.make()


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh ``("data",)`` over every device: batches split along it."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> jax.NamedSharding:
  """Parameters and optimiser state: a full copy on every device."""
  return jax.NamedSharding(mesh, jax.P())


def batch_sharded(mesh) -> jax.NamedSharding:
  """Batches: split along their first axis over the ``"data"`` axis."""
  return jax.NamedSharding(mesh, jax.P("data"))


def put_replicated(tree, mesh):
  """``tree`` replicated on every device of ``mesh``. In a pod through the host: a global
  array put from a process's single-device array cannot be saved by orbax."""
  if jax.process_count() > 1:
    tree = jax.device_get(tree)
  return jax.device_put(tree, replicated(mesh))


def init_state(stage: Stage, mesh) -> TrainState:
  return put_replicated(loop.init_state(stage.init_params(), stage.optimizer), mesh)


def restore_state(stage: Stage, mngr, mesh) -> TrainState:
  """The stage's latest checkpoint (replicated), or a fresh state at step 0."""
  if mngr.latest_step() is None:
    return init_state(stage, mesh)
  # Restoring needs only the structure: trace the init instead of running (compiling) it.
  like = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)),
      jax.eval_shape(lambda: init_state(stage, mesh)))
  return loop.restore(mngr, like, total=stage.total_steps,
                      what=f"GSB {stage.name} checkpoint", sharding=replicated(mesh))


def update_step(stage: Stage) -> Callable:
  """``(state, frozen, images, key) -> (state, metrics)``: the stage's jitted update."""
  return functools.partial(loop.update_step, loss=stage.loss, optimizer=stage.optimizer)


def run_stage(stage: Stage, state: TrainState, *, frozen, dataset: data_lib.Dataset,
              mesh, mngr, seed: int, policy: loop.CheckpointPolicy,
              writer: loop.MetricsWriter, stop_at: int | None = None) -> TrainState:
  """Trains a stage from ``state["step"]`` to its end (or to step ``stop_at``).

  Saves when ``policy`` says so (every k steps, every few minutes), at the end, at
  ``stop_at``, and on Ctrl-C (then raises :class:`train.loop.Interrupted`).
  """
  step = int(state["step"])
  per_epoch = batches_per_epoch(dataset, stage.batch_size)
  batch_sharding = batch_sharded(mesh)
  process = (jax.process_index(), jax.process_count())

  def batches():
    epoch, skip = divmod(step, per_epoch)
    while True:
      for batch in epoch_batches(dataset, batch_size=stage.batch_size, seed=seed,
                                 epoch=epoch, skip=skip, process=process):
        # Each process holds its rows of the global batch (all of it outside a pod).
        images = batch["image"]
        yield jax.make_array_from_process_local_data(
            batch_sharding, images, (stage.batch_size, *images.shape[1:]))
      epoch, skip = epoch + 1, 0

  return loop.run(
      what=f"train.gsb (stage {stage.name!r})", desc=f"gsb {stage.name}", state=state,
      total=stage.total_steps, end=stop_at, batches=batches(), frozen=frozen,
      key=stage.key, loss=stage.loss, optimizer=stage.optimizer,
      fix=(f"Lower config.gsb.{'denoiser' if stage.name == 'warmup' else stage.name}"
           ".learning_rate (or check the data for NaN pixels) and restart."),
      examples=stage.batch_size, writer=writer,
      fields=lambda step: {"stage": stage.name, "epoch": (step - 1) // per_epoch,
                           "learning_rate": float(stage.schedule(step - 1))},
      mngr=mngr, policy=policy)


# ----------------------------------------------------------------------------------------
# The two stages, assembled from the config.
# ----------------------------------------------------------------------------------------


def build_stages(config, encoder: encoders_lib.Encoder, encoder_params,
                 dataset: data_lib.Dataset, *, n_devices: int) -> dict[str, Stage]:
  """The denoiser and mapper :class:`Stage` s from the config (checked before any jit)."""
  sigma_range, noise_samples = noise_options(config)
  d_opts, m_opts = stage_options(config, "denoiser"), stage_options(config, "mapper")
  for name, opts in (("denoiser", d_opts), ("mapper", m_opts)):
    if opts.batch_size % n_devices:
      raise ValueError(f"config.gsb.{name}.batch_size={opts.batch_size} must be divisible "
                       f"by the number of devices ({n_devices}): the batch is sharded.")
    if opts.epochs and dataset.num_examples < opts.batch_size:
      raise ValueError(f"config.train_data selects {dataset.num_examples} examples, fewer "
                       f"than one batch of config.gsb.{name}.batch_size={opts.batch_size}.")
  root = jax.random.key(config.seed)
  d_init, d_noise = jax.random.split(jax.random.fold_in(root, 0))
  m_init, m_noise = jax.random.split(jax.random.fold_in(root, 1))

  denoiser = gsb_lib.build_denoiser(config)
  image_shape = (1, encoder.resolution, encoder.resolution, 3)
  token_shape = jax.eval_shape(lambda x: encoder.tokens(encoder_params, x),
                               jax.ShapeDtypeStruct(image_shape, jnp.float32)).shape
  mapper = gsb_lib.build_mapper(config, token_shape[-1])
  train_denoiser = d_opts.epochs > 0

  d_steps = d_opts.epochs * batches_per_epoch(dataset, d_opts.batch_size)
  w_steps = d_opts.warmup_epochs * batches_per_epoch(dataset, d_opts.batch_size)
  if w_steps and not d_steps:
    raise ValueError("config.gsb.denoiser.warmup_epochs > 0 needs denoiser.epochs > 0: the "
                     "warm-up only starts the denoiser's training.")
  w_noise = jax.random.fold_in(root, 2)
  d_lr = float(d_opts.learning_rate)
  m_steps = m_opts.epochs * batches_per_epoch(dataset, m_opts.batch_size)
  m_lr, m_wd = float(m_opts.learning_rate), float(m_opts.weight_decay)
  # The logged learning rate: cosine_adamw's schedule.
  m_schedule = optax.cosine_decay_schedule(m_lr, max(m_steps, 1))
  base = FrozenEncoder.of(encoder, config.encoder)
  d_init_params = lambda: init_module(d_init, module=denoiser, shape=image_shape)
  adam = loop.Optimizer.of(optax.adam, learning_rate=d_lr)
  stages = {
      "warmup": Stage(
          name="warmup", batch_size=d_opts.batch_size, total_steps=w_steps,
          optimizer=adam, schedule=lambda step: d_lr,
          loss=WarmupLoss(base, denoiser, sigma_range, noise_samples),
          init_params=d_init_params, key=w_noise),
      "denoiser": Stage(
          name="denoiser", batch_size=d_opts.batch_size, total_steps=d_steps,
          optimizer=adam, schedule=lambda step: d_lr,
          loss=DenoiserLoss(base, denoiser, float(d_opts.lam_rob), sigma_range,
                            noise_samples),
          init_params=d_init_params, key=d_noise),
      "mapper": Stage(
          name="mapper", batch_size=m_opts.batch_size, total_steps=m_steps,
          optimizer=loop.Optimizer.of(cosine_adamw, learning_rate=m_lr, steps=m_steps,
                                      weight_decay=m_wd),
          schedule=m_schedule,
          loss=MapperLoss(base, denoiser if train_denoiser else None, mapper,
                          float(m_opts.lam_id), float(m_opts.lam_stat),
                          float(m_opts.id_sigma), sigma_range, noise_samples),
          init_params=lambda: init_module(m_init, module=mapper, shape=token_shape),
          key=m_noise),
  }
  return stages


def train_and_evaluate(config, workdir: str, *, max_steps: int | None = None
                       ) -> dict[str, Any]:
  """Trains D then M (resuming from ``workdir``); returns the final parameters.

  Args:
    config: the experiment config (``config.encoder``, ``config.train_data``,
      ``config.gsb``, ``config.seed``).
    workdir: where ``config.json``, ``metrics.jsonl`` and the checkpoints live.
    max_steps: stop (with a checkpoint) once this many update steps, counted over both
      stages from the start of the run, are done; a later call resumes. None = train to
      the end. For time-boxed runs and preemption tests.

  Returns:
    ``{"denoiser": params, "mapper": params}`` as they are when this call stops (a
    stage with 0 epochs is absent).
  """
  if max_steps is not None and (isinstance(max_steps, bool) or max_steps < 0):
    raise ValueError(f"max_steps must be None or an integer >= 0, got {max_steps!r}.")
  workdir = os.path.abspath(workdir)
  check_config(config, workdir)
  # Cheap checks of config.gsb first, before the encoder and the data load.
  noise_options(config)
  stage_options(config, "denoiser"), stage_options(config, "mapper")
  # One writer per workdir (in a pod: process 0; the others save through orbax with it).
  with (checkpointing.lock_workdir(workdir, "train.gsb") if jax.process_index() == 0
        else contextlib.nullcontext()):
    return _train(config, workdir, max_steps)


def _train(config, workdir: str, max_steps: int | None) -> dict[str, Any]:
  """:func:`train_and_evaluate` once the config is checked and the workdir locked."""
  print(f"train.gsb: loading encoder {config.encoder.name!r} and "
        f"{config.train_data.name!r} ({config.train_data.get('num_examples') or 'all'} "
        "images)...", flush=True)
  encoder, encoder_params = encoders_lib.build(config.encoder)
  dataset = training_images(config)
  # Data parallel: GSPMD splits each step along the batch (Auto axes: the encoder and
  # the GSB modules are plain linen code, written for no particular sharding).
  mesh = data_mesh()
  n_devices = mesh.devices.size
  stages = build_stages(config, encoder, encoder_params, dataset, n_devices=n_devices)
  loop.write_config(config, workdir)  # once the config is known to be valid
  encoder_params = put_replicated(encoder_params, mesh)
  c = config.gsb
  policy = loop.CheckpointPolicy(int(c.get("checkpoint_every") or 100),
                                 float(c.get("checkpoint_seconds") or 120.0))
  writer = loop.MetricsWriter(workdir, int(c.get("log_every") or 10))
  managers = {name: checkpointing.manager(workdir, name) for name in STAGES}
  try:
    done = {n: managers[n].latest_step() or 0 for n in STAGES}
    total = {n: stages[n].total_steps for n in STAGES}
    progress = ", ".join(f"{n} {done[n]}/{total[n]}" for n in STAGES)
    if any(done[n] > total[n] for n in STAGES):
      raise ValueError(f"workdir {workdir} holds checkpoints past this config's end "
                       f"({progress} steps).")
    for before, after in zip(STAGES, STAGES[1:]):
      if done[after] and done[before] != total[before]:
        raise ValueError(f"workdir {workdir}: the {after} stage has started but the "
                         f"{before} checkpoint is at step {done[before]} of {total[before]}.")
    if any(done.values()) and done != total:
      print(f"train.gsb: resuming {workdir} ({progress} steps done).")
    logging.info("train.gsb: %d device(s); %s steps done.", n_devices, progress)

    out, frozen, offset = {}, {"encoder": encoder_params}, 0
    stop_at = lambda: None if max_steps is None else max_steps - offset
    for name in STAGES:
      stage = stages[name]
      if not stage.total_steps:
        continue
      if name == "denoiser" and "warmup" in out and not done["denoiser"]:
        warm = out.pop("warmup")  # the warm-up's D starts L_D's training
        stage = dataclasses.replace(stage, init_params=lambda: warm)
      elif name == "denoiser":
        out.pop("warmup", None)
      state = restore_state(stage, managers[name], mesh)
      state = run_stage(stage, state, frozen=frozen, dataset=dataset, mesh=mesh,
                        mngr=managers[name], seed=config.seed, policy=policy,
                        writer=writer, stop_at=stop_at())
      out[name] = state["params"]
      if int(state["step"]) < stage.total_steps:
        return out  # stopped by max_steps inside this stage
      offset += stage.total_steps
      if name == "denoiser":
        frozen = {**frozen, "denoiser": out["denoiser"]}  # D is final from here on
    out.pop("warmup", None)
    if done == total:  # said once every checkpoint is known to be readable
      print(f"train.gsb: {workdir} holds a finished run ({progress} steps); nothing to do.")
    return out
  finally:
    for mngr in managers.values():
      checkpointing.close(mngr)


def summary(config, workdir: str, params: Mapping[str, Any], seconds: float) -> str:
  """What a person reads at the end: each stage's loss, where the booster is, what next."""
  rows = loop.read_metrics(workdir)
  stages = [f"{name} {loop.summary([r for r in rows if r.get('stage') == name])}"
            for name in STAGES if any(r.get("stage") == name for r in rows)]
  saved = ", ".join(f"{name}/{managed_step}" for name in STAGES
                    if name in params and (managed_step := _final_step(workdir, name)))
  return (f"train.gsb: done in {seconds:.0f} s; " + "; ".join(stages) + "\n"
          f"booster saved to {workdir} ({saved}); certify it with "
          f"--config.gsb.checkpoint={workdir}")


def _final_step(workdir: str, name: str) -> int | None:
  steps = [int(p) for p in os.listdir(os.path.join(workdir, name)) if p.isdigit()] if (
      os.path.isdir(os.path.join(workdir, name))) else []
  return max(steps, default=None)


def main(config, workdir: str) -> None:
  start = time.perf_counter()
  params = train_and_evaluate(config, workdir)  # Ctrl-C: cli.run says "saved at step N"
  print(summary(config, os.path.abspath(workdir), params, time.perf_counter() - start))


if __name__ == "__main__":
  cli.run(main, workdir_help="Where checkpoints, metrics.jsonl and config.json go.")
