r"""CLIP ViT-L/14 (openai/clip-vit-large-patch14) at 224 px; feature = pooled image embedding.

  python -m certify.run --config configs/clip_l14.py \
      --config.encoder.checkpoint=/path/to/clip-vit-large-patch14

``checkpoint`` is a local Hugging Face directory (config.json + model.safetensors), a
Hugging Face cache folder, or an OpenCLIP ViT-L-14 file (e.g. FARE/TeCoA robust weights).
Default: $FSJAX_CLIP_L14, else the Hugging Face cache folder of
openai/clip-vit-large-patch14. Nothing is downloaded: building the encoder fails with a
clear message if the path does not exist. Add ``--config.encoder.dtype=bfloat16`` for
bfloat16 compute.
"""

import os

import ml_collections

_DEFAULT = "~/.cache/huggingface/hub/models--openai--clip-vit-large-patch14"


def get_config(arg=None):
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip",
      checkpoint=os.path.expanduser(os.environ.get("FSJAX_CLIP_L14", _DEFAULT)),
      dtype="float32",
      feature="pooled",  # the projected CLS embedding, [B, 1, 768]
      layer=-1,  # unused by "pooled"
      resolution=224,
  ))
  return config
