"""What every trainer shares: the jitted step, the NaN guard, metrics, config checks,
checkpoint timing and a clean Ctrl-C.

A trainer (``train.gsb``, ``train.head``, ``train.llava``) builds its loss and optimiser,
then runs :func:`make_update_step`'s jitted, donating step in its own loop, and uses:

* :func:`check_finite` before anything of a step is saved (:class:`NonFiniteLossError`);
* :class:`MetricsWriter`: averaged metrics appended to ``workdir/metrics.jsonl``;
* :func:`check_config` / :func:`write_config`: ``workdir/config.json``, and a refusal to
  resume a workdir started with another config (naming every difference);
* :class:`CheckpointPolicy`: save every ``every_steps`` steps *and* every
  ``every_seconds`` seconds (so a slow CPU run never loses more than a few minutes);
* :func:`interruptible`: Ctrl-C (SIGINT) does not kill the process mid-step or
  mid-compilation; the loop finishes its step, saves, and raises :class:`Interrupted`,
  which the entry point turns into "saved at step N; rerun the same command to resume".

Noise keys are ``fold_in(stage_key, step)``: a function of the step alone, so a resumed
run draws exactly the noise an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import optax

TrainState = dict[str, Any]  # {"step": int32 [], "params": ..., "opt_state": ...}
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss, gradient or parameter."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C arrived; the loop saved its state at ``step`` and stopped."""

  def __init__(self, what: str, step: int):
    super().__init__(f"{what}: interrupted, saved at step {step}; rerun the same command "
                     "to resume from there.")
    self.step = step


def make_update_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """One jitted update ``(state, frozen, batch, key) -> (state, metrics)``.

  ``loss_fn(params, frozen, batch, key) -> (loss, {part: value})``. The state is donated
  (its buffers are reused for the new state). The step's key is ``fold_in(key, step)``.
  """
  def step(state: TrainState, frozen, batch, key):
    k = jax.random.fold_in(key, state["step"])
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, batch, k)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
               # Non-finite parameters are caught at the step that makes them.
               "param_norm": optax.tree.norm(params)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return jax.jit(step, donate_argnums=0)


def check_finite(what: str, step: int, metrics: Mapping[str, float], *, fix: str) -> None:
  """Raises :class:`NonFiniteLossError` naming what diverged, the step and the metrics."""
  if all(math.isfinite(v) for v in metrics.values()):
    return
  parts = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
  raise NonFiniteLossError(
      f"{what} diverged at step {step}: {parts}. Nothing of this step was saved; the "
      f"latest checkpoint is older. {fix}")


def differences(a: Any, b: Any, prefix: str = "config") -> list[str]:
  """Every leaf where two JSON-like trees differ, as ``"path: old in the workdir, new now"``."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += differences(a.get(k), b.get(k), f"{prefix}.{k}")
    return out
  return [] if a == b else [f"{prefix}: {a!r} in the workdir, {b!r} now"]


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
  diff = differences(comparable(stored), comparable(as_json(config)))
  if diff:
    raise ValueError(
        f"workdir {workdir} holds a {what} run started with another config, so it cannot "
        "be resumed: " + "; ".join(diff) + ". Use a fresh --workdir, or the old config.")


def write_config(config, workdir: str) -> None:
  """Writes ``workdir/config.json`` once, atomically (a half-written one never exists)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
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


@contextlib.contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
  """``with interruptible() as stop: ... if stop(): save; raise Interrupted(...)``.

  While inside, SIGINT only sets a flag (a second Ctrl-C interrupts at once, as usual):
  an XLA compilation or a step is never cut in half, and the loop saves before stopping.
  """
  pressed = []
  previous = signal.getsignal(signal.SIGINT)

  def handler(signum, frame):
    if pressed:  # the second Ctrl-C: the user insists
      signal.signal(signal.SIGINT, previous)
      raise KeyboardInterrupt
    pressed.append(signum)
    print("\nCtrl-C: finishing the current step, then saving (Ctrl-C again to abort "
          "without saving)...", flush=True)

  try:
    signal.signal(signal.SIGINT, handler)
    installed = True
  except ValueError:  # not the main thread: leave SIGINT alone
    installed = False
  try:
    yield lambda: bool(pressed)
  finally:
    if installed:
      signal.signal(signal.SIGINT, previous)
