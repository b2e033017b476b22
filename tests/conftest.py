"""Shared fixtures: a tiny deterministic encoder for the smoothing and certify tests."""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import pytest

from fsjax import encoders


@dataclasses.dataclass(frozen=True, eq=False)
class ToyEncoder(encoders.Encoder):
  """A two-layer tanh network on 8x8 images: smooth, cheap, and not too robust."""

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution)
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])
    return ((h @ params["w2"]) + params["b"])[:, None, :]


def toy_params(seed: int = 0, dim: int = 16, offset: float = 2.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w1": jax.random.normal(k1, (8 * 8 * 3, 32)) / 10.0,
          "w2": jax.random.normal(k2, (32, dim)),
          "b": offset * jnp.ones((dim,))}


@pytest.fixture(scope="session")
def toy():
  """``(encoder, params)`` of the toy encoder."""
  return ToyEncoder(resolution=8), toy_params()
