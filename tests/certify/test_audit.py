"""certify.audit: a small soundness audit finds no violation; its parts check out."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import certify
from certify import audit
from certify import report
from configs import clip_tiny
from configs import common
from fsjax import cli
from fsjax import smoothing
from fsjax import variants as variants_lib

SIGMA = 0.25


def _audit_config(**overrides):
  a = common.audit_config(sigma=SIGMA, n0=32, n=256, measure_n=512, steps=10,
                          eot_samples=8, batch_size=8, chunk_size=64, alpha=0.001)
  a.update(overrides)
  return a


def _images(seed=0, b=3):
  return np.random.default_rng(seed).uniform(size=(b, 8, 8, 3)).astype(np.float32)


def _numpy_features(params, x):
  """Independent numpy forward of conftest's ToyEncoder, unit-normalised."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  z = np.tanh(x @ np.asarray(params["w1"], np.float64)) @ np.asarray(params["w2"], np.float64)
  z = z + np.asarray(params["b"], np.float64)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def toy_audit(toy):
  encoder, params = toy
  x = _images()
  rows, skipped = audit.audit_images(encoder, params, x, np.arange(3), _audit_config(),
                                     jax.random.PRNGKey(0))
  return x, rows, skipped


def test_small_audit_finds_no_violation(toy_audit):
  _, rows, skipped = toy_audit
  # 3 images x 4 fractions x 2 references, all certified at cos >= 0.5 for this encoder.
  assert not skipped and len(rows) == 24
  summary = audit.summarise(rows, alpha=0.001, k_sigma=3.0, images=3)
  assert summary["violations_k_sigma"] == 0
  assert summary["violations_raw"] == 0
  for r in rows:
    assert r["measured"] <= r["measured_clean"] + 3 * r["standard_error"] + 0.01
    assert r["perturbation_l2"] <= r["eps"] * (1 + 1e-5) + 1e-6
    assert 0 < r["eps"] <= r["radius"] * (1 + 1e-6)


def test_bounds_are_certify_fcsb(toy, toy_audit):
  """The audited bound is exactly certify.fcsb's for the same key (the certify stream)."""
  encoder, params = toy
  x, rows, _ = toy_audit
  a = _audit_config()
  for reference in ("mean", "clean"):
    for i in range(3):
      mine = [r for r in rows if r["reference"] == reference and r["image"] == i]
      cert = certify.fcsb(params, x, encoder=encoder, sigma=SIGMA,
                          eps=[r["eps"] for r in mine],
                          key=jax.random.fold_in(jax.random.PRNGKey(0), audit._CERTIFY),
                          n=a.n, n0=a.n0, alpha=a.alpha, bound=a.bound, reference=reference)
      np.testing.assert_allclose([r["certified_inner_product"] for r in mine],
                                 np.asarray(cert.inner_product_bound)[i], atol=2e-5)
      radius = certify.certified_radius(
          params, x, encoder=encoder, sigma=SIGMA, cos=0.5,
          key=jax.random.fold_in(jax.random.PRNGKey(0), audit._CERTIFY), n=a.n, n0=a.n0,
          alpha=a.alpha, bound=a.bound, reference=reference)
      assert mine[-1]["radius"] == pytest.approx(float(radius[i]), abs=1e-5)
      # eps = fraction x radius, so the bound at the full radius is the level cos = 0.5.
      assert mine[-1]["fraction"] == 1.0
      assert mine[-1]["certified_inner_product"] == pytest.approx(0.5, abs=1e-4)


def test_attack_lowers_the_inner_product(toy):
  """The audit's attack does its job: <f_s(x'), u> drops well below its clean value."""
  encoder, params = toy
  x = _images(1, 8)  # the audit's batch shape: reuses its compilations
  u = np.asarray(encoder(params, x))
  key = jax.random.PRNGKey(3)
  clean, _ = smoothing.measure_inner_product(params, x, u, encoder=encoder, sigma=SIGMA, n=512,
                                         key=key)
  x_adv = audit.attack_direction(params, x, u, encoder=encoder, eps=1.0, sigma=SIGMA,
                                 steps=10, eot_samples=8, key=key)
  adv, _ = smoothing.measure_inner_product(params, x_adv, u, encoder=encoder, sigma=SIGMA,
                                       n=512, key=key)
  assert np.all(np.asarray(adv) < np.asarray(clean) - 0.05)
  dist = np.sqrt(np.sum((np.asarray(x_adv) - x) ** 2, axis=(1, 2, 3)))
  assert np.all(dist <= 1.0 + 1e-5)


def test_measurement_matches_numpy(toy):
  """Mean and standard error against an independent numpy computation on the same noise."""
  encoder, params = toy
  x = _images(2, 8)
  u = np.random.default_rng(4).normal(size=(8, 16)).astype(np.float32)
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  key, n = jax.random.PRNGKey(5), 512
  mean, se = smoothing.measure_inner_product(params, x, u, encoder=encoder, sigma=SIGMA, n=n,
                                         key=key)
  noise = np.asarray(jax.vmap(lambda i: smoothing.noise(key, i, x.shape, SIGMA))(
      jnp.arange(n)))
  ip = np.stack([np.sum(_numpy_features(params, x + d) * u, -1) for d in noise])  # [n, B]
  np.testing.assert_allclose(mean, ip.mean(0), atol=1e-5)
  np.testing.assert_allclose(se, ip.std(0, ddof=1) / np.sqrt(n), rtol=1e-3, atol=1e-7)


def test_measurement_progress_changes_no_bit(toy):
  """Issue 14: measuring with ``progress`` reports all n samples chunk by chunk and gives
  the same bits as without it (the shapes of test_measurement_matches_numpy)."""
  encoder, params = toy
  x = _images(2, 8)
  u = np.asarray(encoder(params, x + 0.1))
  args = dict(encoder=encoder, sigma=SIGMA, n=512, key=jax.random.PRNGKey(5))
  want = smoothing.measure_inner_product(params, x, u, **args)
  done = []
  got = smoothing.measure_inner_product(params, x, u, progress=done.append, **args)
  assert done == [64] * 8
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_screen_measures_close_pairs_again(toy):
  """Pairs far above B keep the screen's n; pairs near or below B get measure_n."""
  encoder, params = toy
  x = _images(3, 8)
  u = np.asarray(encoder(params, x))
  a = _audit_config(screen_n=64, screen_k=6.0)
  bound = np.where(np.arange(8) < 4, -1.0, 1.0)  # far below / at the maximum of <f_s, u>
  measured, se, used = audit._measure_pairs(params, x, u, bound, encoder, a,
                                            jax.random.PRNGKey(7))
  np.testing.assert_array_equal(used, [64] * 4 + [512] * 4)
  assert np.all(se[4:] < se[:4])  # 8x the samples: about sqrt(8) smaller errors
  assert np.all((measured > 0) & (measured <= 1))


@pytest.fixture(scope="module")
def tiny_clip_audit(tmp_path_factory):
  config = clip_tiny.get_config()
  with config.unlocked():
    # Two (batch, variant) groups of one image, each two (image, eps) pairs: one call.
    config.audit.update(n0=16, n=128, measure_n=256, steps=5, eot_samples=4, batch_size=2,
                        eps_fractions=(0.5, 1.0), num_images=2, references=("mean",))
    config.data.update(batch_size=1)
  workdir = tmp_path_factory.mktemp("audit")
  variants = variants_lib.encoder_variants(config)  # compiled once for every run below
  return config, workdir, audit.run(config, str(workdir), variants=variants), variants


def test_end_to_end_on_tiny_clip(tiny_clip_audit):
  _, workdir, summary, _ = tiny_clip_audit
  rows = [json.loads(l) for l in (workdir / "audit.jsonl").read_text().splitlines()]
  assert "Soundness audit" in (workdir / "audit.md").read_text()
  assert summary["pairs"] == len(rows) == 2 * summary["images_tested"]
  assert summary["violations_k_sigma"] == 0
  marks = report.read_rows(workdir / "audit_batches.jsonl")
  assert [(m["batch"], m["variant"], m["first_image"], m["images"]) for m in marks] == [
      (0, "FS", 0, 1), (1, "FS", 1, 1)]
  assert [m["pairs"] for m in marks] == [sum(r["image"] == i for r in rows) for i in (0, 1)]


def test_interrupted_run_resumes_to_the_same_audit(tiny_clip_audit, tmp_path, monkeypatch):
  """Issue 21: killed after the last group's rows but before its mark (a torn line after
  them), then the same command, stopped by a real Ctrl-C while it audits that group,
  then the same command again: the uninterrupted run's audit.md."""
  config, workdir, summary, variants = tiny_clip_audit
  rows = report.read_rows(workdir / "audit.jsonl")
  for name in ("audit.jsonl", "audit_batches.jsonl", "audit_config.json"):
    shutil.copy(workdir / name, tmp_path / name)
  marks = (tmp_path / "audit_batches.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "audit_batches.jsonl").write_text(marks[0] + marks[1][:25])
  calls, audit_images = [], audit.audit_images

  def ctrl_c_while_auditing(*args, **kwargs):
    calls.append(kwargs["first_index"])
    os.kill(os.getpid(), signal.SIGINT)  # seen once the group is audited
    return audit_images(*args, **kwargs)
  monkeypatch.setattr(audit, "audit_images", ctrl_c_while_auditing)
  with pytest.raises(cli.Interrupted, match=r"2 of 2 \(batch, variant\) groups are audited "
                     r".*rerun the same command to write audit.md"):
    audit.run(config, str(tmp_path), variants=variants)
  assert calls == [1] and not (tmp_path / "audit.md").exists()  # the unmarked group only
  # Its rows are in the file twice now; the summary takes each group's rows once.
  assert len(report.read_rows(tmp_path / "audit.jsonl")) == len(rows) + sum(
      r["image"] == 1 for r in rows)
  assert audit.run(config, str(tmp_path), variants=variants) == summary
  assert calls == [1]  # nothing left to audit
  assert (tmp_path / "audit.md").read_bytes() == (workdir / "audit.md").read_bytes()


def test_other_config_is_refused_and_writes_nothing(tiny_clip_audit):
  config, workdir, _, _ = tiny_clip_audit
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  other = config.copy_and_resolve_references()
  other.audit.k_sigma = 2.0
  with pytest.raises(ValueError, match=r"different config .*use another --workdir"):
    audit.run(other, str(workdir))
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


@pytest.mark.parametrize("overrides, match", [
    (dict(bound="point"), "not a certificate"),
    (dict(eps_fractions=(0.5, 1.5)), "eps_fractions"),
    (dict(references=("nope",)), "references"),
    (dict(eot_samples=0), "eot_samples"),
    (dict(measure_n=1), "measure_n"),
])
def test_bad_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    audit.check_audit_config(_audit_config(**overrides))


def test_sequential_audit_attacks_the_stopped_certificates(toy):
  """``mode="sequential"``: the audited bound is sequential_fcsb's at its stopping time."""
  encoder, params = toy
  x = _images()
  a = _audit_config(eps_fractions=(0.5, 1.0), references=("mean",))
  with a.unlocked():
    a.update(dict(mode="sequential", stop="decision", sequential_chunk_size=64, slots=2,
                  certify_eps=(0.125, 0.25)))
  audit.check_audit_config(a)
  rows, skipped = audit.audit_images(encoder, params, x, np.arange(3), a,
                                     jax.random.PRNGKey(0))
  cert = certify.sequential_fcsb(
      params, x, encoder=encoder, sigma=SIGMA, eps=[0.125, 0.25],
      key=jax.random.fold_in(jax.random.PRNGKey(0), audit._CERTIFY), cos=0.5, n_max=a.n,
      n0=a.n0, alpha=a.alpha, norm_aware=False, reference="mean", chunk_size=64, slots=2)
  assert not skipped and len(rows) == 6
  for r in rows:
    i = r["image"]
    assert r["mode"] == "sequential" and r["bound"] == "betting (sequential)"
    assert r["samples"] == int(cert.samples[i]) <= a.n0 + a.n
    assert r["radius"] == pytest.approx(float(cert.radius[i]), abs=1e-5)
    assert r["score_lcb"] == pytest.approx(float(cert.score[i]), abs=1e-6)
    assert not r["violation_k_sigma"]
  # At the full radius the bound is the level cos = 0.5.
  assert rows[1]["certified_inner_product"] == pytest.approx(0.5, abs=1e-4)
  with a.unlocked():
    a.mode = "anytime"
  with pytest.raises(ValueError, match="mode"):
    audit.check_audit_config(a)
