"""Tests of fsjax.attacks on a toy patch encoder (8x8 images, a few steps each)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsjax import attacks
from fsjax import encoders
from fsjax import smoothing


@dataclasses.dataclass(frozen=True, eq=False)
class ToyEncoder(encoders.Encoder):
  """2x2 patches -> tanh(linear) tokens: ``[B, 8, 8, 3] -> [B, 16, 6]``."""

  resolution: int = 8

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution) - 0.5
    b = x.shape[0]
    t = x.reshape(b, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 12)
    return jnp.tanh(t @ params["w"] + params["b"])


def _toy_params(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(12, 6)) * 0.8, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(6,)) * 0.1, jnp.float32)}


def _numpy_features(params, x):
  """Independent numpy forward of ToyEncoder, unit-normalised: ``[B, 96]``."""
  x = np.asarray(x, np.float64) - 0.5
  b = x.shape[0]
  t = x.reshape(b, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 12)
  z = np.tanh(t @ np.asarray(params["w"], np.float64) + np.asarray(params["b"])).reshape(b, -1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


ENC, ENC2 = ToyEncoder(), ToyEncoder()
PARAMS, PARAMS2 = _toy_params(0), _toy_params(1)
X = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 8, 8, 3)), jnp.float32)
TARGET = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 8, 8, 3)), jnp.float32)
KEY = jax.random.key(0)


def _cos(a, b):
  return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ---------------------------------------------------------------------------------------
# Budget and pixel range, every attack.
# ---------------------------------------------------------------------------------------

CASES = {
    "pgd_linf": lambda: attacks.pgd(PARAMS, X, encoder=ENC, budget=0.03, step_size=0.02,
                                    steps=5, key=KEY),
    "pgd_l2": lambda: attacks.pgd(PARAMS, X, TARGET, encoder=ENC, norm="l2", budget=0.3,
                                  step_size=0.2, steps=3, key=KEY),
    "attackvlm": lambda: attacks.run("attackvlm", PARAMS, X, TARGET, encoder=ENC, budget=0.03,
                                     step_size=0.02, steps=5),
    "mattack": lambda: attacks.run("mattack", (PARAMS, PARAMS2), X, TARGET,
                                   encoder=(ENC, ENC2), budget=0.03, step_size=0.02, steps=3,
                                   key=KEY),
    "foa": lambda: attacks.run("foa", (PARAMS, PARAMS2), X, TARGET, encoder=(ENC, ENC2),
                               budget=0.03, step_size=0.02, steps=3, key=KEY, num_clusters=4,
                               kmeans_iterations=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_budget_and_pixel_range(name):
  x_adv = np.asarray(CASES[name]())
  x = np.asarray(X)
  assert x_adv.shape == x.shape and np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = (x_adv - x).reshape(len(x), -1)
  if name == "pgd_l2":
    assert np.all(np.linalg.norm(delta, axis=-1) <= 0.3 * (1 + 1e-6))
  else:
    assert np.abs(delta).max() <= 0.03 + 1e-7
  assert np.abs(delta).max() > 0.01  # The attack moved.


# ---------------------------------------------------------------------------------------
# PGD does what it says.
# ---------------------------------------------------------------------------------------

# Same static options as the budget cases above: no extra compilation.
def test_pgd_untargeted_lowers_feature_cosine():
  x_adv = attacks.pgd(PARAMS, X, encoder=ENC, budget=16 / 255, step_size=2 / 255, steps=5,
                      key=KEY)
  fcs = _cos(_numpy_features(PARAMS, x_adv), _numpy_features(PARAMS, X))
  assert np.all(fcs < 0.99), fcs
  np.testing.assert_allclose(
      attacks.feature_cosine_similarity(PARAMS, x_adv, X, encoder=ENC), fcs, atol=1e-5)


def test_targeted_pgd_raises_cosine_to_target():
  # attackvlm is pgd(target, norm="linf", random_start=False).
  x_adv = attacks.attackvlm(PARAMS, X, TARGET, encoder=ENC, budget=16 / 255,
                            step_size=2 / 255, steps=5)
  f_t = _numpy_features(PARAMS, TARGET)
  before, after = _cos(_numpy_features(PARAMS, X), f_t), _cos(_numpy_features(PARAMS, x_adv), f_t)
  assert np.all(after > before + 0.01), (before, after)


def test_pgd_eot_runs_and_is_deterministic_for_a_key():
  kw = dict(encoder=ENC, budget=0.05, step_size=0.02, steps=2, sigma=0.1, eot_samples=2,
            random_start=False)
  a = attacks.pgd(PARAMS, X, key=KEY, **kw)
  b = attacks.pgd(PARAMS, X, key=KEY, **kw)
  c = attacks.pgd(PARAMS, X, key=jax.random.key(1), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert np.all(np.isfinite(a))


# ---------------------------------------------------------------------------------------
# FOA's local alignment against numpy k-means and numpy Sinkhorn.
# ---------------------------------------------------------------------------------------

def _numpy_kmeans(p, k, iterations):
  idx = [0]
  d2 = np.sum((p - p[0]) ** 2, -1)
  for _ in range(1, k):
    i = int(np.argmax(d2))
    idx.append(i)
    d2 = np.minimum(d2, np.sum((p - p[i]) ** 2, -1))
  c = p[idx].copy()
  for _ in range(iterations):
    assign = np.argmin(np.sum((p[:, None] - c[None]) ** 2, -1), -1)
    sizes = np.bincount(assign, minlength=k).astype(float)
    for j in range(k):
      if sizes[j] > 0:
        c[j] = p[assign == j].mean(0)
  return c, sizes, assign


def _numpy_sinkhorn_cost(ca, wa, cb, wb, epsilon):
  na = ca / np.linalg.norm(ca, axis=-1, keepdims=True)
  nb = cb / np.linalg.norm(cb, axis=-1, keepdims=True)
  cost = 1 - na @ nb.T
  kernel = np.exp(-cost / epsilon)
  u, v = np.ones_like(wa), np.ones_like(wb)
  for _ in range(5000):
    u = wa / (kernel @ v)
    v = wb / (kernel.T @ u)
  plan = u[:, None] * kernel * v[None, :]
  return np.sum(plan * cost)


def test_local_alignment_loss_matches_numpy():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(1, 12, 5))
  b = rng.normal(size=(1, 12, 5)) + 0.3
  got = attacks.local_alignment_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                     num_clusters=3, iterations=4, epsilon=0.1)
  ca, sa, _ = _numpy_kmeans(a[0], 3, 4)
  cb, sb, _ = _numpy_kmeans(b[0], 3, 4)
  want = _numpy_sinkhorn_cost(ca, sa / sa.sum(), cb, sb / sb.sum(), 0.1)
  np.testing.assert_allclose(got[0], want, atol=1e-3)
  centres, sizes, assign = attacks.kmeans(jnp.asarray(a[0], jnp.float32), 3, iterations=4)
  np.testing.assert_allclose(centres, ca, atol=1e-5)
  np.testing.assert_array_equal(sizes, sa)
  np.testing.assert_array_equal(assign, _numpy_kmeans(a[0], 3, 4)[2])


def test_kmeans_gradient_flows_through_means_only():
  p = np.random.default_rng(5).normal(size=(10, 4))
  _, sizes, assign = _numpy_kmeans(p, 3, 4)
  jac = jax.jacobian(lambda q: attacks.kmeans(q, 3, iterations=4)[0])(
      jnp.asarray(p, jnp.float32))  # [k, D, N, D]
  # d centre_j / d point_n = [assign_n = j] / size_j * I: the assignments are constants.
  want = (np.eye(3)[assign].T / sizes[:, None])[:, None, :, None] * np.eye(4)[None, :, None, :]
  np.testing.assert_allclose(jac, want, atol=1e-6)


def test_dynamic_ensemble_weights_match_formula():
  cur = np.array([[0.5, 0.2], [0.4, 0.9]])
  prev = np.array([[0.25, 0.2], [0.4, 0.3]])
  r = cur / prev
  want = 2 * np.exp(r) / np.exp(r).sum(0)
  np.testing.assert_allclose(attacks.dynamic_ensemble_weights(jnp.asarray(cur),
                                                              jnp.asarray(prev)), want,
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------
# RandomResizedCrop.
# ---------------------------------------------------------------------------------------

def test_crop_boxes_within_bounds():
  boxes = np.asarray(attacks.sample_crop_boxes(KEY, 512, 16, 12, scale=(0.5, 0.9)))
  top, left, h, w = boxes.T
  area = h * w / (16 * 12)
  assert area.min() >= 0.5 - 1e-5 and area.max() <= 0.9 + 1e-5
  assert np.all(w / h >= 3 / 4 - 1e-5) and np.all(w / h <= 4 / 3 + 1e-5)
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 16 + 1e-4) and np.all(left + w <= 12 + 1e-4)


def test_crop_geometry_identity_and_differentiability():
  x = jnp.asarray(np.random.default_rng(6).uniform(size=(1, 8, 8, 3)), jnp.float32)
  full = jnp.array([[0.0, 0.0, 8.0, 8.0]])
  np.testing.assert_allclose(attacks.crop_and_resize(x, full), x, atol=1e-6)
  # A horizontal ramp x[i, j] = j: output column j samples input column
  # left + (j + 0.5) * w / W - 0.5 (half-pixel centres), exactly, away from the border.
  ramp = jnp.broadcast_to(jnp.arange(8.0)[None, None, :, None], (1, 8, 8, 3))
  out = np.asarray(attacks.crop_and_resize(ramp, jnp.array([[2.0, 3.0, 4.0, 4.0]])))
  j = np.arange(1, 7)
  np.testing.assert_allclose(out[0, 5, j, 0], 3 + (j + 0.5) / 2 - 0.5, atol=1e-5)
  # Bilinear weights of each output pixel sum to 1, so the pixel gradient sums to the
  # sum of the output weights.
  r = jnp.asarray(np.random.default_rng(7).uniform(size=(1, 8, 8, 3)), jnp.float32)
  box = attacks.sample_crop_boxes(KEY, 1, 8, 8)
  g = jax.grad(lambda z: jnp.sum(attacks.crop_and_resize(z, box) * r))(x)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  np.testing.assert_allclose(g.sum(), r.sum(), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Metrics and bad input.
# ---------------------------------------------------------------------------------------

def test_metrics():
  pred, label = np.array([1, 2, 10, 10]), np.array([1, 3, 3, 10])
  assert float(attacks.accuracy(pred, label)) == 0.5
  assert float(attacks.attack_success_rate(pred, 10)) == 0.5
  assert float(attacks.attack_success_rate(pred, np.array([10, 2, 0, 0]))) == 0.25
  fcs = attacks.feature_cosine_similarity(PARAMS, X, TARGET, encoder=ENC)
  np.testing.assert_allclose(fcs, _cos(_numpy_features(PARAMS, X), _numpy_features(PARAMS, TARGET)),
                             atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: attacks.run("fgsm", PARAMS, X, encoder=ENC), "not known"),
    (lambda: attacks.pgd(PARAMS, X, encoder=ENC, budget=-0.1, key=KEY), "budget"),
    (lambda: attacks.pgd(PARAMS, X, encoder=ENC, steps=0, key=KEY), "steps"),
    (lambda: attacks.pgd(PARAMS, X, encoder=ENC, norm="l1", key=KEY), "norm"),
    (lambda: attacks.pgd(PARAMS, X, encoder=ENC, eot_samples=4, key=KEY), "sigma"),
    (lambda: attacks.mattack(PARAMS, X, TARGET, encoder=ENC), "key"),
    (lambda: attacks.foa(PARAMS, X, None, encoder=ENC, key=KEY), "targeted"),
    (lambda: attacks.mattack(PARAMS, X, TARGET, encoder=ENC, key=KEY, scale=(0.5, 1.5)),
     "scale"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ---------------------------------------------------------------------------------------
# The threat model and the rows of the attack tables.
# ---------------------------------------------------------------------------------------


def _attack_section(**overrides):
  from configs import common  # pylint: disable=g-import-not-at-top
  return common.attack_config(**dict(dict(steps=2, n=2, eot_samples=3, batch_size=2),
                                     **overrides))


def test_threat_model_from_config_and_its_keywords():
  c = _attack_section(options={"foa": {"num_clusters": 3, "steps": 1}})
  threat = attacks.ThreatModel.from_config(c)
  assert (threat.budget, threat.step_size, threat.steps, threat.eot_samples) == (
      16 / 255, 1 / 255, 2, 3)
  k = jax.random.key(1)
  assert threat.kwargs("pgd", key=k) == dict(budget=16 / 255, step_size=1 / 255, steps=2,
                                             key=k)
  # Smoothed: EOT over the smoothing noise; per-attack options override the rest.
  assert threat.kwargs("foa", key=k, sigma=0.25) == dict(
      budget=16 / 255, step_size=1 / 255, steps=1, key=k, sigma=0.25, eot_samples=3,
      num_clusters=3)
  assert "16/255, 2 steps of 1/255, 3 EOT draws" in threat.describe()


@pytest.mark.parametrize("overrides, match", [
    (dict(n=0), "config.attack.n must be an integer >= 1"),
    (dict(eot_samples=-1), "config.attack.eot_samples"),
    (dict(batch_size=0), "config.attack.batch_size"),
    (dict(sigma=0.0), "config.attack.sigma"),
    (dict(linf_budget=-0.1), "budget"),
    (dict(options={"fgsm": {}}), "config.attack.options has options for 'fgsm'"),
    (dict(extra_encoders=({"name": "clip"},)), r"extra_encoders\[0\] needs a 'label'"),
])
def test_attack_config_errors_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    attacks.ThreatModel.from_config(_attack_section(**overrides))
  with pytest.raises(ValueError, match="config.attack is missing"):
    attacks.check_attack_config(None)


def test_attack_names():
  assert attacks.attack_names("all") == list(attacks.ATTACKS)
  assert attacks.attack_names("foa, pgd,foa") == ["foa", "pgd"]
  with pytest.raises(ValueError, match="not known"):
    attacks.attack_names("pgd,fgsm")


def test_attack_images_is_the_attack_batch_by_batch():
  """3 images in batches of 2: each batch padded to 2 rows and attacked with the key
  folded with its first index; the padding row changes nothing of the real ones."""
  x = np.random.default_rng(4).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  t = np.random.default_rng(5).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  threat = attacks.ThreatModel(budget=0.03, step_size=0.01, steps=3, eot_samples=2)
  # A smoothed row is attacked through its smoothing: its base, its sigma, EOT draws.
  smoothed = smoothing.SmoothedEncoder(ENC, sigma=0.1, n=64)
  adv = attacks.attack_images("pgd", smoothed, {"encoder": PARAMS}, x, t, threat=threat,
                              key=KEY, batch_size=2)
  first = attacks.pgd(PARAMS, x[:2], t[:2], encoder=ENC, budget=0.03, step_size=0.01,
                      steps=3, key=jax.random.fold_in(KEY, 0), sigma=0.1, eot_samples=2)
  last = attacks.pgd(PARAMS, x[[2, 2]], t[[2, 2]], encoder=ENC, budget=0.03,
                     step_size=0.01, steps=3, key=jax.random.fold_in(KEY, 2), sigma=0.1,
                     eot_samples=2)
  np.testing.assert_array_equal(adv, np.concatenate([first, last[:1]]))
  np.testing.assert_allclose(attacks.linf_distances(adv, x),
                             [np.max(np.abs(adv[i] - x[i])) for i in range(3)])
  assert attacks.linf_distances(adv, x).max() <= 0.03 + 1e-6


def test_rows_of_towers_without_a_booster():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"attack": _attack_section()})
  towers = [("original", ENC, PARAMS), ("FARE", ENC2, PARAMS2)]
  rows = attacks.build_rows(config, towers)
  assert [(r.label, r.tower) for r in rows] == [
      ("original", "original"), ("smoothed", "original"), ("FARE", "FARE"),
      ("FARE + smoothed", "FARE")]
  assert rows[0].encoder is ENC and rows[0].params is PARAMS
  assert rows[2].encoder is ENC2 and rows[2].params is PARAMS2
  for row, (base, params) in ((rows[1], (ENC, PARAMS)), (rows[3], (ENC2, PARAMS2))):
    # A smoothed row is a value: the smoothed encoder of the tower (config.attack's sigma
    # and n), its params the tower's.
    assert isinstance(row.encoder, smoothing.SmoothedEncoder)
    assert (row.encoder.base, row.encoder.sigma, row.encoder.n) == (base, 0.25, 2)
    assert row.params == {"encoder": params}
  config.attack.smooth_extra = False
  assert [r.label for r in attacks.build_rows(config, towers)] == [
      "original", "smoothed", "FARE"]


def test_table_sections():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"attack": _attack_section(), "judge": {"k": 1}})
  a, j = attacks.table_sections(config, "judge", program="certify.t")
  assert a is config.attack and j.k == 1
  with pytest.raises(ValueError, match="certify.t needs a config.head section"):
    attacks.table_sections(config, "head", program="certify.t")
