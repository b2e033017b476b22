"""Orbax checkpoints of the trainers and of what they store (GSB, heads): save every k steps, resume from the latest.

One ``CheckpointManager`` per stage folder (``workdir/<name>``), saving a pytree with
``StandardSave`` and restoring it with ``StandardRestore`` against the structure of a
freshly initialised state, as flax's gemma example does.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, name: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager for stage ``name`` under ``workdir`` (created if missing)."""
  path = os.path.join(os.path.abspath(workdir), name)
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> None:
  """Saves ``state`` at ``step`` (asynchronously; :func:`close` or the next save waits)."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any]:
  """``(step, state)`` from the latest checkpoint, or ``(0, like)`` when there is none.

  Args:
    mngr: the stage's manager.
    like: a state of the right structure, shapes and dtypes (e.g. a fresh init).
  """
  step = mngr.latest_step()
  if step is None:
    return 0, like
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def close(mngr: ocp.CheckpointManager) -> None:
  mngr.wait_until_finished()
  mngr.close()
