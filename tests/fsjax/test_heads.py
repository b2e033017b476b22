"""fsjax.heads: the Table 2 head modules, against numpy."""

import jax
import numpy as np

import certify
from fsjax import encoders
from fsjax import heads


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cosine_head_and_unit_prototypes():
  head = heads.CosinePrototypeHead(num_classes=5, dim=12)
  rng = np.random.default_rng(5)
  z = rng.normal(size=(7, 12)).astype(np.float32)
  params = head.init(jax.random.key(0), z)["params"]
  w = np.asarray(heads.unit_prototypes(params))
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
  logits = np.asarray(head.apply({"params": params}, z))
  np.testing.assert_allclose(logits, head.scale * _unit(z) @ w.T, atol=1e-4)
  cls, _ = certify.angle_margin(z, w)
  np.testing.assert_array_equal(cls, np.argmax(logits, axis=1))


def test_linear_head_is_scale_invariant():
  head = heads.LinearHead(num_classes=3)
  z = np.random.default_rng(6).normal(size=(4, 8)).astype(np.float32)
  params = head.init(jax.random.key(0), z)
  np.testing.assert_allclose(head.apply(params, z), head.apply(params, 3 * z), rtol=1e-5, atol=1e-6)
  assert head.apply(params, z).shape == (4, 3)


def test_projected_head_and_the_encoder_fs_certifies():
  """With a projection, logits = scale <unit(P^T unit(z)), w_k>, and fs_encoder computes
  exactly the feature the prototypes score: unit(P^T f(x))."""
  head = heads.CosinePrototypeHead(num_classes=3, dim=6, projection_dim=4, scale=8.0)
  rng = np.random.default_rng(7)
  z = rng.normal(size=(5, 6)).astype(np.float32)
  variables = head.init(jax.random.key(1), z)
  p = variables["params"]
  assert p["projection"].shape == (6, 4) and p["prototypes"].shape == (3, 4)
  kernel, w = np.asarray(p["projection"], np.float64), _unit(np.asarray(p["prototypes"], np.float64))
  want = 8.0 * _unit(_unit(z.astype(np.float64)) @ kernel) @ w.T
  np.testing.assert_allclose(head.apply(variables, z), want, rtol=1e-5, atol=1e-5)

  class Linear(encoders.Encoder):  # a base encoder with a known unit feature
    def tokens(self, params, x, *, sigma=None):
      return x.reshape(x.shape[0], 1, -1) @ params

  base = Linear(resolution=2)
  base_params = rng.normal(size=(12, 6)).astype(np.float32)
  x = rng.uniform(size=(5, 2, 2, 3)).astype(np.float32)
  enc, fs_params = heads.fs_encoder(base, base_params, variables)
  assert isinstance(enc, heads.ProjectedEncoder) and enc.resolution == 2
  assert heads.fs_encoder(base, base_params, variables)[0] is enc  # one jit cache entry
  f = _unit(x.reshape(5, -1).astype(np.float64) @ base_params)
  np.testing.assert_allclose(enc(fs_params, x), _unit(f @ kernel), rtol=1e-5, atol=1e-6)
  # Its prototype scores are the head's logits on f: certificate and head agree.
  np.testing.assert_allclose(8.0 * np.asarray(enc(fs_params, x)) @ w.T,
                             head.apply(variables, f.astype(np.float32)), rtol=1e-4, atol=1e-4)
  # A head without a projection certifies on the encoder itself.
  plain = heads.CosinePrototypeHead(num_classes=3, dim=6).init(jax.random.key(0), z)
  assert heads.fs_encoder(base, base_params, plain) == (base, base_params)
