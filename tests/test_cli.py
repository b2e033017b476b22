"""The command line a person types: bad input gives one short line naming the fix."""

import os
import pathlib
import signal
import subprocess
import sys
import time


from fsjax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny.py")


def _run(*args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=timeout)


def test_mistyped_key_names_the_nearest_ones():
  argv = ["run.py", f"--config={TINY}", "--workdir=/tmp/x", "--config.certify.nn=5"]
  line = cli.explain(argv, AttributeError("'nn'"))
  assert line.startswith("--config.certify.nn: not a key") and "--config.certify.n," in line


def test_unknown_section_lists_its_neighbours():
  line = cli.explain(["run.py", f"--config={TINY}", "--config.certfy.n=5"], KeyError("x"))
  assert "did you mean --config.certify.n" in line


def test_missing_config_file():
  line = cli.explain(["run.py", "--config=configs/nope.py"], OSError("x"))
  assert line == ("--config configs/nope.py: no such file (the configs are in configs/, "
                  "e.g. configs/default.py)")


def test_bad_values_fail_in_one_line_before_anything_loads(tmp_path):
  out = tmp_path / "run"
  p = _run("certify.run", f"--config={TINY}", f"--workdir={out}",
           "--config.certify.sigmas=(-0.5,)")
  assert p.returncode == 1
  assert p.stderr.splitlines()[0].startswith("error: config.certify: sigma must be")
  assert "Traceback" not in p.stderr and not out.exists()  # rejected before any output
  p = _run("certify.run", f"--config={TINY}", f"--workdir={out}", "--config.certify.nn=5")
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert len(p.stderr.strip().splitlines()) == 1 and "--config.certify.n" in p.stderr


def test_optional_fields_are_overridable_from_the_command_line(tmp_path):
  """default.py's encoder.checkpoint is a typed placeholder: a path parses, and a path
  that does not exist is an error that names it."""
  p = _run("certify.run", f"--config={ROOT / 'configs' / 'default.py'}",
           f"--workdir={tmp_path / 'run'}", "--config.encoder.checkpoint=/no/such/ckpt.pth",
           "--config.certify.n0=2", "--config.certify.n=2")
  assert "not supported for overriding" not in p.stderr
  assert p.returncode != 0 and "/no/such/ckpt.pth" in p.stderr


def test_empty_workdir_is_refused_in_one_line(tmp_path):
  """--workdir '' would write checkpoints and results into the current directory."""
  p = subprocess.run([sys.executable, "-m", "train.gsb", f"--config={TINY}", "--workdir="],
                     cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                            PYTHONPATH=str(ROOT)),
                     text=True, capture_output=True, timeout=240)
  assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
  assert p.stderr.startswith(
      "gsb.py: --workdir is empty; give a folder, e.g. --workdir=runs/default"), p.stderr
  assert not list(tmp_path.iterdir())  # nothing written here


def test_interruptible_nests_and_ctrl_c_is_one_line():
  """Nested interruptible() share one flag (a Ctrl-C while loading reaches the loop that
  starts later); the line printed for a Ctrl-C is the program's own when it has one."""
  with cli.interruptible() as outer:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    with cli.interruptible() as inner:
      assert inner() and outer()
  assert cli.interrupted_line("certify.run", KeyboardInterrupt()) == (
      "certify.run: interrupted (Ctrl-C); nothing more was saved.")
  assert cli.interrupted_line("x", cli.Interrupted("x: saved at step 3")) == (
      "x: saved at step 3")
