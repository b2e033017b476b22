r"""A tiny random-init CLIP vision tower for smoke runs on CPU (runs in seconds).

  python -m train.gsb --config configs/clip_tiny.py --workdir /tmp/tiny/gsb
  python -m certify.run --config configs/clip_tiny.py --workdir /tmp/tiny \
      --config.gsb.checkpoint=/tmp/tiny/gsb
  python -m train.head --config configs/clip_tiny.py --workdir /tmp/tiny/heads
  python -m certify.table2 --config configs/clip_tiny.py --workdir /tmp/tiny/heads
  python -m certify.robustness --config configs/clip_tiny.py --workdir /tmp/tiny/table4
  python -m certify.audit --config configs/clip_tiny.py --workdir /tmp/tiny/audit

Every section is present (tests/test_entry_points.py runs all of the above on it).

32 px images, patch 8 (16 patches), width 32, 2 layers, 2 heads, projection 16; weights
are a random init seeded by ``config.encoder.seed``, so the numbers mean nothing beyond
exercising the pipeline. ``--config.encoder.feature=patch_tokens`` gives [B, 16, 32].
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  """The tiny config; ``arg`` is unused (there is one tiny setting) and must be empty."""
  if arg:
    raise ValueError(f"configs/clip_tiny.py takes no argument, got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip",
      checkpoint=config_dict.placeholder(str),  # None: random init of `architecture`
      architecture=dict(  # HF CLIPVisionConfig fields (vision-only model)
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
          image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu",
          layer_norm_eps=1e-5),
      seed=0,
      dtype="float32",
      feature="pooled",
      layer=-1,
      resolution=32,
  ))
  # Table 1's images: the bundled photos; GSB, heads, Table 2 and Table 4: Fashion-MNIST.
  config.data = ml_collections.ConfigDict(dict(
      name="skimage_photos", split="test", image_size=32, batch_size=4, num_examples=4,
      seed=0))
  config.train_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="train", image_size=32, batch_size=4, num_examples=16,
      seed=0))
  config.test_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="test", image_size=32, batch_size=4, seed=0))
  # One sigma: every program runs once per sigma, and one is enough to exercise them.
  # No norm-aware rows (one more compile per variant: ~10 s each on a CPU core, 4 variants
  # in tests/test_entry_points.py); tests/certify/test_run.py turns them on.
  config.certify = common.certify_config(sigmas=(0.5,), n0=16, n=128, batch_size=4,
                                         norm_aware=False)
  config.prediction = common.prediction_config(
      num_classes=3, train_per_class=4, test_per_class=2, head_steps=20, noise_draws=1,
      n0=8, n=32)
  # A booster small enough to train in seconds (2 x 4 denoiser steps, 4 mapper steps).
  config.gsb = common.gsb_config(log_every=1, checkpoint_every=2)
  config.gsb.denoiser.update(width=8, channel_mults=(1, 2), blocks_per_level=1, emb_dim=16,
                             num_groups=4, batch_size=4, epochs=1, learning_rate=1e-2)
  config.gsb.mapper.update(num_blocks=1, num_heads=2, sigma_hidden=8, batch_size=4,
                           epochs=1, learning_rate=0.1)
  # certify.robustness: Fashion-MNIST at 32 px, a few steps.
  config.attack = common.attack_config(steps=5, n=4, eot_samples=2, num_images=4,
                                       batch_size=4, examples=2)
  config.robustness = common.robustness_config(prototypes_per_class=2)
  # certify.audit: a quick audit on config.data.
  config.audit = common.audit_config(n0=16, n=256, measure_n=512, steps=10, eot_samples=4,
                                     batch_size=8)
  return config
