"""certify.run end to end on the tiny CLIP config: files, table, consistency."""

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from certify import report
from certify import run as run_lib
from configs import clip_tiny
from configs import common
from fsjax import cli
from fsjax import encoders
from fsjax import variants as variants_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, sigmas=(0.25,), eps=(0.125, 0.5), chunk_size=16,
                          norm_aware=True)
    config.data.update(num_examples=2, batch_size=2)
  workdir = tmp_path_factory.mktemp("certify_run")
  bars = []  # the run's progress bars, recorded

  class Recorded(report.SampleProgress):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

  build = variants_lib.encoder_variants
  built = _VARIANTS.setdefault("result", [])  # the run's encoders: reused, nothing recompiles
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(report, "SampleProgress", Recorded)
    patch.setattr(variants_lib, "encoder_variants", lambda c: built.extend(build(c)) or built)
    table = run_lib.run(config, str(workdir))
  return config, workdir, table, bars


_VARIANTS = {}


def test_a_rerun_keeps_what_is_done_and_a_resumed_run_ends_with_the_same_files(
    result, tmp_path, monkeypatch):
  """Same config, same folder: nothing is certified again (no encoder is even called);
  from a torn prefix of the rows the group is certified again and the rows, table.md and
  table.csv are the uninterrupted run's, byte for byte."""
  config, workdir, table, _ = result
  names = ("results.jsonl", "table.md", "table.csv", "config.json")
  before = {n: (workdir / n).read_bytes() for n in names}
  variants = _VARIANTS["result"]
  monkeypatch.setattr(variants_lib, "encoder_variants", lambda config: variants)
  monkeypatch.setattr(run_lib.certify, "estimate_scores", None)  # would raise if called
  assert run_lib.run(config, str(workdir)) == table
  assert {n: (workdir / n).read_bytes() for n in names} == before
  monkeypatch.undo()
  resumed = tmp_path / "resumed"
  resumed.mkdir()
  (resumed / "config.json").write_bytes(before["config.json"])
  lines = before["results.jsonl"].decode().splitlines(keepends=True)
  (resumed / "results.jsonl").write_text("".join(lines[:7]) + lines[7][:30])  # killed
  monkeypatch.setattr(variants_lib, "encoder_variants", lambda config: variants)
  assert run_lib.run(config, str(resumed)) == table
  def key(path):
    return list(map(numbers_only, report.read_rows(path, key=run_lib.ROW_KEY)))
  assert key(resumed / "results.jsonl") == key(workdir / "results.jsonl")
  assert (resumed / "table.md").read_bytes() == before["table.md"]
  assert (resumed / "table.csv").read_bytes() == before["table.csv"]


def numbers_only(row):
  """A row without what says which code computed it (the git revision moves between the
  runs of a test in a working tree)."""
  if isinstance(row, dict):
    return {k: numbers_only(v) for k, v in row.items() if k not in ("git", "git_dirty", "fsjax")}
  return row


# certify.run on the tiny config, 2 images in 2 batches (2 groups), few samples.
_RESUME_FLAGS = ("--config.certify.n0=8", "--config.certify.n=32",
                 "--config.certify.chunk_size=16", "--config.data.num_examples=2",
                 "--config.data.batch_size=1")


def popen_interruptible(*args, **kwargs) -> subprocess.Popen:
  """``subprocess.Popen`` whose child takes Ctrl-C as in a terminal, also when the tests
  run as a background job (started with SIGINT ignored, which a child inherits)."""
  ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  if ignored:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the child: SIG_DFL
  try:
    return subprocess.Popen(*args, **kwargs)
  finally:
    if ignored:
      signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(workdir, err_path):
  with open(err_path, "w") as err:
    return popen_interruptible(
        [sys.executable, "-m", "certify.run", f"--config={ROOT}/configs/clip_tiny.py",
         f"--workdir={workdir}", *_RESUME_FLAGS], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=err, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _wait_for(p, path, text, timeout=300):
  deadline = time.monotonic() + timeout
  while text not in path.read_text():
    assert p.poll() is None and time.monotonic() < deadline, path.read_text()[-3000:]
    time.sleep(0.05)


def test_ctrl_c_and_kill_then_the_same_command_give_the_uninterrupted_results(tmp_path):
  """Issue 21: Ctrl-C while the first batch certifies (its rows are saved; exit 130, one
  line), kill -9 at a random moment of the resumed run (and a row torn as a kill mid-write
  leaves it), then the same command: exit 0, the earlier rows kept, and the rows and table
  of an uninterrupted run of the same config, bit for bit."""
  workdir, err = tmp_path / "run", tmp_path / "stderr"
  p = _start(workdir, err)
  _wait_for(p, err, "(compiling first)")  # the first of the two batches is certifying
  p.send_signal(signal.SIGINT)
  assert p.wait(timeout=300) == cli.INTERRUPTED_EXIT_STATUS, err.read_text()[-3000:]
  text = err.read_text()
  lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip()]
  assert "Traceback" not in text and lines[-1] == (
      f"certify.run: interrupted (Ctrl-C); 1 of 2 images are certified in "
      f"{workdir}/results.jsonl; rerun the same command to certify the rest."), text
  first = (workdir / "results.jsonl").read_bytes()
  assert first.count(b"\n") == 8 and not (workdir / "table.md").exists()
  p = _start(workdir, err)  # resumes; killed at a random moment
  time.sleep(random.uniform(0.0, 8.0))
  p.kill()
  assert p.wait(timeout=60) in (-signal.SIGKILL, 0)
  assert (workdir / "results.jsonl").read_bytes().startswith(first)
  with open(workdir / "results.jsonl", "a") as f:
    f.write('{"variant": "FS", "sigma": 0.5, "ima')  # what a kill mid-row leaves
  p = _start(workdir, err)
  assert p.wait(timeout=300) == 0, err.read_text()[-3000:]
  assert (workdir / "results.jsonl").read_bytes().startswith(first)
  # The uninterrupted run, in this process.
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, chunk_size=16)
    config.data.update(num_examples=2, batch_size=1)
  table = run_lib.run(config, str(tmp_path / "whole"))
  key = lambda path: report.read_rows(path, key=run_lib.ROW_KEY)  # noqa: E731
  got, whole = key(workdir / "results.jsonl"), key(tmp_path / "whole" / "results.jsonl")
  assert len(got) == len(whole) == 16
  assert list(map(numbers_only, got)) == list(map(numbers_only, whole))
  for name in ("table.md", "table.csv", "config.json"):
    assert (workdir / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
  assert len(table) == 8 and all(r["images"] == 2 for r in table)


def test_outputs_written(result):
  _, workdir, table, _ = result
  for name in ("results.jsonl", "table.md", "table.csv", "fcsb.png"):
    assert (workdir / name).stat().st_size > 0
  # 1 variant x 1 sigma x (2 references x 4 bounds + the norm-aware row), 2 images each.
  assert len(table) == 9 and all(r["images"] == 2 for r in table)
  rows = [json.loads(l) for l in (workdir / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 18
  # The inner-product rows keep their schema (the fixed-n output is unchanged).
  old_keys = ["variant", "image", "sigma", "reference", "bound", "certificate", "label", "score",
              "score_deficit", "inner_product_bound", "radius", "cos", "samples"]
  # ... plus the record certify.verify re-derives them from (certify.records), last.
  assert [list(r) for r in rows if "cosine_kind" not in r] == [old_keys + ["record"]] * 16
  assert {r["bound"] for r in table} >= {"betting + norm"}
  assert all(f"cos@{e:g}" in r for r in table for e in (0.125, 0.5))


def _norm_aware_exact(deficit, norm_upper, eps, sigma, cos):
  """B, U, B / U and the radius of docs/method.md 2c with scipy (independent of certify)."""
  z = stats.norm.isf(deficit)
  b = lambda e: 2 * stats.norm.cdf(z - e / sigma) - 1  # noqa: E731
  u = lambda e: 2 * stats.norm.cdf(stats.norm.ppf((1 + norm_upper) / 2) + e / sigma) - 1  # noqa: E731
  cosine = b(eps) / u(eps) if b(eps) >= 0 else -1.0
  if b(0.0) / u(0.0) < cos:
    radius = 0.0
  else:  # B / U decreases in eps: the root of B / U = cos
    radius = optimize.brentq(lambda e: b(e) - cos * u(e), 0.0, sigma * z)
  return b(eps), u(eps), cosine, radius


def test_norm_aware_rows_follow_docs_method_2c(result):
  """The norm-aware row's bounds recomputed from its recorded 1 - L and N with scipy;
  its cosine bound is >= its own inner-product bound where that is >= 0 (U <= 1), and the
  table's cos@eps column averages them."""
  config, workdir, table, _ = result
  rows = [json.loads(l) for l in (workdir / "results.jsonl").read_text().splitlines()]
  norm_rows = [r for r in rows if r.get("cosine_kind") == "norm-aware"]
  assert len(norm_rows) == 2 and all(r["reference"] == "mean" for r in norm_rows)
  for r in norm_rows:
    assert 0.0 <= r["norm_upper"] <= 1.0 and r["certificate"]
    assert r["samples"] == config.certify.n0 + config.certify.n
    _, _, _, radius = _norm_aware_exact(r["score_deficit"], r["norm_upper"], 0.0,
                                        r["sigma"], r["cos"])
    assert r["radius"] == pytest.approx(radius, abs=1e-3)
    for eps, cosine in r["cosine_bound"].items():
      b, u, exact, _ = _norm_aware_exact(r["score_deficit"], r["norm_upper"], float(eps),
                                         r["sigma"], r["cos"])
      assert r["inner_product_bound"][eps] == pytest.approx(b, abs=1e-4)
      assert cosine == pytest.approx(exact, abs=1e-4)
      if b >= 0:
        assert cosine >= b - 1e-6 and u <= 1.0
  row = next(t for t in table if t["bound"] == "betting + norm")
  for e in (0.125, 0.5):
    assert row[f"cos@{e:g}"] == pytest.approx(
        np.mean([r["cosine_bound"][str(e)] for r in norm_rows]), abs=1e-6)
  # An inner-product row's cos@eps is Theorem 3.2's B where B >= 0, else the vacuous -1.
  for t in table:
    if not t["bound"].endswith("+ norm"):
      rs = [r for r in rows if "cosine_kind" not in r and r["reference"] == t["reference"]
            and run_lib._bound_label(r["bound"]) == t["bound"]]
      for e in ("0.125", "0.5"):
        bs = [r["inner_product_bound"][e] for r in rs]
        assert t[f"cos@{e}"] == pytest.approx(np.mean([b if b >= 0 else -1.0 for b in bs]),
                                              abs=1e-6)


def test_sequential_mode_through_the_cli(tmp_path):
  """config.certify.mode=sequential end to end through the command line: rows record the
  samples each image used (n0 + a multiple of the chunk, at most n0 + n_max), the table
  their mean, and the bounds follow Theorem 3.2 from the recorded deficit."""
  workdir = tmp_path / "seq"
  flags = ["--config.certify.mode=sequential", "--config.certify.norm_aware=True",
           "--config.certify.n=256",
           "--config.certify.sequential_chunk_size=32", "--config.certify.slots=2",
           "--config.certify.references=('mean',)", "--config.data.num_examples=3",
           "--config.data.batch_size=3"]
  done = subprocess.run([sys.executable, "-m", "certify.run", "--config",
                         "configs/clip_tiny.py", f"--workdir={workdir}", *flags],
                        capture_output=True, text=True, timeout=600, check=False,
                        cwd=pathlib.Path(__file__).resolve().parents[2])
  assert done.returncode == 0, done.stderr[-2000:]
  rows = report.read_rows(workdir / "results.jsonl")
  assert {(r["bound"], r["cosine_kind"]) for r in rows} == {
      ("betting (sequential)", "inner product"), ("betting (sequential)", "norm-aware")}
  assert len(rows) == 6 and all(r["mode"] == "sequential" for r in rows)
  for r in rows:
    assert 16 + 32 <= r["samples"] <= 16 + 256 and (r["samples"] - 16) % 32 == 0
    for eps, b in r["inner_product_bound"].items():
      z = stats.norm.isf(r["score_deficit"])
      assert b == pytest.approx(2 * stats.norm.cdf(z - float(eps) / r["sigma"]) - 1, abs=1e-4)
  text = (workdir / "table.md").read_text()
  assert "samples" in text and "Sequential mode" in text and "+ norm" in text


def test_check_config_names_the_new_keys():
  config = clip_tiny.get_config()
  for key, value, match in (("mode", "adaptive", "config.certify.mode"),
                            ("norm_aware_bound", "point", "norm_aware_bound"),
                            ("n", 33, "even")):
    bad = clip_tiny.get_config()
    with bad.unlocked():
      bad.certify.norm_aware = True
      bad.certify[key] = value
    with pytest.raises(ValueError, match=match):
      run_lib.check_config(bad)
  with config.unlocked():
    config.certify.update(mode="sequential", slots=0)
  with pytest.raises(ValueError, match="config.certify.slots"):
    run_lib.check_config(config)


def test_rows_follow_the_closed_form(result):
  config, workdir, _, _ = result
  for line in (workdir / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    z = stats.norm.isf(r["score_deficit"])
    for eps, b in r["inner_product_bound"].items():
      assert b == pytest.approx(2 * stats.norm.cdf(z - float(eps) / r["sigma"]) - 1, abs=1e-4)
    assert r["radius"] == pytest.approx(r["sigma"] * (z - stats.norm.ppf(0.75)), abs=1e-4)
    assert r["certificate"] == (r["bound"] != "point")


def test_certified_bounds_never_exceed_point_estimate(result):
  _, _, table, _ = result
  by = {(r["reference"], r["bound"]): r for r in table}
  for ref in ("clean", "mean"):
    point = by[(ref, "point (estimate)")]["B@0.125"]
    for bound in ("hoeffding", "bernstein", "betting"):
      assert by[(ref, bound)]["B@0.125"] <= point + 1e-6


# ----------------------------------------------------------------------------------------
# An independent oracle: a half-space encoder whose smoothed feature is known exactly.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class HalfSpaceEncoder(encoders.Encoder):
  """f(x) = e1 if <w, x - x0> >= 0 else e2 (||w|| = 1): f_s(x) = p e1 + (1 - p) e2,
  p = Phi(<w, x - x0> / sigma), so every Table 1 number has a closed form."""

  def tokens(self, params, x, *, sigma=None):
    t = jnp.sum((x - params["x0"]) * params["w"], axis=(1, 2, 3))
    e1, e2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    return jnp.where(t[:, None] >= 0, e1, e2)[:, None, :]


def test_table1_rows_match_the_half_space_closed_form():
  side, sigma, n = 4, 0.5, 4096
  rng = np.random.default_rng(0)
  w = rng.normal(size=(side, side, 3))
  w /= np.linalg.norm(w)
  x0 = np.full((side, side, 3), 0.5)
  # Signed distances t of the images to the hyperplane: p = Phi(t / sigma).
  ts = np.array([0.6, 0.3, 0.1])
  images = np.clip(x0[None] + ts[:, None, None, None] * w[None], 0, 1).astype(np.float32)
  ts = np.sum((images - x0) * w, axis=(1, 2, 3))  # after clipping (none clips here)
  params = {"w": jnp.asarray(w, jnp.float32), "x0": jnp.asarray(x0, jnp.float32)}
  config = ml_collections.ConfigDict(dict(seed=0, certify=common.certify_config(
      sigmas=(sigma,), eps=(0.1, 0.3), n0=256, n=n, bounds=("point", "betting"),
      chunk_size=512, norm_aware=False)))  # the norm's bound vs exact: test_norm.py
  variants = [("FS", HalfSpaceEncoder(resolution=side), params)]
  rows = list(run_lib.certify_images(variants, images, np.zeros(3, int), config,
                                     jax.random.PRNGKey(1)))
  p = stats.norm.cdf(ts / sigma)
  exact = {"clean": (1 + p) / 2,                           # u = f(x) = e1: h = (1 + p) / 2
           "mean": (1 + np.sqrt(p**2 + (1 - p) ** 2)) / 2}  # u = f_s / ||f_s||: the maximum
  for r in rows:
    h = exact[r["reference"]][r["image"]]
    se = np.sqrt(h * (1 - h) / n) + 1e-3  # Monte Carlo standard error of h, with slack
    if r["bound"] == "point":
      if r["reference"] == "clean":
        assert r["score"] == pytest.approx(h, abs=4 * se)
      else:  # the stage-1 direction is estimated: h_u <= the optimum, and close to it
        assert h - 6 * se <= r["score"] <= h + 4 * se
    else:  # a valid lower confidence bound: below the truth, not far below
      assert h - 0.05 <= r["score"] <= h + 1e-6
    for eps, b in r["inner_product_bound"].items():
      z = stats.norm.isf(r["score_deficit"])
      assert b == pytest.approx(2 * stats.norm.cdf(z - float(eps) / sigma) - 1, abs=1e-4)
      if r["bound"] != "point":  # the certified bound is below the exact one
        exact_b = 2 * stats.norm.cdf(stats.norm.ppf(h) - float(eps) / sigma) - 1
        assert b <= exact_b + 1e-6


def test_progress_says_compiling_then_counts_samples_times_images():
  progress = report.SampleProgress(100, "certify")
  advance = progress.task("FS, sigma 0.25", images=4, compile_key=("FS", (4, 8, 8, 3)))
  assert "compiling" in progress.bar.postfix  # until the first chunk is done
  advance(16)
  assert progress.bar.n == 64 and progress.bar.postfix == "FS, sigma 0.25"
  progress.task("FS, sigma 0.5", images=4, compile_key=("FS", (4, 8, 8, 3)))
  assert progress.bar.postfix == "FS, sigma 0.5"  # compiled already
  progress.grow(28)
  assert progress.bar.total == 128
  progress.bar.close()


def test_run_shows_one_bar_of_samples_times_images_that_reaches_its_total(result):
  """Issue 14: certify.run's one bar counts (n0 + n) noise samples x images per variant
  and sigma (8 + 32 samples x 2 images here), advanced chunk by chunk, to its end."""
  _, _, _, bars = result
  assert len(bars) == 1
  assert bars[0].bar.total == (8 + 32) * 2 and bars[0].bar.n == bars[0].bar.total
  assert bars[0].bar.unit == "sample"


def test_the_interrupted_and_resuming_lines_count_groups_of_unfinished_images():
  spans = [range(0, 4), range(4, 8)]
  groups = [(b, v, s) for b in range(2) for v in range(2) for s in range(2)]
  line = lambda left: run_lib._done_line(groups, left, spans, 8)  # pylint: disable=protected-access  # noqa: E731
  assert line(groups) == "0 of 8 images are certified"
  assert line(groups[3:]) == ("0 of 8 images are certified (3 of 8 variant x sigma groups "
                              "of the other 8 done)")
  assert line(groups[5:]) == ("4 of 8 images are certified (1 of 4 variant x sigma groups "
                              "of the other 4 done)")
  assert line([]) == "8 of 8 images are certified"
