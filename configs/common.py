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
      chunk_size=16,     # noise samples per vectorised chunk (16 measured fastest on CPU)
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
      # Our choices (the paper does not print them):
      noise_draws=4,        # head_noise: cached noise draws per training image
      head_batch_size=256,  # examples per Adam step of the heads
      bound="bernstein",    # FS confidence bound of h_u(x) (certify.certify_prediction)
      # Table 2's Monte Carlo; None = config.certify.n0 / config.certify.n.
      n0=config_dict.placeholder(int),
      n=config_dict.placeholder(int),
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


def attack_config(**overrides) -> ml_collections.ConfigDict:
  """``config.attack``: the robustness table (Table 4, classification; ``certify.robustness``).

  The paper's threat model: l_inf 16/255, 300 steps of 1/255, white-box through the
  smoothing (EOT) and GSB. ``smoothing_n`` and ``eot_samples`` are our choices (the
  paper's Table 7 compares n = 1 ... 64).
  """
  c = ml_collections.ConfigDict(dict(
      eps=16 / 255,        # l_inf budget (paper)
      step_size=1 / 255,   # sign-step size (paper)
      steps=300,           # paper: 300; lower on CPU
      sigma=0.25,          # smoothing noise level of the smoothed rows
      smoothing_n=16,      # Monte Carlo samples of the smoothed encoder at evaluation
      eot_samples=4,       # noise draws per attack step on a smoothed encoder (EOT)
      data=None,           # a dataset config; None: config.test_data (labelled)
      num_images=16,       # attacked images (from classes other than target_class)
      classes=None,        # class ids the classifier knows; None: all of the dataset's
      target_class=-1,     # the attacker's target class id, held out (<0: from the end)
      head="auto",         # "auto", "class_mean" or "zero_shot" (CLIP text prototypes)
      prototype_split="train",  # split of the class-mean prototypes' images
      prototypes_per_class=10,
      templates=("a photo of a {}.",),  # zero-shot prompt templates
      extra_encoders=(),   # more rows: encoder sub-configs with a "label" (FARE, TeCoA)
      options={},          # per-attack keyword overrides, e.g. {"foa": {"num_clusters": 3}}
      smooth_extra=True,   # also a smoothed row for every extra encoder
      batch_size=8,        # images per attack call
      examples=4,          # images in the PNG strips
  ))
  c.update(overrides)
  return c


def audit_config(**overrides) -> ml_collections.ConfigDict:
  """``config.audit``: the soundness audit of the certificate (``certify.audit``).

  Attack every certificate inside its own radius (l2 PGD + EOT against the certified
  direction u) and count measured inner products below the certified bound.
  """
  c = ml_collections.ConfigDict(dict(
      data=None,           # a dataset config; None: config.data
      num_images=config_dict.placeholder(int),  # None: the data's num_examples
      sigma=0.25,
      n0=100,
      n=10_000,
      alpha=0.001,
      bound="bernstein",
      references=("mean", "clean"),
      cos=0.5,             # radius for cos >= cos (Corollary 3.3) that eps_fractions scale
      eps_fractions=(0.25, 0.5, 0.75, 1.0),
      eps=config_dict.placeholder(tuple),  # set: these radii where B >= 0, not fractions
      steps=20,            # l2 PGD steps
      step_factor=2.5,     # step = step_factor * eps / steps (Madry et al.)
      eot_samples=8,       # noise draws per attack step
      measure_n=10_000,    # fresh samples measuring <f_s(x_adv), u>
      screen_n=config_dict.placeholder(int),  # set: screen every pair with screen_n
      screen_k=6.0,        # samples first; only pairs within screen_k se of B get measure_n
      k_sigma=3.0,         # violation beyond k standard errors of the measurement
      variants=config_dict.placeholder(tuple),  # None: every variant (FS, FS+D+M, ...)
      batch_size=16,       # (image, eps) pairs per attack call
      chunk_size=64,
  ))
  c.update(overrides)
  return c
