"""Pod runs on one machine: two processes (gloo CPU collectives, a localhost coordinator)
against one process, for certify.run and train.gsb on configs/clip_tiny.py."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from certify import report
from certify import run as run_lib
from configs import clip_tiny
from fsjax import pod
from tests.certify import test_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip_tiny.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pod(module: str, workdir, *flags, processes: int = 2, timeout: float = 600):
  """``python -m module`` as ``processes`` processes of one pod; their (rc, stdout, stderr)."""
  port = _free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{
        pod.ADDRESS: f"127.0.0.1:{port}", pod.COUNT: str(processes), pod.INDEX: str(i)})
    procs.append(subprocess.Popen(
        [sys.executable, "-m", module, f"--config={TINY}", f"--workdir={workdir}", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_incomplete_pod_variables_are_one_line(monkeypatch):
  monkeypatch.setenv(pod.ADDRESS, "127.0.0.1:1234")
  monkeypatch.delenv(pod.COUNT, raising=False)
  monkeypatch.setenv(pod.INDEX, "0")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES not set"):
    pod.initialize()
  monkeypatch.setenv(pod.COUNT, "2")
  monkeypatch.setenv(pod.INDEX, "2")
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in 0 \.\. "):
    pod.initialize()


def test_certify_run_on_two_processes_writes_what_one_process_writes(tmp_path):
  """Two processes certify one batch each; process 0 alone writes results.jsonl (in the
  order of one process), the tables and the plots; the rows and tables are one process's,
  bit for bit."""
  flags = ("--config.certify.n0=8", "--config.certify.n=32", "--config.certify.chunk_size=16",
           "--config.data.num_examples=2", "--config.data.batch_size=1")
  workdir = tmp_path / "pod"
  (rc0, out0, err0), (rc1, out1, err1) = _pod("certify.run", workdir, *flags)
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  assert "Table 1, headline rows" in out0 and "Table 1" not in out1  # one writer
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, chunk_size=16)
    config.data.update(num_examples=2, batch_size=1)
  run_lib.run(config, str(tmp_path / "one"))
  def rows(folder):
    return list(map(test_run.numbers_only, report.read_rows(folder / "results.jsonl")))
  assert len(rows(workdir)) == 16 and rows(workdir) == rows(tmp_path / "one")
  for name in ("table.md", "table.csv", "config.json"):
    assert (workdir / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_train_gsb_on_two_processes_trains_what_one_process_trains(tmp_path):
  """Each process reads its half of every global batch (make_array_from_process_local_data
  into the global mesh); orbax saves the global state from both; process 0 alone writes
  config.json and metrics.jsonl; the losses are one process's (float tolerance) and the
  booster loads."""
  from fsjax.gsb import checkpoint  # pylint: disable=g-import-not-at-top
  from train import gsb  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "pod"
  # The denoiser stage only (one compilation per process), 2 steps of 4 images.
  (rc0, out0, err0), (rc1, _, err1) = _pod("train.gsb", workdir, "--config.gsb.mapper.epochs=0",
                                           "--config.train_data.num_examples=8")
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  assert f"booster saved to {workdir} (denoiser/2)" in out0
  config = clip_tiny.get_config()
  with config.unlocked():
    config.gsb.mapper.epochs = 0
    config.train_data.num_examples = 8
  gsb.train_and_evaluate(config, str(tmp_path / "one"))
  pod_rows, one_rows = loop.read_metrics(str(workdir)), loop.read_metrics(str(tmp_path / "one"))
  assert [(r["stage"], r["step"]) for r in pod_rows] == [
      (r["stage"], r["step"]) for r in one_rows] == [("denoiser", 1), ("denoiser", 2)]
  for a, b in zip(pod_rows, one_rows):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
      (tmp_path / "one" / "config.json").read_text())
  assert set(checkpoint.load(workdir)) == {"denoiser"}
