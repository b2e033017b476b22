"""Weight files to numpy: the one reader of torch-style state dicts in fsjax.

* ``.safetensors`` (memory-mapped, bfloat16 included -- ``safetensors.numpy`` refuses it)
  and sharded ``*.safetensors.index.json``;
* PyTorch pickles (``.pt``, ``.bin``, ``.pth``, sharded ``pytorch_model.bin.index.json``)
  through the restricted unpickler :mod:`fsjax.torch_pickle`: numpy only, never arbitrary
  pickle code.

Every error names the file. :func:`hf_directory` is the one reader of a Hugging Face
checkpoint directory (CLIP, LLaVA, MPT): path resolution (``~``, a cache repository
folder -> its snapshot), ``config.json`` and the first weight file present.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from fsjax import torch_pickle

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Memory-maps a ``.safetensors`` file: an 8-byte header size, a JSON header, the data.

  Read by hand because ``safetensors.numpy`` refuses bfloat16, the dtype of MPT-7B.
  """
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      if size > os.path.getsize(path) - 8:
        raise ValueError(f"its header claims {size} bytes, more than the file holds")
      header = json.loads(f.read(size))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                     "or corrupt: copy or download it again.") from e
  data = np.memmap(path, np.uint8, mode="r", offset=8 + size)
  state = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which fsjax does not "
                       f"read (known: {sorted(_SAFETENSORS_DTYPES)}).")
    lo, hi = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    state[name] = data[lo:hi].view(dtype).reshape(info["shape"])
  return state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch-style state dict (name -> numpy array) from one weight file or index.

  ``.safetensors`` files (memory-mapped, bfloat16 included) and their shard indexes;
  pickles (``.pt``, ``.bin``, ``.pth``) with :func:`fsjax.torch_pickle.load`. A
  ``state_dict`` / ``model_state_dict`` wrapper and DDP ``module.`` prefixes are removed.
  """
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
    return state
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  obj = torch_pickle.load(path)
  for key in ("model_state_dict", "state_dict"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
  return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def resolve(path: str | os.PathLike, *, what: str) -> str:
  """Expands ``~``; maps a Hugging Face cache repository folder to its current snapshot.

  Args:
    path: a file, a directory, or a cache folder (``models--org--name`` with
      ``snapshots/`` and ``refs/main``).
    what: how the error names the path (e.g. ``"CLIP checkpoint path"``).

  Raises:
    ValueError: the path does not exist, or a cache folder has several snapshots and no
      ``refs/main``.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise ValueError(f"{what} {path!r} does not exist. Pass a local directory in Hugging "
                     "Face layout (config.json + model.safetensors) or a weight file; "
                     "nothing is ever downloaded.")
  snapshots = os.path.join(path, "snapshots")
  if os.path.isdir(snapshots) and not os.path.exists(os.path.join(path, "config.json")):
    ref = os.path.join(path, "refs", "main")
    if os.path.exists(ref):
      with open(ref) as f:
        return os.path.join(snapshots, f.read().strip())
    names = sorted(os.listdir(snapshots))
    if len(names) != 1:
      raise ValueError(f"Hugging Face cache folder {path} has {len(names)} snapshots and no "
                       "refs/main; pass the snapshot directory itself.")
    return os.path.join(snapshots, names[0])
  return path


@dataclasses.dataclass(frozen=True)
class HFDirectory:
  """A Hugging Face checkpoint directory, read: see :func:`hf_directory`.

  Attributes:
    path: the resolved directory.
    config: ``config.json`` as a dict.
    config_file: its path (for errors that name it).
    weights: the first weight file of the caller's list that is present.
  """

  path: str
  config: dict[str, Any]
  config_file: str
  weights: str


def hf_directory(path: str | os.PathLike, *, what: str,
                 weight_files: Sequence[str]) -> HFDirectory:
  """Reads a Hugging Face checkpoint directory: ``config.json`` plus a weight file.

  Args:
    path: the directory (or cache folder; :func:`resolve`).
    what: the model in errors, e.g. ``"CLIP"``, ``"LLaVA"``, ``"MPT"``.
    weight_files: the weight file names, in order of preference.

  Raises:
    ValueError: naming the path: it does not exist, is not a directory with
      ``config.json``, or holds none of ``weight_files``.
  """
  path = resolve(path, what=f"{what} checkpoint path")
  config_file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(config_file):
    raise ValueError(f"{path} is not a Hugging Face {what} directory: it needs config.json "
                     f"and one of {list(weight_files)}.")
  with open(config_file) as f:
    config = json.load(f)
  weights = next((os.path.join(path, w) for w in weight_files
                  if os.path.exists(os.path.join(path, w))), None)
  if weights is None:
    raise ValueError(f"{what} directory {path} has config.json but none of the weight files "
                     f"{list(weight_files)}.")
  return HFDirectory(path=path, config=config, config_file=config_file, weights=weights)
