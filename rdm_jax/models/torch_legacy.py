"""Reads PyTorch checkpoints into NumPy without importing torch.

Handles both of torch.save's formats:
- the legacy format (torch < 1.6): pickled magic number, protocol version and system
  info, the pickled object whose tensors refer to storages by key, the list of storage
  keys, then each storage's raw bytes preceded by its int64 element count;
- the zip format (torch >= 1.6): `archive/data.pkl` plus one file per storage.
Only tensors, OrderedDicts and plain Python containers are rebuilt: a restricted
unpickler refuses any other class, so a checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  def __init__(self, dtype: np.dtype):
    self.dtype = dtype
    self.data: np.ndarray | None = None


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> "_LazyTensor":
  return _LazyTensor(storage, offset, tuple(size), tuple(stride))


class _LazyTensor:
  """A tensor view whose storage bytes are read after the pickle (legacy format)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def numpy(self) -> np.ndarray:
    data = self.storage.data
    item = data.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=[s * item for s in self.stride]).copy()


class _Unpickler(pickle.Unpickler):
  def __init__(self, f, storages: dict[str, _Storage], load_storage=None):
    super().__init__(f)
    self.storages = storages
    self.load_storage = load_storage

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint")

  def persistent_load(self, pid):
    typename, storage_type, key, _location, numel = pid[:5]
    if typename != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {typename}")
    if key not in self.storages:
      self.storages[key] = _Storage(storage_type.dtype)
      if self.load_storage is not None:
        self.storages[key].data = self.load_storage(key, storage_type.dtype, numel)
    return self.storages[key]


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def load(path: str) -> Any:
  """Loads a torch checkpoint (legacy or zip format) with tensors as np.ndarray."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      root = zf.namelist()[0].split("/")[0]
      def read_storage(key, dtype, numel):
        return np.frombuffer(zf.read(f"{root}/data/{key}"), dtype=dtype)
      obj = _Unpickler(io.BytesIO(zf.read(f"{root}/data.pkl")), {}, read_storage).load()
      return _materialize(obj)
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a torch checkpoint (bad magic number)")
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
      raise ValueError(f"{path} was saved on a big-endian machine; not supported")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
      (numel,) = struct.unpack("<q", f.read(8))
      storage = storages[key]
      storage.data = np.frombuffer(f.read(numel * storage.dtype.itemsize), dtype=storage.dtype)
      if storage.data.size != numel:
        raise ValueError(f"{path} is truncated (storage {key} has {storage.data.size} of {numel} elements)")
  return _materialize(obj)
