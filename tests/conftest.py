"""Shared fixtures: a tiny deterministic encoder for the smoothing and certify tests."""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import numpy as np
from PIL import Image
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


def _make_folder_dataset(root, *, classes=3, per_split=(("train", 4), ("test", 2)), seed=0):
  """Class-coloured 32 px PNGs under ``root/<split>/<class>/``: easy to separate."""
  rng = np.random.default_rng(seed)
  colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]])
  for split, count in per_split:
    for c in range(classes):
      folder = root / split / f"class_{c}"
      folder.mkdir(parents=True)
      for i in range(count):
        img = np.clip(colours[c] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
  return root


@pytest.fixture(scope="session")
def make_folder_dataset():
  """``make_folder_dataset(root, classes=3, per_split=...)``: a tiny class-coloured image folder."""
  return _make_folder_dataset
