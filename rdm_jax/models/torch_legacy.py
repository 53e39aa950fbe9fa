"""Reads PyTorch checkpoints into NumPy without importing torch, and without running code.

Handles both of torch.save's formats:
- the legacy format (torch < 1.6): pickled magic number, protocol version and system
  info, the pickled object whose tensors refer to storages by key, the list of storage
  keys, then each storage's raw bytes preceded by its int64 element count;
- the zip format (torch >= 1.6): `archive/data.pkl` plus one uncompressed file per storage.

A checkpoint is untrusted input. Every pickle in it, in both formats and at every position,
is read by `_SafeUnpickler`, an allowlist over pickle opcodes and globals (stricter than
`torch.load(weights_only=True)`):
- globals: `torch._utils._rebuild_tensor(_v2)`, `torch._utils._rebuild_parameter`, the
  `torch.<Type>Storage` classes of `_STORAGE_DTYPES` and `collections.OrderedDict`; classes of
  PyTorch Lightning (a `.ckpt` keys its `callbacks` by them) become their dotted names, inert
  strings that are never imported and that REDUCE and BUILD refuse; any other name is refused
  before it is looked up;
- REDUCE calls only those functions; BUILD is accepted only on an OrderedDict (torch puts a
  state dict's `_metadata` there; it is dropped); INST, OBJ, NEWOBJ_EX, the copyreg
  extension codes and out-of-band buffers are refused outright;
- TorchScript archives (`torch.jit.save`, e.g. OpenAI's CLIP `.pt` files) pickle each module
  as GLOBAL `__torch__.<class>`, NEWOBJ with no arguments, BUILD with a dict of attributes.
  Such a class becomes a `_ScriptClass` name (never imported); NEWOBJ is accepted only on one,
  with no arguments, and makes a `_ScriptObject` record; BUILD on a record only stores the
  dict. `load` returns records as plain dicts of their attributes (`script_state_dict`
  flattens them to a state dict); the archive's code/ folder is never read;
- persistent ids must be `('storage', <storage type>, key, location, numel)`, plus a sixth
  field `None` (no storage view) in the legacy format.
Tensor views are checked against their storage before anything is copied: offset, sizes and
strides are non-negative integers, the last element lies inside the storage, and no tensor
has more elements than its storage; storage sizes must equal the bytes the file holds, and
all tensors together may not exceed twice the stored bytes.

Memory and time are bounded by the file's size:
- keys that are hashed while unpickling (dict keys, set items, memo indices) must be str or
  small ints (|k| < 2**60, which hash to themselves): ints and floats that all hash alike, or
  tuples whose hash walks a shared structure, would make unpickling quadratic or exponential;
- the object is materialised once per distinct object (shared references stay shared), and
  what it would take as a tree (each node, each element, each tensor's bytes) is counted
  against `2 * stored bytes + 64 * pickle bytes + 1 MiB`: a pickle whose objects form a DAG
  (40 levels of one list referenced twice, under 1 KB) is refused, not walked 2**40 times;
- zip archives: members may not overlap, repeat, be encrypted or compressed, and together
  hold no more than the archive's size (`untrusted.zip_members`).
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from rdm_jax import untrusted
from rdm_jax.errors import UserError, fail

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_MAX_DEPTH = 64  # nesting of containers in a checkpoint object
_MAX_KEY = 1 << 60  # ints below this hash to themselves: no two keys collide
_NODE_BYTES = 64  # what one container or scalar counts for in the materialisation budget


class CheckpointError(ValueError):
  """A checkpoint that is malformed, or that asks for something a weights file never needs."""


class _GlobalName(str):
  """A class named by a PyTorch Lightning checkpoint (its `callbacks` dict is keyed by callback
  classes): kept as its dotted name, never imported, called or built."""


# Lightning checkpoints name these classes as dict keys; they unpickle as their names only.
_NAMED_ONLY_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric")


class _ScriptClass(str):
  """A TorchScript class name (`__torch__.<module>.<class>`): never imported or called."""


class _ScriptObject:
  """An instance of a TorchScript class in a `torch.jit.save` archive: its attributes only."""

  __slots__ = ("cls", "attrs")

  def __init__(self, cls: _ScriptClass):
    self.cls, self.attrs = cls, None


class _StorageType:
  """What `torch.FloatStorage` etc. unpickle to: only a dtype (not callable)."""

  __slots__ = ("dtype",)

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage declared by a persistent id: dtype, declared element count, bytes once read."""

  __slots__ = ("key", "dtype", "numel", "data")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None


class _LazyTensor:
  """A validated view (offset, size, stride in elements) into a storage whose bytes may be read
  after the pickle (legacy format)."""

  __slots__ = ("storage", "offset", "size", "stride", "numel")

  def __init__(
    self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
  ):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.numel = math.prod(size)

  def numpy(self) -> np.ndarray:
    data = self.storage.data
    if data is None or data.size != self.storage.numel:
      raise CheckpointError(f"storage {self.storage.key} is referenced but its data is missing")
    item = data.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
      data[self.offset :], shape=self.size, strides=[s * item for s in self.stride]
    ).copy()


def _is_int(x: Any) -> bool:
  return type(x) is int  # not bool, not float


def _rebuild_tensor(storage, offset, size, stride, *rest) -> _LazyTensor:
  """torch._utils._rebuild_tensor(_v2): a view, bounds-checked against the declared storage."""
  if type(storage) is not _Storage:
    raise CheckpointError("a tensor is rebuilt from something other than a storage")
  if not (
    _is_int(offset)
    and type(size) is tuple
    and type(stride) is tuple
    and len(size) == len(stride)
    and all(map(_is_int, size + stride))
  ):
    raise CheckpointError(
      f"tensor on storage {storage.key} has a malformed view "
      f"(offset {offset!r}, size {size!r}, stride {stride!r})"
    )
  if offset < 0 or min(size + stride, default=0) < 0:
    raise CheckpointError(f"tensor on storage {storage.key} has a negative offset, size or stride")
  numel = math.prod(size)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
  if last >= storage.numel or offset > storage.numel:
    raise CheckpointError(
      f"tensor {list(size)} (offset {offset}, stride {list(stride)}) reaches past the "
      f"end of storage {storage.key} ({storage.numel} elements)"
    )
  if numel > storage.numel:
    raise CheckpointError(
      f"tensor {list(size)} has {numel} elements but storage {storage.key} holds only "
      f"{storage.numel}; views larger than their storage are refused"
    )
  if rest[:1] and type(rest[0]) is not bool:  # requires_grad
    raise CheckpointError("malformed tensor (requires_grad is not a bool)")
  if len(rest) > 1 and rest[1]:  # backward hooks: code, never in a weights file
    raise CheckpointError("a tensor carries backward hooks")
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest) -> _LazyTensor:
  """torch._utils._rebuild_parameter: a Parameter is its tensor here."""
  if type(data) is not _LazyTensor or type(requires_grad) is not bool or backward_hooks or rest:
    raise CheckpointError("malformed parameter")
  return data


_GLOBALS = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
}
_CALLABLE = (_rebuild_tensor, _rebuild_parameter, collections.OrderedDict)

# Opcodes that only build data (or go through the checks below); everything else is refused.
_DATA_OPCODES = (
  "MARK STOP POP POP_MARK DUP FLOAT INT BININT BININT1 LONG BININT2 NONE PERSID BINPERSID STRING "
  "BINSTRING SHORT_BINSTRING UNICODE BINUNICODE APPEND GLOBAL DICT EMPTY_DICT APPENDS GET BINGET "
  "LONG_BINGET LIST EMPTY_LIST PUT BINPUT LONG_BINPUT SETITEM TUPLE EMPTY_TUPLE SETITEMS "
  "BINFLOAT PROTO TUPLE1 TUPLE2 TUPLE3 NEWTRUE NEWFALSE LONG1 LONG4 BINBYTES SHORT_BINBYTES "
  "SHORT_BINUNICODE BINUNICODE8 BINBYTES8 EMPTY_SET ADDITEMS FROZENSET STACK_GLOBAL MEMOIZE "
  "FRAME"
).split()
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in __import__("pickletools").opcodes}


def _hashable_key(k: Any) -> bool:
  """Keys whose hashes cannot be made to collide: str (randomised hashing), small ints, None,
  bool."""
  return isinstance(k, str) or k is None or (type(k) in (int, bool) and -_MAX_KEY < k < _MAX_KEY)


def _check_keys(keys) -> None:
  for k in keys:
    if not _hashable_key(k):
      raise CheckpointError(
        f"a dict key or set item of type {type(k).__name__} "
        f"({str(k)[:40]}); checkpoints key by str or small int"
      )


class _Dispatch(dict):
  def __missing__(self, code: int):
    name = _OPCODE_NAMES.get(code, f"unknown opcode {code:#x}")
    raise pickle.UnpicklingError(
      f"refusing pickle opcode {name} (it can construct arbitrary objects)"
    )


class _SafeUnpickler(
  pickle._Unpickler
):  # the pure-Python unpickler: its opcode table is ours to restrict
  """Unpickles only data, tensors, storages and OrderedDicts (see the module docstring)."""

  def __init__(self, file, storages: dict[str, _Storage], zip_storage=None):
    super().__init__(file)
    self.storages = storages
    self.zip_storage = zip_storage  # zip format: key -> bytes of the storage (checked)
    self.pid_length = 5 if zip_storage else 6  # the legacy format adds view metadata (always None)

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module.split(".")[0] in _NAMED_ONLY_MODULES:
      return _GlobalName(f"{module}.{name}")
    if module == "__torch__" or module.startswith("__torch__."):
      return _ScriptClass(f"{module}.{name}")
    raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint")

  def load_setitem(self):
    _check_keys(self.stack[-2:-1])
    pickle._Unpickler.load_setitem(self)

  def load_setitems(self):  # the items since the mark are self.stack
    _check_keys(self.stack[0::2])
    pickle._Unpickler.load_setitems(self)

  def load_dict(self):
    _check_keys(self.stack[0::2])
    pickle._Unpickler.load_dict(self)

  def load_additems(self):
    _check_keys(self.stack)
    pickle._Unpickler.load_additems(self)

  def load_frozenset(self):
    _check_keys(self.stack)
    pickle._Unpickler.load_frozenset(self)

  def load_put(self):
    i = self.readline()[:-1]
    if not i.isdigit() or len(i) > 10:
      raise CheckpointError("malformed memo index")
    self.memo[int(i)] = self.stack[-1]

  def load_reduce(self):
    args = self.stack.pop()
    func = self.stack[-1]
    if not any(func is f for f in _CALLABLE) or type(args) is not tuple:
      raise pickle.UnpicklingError(f"refusing to call {func!r} while unpickling a checkpoint")
    self.stack[-1] = func(*args)

  def load_newobj(self):
    args = self.stack.pop()
    cls = self.stack[-1]
    if type(cls) is not _ScriptClass or args != ():
      raise pickle.UnpicklingError(
        f"refusing to construct {str(cls)[:100]} while unpickling a checkpoint"
      )
    self.stack[-1] = _ScriptObject(cls)

  def load_build(self):
    state = self.stack.pop()
    if (
      type(self.stack[-1]) is _ScriptObject
    ):  # a TorchScript module's attributes: stored, nothing set
      if type(state) is not dict or self.stack[-1].attrs is not None:
        raise pickle.UnpicklingError("malformed TorchScript object state")
      self.stack[-1].attrs = state
      return
    # otherwise only an OrderedDict's attributes (torch's _metadata), dropped
    if type(self.stack[-1]) is not collections.OrderedDict:
      raise pickle.UnpicklingError(f"refusing to set the state of {type(self.stack[-1]).__name__}")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (
      type(pid) is tuple
      and len(pid) == self.pid_length
      and pid[0] == "storage"
      and type(pid[1]) is _StorageType
      and type(pid[2]) is str
      and _STORAGE_KEY.fullmatch(pid[2])
      and type(pid[3]) is str
      and _is_int(pid[4])
      and pid[4] >= 0
      and pid[5:] in ((), (None,))
    ):
      raise pickle.UnpicklingError(
        f"refusing persistent id {str(pid)[:100]} (not a plain torch storage)"
      )
    _, storage_type, key, _location, numel = pid[:5]
    if key in self.storages:
      storage = self.storages[key]
      if storage.dtype != storage_type.dtype or storage.numel != numel:
        raise CheckpointError(f"storage {key} is declared twice with different types or sizes")
      return storage
    storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
    if self.zip_storage is not None:
      storage.data = np.frombuffer(
        self.zip_storage(key, storage.dtype.itemsize * numel), dtype=storage.dtype
      )
    return storage


dispatch = _Dispatch(
  {getattr(pickle, n)[0]: pickle._Unpickler.dispatch[getattr(pickle, n)[0]] for n in _DATA_OPCODES}
)
dispatch[pickle.REDUCE[0]] = _SafeUnpickler.load_reduce
dispatch[pickle.BUILD[0]] = _SafeUnpickler.load_build
dispatch[pickle.NEWOBJ[0]] = _SafeUnpickler.load_newobj
for _name, _method in (
  ("SETITEM", "load_setitem"),
  ("SETITEMS", "load_setitems"),
  ("DICT", "load_dict"),
  ("ADDITEMS", "load_additems"),
  ("FROZENSET", "load_frozenset"),
  ("PUT", "load_put"),
):
  dispatch[getattr(pickle, _name)[0]] = getattr(_SafeUnpickler, _method)
_SafeUnpickler.dispatch = dispatch
del dispatch


class _Bounded(io.RawIOBase):
  """A read-only view of bytes [start, end) of a file: reads never allocate past its end."""

  def __init__(self, f, end: int):
    super().__init__()
    self.f, self.end = f, end

  def readable(self) -> bool:
    return True

  def _left(self) -> int:
    return max(0, self.end - self.f.tell())

  def readinto(self, b) -> int:
    n = min(len(b), self._left())
    data = self.f.read(n)
    b[: len(data)] = data
    return len(data)

  def read(self, n: int = -1) -> bytes:
    return self.f.read(self._left() if n is None or n < 0 else min(n, self._left()))

  def readline(self, n: int = -1) -> bytes:
    return self.f.readline(self._left() if n is None or n < 0 else min(n, self._left()))


class _Materializer:
  """Tensors -> arrays, containers rebuilt, anything else refused; each distinct object once.

  Shared objects stay shared, but every reference counts what the object takes as a tree
  against the budget, so neither this walk nor a caller walking the result can be made
  exponential by a small file.
  """

  def __init__(self, budget: int):
    self.left = budget
    self.memo: dict[int, tuple[Any, int]] = {}  # id -> (result, tree cost)
    self.active: set[int] = set()

  def __call__(self, obj: Any) -> Any:
    result, cost = self._convert(obj, 0)
    self._charge(cost)
    return result

  def _charge(self, cost: int) -> None:
    if cost > self.left:
      raise CheckpointError(
        "its objects and tensors together are much larger than the data stored in the file "
        "(shared objects or views repeated)"
      )

  def _convert(self, obj: Any, depth: int) -> tuple[Any, int]:
    if id(obj) in self.memo:
      return self.memo[id(obj)]
    if depth > _MAX_DEPTH or id(obj) in self.active:
      raise CheckpointError("the checkpoint object nests too deeply or refers to itself")
    self.active.add(id(obj))
    out = self._build(obj, depth)
    self.active.discard(id(obj))
    self._charge(out[1])
    self.memo[id(obj)] = out
    return out

  def _children(self, items, depth: int) -> tuple[list, int]:
    out, cost = [], 0
    for item in items:
      value, c = self._convert(item, depth + 1)
      out.append(value)
      cost += c
      self._charge(cost)
    return out, cost

  def _build(self, obj: Any, depth: int) -> tuple[Any, int]:
    if type(obj) is _LazyTensor:
      nbytes = obj.numel * obj.storage.dtype.itemsize
      self._charge(nbytes)
      return obj.numpy(), nbytes + _NODE_BYTES
    if isinstance(obj, dict) and type(obj) in (dict, collections.OrderedDict):
      if not all(type(k) in (str, int, _GlobalName) for k in obj):
        raise CheckpointError("a dict in the checkpoint has keys other than str or int")
      values, cost = self._children(obj.values(), depth)
      keys = [str(k) if type(k) is _GlobalName else k for k in obj]
      return type(obj)(zip(keys, values)), cost + _NODE_BYTES * (1 + len(keys))
    if type(obj) in (list, tuple):
      values, cost = self._children(obj, depth)
      return type(obj)(values), cost + _NODE_BYTES * (1 + len(values))
    if obj is None or type(obj) in (bool, int, float):
      return obj, _NODE_BYTES
    if type(obj) in (str, bytes, _GlobalName):
      return (str(obj) if type(obj) is _GlobalName else obj), _NODE_BYTES + len(obj)
    if type(obj) is _ScriptObject:  # a TorchScript module: the dict of its attributes
      return self._convert(obj.attrs or {}, depth + 1)
    raise CheckpointError(f"unexpected {type(obj).__name__} in the checkpoint object")


def _member(zf: zipfile.ZipFile, name: str, size: int | None = None) -> bytes:
  """An uncompressed zip member (torch writes them so), its declared size checked before reading."""
  try:
    info = zf.getinfo(name)
  except KeyError:
    raise CheckpointError(f"the archive has no {name}") from None
  if info.compress_type != zipfile.ZIP_STORED:
    raise CheckpointError(
      f"{name} is compressed; torch.save writes uncompressed archives (re-save it)"
    )
  if size is not None and info.file_size != size:
    raise CheckpointError(f"{name} holds {info.file_size} bytes but its tensors declare {size}")
  return zf.read(info)


def _load_zip(f, size: int) -> tuple[Any, dict[str, _Storage], int]:
  with zipfile.ZipFile(f) as zf:
    untrusted.zip_members(zf, "", size)
    names = zf.namelist()
    root = names[0].split("/")[0] if names else ""
    byteorder = f"{root}/byteorder"
    if byteorder in names and _member(zf, byteorder).strip() not in (b"little", b""):
      raise CheckpointError("it was saved on a big-endian machine; not supported")
    data_pkl = _member(zf, f"{root}/data.pkl")
    storages: dict[str, _Storage] = {}
    obj = _SafeUnpickler(
      io.BytesIO(data_pkl), storages, lambda key, nbytes: _member(zf, f"{root}/data/{key}", nbytes)
    ).load()
    return obj, storages, len(data_pkl)


def _load_legacy(raw, size: int) -> tuple[Any, dict[str, _Storage], int]:
  raw.seek(0)  # zipfile.is_zipfile moved it
  f = _Bounded(raw, size)
  storages: dict[str, _Storage] = {}
  if _SafeUnpickler(f, {}).load() != _LEGACY_MAGIC:
    raise CheckpointError("it is not a torch checkpoint (bad magic number)")
  protocol = _SafeUnpickler(f, {}).load()
  sys_info = _SafeUnpickler(f, {}).load()
  if not _is_int(protocol) or type(sys_info) is not dict:
    raise CheckpointError("malformed header")
  if not sys_info.get("little_endian", True):
    raise CheckpointError("it was saved on a big-endian machine; not supported")
  start = raw.tell()
  obj = _SafeUnpickler(f, storages).load()
  pickle_bytes = raw.tell() - start
  keys = _SafeUnpickler(f, {}).load()
  if type(keys) is not list or sorted(map(str, keys)) != sorted(storages):
    raise CheckpointError("its list of stored storages does not match the storages its tensors use")
  for key in keys:
    header = raw.read(8)
    if len(header) != 8:
      raise CheckpointError(f"it is truncated (no data for storage {key})")
    (numel,) = struct.unpack("<q", header)
    storage = storages[key]
    if numel != storage.numel:
      raise CheckpointError(
        f"storage {key} holds {numel} elements but its tensors declare {storage.numel}"
      )
    nbytes = numel * storage.dtype.itemsize
    if nbytes > size - raw.tell():
      raise CheckpointError(
        f"it is truncated (storage {key} needs {nbytes} bytes, {size - raw.tell()} are left)"
      )
    storage.data = np.frombuffer(raw.read(nbytes), dtype=storage.dtype)
  return obj, storages, pickle_bytes


def script_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """The arrays of a nested dict (as `load` returns a TorchScript archive's modules) keyed by
  dotted path, as `module.state_dict()` names them; other attributes are left out."""
  out: dict[str, np.ndarray] = {}
  for k, v in obj.items():
    if isinstance(v, np.ndarray):
      out[prefix + str(k)] = v
    elif isinstance(v, dict):
      out.update(script_state_dict(v, f"{prefix}{k}."))
  return out


def load(path: str) -> Any:
  """Loads a torch checkpoint (legacy or zip format) with tensors as np.ndarray.

  Raises CheckpointError for any file that is malformed or asks for more than tensors and
  plain containers (see the module docstring); nothing in the file is ever executed.
  """
  try:
    with untrusted.open_regular(path) as f:
      size = os.fstat(f.fileno()).st_size
      obj, storages, pickle_bytes = (
        _load_zip(f, size) if zipfile.is_zipfile(f) else _load_legacy(f, size)
      )
    stored = sum(s.numel * s.dtype.itemsize for s in storages.values())
    return _Materializer(2 * stored + _NODE_BYTES * pickle_bytes + (1 << 20))(obj)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  except UserError as e:
    raise CheckpointError(str(e)) from None
  except (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    zipfile.BadZipFile,
    RecursionError,
    MemoryError,
    UnicodeDecodeError,
    RuntimeError,
    NotImplementedError,
    OverflowError,
    OSError,
    zlib.error,
  ) as e:
    raise CheckpointError(
      f"{path}: refused or unreadable ({type(e).__name__}: {str(e)[:200]})"
    ) from None


def load_weights(path: str, what: str, hint: str) -> Any:
  """`load` for a job: a missing file or a refused one is one line (a UserError) naming `what`
  and, for a missing file, `hint` (what to give instead)."""
  if not path or not os.path.isfile(path):
    fail(f"{what}: weights file {path!r} not found; {hint}")
  try:
    return load(path)
  except CheckpointError as e:
    fail(f"{what}: refused {e}")


@contextlib.contextmanager
def converting(path: str, what: str) -> Iterator[None]:
  """Turns what a conversion of loaded weights raises on values of the wrong kind (a 0-d or empty
  tensor where a kernel or a schedule belongs, a str where a tensor does) into one line."""
  try:
    yield
  except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
    fail(f"{what}: {path} does not hold the weights of one ({type(e).__name__}: {str(e)[:200]})")
