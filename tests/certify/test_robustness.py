"""certify.robustness end to end on a toy encoder and Fashion-MNIST at 8 px."""

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from certify import robustness
from configs import common
from fsjax import attacks
from fsjax import encoders


@dataclasses.dataclass(frozen=True, eq=False)
class PatchEncoder(encoders.Encoder):
  """2x2 patches -> tanh(linear) tokens ``[B, 16, 6]``: cheap and easy to attack."""

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution) - 0.5
    b = x.shape[0]
    t = x.reshape(b, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 12)
    return jnp.tanh(t @ params["w"] + params["b"])


@encoders.register("test_robustness_patch")
def _build(config):
  rng = np.random.default_rng(config.get("seed", 0))
  return PatchEncoder(resolution=8), {
      "w": jnp.asarray(rng.normal(size=(12, 6)) * 2.0, jnp.float32),
      "b": jnp.asarray(rng.normal(size=(6,)) * 0.1, jnp.float32)}


def _config(attack=None, **robustness):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(name="test_robustness_patch", seed=0))
  config.test_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="test", image_size=8, batch_size=8, seed=0))
  config.attack = common.attack_config(steps=10, n=4, eot_samples=2, num_images=4,
                                       batch_size=4, examples=2)
  config.attack.update(attack or {})
  config.robustness = common.robustness_config(prototypes_per_class=4)
  config.robustness.update(robustness)
  return config


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  config = _config()
  workdir = tmp_path_factory.mktemp("robustness")
  table = robustness.run(config, str(workdir), "pgd,attackvlm")
  return config, workdir, table


def test_files_written(result):
  _, workdir, table = result
  for name in ("robustness.md", "robustness.csv", "robustness.jsonl", "examples_pgd.png",
               "examples_attackvlm.png"):
    assert (workdir / name).stat().st_size > 0
  assert [r["variant"] for r in table] == ["original", "smoothed"]
  with open(workdir / "robustness.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and "attackvlm ASR" in rows[0] and rows[0]["head"] == "class_mean"
  assert "Table 4" in (workdir / "robustness.md").read_text()


def test_attack_lowers_fcs_of_the_original(result):
  _, _, table = result
  original = table[0]
  # Clean FCS is 1 (same image, same unsmoothed encoder); every attack moves the feature.
  assert original["pgd FCS"] < 0.995 and original["attackvlm FCS"] < 0.999


def test_metrics_follow_the_per_image_rows(result):
  config, workdir, table = result
  rows = [json.loads(l) for l in (workdir / "robustness.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * 2 * 4  # models x attacks x images
  for t in table:
    for attack in ("pgd", "attackvlm"):
      rs = [r for r in rows if r["variant"] == t["variant"] and r["attack"] == attack]
      assert t[f"{attack} ACC"] == pytest.approx(np.mean([r["pred_adv"] == r["label"]
                                                          for r in rs]))
      assert t[f"{attack} ASR"] == pytest.approx(np.mean([r["pred_adv"] == 9 for r in rs]))
      assert t[f"{attack} FCS"] == pytest.approx(np.mean([r["fcs"] for r in rs]), abs=1e-6)
      for r in rs:
        assert r["linf"] <= config.attack.linf_budget + 1e-6
        assert r["label"] != 9 and r["target_label"] == 9  # the held-out target class


def test_fcs_is_the_library_metric(result):
  """The original row's FCS is fsjax.attacks.feature_cosine_similarity of its images."""
  config, workdir, _ = result
  rows, _ = robustness.build_rows(config)
  data = robustness.attack_data(config)
  x, t = data["images"], data["targets"]
  adv = attacks.attack_images("pgd", rows[0].encoder, rows[0].params, x, t,
                              threat=attacks.ThreatModel.from_config(config.attack),
                              key=jax.random.fold_in(jax.random.PRNGKey(0), 1000),
                              batch_size=config.attack.batch_size)
  fcs = attacks.feature_cosine_similarity(rows[0].params, adv, x, encoder=rows[0].encoder)
  rows = [json.loads(l) for l in (workdir / "robustness.jsonl").read_text().splitlines()]
  mine = [r["fcs"] for r in rows if r["variant"] == "original" and r["attack"] == "pgd"]
  np.testing.assert_allclose(mine, fcs, atol=1e-5)


def test_unknown_attack_errors(tmp_path):
  with pytest.raises(ValueError, match="not known"):
    robustness.run(_config(), str(tmp_path), "fgsm")
  with pytest.raises(ValueError, match="not known"):
    attacks.attack_names("pgd,nope")
  assert attacks.attack_names("all") == list(attacks.ATTACKS)


@pytest.mark.parametrize("attack, robustness_overrides, match", [
    ({}, dict(head="linear"), "config.robustness.head"),
    ({}, dict(prototypes_per_class=0), "config.robustness.prototypes_per_class"),
    (dict(n=0), {}, "config.attack.n must"),
    (dict(linf_budget=-1.0), {}, "budget"),
    (dict(extra_encoders=(dict(name="clip"),)), {}, "label"),
])
def test_bad_config_errors(attack, robustness_overrides, match):
  with pytest.raises(ValueError, match=match):
    robustness.check_robustness_config(_config(attack, **robustness_overrides))


def test_bad_target_class_and_zero_shot_error(tmp_path):
  with pytest.raises(ValueError, match="target_class"):
    robustness.attack_data(_config(target_class=10))
  with pytest.raises(ValueError, match="zero_shot"):
    robustness.run(_config(head="zero_shot"), str(tmp_path), "pgd")


def test_class_subset_and_target():
  data = robustness.attack_data(_config(dict(num_images=6), classes=(3, 5, 7), target_class=-1))
  assert data["target_class"] == 7 and data["classes"] == [3, 5, 7]
  assert set(data["labels"].tolist()) <= {3, 5} and len(data["targets"]) == 6
  assert robustness.attack_data(_config(classes=(3, 5, 7), target_class=5))[
      "target_class"] == 5
  with pytest.raises(ValueError, match="classes"):
    robustness.attack_data(_config(classes=(3, 3)))
  with pytest.raises(ValueError, match="target_class"):
    robustness.attack_data(_config(classes=(3, 5), target_class=7))
