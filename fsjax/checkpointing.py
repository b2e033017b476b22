"""Orbax checkpoints of the trainers and of what they store (GSB, heads): save every k steps, resume from the latest.

One ``CheckpointManager`` per stage folder (``workdir/<name>``), saving a pytree with
``StandardSave`` and restoring it with ``StandardRestore`` against the structure of a
freshly initialised state, as flax's gemma example does.

What a person meets, in one line each (never an orbax/TensorStore traceback):

* a checkpoint that cannot be read (a truncated file, a half-copied folder) is a
  :class:`DamagedCheckpointError` naming the step folder and the fix;
* :func:`lock_workdir`: one writer per workdir; a second trainer on the same folder is
  refused with the pid and host of the one that holds it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

LOCK_FILE = ".lock"


class DamagedCheckpointError(ValueError):
  """A checkpoint folder exists but cannot be read back (truncated or missing files)."""


class WorkdirLockedError(ValueError):
  """Another process is writing into the same workdir."""


def manager(workdir: str, name: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager for stage ``name`` under ``workdir`` (created if missing)."""
  path = os.path.join(os.path.abspath(workdir), name)
  # One item, one handler: its metadata can be read back without a target tree.
  return ocp.CheckpointManager(
      path, item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> None:
  """Saves ``state`` at ``step`` (asynchronously; :func:`close` or the next save waits)."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def _cause(error: BaseException) -> str:
  """The first line of an error, short enough for a one-line message."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  text = lines[0] if lines else type(error).__name__
  text = text.split(" See full TensorStore details")[0].rstrip(".")
  return text if len(text) <= 160 else text[:157] + "..."


def damaged(path: str | os.PathLike[str], error: BaseException, *, what: str,
            fix: str) -> DamagedCheckpointError:
  """The one-line error for checkpoint folder ``path`` that could not be read."""
  return DamagedCheckpointError(
      f"{what} {path} cannot be read ({_cause(error)}): it is damaged or incomplete. "
      f"Delete {path} and {fix}")


@contextlib.contextmanager
def _stderr_into(file) -> Iterator[None]:
  """Points file descriptor 2 (Python's and C++'s stderr) at ``file`` while inside."""
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(file.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _read(restore, path, *, what: str, fix: str):
  """``restore()``, or :func:`damaged`'s one line when the checkpoint cannot be read.

  A damaged file fails many concurrent TensorStore reads at once; the ones still in
  flight when orbax gives up raise "Event loop is closed" from their threads (hundreds of
  lines of unraisable-exception tracebacks). So stderr and unraisable exceptions are held
  while reading: passed on as they were when the read succeeds, dropped (once the
  stragglers are done) when it failed.
  """
  unraisable, previous_hook = [], sys.unraisablehook
  with tempfile.TemporaryFile() as held:
    failed = None
    sys.unraisablehook = unraisable.append  # the stragglers' "Event loop is closed"
    try:
      with _stderr_into(held):
        try:
          value = restore()
        except Exception as e:  # pylint: disable=broad-except
          failed = e
          noise = lambda: (os.fstat(held.fileno()).st_size, len(unraisable))
          seen, deadline = None, time.monotonic() + 3.0
          while seen != noise() and time.monotonic() < deadline:  # until they are done
            seen = noise()
            time.sleep(0.2)
    finally:
      sys.unraisablehook = previous_hook
    if failed is not None:
      raise damaged(path, failed, what=what, fix=fix) from failed
    held.seek(0)
    sys.stderr.write(held.read().decode(errors="replace"))
    sys.stderr.flush()
    for u in unraisable:  # a successful read hides nothing
      previous_hook(u)
    return value


def restore_latest(mngr: ocp.CheckpointManager, like: Any, *, what: str = "checkpoint",
                   fix: str = "rerun the same command to resume from the previous "
                   "checkpoint.") -> tuple[int, Any]:
  """``(step, state)`` from the latest checkpoint, or ``(0, like)`` when there is none.

  Args:
    mngr: the stage's manager.
    like: a state of the right structure, shapes and dtypes (e.g. a fresh init).
    what: the noun of the error message ("GSB denoiser checkpoint").
    fix: the end of the error's sentence, after "Delete <folder> and".

  Raises:
    DamagedCheckpointError: the latest checkpoint cannot be read.
  """
  step = mngr.latest_step()
  if step is None:
    return 0, like
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return step, _read(lambda: mngr.restore(step, args=ocp.args.StandardRestore(abstract)),
                     step_dir(mngr, step), what=what, fix=fix)


def restore_as_saved(mngr: ocp.CheckpointManager, step: int, *, sharding=None,
                     what: str = "checkpoint", fix: str = "rerun the command that wrote "
                     "it.") -> Any:
  """The tree saved at ``step``, without a target: shapes and dtypes from orbax's metadata.

  Args:
    mngr: a manager of the folder.
    step: the step to read.
    sharding: where the arrays go; default: one local device, whatever sharding they
      were saved with.
    what, fix: as in :func:`restore_latest`.

  Raises:
    DamagedCheckpointError: the checkpoint cannot be read.
  """
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def restore():
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        mngr.item_metadata(step).tree,
        is_leaf=lambda m: isinstance(m, ocp.metadata.ArrayMetadata))
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))

  return _read(restore, step_dir(mngr, step), what=what, fix=fix)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """The folder of checkpoint ``step``."""
  return pathlib.Path(mngr.directory) / str(step)


def keep_only(mngr: ocp.CheckpointManager, step: int) -> None:
  """Deletes every checkpoint of ``mngr`` but ``step`` (a finished stage needs one)."""
  mngr.wait_until_finished()
  for s in mngr.all_steps():
    if s != step:
      mngr.delete(s)


def close(mngr: ocp.CheckpointManager) -> None:
  mngr.wait_until_finished()
  mngr.close()


def _holder(path: pathlib.Path) -> str:
  try:
    h = json.loads(path.read_text())
    return (f"{h['program']} (pid {h['pid']} on host {h['host']}, since "
            f"{h['since']})")
  except Exception:  # pylint: disable=broad-except  (being written, or foreign)
    return "another process"


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike[str], program: str) -> Iterator[None]:
  """One writer per workdir: holds ``workdir/.lock`` (an OS file lock) while inside.

  The OS releases the lock when the holder exits, even by kill -9, so a stale lock
  never blocks a rerun; the file only says who holds it (program, pid, host, start).

  Raises:
    WorkdirLockedError: another process holds the workdir.
  """
  path = pathlib.Path(workdir) / LOCK_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise WorkdirLockedError(
        f"workdir {pathlib.Path(workdir)} is in use by {_holder(path)}: two writers would "
        "corrupt its checkpoints. Wait for it to finish (or stop it), or use another "
        "--workdir.") from None
  try:
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"program": program, "pid": os.getpid(),
                             "host": socket.gethostname(), "since": since}).encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      path.unlink()
    os.close(fd)  # releases the lock
