"""Tests of fsjax.data against the source files read independently (numpy, PIL)."""

import fcntl
import gzip
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest

from fsjax import data

FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _idx(name: str, offset: int) -> np.ndarray:
  with gzip.open(FMNIST / name, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data dir per session for the small embedded sets (built here, fresh)."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def fmnist_dir():
  """Fashion-MNIST's data dir: the default one (None: $FSJAX_DATA_DIR, else
  ~/.cache/fsjax/tensorflow_datasets), which the suite's trainers and programs read too
  (tests/certify/test_robustness.py, tests/test_entry_points.py), so that a clean machine
  builds the set once (~25 s of CPU), not twice. What is checked below holds for the build
  as fsjax.data makes it, fresh or found (its path names fsjax.data's version)."""
  return None


@pytest.fixture(scope="session")
def fmnist_test():
  """`(images uint8 [10000, 28, 28], labels [10000])` read from the idx files."""
  return (_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
          _idx("t10k-labels-idx1-ubyte.gz", 8))


def _load(name, data_dir, **kw):
  kw = {"split": "train", "image_size": 28, "batch_size": 8, **kw}
  return data.load(name, data_dir=data_dir, **kw)


def test_fashion_mnist_counts_labels_and_pixels(fmnist_dir, fmnist_test):
  train = _load("fashion_mnist", fmnist_dir, shuffle=False, num_examples=20)
  assert data.load("fashion_mnist", split="train", image_size=28,
                   batch_size=1, data_dir=fmnist_dir).num_examples == 60000
  test = data.load("fashion_mnist", split="test", image_size=28, batch_size=1,
                   data_dir=fmnist_dir)
  assert test.num_examples == 10000 and len(test) == 10000
  assert train.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress",
                               "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                               "Ankle boot"]
  images, labels, _ = data.load_arrays("fashion_mnist", split="train",
                                       image_size=28, shuffle=False,
                                       num_examples=20, data_dir=fmnist_dir)
  ref_images = _idx("train-images-idx3-ubyte.gz", 16)[:20 * 784]
  np.testing.assert_array_equal(labels, _idx("train-labels-idx1-ubyte.gz", 8)[:20])
  # 28 -> 28 is no resize: the exact pixels, on all three channels.
  np.testing.assert_array_equal(
      images, np.repeat(ref_images.reshape(20, 28, 28, 1), 3, -1) / np.float32(255))


def test_seeded_order_matches_numpy_permutation(fmnist_dir, fmnist_test):
  ref_images, ref_labels = fmnist_test
  images, labels, _ = data.load_arrays("fashion_mnist", split="test",
                                       image_size=28, seed=3, num_examples=12,
                                       batch_size=5, data_dir=fmnist_dir)
  perm = np.random.default_rng(3).permutation(10000)[:12]
  np.testing.assert_array_equal(labels, ref_labels[perm])
  np.testing.assert_array_equal(np.round(images[..., 1] * 255), ref_images[perm])
  again, _, _ = data.load_arrays("fashion_mnist", split="test", image_size=28,
                                 seed=3, num_examples=12, data_dir=fmnist_dir)
  other, _, _ = data.load_arrays("fashion_mnist", split="test", image_size=28,
                                 seed=4, num_examples=12, data_dir=fmnist_dir)
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)


def test_balanced_subset(data_dir, fmnist_dir, fmnist_test):
  _, ref_labels = fmnist_test
  ds = data.load("fashion_mnist", split="test", image_size=28, batch_size=7,
                 classes=[1, 3, 8], per_class=5, seed=11, data_dir=fmnist_dir)
  labels = np.concatenate([b["label"] for b in ds])
  # Independently: walk the permutation, keep the first 5 of each class.
  expected, counts = [], {1: 0, 3: 0, 8: 0}
  for i in np.random.default_rng(11).permutation(10000):
    c = int(ref_labels[i])
    if c in counts and counts[c] < 5:
      expected.append(i)
      counts[c] += 1
  np.testing.assert_array_equal(ds.indices, expected)
  np.testing.assert_array_equal(labels, ref_labels[expected])
  # Without `classes`, all ten classes (0..9) come out with the quota.
  _, labels, _ = data.load_arrays("fashion_mnist", split="test", image_size=4,
                                  per_class=2, data_dir=fmnist_dir)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 2))
  with pytest.raises(ValueError, match="per_class=200"):
    data.load("lfw_subset", split="train", image_size=4, batch_size=1,
              classes=[0], per_class=200, data_dir=data_dir)


def test_resize_range_shape_and_gray_to_rgb(fmnist_dir, fmnist_test):
  ref_images, ref_labels = fmnist_test
  batch = next(iter(_load("fashion_mnist", fmnist_dir, split="test",
                          image_size=56, shuffle=False)))
  image = batch["image"]
  assert image.shape == (8, 56, 56, 3) and image.dtype == np.float32
  assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], ref_labels[:8])
  assert 0.0 <= image.min() and image.max() <= 1.0
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  # A 2x upscale keeps the mean brightness (up to bicubic overshoot clipped
  # at 0 and 1) and, block-averaged, the pixels.
  blocks = image[..., 0].reshape(8, 28, 2, 28, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(blocks.mean(axis=(1, 2)),
                             ref_images[:8].mean(axis=(1, 2)) / 255, atol=5e-3)
  assert np.abs(blocks - ref_images[:8] / 255).mean() < 0.03


def test_lfw_subset(data_dir):
  skimage_data = pytest.importorskip("skimage.data")
  ds = _load("lfw_subset", data_dir, image_size=25, shuffle=False)
  assert ds.num_examples == 200 and ds.class_names == ["non-face", "face"]
  images, labels, _ = data.load_arrays("lfw_subset", split="train",
                                       image_size=25, shuffle=False,
                                       data_dir=data_dir)
  np.testing.assert_array_equal(labels, [1] * 100 + [0] * 100)
  np.testing.assert_allclose(images[..., 0], skimage_data.lfw_subset(),
                             atol=0.5 / 255 + 1e-6)


def test_skimage_photos(data_dir):
  skimage_data = pytest.importorskip("skimage.data")
  ds = data.load("skimage_photos", split="test", image_size=300, batch_size=4,
                 data_dir=data_dir)
  assert ds.num_examples == len(data.SKIMAGE_PHOTOS) >= 10
  batches = list(ds)
  names = list(np.concatenate([b["name"] for b in batches]))
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert sorted(names) == sorted(data.SKIMAGE_PHOTOS)
  by_name = dict(zip(names, labels))
  assert (by_name["chelsea"], by_name["coffee"], by_name["rocket"]) == (285, 967, 657)
  assert by_name["astronaut"] == -1
  assert ds.class_names[285] == "Egyptian cat"
  # chelsea is 300x451: its shorter side already is 300, so the result is
  # exactly the centre crop of columns 75..374.
  np.testing.assert_array_equal(np.round(images[names.index("chelsea")] * 255),
                                skimage_data.chelsea()[:, 75:375])
  camera = images[names.index("camera")]  # A gray photo, now RGB.
  np.testing.assert_array_equal(camera[..., 0], camera[..., 1])


def test_prepare_builds_once_and_env_data_dir(data_dir, monkeypatch):
  pytest.importorskip("skimage.data")
  data.prepare("lfw_subset", data_dir=data_dir)
  info = data_dir / "fsjax_lfw_subset" / "1.0.0" / "dataset_info.json"
  mtime = info.stat().st_mtime_ns

  def fail(**kwargs):
    raise AssertionError("rebuilt although present")

  monkeypatch.setattr(data._tfds().dataset_builders, "store_as_tfds_dataset", fail)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
  assert data.load("lfw_subset", split="train", image_size=8,
                   batch_size=50).num_examples == 200
  assert info.stat().st_mtime_ns == mtime


def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_folder_dataset(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(3):
    _write_png(tmp_path / "cats" / f"{i}.png",
               rng.integers(0, 256, (20, 30, 3), np.uint8))
  gray = rng.integers(0, 256, (16, 16), np.uint8)
  _write_png(tmp_path / "dogs" / "a.png", gray)
  _write_png(tmp_path / "dogs" / "sub" / "b.PNG",
             rng.integers(0, 256, (8, 8, 3), np.uint8))
  (tmp_path / "dogs" / "notes.txt").write_text("not an image")
  _write_png(tmp_path / "dogs" / ".ipynb_checkpoints" / "c.png", gray)  # Hidden.
  ds = data.load(f"folder:{tmp_path}", split="train", image_size=16,
                 batch_size=2, shuffle=False)
  assert ds.class_names == ["cats", "dogs"] and ds.num_examples == 5
  batches = list(ds)
  assert [len(b["label"]) for b in batches] == [2, 2, 1]
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
  names = list(np.concatenate([b["name"] for b in batches]))
  assert names[3] == "dogs/a.png"
  np.testing.assert_array_equal(batches[1]["image"][1],
                                np.repeat(gray[..., None], 3, -1) / np.float32(255))
  dropped = data.load(f"folder:{tmp_path}", split="train", image_size=16,
                      batch_size=2, drop_remainder=True)
  assert len(dropped) == 2 and [len(b["label"]) for b in dropped] == [2, 2]
  # With split subfolders, `split` picks one.
  _write_png(tmp_path / "split" / "test" / "x" / "0.png", gray)
  ds = data.load(f"folder:{tmp_path / 'split'}", split="test", image_size=8,
                 batch_size=1)
  assert ds.class_names == ["x"] and ds.num_examples == 1


def test_from_config(tmp_path):
  _write_png(tmp_path / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
  _write_png(tmp_path / "b" / "0.png", np.full((4, 4, 3), 255, np.uint8))
  config = ml_collections.ConfigDict({
      "name": f"folder:{tmp_path}", "split": "train", "image_size": 4,
      "batch_size": 2, "num_examples": None, "seed": 0, "data_dir": None,
      "manual_dir": None})
  ds = data.from_config(config)
  assert ds.num_examples == 2 and ds.image_size == 4
  config.unknown_key = 1
  with pytest.raises(ValueError, match="unknown_key"):
    data.from_config(config)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 0}, "image_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"num_examples": 0}, "num_examples"),
    ({"num_examples": 201}, "num_examples=201"),
    ({"split": "validation"}, "Unknown split='validation'.*train"),
    ({"classes": [2]}, "class id 2"),
])
def test_bad_arguments(data_dir, kwargs, match):
  pytest.importorskip("skimage.data")
  with pytest.raises(ValueError, match=match):
    _load("lfw_subset", data_dir, **kwargs)


def test_missing_sources(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="fashion_mnist.*imagenet2012.*folder"):
    _load("cifar10", tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    _load(f"folder:{tmp_path / 'nope'}", tmp_path)
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="no images"):
    _load(f"folder:{tmp_path / 'empty'}", tmp_path)
  with pytest.raises(ValueError, match="single split 'train'"):
    _load(f"folder:{tmp_path / 'empty'}", tmp_path, split="test")
  monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    _load("fashion_mnist", tmp_path / "a")
  monkeypatch.setitem(sys.modules, "skimage", None)
  monkeypatch.setitem(sys.modules, "skimage.data", None)
  with pytest.raises(ImportError, match="pip install scikit-image"):
    _load("skimage_photos", tmp_path / "b", split="test")
  with pytest.raises(ValueError, match="manual_dir"):
    _load("imagenet2012", tmp_path / "c", split="validation")
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar"):
    _load("imagenet2012", tmp_path / "c", split="validation",
          manual_dir=tmp_path / "empty")
  (tmp_path / "empty" / "ILSVRC2012_img_train.tar").touch()
  with pytest.raises(FileNotFoundError, match="lacks ILSVRC2012_img_val.tar"):
    _load("imagenet2012", tmp_path / "c", split="validation",
          manual_dir=tmp_path / "empty")


_RACER = """
import pathlib, sys, time
import numpy as np
from fsjax import data
data._tfds()  # import TensorFlow before the start signal, so both race to the build
print("ready", flush=True)
while not pathlib.Path(sys.argv[2]).exists():
  time.sleep(0.02)
ds = data.load("lfw_subset", split="train", image_size=25, batch_size=200,
               shuffle=False, data_dir=sys.argv[1])
batch = next(iter(ds))
print("labels", "".join(str(int(v)) for v in batch["label"]), flush=True)
print("pixels", int(np.round(batch["image"] * 255).astype(np.int64).sum()), flush=True)
"""


def test_concurrent_first_use_builds_once(tmp_path):
  """Two processes load the same unbuilt embedded set at once: both succeed, one builds."""
  skimage_data = pytest.importorskip("skimage.data")
  data_dir, go = tmp_path / "tfds", tmp_path / "go"
  data_dir.mkdir()
  # fsjax.data's lock protocol: flock on <data_dir>/fsjax_<name>.lock. Holding it
  # here first makes both racers meet at the lock, for certain.
  lock = open(data_dir / "fsjax_lfw_subset.lock", "a+b")
  fcntl.flock(lock, fcntl.LOCK_EX)
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(data_dir), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  try:
    for p in procs:
      assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    time.sleep(2.0)
    # Held off by our lock: nothing built yet, nobody finished.
    assert all(p.poll() is None for p in procs)
    assert not (data_dir / "fsjax_lfw_subset" / "1.0.0" / "dataset_info.json").exists()
  finally:
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
  results = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err
  logs = "".join(out + err for out, err in results)
  assert logs.count("building the embedded dataset 'lfw_subset'") == 1, logs
  for noise in ("Downloading and preparing", "OpenCV", "libtpu", "oneDNN", "absl"):
    assert noise not in logs, logs
  # Both read the same, right examples: skimage's 100 faces then 100 non-faces,
  # 25 px (no resize), gray repeated on three channels.
  lfw = np.round(skimage_data.lfw_subset() * 255).astype(np.int64)
  expected = {"labels " + "1" * 100 + "0" * 100, f"pixels {3 * lfw.sum()}"}
  for out, _ in results:
    assert set(out.split("\n")[:2]) == expected, out  # ("ready" was read above.)
  assert not list((data_dir / "fsjax_lfw_subset").glob("*incomplete*"))


def test_unreadable_image_is_named_before_any_work(tmp_path):
  """A file with an image suffix that PIL cannot read: one line naming it, at load time
  (not a PIL traceback once batches are read); a truncated PNG the same when read."""
  rng = np.random.default_rng(0)
  _write_png(tmp_path / "cats" / "0.png", rng.integers(0, 256, (8, 8, 3), np.uint8))
  (tmp_path / "cats" / "1.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"folder dataset: .*cats/1\.jpg is not a readable "
                     r"image \(.*\); remove or replace it\.$"):
    data.load(f"folder:{tmp_path}", split="train", image_size=8, batch_size=1)
  (tmp_path / "cats" / "1.jpg").unlink()
  png = tmp_path / "cats" / "0.png"
  png.write_bytes(png.read_bytes()[:60])  # the header survives, the pixels do not
  with pytest.raises(ValueError, match=r"cats/0\.png is not a readable image"):
    list(data.load(f"folder:{tmp_path}", split="train", image_size=8, batch_size=1))
