r"""A tiny random LLaVA for tests and smoke runs on CPU (seconds).

  import fsjax.llava
  from configs import llava_tiny
  model, params = fsjax.llava.build(llava_tiny.get_config())
  model.generate(params, images, "describe this image")     # random words

A 28-px CLIP tower (2 layers, width 32: 4 image tokens), a 2-layer LLaMA (hidden 64,
4 heads, 2 KV heads, vocabulary 128, ``<image>`` = 100), random weights seeded by
``config.llava.seed`` and a word-level tokenizer of ``config.llava.words``: the answers
mean nothing; everything else (prompt format, image merge, KV cache, decoding) is real.
``get_config("smoothed")`` smooths the vision side with n = 4.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  """The tiny config; ``arg`` is "" or "smoothed"."""
  if arg not in (None, "", "smoothed"):
    raise ValueError(f"configs/llava_tiny.py takes no argument or 'smoothed', got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.llava = ml_collections.ConfigDict(dict(
      checkpoint=config_dict.placeholder(str),  # None: random init of `architecture`
      architecture=dict(  # HF LlavaConfig fields
          image_token_index=100, vision_feature_layer=-2,
          vision_feature_select_strategy="default", projector_hidden_act="gelu",
          text_config=dict(model_type="llama", vocab_size=128, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0),
          vision_config=dict(model_type="clip_vision_model", hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=28, patch_size=14, projection_dim=16)),
      seed=0,
      dtype="float32",
      param_dtype="float32",
      system_prompt=config_dict.placeholder(str),
      max_new_tokens=8,
      words=("describe", "this", "image", "what", "is", "in", "it", "?"),
  ))
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip", checkpoint=config_dict.placeholder(str)))  # None: the LLaVA's own tower
  config.smoothing = ml_collections.ConfigDict(dict(
      sigma=0.25, n=4 if arg == "smoothed" else 0, features="direction", chunk_size=4))
  return config
