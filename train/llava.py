r"""Trains the embedded multimodal model: a small LLaVA on a frozen encoder's tokens.

  python -m train.llava --config configs/llava_embedded.py --workdir /tmp/fsjax_llava

The model is :mod:`fsjax.llava`'s LLaVA architecture (two-layer GELU projector + LLaMA
decoder + LM head) with ``config.encoder`` (EfficientNet-Lite0 in the embedded config)
as its frozen vision side: the encoder's token view ``[B, T, D]`` are the image
features, as LLaVA's CLIP tower's patch tokens. Only the language side trains, so the
tower's features of every image are computed once and cached; a step is then the
LLM's forward and backward pass only.

Data: :func:`fsjax.tasks.load_instructions` (Fashion-MNIST, one example of each task
of ``config.llava.train.tasks`` per image, the paper's prompt formats), tokenized by a
word-level tokenizer of :func:`fsjax.tasks.vocabulary_texts` in LLaVA-1.5's chat format
(:func:`fsjax.tasks.training_arrays`). Loss: the mean next-token cross-entropy of the
answer tokens and EOS (LLaVA's instruction tuning masks the prompt). Optimiser: AdamW
with linear warmup and cosine decay, global-norm clipping.

Writes into ``workdir``:

* ``checkpoints/``: orbax checkpoints of the train state every
  ``checkpoint_every`` steps and on Ctrl-C (exit status 130, one line); a rerun resumes
  from the latest (also with more ``steps``); once training is done only the final
  state is kept;
* ``metrics.jsonl``: the mean loss, answer-token accuracy, gradient norm and learning
  rate every ``log_every`` steps;
* the trained model in the Hugging Face LLaVA layout (:func:`fsjax.llava.save`:
  ``config.json`` with ``vision_config: null``, ``model.safetensors``, tokenizer), so
  ``fsjax.llava.load(workdir, encoder=encoder, encoder_params=params)`` loads it as
  it loads LLaVA-1.5-7B;
* ``eval.json``: greedy answers on held-out test images, scored as the protection
  experiment scores them (classification and VQA accuracy, caption exact match), and
  the wall times.

A NaN or Inf loss stops training before anything is saved. The step body (guard,
metrics, checkpoints, Ctrl-C) is :func:`train.loop.run`'s; ``.lock`` keeps a second
trainer out of the same workdir. The end prints the held-out scores in a few lines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from fsjax import batching
from fsjax import checkpointing
from fsjax import cli
from fsjax import encoders as encoders_lib
from fsjax import llava
from fsjax import tasks
from fsjax.llava import model as llava_model
from fsjax.llava import prompt as llava_prompt
from fsjax.tasks import _instructions as instructions
from train import loop

METRICS_FILE = loop.METRICS_FILE
EVAL_FILE = "eval.json"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------
# Data: instruction examples, their token arrays, the frozen encoder's cached features.
# ----------------------------------------------------------------------------------------


def encoder_features(params: Any, images: np.ndarray, *, encoder: encoders_lib.Encoder,
                     batch_size: int, desc: str | None = None) -> np.ndarray:
  """The frozen encoder's token view of every image, ``[N, T, D]`` float32 (computed once)."""
  encoders_lib.check_images(images, name="images")
  out = []
  for sl in tqdm.tqdm(batching.batch_slices(len(images), batch_size), desc=desc,
                      disable=desc is None, unit="batch",
                      total=-(-len(images) // batch_size)):
    xb = batching.pad_rows(images[sl], batch_size)  # one shape: one compilation
    out.append(np.asarray(_tokens(params, jnp.asarray(xb, jnp.float32), encoder=encoder))
               [:sl.stop - sl.start])
  return np.concatenate(out).astype(np.float32)


@functools.partial(jax.jit, static_argnames="encoder")
def _tokens(params, x, *, encoder):
  return encoder.tokens(params, x)


def build_tokenizer():
  """The word-level tokenizer of the instruction data (fixed ids, see fsjax.tasks)."""
  return tasks.build_tokenizer(tasks.vocabulary_texts(llava.format_prompt))


def token_arrays(tokenizer, examples, *, num_image_tokens: int) -> dict[str, np.ndarray]:
  """``fsjax.tasks.training_arrays`` of the examples, plus ``image`` (the image index)."""
  arrays = tasks.training_arrays(tokenizer, [e.prompt for e in examples],
                                 [e.answer for e in examples], format_prompt=llava.format_prompt,
                                 num_image_tokens=num_image_tokens)
  arrays["image"] = np.array([e.image for e in examples], np.int32)
  return arrays


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------


def llava_config(config, tokenizer, feature_size: int) -> llava_model.LlavaConfig:
  """The LLaVA architecture of ``config.llava.text`` over features of width ``feature_size``."""
  text = dict(config.llava.text)
  # A multiple of 8 rows in the embedding and LM head (the extra ids are never produced).
  vocab = int(math.ceil(len(tokenizer) / 8) * 8)
  text_config = llava.LlamaConfig(
      vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text)
  return llava_model.LlavaConfig(
      text_config=text_config, vision_config=None,
      image_token_id=tokenizer.convert_tokens_to_ids(tasks.IMAGE),
      vision_feature_size=int(feature_size))


def make_model(config, tokenizer, encoder: encoders_lib.Encoder,
               feature_size: int) -> llava.Llava:
  """The :class:`fsjax.llava.Llava` trained here (greedy EOS / pad ids from the tokenizer)."""
  return llava.Llava(config=llava_config(config, tokenizer, feature_size), encoder=encoder,
                     tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)


def loss_fn(language: llava_model.LlavaLanguageModel, params: Any, batch: Mapping[str, Any]
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked next-token cross-entropy of the answers (right-padded rows).

  Args:
    language: the language side.
    params: its parameters.
    batch: ``input_ids`` int ``[B, L]``, ``loss_mask`` float ``[B, L]`` (1 at answer
      tokens and EOS), ``attention_mask`` ``[B, L]`` and ``features`` ``[B, T, D]``.

  Returns:
    ``(loss, {"loss", "token_accuracy"})``.
  """
  ids = batch["input_ids"]
  valid = batch["attention_mask"].astype(bool)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  logits, _ = language.apply({"params": params}, ids, batch["features"], positions, valid)
  # Position t predicts token t + 1 (Hugging Face labels, shifted).
  logits, labels, mask = logits[:, :-1], ids[:, 1:], batch["loss_mask"][:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  total = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / total
  accuracy = ((jnp.argmax(logits, -1) == labels) * mask).sum() / total
  return loss, {"loss": loss, "token_accuracy": accuracy}


def optimizer(c) -> tuple[loop.Optimizer, optax.Schedule]:
  """AdamW with linear warmup and cosine decay, after global-norm clipping."""
  recipe = loop.Optimizer.of(
      warmup_cosine_adamw, learning_rate=float(c.learning_rate), steps=int(c.steps),
      warmup_steps=int(c.warmup_steps), weight_decay=float(c.weight_decay),
      grad_clip=float(c.grad_clip))
  return recipe, schedule(float(c.learning_rate), int(c.steps), int(c.warmup_steps))


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageLoss:
  """:func:`loss_fn` of one language model, as train.loop's hashable loss (by identity:
  one compilation per run)."""

  language: llava_model.LlavaLanguageModel

  def __call__(self, params, frozen, batch, key):
    return loss_fn(self.language, params, batch)


def warmup_cosine_adamw(learning_rate: float, steps: int, warmup_steps: int,
                        weight_decay: float, grad_clip: float
                        ) -> optax.GradientTransformation:
  """The optimiser of :func:`optimizer`, from numbers (train.loop's static recipe)."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule(learning_rate, steps, warmup_steps),
                                 weight_decay=weight_decay))


def schedule(learning_rate: float, steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to a tenth of the peak."""
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=min(warmup_steps, steps), decay_steps=steps,
      end_value=0.1 * learning_rate)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Examples of the ``step``-th batch (0-based) of ``n``: epochs of seeded permutations,
  a function of the step alone, so a resumed run continues the same sequence."""
  per_epoch = max(n // batch_size, 1)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  if n < batch_size:
    return np.resize(order, batch_size)
  return order[k * batch_size:(k + 1) * batch_size]


def task_batch(step: int, task_names: tuple[str, ...], sizes: Mapping[str, int],
               batch_size: int, seed: int) -> tuple[str, np.ndarray]:
  """``(task, indices)`` of a step: the tasks take turns, each batch holds one task.

  One task per batch keeps each batch padded to its own task's length (captions are a
  third as long as the VQA prompt): a third less compute than mixed batches.
  """
  t, k = step % len(task_names), step // len(task_names)
  task = task_names[t]
  return task, batch_indices(sizes[task], batch_size, k, seed + 1000 * t)


def check_train_config(c) -> None:
  """Validates ``config.llava.train`` before anything is built; errors name the key."""
  for key in ("per_class", "test_per_class", "batch_size", "steps", "log_every",
              "checkpoint_every", "feature_batch_size", "image_size"):
    if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
      raise ValueError(f"config.llava.train.{key}={c[key]!r} must be an integer >= 1.")
  for key in ("learning_rate", "grad_clip"):
    if not c[key] > 0:
      raise ValueError(f"config.llava.train.{key}={c[key]!r} must be > 0.")
  if c.weight_decay < 0 or c.warmup_steps < 0:
    raise ValueError("config.llava.train.weight_decay and warmup_steps must be >= 0.")
  unknown = sorted(set(c.tasks) - set(instructions.TASKS))
  if unknown or not c.tasks:
    raise ValueError(f"config.llava.train.tasks={list(c.tasks)}: unknown {unknown}; known: "
                     f"{instructions.TASKS}.")


# ----------------------------------------------------------------------------------------
# Evaluation: greedy answers on held-out images.
# ----------------------------------------------------------------------------------------


def evaluate(model: llava.Llava, params: Any, features: np.ndarray, labels: np.ndarray, *,
             tasks_: Any = instructions.TASKS, max_new_tokens: int = 16,
             batch_size: int = 64, images: np.ndarray | None = None,
             seed: int = 0) -> dict[str, Any]:
  """Clean scores of the trained model from cached features, greedy decoding.

  * classify: accuracy on the images of the nine clean classes
    (:func:`fsjax.tasks.instructions.classify_question`), unparsable answers counted;
  * vqa: accuracy on :func:`fsjax.tasks.instructions.vqa_questions`;
  * caption: exact match with the image's caption of the same template is impossible
    to know (the template is drawn), so the share of answers that are one of the
    image's five template captions (needs ``images`` for the tone word).
  """
  out = {}
  clean = np.flatnonzero(labels != instructions.TARGET_LABEL)
  if "classify" in tasks_ and len(clean):
    questions = [instructions.classify_question(int(labels[i])) for i in clean]
    texts = answers(model, params, features[clean], [q.prompt for q in questions],
                    max_new_tokens=4, batch_size=batch_size)
    pred = np.array([q.parse(t) for q, t in zip(questions, texts)])
    truth = np.array([q.answer for q in questions])
    out["classify_accuracy"] = float(np.mean(pred == truth))
    out["classify_unparsable"] = int(np.sum(pred == tasks.UNPARSABLE))
    out["classify_images"] = len(clean)
  if "vqa" in tasks_:
    questions, _ = instructions.vqa_questions(labels, seed=seed)
    texts = answers(model, params, features, [q.prompt for q in questions], max_new_tokens=4,
                    batch_size=batch_size)
    pred = np.array([q.parse(t) for q, t in zip(questions, texts)])
    out["vqa_accuracy"] = float(np.mean(pred == np.array([q.answer for q in questions])))
    out["vqa_unparsable"] = int(np.sum(pred == tasks.UNPARSABLE))
  if "caption" in tasks_ and images is not None:
    texts = answers(model, params, features, [tasks.CAPTION_PROMPT] * len(labels),
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    ok = [t.strip() in {instructions.caption(images[i], int(labels[i]), k)
                        for k in range(len(instructions.CAPTION_TEMPLATES))}
          for i, t in enumerate(texts)]
    out["caption_match"] = float(np.mean(ok))
    out["caption_examples"] = texts[:5]
  return out


def answers(model: llava.Llava, params: Any, features: np.ndarray, prompts: list[str], *,
            max_new_tokens: int, batch_size: int) -> list[str]:
  """Greedy answers from cached encoder features ``[N, T, D]`` and N prompts."""
  out = []
  t = features.shape[1]
  for sl in batching.batch_slices(len(prompts), batch_size):
    n = sl.stop - sl.start
    feats = batching.pad_rows(features[sl], batch_size)
    ps = prompts[sl] + [prompts[sl][-1]] * (batch_size - n)
    ids, valid = model.prompt_ids(ps, batch=batch_size, num_image_tokens=t)
    tokens, _ = model.generate_ids(params, ids, feats, valid=valid,
                                   max_new_tokens=max_new_tokens)
    out += llava_prompt.decode(model.tokenizer, np.asarray(tokens)[:n],
                               eos_token_id=model.eos_token_id)
  return out


# ----------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes), saves the model in the LLaVA layout, evaluates; returns eval.json."""
  check_train_config(config.llava.train)
  with checkpointing.lock_workdir(workdir, "train.llava"):  # one writer per workdir
    return _train(config, pathlib.Path(workdir))


def _train(config, workdir: pathlib.Path) -> dict[str, Any]:
  """:func:`train_and_evaluate` once the config is checked and the workdir locked."""
  c = config.llava.train
  t_start = time.perf_counter()
  encoder, encoder_params = encoders_lib.build(config.encoder)
  tokenizer = build_tokenizer()
  images, labels, examples = tasks.load_instructions(
      split="train", image_size=c.image_size, per_class=c.per_class, seed=c.seed,
      tasks=tuple(c.tasks), dataset=c.dataset, data_dir=c.get("data_dir"))
  test_images, test_labels, _ = tasks.load_instructions(
      split="test", image_size=c.image_size, per_class=c.test_per_class, seed=c.seed,
      tasks=tuple(c.tasks), dataset=c.dataset, data_dir=c.get("data_dir"))
  t0 = time.perf_counter()
  features = encoder_features(encoder_params, images, encoder=encoder,
                              batch_size=c.feature_batch_size, desc="train features")
  test_features = encoder_features(encoder_params, test_images, encoder=encoder,
                                   batch_size=c.feature_batch_size, desc="test features")
  feature_s = time.perf_counter() - t0
  num_tokens, width = features.shape[1:]
  task_names = tuple(t for t in instructions.TASKS if t in c.tasks)
  arrays = {t: token_arrays(tokenizer, [e for e in examples if e.task == t],
                            num_image_tokens=num_tokens) for t in task_names}
  model = make_model(config, tokenizer, encoder, width)
  language = model.language

  recipe, lr_schedule = optimizer(c)
  params = llava.init_language(model.config, feature_size=width, seed=config.llava.seed)
  mngr = checkpointing.manager(str(workdir), CHECKPOINTS)
  state = loop.restore(mngr, loop.init_state(params, recipe), total=c.steps,
                       what="LLaVA training checkpoint")
  start = int(state["step"])
  if start:
    print(f"train.llava: resuming {workdir} at step {start} of {c.steps}.")
  device_arrays = {t: {k: jnp.asarray(v) for k, v in a.items()} for t, a in arrays.items()}
  sizes = {t: len(a["image"]) for t, a in arrays.items()}
  device_features = jnp.asarray(features)

  def batches():
    for step in range(start, c.steps):
      task, idx = task_batch(step, task_names, sizes, c.batch_size, c.seed)
      batch = {k: v[idx] for k, v in device_arrays[task].items() if k != "image"}
      batch["features"] = device_features[arrays[task]["image"][idx]]
      yield batch

  t0 = time.perf_counter()
  try:
    state = loop.run(
        what="train.llava", desc="llava", state=state, total=c.steps, batches=batches(),
        frozen=None, key=jax.random.key(0),  # the loss draws no noise
        loss=LanguageLoss(language), optimizer=recipe,
        fix="Lower config.llava.train.learning_rate or raise warmup_steps.",
        examples=c.batch_size, writer=loop.MetricsWriter(str(workdir), c.log_every),
        fields=lambda step: {"learning_rate": float(lr_schedule(step - 1))}, mngr=mngr,
        policy=loop.CheckpointPolicy(c.checkpoint_every,
                                     c.get("checkpoint_seconds") or 120.0),
        # A later run with more config.llava.train.steps continues this optimiser.
        final_opt_state=True)
  finally:
    checkpointing.close(mngr)
  train_s = time.perf_counter() - t0

  params = {"vision": encoder_params, "language": state["params"]}
  llava.save(workdir, model, params)
  t0 = time.perf_counter()
  scores = evaluate(model, params, test_features, test_labels, tasks_=tuple(c.tasks),
                    max_new_tokens=config.llava.max_new_tokens, images=test_images,
                    seed=c.seed)
  result = {"steps": int(c.steps), "train_examples": len(examples),
            "test_images": int(len(test_labels)), "image_tokens": int(num_tokens),
            "feature_width": int(width),
            "language_parameters": int(sum(np.size(x) for x in jax.tree.leaves(
                state["params"]))),
            **scores, "feature_s": feature_s, "train_s": train_s,
            "eval_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_start,
            "cpu_count": os.cpu_count()}
  (workdir / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
  return result


def summary(result: Mapping[str, Any], workdir: str) -> str:
  """The headline numbers of eval.json and where everything went."""
  scores = [f"{k.replace('_', ' ')} {result[k]:.3f}"
            for k in ("classify_accuracy", "vqa_accuracy", "caption_match") if k in result]
  rows = loop.read_metrics(workdir)
  return (f"train.llava: {result['steps']} steps ({loop.summary(rows)}) in "
          f"{result['total_s']:.0f} s; held-out {result['test_images']} images: "
          + ", ".join(scores) + "\n"
          f"model saved to {workdir} (fsjax.llava.load layout); scores in "
          f"{pathlib.Path(workdir) / EVAL_FILE}")


def main(config, workdir: str) -> None:
  # Ctrl-C: cli.run prints "saved at step N" and exits with status 130.
  print(summary(train_and_evaluate(config, workdir), workdir))


if __name__ == "__main__":
  cli.run(main, workdir_help="Where checkpoints/, metrics.jsonl, eval.json and the trained "
          "LLaVA (fsjax.llava.save layout) go.")
