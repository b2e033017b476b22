r"""LLaVA-1.5's vision tower: CLIP ViT-L/14 at 336 px, penultimate-layer patch tokens.

  python -m certify.run --config configs/clip_l14_336.py \
      --config.encoder.checkpoint=/path/to/clip-vit-large-patch14-336

LLaVA-1.5 feeds its projector with hidden state -2 (the output of layer 23 of 24) without
the CLS token: 576 tokens of width 1024, so the feature is [B, 576, 1024]; layer 24 is
never computed. ``checkpoint`` is a local Hugging Face directory or cache folder of
openai/clip-vit-large-patch14-336; default $FSJAX_CLIP_L14_336, else the Hugging Face cache
folder. Nothing is downloaded: building fails with a clear message if the path does not
exist.
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common

_DEFAULT = "~/.cache/huggingface/hub/models--openai--clip-vit-large-patch14-336"


def get_config(arg=None):
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip",
      checkpoint=os.path.expanduser(os.environ.get("FSJAX_CLIP_L14_336", _DEFAULT)),
      dtype="float32",
      feature="patch_tokens",  # hidden state without CLS, as LLaVA's "patch" select feature
      layer=-2,  # LLaVA-1.5 mm_vision_select_layer
      resolution=336,
  ))
  # The paper's Table 1: 500 ImageNet validation images. ImageNet is prepared by TFDS from
  # the ILSVRC-2012 tars in a local folder (--config.data.manual_dir=...), never downloaded.
  imagenet = dict(name="imagenet2012", image_size=336, seed=0,
                  manual_dir=config_dict.placeholder(str))
  config.data = ml_collections.ConfigDict(dict(
      imagenet, split="validation", batch_size=4, num_examples=500))
  config.train_data = ml_collections.ConfigDict(dict(imagenet, split="train", batch_size=16))
  config.test_data = ml_collections.ConfigDict(dict(
      imagenet, split="validation", batch_size=50))
  config.certify = common.certify_config(batch_size=4)
  config.prediction = common.prediction_config(train_per_class=50, test_per_class=50,
                                               zero_shot=True)
  # The paper's GSB settings: Adam, batch 8, 8 epochs (D); AdamW + cosine, batch 16,
  # 8 epochs (M). We train on the first 10k ImageNet training images by default.
  config.gsb = common.gsb_config()
  config.train_data.num_examples = 10_000
  return config
