"""The command line a person types: bad input gives one short line naming the fix."""

import os
import pathlib
import signal
import subprocess
import sys
import time


from fsjax import cli
from tests.certify import test_run

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
           "--config.certify.n0=2", "--config.certify.n=4")
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


def test_a_ctrl_c_under_run_is_never_lost(capfd):
  """Under :func:`cli.run`'s handler a Ctrl-C outside any loop raises at once and raises
  the flag, which stays up: a KeyboardInterrupt that Python swallowed while loading
  (raised in a finalizer, as in jax's gc callback) and one pressed between two loops are
  both seen by the next loop, and the swallowed one prints no traceback."""

  class Finalized:
    def __del__(self):  # a Ctrl-C arrives while a finalizer runs
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1.0)

  previous = signal.getsignal(signal.SIGINT)
  with cli._handling_ctrl_c():  # what run() installs around the program
    Finalized()  # its KeyboardInterrupt cannot propagate
    with cli.interruptible() as stop:  # the first loop
      assert stop()
    with cli.interruptible() as stop:  # and the one after it
      assert stop()
  assert signal.getsignal(signal.SIGINT) is previous
  assert "KeyboardInterrupt" not in capfd.readouterr().err
  with cli.interruptible() as stop:  # a new run starts with the flag down
    assert not stop()


# certify.run on the tiny config with few samples: what the output tests below run.
_SMALL = ("--config.certify.n0=8", "--config.certify.n=32", "--config.certify.chunk_size=16")


def _small_config():
  """The config ``certify.run --config=TINY *_SMALL`` runs with."""
  from configs import clip_tiny  # pylint: disable=g-import-not-at-top
  config = clip_tiny.get_config()
  config.certify.update(n0=8, n=32, chunk_size=16)
  return config


def _files(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_refused_runs_change_nothing_in_the_folder(tmp_path, make_folder_dataset):
  """A run refused for a missing checkpoint, an unreadable image or a folder holding
  another config's results exits in one line and leaves the folder as it was (config.json
  used to be replaced before the arguments were checked)."""
  out = tmp_path / "run"
  out.mkdir()
  (out / "table.md").write_text("an earlier run's table\n")
  (out / "config.json").write_text('{"seed": 1}\n')
  (out / "results.jsonl").write_text('{"image": 0, "variant": "FS"}\n')
  before = _files(out)
  images = make_folder_dataset(tmp_path / "images", classes=1, per_split=(("test", 4),))
  (images / "test" / "class_0" / "1.png").write_bytes(b"not a png")
  cases = {
      "holds results of a different config (config.json differs: attack: absent in the "
      "workdir, a section now; audit: ": (),
      "/no/such/booster": ("--config.gsb.checkpoint=/no/such/booster",),
      "class_0/1.png is not a readable image": (f"--config.data.name=folder:{images}",
                                               "--config.data.split=test"),
  }
  for expected, args in cases.items():
    if args:  # the other refusals, in a folder holding no rows
      (out / "results.jsonl").write_text("")
      before = _files(out)
    p = _run("certify.run", f"--config={TINY}", f"--workdir={out}", *_SMALL, *args)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[0].startswith("error: ") and expected in p.stderr, p.stderr
    assert _files(out) == before, expected


def test_empty_workdir_is_refused_by_the_programs_too(tmp_path):
  p = subprocess.run([sys.executable, "-m", "certify.run", f"--config={TINY}", "--workdir="],
                     cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                            PYTHONPATH=str(ROOT)),
                     text=True, capture_output=True, timeout=240)
  assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
  assert p.stderr.startswith("run.py: --workdir is empty; give a folder"), p.stderr
  assert not list(tmp_path.iterdir())


def test_ctrl_c_in_certify_run_is_one_line_and_keeps_the_old_rows(tmp_path):
  """A re-run into a folder of the same config appends (the old rows and a torn last
  line of a killed run: cut, the rest kept); Ctrl-C exits 130 with one line."""
  from certify import report  # pylint: disable=g-import-not-at-top
  out = tmp_path / "run"
  out.mkdir()
  report.save_config(_small_config(), out)
  old = '{"image": 0, "variant": "FS", "from": "the earlier run"}\n'
  (out / "results.jsonl").write_text(old + '{"image": 1, "vari')  # killed mid-row
  err = tmp_path / "stderr"
  with open(err, "w") as f:
    p = test_run.popen_interruptible([sys.executable, "-m", "certify.run", f"--config={TINY}",
                          f"--workdir={out}", *_SMALL], cwd=ROOT, stderr=f,
                         stdout=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 200
    while "certify:" not in err.read_text() and p.poll() is None and time.time() < deadline:
      time.sleep(0.2)  # the progress bar: the run is accepted and certifying
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=120)
  text = err.read_text()
  assert rc == cli.INTERRUPTED_EXIT_STATUS and "Traceback" not in text, text
  lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip()]
  assert lines[-1] in (  # before the one group started, or while it ran (it finishes)
      f"certify.run: interrupted (Ctrl-C); 0 of 4 images are certified in {out}/results.jsonl;"
      " rerun the same command to certify the rest.",
      f"certify.run: interrupted (Ctrl-C); 4 of 4 images are certified in {out}/results.jsonl;"
      " rerun the same command to write the tables and plots."), text
  assert "dropped a torn last row" in text
  assert (out / "results.jsonl").read_text().startswith(old)  # appended, not truncated
  assert report.read_rows(out / "results.jsonl")[0]["from"] == "the earlier run"
