"""Sections shared by every config: certification, prediction, GSB and its training.

Each experiment config (``default.py``, ``clip_l14.py``, ...) builds its ``config.encoder``
and ``config.data`` and takes these sections, overriding what differs. The paper does
not print every hyperparameter; where it is silent, the default here is our choice and
says so.
"""

import ml_collections
from ml_collections import config_dict


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """``get_config``'s argument (big_vision style): ``"runlocal"`` or ``"a=1,b=x"``.

  Bare names are switches (``runlocal`` -> True); ``key=value`` pairs take the type of
  ``defaults[key]``. Unknown keys raise, naming the known ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in [a for a in (arg or "").split(",") if a]:
    key, _, value = item.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(out)}.")
    if not _:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value)
  return out


TOWERS = ("clip", "fare", "tecoa")  # the MLLM vision towers of the paper's Tables 3-5


def mllm_arg(arg) -> dict:
  """An MLLM config's argument: ``"tower=clip|fare|tecoa,smoothed,sigma=0.25"``."""
  out = parse_arg(arg, tower="clip", smoothed=False, sigma=0.25).to_dict()
  if out["tower"] not in TOWERS:
    raise ValueError(f"tower={out['tower']!r} must be one of {TOWERS}.")
  return out


def mllm_smoothing_config(a: dict) -> ml_collections.ConfigDict:
  """``config.smoothing`` of an MLLM config from :func:`mllm_arg`'s options."""
  return ml_collections.ConfigDict(dict(
      sigma=a["sigma"],
      n=8 if a["smoothed"] else 0,  # 0: no smoothing; Table 7: n = 8 at inference
      features="direction",         # or "raw_mean" (not certified)
      chunk_size=8))


# The paper's caption instruction (Appendix A.4.1, l.364); fsjax.tasks.CAPTION_PROMPT.
CAPTION_PROMPT = "Describe this image in one concise sentence, no longer than 20 words."


def embedded_protection_data(**overrides) -> ml_collections.ConfigDict:
  """``config.protection.data`` of the embedded questions (``fsjax.tasks.instructions``).

  Fashion-MNIST test images (an ``fsjax.data`` name with Fashion-MNIST's ten labels),
  balanced over the classes a task attacks; targets: bags (classify, caption) or images
  of a class the VQA question does not list.
  """
  c = ml_collections.ConfigDict(dict(
      source="embedded", name="fashion_mnist", split="test", image_size=64, seed=0))
  c.update(overrides)
  return c


def paper_protection_data(**overrides) -> ml_collections.ConfigDict:
  """``config.protection.data`` of the paper's evaluation sets, local files only.

  * caption (Table 3): ``clean_dir`` / ``target_dir``, M-Attack's NIPS-2017 dev images and
    target images, paired in order (``fsjax.tasks.image_pairs``);
  * classify (Table 4): the paper's ten ImageNet classes and "shark" target images from
    ``dataset`` (TFDS, prepared from the ILSVRC-2012 tars in ``manual_dir``);
  * vqa (Table 5): ``scienceqa``, a ScienceQA-format JSON/JSONL file
    (``fsjax.tasks.load_scienceqa``); its target images are those of ``target_dir``
    (images unrelated to the question, whose answer is "None of the above": our choice,
    the paper does not say).
  """
  c = ml_collections.ConfigDict(dict(
      source="paper",
      image_size=224,  # images are loaded at this side; set it to the encoder's resolution
      seed=0,
      clean_dir=config_dict.placeholder(str),
      target_dir=config_dict.placeholder(str),
      dataset="imagenet2012",
      split="validation",
      data_dir=config_dict.placeholder(str),
      manual_dir=config_dict.placeholder(str),
      scienceqa=config_dict.placeholder(str),
  ))
  c.update(overrides)
  return c


def protection_config(data: ml_collections.ConfigDict | None = None,
                      **overrides) -> ml_collections.ConfigDict:
  """``config.protection``: what judges the MLLM's answers (``certify.protection``).

  The threat model, the smoothing of the rows and the extra rows are ``config.attack``
  (:func:`mllm_attack_config`), shared with ``certify.robustness``.

  Args:
    data: :func:`embedded_protection_data` (default) or :func:`paper_protection_data`.
    **overrides: any other key.
  """
  c = ml_collections.ConfigDict(dict(
      task="classify",       # default --task: caption, classify or vqa
      data=embedded_protection_data() if data is None else data,
      judge="exact",         # caption judge: exact, item, clip, bleu, cider, llm
      judge_options={},      # keyword arguments of the judge (e.g. {"checkpoint": ...})
      threshold=0.3,         # a caption judge score >= threshold is a match (M-Attack's)
      caption_prompt=CAPTION_PROMPT,  # the user's text of the caption task
      max_new_tokens=16,
      timing_n=(1, 4, 8, 64),  # Table 7
      timing_images=4,
      timing_repeats=3,
      # Smoothed rows: a norm-aware certificate of each clean image (n0 + n samples;
      # certify_n=0: none) gives the cert cos f_s / z_n columns beside FCS (method.md 2d).
      certify_n0=32,
      certify_n=256,
      certify_alpha=0.001,  # the certificate's, and again the per-query term's
  ))
  c.update(overrides)
  return c


def mllm_attack_config(**overrides) -> ml_collections.ConfigDict:
  """``config.attack`` of an MLLM config (``certify.protection``, Tables 3-5 and 7).

  :func:`attack_config` with the MLLM's smoothing: n = 8 noise samples (Table 7), 2 EOT
  draws per step, 16 images per attack / generation call (our choices).
  """
  return attack_config(**dict(dict(n=8, eot_samples=2, batch_size=16), **overrides))


def answers_config(**overrides) -> ml_collections.ConfigDict:
  """``config.answers``: certified MLLM answers (``certify.answers``, issue 22) on the
  classification questions of ``config.protection.data``; Cohen et al.'s n0 / alpha."""
  c = ml_collections.ConfigDict(dict(
      sigmas=(0.25, 0.5),
      n0=100,              # selection samples (Cohen et al.)
      n=1_000,             # estimation samples: Clopper-Pearson bound of the top answer
      alpha=0.001,
      radii=(0.0, 0.125, 0.25, 0.5, 0.75, 1.0),
      num_images=100,
      rows=("original", "gsb", "smoothed"),  # of certify.answers.ROWS
      inner_n=8,           # the FS-smoothed encoder's samples (the paper's inference n)
      smoothed_images=20,  # the smoothed rows cost inner_n times more: fewer images
      feature_n=1_000,     # the feature certificate beside (certify.fcsb); 0: skip
      feature_eps=0.25,
      chunk_size=16,
      batch_size=8,
      audit_images=20,     # per row and sigma; 0: no audit
      audit_steps=20,
      audit_eot=4,
      audit_n=1_000,
      # "fixed": n0 + n samples per image (Clopper-Pearson); "sequential": each image stops
      # once "certified at r" is settled for every r of `radii` (n_max = n; docs/method.md 3d).
      mode="fixed",
  ))
  c.update(overrides)
  return c


def certify_config(**overrides) -> ml_collections.ConfigDict:
  """``config.certify``: the paper's Table 1 settings (Section 5.1) and our bounds."""
  c = ml_collections.ConfigDict(dict(
      sigmas=(0.25, 0.5),
      eps=(0.125, 0.25, 0.375, 0.5, 0.75),
      cos=0.5,           # radius column: certified radius for cos >= 0.5 (Corollary 3.3)
      n0=100,            # first stage: mean direction (Cohen et al. N0)
      n=10_000,          # second stage: the confidence bound
      alpha=0.001,       # failure probability (Cohen et al.)
      bounds=("point", "hoeffding", "bernstein", "betting"),
      references=("clean", "mean"),
      chunk_size=16,     # noise samples per vectorised chunk (16 measured fastest on CPU)
      batch_size=8,      # images per certify call
      # Join a pod JAX detects (TPU pod, Slurm, Open MPI). Any other pod: set
      # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID instead (fsjax.pod).
      distributed=False,
      # The norm-aware cosine certificate (docs/method.md 2c): one more row per variant and
      # sigma (mean reference, this bound; one more Monte Carlo run) and cos@eps columns.
      norm_aware=True,
      norm_aware_bound="betting",
      # "fixed": n samples per image; "sequential": certify.sequential_fcsb (method.md 2b),
      # each image stops once settled (`stop`), n_max = n.
      mode="fixed",
      stop="decision",   # sequential: "decision", "radius" or "never" (n_max samples)
      # sequential: give a decision up once n_max is predicted not to certify it
      # ("predictive"), or only once it provably will not ("confident"; more samples).
      futility="predictive",
      sequential_chunk_size=64,  # sequential: samples per chunk (even with norm_aware)
      slots=8,           # sequential: images in flight at once (cross-image batching)
  ))
  c.update(overrides)
  return c


def prediction_config(**overrides) -> ml_collections.ConfigDict:
  """``config.prediction``: Table 2 (FS cosine prototypes vs RS linear head)."""
  c = ml_collections.ConfigDict(dict(
      num_classes=10,
      train_per_class=50,   # paper: 500 train images of 10 classes
      test_per_class=50,    # paper: 500 test images
      radii=tuple(0.125 * i for i in range(13)),  # 0 .. 1.5
      head_steps=300,
      head_learning_rate=1e-2,
      head_noise=True,      # train heads on noisy (smoothed) features, as Cohen et al.
      zero_shot=False,      # CLIP: prototypes from class-name prompts, no training
      # Our choices (the paper does not print them):
      noise_draws=4,        # head_noise: cached noise draws per training image
      head_batch_size=256,  # examples per Adam step of the heads
      # CosFace margin of the cosine head's loss: widens the angular gap FS certifies
      # (Theorem A.3.2); 0 = plain cross-entropy.
      head_margin=0.0,
      head_scale=16.0,      # the cosine head's logit scale
      # The cosine head's linear projection D -> head_dim before its prototypes (part of
      # the encoder FS certifies; None: prototypes on the encoder's own feature, as CLIP
      # zero-shot).
      head_dim=config_dict.placeholder(int),
      bound="bernstein",    # FS confidence bound of h_u(x) (certify.certify_prediction)
      # Which FS certificate (certify.PREDICTION_CERTIFICATES, docs/method.md 3b): "select"
      # takes per image the larger of Theorem A.3.2's and the per-class one, chosen with the
      # n0 selection samples (sound at alpha); "cosine" is Theorem A.3.2 alone.
      certificate="select",
      # Table 2's row with the paper's protocol (plug-in estimates from paper_n0 + paper_n0
      # samples, NOT a certificate); None leaves it out.
      paper_n0=16,
      # Table 2's Monte Carlo; None = config.certify.n0 / config.certify.n.
      n0=config_dict.placeholder(int),
      n=config_dict.placeholder(int),
  ))
  c.update(overrides)
  return c


def gsb_config(**overrides) -> ml_collections.ConfigDict:
  """``config.gsb``: the booster's architecture, losses and training (Section 4).

  The same values as :func:`fsjax.gsb.default_gsb_config` (a test keeps them equal),
  written out here so that configs are data. The paper prints neither lambda,
  lambda_1, lambda_2 (Eq. 9, 13), nor K (Eq. 10), nor the learning rates, nor the number
  of noise draws per image: those values are ours. Printed by the paper: Adam, batch 8,
  8 epochs for D; AdamW with a cosine schedule, batch 16, 8 epochs for M; D about 10 MB.
  """
  c = ml_collections.ConfigDict()
  c.sigma_range = (0.25, 0.5)  # training sigma, uniform per example (Table 1's sigmas)
  c.noise_samples = 2  # Monte Carlo draws of delta per image per step
  # D: 2,489,603 float32 parameters = 9.96 MB (Appendix A.2.1: "approximately 10 MB").
  c.denoiser = ml_collections.ConfigDict(dict(
      width=32, channel_mults=(1, 2, 4), blocks_per_level=2, emb_dim=128, num_groups=8,
      dtype="float32",
      lam_rob=1.0,  # lambda, Eq. 9
      # Ours: epochs of L_rec alone (no encoder pass) before L_D, as denoised smoothing
      # pre-trains its denoiser; 0 = the paper's L_D from the start.
      warmup_epochs=0,
      batch_size=8, epochs=8, learning_rate=2e-4))  # Adam
  c.mapper = ml_collections.ConfigDict(dict(
      num_blocks=2, num_heads=4, mlp_ratio=2.0, kernel_size=3, sigma_hidden=64,
      damping_init=1e-3, dtype="float32",
      lam_id=1.0,  # lambda_1, Eq. 13
      lam_stat=0.1,  # lambda_2, Eq. 13
      # sigma at which L_id evaluates M on clean features. The paper's 0 makes L_id
      # identically zero for our mapper (M(z, 0) = z exactly); a value > 0 turns it into
      # a "leave clean features alone at the working sigma" regulariser.
      id_sigma=0.0,
      batch_size=16, epochs=8, learning_rate=1e-4, weight_decay=1e-4))  # AdamW, cosine
  c.checkpoint = config_dict.placeholder(str)  # a train.gsb workdir; None = no GSB
  c.log_every = 10
  c.checkpoint_every = 100
  c.update(overrides)
  return c


def attack_config(**overrides) -> ml_collections.ConfigDict:
  """``config.attack``: the threat model of both attack tables and their rows.

  Read by ``certify.robustness`` (Table 4, classification) and ``certify.protection``
  (Tables 3-5 on an MLLM) through ``fsjax.attacks.ThreatModel.from_config``. The paper's
  threat model: l_inf 16/255, 300 steps of 1/255, white-box through the smoothing (EOT)
  and GSB. ``n`` (Monte Carlo samples of a smoothed row's features) and ``eot_samples``
  (noise draws per attack step) are our choices (the paper's Table 7 compares n = 1 ...
  64 and uses n = 8).
  """
  c = ml_collections.ConfigDict(dict(
      linf_budget=16 / 255,  # l_inf attack budget (paper)
      step_size=1 / 255,   # sign-step size (paper)
      steps=300,           # paper: 300; lower on CPU
      eot_samples=4,       # noise draws per attack step on a smoothed encoder (EOT)
      options={},          # per-attack keyword overrides, e.g. {"foa": {"num_clusters": 3}}
      sigma=0.25,          # smoothing noise level of the smoothed rows
      n=16,                # Monte Carlo samples of the smoothed encoder at evaluation
      extra_encoders=(),   # more rows: encoder sub-configs with a "label" (FARE, TeCoA)
      smooth_extra=True,   # also a smoothed row for every extra encoder
      num_images=16,       # attacked images
      batch_size=8,        # images per attack call
      examples=4,          # images in the PNG strips
  ))
  c.update(overrides)
  return c


def robustness_config(**overrides) -> ml_collections.ConfigDict:
  """``config.robustness``: the classifier that judges the adversarial features (Table 4,
  classification; ``certify.robustness``). The threat model is ``config.attack``."""
  c = ml_collections.ConfigDict(dict(
      data=config_dict.placeholder(ml_collections.ConfigDict),  # None: config.test_data
      classes=config_dict.placeholder(tuple),  # class ids the classifier knows; None: all
      target_class=-1,     # the attacker's target class id, held out (<0: from the end)
      head="auto",         # "auto", "class_mean" or "zero_shot" (CLIP text prototypes)
      prototype_split="train",  # split of the class-mean prototypes' images
      prototypes_per_class=10,
      templates=("a photo of a {}.",),  # zero-shot prompt templates
  ))
  c.update(overrides)
  return c


def audit_config(**overrides) -> ml_collections.ConfigDict:
  """``config.audit``: the soundness audit of the certificate (``certify.audit``).

  Attack every certificate inside its own radius (l2 PGD + EOT against the certified
  direction u) and count measured inner products below the certified bound.
  """
  c = ml_collections.ConfigDict(dict(
      data=config_dict.placeholder(ml_collections.ConfigDict),  # None: config.data
      num_images=config_dict.placeholder(int),  # None: the data's num_examples
      sigma=0.25,          # the one noise level audited
      bound="bernstein",   # the one confidence bound audited
      # None: config.certify's. Set to audit with other Monte Carlo settings.
      n0=config_dict.placeholder(int),
      n=config_dict.placeholder(int),
      alpha=config_dict.placeholder(float),
      chunk_size=config_dict.placeholder(int),
      references=("mean", "clean"),
      cos=0.5,             # radius for cos >= cos (Corollary 3.3) that eps_fractions scale
      eps_fractions=(0.25, 0.5, 0.75, 1.0),
      eps=config_dict.placeholder(tuple),  # set: these radii where B >= 0, not fractions
      steps=20,            # l2 PGD steps
      step_factor=2.5,     # step = step_factor * eps / steps (Madry et al.)
      eot_samples=8,       # noise draws per attack step
      measure_n=10_000,    # fresh samples measuring <f_s(x_adv), u>
      screen_n=config_dict.placeholder(int),  # set: screen every pair with screen_n
      screen_k=6.0,        # samples first; only pairs within screen_k se of B get measure_n
      k_sigma=3.0,         # violation beyond k standard errors of the measurement
      variants=config_dict.placeholder(tuple),  # None: every variant (FS, FS+D+M, ...)
      batch_size=16,       # (image, eps) pairs per attack call
  ))
  c.update(overrides)
  return c
