"""Shared fixtures: a tiny deterministic encoder for the smoothing and certify tests."""

import atexit
import dataclasses
import os
import re
import shutil
import signal
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A suite started in the background (`nohup`, `cmd &` in a script) inherits SIGINT as
# ignored, and fsjax rightly leaves an ignored Ctrl-C alone: the tests of its Ctrl-C
# handling would then see nothing. They test fsjax, not the caller's shell, so every test
# process (xdist workers included; the programs they start inherit a handled SIGINT as the
# default) gets Python's own handler back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


def _pin_xdist_worker() -> None:
  """Under ``pytest -n N``, worker k runs on CPU k (mod the CPUs it may use), before jax
  starts: XLA's CPU thread pool is sized by the process's CPU affinity, so each worker gets a
  one-thread pool instead of N workers' pools of N threads each on N cores. Programs the
  tests start as subprocesses inherit it."""
  worker = os.environ.get("PYTEST_XDIST_WORKER", "")
  if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
    return
  cpus = sorted(os.sched_getaffinity(0))
  count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", len(cpus)))
  if count > len(cpus):  # more workers than CPUs: leave the OS to share them
    return
  os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})


def _share_compilations() -> None:
  """One persistent XLA compilation cache for the whole session, made by the process that
  starts first (pytest, or xdist's controller) before jax loads: the xdist workers and
  every program a test starts (``python -m train.gsb``, the two processes of a pod run)
  inherit it, so a computation compiled once is loaded, not compiled, by every other
  process (the subprocess tests compile what the in-process tests already did). A
  ``JAX_COMPILATION_CACHE_DIR`` set by the user is kept."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
    return
  path = tempfile.mkdtemp(prefix="fsjax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, path, ignore_errors=True)


def _compile_faster() -> None:
  """LLVM at -O1 instead of XLA's default -O3 for every process of the session (inherited
  like the cache): the suite is compile-bound (tiny models, hundreds of programs), and -O1
  compiles them in about a third of the time while the tiny models run as fast. Results
  differ from -O3 by float32 rounding only (vectorisation and contraction change the order
  of some sums: certify.run on clip_tiny, deficits ~1e-5 differ by ~4e-8, radii by 5e-4),
  and each test compares runs made under the same flags. (-O0 runs the Monte Carlo tests
  up to 2x slower.) A ``--xla_backend_optimization_level`` the user set is kept."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=1").strip()


_pin_xdist_worker()
_share_compilations()
_compile_faster()

import jax
import numpy as np
from PIL import Image
import jax.numpy as jnp
import pytest

from fsjax import encoders


@dataclasses.dataclass(frozen=True, eq=False)
class ToyEncoder(encoders.Encoder):
  """A two-layer tanh network on 8x8 images: smooth, cheap, and not too robust."""

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution)
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])
    return ((h @ params["w2"]) + params["b"])[:, None, :]


def toy_params(seed: int = 0, dim: int = 16, offset: float = 2.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w1": jax.random.normal(k1, (8 * 8 * 3, 32)) / 10.0,
          "w2": jax.random.normal(k2, (32, dim)),
          "b": offset * jnp.ones((dim,))}


@pytest.fixture(scope="session")
def toy():
  """``(encoder, params)`` of the toy encoder."""
  return ToyEncoder(resolution=8), toy_params()


def _make_folder_dataset(root, *, classes=3, per_split=(("train", 4), ("test", 2)), seed=0):
  """Class-coloured 32 px PNGs under ``root/<split>/<class>/``: easy to separate."""
  rng = np.random.default_rng(seed)
  colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]])
  for split, count in per_split:
    for c in range(classes):
      folder = root / split / f"class_{c}"
      folder.mkdir(parents=True)
      for i in range(count):
        img = np.clip(colours[c] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
  return root


@pytest.fixture(scope="session")
def make_folder_dataset():
  """``make_folder_dataset(root, classes=3, per_split=...)``: a tiny class-coloured image folder."""
  return _make_folder_dataset


# A module- or class-scoped fixture in a test file: xdist should keep the file on one worker.
_SHARED_FIXTURE = re.compile(r"""scope\s*=\s*["'](?:module|class|package)["']""")


# The files that take longest (``--durations``; 40-210 s of one worker each), handed out
# first, longest first, so that no worker starts one of them while the other is nearly done.
_LONGEST_FILES = (
    "tests/test_entry_points.py", "tests/certify/test_run.py", "tests/test_pod.py",
    "tests/train/test_gsb.py", "tests/certify/test_sequential.py",
    "tests/certify/test_protection.py", "tests/certify/test_feature.py",
    "tests/train/test_llava.py", "tests/fsjax/test_llava.py", "tests/fsjax/test_gsb.py",
    "tests/certify/test_smoothed_prediction.py", "tests/certify/test_verify.py")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config, log):
  """``-n N`` (pyproject's addopts: ``--dist loadgroup``): the tests of a file that defines a
  module- or class-scoped fixture (a trained booster, a results folder) run on one worker,
  so that the fixture is built once, not once per worker that gets one of its tests. These
  files are handed out first (:data:`_LONGEST_FILES` first, then by number of tests); every
  other test is scheduled on its own, so that the workers finish together. (``xdist_group`` marks are honoured too, where
  pytest-xdist still can: pytest 9.2 drops them, pytest-dev/pytest-xdist#1386.)"""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=g-import-not-at-top

  root, shared = config.rootpath, {}

  def file_is_shared(path):
    if path not in shared:
      try:
        shared[path] = bool(_SHARED_FIXTURE.search((root / path).read_text()))
      except OSError:
        shared[path] = False
    return shared[path]

  class FileGroupScheduling(LoadGroupScheduling):

    def _split_scope(self, nodeid):
      path = nodeid.split("::", 1)[0]
      return path if file_is_shared(path) else super()._split_scope(nodeid)

    def _assign_work_unit(self, node):
      if not getattr(self, "_ordered", False):  # once, before the first unit is handed out
        first = {path: i for i, path in enumerate(_LONGEST_FILES)}
        units = sorted(self.workqueue.items(),
                       key=lambda unit: (first.get(unit[0].split("::", 1)[0], len(first)),
                                         -len(unit[1])))
        self.workqueue.clear()
        self.workqueue.update(units)
        self._ordered = True
      super()._assign_work_unit(node)

  return FileGroupScheduling(config, log)
