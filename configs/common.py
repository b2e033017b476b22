"""Sections shared by every config: certification, prediction, GSB and its training.

Each experiment config (``default.py``, ``clip_l14.py``, ...) builds its ``config.encoder``
and ``config.data`` and takes these sections, overriding what differs. The paper does
not print every hyperparameter; where it is silent, the default here is our choice and
says so.
"""

import ml_collections
from ml_collections import config_dict


def certify_config(**overrides) -> ml_collections.ConfigDict:
  """``config.certify``: the paper's Table 1 settings (Section 5.1) and our bounds."""
  c = ml_collections.ConfigDict(dict(
      sigmas=(0.25, 0.5),
      eps=(0.125, 0.25, 0.375, 0.5, 0.75),
      cos=0.5,           # radius column: certified radius for cos >= 0.5 (Corollary 3.3)
      n0=100,            # first stage: mean direction (Cohen et al. N0)
      n=10_000,          # second stage: the confidence bound
      alpha=0.001,       # failure probability (Cohen et al.)
      bounds=("point", "hoeffding", "bernstein", "betting"),
      references=("clean", "mean"),
      chunk_size=64,     # noise samples per vectorised chunk
      batch_size=8,      # images per certify call
      distributed=False,  # multi-host: call jax.distributed.initialize() first
  ))
  c.update(overrides)
  return c


def prediction_config(**overrides) -> ml_collections.ConfigDict:
  """``config.prediction``: Table 2 (FS cosine prototypes vs RS linear head)."""
  c = ml_collections.ConfigDict(dict(
      num_classes=10,
      train_per_class=50,   # paper: 500 train images of 10 classes
      test_per_class=50,    # paper: 500 test images
      radii=tuple(0.125 * i for i in range(13)),  # 0 .. 1.5
      head_steps=300,
      head_learning_rate=1e-2,
      head_noise=True,      # train heads on noisy (smoothed) features, as Cohen et al.
      zero_shot=False,      # CLIP: prototypes from class-name prompts, no training
  ))
  c.update(overrides)
  return c


def gsb_config(**overrides) -> ml_collections.ConfigDict:
  """``config.gsb``: the booster's architecture, losses and training (Section 4).

  Built on :func:`fsjax.gsb.default_gsb_config` (which documents what the paper prints
  and what is our choice), plus where the trained booster lives and how training logs.
  """
  from fsjax import gsb  # pylint: disable=g-import-not-at-top
  c = gsb.default_gsb_config()
  c.checkpoint = config_dict.placeholder(str)  # a train.gsb workdir; None = no GSB
  c.log_every = 10
  c.checkpoint_every = 100
  c.update(overrides)
  return c
