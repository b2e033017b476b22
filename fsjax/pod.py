"""Multi-process ("pod") runs: starting the JAX runtime, one writer, exchanging results.

A pod run is one command per process (host), all with the same config and workdir. The
processes find each other through a coordinator, named by the standard variables

  JAX_COORDINATOR_ADDRESS=10.0.0.1:1234   # process 0's address and a free port
  JAX_NUM_PROCESSES=2                     # how many processes
  JAX_PROCESS_ID=0                        # this process: 0 .. JAX_NUM_PROCESSES - 1

(:func:`initialize`; on a TPU pod, Slurm or Open MPI, where JAX detects the cluster
itself, none is needed: ``--config.certify.distributed=True`` is enough). Every program
started through :func:`fsjax.cli.run` with ``JAX_COORDINATOR_ADDRESS`` set joins the
pod before anything else touches JAX.

Two processes on one machine make a pod too (CPU collectives over gloo, a localhost
coordinator: how ``tests/test_pod.py`` checks the pod paths).

What the programs do with it: process 0 is the one writer (:func:`is_writer`: rows,
tables, figures, config, metrics); the others compute their share and hand their results
to it (:func:`gather_bytes`); a decision only process 0 can make (what a workdir already
holds) reaches every process by :func:`broadcast`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

ADDRESS, COUNT, INDEX = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def requested() -> bool:
  """Whether the environment names a coordinator (``JAX_COORDINATOR_ADDRESS``)."""
  return bool(os.environ.get(ADDRESS, "").strip())


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def initialize() -> None:
  """Joins the pod (``jax.distributed.initialize``) unless this process already has.

  With ``JAX_COORDINATOR_ADDRESS`` set, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  must be set too; without it, JAX detects the cluster (TPU pods, Slurm, Open MPI). CPU
  collectives go over gloo (what a multi-process CPU run needs; accelerators are not
  affected). Call it before anything runs on a device.

  Raises:
    ValueError: the variables are incomplete or out of range (one line, naming them).
  """
  if jax.distributed.is_initialized():
    return
  address, count, index = os.environ.get(ADDRESS, "").strip(), _env_int(COUNT), _env_int(INDEX)
  if address or count is not None or index is not None:
    if not address or count is None or index is None:
      missing = [n for n, v in ((ADDRESS, address), (COUNT, count), (INDEX, index))
                 if v in ("", None)]
      raise ValueError(f"a pod run needs {ADDRESS}, {COUNT} and {INDEX}; {', '.join(missing)} "
                       f"not set (e.g. {ADDRESS}=10.0.0.1:1234 {COUNT}=2 {INDEX}=0 on "
                       "process 0).")
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"{INDEX}={index} must be in 0 .. {COUNT} - 1 = {count - 1}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  else:
    try:
      jax.distributed.initialize()
    except ValueError as e:  # no cluster JAX knows (TPU pod, Slurm, Open MPI) around
      raise ValueError(f"no pod found to join ({e}): outside a TPU pod, Slurm or Open MPI "
                       f"set {ADDRESS}, {COUNT} and {INDEX} on every process.") from None


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0; True outside a pod)."""
  return jax.process_index() == 0


def broadcast(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process (itself outside a pod)."""
  if jax.process_count() == 1:
    return np.asarray(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def gather_bytes(data: bytes) -> list[bytes]:
  """Every process's ``data``, in process order, on every process (a collective: each
  process calls it once, in the same order)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data))))
  padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  parts = np.asarray(multihost_utils.process_allgather(padded))
  return [parts[i, :int(s)].tobytes() for i, s in enumerate(sizes.reshape(-1))]


def shard(items: list[Any]) -> list[Any]:
  """This process's share of ``items``: every ``process_count()``-th one, from its index."""
  return items[jax.process_index()::jax.process_count()]
