"""certify.run end to end on the tiny CLIP config: files, table, consistency."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections

import numpy as np
import pytest
from scipy import stats

from certify import report
from certify import run as run_lib
from configs import clip_tiny
from configs import common
from fsjax import encoders


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, sigmas=(0.25,), eps=(0.125, 0.5), chunk_size=16)
    config.data.update(num_examples=2, batch_size=2)
  workdir = tmp_path_factory.mktemp("certify_run")
  bars = []  # the run's progress bars, recorded

  class Recorded(report.SampleProgress):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(report, "SampleProgress", Recorded)
    table = run_lib.run(config, str(workdir))
  return config, workdir, table, bars


def test_outputs_written(result):
  _, workdir, table, _ = result
  for name in ("results.jsonl", "table.md", "table.csv", "fcsb.png"):
    assert (workdir / name).stat().st_size > 0
  # 1 variant x 1 sigma x 2 references x 4 bounds rows in the table, 2 images each.
  assert len(table) == 8 and all(r["images"] == 2 for r in table)
  rows = [json.loads(l) for l in (workdir / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 16


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
      chunk_size=512)))
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
