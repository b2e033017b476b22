r"""A tiny random-init CLIP vision tower for smoke runs on CPU (runs in seconds).

  python -m certify.run --config configs/clip_tiny.py

32 px images, patch 8 (16 patches), width 32, 2 layers, 2 heads, projection 16; weights
are a random init seeded by ``config.encoder.seed``, so the numbers mean nothing beyond
exercising the pipeline. ``--config.encoder.feature=patch_tokens`` gives [B, 16, 32].
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  del arg  # no variants yet
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
  config.data = ml_collections.ConfigDict(dict(
      name="skimage_photos", split="test", image_size=32, batch_size=4, num_examples=4,
      seed=0))
  config.certify = common.certify_config(n0=16, n=128, batch_size=4)
  config.gsb = common.gsb_config()
  # certify.robustness: Fashion-MNIST at 32 px (this config has no test_data), a few steps.
  config.attack = common.attack_config(
      steps=5, n=4, eot_samples=2, num_images=4, batch_size=4,
      prototypes_per_class=2, examples=2,
      data=dict(name="fashion_mnist", split="test", image_size=32, batch_size=4, seed=0))
  # certify.audit: a quick audit on config.data.
  config.audit = common.audit_config(n0=16, n=256, measure_n=512, steps=10, eot_samples=4,
                                     batch_size=8)
  return config
