"""train.loop: the pieces every trainer shares (Ctrl-C on a real training run, through
the command line: tests/train/test_gsb.py)."""

import os
import signal
import time

import pytest

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
  assert loop.differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == [
      "config.b.c: 2 in the workdir, 3 now"]
  loop.write_config({"seed": 0, "lr": 1}, str(tmp_path))
  loop.check_config({"seed": 0, "lr": 1}, str(tmp_path), comparable=dict, what="toy")
  with pytest.raises(ValueError, match="config.lr: 1 in the workdir, 2 now"):
    loop.check_config({"seed": 0, "lr": 2}, str(tmp_path), comparable=dict, what="toy")
