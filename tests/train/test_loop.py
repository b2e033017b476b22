"""train.loop: the pieces every trainer shares, and Ctrl-C on a real training run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def _train(workdir):
  cmd = [sys.executable, "-m", "train.gsb", "--config=configs/clip_tiny.py",
         f"--workdir={workdir}", "--config.gsb.denoiser.epochs=30",
         "--config.gsb.checkpoint_every=1000"]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _rows(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path):
  workdir = tmp_path / "gsb"
  proc = _train(workdir)
  deadline = time.monotonic() + 300
  while len(_rows(workdir)) < 3 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "Traceback" not in err
  saved = int(out.split("saved at step ")[1].split(";")[0])
  assert saved >= 3 and "rerun the same command to resume" in out
  assert (workdir / "denoiser" / str(saved)).is_dir()  # the checkpoint of that step
  rows_before = _rows(workdir)
  proc = _train(workdir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert f"resuming {workdir}" in out
  rows = _rows(workdir)[len(rows_before):]
  denoiser = [r["step"] for r in rows if r["stage"] == "denoiser"]
  assert denoiser[0] == saved + 1 and denoiser[-1] == 120  # 30 epochs x 4 batches
  assert [r["step"] for r in rows if r["stage"] == "mapper"][-1] == 4
