"""The embedded instruction data: Fashion-MNIST images with the paper's three prompts.

It trains the embedded multimodal model (a small LLaVA on EfficientNet-Lite0) that runs
without any download. Every image gives one example of each task, an
``(image, prompt, answer)`` triple in the paper's prompt formats:

* ``"classify"``: :func:`~fsjax.tasks.classification_prompt` over the nine clothing
  classes (options 0-8) with **"bag" held out as the attacker's target**, the last
  option (9): bags are the one Fashion-MNIST class that is not a garment, so a
  garment -> bag attack is a change of kind, as the paper's animals -> "shark", and no
  clean class resembles it closely. Fashion-MNIST has ten classes, so the paper's 11
  options (ten classes + target) become 10 here (nine + target); the format is the
  paper's. Bag images are answered with the target option, so the model learns what
  the attacker aims at; the clean images of Table-4-style runs are the nine others.
* ``"vqa"``: :func:`~fsjax.tasks.vqa_prompt` with the question "Which item is shown in
  the image?", four class names (A-D) and "E. None of the above". In a fifth of the
  examples the image's class is not among the four and the answer is E, so every letter
  is the answer equally often; this is how the model learns the attacker's target.
* ``"caption"``: :data:`~fsjax.tasks.CAPTION_PROMPT`, answered by a short caption from
  one of :data:`CAPTION_TEMPLATES` ("a photo of a light gray ankle boot on a black
  background"); the tone word comes from the image's brightness.

For evaluation, :func:`classify_question` and :func:`vqa_questions` give the tasks of
clean images as :class:`~fsjax.tasks.Question` (with the attacker's target option), in
the same prompts.

Everything is a function of the seed (``numpy.random.default_rng``); with a balanced
image set (``fsjax.data.load(..., per_class=...)``) the answers are balanced too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import os

import numpy as np

from fsjax import data
from fsjax.tasks import _prompts

# Fashion-MNIST's classes (labels 0-9) as the prompts name them, snake case as the
# paper's "golden_retriever".
CLASS_NAMES = ("t_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle_boot")
TARGET_LABEL = 8  # "bag": the attacker's target, held out of the clean classes.
# The clean classes: the prompt's options 0..8, in label order.
CLEAN_LABELS = tuple(c for c in range(10) if c != TARGET_LABEL)
# How captions name the classes.
CAPTION_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal",
                 "shirt", "sneaker", "bag", "ankle boot")
CAPTION_TEMPLATES = (
    "a photo of {a_tone} {item} on a black background",
    "{a_tone} {item} on a black background",
    "a grayscale photo of {a_item}",
    "a picture of {a_tone} {item}",
    "{a_item} in the center of the image",
)
VQA_QUESTION = "Which item is shown in the image?"
VQA_CHOICES = 4  # A-D, then E = None of the above.
TASKS = ("classify", "vqa", "caption")


def classify_prompt() -> str:
  """The embedded classification prompt: options 0-8 the clothes, 9 "bag" (the target)."""
  return _prompts.classification_prompt([CLASS_NAMES[c] for c in CLEAN_LABELS],
                                        CLASS_NAMES[TARGET_LABEL])


def classify_option(label: int) -> int:
  """The classification option of a Fashion-MNIST label (bag -> 9, the target)."""
  if label == TARGET_LABEL:
    return len(CLEAN_LABELS)
  return CLEAN_LABELS.index(label)


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def tone(image: np.ndarray) -> str:
  """The brightness word of a Fashion-MNIST item (bright item on black): the mean of its
  pixels above 0.1 -> "white" (>= 0.72), "light gray" (>= 0.56), else "dark gray" (the
  thresholds are the terciles of the test split, so the three words are about equally
  common)."""
  gray = np.asarray(image, np.float32).mean(axis=-1)
  item = gray[gray > 0.1]
  level = float(item.mean()) if item.size else 0.0
  return "white" if level >= 0.72 else "light gray" if level >= 0.56 else "dark gray"


def caption(image: np.ndarray, label: int, template: int) -> str:
  """The caption of an image of class ``label`` from ``CAPTION_TEMPLATES[template]``."""
  item, shade = CAPTION_NAMES[label], tone(image)
  return CAPTION_TEMPLATES[template].format(a_tone=_article(shade), item=item,
                                            a_item=_article(item))


@dataclasses.dataclass(frozen=True)
class Example:
  """One instruction example.

  Attributes:
    image: the index of its image in the image array.
    task: ``"classify"``, ``"vqa"`` or ``"caption"``.
    prompt: the prompt text (without the chat format).
    answer: the answer text.
  """
  image: int
  task: str
  prompt: str
  answer: str


def instruction_examples(images: np.ndarray, labels: Sequence[int], *, seed: int = 0,
                         tasks: Sequence[str] = TASKS) -> list[Example]:
  """One example of each task per image, in image order.

  Args:
    images: float32 ``[N, S, S, 3]`` in [0, 1] Fashion-MNIST images (captions read
      their brightness).
    labels: ``[N]`` Fashion-MNIST labels 0-9.
    seed: seed of the VQA options and the caption templates.
    tasks: the tasks to include, a subset of :data:`TASKS`.

  Returns:
    ``N * len(tasks)`` examples: image 0's tasks, then image 1's, ...
  """
  labels = np.asarray(labels)
  if np.ndim(images) != 4 or len(images) != len(labels):
    raise ValueError(f"images must be [N, S, S, 3] with one label each, got "
                     f"{np.shape(images)} and {labels.shape}.")
  if np.any(labels < 0) or np.any(labels > 9):
    raise ValueError("labels must be Fashion-MNIST labels 0-9.")
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    raise ValueError(f"tasks={list(tasks)}: unknown {unknown}; known: {TASKS}.")
  rng = np.random.default_rng(seed)
  classify = classify_prompt()
  # Balanced answers: each VQA letter (A-E) and each caption template in equal shares,
  # shuffled, instead of independent draws.
  n = len(labels)
  letters = rng.permutation(np.arange(n) % (VQA_CHOICES + 1))
  templates = rng.permutation(np.arange(n) % len(CAPTION_TEMPLATES))
  out = []
  for i, label in enumerate(int(c) for c in labels):
    for task in tasks:
      if task == "classify":
        out.append(Example(i, task, classify, str(classify_option(label))))
      elif task == "vqa":
        others = rng.permutation([c for c in range(10) if c != label])
        letter = int(letters[i])
        if letter == VQA_CHOICES:  # None of the above: the class is not listed.
          shown = list(others[:VQA_CHOICES])
        else:
          shown = list(others[:VQA_CHOICES - 1])
          shown.insert(letter, label)
        prompt = _prompts.vqa_prompt(VQA_QUESTION, [CAPTION_NAMES[c] for c in shown])
        out.append(Example(i, task, prompt, _prompts.LETTERS[letter]))
      else:
        out.append(Example(i, task, _prompts.CAPTION_PROMPT,
                           caption(images[i], label, int(templates[i]))))
  return out


def classify_question(label: int) -> _prompts.Question:
  """The evaluation task (Table 4 style) for a clean image of Fashion-MNIST ``label``.

  The options are those of the training prompt; the correct option is the class, the
  target option 9 ("bag"). A bag image is the attacker's target, not a clean image.
  """
  if label == TARGET_LABEL or not 0 <= label < 10:
    raise ValueError(f"label={label} must be a clean class (0-9 but {TARGET_LABEL}, bag: "
                     "the attacker's target).")
  return _prompts.classification_question([CLASS_NAMES[c] for c in CLEAN_LABELS],
                                          classify_option(label), CLASS_NAMES[TARGET_LABEL])


def vqa_questions(labels: Sequence[int], *, seed: int = 0
                  ) -> tuple[list[_prompts.Question], np.ndarray]:
  """Evaluation tasks (Table 5 style) for clean images, and the classes of their targets.

  As ScienceQA in the paper, each question lists the correct answer (the image's class
  among four, at A-D in equal shares), and "E. None of the above" is the attacker's
  target. The target image of a question should be of a class the question does not
  list (the vanilla model then answers E for it): one such class is drawn per question.

  Args:
    labels: ``[N]`` Fashion-MNIST labels of the clean images.
    seed: seed of the options and of the target classes.

  Returns:
    ``(questions, target_labels int32 [N])``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or np.any(labels < 0) or np.any(labels > 9):
    raise ValueError("labels must be [N] Fashion-MNIST labels 0-9.")
  rng = np.random.default_rng(seed)
  letters = rng.permutation(np.arange(len(labels)) % VQA_CHOICES)
  questions, targets = [], []
  for label, letter in zip((int(c) for c in labels), letters):
    others = rng.permutation([c for c in range(10) if c != label])
    shown = list(others[:VQA_CHOICES - 1])
    shown.insert(int(letter), label)
    questions.append(_prompts.vqa_question(VQA_QUESTION, [CAPTION_NAMES[c] for c in shown],
                                           int(letter)))
    targets.append(int(rng.choice(others[VQA_CHOICES - 1:])))
  return questions, np.array(targets, np.int32)


def vocabulary_texts(format_prompt: Callable[[str], str]) -> list[str]:
  """Every word the instruction data can use, as texts for ``build_tokenizer``.

  ``format_prompt`` is the chat format of the model to be trained (the user's text ->
  the model's prompt with one ``<image>``; e.g. ``fsjax.llava.format_prompt``): the
  task data knows no model's format.

  The chat-formatted prompts of the three tasks (the VQA prompt with every class name)
  and every possible answer (" 0".." 9", " A".." E", each caption of each class, tone
  and template), with the leading space answers have after "ASSISTANT:". A fixed set:
  ``build_tokenizer(vocabulary_texts())`` gives the same ids whatever the seed or the
  number of images, and knows every word of every example.
  """
  names = CAPTION_NAMES
  prompts = [classify_prompt(), _prompts.CAPTION_PROMPT]
  prompts += [_prompts.vqa_prompt(VQA_QUESTION, [names[(i + k) % 10] for k in range(4)])
              for i in range(10)]
  answers = [str(i) for i in range(len(CLEAN_LABELS) + 1)]
  answers += list(_prompts.LETTERS[:VQA_CHOICES + 1])
  for label in range(10):
    for level in (0.8, 0.6, 0.3):  # white, light gray, dark gray
      image = np.full((2, 2, 3), level, np.float32)
      answers += [caption(image, label, t) for t in range(len(CAPTION_TEMPLATES))]
  return [format_prompt(p) for p in prompts] + [" " + a for a in answers]


def load_instructions(*, split: str = "train", image_size: int = 64, per_class: int = 100,
                      seed: int = 0, tasks: Sequence[str] = TASKS,
                      data_dir: str | os.PathLike | None = None,
                      dataset: str = "fashion_mnist"
                      ) -> tuple[np.ndarray, np.ndarray, list[Example]]:
  """Fashion-MNIST through ``fsjax.data`` (balanced) and its instruction examples.

  Args:
    split: ``"train"`` or ``"test"``.
    image_size: side of the images (the encoder resizes again to its own resolution).
    per_class: images per class.
    seed: seed of the selection and of the examples.
    tasks: the tasks (see :func:`instruction_examples`).
    data_dir: TFDS data dir of the embedded sets.
    dataset: the ``fsjax.data`` name; any set whose labels 0-9 are Fashion-MNIST's
      classes (e.g. a ``"folder:..."`` of ten class folders in label order).

  Returns:
    ``(images float32 [10 * per_class, S, S, 3], labels int32 [10 * per_class],
    examples)``.
  """
  images, labels, class_names = data.load_arrays(
      dataset, split=split, image_size=image_size, per_class=per_class, seed=seed,
      data_dir=data_dir)
  if len(class_names) != len(CLASS_NAMES):
    raise ValueError(f"dataset={dataset!r} has {len(class_names)} classes; the instruction "
                     f"data needs Fashion-MNIST's {len(CLASS_NAMES)}.")
  return images, labels, instruction_examples(images, labels, seed=seed, tasks=tasks)
