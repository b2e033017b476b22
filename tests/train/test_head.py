"""train.head: the Table 2 heads train, checkpoint, restore; bad input fails clearly."""

import contextlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import certify
from configs import clip_tiny
from configs import common
from fsjax import heads as heads_lib
from fsjax import variants as variants_lib
from train import head as head_lib

K = 3  # classes of the tiny folder dataset
D = 16 * 32  # tiny CLIP patch tokens: 16 patches x width 32


def tiny_config(root, **prediction):
  config = clip_tiny.get_config()
  with config.unlocked():
    # The random tiny CLIP's pooled embedding is nearly the same vector for every image;
    # its patch tokens (16 x 32 = 512-d) tell the colours apart.
    config.encoder.feature = "patch_tokens"
    data = dict(name=f"folder:{root}", image_size=32, batch_size=8, seed=0)
    config.train_data = ml_collections.ConfigDict(dict(data, split="train"))
    config.test_data = ml_collections.ConfigDict(dict(data, split="test"))
    config.prediction = common.prediction_config(
        num_classes=K, train_per_class=4, test_per_class=2, head_steps=60,
        head_learning_rate=0.05, noise_draws=2, n0=8, n=32, **prediction)
    config.certify.update(sigmas=(0.25,), chunk_size=16, batch_size=K * 2)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_folder_dataset):
  root = make_folder_dataset(tmp_path_factory.mktemp("folder"), classes=K)
  config = tiny_config(root)
  workdir = tmp_path_factory.mktemp("heads")
  meta, heads = head_lib.train(config, str(workdir))
  return config, workdir, meta, heads


def _cross_entropy(logits, labels):
  logits = logits - logits.max(axis=1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return float(-logp[np.arange(len(labels)), labels].mean())


def _clusters(n_per_class=20, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(K, dim))
  z = np.concatenate([c + 0.3 * rng.normal(size=(n_per_class, dim)) for c in centres])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  return z.astype(np.float32), np.repeat(np.arange(K), n_per_class).astype(np.int32)


def test_train_heads_lowers_loss_and_reports_it_correctly():
  z, y = _clusters()
  heads, history = head_lib.train_heads(z, y, num_classes=K, steps=100, learning_rate=0.05,
                                        batch_size=32, key=jax.random.PRNGKey(0))
  for name in ("cosine", "linear"):
    assert history[name]["loss_final"] < 0.5 * history[name]["loss_initial"]
    assert history[name]["accuracy_final"] == 1.0
  # The reported losses, recomputed in numpy from the parameters.
  dense = heads["linear"]["params"]["dense"]
  lin = z @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  assert history["linear"]["loss_final"] == pytest.approx(_cross_entropy(lin, y), rel=1e-4)
  w = np.asarray(heads["cosine"]["params"]["prototypes"], np.float64)
  cos = 16.0 * z @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
  assert history["cosine"]["loss_final"] == pytest.approx(_cross_entropy(cos, y), rel=1e-4)


def test_fixed_prototypes_are_not_trained():
  z, y = _clusters()
  protos = np.eye(K, z.shape[1], dtype=np.float32)
  heads, history = head_lib.train_heads(z, y, num_classes=K, steps=5, learning_rate=0.05,
                                        batch_size=32, key=jax.random.PRNGKey(0),
                                        prototypes=protos)
  np.testing.assert_array_equal(heads["cosine"]["params"]["prototypes"], protos)
  assert not history["prototypes_trained"]
  assert history["linear"]["loss_final"] < history["linear"]["loss_initial"]


def test_train_writes_checkpoint_and_sidecar(trained):
  config, workdir, meta, heads = trained
  assert (workdir / "heads").is_dir()
  sidecar = json.loads((workdir / "heads.json").read_text())
  assert sidecar["sigmas"] == [0.25] and sidecar["classes"] == [0, 1, 2]
  assert sidecar["dim"] == D and sidecar["encoder"] == "FS"
  assert sidecar["class_names"] == ["class_0", "class_1", "class_2"]
  assert sidecar["train_images"] == K * 4 and sidecar == meta
  assert list(heads) == [0.25]
  del config


def test_loss_goes_down_on_real_features(trained):
  config, _, meta, heads = trained
  for name in ("cosine", "linear"):
    h = meta["history"]["0.25"][name]
    assert h["loss_final"] < h["loss_initial"]
  # Independently: the trained linear head on clean unit features, in numpy, beats chance.
  images, labels, _ = heads_lib.load_subset(config.train_data, num_classes=K, per_class=4)
  name, encoder, params = variants_lib.most_boosted(config)
  z = np.asarray(encoder(params, jnp.asarray(images)))
  dense = heads[0.25]["linear"]["params"]["dense"]
  assert _cross_entropy(z @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]),
                        labels) < np.log(K)
  del name


def test_heads_restore_identically(trained):
  _, workdir, meta, heads = trained
  meta2, restored = heads_lib.load_heads(workdir)
  assert meta2 == meta
  assert jax.tree.structure(restored) == jax.tree.structure(heads)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(heads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prototypes_unit_norm(trained):
  _, workdir, _, _ = trained
  _, heads = heads_lib.load_heads(workdir)
  w = np.asarray(certify.unit_prototypes(heads[0.25]["cosine"]), np.float64)
  assert w.shape == (K, D)
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)
  certify.check_prototypes(w, D)


def test_rerun_reuses_heads_and_refuses_other_settings(trained):
  config, workdir, _, heads = trained
  _, again = head_lib.train(config, str(workdir))  # found, not retrained
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(heads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = config.copy_and_resolve_references()
  other.prediction.head_steps = 7
  with pytest.raises(ValueError, match="other settings"):
    head_lib.train(other, str(workdir))


def test_zero_shot_uses_text_prototypes(trained, tmp_path, monkeypatch):
  config, _, _, _ = trained
  config = config.copy_and_resolve_references()
  config.prediction.zero_shot = True
  config.prediction.head_steps = 5
  protos = np.eye(K, D, dtype=np.float32)
  seen = {}

  def fake(cfg, encoder, params, class_names):
    seen["class_names"] = list(class_names)
    return jnp.asarray(protos)
  monkeypatch.setattr(head_lib, "zero_shot_prototypes", fake)
  meta, heads = head_lib.train(config, str(tmp_path))
  assert seen["class_names"] == ["class_0", "class_1", "class_2"]
  np.testing.assert_array_equal(heads[0.25]["cosine"]["params"]["prototypes"], protos)
  assert meta["zero_shot"] and not meta["history"]["0.25"]["prototypes_trained"]


@pytest.mark.parametrize("feature,match", [("pooled", "checkpoint"),
                                           ("patch_tokens", "feature='pooled'")])
def test_zero_shot_needs_a_pooled_clip_checkpoint(feature, match, trained, tmp_path):
  config, _, _, _ = trained
  config = config.copy_and_resolve_references()
  config.prediction.zero_shot = True
  config.encoder.feature = feature
  with pytest.raises(ValueError, match=match):
    head_lib.train(config, str(tmp_path))


@pytest.mark.parametrize("labels,match", [([0, 1, 3], r"\[0, num_classes=3\)"),
                                          ([0, -1, 2], r"\[0, num_classes=3\)"),
                                          ([0.0, 1.0, 2.0], "integer")])
def test_bad_labels(labels, match):
  z = np.eye(3, 4, dtype=np.float32)
  with pytest.raises(ValueError, match=match):
    head_lib.train_heads(z, np.array(labels), num_classes=3, steps=1, learning_rate=0.1,
                         batch_size=3, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("k", [1, 0, 2.5])
def test_num_classes_below_two(k):
  z = np.eye(3, 4, dtype=np.float32)
  with pytest.raises(ValueError, match="num_classes must be"):
    head_lib.train_heads(z, np.zeros(3, np.int32), num_classes=k, steps=1, learning_rate=0.1,
                         batch_size=3, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("k", [1, 0])
def test_config_num_classes_below_two(k, trained, tmp_path):
  config = trained[0].copy_and_resolve_references()
  config.prediction.num_classes = k
  with pytest.raises(ValueError, match=r"num_classes must be >= 2 .*got %d" % k):
    head_lib.train(config, str(tmp_path))


def test_more_classes_than_the_dataset(trained, tmp_path):
  config = trained[0].copy_and_resolve_references()
  config.prediction.num_classes = 5
  with pytest.raises(ValueError, match="num_classes=5 exceeds"):
    head_lib.train(config, str(tmp_path))


def test_interrupted_run_resumes_at_the_next_sigma(trained, tmp_path, monkeypatch):
  """Ctrl-C after the first sigma saves it; the same call resumes with the second only,
  and the result equals an uninterrupted run's (same keys per sigma)."""
  config, _, _, _ = trained
  config = config.copy_and_resolve_references()
  config.certify.sigmas = (0.25, 0.5)
  calls = []
  real = head_lib.unit_features

  def counting(*args, **kwargs):
    calls.append(kwargs["sigma"])
    return real(*args, **kwargs)
  monkeypatch.setattr(head_lib, "unit_features", counting)
  # Ctrl-C pressed while loading: nothing is trained (and nothing saved).
  monkeypatch.setattr(head_lib.loop, "interruptible", lambda: _pressed(after=0))
  with pytest.raises(head_lib.loop.Interrupted, match="saved at sigma number 0"):
    head_lib.train(config, str(tmp_path))
  assert calls == [] and not (tmp_path / "heads.json").exists()
  # Ctrl-C pressed during the first sigma: the loop stops after it is saved.
  monkeypatch.setattr(head_lib.loop, "interruptible", lambda: _pressed(after=1))
  with pytest.raises(head_lib.loop.Interrupted, match="saved at sigma number 1"):
    head_lib.train(config, str(tmp_path))
  assert calls == [0.25]
  meta = json.loads((tmp_path / "heads.json").read_text())
  assert meta["sigmas"] == [0.25] and meta["complete"] is False
  monkeypatch.undo()
  monkeypatch.setattr(head_lib, "unit_features", counting)
  meta, resumed = head_lib.train(config, str(tmp_path))
  assert calls == [0.25, 0.5] and meta["complete"] and list(resumed) == [0.25, 0.5]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["sigma"] for r in rows} == {0.25, 0.5} and rows[-1]["step"] == 60
  _, fresh = head_lib.train(config, str(tmp_path / "fresh"))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@contextlib.contextmanager
def _pressed(after: int):
  """An interruptible() whose flag is up from its ``after + 1``-th look on."""
  looks = []
  yield lambda: looks.append(1) or len(looks) > after


def _angular_gaps(prototypes, z, labels):
  """numpy: min over other classes of angle(z, w_k) minus angle(z, w_y), per example."""
  w = np.asarray(prototypes, np.float64)
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  zn = np.asarray(z, np.float64) / np.linalg.norm(z, axis=1, keepdims=True)
  theta = np.arccos(np.clip(zn @ w.T, -1, 1))
  true = theta[np.arange(len(labels)), labels]
  theta[np.arange(len(labels)), labels] = np.inf
  return theta.min(axis=1) - true


def test_cosface_margin_widens_the_angular_gap():
  """The large-margin cosine loss leaves a wider gap Delta than plain cross-entropy: what
  the FS prediction certificate needs (certified iff 2 arccos(gamma) < Delta)."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16))
  labels = np.repeat(np.arange(3), 40)
  z = centres[labels] + 0.9 * rng.normal(size=(120, 16))
  z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
  gaps = {}
  for m in (0.0, 0.35):
    heads, _ = head_lib.train_heads(z, labels, num_classes=3, steps=300, learning_rate=0.05,
                                    batch_size=64, key=jax.random.PRNGKey(0), margin=m)
    protos = heads["cosine"]["params"]["prototypes"]
    gaps[m] = np.median(_angular_gaps(protos, z, labels))
  assert gaps[0.35] > gaps[0.0] + 0.05, gaps
