r"""A tiny random-init OpenFlamingo on the tiny CLIP, for smoke runs on CPU (seconds).

  import fsjax.flamingo
  from configs import openflamingo_tiny
  of, params = fsjax.flamingo.build(openflamingo_tiny.get_config())
  tokens, num_steps = of.generate(input_ids, images, max_new_tokens=8)

32 px images, patch 8: 16 vision tokens of width 32; a 4-layer MPT (width 64, vocab 130)
with gated cross-attention before layers 1 and 3; random weights seeded by
``openflamingo.seed`` (cross-attention gates 0.5, so the image matters). Set
``openflamingo.tokenizer`` to a tokenizer folder (<= 127 base tokens) to use ``caption``
and ``certify.protection`` (its ``attack`` and ``protection`` sections: seconds, the embedded questions);
``--config.smoothing.n=4`` describes a smoothed vision side
(``fsjax.mllm.smoothed(of, params, **config.smoothing)``).
"""

import ml_collections
from ml_collections import config_dict

from configs import clip_tiny
from configs import common


def get_config(arg=None):
  """The tiny config; ``arg`` is unused (one setting) and must be empty."""
  if arg:
    raise ValueError(f"configs/openflamingo_tiny.py takes no argument, got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = clip_tiny.get_config().encoder  # the one tiny CLIP, its patch tokens
  config.encoder.feature = "patch_tokens"
  config.openflamingo = ml_collections.ConfigDict(dict(
      checkpoint=config_dict.placeholder(str),  # None: random init of `architecture`
      lang_encoder=config_dict.placeholder(str),
      tokenizer=config_dict.placeholder(str),
      dtype="float32",
      param_dtype="float32",
      seed=0,
      max_new_tokens=8,
      prompt_format="<image>{prompt}",  # a task's prompt text in OpenFlamingo's format
      architecture=dict(
          lang=dict(vocab_size=130, d_model=64, n_heads=4, n_layers=4, expansion_ratio=4,
                    max_seq_len=128),
          eoc_token_id=127, media_token_id=128,
          vis_dim=32, cross_attn_every_n_layers=2,
          perceiver_depth=2, num_latents=8, dim_head=16, heads=2, ff_mult=2),
  ))
  config.smoothing = ml_collections.ConfigDict(dict(
      sigma=0.25, n=0, features="direction", chunk_size=4))  # n > 0: smoothed vision side
  config.prompts = ml_collections.ConfigDict(dict(caption="<image>Output:"))
  # certify.protection on the embedded Fashion-MNIST questions, sized for seconds (the
  # random model's answers mean nothing; shapes, rows and files are real).
  config.attack = common.mllm_attack_config(steps=2, n=2, eot_samples=1, num_images=2,
                                            batch_size=2, examples=2)
  config.protection = common.protection_config(
      data=common.embedded_protection_data(image_size=32),
      caption_prompt="Output:",  # "<image>Output:" in OpenFlamingo's prompt format
      max_new_tokens=4, timing_n=(1, 2), timing_images=1, timing_repeats=1)
  return config
