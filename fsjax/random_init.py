"""Random parameters for smoke runs and tests, drawn with numpy from a parameter tree.

numpy rather than ``model.init``: compiling a jitted threefry init costs seconds on CPU,
longer than a tiny smoke run itself. Roughly Hugging Face's ``_init_weights``: weights
N(0, 0.02), biases 0, LayerNorm scales 1; ``special`` overrides chosen leaves by name.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax.numpy as jnp
import numpy as np


def numpy_init(shapes: Any, *, seed: int, std: float = 0.02,
               special: Mapping[str, Callable[[np.random.Generator, tuple], np.ndarray]]
               | None = None) -> dict:
  """A float32 parameter tree with the structure of ``shapes`` (``ShapeDtypeStruct`` leaves).

  Args:
    shapes: the tree, e.g. ``jax.eval_shape(model.init, ...)["params"]``.
    seed: numpy seed; leaves are drawn in sorted path order, so the values are fixed.
    std: standard deviation of the weights.
    special: ``{leaf name or name suffix: fn(rng, shape) -> array}`` for other leaves
      (e.g. ``"logit_scale"``, ``"_gate"``); matched before the defaults.
  """
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(shapes, sep="/")
  params = {}
  for path, leaf in sorted(flat.items()):  # sorted: the draw order fixes the values
    name = path.rsplit("/", 1)[-1]
    fn = next((f for key, f in (special or {}).items() if name.endswith(key)), None)
    if fn is not None:
      value = fn(rng, leaf.shape)
    elif name == "scale":
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = np.zeros(leaf.shape)
    else:
      value = rng.normal(0.0, std, leaf.shape)
    params[path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(params, sep="/")
