"""White-box attacks on (smoothed, GSB-boosted) encoders, and the paper's attack metrics.

All attacks are pure, batched, jitted functions of the parameters with the encoder a
static argument; they take ``[B, H, W, 3]`` images in [0, 1] and return adversarial
images in [0, 1] within the budget. Every attack has the signature
``attack(params, x, target, *, encoder, budget=16/255, step_size=1/255, steps=300, key, ...)``
(``target=None`` only for untargeted :func:`pgd`), and :func:`run` dispatches by name:

* ``"pgd"``: feature-space PGD, l_inf or l2, untargeted or targeted, with EOT over the
  smoothing noise (the adaptive attack on the smoothed encoder).
* ``"attackvlm"``: AttackVLM MF-ii (Zhao et al. 2023).
* ``"mattack"``: M-Attack (Li et al. 2025), random crops, encoder ensembles.
* ``"foa"``: FOA-Attack (Jia et al. 2025), M-Attack + k-means/OT local alignment and
  dynamic ensemble weights.

A GSB-boosted encoder has the same interface (params ``{"encoder", "denoiser",
"mapper"}``), so every attack goes through its denoiser and mapper: the paper's
white-box setting (Section 5.2).
"""

from typing import Any

import jax

from fsjax.attacks._crop import crop_and_resize
from fsjax.attacks._crop import random_resized_crop
from fsjax.attacks._crop import sample_crop_boxes
from fsjax.attacks._ensemble import dynamic_ensemble_weights
from fsjax.attacks._ensemble import foa
from fsjax.attacks._ensemble import mattack
from fsjax.attacks._local import kmeans
from fsjax.attacks._local import local_alignment_loss
from fsjax.attacks._local import transport_cost
from fsjax.attacks._metrics import accuracy
from fsjax.attacks._metrics import attack_success_rate
from fsjax.attacks._metrics import feature_cosine_similarity
from fsjax.attacks._pgd import attackvlm
from fsjax.attacks._pgd import pgd

ATTACKS = {"pgd": pgd, "attackvlm": attackvlm, "mattack": mattack, "foa": foa}


def run(name: str, params: Any, x: jax.typing.ArrayLike,
        target: jax.typing.ArrayLike | None = None, *, encoder: Any, **kwargs) -> jax.Array:
  """Runs the attack registered as ``name`` in :data:`ATTACKS`.

  Args:
    name: ``"pgd"``, ``"attackvlm"``, ``"mattack"`` or ``"foa"``.
    params: encoder parameters (a tuple for an ensemble in mattack/foa).
    x: ``[B, H, W, 3]`` clean images in [0, 1].
    target: ``[B, H', W', 3]`` target images (required except for untargeted pgd).
    encoder: the ``Encoder`` under attack (a tuple for an ensemble in mattack/foa).
    **kwargs: the attack's options (``budget``, ``step_size``, ``steps``, ``key``, ...).

  Returns:
    ``[B, H, W, 3]`` adversarial images.
  """
  if name not in ATTACKS:
    raise ValueError(f"attack {name!r} is not known; known attacks: {sorted(ATTACKS)}.")
  return ATTACKS[name](params, x, target, encoder=encoder, **kwargs)


__all__ = [
    "ATTACKS", "accuracy", "attack_success_rate", "attackvlm", "crop_and_resize",
    "dynamic_ensemble_weights", "feature_cosine_similarity", "foa", "kmeans",
    "local_alignment_loss", "mattack", "pgd", "random_resized_crop", "run",
    "sample_crop_boxes", "transport_cost",
]
