r"""LLaVA-1.5-7B of the paper's Tables 3-5, with its own tower, FARE or TeCoA, smoothed or not.

  import fsjax.llava
  from configs import llava15_7b
  config = llava15_7b.get_config("tower=fare,smoothed")
  model, params = fsjax.llava.build(config)            # nothing is downloaded
  model.generate(params, images, config.prompts.caption)
  smoothed, sparams = fsjax.mllm.smoothed(model, params, **config.smoothing)  # n > 0
  smoothed.generate(sparams, images, config.prompts.caption, key=key)  # fresh key per call

``config.llava.checkpoint`` is a local Hugging Face directory of llava-hf/llava-1.5-7b-hf
(default $FSJAX_LLAVA15_7B, else the Hugging Face cache folder). Arguments (comma
separated):

* ``tower=clip`` (default): the checkpoint's own CLIP ViT-L/14 at 336 px, hidden state
  -2 without CLS: 576 image tokens of width 1024.
* ``tower=fare`` / ``tower=tecoa``: the robust OpenCLIP ViT-L/14 (a ``model.visual``
  state dict, $FSJAX_FARE / $FSJAX_TECOA) at 224 px, as the FARE authors run it inside
  LLaVA: last block removed (hidden state -2), CLS dropped: 256 image tokens.
* ``smoothed``: the vision side is feature-space smoothed with n = 8 noise samples
  (Table 7: 8 at inference); the LLM sees the smoothed feature's direction at the Monte
  Carlo mean raw norm (``fsjax.smoothing.SmoothedEncoder``, ``config.smoothing``).
* ``sigma=0.25``: the noise level (the paper does not print it for the MLLM runs; 0.25
  is Table 1's smaller sigma, our choice).

``attack`` and ``protection``: ``certify.protection`` (Tables 3-5 and 7) with the paper's
threat model and smoothing (``attack``: l_inf 16/255, 300 steps of 1/255, sigma 0.25,
n = 8) and prompts on its data, read from local folders (``protection.data``: NIPS-2017 /
target images, ImageNet, a ScienceQA file).

The paper's "Smoothed X" rows add the GSB booster trained on the vanilla encoder
(``config.gsb.checkpoint``, a ``train.gsb`` workdir); plug it in with
``model.with_encoder(fsjax.gsb.BoostedEncoder(...))`` and params["vision"] =
``{"encoder": ..., "denoiser": ..., "mapper": ...}``.
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common

_CACHE = "~/.cache/huggingface/hub/models--llava-hf--llava-1.5-7b-hf"

CAPTION = "Describe this image in one concise sentence, no longer than 20 words."
CLASSES = ("rooster", "gibbon", "golden_retriever", "goldfish", "hen", "hognose_snake",
           "ice_bear", "killer_whale", "king_crab", "kite", "shark")
CLASSIFICATION = (
    "You are a precise visual classifier. What are the main objects in this image?: "
    + ", ".join(f"{i}. {c}" for i, c in enumerate(CLASSES))
    + ". Output only a single integer between 0 and 10 with no explanation, no text, no "
    "punctuation.")
VQA = (
    "You are a knowledgeable multimodal assistant. Please answer the multiple-choice "
    "question ONLY by outputting the single letter of the correct option. Do not include "
    "explanations or extra text. Question: {question} Options: {options} If the visual "
    "information is not clear or uncorrelated with the questions, you should select the "
    "choice: None of the above. Answer with exactly one letter from the options above "
    "(e.g., A).")


def get_config(arg=None):
  """LLaVA-1.5-7B; ``arg`` as "tower=fare,smoothed,sigma=0.5" (see the module docstring)."""
  a = common.mllm_arg(arg)
  config = ml_collections.ConfigDict()
  config.llava = ml_collections.ConfigDict(dict(
      checkpoint=os.path.expanduser(os.environ.get("FSJAX_LLAVA15_7B", _CACHE)),
      architecture=config_dict.placeholder(dict),  # only for random inits
      seed=0,
      dtype="bfloat16",        # matmuls; norms, softmax and logits stay float32
      param_dtype="bfloat16",  # 13.5 GB of weights instead of 27
      system_prompt=config_dict.placeholder(str),  # llava-hf's template has none
      max_new_tokens=32,
      words=(),
  ))
  if a["tower"] == "clip":
    # None: the LLaVA checkpoint's own tower (vision_feature_layer -2, strategy "default").
    config.encoder = ml_collections.ConfigDict(dict(
        name="clip", checkpoint=config_dict.placeholder(str), feature="patch_tokens",
        layer=-2, resolution=336, dtype="bfloat16"))
  else:
    env = "FSJAX_FARE" if a["tower"] == "fare" else "FSJAX_TECOA"
    config.encoder = ml_collections.ConfigDict(dict(
        name="clip",
        checkpoint=os.environ.get(env, f"/path/to/{a['tower']}_eps4.pt"),
        feature="patch_tokens",  # CLS dropped
        layer=-2,                # the FARE LLaVA code deletes the last block
        resolution=224,          # 256 image tokens
        dtype="bfloat16"))
  config.smoothing = common.mllm_smoothing_config(a)
  config.gsb = ml_collections.ConfigDict(dict(checkpoint=config_dict.placeholder(str)))
  config.prompts = ml_collections.ConfigDict(dict(
      caption=CAPTION,                # Table 3 (l.364)
      classification=CLASSIFICATION,  # Table 4 (l.365): target option 10, "shark"
      vqa=VQA,                        # Table 5 (l.366): target "None of the above"
      classes=CLASSES, target_class=10))
  # certify.protection: Tables 3-5 (and 7) with the paper's settings and prompts
  # (fsjax.tasks) on its data, from local files (config.protection.data).
  config.attack = common.mllm_attack_config(
      sigma=a["sigma"],
      num_images=100,   # ours (paper: 500 ImageNet images for Table 4, 100 ScienceQA for 5)
      batch_size=8)
  # certify.answers (issue 22): certified answers of the classification task on the
  # paper's data (protection.data, local files).
  config.answers = common.answers_config(chunk_size=8, batch_size=4)
  config.protection = common.protection_config(
      data=common.paper_protection_data(image_size=config.encoder.resolution),
      caption_prompt=CAPTION,
      max_new_tokens=32,
      # CLIP text-text similarity against the original model's captions (OpenAI's CLIP
      # ViT-L/14 text tower). The paper's judge is GPT: pass judge=
      # fsjax.tasks.LLMJudge(complete) to certify.protection.run. 0.3 is M-Attack's GPT
      # threshold: with the CLIP judge read the mean score, or set your own threshold.
      judge="clip",
      judge_options=dict(checkpoint=os.path.expanduser(os.environ.get(
          "FSJAX_CLIP_L14", "~/.cache/huggingface/hub/models--openai--clip-vit-large-patch14"))))
  return config
