"""fsjax.heads: the Table 2 head modules, against numpy."""

import jax
import numpy as np

import certify
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
