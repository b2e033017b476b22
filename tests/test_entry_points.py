"""Every entry point, end to end, on configs/clip_tiny.py as it is (no hand patching).

The order is a user's: train the booster, certify with it (Table 1), train the heads,
certify predictions (Table 2), attack (Table 4), audit. Each step checks its files and
one number against an independent computation where one is cheap.
"""

import json

import pytest
from scipy import stats

from certify import audit
from certify import robustness
from certify import run as certify_run
from certify import table2
from configs import clip_tiny
from train import gsb as train_gsb
from train import head as train_head


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("entry_points")


@pytest.fixture(scope="module")
def config(workdir):
  config = clip_tiny.get_config()
  config.gsb.checkpoint = str(workdir / "gsb")
  return config


@pytest.fixture(scope="module")
def trained_gsb(config, workdir):
  train_gsb.main(config, str(workdir / "gsb"))
  return workdir / "gsb"


def test_clip_tiny_is_complete():
  config = clip_tiny.get_config()
  for section in ("encoder", "data", "train_data", "test_data", "certify", "prediction",
                  "gsb", "attack", "audit"):
    assert section in config, section
  with pytest.raises(ValueError, match="no argument"):
    clip_tiny.get_config("runlocal")


def test_train_gsb_then_certify_run(config, trained_gsb, workdir):
  rows = [json.loads(l) for l in (trained_gsb / "metrics.jsonl").read_text().splitlines()]
  assert {r["stage"] for r in rows} == {"denoiser", "mapper"}
  out = workdir / "table1"
  certify_run.main(config, str(out))
  results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert {r["variant"] for r in results} == {"FS", "FS+D", "FS+M", "FS+D+M"}
  for name in ("table.md", "table.csv", "fcsb.png", "certified.png", "config.json"):
    assert (out / name).stat().st_size > 0
  # Independent check of the closed form (Theorem 3.2) on every certified row:
  # B(eps) = 2 Phi(Phi^-1(L) - eps / sigma) - 1 with L = 1 - deficit.
  for r in results[:40]:
    for eps, b in r["inner_product_bound"].items():
      lcb = 1.0 - r["score_deficit"]
      if 1e-6 < lcb < 1 - 1e-6:
        expected = 2 * stats.norm.cdf(stats.norm.ppf(lcb) - float(eps) / r["sigma"]) - 1
        assert b == pytest.approx(expected, abs=2e-5)


def test_train_head_then_table2(config, trained_gsb, workdir):
  out = workdir / "table2"
  train_head.main(config, str(out))
  meta = json.loads((out / "heads.json").read_text())
  assert meta["encoder"] == "FS+D+M" and len(meta["classes"]) == 3
  table2.run_prediction(config, str(out))  # python -m certify.table2
  rows = [json.loads(l) for l in (out / "prediction_results.jsonl").read_text().splitlines()]
  assert {r["method"] for r in rows} == {"FS", "RS"}
  assert {r["variant"] for r in rows} == {"FS+D+M"}
  assert len(rows) == 2 * len(config.certify.sigmas) * 3 * 2


def test_robustness(config, trained_gsb, workdir):
  out = workdir / "table4"
  table = robustness.run(config, str(out), "pgd")
  # fsjax.attacks.build_rows: the smoothed row, then the same on the boosted encoder.
  assert [r["variant"] for r in table] == ["original", "smoothed", "smoothed + GSB (FS+D+M)"]
  assert (out / "robustness.md").read_text().startswith("Table 4")
  for r in table:
    assert 0.0 <= r["pgd ASR"] <= 1.0 and -1.0 <= r["pgd FCS"] <= 1.0


def test_audit(config, trained_gsb, workdir):
  out = workdir / "audit"
  with config.unlocked():
    # The program end to end, not the audit's statistics (tests/certify/test_audit.py):
    # one variant, one reference, two radii, two images.
    config.audit.update(variants=("FS+D+M",), references=("mean",), eps_fractions=(0.5, 1.0),
                        num_images=2, steps=3, measure_n=128)
  summary = audit.run(config, str(out))
  assert summary["violations_k_sigma"] == 0
  assert (out / "audit.md").read_text().startswith("# Soundness audit")
  # The audit certified with config.certify's alpha (the section leaves it unset).
  rows = [json.loads(l) for l in (out / "audit.jsonl").read_text().splitlines()]
  assert rows and {r["alpha"] for r in rows} == {config.certify.alpha}
