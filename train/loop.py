"""The one training loop: every trainer supplies its loss, optimiser and batches.

A trainer (``train.gsb``, ``train.head``, ``train.llava``) builds a hashable loss (a frozen
dataclass whose fields are the static modules and numbers; its parameters and data are
arguments) and an :class:`Optimizer` recipe, then hands both with an iterator of batches
to :func:`run`, which owns the step body once:

* :func:`update_step`, jitted and donating, at module level: jit's own cache, keyed by
  the loss and the optimiser recipe (equal values share one compilation), so a resumed
  run in the same process (the tests) compiles nothing again;
* the NaN/Inf guard (:func:`check_finite`) before anything of a step is saved
  (:class:`NonFiniteLossError`);
* metrics: :class:`MetricsWriter`, averaged rows appended to ``workdir/metrics.jsonl``,
  and a progress bar that says when it compiles and shows the loss;
* the checkpoint policy: :class:`CheckpointPolicy` (every ``every_steps`` steps *and*
  every ``every_seconds`` seconds), a save at the end, and a finished stage keeps only
  its final parameters (what resuming needs; no optimiser state, no older step);
* Ctrl-C: :func:`fsjax.cli.interruptible` makes SIGINT a flag; the loop finishes its
  step, saves, and raises :class:`Interrupted` ("saved at step N; rerun the same command
  to resume"), which :func:`fsjax.cli.run` prints as one line with exit status 130;
* resume: :func:`restore` gives the latest checkpoint's state (or a fresh one).

Also here: :func:`check_config` / :func:`write_config` (``workdir/config.json``, and a
refusal to resume a workdir started with another config, naming every difference).

Pods (several processes, :mod:`fsjax.pod`): every process runs the same loop on its
shard of each global batch; orbax saves and restores the global state together; process 0
alone writes ``config.json`` and ``metrics.jsonl``.

Noise keys are ``fold_in(stage_key, step)``: a function of the step alone, so a resumed
run draws exactly the noise an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import optax
import tqdm

from fsjax import checkpointing
from fsjax import cli

TrainState = dict[str, Any]  # {"step": int32 [], "params": ..., "opt_state": ...}
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss, gradient or parameter."""


interruptible = cli.interruptible


class Interrupted(cli.Interrupted):
  """Ctrl-C arrived; the loop saved its state at ``step`` (if any was made) and stopped."""

  def __init__(self, what: str, step: int, *, unit: str = "step"):
    super().__init__(f"{what}: interrupted, saved at {unit} {step}; rerun the same "
                     "command to resume from there.")
    self.step = step


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax optimiser as a static, hashable recipe: a module-level ``factory`` and its
  keyword arguments. Equal recipes are one compilation of :func:`update_step`."""

  factory: Callable[..., optax.GradientTransformation]
  kwargs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def of(cls, factory: Callable[..., optax.GradientTransformation], **kwargs) -> Optimizer:
    return cls(factory, tuple(sorted(kwargs.items())))

  def make(self) -> optax.GradientTransformation:
    return self.factory(**dict(self.kwargs))


@functools.partial(jax.jit, static_argnames=("loss", "optimizer"), donate_argnums=0)
def update_step(state: TrainState, frozen, batch, key, *, loss: Callable,
                optimizer: Optimizer) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update ``(state, frozen, batch, key) -> (state, metrics)``, jitted.

  ``loss(params, frozen, batch, key) -> (loss, {part: value})``, hashable (a frozen
  dataclass of static modules and numbers). The state is donated (its buffers are
  reused for the new state). The step's key is ``fold_in(key, step)``.
  """
  tx = optimizer.make()
  k = jax.random.fold_in(key, state["step"])
  (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(
      state["params"], frozen, batch, k)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": value, **parts, "grad_norm": optax.tree.norm(grads),
             # Non-finite parameters are caught at the step that makes them.
             "param_norm": optax.tree.norm(params)}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def init_state(params, optimizer: Optimizer) -> TrainState:
  """A fresh state at step 0."""
  return {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params,
          "opt_state": optimizer.make().init(params)}


def restore(mngr, like: TrainState, *, total: int, what: str,
            sharding=None) -> TrainState:
  """The latest checkpoint's state, or ``like`` (a fresh state) when there is none.

  A finished stage's checkpoint may hold ``{"step", "params"}`` only (see :func:`run`):
  it is read as saved, without ``like``'s optimiser state.

  Raises:
    fsjax.checkpointing.DamagedCheckpointError: the checkpoint cannot be read; the
      message names its folder and the fix.
  """
  step = mngr.latest_step()
  fix = ("rerun the same command: it resumes from the checkpoint before it (or from the "
         "start of the stage).")
  if step is not None and step >= total:
    return checkpointing.restore_as_saved(mngr, step, sharding=sharding, what=what, fix=fix)
  return checkpointing.restore_latest(mngr, like, what=what, fix=fix)[1]


def check_finite(what: str, step: int, metrics: Mapping[str, float], *, fix: str) -> None:
  """Raises :class:`NonFiniteLossError` naming what diverged, the step and the metrics."""
  if all(math.isfinite(v) for v in metrics.values()):
    return
  parts = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
  raise NonFiniteLossError(
      f"{what} diverged at step {step}: {parts}. Nothing of this step was saved; the "
      f"latest checkpoint is older. {fix}")


def as_json(config) -> dict[str, Any]:
  """A config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def check_config(config, workdir: str, *, comparable: Callable[[dict], dict],
                 what: str) -> None:
  """Refuses to resume a run in ``workdir`` that was started with another config.

  ``comparable(json_config)`` picks the parts that shape the run (what may change
  between a run and its resumption, such as logging intervals, is left out).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  diff = cli.config_differences(comparable(stored), comparable(as_json(config)))
  if diff:
    raise ValueError(
        f"workdir {workdir} holds a {what} run started with another config, so it cannot "
        "be resumed: " + "; ".join(diff) + ". Use a fresh --workdir, or the old config.")


def write_config(config, workdir: str) -> None:
  """Writes ``workdir/config.json`` once, atomically (a half-written one never exists);
  in a pod, process 0 writes it."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path) or jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json(indent=2) if hasattr(config, "to_json")
            else json.dumps(dict(config), indent=2))
  os.replace(path + ".tmp", path)


class MetricsWriter:
  """Appends metrics averaged over ``every`` steps to ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str, every: int):
    self._path = os.path.join(workdir, METRICS_FILE)
    self._every = max(int(every), 1)
    self._sums: dict[str, float] = {}
    self._count = 0
    self._t0 = time.perf_counter()

  def reset_clock(self) -> None:
    self._t0 = time.perf_counter()

  def add(self, step: int, metrics: Mapping[str, float], *, examples: int, last: bool,
          **fields: Any) -> dict[str, Any] | None:
    """Adds a step's metrics; writes (and returns) the row at a log step or the last one.

    ``fields`` (stage, epoch, learning rate, ...) go into the row as they are. A resumed
    run's first row averages the steps since the restart only.
    """
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.0) + v
    self._count += 1
    if step % self._every and not last:
      return None
    now = time.perf_counter()
    row = {**fields, "step": step, **{k: v / self._count for k, v in self._sums.items()},
           "examples_per_s": self._count * examples / max(now - self._t0, 1e-9)}
    if jax.process_index() == 0:  # one writer (a pod's processes share the numbers)
      with open(self._path, "a") as f:
        f.write(json.dumps(row) + "\n")
    self._sums, self._count, self._t0 = {}, 0, now
    return row


class CheckpointPolicy:
  """Save at every ``every_steps``-th step, and when ``every_seconds`` passed since the last."""

  def __init__(self, every_steps: int, every_seconds: float = 120.0):
    self.every_steps = max(int(every_steps), 1)
    self.every_seconds = float(every_seconds)
    self._last = time.monotonic()

  def due(self, step: int) -> bool:
    if step % self.every_steps == 0 or time.monotonic() - self._last >= self.every_seconds:
      self._last = time.monotonic()
      return True
    return False


def run(*, what: str, desc: str, state: TrainState, total: int, batches: Iterable[Any],
        frozen: Any, key: jax.Array, loss: Callable, optimizer: Optimizer, fix: str,
        examples: int, end: int | None = None, writer: MetricsWriter | None = None,
        fields: Callable[[int], Mapping[str, Any]] = lambda step: {},
        mngr=None, policy: CheckpointPolicy | None = None,
        stop_on_interrupt: bool = True, final_opt_state: bool = False) -> TrainState:
  """Trains from ``state["step"]`` to ``end`` (default: ``total``, the stage's end).

  Args:
    what: the trainer in messages ("train.gsb (stage denoiser)").
    desc: the progress bar's label.
    state: ``{"step", "params", "opt_state"}``, e.g. from :func:`restore`.
    total: the stage's number of steps.
    batches: the batches of steps ``state["step"] + 1, ...`` in order (read lazily).
    frozen, key: the step's other arguments (frozen parameters or data; the noise key).
    loss, optimizer: see :func:`update_step`.
    fix: what to do when the loss diverges (the end of the error message).
    examples: examples per step (for ``examples_per_s``).
    end: stop (with a checkpoint) at this step; a later call resumes.
    writer: metrics rows (``fields(step)`` go into the row of ``step``).
    mngr, policy: checkpoints (None: nothing is saved). At ``total`` the final
      ``{"step", "params"}`` is saved and older checkpoints are deleted.
    final_opt_state: keep the optimiser state in the final checkpoint too (for a
      trainer whose later run may raise ``total`` and continue).
    stop_on_interrupt: stop at the next step after a Ctrl-C (False: the caller checks).

  Raises:
    NonFiniteLossError: before anything of the diverged step is saved.
    Interrupted: after a Ctrl-C, once the state is saved.
  """
  step = int(state["step"])
  end = total if end is None else min(end, total)
  if step >= end:
    return state
  saved = step if mngr is not None else None
  bar = tqdm.tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)
  bar.set_postfix_str("compiling the first step")
  if writer is not None:
    writer.reset_clock()

  def save(step: int, state: TrainState) -> None:
    if step == total:  # finished: only what resuming needs, once
      final = state if final_opt_state else {"step": state["step"],
                                             "params": state["params"]}
      checkpointing.save(mngr, step, final, force=True)
      checkpointing.keep_only(mngr, step)
    else:
      checkpointing.save(mngr, step, state, force=True)

  try:
    with cli.interruptible() as interrupted:
      batches = iter(batches)
      while step < end:
        if stop_on_interrupt and interrupted():  # e.g. pressed while loading
          raise Interrupted(what, saved) if saved else cli.Interrupted(
              f"{what}: interrupted before its first step; nothing to save. Rerun the "
              "same command to start.")
        state, metrics = update_step(state, frozen, next(batches), key, loss=loss,
                                     optimizer=optimizer)
        step += 1
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(what, step, metrics, fix=fix)  # before anything is saved
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        if writer is not None:
          writer.add(step, metrics, examples=examples, last=step == end, **fields(step))
        stopping = stop_on_interrupt and interrupted()
        if mngr is not None and (policy is None or policy.due(step) or step == end
                                 or stopping):
          save(step, state)
          saved = step
        if stopping and step < end:
          if mngr is not None:
            mngr.wait_until_finished()
          if saved is None:
            raise cli.Interrupted(f"{what}: interrupted at step {step}; nothing is saved.")
          raise Interrupted(what, step)
      if stop_on_interrupt and interrupted() and saved == step:
        # Pressed during the last step, which is saved: stop here, not in a next stage
        # (whose loop would see the flag before its first step).
        raise Interrupted(what, step)
  finally:
    bar.close()
    if mngr is not None:
      mngr.wait_until_finished()
  return state


def summary(rows: list[Mapping[str, Any]], *, key: str = "loss") -> str:
  """``"loss 1.23 -> 0.456 (steps 1-80)"`` from the metrics rows of one stage."""
  if not rows:
    return "no steps"
  return (f"{key} {rows[0][key]:.4g} -> {rows[-1][key]:.4g} "
          f"(steps {rows[0]['step']}-{rows[-1]['step']})")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Every row of ``workdir/metrics.jsonl`` (a torn last line is dropped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows
