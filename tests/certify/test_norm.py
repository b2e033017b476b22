"""certify._norm: the norm-aware cosine certificate against closed forms and brute force.

The exact-truth model is a half-space encoder in 2-D: f(x) = (s_1, s_2) / sqrt(2) with
s_i = sign(<w_i, x> - b_i), whose smoothed encoder is known in closed form,
f_s(x) = (2 Phi((<w_1, x> - b_1) / sigma) - 1, 2 Phi((<w_2, x> - b_2) / sigma) - 1) / sqrt(2)
(E sign(<w, x + delta> - b) = 2 Phi((<w, x> - b) / sigma) - 1 for unit w, whatever the
other half-space does, so no independence is needed).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy.stats import norm as sp_norm

from certify import _closed_form
from certify import _norm
from fsjax import encoders

SIGMA = 0.5
# Two unit normals 60 degrees apart and offsets: a non-orthogonal exact-truth model.
W = np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]])
OFFSET = np.array([-0.6, -0.9])


def _smoothed(x):
  """Exact f_s of the 2-D half-space encoder, ``x [..., 2]`` -> ``[..., 2]`` (float64)."""
  t = (x @ W.T - OFFSET) / SIGMA
  return (2.0 * sp_norm.cdf(t) - 1.0) / np.sqrt(2.0)


def _disk(center, eps, rings=60, angles=720):
  r = eps * np.sqrt(np.linspace(0.0, 1.0, rings))[:, None]
  a = np.linspace(0.0, 2 * np.pi, angles, endpoint=False)[None, :]
  pts = np.stack([r * np.cos(a), r * np.sin(a)], -1).reshape(-1, 2)
  return center + pts


def test_norm_bound_matches_formula():
  n = np.array([0.0, 0.3, 0.9, 0.999])
  eps = np.array([0.0, 0.1, 0.5, 1.0])
  got = np.asarray(_norm.norm_bound(n[:, None], eps[None, :], SIGMA))
  want = 2 * sp_norm.cdf(sp_norm.ppf((1 + n[:, None]) / 2) + eps[None, :] / SIGMA) - 1
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(got[:, 0], n, atol=2e-6)  # U(0) = N


def test_cosine_bound_is_b_over_u_and_never_below_b():
  deficit = np.array([0.01, 0.05, 0.2])
  norm_upper = np.array([0.97, 0.9, 0.6])
  eps = np.array([0.0, 0.25, 0.5, 1.0])
  b = np.asarray(_closed_form.bound_from_deficit(deficit[:, None], eps[None], SIGMA))
  u = 2 * sp_norm.cdf(sp_norm.ppf((1 + norm_upper[:, None]) / 2) + eps[None] / SIGMA) - 1
  got = np.asarray(_norm.norm_aware_cosine_bound(deficit[:, None], norm_upper[:, None], eps[None], SIGMA))
  want = np.where(b >= 0, np.minimum(b / u, 1.0), -1.0)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(got[b >= 0] >= b[b >= 0] - 1e-6)


@pytest.mark.parametrize("cos", [0.0, 0.5, 0.9])
def test_radius_solves_b_over_u_equals_cos(cos):
  deficit = np.array([0.001, 0.02, 0.1, 0.4])
  norm_upper = np.array([0.998, 0.97, 0.85, 0.5])
  got = np.asarray(_norm.norm_aware_radius(jnp.asarray(deficit), jnp.asarray(norm_upper), SIGMA, cos))
  for d, n, r in zip(deficit, norm_upper, got):
    zl, zn = sp_norm.ppf(1 - d), sp_norm.ppf((1 + n) / 2)
    g = lambda t: (2 * sp_norm.cdf(zl - t) - 1) - cos * (2 * sp_norm.cdf(zn + t) - 1)  # noqa: E731
    want = SIGMA * optimize.brentq(g, 0.0, zl) if g(0.0) >= 0 else 0.0
    assert abs(r - want) < 2e-4, (d, n, r, want)
    # Never below Corollary 3.3's radius (U = 1).
    plain = float(_closed_form.radius_from_deficit(jnp.float32(d), SIGMA, cos))
    assert r >= max(plain, 0.0) - 1e-5


@pytest.mark.parametrize("x0", [(0.3, 0.4), (1.0, 0.2), (0.0, 1.2)])
def test_brute_force_worst_case_on_half_space_encoder(x0):
  """Exact scores in, the worst cosine over a dense grid of the eps-disk out."""
  x0 = np.asarray(x0)
  fs = _smoothed(x0)
  n_exact = np.linalg.norm(fs)
  u = fs / n_exact
  deficit = (1.0 - n_exact) / 2.0  # 1 - h_u, h_u = (1 + <f_s, u>) / 2 = (1 + ||f_s||) / 2
  gained = []
  for eps in (0.0, 0.05, 0.15, 0.3, 0.5):
    pts = _disk(x0, eps)
    f = _smoothed(pts)
    worst_cos = np.min(f @ u / np.linalg.norm(f, axis=-1))
    worst_norm = np.max(np.linalg.norm(f, axis=-1))
    bound = float(_norm.norm_aware_cosine_bound(jnp.float32(deficit), jnp.float32(n_exact), eps, SIGMA))
    plain = float(_closed_form.bound_from_deficit(jnp.float32(deficit), eps, SIGMA))
    assert worst_norm <= float(_norm.norm_bound(jnp.float32(n_exact), eps, SIGMA)) + 1e-5
    if plain >= 0:
      assert worst_cos >= bound - 1e-5, (eps, worst_cos, bound)
      gained.append(bound - plain)
  if n_exact < 0.95:
    assert max(gained) > 0.05  # the norm pays where ||f_s(x)|| is well below 1


def test_radius_is_sound_on_half_space_encoder():
  x0 = np.array([0.3, 0.4])
  fs = _smoothed(x0)
  n_exact = np.linalg.norm(fs)
  u = fs / n_exact
  r = float(_norm.norm_aware_radius(jnp.float32((1 - n_exact) / 2), jnp.float32(n_exact), SIGMA, 0.5))
  assert r > 0
  f = _smoothed(_disk(x0, r))
  assert np.min(f @ u / np.linalg.norm(f, axis=-1)) >= 0.5 - 1e-5


@dataclasses.dataclass(frozen=True, eq=False)
class HalfSpaceEncoder(encoders.Encoder):
  """f(x) = (s_1, s_2) / sqrt(2), s_i = sign(<w_i, x> - b_i) on the first two pixels' red."""

  def tokens(self, params, x, *, sigma=None):
    v = x.reshape(x.shape[0], -1)[:, jnp.array([0, 3])]  # red of pixels (0, 0) and (0, 1)
    s = jnp.sign(v @ jnp.asarray(W.T, jnp.float32) - jnp.asarray(OFFSET, jnp.float32))
    return s[:, None, :]


def test_norm_aware_fcsb_bounds_hold_and_are_tight():
  enc = HalfSpaceEncoder(resolution=2)
  x = np.zeros((3, 2, 2, 3), np.float32)
  pts = np.array([[0.3, 0.4], [1.0, 0.2], [0.1, 0.9]])
  x[:, 0, 0, 0], x[:, 0, 1, 0] = pts[:, 0], pts[:, 1]
  eps = [0.0, 0.25]
  cert = _norm.norm_aware_fcsb({}, x, encoder=enc, sigma=SIGMA, eps=eps,
                               key=jax.random.PRNGKey(0), n=4000, n0=64, alpha=0.01,
                               chunk_size=64)
  fs = _smoothed(pts)
  n_exact = np.linalg.norm(fs, axis=-1)
  u = np.asarray(cert.direction)
  h_exact = 0.5 * (1 + np.sum(fs * u, -1))
  assert np.all(np.asarray(cert.score) <= h_exact)
  assert np.all(np.asarray(cert.norm_upper) >= n_exact)
  assert np.all(np.asarray(cert.norm_upper) <= n_exact + 0.1)
  assert np.all(np.asarray(cert.score) >= h_exact - 0.05)
  cos = np.asarray(cert.cosine_bound)
  assert np.all(cos >= np.asarray(cert.inner_product_bound) - 1e-6)


def test_norm_aware_fcsb_rejects_odd_n():
  enc = HalfSpaceEncoder(resolution=2)
  with pytest.raises(ValueError, match="even"):
    _norm.norm_aware_fcsb({}, np.zeros((1, 2, 2, 3), np.float32), encoder=enc, sigma=0.5,
                          eps=0.1, key=jax.random.PRNGKey(0), n=101, chunk_size=64)
