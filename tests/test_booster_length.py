"""benchmarks/booster_length.py: certified radius against GSB training length, end to end."""

import json

import numpy as np
import pytest

from benchmarks import booster_length
from configs import clip_tiny
from configs import default as default_config
from train import gsb as train_gsb


def test_scaled_multiplies_every_stage_and_leaves_the_config_alone():
  config = default_config.get_config()
  before = train_gsb.stage_options(config, "denoiser"), train_gsb.stage_options(config, "mapper")
  four = booster_length.scaled(config, 4)
  assert four.gsb.denoiser.epochs == 4 * before[0].epochs
  assert four.gsb.denoiser.warmup_epochs == 4 * before[0].warmup_epochs
  assert four.gsb.mapper.epochs == 4 * before[1].epochs
  assert four.gsb.denoiser.learning_rate == before[0].learning_rate
  assert config.gsb.denoiser.epochs == before[0].epochs  # the caller's config unchanged
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="--lengths"):
      booster_length.scaled(config, bad)


def test_a_length_trains_k_times_the_steps_and_its_row_is_certify_runs_radii(tmp_path, capsys):
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, sigmas=(0.25,), eps=(0.125, 0.5))
    config.gsb.update(checkpoint_every=1000, log_every=1000)
  booster_length.main(config, str(tmp_path), ["2"], images=2)
  out = capsys.readouterr().out
  # 2x: twice the epochs of every stage (an independent count: epochs x batches per epoch).
  dataset = train_gsb.training_images(config)
  for stage, epochs in (("warmup", config.gsb.denoiser.get("warmup_epochs", 0)),
                        ("denoiser", config.gsb.denoiser.epochs),
                        ("mapper", config.gsb.mapper.epochs)):
    per_epoch = train_gsb.batches_per_epoch(dataset, config.gsb[
        "denoiser" if stage == "warmup" else stage].batch_size)
    got = train_gsb._final_step(str(tmp_path / "x2"), stage) or 0  # pylint: disable=protected-access
    assert got == 2 * epochs * per_epoch, stage
  # The table's radii are the averages of certify.run's own per-image rows.
  lines = [l for l in out.splitlines() if l.startswith("| 2x")]
  assert len(lines) == 1
  cells = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = [json.loads(l) for l in
          (tmp_path / "x2" / "table1" / "results.jsonl").read_text().splitlines()]
  radii = {}
  for v, name in enumerate(booster_length.VARIANTS):
    radii[name] = np.mean([max(r["radius"], 0.0) for r in rows if r["variant"] == name
                           and r["reference"] == "mean" and r["bound"] == "betting"])
    assert float(cells[5 + v]) == pytest.approx(radii[name], abs=5e-4)
  if radii["FS"] > 0:
    assert cells[9] == f"{radii['FS+D+M'] / radii['FS']:.2f}x"
  assert (tmp_path / "booster_length.png").stat().st_size > 0
  assert lines[0] in (tmp_path / "booster_length.md").read_text()
  # Everything resumes: a second call trains and certifies nothing, and says the same.
  timing = (tmp_path / "x2" / booster_length.TIMING_FILE).read_text()
  booster_length.main(config, str(tmp_path), ["2"], images=2)
  assert (tmp_path / "x2" / booster_length.TIMING_FILE).read_text() == timing
  assert lines[0] in capsys.readouterr().out
