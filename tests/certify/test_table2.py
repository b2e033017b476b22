"""certify.table2 end to end on the tiny CLIP: files, table, agreement with direct calls."""

import json
import os
import shutil
import signal

import jax
import ml_collections
import numpy as np
import pytest

import certify
from certify import report
from certify import table2
from configs import clip_tiny
from configs import common
from fsjax import cli
from fsjax import data as data_lib
from fsjax import heads as heads_lib
from fsjax import variants as variants_lib
from train import head as head_lib

K, TEST_PER_CLASS = 3, 2
SIGMAS = (0.05, 0.1)


def _config(root):
  config = clip_tiny.get_config()
  with config.unlocked():
    config.encoder.feature = "patch_tokens"  # the random pooled embedding barely varies
    data = dict(name=f"folder:{root}", image_size=32, batch_size=8, seed=0)
    config.train_data = ml_collections.ConfigDict(dict(data, split="train"))
    config.test_data = ml_collections.ConfigDict(dict(data, split="test"))
    # bound="point" gives FS radii that vary from image to image on this random encoder
    # (its certified radii are all 0 at such small n), so the comparison below has teeth.
    config.prediction = common.prediction_config(
        num_classes=K, train_per_class=4, test_per_class=TEST_PER_CLASS, head_steps=60,
        head_learning_rate=0.05, noise_draws=2, n0=8, n=32, bound="point", head_dim=4)
    config.certify.update(sigmas=SIGMAS, chunk_size=16, batch_size=4)  # 2 batches, 1 padded
  return config


@pytest.fixture(scope="module")
def result(tmp_path_factory, make_folder_dataset):
  root = make_folder_dataset(tmp_path_factory.mktemp("folder"), classes=K,
                             per_split=(("train", 4), ("test", TEST_PER_CLASS)))
  config = _config(root)
  workdir = tmp_path_factory.mktemp("table2")
  head_lib.train(config, str(workdir))
  variant = variants_lib.most_boosted(config)
  table = table2.run_prediction(config, str(workdir), variant=variant)
  rows = [json.loads(l) for l in (workdir / "prediction_results.jsonl").read_text().splitlines()]
  return config, workdir, table, rows, variant


def test_files_written(result):
  _, workdir, _, rows, _ = result
  for name in ("prediction_results.jsonl", "table2.md", "table2.csv", "table2.png",
               "table2_margins.png"):
    assert (workdir / name).stat().st_size > 0
  assert len(rows) == len(SIGMAS) * 2 * K * TEST_PER_CLASS
  # config.prediction.n0/n override config.certify's (16/128 in clip_tiny).
  assert {(r["n0"], r["n"]) for r in rows} == {(8, 32)}
  md = (workdir / "table2.md").read_text().splitlines()
  assert md[0].startswith("Table 2") and "n0 = 8, n = 32" in md[0]  # the caption
  assert len(md) == 4 + len(table2.TABLE_ROWS) * len(SIGMAS) and "| method |" in md[2]
  assert "'select' certificate" in md[0] and "NOT a certificate" in md[0]


def test_fs_and_rs_rows_per_sigma(result):
  config, _, table, _, _ = result
  assert [(r["sigma"], r["method"]) for r in table] == [
      (s, m) for s in SIGMAS for m in ("FS", "FS: A.3.2 only", "FS: per-class only", "RS",
                                       "FS paper protocol (estimate)")]
  radii = [f"{r:g}" for r in config.prediction.radii]
  assert radii[0] == "0" and radii[-1] == "1.5"
  for row in table:
    assert row["images"] == K * TEST_PER_CLASS
    curve = np.array([row[r] for r in radii])
    assert np.all(np.diff(curve) <= 0) and np.all((0 <= curve) & (curve <= 1))


def test_table_is_the_certified_accuracy_of_the_rows(result):
  config, _, table, rows, _ = result
  fields = {name: (method, c, r) for name, method, c, r in table2.TABLE_ROWS}
  for row in table:
    method, cls, rad = fields[row["method"]]
    rs = [r for r in rows if r["sigma"] == row["sigma"] and r["method"] == method]
    for radius in config.prediction.radii:
      expected = np.mean([r[cls] == r["label"] and r[rad] >= radius for r in rs])
      assert row[f"{radius:g}"] == pytest.approx(expected)
    assert row["abstain"] == pytest.approx(np.mean([r[cls] == -1 for r in rs]))


def test_rows_match_direct_certify_calls(result):
  """Same images, same keys (documented in certify.table2), called directly."""
  config, workdir, _, rows, (_, encoder, params) = result
  images, labels, _ = data_lib.load_arrays(
      config.test_data.name, split="test", image_size=32, classes=range(K),
      per_class=TEST_PER_CLASS, seed=0)
  _, heads = heads_lib.load_heads(workdir)
  bs = config.certify.batch_size
  # The head projects: FS certifies x -> P^T f(x) (fsjax.heads.fs_classifier). One wrapper for
  # every call: jit caches by the encoder's identity.
  projected = heads_lib.ProjectedEncoder(encoder)
  radii_seen = []
  for sigma in SIGMAS:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), int(round(sigma * 1e6)))
    for b in range(2):
      x = images[b * bs:(b + 1) * bs]
      x = np.concatenate([x, np.repeat(x[-1:], bs - len(x), axis=0)])  # the padding
      k = jax.random.fold_in(key, b)
      # With a progress callable, as the program calls them: the same compilations (and,
      # test_feature checks, the same bits as without one).
      mc = dict(sigma=sigma, key=k, n0=8, n=32, alpha=config.certify.alpha, chunk_size=16,
                progress=lambda samples: None)
      kernel = heads[sigma]["cosine"]["params"]["projection"]
      fs_params = {"encoder": params, "projection": kernel}
      w = np.asarray(heads[sigma]["cosine"]["params"]["prototypes"], np.float32)
      w = w / np.linalg.norm(w, axis=1, keepdims=True)  # in the projection's space
      margin = certify.prediction_margin(fs_params, x, encoder=projected, bound="point",
                                         prototypes=w, certificate="select", **mc)
      fs = certify.prediction_certificate(margin)
      paper = certify.certify_prediction(fs_params, x, encoder=projected, bound="point",
                                         prototypes=w, **dict(mc, n0=16, n=16))
      got_fs = sorted((r for r in rows if r["sigma"] == sigma and r["method"] == "FS"
                       and b * bs <= r["image"] < (b + 1) * bs), key=lambda r: r["image"])
      n_fs = len(got_fs)
      np.testing.assert_allclose([r["margin"] for r in got_fs], margin.margin[:n_fs], rtol=1e-6)
      np.testing.assert_allclose([1 - r["h_lcb"] for r in got_fs], margin.deficit[:n_fs],
                                 rtol=1e-5, atol=1e-7)
      need = 4 * np.arccos(np.sqrt(1 - margin.deficit[:n_fs].astype(np.float64)))
      np.testing.assert_allclose([r["required_margin"] for r in got_fs], need, rtol=1e-4,
                                 atol=1e-5)
      assert [r["certificate_used"] for r in got_fs] == list(fs.certificate[:n_fs])
      for only in ("cosine", "per-class"):  # each certificate alone, from the same margin
        alone = certify.prediction_certificate(margin, only=only)
        field = only.replace("-", "_")
        assert [r[f"class_{field}"] for r in got_fs] == list(alone.predicted_class[:n_fs])
        np.testing.assert_allclose([r[f"radius_{field}"] for r in got_fs],
                                   alone.radius[:n_fs], rtol=1e-6)
      assert [r["paper_class"] for r in got_fs] == list(paper.predicted_class[:n_fs])
      np.testing.assert_allclose([r["paper_radius"] for r in got_fs], paper.radius[:n_fs],
                                 rtol=1e-6)
      rs = certify.rs_certify(params, x, encoder=encoder, head=heads[sigma]["linear"], **mc)
      for method, cert in (("FS", fs), ("RS", rs)):
        cls, radius = cert.predicted_class, cert.radius
        got = sorted((r for r in rows if r["sigma"] == sigma and r["method"] == method
                      and b * bs <= r["image"] < (b + 1) * bs), key=lambda r: r["image"])
        n_real = len(got)
        assert n_real == min(bs, K * TEST_PER_CLASS - b * bs)
        assert [r["label"] for r in got] == list(labels[b * bs:b * bs + n_real])
        assert [r["predicted_class"] for r in got] == list(np.asarray(cls)[:n_real])
        np.testing.assert_allclose([r["radius"] for r in got], np.asarray(radius)[:n_real],
                                   rtol=1e-6)
        radii_seen += [r["radius"] for r in got]
  assert len(set(radii_seen)) > 3  # the comparison is not between constants


def test_missing_heads_and_mismatched_config_fail_clearly(result, tmp_path):
  config, workdir, _, _, _ = result
  with pytest.raises(FileNotFoundError, match="train.head"):
    table2.run_prediction(config, str(tmp_path))
  other = config.copy_and_resolve_references()
  other.certify.sigmas = (0.05, 0.75)
  with pytest.raises(ValueError, match=r"no heads trained for sigma \[0.75\]"):
    table2.run_prediction(other, str(workdir))
  other = config.copy_and_resolve_references()
  other.prediction.num_classes = 2
  with pytest.raises(ValueError, match="num_classes=2"):
    table2.run_prediction(other, str(workdir))
  other = config.copy_and_resolve_references()
  other.prediction.bound = "chernoff"
  with pytest.raises(ValueError, match="prediction.bound"):
    table2.run_prediction(other, str(workdir))
  other = config.copy_and_resolve_references()
  other.prediction.certificate = "max"
  with pytest.raises(ValueError, match="prediction.certificate"):
    table2.run_prediction(other, str(workdir))


def test_labels_out_of_range_fail_clearly(result):
  config, _, _, rows, _ = result
  rs = [r for r in rows if r["method"] == "RS"][:4]
  with pytest.raises(ValueError, match="labels must lie in"):
    table2.summarise([dict(r, label=K) for r in rs], [0.0], num_classes=K, encoder_name="FS")
  with pytest.raises(ValueError, match=r"\[0, num_classes=3\)"):
    heads_lib.check_labels(np.array([0, 5]), K)
  del config


OUTPUTS = ("table2.md", "table2.csv", "table2.png", "table2_margins.png")


def test_interrupted_run_resumes_to_the_same_table(result, tmp_path, monkeypatch):
  """Issue 21: a real Ctrl-C after the first (sigma, batch) group, then a kill -9 mid-row
  (a torn last line), then the same command: the uninterrupted run's rows, table, plots."""
  config, workdir, table, rows, variant = result
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)  # the heads of train.head
  for name in ("prediction_results.jsonl",) + OUTPUTS:
    (tmp_path / name).unlink()
  calls, certify_images = [], table2.certify_images

  def ctrl_c_after_the_first_group(*args, **kwargs):
    out = certify_images(*args, **kwargs)
    calls.append(kwargs["batches"])
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGINT)  # seen at the next safe point
    return out
  monkeypatch.setattr(table2, "certify_images", ctrl_c_after_the_first_group)
  with pytest.raises(cli.Interrupted, match=r"1 of 4 \(sigma, batch\) groups are certified "
                     r".*rerun the same command"):
    table2.run_prediction(config, str(tmp_path), variant=variant)
  results = tmp_path / "prediction_results.jsonl"
  assert calls == [[0]] and not any((tmp_path / name).exists() for name in OUTPUTS)
  assert report.read_rows(results) == rows[:2 * 4]  # FS and RS of batch 0 at sigma 0.05
  with open(results, "a") as f:
    f.write(json.dumps(rows[8])[:40])  # killed mid-row
  again = table2.run_prediction(config, str(tmp_path), variant=variant)
  assert calls == [[0], [1], [0], [1]]  # only the missing groups
  assert again == table and report.read_rows(results) == rows
  for name in OUTPUTS:
    assert (tmp_path / name).read_bytes() == (workdir / name).read_bytes(), name


def test_other_config_is_refused_and_writes_nothing(result):
  config, workdir, _, _, variant = result
  before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
  other = config.copy_and_resolve_references()
  other.prediction.radii = (0.0, 0.5)
  with pytest.raises(ValueError, match=r"different config .*use another --workdir"):
    table2.run_prediction(other, str(workdir), variant=variant)
  assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before


def test_sequential_mode_rows_match_direct_sequential_calls(result, tmp_path):
  """Issue 20: ``config.certify.mode="sequential"``: FS (Theorem A.3.2) and RS rows from
  certify.sequential_predict with the batch's key and the images' indices as noise ids (so
  FS and RS are paired), samples per image in the rows and the table."""
  config, workdir, _, _, variant = result
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)  # the heads of train.head
  for name in ("prediction_results.jsonl", "table2_config.json") + OUTPUTS:
    (tmp_path / name).unlink()
  config = config.copy_and_resolve_references()
  config.prediction.n = 96  # n_max
  config.certify.update(mode="sequential", sequential_chunk_size=16, slots=2)
  table = table2.run_prediction(config, str(tmp_path), variant=variant)
  rows = report.read_rows(tmp_path / "prediction_results.jsonl")
  assert len(rows) == len(SIGMAS) * 2 * K * TEST_PER_CLASS
  assert {r["mode"] for r in rows} == {"sequential"}
  assert {r["bound"] for r in rows} == {"betting (sequential)"}
  assert [(r["sigma"], r["method"]) for r in table] == [
      (s, m) for s in SIGMAS for m in ("FS", "RS")]
  md = (tmp_path / "table2.md").read_text()
  assert "SEQUENTIAL" in md and "median samples" in md
  assert not (tmp_path / "table2_margins.png").exists()
  _, encoder, params = variant
  _, heads = heads_lib.load_heads(tmp_path)
  images, _, _ = data_lib.load_arrays(config.test_data.name, split="test", image_size=32,
                                      classes=range(K), per_class=TEST_PER_CLASS, seed=0)
  bs = config.certify.batch_size
  for sigma in SIGMAS:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), int(round(sigma * 1e6)))
    for b in range(2):
      x = images[b * bs:(b + 1) * bs]
      for method, head in (("FS", heads[sigma]["cosine"]), ("RS", heads[sigma]["linear"])):
        cert = certify.sequential_predict(
            params, x, encoder=encoder, head=head, method=method, sigma=sigma,
            radii=list(config.prediction.radii), key=jax.random.fold_in(key, b), n_max=96,
            n0=8, alpha=config.certify.alpha, chunk_size=16, slots=2,
            image_ids=b * bs + np.arange(len(x)))
        got = sorted((r for r in rows if r["sigma"] == sigma and r["method"] == method
                      and b * bs <= r["image"] < (b + 1) * bs), key=lambda r: r["image"])
        assert [r["predicted_class"] for r in got] == list(cert.predicted_class)
        np.testing.assert_allclose([r["radius"] for r in got], cert.radius, rtol=1e-6)
        assert [r["samples"] for r in got] == list(cert.samples)
        assert all(8 + 16 <= r["samples"] <= 8 + 96 + 16 for r in got)
  for row in table:
    rs = [r for r in rows if r["sigma"] == row["sigma"] and r["method"] == row["method"]]
    assert row["mean samples"] == pytest.approx(np.mean([r["samples"] for r in rs]), abs=0.5)
    for radius in config.prediction.radii:
      expected = np.mean([r["predicted_class"] == r["label"] and r["radius"] >= radius
                          for r in rs])
      assert row[f"{radius:g}"] == pytest.approx(expected)
