r"""Answers per second of the smoothed MLLM: batched vs one by one, option scoring vs greedy.

  python benchmarks/answers.py                                # random-init, embedded-shaped
  python benchmarks/answers.py --checkpoint /tmp/emb/llava    # the trained embedded LLaVA
  python benchmarks/answers.py --quick                        # seconds (the test's run)

An end-to-end certificate of an MLLM's answer (randomized smoothing over the whole model,
issue 22) costs one *noisy answer* per Monte Carlo sample: the image plus Gaussian noise
(sigma in [0, 1] pixel units), the vision tower, the projector and the LLM, read as one
option of a finite answer set. This script times that base classifier, in one run:

* **option scoring** (``MLLM.option_scores`` on ``image_features`` of the noisy images:
  one prefill of the prompt, then every option's tokens in one batched pass), batched
  over noise samples and images (``--batch`` noisy images per call) and one by one
  (batch 1, ``--single`` calls);
* **option scoring, LLM only**: the same, from the tower's features computed beforehand
  (how much of the cost is the vision tower's);
* **greedy decoding** of the same answers (``MLLM.generate_ids``, as many new tokens as
  the longest option), batched and one by one; the option a greedy answer spells (else
  none) is compared with the scoring's argmax ("agree").

``x`` is answers/s over the one-by-one option scoring of the same run. The last line
prices a certified answer: ``n0 + n`` noisy answers per image at the batched rate.

Models: without ``--checkpoint``, a random-init LLaVA shaped as the embedded one
(``configs/llava_embedded.py``: 4 image tokens, a 2-layer LLaMA of hidden 64) on a random
64-px CLIP tower standing in for EfficientNet-Lite0 (a LLaVA on that tower must be
trained first), random prompt and 10 options of 2 tokens; with it, that trained model
(EfficientNet-Lite0 tower), the classification prompt of ``fsjax.tasks`` and the ten
answers "0" ... "9" (each then EOS), on Fashion-MNIST test images if the dataset is
installed (else uniform noise images). Markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import log  # noqa: E402
from common import markdown_table  # noqa: E402

# As configs/llava_embedded.py's LLaMA; a 64-px CLIP tower of 4 tokens for the vision side.
EMBEDDED_SHAPED = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=64, patch_size=32, projection_dim=64),
    text=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0))
IMAGE_TOKEN = 200


@jax.jit
def add_noise(key, images, sigma):
  """``images + N(0, sigma^2)`` per pixel, unclipped (the smoothing's noise)."""
  return images + sigma * jax.random.normal(key, images.shape, images.dtype)


def features(model, params, noisy):
  """What ``image_features`` hands the language side, for images outside [0, 1] (the
  noise is unclipped): the vision side's token view as one jitted call."""
  return model.encoder.jitted_tokens(params["vision"], noisy)


def option_answers(model, params, noisy, ids, valid, options):
  """``[B]`` the option each noisy image's answer scores highest (``MLLM.option_scores``)."""
  feats = features(model, params, noisy)
  return jnp.argmax(model.option_scores(params, ids, feats, options, valid=valid), -1)


def scored_answers(model, params, feats, ids, valid, options):
  """``[B]`` :func:`option_answers` from features already computed: the LLM's share."""
  return jnp.argmax(model.option_scores(params, ids, feats, options, valid=valid), -1)


def greedy_answers(model, params, noisy, ids, valid, options):
  """``[B]`` the option greedy decoding spells (its first ``len(option)`` tokens), else -1."""
  feats = features(model, params, noisy)
  longest = max(len(o) for o in options)
  tokens = np.asarray(model.generate_ids(params, ids, feats, valid=valid,
                                         max_new_tokens=longest)[0])
  out = np.full(len(tokens), -1)
  for k, o in enumerate(options):
    out[np.all(tokens[:, :len(o)] == np.asarray(o), axis=1) & (out < 0)] = k
  return out


def random_model(shapes=None, dtype=jnp.float32, image_token=IMAGE_TOKEN):
  """``(model, params, ids [1, L], options)``: random-init LLaVA, random prompt and options."""
  import llava_decode  # pylint: disable=g-import-not-at-top
  shapes = shapes or EMBEDDED_SHAPED
  model, params = llava_decode._fsjax_random(shapes, dtype, image_token=image_token)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  t = (shapes["vision"]["image_size"] // shapes["vision"]["patch_size"]) ** 2
  ids = np.array([[1] + list(rng.integers(3, 100, 20)) + [image_token] * t
                  + list(rng.integers(3, 100, 10))], np.int32)
  options = [(int(3 + k), 2) for k in range(10)]  # "k" then EOS, as the embedded answers
  return model, params, ids, options, shapes["vision"]["image_size"]


def trained_model(checkpoint):
  """The trained embedded LLaVA, its classification prompt and the answers "0"-"9"."""
  from configs import llava_embedded  # pylint: disable=g-import-not-at-top
  from fsjax import mllm  # pylint: disable=g-import-not-at-top
  from fsjax.tasks import instructions  # pylint: disable=g-import-not-at-top
  config = llava_embedded.get_config()
  config.llava.checkpoint = checkpoint
  model, params = mllm.build(config)
  question = instructions.classify_question(0)
  size = config.encoder.resolution
  t = model.image_features(params, np.zeros((1, size, size, 3), np.float32)).shape[1]
  ids, _ = model.prompt_ids(question.prompt, batch=1, num_image_tokens=t)
  tok = model.tokenizer
  options = [tuple(tok(" " + question.answer_text(k), add_special_tokens=False)["input_ids"])
             + (int(model.eos_token_id),) for k in range(question.num_options)]
  return model, params, np.asarray(ids, np.int32), options, size


def load_images(count, size, real):
  if real:
    try:
      from fsjax import data as data_lib  # pylint: disable=g-import-not-at-top
      images, _, _ = data_lib.load_arrays("fashion_mnist", split="test", image_size=size,
                                          classes=list(range(10)), per_class=-(-count // 10))
      return images[:count].astype(np.float32), "Fashion-MNIST test images"
    except Exception as e:  # pylint: disable=broad-except
      log(f"Fashion-MNIST not loaded ({type(e).__name__}: {e}); uniform noise images")
  rng = np.random.default_rng(0)
  return rng.uniform(size=(count, size, size, 3)).astype(np.float32), "uniform noise images"


def measure(model, params, ids, options, images, *, samples, batch, single, sigma, reps):
  """Rows ``[method, batch, answers, seconds, answers/s, agree]`` and the batched rate.

  ``images`` each get ``samples`` noise draws: ``len(images) * samples`` noisy answers,
  ``batch`` per call (the last call padded); one by one: the first ``single`` of them.
  """
  total = len(images) * samples
  x = np.repeat(images, samples, axis=0)
  noisy = np.asarray(add_noise(jax.random.key(0), jnp.asarray(x), jnp.float32(sigma)))
  pad = -total % batch
  noisy_b = np.concatenate([noisy, noisy[:pad]]) if pad else noisy
  ids_b, ids_1 = np.repeat(ids, batch, 0), ids
  valid_b, valid_1 = np.ones_like(ids_b, bool), np.ones_like(ids_1, bool)

  def batched(fn, inputs):
    def call():
      return np.concatenate([np.asarray(fn(model, params, inputs[i:i + batch], ids_b,
                                           valid_b, options))
                             for i in range(0, len(inputs), batch)])[:total]
    return call

  def one_by_one(fn, inputs):
    def call():
      return np.array([int(np.asarray(fn(model, params, inputs[i:i + 1], ids_1, valid_1,
                                         options))[0]) for i in range(single)])
    return call

  feats = np.asarray(features(model, params, noisy_b))
  calls = {}
  for method, fn, inputs in (("option scoring", option_answers, noisy_b),
                             ("greedy decoding", greedy_answers, noisy_b),
                             # the same answers from the tower's features, computed once
                             ("option scoring, LLM only", scored_answers, feats)):
    for label, call, count in (("batched", batched(fn, inputs), total),
                               ("one by one", one_by_one(fn, inputs), single)):
      log(f"{method}, {label}: compiling and warming up")
      calls[(method, label)] = (call, count, call())  # compilation and warm-up, not timed
  # Interleaved rounds (every call once per round): load drifting on a shared machine
  # then hits every method alike; the median round per method is reported.
  times = {k: [] for k in calls}
  for _ in range(reps):
    for k, (call, _, _) in calls.items():
      t0 = time.perf_counter()
      call()
      times[k].append(time.perf_counter() - t0)
  rows, answers = [], {}
  for (method, label), (_, count, got) in calls.items():
    sec = statistics.median(times[(method, label)])
    answers[(method, label)] = got
    rows.append([method, batch if label == "batched" else 1, count, sec, count / sec])
    log(f"{method}, {label}: {count / sec:,.1f} answers/s")
  base = rows[1][4]  # option scoring, one by one
  scored = answers[("option scoring", "batched")]
  out = []
  for r, key in zip(rows, answers):
    got = answers[key]
    agree = float(np.mean(got == scored[:len(got)]))
    out.append(r + [r[4] / base, agree])
  return out, rows[0][4]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None,
                      help="a train.llava workdir of configs/llava_embedded.py (default: "
                      "random-init embedded-shaped LLaVA)")
  parser.add_argument("--images", type=int, default=4)
  parser.add_argument("--samples", type=int, default=16, help="noise samples per image")
  parser.add_argument("--batch", type=int, default=64, help="noisy images per batched call")
  parser.add_argument("--single", type=int, default=16, help="one-by-one calls timed")
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--n0", type=int, default=32)
  parser.add_argument("--n", type=int, default=1000)
  parser.add_argument("--quick", action="store_true",
                      help="2 images x 4 samples, batch 8, 4 single calls, 1 rep")
  args = parser.parse_args(argv)
  if args.quick:
    args.images, args.samples, args.batch, args.single, args.reps = 2, 4, 8, 4, 1
  for name in ("images", "samples", "batch", "single", "reps", "n0", "n"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
  if not args.sigma > 0:
    parser.error(f"--sigma must be > 0, got {args.sigma}.")
  args.single = min(args.single, args.images * args.samples)
  t0 = time.perf_counter()
  if args.checkpoint:
    model, params, ids, options, size = trained_model(args.checkpoint)
    name = f"the trained embedded LLaVA {args.checkpoint}"
  else:
    model, params, ids, options, size = random_model()
    name = "a random-init embedded-shaped LLaVA (64-px CLIP tower, 4 image tokens)"
  images, what = load_images(args.images, size, real=bool(args.checkpoint))
  log(f"{name} ready in {time.perf_counter() - t0:.1f} s")
  rows, rate = measure(model, params, ids, options, images, samples=args.samples,
                       batch=args.batch, single=args.single, sigma=args.sigma, reps=args.reps)
  device = jax.devices()[0]
  table = markdown_table(
      ["method", "batch", "answers", "seconds", "answers/s", "x", "agree"],
      [[m, b, c, f"{s:.3f}", f"{r:,.1f}", f"{x:.1f}", f"{100 * a:.0f}%"]
       for m, b, c, s, r, x, a in rows])
  print(f"Noisy answers per second of {name}: {args.images} {what} x {args.samples} noise "
        f"samples (sigma {args.sigma:g}), {len(options)} options, one prompt of "
        f"{ids.shape[1]} tokens; median of {args.reps} interleaved rounds after compilation; "
        f"{device.platform} ({os.cpu_count()} CPUs); same run. x: over one-by-one option "
        "scoring; agree: share of answers equal to the batched option scoring's.\n")
  print(table)
  per_image = (args.n0 + args.n) / rate
  print(f"\nA certified answer (n0 + n = {args.n0} + {args.n} noisy answers, batched option "
        f"scoring): {per_image:.2f} s per image ({3600 / per_image:,.0f} images/hour).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
