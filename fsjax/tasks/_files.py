"""Evaluation data of the MLLM experiments, from local files only (never downloaded).

* :func:`image_pairs`: clean / target image pairs for captioning (Table 3), as
  M-Attack's evaluation reads them: the NIPS-2017 adversarial-competition dev images
  as clean images and a folder of target images, paired in order.
* :func:`classification_images`: the paper's classification set (Table 4), ten ImageNet
  classes and target images of a shark, through TFDS from the ILSVRC-2012 tars in
  ``manual_dir`` (``fsjax.data``); any ``fsjax.data`` dataset works.
* :func:`load_scienceqa`: ScienceQA-format multiple-choice questions with images
  (Table 5), from a JSON or JSONL file.

Images come back as float32 ``[N, S, S, 3]`` in [0, 1]: the shorter side resized to S
(bicubic), then the centre crop, as ``fsjax.data`` and M-Attack's loader do.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib

import numpy as np
from PIL import Image

from fsjax import data

# The ImageNet-1k ids of the paper's ten classes (`PAPER_CLASSES`, same order):
# rooster = "cock" 7, gibbon 368, golden_retriever 207, goldfish 1, hen 8,
# hognose_snake 54, ice_bear 296, killer_whale 148, king_crab 121, kite 21.
PAPER_IMAGENET_IDS = (7, 368, 207, 1, 8, 54, 296, 148, 121, 21)
# The target images of option 10 "shark": ImageNet has three shark classes; we take
# "great white shark" (2). The paper does not say which: our choice.
PAPER_TARGET_IMAGENET_ID = 2


def _read_image(path: pathlib.Path, image_size: int) -> np.ndarray:
  try:
    with Image.open(path) as im:
      pixels = np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the image {path}: {e}") from e
  return data._resize(pixels, image_size)  # pylint: disable=protected-access  (one resize rule)


def _image_files(root: pathlib.Path, what: str) -> list[pathlib.Path]:
  if not root.is_dir():
    raise FileNotFoundError(f"{what}={root} is not a directory.")
  # Sorted relative paths: torchvision's ImageFolder order (class folder, then file).
  files = sorted((p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in data.IMAGE_EXTENSIONS
                  and not any(s.startswith(".") for s in p.relative_to(root).parts)),
                 key=lambda p: p.relative_to(root).as_posix())
  if not files:
    raise ValueError(f"{what}={root} holds no images ({', '.join(data.IMAGE_EXTENSIONS)}).")
  return files


@dataclasses.dataclass(frozen=True)
class ImagePairs:
  """Clean images and the attacker's target images, paired by position.

  Attributes:
    clean: float32 ``[N, S, S, 3]`` in [0, 1].
    target: float32 ``[N, S, S, 3]`` in [0, 1].
    clean_names: the clean files, relative to their folder.
    target_names: the target files, relative to their folder.
  """
  clean: np.ndarray
  target: np.ndarray
  clean_names: list[str]
  target_names: list[str]


def image_pairs(clean_dir: str | os.PathLike, target_dir: str | os.PathLike, *,
                image_size: int, num_examples: int | None = None) -> ImagePairs:
  """Clean / target image pairs from two local folders, as M-Attack pairs them.

  Expected layout (M-Attack's ``resources/images``; either folder may hold the images
  directly or in subfolders, searched recursively)::

    clean_dir/    e.g. bigscale/nips17/<name>.png: the NIPS-2017 adversarial-competition
                  dev images (1000 ImageNet-like photos, 299 px PNG)
    target_dir/   e.g. target_images/1/<name>.png: the target images

  Both lists are sorted by relative path (torchvision ImageFolder's order) and paired
  by position; pairs stop at the shorter list, as M-Attack's ``zip`` of two loaders.

  Args:
    clean_dir: the folder of clean images.
    target_dir: the folder of target images.
    image_size: side S of the returned images.
    num_examples: keep the first N pairs; None = all.

  Returns:
    The :class:`ImagePairs`.
  """
  data._check_int("image_size", image_size, minimum=1)  # pylint: disable=protected-access
  data._check_int("num_examples", num_examples, minimum=1, optional=True)  # pylint: disable=protected-access
  clean_root = pathlib.Path(clean_dir).expanduser()
  target_root = pathlib.Path(target_dir).expanduser()
  clean = _image_files(clean_root, "clean_dir")
  target = _image_files(target_root, "target_dir")
  n = min(len(clean), len(target))
  if num_examples is not None:
    if num_examples > n:
      raise ValueError(f"num_examples={num_examples} exceeds the {n} pairs of "
                       f"clean_dir={clean_root} ({len(clean)} images) and "
                       f"target_dir={target_root} ({len(target)} images).")
    n = num_examples
  clean, target = clean[:n], target[:n]
  return ImagePairs(
      clean=np.stack([_read_image(p, image_size) for p in clean]),
      target=np.stack([_read_image(p, image_size) for p in target]),
      clean_names=[p.relative_to(clean_root).as_posix() for p in clean],
      target_names=[p.relative_to(target_root).as_posix() for p in target])


@dataclasses.dataclass(frozen=True)
class ClassificationImages:
  """Clean images of K classes and target images of the attacker's class.

  Attributes:
    images: float32 ``[N, S, S, 3]`` in [0, 1], the clean images.
    labels: int32 ``[N]``, options 0..K-1 (positions in ``class_ids``).
    target_images: float32 ``[N, S, S, 3]``, one target-class image per clean image.
    class_ids: the K dataset class ids, in option order.
  """
  images: np.ndarray
  labels: np.ndarray
  target_images: np.ndarray
  class_ids: tuple[int, ...]


def classification_images(*, image_size: int, per_class: int = 50,
                          dataset: str = "imagenet2012", split: str = "validation",
                          class_ids: Sequence[int] = PAPER_IMAGENET_IDS,
                          target_class_id: int = PAPER_TARGET_IMAGENET_ID, seed: int = 0,
                          data_dir: str | os.PathLike | None = None,
                          manual_dir: str | os.PathLike | None = None
                          ) -> ClassificationImages:
  """The paper's classification set: ``per_class`` images of each class, plus targets.

  The paper samples 500 images of 10 ImageNet classes (50 each, the whole validation
  split of a class). ImageNet is read through TFDS, prepared once from the ILSVRC-2012
  tars in ``manual_dir`` (``fsjax.data.prepare``), never downloaded.

  Args:
    image_size: side S of the images.
    per_class: images per class (balanced).
    dataset: an ``fsjax.data`` dataset name (``"imagenet2012"``, ``"folder:/path"``).
    split: its split.
    class_ids: the dataset's class ids of options 0..K-1 (default the paper's ten).
    target_class_id: the dataset's class id of the target images.
    seed: selection seed (``fsjax.data.load``).
    data_dir: TFDS data dir.
    manual_dir: folder of the ILSVRC-2012 tars (while ImageNet is not yet prepared).

  Returns:
    The :class:`ClassificationImages`; the target images are the first N of the target
    class (seeded order), repeated in turn if the class has fewer.
  """
  class_ids = tuple(int(c) for c in class_ids)
  if target_class_id in class_ids or len(set(class_ids)) != len(class_ids):
    raise ValueError(f"class_ids={class_ids} must be distinct and exclude "
                     f"target_class_id={target_class_id}.")
  kwargs = dict(split=split, image_size=image_size, seed=seed, data_dir=data_dir,
                manual_dir=manual_dir)
  images, labels, _ = data.load_arrays(dataset, classes=class_ids, per_class=per_class,
                                       **kwargs)
  position = {c: i for i, c in enumerate(class_ids)}
  labels = np.array([position[int(c)] for c in labels], np.int32)
  targets, _, _ = data.load_arrays(dataset, classes=[target_class_id], **kwargs)
  if not len(targets):
    raise ValueError(f"{dataset} split {split!r} has no images of target_class_id="
                     f"{target_class_id}.")
  targets = targets[np.arange(len(images)) % len(targets)]
  return ClassificationImages(images=images, labels=labels, target_images=targets,
                              class_ids=class_ids)


@dataclasses.dataclass(frozen=True)
class ScienceQA:
  """Multiple-choice questions about images.

  Attributes:
    images: float32 ``[N, S, S, 3]`` in [0, 1].
    questions: N question texts.
    choices: N lists of choice texts (without "None of the above").
    answers: int32 ``[N]``, the index of the correct choice.
    ids: N record ids.
  """
  images: np.ndarray
  questions: list[str]
  choices: list[list[str]]
  answers: np.ndarray
  ids: list[str]


def load_scienceqa(path: str | os.PathLike, *, image_size: int,
                   num_examples: int | None = None) -> ScienceQA:
  """ScienceQA-format questions from a local JSON or JSONL file.

  Format: a JSON list of records, a JSON object ``{id: record}`` (ScienceQA's own
  ``problems.json`` layout), or JSONL (one record per line). A record::

    {"id": "5", "question": "Which ocean is highlighted?",
     "choices": ["the Arctic Ocean", "the Atlantic Ocean", "the Pacific Ocean"],
     "answer": 2, "image": "images/5/image.png"}

  ``answer`` is the 0-based index of the correct choice; ``image`` is a path, relative
  to the file's folder (or absolute); ``id`` is optional (default: the key or the
  position). Other fields are ignored. ScienceQA's ``problems.json`` names only
  ``"image.png"``: set ``image`` to ``"<split>/<id>/image.png"`` first, and keep the
  records that have an image (the paper uses 100 image-question pairs).

  Args:
    path: the file (``.json`` or ``.jsonl``).
    image_size: side S of the images.
    num_examples: keep the first N records; None = all.

  Returns:
    The :class:`ScienceQA` questions.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"ScienceQA file path={path} does not exist.")
  text = path.read_text(encoding="utf-8")
  try:
    if path.suffix == ".jsonl":
      records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
      records = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"ScienceQA file {path} is not valid JSON/JSONL: {e}") from e
  if isinstance(records, dict):
    records = [{"id": str(k), **v} if isinstance(v, dict) else v for k, v in records.items()]
  if not isinstance(records, list) or not records:
    raise ValueError(f"ScienceQA file {path} must hold a non-empty list of records.")
  if num_examples is not None:
    records = records[:num_examples]
  images, questions, choices_list, answers, ids = [], [], [], [], []
  for i, r in enumerate(records):
    where = f"ScienceQA file {path}, record {i}"
    if not isinstance(r, dict):
      raise ValueError(f"{where}: a record must be a JSON object, got {r!r:.80}.")
    missing = [k for k in ("question", "choices", "answer", "image") if r.get(k) is None]
    if missing:
      raise ValueError(f"{where}: missing fields {missing} (need question, choices, "
                       "answer, image).")
    choices = r["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
        or any(not isinstance(c, str) for c in choices)):
      raise ValueError(f"{where}: choices must be a list of at least two strings.")
    answer = r["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
      raise ValueError(f"{where}: answer={answer!r} must be an index into its "
                       f"{len(choices)} choices.")
    image = pathlib.Path(r["image"]).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
      raise FileNotFoundError(f"{where}: image {image} does not exist.")
    images.append(_read_image(image, image_size))
    questions.append(str(r["question"]))
    choices_list.append(list(choices))
    answers.append(answer)
    ids.append(str(r.get("id", i)))
  return ScienceQA(images=np.stack(images), questions=questions, choices=choices_list,
                   answers=np.array(answers, np.int32), ids=ids)
