r"""OpenFlamingo-9B (openflamingo/OpenFlamingo-9B-vitl-mpt7b): CLIP ViT-L/14 + MPT-7B.

  from configs import openflamingo_9b
  config = openflamingo_9b.get_config("tower=fare,smoothed")
  of, params = fsjax.flamingo.build(config)            # nothing is downloaded
  captions = of.caption(images, config.prompts.caption)  # images: [B, H, W, 3] in [0, 1]
  smoothed, sparams = fsjax.mllm.smoothed(of, params, **config.smoothing)  # n > 0
  features = smoothed.image_features(sparams, images, key=key)  # a fresh key per call

Three local parts (each a folder, or a Hugging Face cache folder, which resolves to its
snapshot):

* ``openflamingo.checkpoint``: the folder with OpenFlamingo's ``checkpoint.pt``
  ($FSJAX_OPENFLAMINGO_9B);
* ``openflamingo.lang_encoder`` and ``openflamingo.tokenizer``: ``anas-awadalla/mpt-7b``,
  the MPT-7B OpenFlamingo-9B was trained on, which also holds the gpt-neox-20b tokenizer
  ($FSJAX_MPT_7B);
* ``encoder.checkpoint``: the vision tower at 224 px, the last block's 256 patch tokens
  without the final LayerNorm. ``tower=clip`` (default): OpenAI's CLIP ViT-L/14
  ($FSJAX_CLIP_L14); ``tower=fare`` / ``tower=tecoa``: the robust OpenCLIP ViT-L/14
  (``model.visual`` state dict; $FSJAX_FARE / $FSJAX_TECOA) swapped in, as in Table 3.

``smoothed``: the vision side is feature-space smoothed with n = 8 noise samples
(Table 7), ``sigma=0.25`` by default (the paper does not print it for the MLLM runs). A
GSB booster (``config.gsb.checkpoint``) plugs in with ``of.replace(encoder=
fsjax.gsb.BoostedEncoder(...), encoder_params=...)``.

``attack`` and ``protection``: ``certify.protection`` (Tables 3 and 7) with the paper's
threat model and smoothing (``attack``: l_inf 16/255, 300 steps, sigma 0.25, n = 8) on
its data, from local folders (``protection.data``).

``openflamingo.architecture`` records OpenFlamingo-9B's sizes (the loader reads them from
the files; the tests check this record against open_flamingo's model). Parameters are
stored in ``param_dtype`` (bfloat16: ~16 GB; float32: ~31 GB), computed in ``dtype``.
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common

_HUB = "~/.cache/huggingface/hub/models--"
# The paper's caption instruction (l.364, its LLaVA prompt). OpenFlamingo is not
# instruction-tuned; its own captioning prompt is "<image>Output:" (the default here).
CAPTION = "Describe this image in one concise sentence, no longer than 20 words."


def _path(env, default):
  return os.path.expanduser(os.environ.get(env, _HUB + default))


def get_config(arg=None):
  """OpenFlamingo-9B; ``arg`` as "tower=fare,smoothed,sigma=0.5" (see the module docstring)."""
  a = common.mllm_arg(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  if a["tower"] == "clip":
    checkpoint = _path("FSJAX_CLIP_L14", "openai--clip-vit-large-patch14")
  else:
    env = "FSJAX_FARE" if a["tower"] == "fare" else "FSJAX_TECOA"
    checkpoint = os.environ.get(env, f"/path/to/{a['tower']}_eps4.pt")
  config.encoder = ml_collections.ConfigDict(dict(
      name="clip",
      checkpoint=checkpoint,
      dtype="float32",
      feature="patch_tokens",  # [B, 256, 1024], CLS dropped
      layer=-1,                # the last block, no post-LayerNorm (open_clip 2.19 semantics)
      resolution=224,
  ))
  mpt_7b = _path("FSJAX_MPT_7B", "anas-awadalla--mpt-7b")
  config.openflamingo = ml_collections.ConfigDict(dict(
      checkpoint=_path("FSJAX_OPENFLAMINGO_9B", "openflamingo--OpenFlamingo-9B-vitl-mpt7b"),
      lang_encoder=mpt_7b,
      tokenizer=mpt_7b,
      dtype="bfloat16",        # matmuls; norms, softmax and logits stay float32
      param_dtype="bfloat16",  # ~16 GB of weights instead of ~31
      seed=0,
      max_new_tokens=20,
      # How a task's prompt (the user's text) is given, zero-shot: OpenFlamingo's own
      # evaluation queries are "<image>Output:" (captions) and "<image>Question: ...
      # Short answer:" (VQA).
      prompt_format="<image>{prompt}",
      architecture=dict(
          lang=dict(vocab_size=50280,  # gpt-neox-20b's 50277 + <|endofchunk|>, <image>, <PAD>
                    d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4,
                    max_seq_len=2048, layer_norm_epsilon=1e-5, alibi_bias_max=8.0),
          eoc_token_id=50277, media_token_id=50278,
          vis_dim=1024, cross_attn_every_n_layers=4,
          perceiver_depth=6, num_latents=64, dim_head=64, heads=8, ff_mult=4),
  ))
  config.smoothing = common.mllm_smoothing_config(a)
  config.gsb = ml_collections.ConfigDict(dict(checkpoint=config_dict.placeholder(str)))
  config.prompts = ml_collections.ConfigDict(dict(
      caption="<image>Output:",  # Table 3 (captioning only: the paper's Tables 4-5 are LLaVA)
      instruction=CAPTION))
  # certify.protection: Table 3 (and Table 7) on the paper's data (local files: set
  # data.clean_dir / data.target_dir; classify / vqa run too, on ImageNet / ScienceQA).
  config.attack = common.mllm_attack_config(
      sigma=a["sigma"],
      num_images=100,            # ours (NIPS-2017 dev: 1000 images)
      batch_size=8)
  # certify.answers (issue 22): certified answers of the classification task on the
  # paper's data (protection.data, local files).
  config.answers = common.answers_config(chunk_size=8, batch_size=4)
  config.protection = common.protection_config(
      data=common.paper_protection_data(image_size=config.encoder.resolution),
      task="caption",
      caption_prompt="Output:",  # OpenFlamingo's own zero-shot caption query
      max_new_tokens=20,
      # CLIP text-text similarity against the original model's captions (the text tower
      # of the OpenAI CLIP above). The paper's judge is GPT: pass judge=
      # fsjax.tasks.LLMJudge(complete) to certify.protection.run. 0.3 is M-Attack's GPT
      # threshold: with the CLIP judge read the mean score, or set your own threshold.
      judge="clip",
      judge_options=dict(checkpoint=_path("FSJAX_CLIP_L14", "openai--clip-vit-large-patch14")))
  return config
