"""Image datasets for certification, read through TensorFlow Datasets (TFDS).

One entry point, `load`, returns a `Dataset` that iterates as numpy batches
``{"image": float32 [B, S, S, 3] in [0, 1], "label": int32 [B]}`` (plus
``"name"``, a str array, for sets whose images have names). The datasets:

* Embedded sets, built offline with ``tfds.dataset_builders.store_as_tfds_dataset``
  from files that packages install, and cached as TFDS datasets under `data_dir`
  (``fsjax_<name>/1.0.0``; built on first use, never rebuilt while present). A
  lock file (``fsjax_<name>.lock``, ``fcntl.flock``) makes concurrent first uses
  safe: one process builds, the others wait for it, then read the same files. The
  build says so in one line on stderr; TFDS's own "Downloading and preparing
  dataset" line and progress bars are kept quiet (nothing is downloaded):

  * ``fashion_mnist``: Zalando's Fashion-MNIST, 28x28 gray, splits ``train``
    (60,000) and ``test`` (10,000), 10 classes (`FASHION_MNIST_CLASSES`), from
    the idx files of Debian's ``dataset-fashion-mnist``, kept in file order.
  * ``skimage_photos``: the natural photos bundled with scikit-image
    (`SKIMAGE_PHOTOS`), one split ``test``, stored as RGB. The label is an
    ImageNet-1k class id where one obviously applies (chelsea 285 Egyptian cat,
    coffee 967 espresso, rocket 657 missile), else -1 (unlabelled);
    ``class_names`` are the 1000 ImageNet names; a ``name`` per image.
  * ``lfw_subset``: scikit-image's 100 faces then 100 non-faces from LFW, 25x25
    gray, one split ``train``, labels face=1 / non-face=0.

* ``imagenet2012``: ILSVRC-2012 prepared by TFDS from the tars in `manual_dir`
  (``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar``); never downloads.
  Splits ``train`` and ``validation``.
* ``folder:/path/to/root``: class subfolders of images (BMP, GIF, JPEG, PNG,
  TIFF, WebP, searched recursively); class names are the sorted subfolder
  names. If ``root/<split>/`` exists its subfolders are the classes of that
  split, otherwise the subfolders of ``root`` form the single split ``train``.
  Read by a small reader of our own (PIL), because ``tfds.folder_dataset.
  ImageFolder`` insists on split folders and loads nothing at random access.

Every set is read by random access (TFDS ArrayRecord data sources, or the file
list of a folder), so the order of the examples is an exact function of the
seed: the first `num_examples` of ``np.random.default_rng(seed).permutation``.
TFDS split slicing (``split="train[:10%]"``) works for the TFDS sets.

Example::

  ds = fsjax.data.load("skimage_photos", split="test", image_size=224,
                       batch_size=8)
  for batch in ds:
    batch["image"]  # float32 [B, 224, 224, 3] in [0, 1]
"""

import collections
from collections.abc import Iterator, Mapping, Sequence
import contextlib
import dataclasses
import gzip
import io
import logging
import os
import pathlib
import re
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

from fsjax import imagenet

DATA_DIR_ENV = "FSJAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/fsjax/tensorflow_datasets"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
LFW_SUBSET_CLASSES = ("non-face", "face")
# `skimage.data` photos that ship inside the scikit-image wheel (no pooch
# download), with the ImageNet-1k class that obviously applies (-1: none). The
# three labels are the top-1 of a pretrained EfficientNet-Lite0 on each photo.
SKIMAGE_PHOTOS = {
    "astronaut": -1, "brick": -1, "camera": -1, "cell": -1, "chelsea": 285,
    "clock": -1, "coffee": 967, "coins": -1, "grass": -1, "gravel": -1,
    "hubble_deep_field": -1, "immunohistochemistry": -1, "microaneurysms": -1,
    "moon": -1, "page": -1, "retina": -1, "rocket": 657, "text": -1,
}
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff",
                    ".webp")
IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar",
                 "validation": "ILSVRC2012_img_val.tar"}
EMBEDDED = ("fashion_mnist", "skimage_photos", "lfw_subset")
KNOWN = EMBEDDED + ("imagenet2012", "folder:<path>")
_VERSION = "1.0.0"
_CONFIG_KEYS = ("name", "split", "image_size", "batch_size", "num_examples",
                "seed", "shuffle", "classes", "per_class", "drop_remainder",
                "data_dir", "manual_dir")


class _DropThirdPartyNoise(logging.Filter):
  """Drops TFDS's advice to install OpenCV (it then decodes with PIL, as we want)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("OpenCV is not installed")


def _tfds():
  # Imported on first use: TensorFlow takes seconds to import, and neither
  # `import fsjax` nor the folder reader needs it. TensorFlow's C++ INFO/WARNING
  # lines are off unless the user set TF_CPP_MIN_LOG_LEVEL; so is its oneDNN banner
  # (TF only encodes and decodes images here, so its oneDNN kernels do not matter).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropThirdPartyNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_DropThirdPartyNoise())
  return tfds


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Holds an exclusive ``flock`` on `path` (created if missing) while inside.

  Released by the kernel if the process dies, so a crashed build never leaves
  the dataset locked. Where ``fcntl`` is missing (Windows) nothing is locked.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+b") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds(tfds):
  """TFDS without its stdout banner ("Downloading and preparing dataset ...",
  printed even for offline builds), its progress bars and its INFO/WARNING logs
  (e.g. "Variant folder ... has no dataset_info.json" while it builds it)."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  active = tqdm_utils._active  # pylint: disable=protected-access
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  tfds.display_progress_bar(False)
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)
    tfds.display_progress_bar(active)


def _build_embedded(tfds, name: str, data_dir: pathlib.Path,
                    path: pathlib.Path) -> None:
  """Builds embedded set `name` into `path` once, whatever other processes do."""
  with _file_lock(data_dir / f"fsjax_{name}.lock"):
    # Another process may have built it while this one waited for the lock.
    if (path / "dataset_info.json").is_file():
      return
    print(f"fsjax.data: building the embedded dataset {name!r} under {path} "
          "from local files (once; nothing is downloaded)...", file=sys.stderr,
          flush=True)
    start = time.monotonic()
    features, splits = _EMBEDDED_EXAMPLES[name]()
    with _quiet_tfds(tfds):
      tfds.dataset_builders.store_as_tfds_dataset(
          name=f"fsjax_{name}", version=_VERSION, features=features,
          split_datasets=splits, data_dir=data_dir, file_format="array_record",
          disable_shuffling=True,  # Keep the source order (idx files, skimage).
          description=f"fsjax embedded set {name!r}, see fsjax/data.py.")
    print(f"fsjax.data: built {name!r} in {time.monotonic() - start:.0f} s.",
          file=sys.stderr, flush=True)


def _data_dir(data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """`data_dir`, else $FSJAX_DATA_DIR, else ~/.cache/fsjax/tensorflow_datasets."""
  return pathlib.Path(data_dir or os.environ.get(DATA_DIR_ENV)
                      or DEFAULT_DATA_DIR).expanduser()


# ------------------------------------------------------------------------------
# Embedded sets: in-memory examples for `store_as_tfds_dataset`.
# ------------------------------------------------------------------------------


def _skimage_data():
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The embedded sets 'skimage_photos' and 'lfw_subset' need "
                      "scikit-image: `pip install scikit-image` (or "
                      "`pip install fsjax[embedded]`).") from e
  return skimage.data


def _read_idx(path: pathlib.Path, offset: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def _fashion_mnist():
  tfds = _tfds()
  root = pathlib.Path(FASHION_MNIST_DIR)
  splits = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images_path.is_file() and labels_path.is_file()):
      raise FileNotFoundError(
          f"Fashion-MNIST is missing: no {images_path} / {labels_path}. "
          "Install it with `apt-get install -y dataset-fashion-mnist`.")
    # idx headers: 16 bytes for images (magic, count, rows, cols), 8 for labels.
    images = _read_idx(images_path, offset=16).reshape(-1, 28, 28, 1)
    labels = _read_idx(labels_path, offset=8)
    splits[split] = [(i, {"image": images[i], "label": int(labels[i])})
                     for i in range(len(labels))]
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(28, 28, 1)),
      "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES)})
  return features, splits


def _skimage_photos():
  tfds, data = _tfds(), _skimage_data()
  examples = []
  for i, (name, label) in enumerate(SKIMAGE_PHOTOS.items()):
    image = np.asarray(getattr(data, name)(), np.uint8)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    examples.append((i, {"image": image[..., :3], "label": label, "name": name}))
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.Scalar(
          np.int64, doc="ImageNet-1k class id, -1 = unlabelled"),
      "name": tfds.features.Text()})
  return features, {"test": examples}


def _lfw_subset():
  tfds, data = _tfds(), _skimage_data()
  # Floats in [0, 1], stored as uint8 (error <= 1/510).
  images = np.round(data.lfw_subset() * 255).astype(np.uint8)[..., None]
  # skimage documents the order: the first 100 are faces, the next 100 not.
  examples = [(i, {"image": images[i], "label": int(i < 100)})
              for i in range(len(images))]
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(25, 25, 1)),
      "label": tfds.features.ClassLabel(names=LFW_SUBSET_CLASSES)})
  return features, {"train": examples}


_EMBEDDED_EXAMPLES = {"fashion_mnist": _fashion_mnist,
                      "skimage_photos": _skimage_photos,
                      "lfw_subset": _lfw_subset}


def prepare(name: str, *,
            data_dir: str | os.PathLike[str] | None = None,
            manual_dir: str | os.PathLike[str] | None = None,
            split: str | None = None):
  """Builds a TFDS dataset once (when missing) and returns its builder.

  Args:
    name: an embedded set (`EMBEDDED`) or ``"imagenet2012"``.
    data_dir: TFDS data dir; default $FSJAX_DATA_DIR, else
      ``~/.cache/fsjax/tensorflow_datasets``.
    manual_dir: for ``imagenet2012`` only: the folder holding the ILSVRC-2012
      tars; needed only while ImageNet is not yet prepared under `data_dir`.
    split: for ``imagenet2012`` only: a split whose tar must be in
      `manual_dir` (``"train"`` or ``"validation"``); None = either.

  Returns:
    The ``tfds.core.DatasetBuilder`` of the prepared dataset.
  """
  tfds, data_dir = _tfds(), _data_dir(data_dir)
  if name == "imagenet2012":
    return _prepare_imagenet(data_dir, manual_dir, split)
  if name not in _EMBEDDED_EXAMPLES:
    raise ValueError(f"prepare: unknown dataset name={name!r}; known TFDS sets: "
                     f"{', '.join(EMBEDDED + ('imagenet2012',))}.")
  path = data_dir / f"fsjax_{name}" / _VERSION
  # TFDS writes into a temporary folder and renames it when complete, so the
  # info file exists only for a finished build.
  if not (path / "dataset_info.json").is_file():
    _build_embedded(tfds, name, data_dir, path)
  return tfds.builder_from_directory(path)


def _prepare_imagenet(data_dir: pathlib.Path, manual_dir, split: str | None):
  tfds = _tfds()
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if not builder.is_prepared():
    tars = ", ".join(IMAGENET_TARS.values())
    if manual_dir is None:
      raise ValueError(
          f"imagenet2012 is not prepared under data_dir={data_dir}. Pass "
          f"manual_dir=<folder with {tars}> to prepare it (about 150 GB, "
          "hours); it is never downloaded.")
    manual_dir = pathlib.Path(manual_dir).expanduser()
    # TFDS prepares the splits whose tars are present, all at once.
    needed = [IMAGENET_TARS[split]] if split in IMAGENET_TARS else list(
        IMAGENET_TARS.values())
    if not any((manual_dir / t).is_file() for t in needed):
      raise FileNotFoundError(
          f"imagenet2012: manual_dir={manual_dir} lacks {' or '.join(needed)}; "
          "download the tars from https://image-net.org (login needed).")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        file_format="array_record")
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"imagenet2012 under data_dir={data_dir} is stored as "
        f"{builder.info.file_format.value}; fsjax reads ArrayRecord (random "
        "access, exact seeded order). Prepare it again from the tars with "
        "fsjax.data.prepare('imagenet2012', data_dir=<new dir>, manual_dir=...).")
  return builder


# ------------------------------------------------------------------------------
# Sources: random access to uint8 images and their labels.
# ------------------------------------------------------------------------------


class _TfdsSource:
  """A split of a prepared TFDS dataset, read through ArrayRecord."""

  def __init__(self, builder, split: str):
    tfds = _tfds()
    self._examples = builder.as_data_source(split)
    self._labels = builder.as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._examples)

  def labels(self, indices: np.ndarray) -> np.ndarray:
    return np.array([e["label"] for e in
                     self._labels.__getitems__([int(i) for i in indices])])

  def read(self, indices: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for e in self._examples.__getitems__([int(i) for i in indices]):
      name = e.get("name", e.get("file_name"))
      out.append({"image": e["image"], "label": int(e["label"]),
                  "name": None if name is None else _str(name)})
    return out


def _str(s: str | bytes) -> str:
  return s.decode("utf-8") if isinstance(s, bytes) else str(s)


class _FolderSource:
  """Images under class subfolders, read with PIL."""

  def __init__(self, root: pathlib.Path, class_names: list[str]):
    self._root, self._paths, labels = root, [], []
    for label, class_name in enumerate(class_names):
      paths = sorted(
          p for p in (root / class_name).rglob("*")
          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
          and not any(part.startswith(".") for part in p.relative_to(root).parts))
      self._paths += paths
      labels += [label] * len(paths)
    self._labels = np.array(labels, np.int64)

  def __len__(self) -> int:
    return len(self._paths)

  def labels(self, indices: np.ndarray) -> np.ndarray:
    return self._labels[indices]

  def check(self, indices: np.ndarray) -> None:
    """Raises ValueError naming the first selected file that is not a readable image
    (PIL's header check and ``verify``), before any work starts."""
    for i in indices:
      try:
        with Image.open(self._paths[i]) as im:
          im.verify()
      except Exception as e:  # pylint: disable=broad-except
        raise self._unreadable(i, e) from e

  def _unreadable(self, i: int, error: Exception) -> ValueError:
    cause = (str(error).splitlines() or [type(error).__name__])[0]
    return ValueError(f"folder dataset: {self._paths[i]} is not a readable image "
                      f"({cause}); remove or replace it.")

  def read(self, indices: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for i in indices:
      try:
        with Image.open(self._paths[i]) as im:
          image = np.asarray(im.convert("RGB"))
      except Exception as e:  # pylint: disable=broad-except  (e.g. a truncated JPEG)
        raise self._unreadable(i, e) from e
      out.append({"image": image, "label": int(self._labels[i]),
                  "name": self._paths[i].relative_to(self._root).as_posix()})
    return out


def _folder(path: str, split: str) -> tuple[_FolderSource, list[str]]:
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"folder dataset: {root} is not a directory.")
  if (root / split).is_dir():
    root = root / split
  elif split != "train":
    raise ValueError(
        f"Unknown split={split!r} for folder {root}: it has no subfolder "
        f"{split!r}; a folder without split subfolders is the single split "
        "'train'.")
  class_names = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and not p.name.startswith("."))
  source = _FolderSource(root, class_names)
  if not len(source):
    raise ValueError(
        f"folder dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) in class "
        f"subfolders of {root}; expected {root}/<class name>/<image>.")
  return source, class_names


def _source(name: str, split: str, data_dir, manual_dir):
  """Returns `(source, class_names)` for a dataset name and split."""
  if name.startswith("folder:"):
    return _folder(name[len("folder:"):], split)
  if name not in EMBEDDED + ("imagenet2012",):
    raise ValueError(f"Unknown dataset name={name!r}; known: {', '.join(KNOWN)}.")
  base_split = re.sub(r"\[.*\]$", "", split)
  builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir,
                    split=base_split)
  if base_split not in builder.info.splits:
    raise ValueError(f"Unknown split={split!r} for {name}; available: "
                     f"{', '.join(sorted(builder.info.splits))}.")
  if name in ("skimage_photos", "imagenet2012"):
    class_names = list(imagenet.CLASS_NAMES)
  else:
    class_names = list(builder.info.features["label"].names)
  return _TfdsSource(builder, split), class_names


# ------------------------------------------------------------------------------
# Selection, resizing and batching.
# ------------------------------------------------------------------------------


def _select(source, *, split: str, num_examples, seed: int, shuffle: bool,
            classes, per_class, num_classes: int) -> np.ndarray:
  """Positions in the split, in iteration order (see `load`)."""
  order = (np.random.default_rng(seed).permutation(len(source)) if shuffle
           else np.arange(len(source)))
  if classes is not None or per_class is not None:
    wanted = None if classes is None else set(classes)
    targets = wanted if wanted is not None else set(range(num_classes))
    counts, kept, chunk = collections.Counter(), [], 1024
    # Labels are read lazily, a chunk at a time, until the quotas are met.
    for start in range(0, len(order), chunk):
      idx = order[start:start + chunk]
      for i, label in zip(idx, source.labels(idx)):
        label = int(label)
        if ((wanted is None or label in wanted) and
            (per_class is None or counts[label] < per_class)):
          kept.append(i)
          counts[label] += 1
      if num_examples is not None and len(kept) >= num_examples:
        break
      if per_class is not None and all(counts[c] >= per_class for c in targets):
        break
    else:
      short = {c: counts[c] for c in sorted(wanted or ())
               if per_class is not None and counts[c] < per_class}
      if short:
        raise ValueError(
            f"per_class={per_class}: split {split!r} has fewer examples of "
            f"classes {{class id: count}} {short}; lower per_class or drop "
            "those classes.")
    order = np.array(kept, np.int64)
  if num_examples is not None:
    if num_examples > len(order):
      raise ValueError(f"num_examples={num_examples} exceeds the {len(order)} "
                       f"examples selected from split {split!r}.")
    order = order[:num_examples]
  return order


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [size, size, 3] in [0, 1].

  The shorter side goes to `size` (bicubic; PIL widens the filter when
  shrinking, so downscaling is antialiased), then the centre is cropped. Square
  images (Fashion-MNIST, LFW) are thus plainly resized; gray becomes RGB.
  """
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  w, h = pil.size
  new_w = max(size, round(w * size / min(w, h)))
  new_h = max(size, round(h * size / min(w, h)))
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  pil = pil.crop((left, top, left + size, top + size)).convert("RGB")
  return np.asarray(pil, np.float32) / 255.0


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A selection of one split, iterated as numpy batches.

  Iterating yields ``{"image": float32 [B, image_size, image_size, 3] in [0, 1],
  "label": int32 [B]}``, plus ``"name"`` (str [B]) for sets whose images have
  names (skimage_photos, imagenet2012, folders). Every iteration yields the same
  examples in the same order; the last batch holds the remainder (smaller than
  `batch_size`) unless `drop_remainder`.

  Attributes:
    name: the dataset name given to `load`.
    split: the split.
    class_names: ``class_names[label]`` is the name of a label.
    indices: int64 [num_examples], the positions in the split, in order.
    image_size: side of the square images.
    batch_size: examples per batch.
    drop_remainder: whether a smaller last batch is dropped.
  """
  name: str
  split: str
  class_names: list[str]
  indices: np.ndarray
  image_size: int
  batch_size: int
  drop_remainder: bool
  _source: Any = dataclasses.field(repr=False)

  @property
  def num_examples(self) -> int:
    """Number of selected examples (including a dropped remainder)."""
    return len(self.indices)

  def __len__(self) -> int:
    """Number of batches."""
    if self.drop_remainder:
      return self.num_examples // self.batch_size
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for b in range(len(self)):
      examples = self._source.read(
          self.indices[b * self.batch_size:(b + 1) * self.batch_size])
      batch = {
          "image": np.stack([_resize(e["image"], self.image_size)
                             for e in examples]),
          "label": np.array([e["label"] for e in examples], np.int32)}
      if examples[0]["name"] is not None:
        batch["name"] = np.array([e["name"] for e in examples])
      yield batch


def _check_int(name: str, value, *, minimum: int, optional: bool = False):
  if value is None and optional:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def load(name: str, *, split: str, image_size: int, batch_size: int,
         num_examples: int | None = None, seed: int = 0, shuffle: bool = True,
         classes: Sequence[int] | None = None, per_class: int | None = None,
         drop_remainder: bool = False,
         data_dir: str | os.PathLike[str] | None = None,
         manual_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Loads a dataset split as a `Dataset` of numpy batches.

  Selection: the split's examples are permuted by
  ``np.random.default_rng(seed)`` (file order if not `shuffle`); if `classes`
  and/or `per_class` are given, the examples of other classes are dropped and
  only the first `per_class` of each class are kept, in that order (a balanced
  subset, e.g. 10 classes x 50 as in the paper's Table 2); then the first
  `num_examples` are taken. Same arguments, same examples in the same order.

  Args:
    name: ``"fashion_mnist"``, ``"skimage_photos"``, ``"lfw_subset"``,
      ``"imagenet2012"`` or ``"folder:/path/to/root"`` (see the module doc).
    split: split name, e.g. ``"train"``, ``"test"``, ``"validation"``; TFDS
      slicing such as ``"train[:1000]"`` works for all but folders.
    image_size: side of the square output images (shorter side resized, then
      centre crop).
    batch_size: examples per batch.
    num_examples: keep the first N examples of the selection; None = all.
    seed: seed of the permutation.
    shuffle: permute the examples; False keeps the stored order.
    classes: class ids to keep; None = all.
    per_class: keep the first N examples of each class; it is an error if one
      of `classes` has fewer.
    drop_remainder: drop the last batch if it is smaller than `batch_size`.
    data_dir: TFDS data dir; default $FSJAX_DATA_DIR, else
      ``~/.cache/fsjax/tensorflow_datasets``.
    manual_dir: folder with the ILSVRC-2012 tars, to prepare ``imagenet2012``.

  Returns:
    The `Dataset`.
  """
  _check_int("image_size", image_size, minimum=1)
  _check_int("batch_size", batch_size, minimum=1)
  _check_int("num_examples", num_examples, minimum=1, optional=True)
  _check_int("per_class", per_class, minimum=1, optional=True)
  _check_int("seed", seed, minimum=0)
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a split name such as 'train', got {split!r}.")
  source, class_names = _source(name, split, data_dir, manual_dir)
  if classes is not None:
    classes = list(classes)
    if not classes:
      raise ValueError("classes must name at least one class id (or be None).")
    for c in classes:
      _check_int("classes[...]", c, minimum=0)
      if c >= len(class_names):
        raise ValueError(f"classes: class id {c} is out of range for {name}, "
                         f"which has {len(class_names)} classes.")
  indices = _select(source, split=split, num_examples=num_examples, seed=seed,
                    shuffle=shuffle, classes=classes, per_class=per_class,
                    num_classes=len(class_names))
  if isinstance(source, _FolderSource):
    source.check(indices)  # an unreadable file is one line now, not a traceback later
  return Dataset(name=name, split=split, class_names=class_names,
                 indices=indices, image_size=image_size, batch_size=batch_size,
                 drop_remainder=drop_remainder, _source=source)


def load_arrays(name: str, *, split: str, image_size: int,
                batch_size: int = 256, **kwargs
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Loads a (small) selection into memory; arguments as for `load`.

  Returns:
    ``(images, labels, class_names)``: images float32 [N, image_size,
    image_size, 3] in [0, 1], labels int32 [N], class_names list of str.
  """
  ds = load(name, split=split, image_size=image_size, batch_size=batch_size,
            **kwargs)
  batches = list(ds)
  if not batches:
    empty = np.zeros((0, image_size, image_size, 3), np.float32)
    return empty, np.zeros((0,), np.int32), ds.class_names
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]), ds.class_names)


def from_config(config: Mapping[str, Any]) -> Dataset:
  """`load` with arguments from a config (a ConfigDict or a dict).

  Args:
    config: keys ``name``, ``split``, ``image_size``, ``batch_size`` (required)
      and optionally ``num_examples``, ``seed``, ``shuffle``, ``classes``,
      ``per_class``, ``drop_remainder``, ``data_dir``, ``manual_dir``.

  Returns:
    The `Dataset`.
  """
  kwargs = dict(config.items())
  unknown = sorted(set(kwargs) - set(_CONFIG_KEYS))
  if unknown:
    raise ValueError(f"config.data: unknown keys {unknown}; known: "
                     f"{', '.join(_CONFIG_KEYS)}.")
  missing = [k for k in _CONFIG_KEYS[:4] if kwargs.get(k) is None]
  if missing:
    raise ValueError(f"config.data: missing required keys {missing}.")
  for key in ("seed", "shuffle", "drop_remainder"):  # None = the default.
    if kwargs.get(key, 0) is None:
      del kwargs[key]
  return load(kwargs.pop("name"), **kwargs)
