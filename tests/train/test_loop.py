"""train.loop: the pieces every trainer shares (Ctrl-C on a real training run, through
the command line: tests/train/test_gsb.py)."""

import dataclasses
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import optax
import pytest

from fsjax import checkpointing
from fsjax import cli
from train import loop


def test_interruptible_turns_sigint_into_a_flag():
  previous = signal.getsignal(signal.SIGINT)
  with loop.interruptible() as stop:
    assert not stop()
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt mid-step
    time.sleep(0.05)
    assert stop()
  assert signal.getsignal(signal.SIGINT) is previous  # the usual handler is back


def test_checkpoint_policy_counts_steps_and_seconds():
  p = loop.CheckpointPolicy(every_steps=5, every_seconds=3600)
  assert [s for s in range(1, 12) if p.due(s)] == [5, 10]
  p = loop.CheckpointPolicy(every_steps=1000, every_seconds=0.0)
  assert p.due(1) and p.due(2)  # every step once the time has passed


def test_check_finite_and_config_differences(tmp_path):
  loop.check_finite("x", 3, {"loss": 1.0}, fix="")
  with pytest.raises(loop.NonFiniteLossError, match="x diverged at step 3: loss=nan"):
    loop.check_finite("x", 3, {"loss": float("nan")}, fix="Lower it.")
  assert cli.config_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == [
      "config.b.c: 2 in the workdir, 3 now"]
  there = {"seed": 0, "certify": {"n": 4, "bounds": ["betting"], "old": 1}, "gone": {"a": 1}}
  here = {"seed": 0, "certify": {"n": 8, "bounds": ["betting"], "futility": "predictive"}}
  assert cli.config_differences(there, here, prefix="") == [
      "certify.futility: absent in the workdir, 'predictive' now",
      "certify.n: 4 in the workdir, 8 now",
      "certify.old: 1 in the workdir, absent now",
      "gone: a section in the workdir, absent now"]
  assert cli.config_differences(here, json.loads(json.dumps(here))) == []
  loop.write_config({"seed": 0, "lr": 1}, str(tmp_path))
  loop.check_config({"seed": 0, "lr": 1}, str(tmp_path), comparable=dict, what="toy")
  with pytest.raises(ValueError, match="config.lr: 1 in the workdir, 2 now"):
    loop.check_config({"seed": 0, "lr": 2}, str(tmp_path), comparable=dict, what="toy")


@dataclasses.dataclass(frozen=True)
class _Quadratic:
  """A loss for a one-parameter model: hashable, as :func:`loop.update_step` wants."""

  def __call__(self, params, frozen, batch, key):
    del frozen, key
    value = jnp.sum((params["w"] - batch) ** 2)
    return value, {}


def test_ctrl_c_in_a_stages_last_step_stops_there(tmp_path):
  """A Ctrl-C during the last step of a stage is saved with that step and stops the run,
  rather than being dropped (the next stage's loop would start with a fresh flag) or
  reported by the next stage as "before its first step; nothing to save"."""
  optimizer = loop.Optimizer.of(optax.sgd, learning_rate=0.1)
  state = loop.init_state({"w": jnp.zeros(2)}, optimizer)
  total = 3

  def batches():
    for step in range(1, total + 1):
      if step == total:  # while the last step runs
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
      yield jnp.ones(2)

  mngr = checkpointing.manager(str(tmp_path), "stage")
  try:
    with pytest.raises(loop.Interrupted, match="saved at step 3; rerun") as e:
      loop.run(what="toy", desc="toy", state=state, total=total, batches=batches(),
               frozen=None, key=jax.random.key(0), loss=_Quadratic(), optimizer=optimizer,
               fix="", examples=1, mngr=mngr)
    assert e.value.step == total and mngr.latest_step() == total
  finally:
    checkpointing.close(mngr)
