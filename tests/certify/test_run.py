"""certify.run end to end on the tiny CLIP config: files, table, consistency."""

import json

import numpy as np
import pytest
from scipy import stats

from certify import run as run_lib
from configs import clip_tiny


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, sigmas=(0.25,), eps=(0.125, 0.5), chunk_size=16)
    config.data.update(num_examples=2, batch_size=2)
  workdir = tmp_path_factory.mktemp("certify_run")
  table = run_lib.run(config, str(workdir))
  return config, workdir, table


def test_outputs_written(result):
  _, workdir, table = result
  for name in ("results.jsonl", "table.md", "table.csv", "fcsb.png"):
    assert (workdir / name).stat().st_size > 0
  # 1 variant x 1 sigma x 2 references x 4 bounds rows in the table, 2 images each.
  assert len(table) == 8 and all(r["images"] == 2 for r in table)
  rows = [json.loads(l) for l in (workdir / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 16


def test_rows_follow_the_closed_form(result):
  config, workdir, _ = result
  for line in (workdir / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    z = stats.norm.isf(r["score_deficit"])
    for eps, b in r["inner_product_bound"].items():
      assert b == pytest.approx(2 * stats.norm.cdf(z - float(eps) / r["sigma"]) - 1, abs=1e-4)
    assert r["radius"] == pytest.approx(r["sigma"] * (z - stats.norm.ppf(0.75)), abs=1e-4)
    assert r["certificate"] == (r["bound"] != "point")


def test_certified_bounds_never_exceed_point_estimate(result):
  _, _, table = result
  by = {(r["reference"], r["bound"]): r for r in table}
  for ref in ("clean", "mean"):
    point = by[(ref, "point (estimate)")]["B@0.125"]
    for bound in ("hoeffding", "bernstein", "betting"):
      assert by[(ref, bound)]["B@0.125"] <= point + 1e-6
