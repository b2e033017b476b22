r"""CLIP ViT-L/14 (openai/clip-vit-large-patch14) at 224 px; feature = pooled image embedding.

  python -m certify.run --config configs/clip_l14.py \
      --config.encoder.checkpoint=/path/to/clip-vit-large-patch14

``checkpoint`` is a local Hugging Face directory (config.json + model.safetensors), a
Hugging Face cache folder, or an OpenCLIP ViT-L-14 file (e.g. FARE/TeCoA robust weights).
Default: $FSJAX_CLIP_L14, else the Hugging Face cache folder of
openai/clip-vit-large-patch14. Nothing is downloaded: building the encoder fails with a
clear message if the path does not exist. Add ``--config.encoder.dtype=bfloat16`` for
bfloat16 compute. ``--config configs/clip_l14.py:runlocal`` shrinks every experiment to a
few images and samples (a check of the setup on a CPU, not the paper's numbers).
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common

_DEFAULT = "~/.cache/huggingface/hub/models--openai--clip-vit-large-patch14"


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
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
  # The paper's Table 1: 500 ImageNet validation images. ImageNet is prepared by TFDS from
  # the ILSVRC-2012 tars in a local folder (--config.data.manual_dir=...), never downloaded.
  imagenet = dict(name="imagenet2012", image_size=224, seed=0,
                  manual_dir=config_dict.placeholder(str))
  config.data = ml_collections.ConfigDict(dict(
      imagenet, split="validation", batch_size=8, num_examples=500))
  config.train_data = ml_collections.ConfigDict(dict(imagenet, split="train", batch_size=16))
  config.test_data = ml_collections.ConfigDict(dict(
      imagenet, split="validation", batch_size=50))
  config.certify = common.certify_config(batch_size=8)
  config.prediction = common.prediction_config(train_per_class=50, test_per_class=50,
                                               zero_shot=True)
  # The paper's GSB settings: Adam, batch 8, 8 epochs (D); AdamW + cosine, batch 16,
  # 8 epochs (M). We train on the first 10k ImageNet training images by default.
  config.gsb = common.gsb_config()
  config.train_data.num_examples = 10_000
  # certify.robustness: the paper's classification task (Appendix): 10 ImageNet classes
  # plus "shark" (great white shark, 2) as the held-out target; zero-shot text prototypes;
  # 300 steps, 16/255. FARE / TeCoA rows: add OpenCLIP checkpoints, e.g.
  #   config.attack.extra_encoders = (dict(config.encoder, label="FARE",
  #                                        checkpoint="/path/to/fare2.pt"),)
  config.attack = common.attack_config(num_images=500, n=16, eot_samples=4, batch_size=8)
  config.robustness = common.robustness_config(
      classes=(7, 368, 207, 1, 8, 54, 296, 148, 121, 21, 2), target_class=2, head="auto")
  # certify.audit: 100 ImageNet validation images x 4 fractions x both references.
  config.audit = common.audit_config(num_images=100, measure_n=10_000, screen_n=256)
  if arg.runlocal:  # a few images and samples: minutes on a CPU
    config.data.update(num_examples=2, batch_size=2)
    config.train_data.num_examples = 16
    config.certify.update(n0=16, n=128, batch_size=2)
    config.prediction.update(train_per_class=2, test_per_class=1, head_steps=10)
    config.attack.update(num_images=2, steps=5, n=4, eot_samples=1, batch_size=2)
    config.audit.update(num_images=2, n0=16, n=128, measure_n=256, screen_n=None)
    config.gsb.denoiser.epochs = config.gsb.mapper.epochs = 1
  return config
