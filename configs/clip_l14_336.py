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
  return config
