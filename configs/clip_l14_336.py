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

from configs import clip_l14

_DEFAULT = "~/.cache/huggingface/hub/models--openai--clip-vit-large-patch14-336"


def get_config(arg=None):
  """``clip_l14``'s experiment, with the LLaVA-1.5 tower and its feature."""
  config = clip_l14.get_config(arg)
  config.encoder.update(dict(
      checkpoint=os.path.expanduser(os.environ.get("FSJAX_CLIP_L14_336", _DEFAULT)),
      feature="patch_tokens",  # hidden state without CLS, as LLaVA's "patch" select feature
      layer=-2,  # LLaVA-1.5 mm_vision_select_layer
      resolution=336,
  ))
  for data in (config.data, config.train_data, config.test_data):
    data.image_size = 336
  # 576 x 1024 features per image: fewer images per certify call.
  config.data.batch_size = config.certify.batch_size = 4
  return config
