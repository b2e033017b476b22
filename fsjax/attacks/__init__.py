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

The attack tables (``certify.robustness``, ``certify.protection``) share one threat model
(:class:`ThreatModel`, the ``config.attack`` section, :func:`check_attack_config`), one
attack loop (:func:`attack_images`) and one builder of their rows (:func:`build_rows`).
"""

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
from fsjax.attacks._rows import Row
from fsjax.attacks._rows import Tower
from fsjax.attacks._rows import build_rows
from fsjax.attacks._rows import extra_towers
from fsjax.attacks._rows import row_features
from fsjax.attacks._threat import ALL
from fsjax.attacks._threat import ATTACKS
from fsjax.attacks._threat import ThreatModel
from fsjax.attacks._threat import attack_images
from fsjax.attacks._threat import attack_names
from fsjax.attacks._threat import check_attack_config
from fsjax.attacks._threat import linf_distances
from fsjax.attacks._threat import run
from fsjax.attacks._threat import table_sections

__all__ = [
    "ALL", "ATTACKS", "Row", "ThreatModel", "Tower", "accuracy", "attack_images",
    "attack_names", "attack_success_rate", "attackvlm", "build_rows", "check_attack_config",
    "crop_and_resize", "dynamic_ensemble_weights", "extra_towers",
    "feature_cosine_similarity", "foa", "kmeans",
    "linf_distances", "local_alignment_loss", "mattack", "pgd", "random_resized_crop",
    "row_features", "run", "table_sections", "sample_crop_boxes", "transport_cost",
]
