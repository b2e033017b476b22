r"""OpenFlamingo-9B (openflamingo/OpenFlamingo-9B-vitl-mpt7b): CLIP ViT-L/14 + MPT-7B.

  import fsjax.flamingo
  from configs import openflamingo_9b
  of = fsjax.flamingo.build(openflamingo_9b.get_config())
  captions = of.caption(images)            # images: [B, H, W, 3] in [0, 1]

Three local parts, nothing downloaded (each path is a folder or a Hugging Face cache
folder, which resolves to its snapshot):

* ``mllm.checkpoint``: the folder with OpenFlamingo's ``checkpoint.pt`` ($FSJAX_OPENFLAMINGO_9B);
* ``mllm.lang_encoder`` and ``mllm.tokenizer``: the MPT-7B folder OpenFlamingo-9B was
  trained on, ``anas-awadalla/mpt-7b``, which also holds the gpt-neox-20b tokenizer
  ($FSJAX_MPT_7B);
* ``encoder.checkpoint``: CLIP ViT-L/14 at 224 px ($FSJAX_CLIP_L14; OpenAI's, or a FARE /
  TeCoA OpenCLIP file for the robust rows of Table 3). Its features for OpenFlamingo are
  the last block's 256 patch tokens without the final LayerNorm.

``mllm.architecture`` records OpenFlamingo-9B's sizes (the loader reads them from the
files; the tests check this record against open_flamingo's model). Parameters are stored
in ``mllm.param_dtype`` (bfloat16: ~16 GB; float32: ~31 GB) and computed in ``mllm.dtype``.
"""

import os

import ml_collections

_HUB = "~/.cache/huggingface/hub/models--"


def _path(env, default):
  return os.path.expanduser(os.environ.get(env, _HUB + default))


def get_config(arg=None):
  """OpenFlamingo-9B; ``arg`` is unused (one setting) and must be empty."""
  if arg:
    raise ValueError(f"configs/openflamingo_9b.py takes no argument, got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip",
      checkpoint=_path("FSJAX_CLIP_L14", "openai--clip-vit-large-patch14"),
      dtype="float32",
      feature="patch_tokens",  # [B, 256, 1024]
      layer=-1,                # the last block, no post-LayerNorm (open_clip 2.19 semantics)
      resolution=224,
  ))
  mpt_7b = _path("FSJAX_MPT_7B", "anas-awadalla--mpt-7b")
  config.mllm = ml_collections.ConfigDict(dict(
      name="openflamingo",
      checkpoint=_path("FSJAX_OPENFLAMINGO_9B", "openflamingo--OpenFlamingo-9B-vitl-mpt7b"),
      lang_encoder=mpt_7b,
      tokenizer=mpt_7b,
      dtype="bfloat16",        # compute
      param_dtype="bfloat16",  # storage: ~16 GB for the language side and resampler
      seed=0,
      # OpenFlamingo's captioning prompt (its COCO evaluation); the paper's LLaVA prompt
      # is "Describe this image in one concise sentence, no longer than 20 words."
      prompt="<image>Output:",
      max_new_tokens=20,
      architecture=dict(
          lang=dict(vocab_size=50280,  # gpt-neox-20b's 50277 + <|endofchunk|>, <image>, <PAD>
                    d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4,
                    max_seq_len=2048, layer_norm_epsilon=1e-5, alibi_bias_max=8.0),
          eoc_token_id=50277, media_token_id=50278,
          vis_dim=1024, cross_attn_every_n_layers=4,
          perceiver_depth=6, num_latents=64, dim_head=64, heads=8, ff_mult=4),
  ))
  return config
