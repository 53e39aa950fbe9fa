"""Crafted torch checkpoints: nothing in them runs, and no view reads outside its storage.

Every file here is made in the test. The legacy writer below follows torch's legacy layout
(`torch/serialization.py`, `_legacy_save`); a well-formed one is checked against `torch.load`
first, so the malicious variants differ from a real checkpoint only where they attack.
Each attack tries to create a sentinel file; the test fails if it exists afterwards.
"""

import collections
import functools
import io
import os
import pickle
import struct
import subprocess
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rdm_jax.models import torch_legacy  # noqa: E402
from rdm_jax.models.torch_legacy import CheckpointError  # noqa: E402

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class StorageRef:
  def __init__(self, key, numel):
    self.key, self.numel, self.type = key, numel, torch.FloatStorage


class Tensor:
  """Pickles as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2, self.args)


class Call:
  """Pickles as a call of `func(*args)` (REDUCE); callable itself so it can be nested as a func."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __call__(self):
    raise AssertionError("never called here")

  def __reduce__(self):
    return (self.func, self.args)


class _Pickler(pickle.Pickler):
  legacy = True  # the legacy format's persistent ids carry a sixth field (view metadata, None)

  def persistent_id(self, obj):
    if isinstance(obj, StorageRef):
      return ("storage", obj.type, obj.key, "cpu", obj.numel) + ((None,) if self.legacy else ())
    return None


def dumps(obj, protocol=2, legacy=True) -> bytes:
  buf = io.BytesIO()
  pickler = _Pickler(buf, protocol=protocol)
  pickler.legacy = legacy
  pickler.dump(obj)
  return buf.getvalue()


def legacy_bytes(pickles: list[bytes], storages: dict[str, np.ndarray], numels: dict | None = None) -> bytes:
  """magic, protocol, sys_info, object, keys pickles, then each storage as <int64 numel><bytes>."""
  out = b"".join(pickles)
  for key, data in storages.items():
    out += struct.pack("<q", (numels or {}).get(key, data.size)) + data.tobytes()
  return out


def legacy_file(path, obj, storages, position=None, payload=None, numels=None, protocol=2):
  pickles = [dumps(MAGIC, protocol), dumps(1001, protocol), dumps(SYS_INFO, protocol), dumps(obj, protocol),
             dumps(list(storages), protocol)]
  if position is not None:
    pickles[position] = payload
  path.write_bytes(legacy_bytes(pickles, storages, numels))
  return str(path)


def zip_file(path, data_pkl: bytes, storages: dict[str, bytes], compress=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w", compression=compress) as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      zf.writestr(f"archive/data/{key}", data)
    zf.writestr("archive/version", "3\n")
  return str(path)


def a_state_dict():
  data = np.arange(12, dtype=np.float32)
  s = StorageRef("0", 12)
  obj = collections.OrderedDict(w=Tensor(s, 0, (3, 4), (4, 1)), wt=Tensor(s, 0, (4, 3), (1, 4)),
                                b=Tensor(s, 8, (4,), (1,)))
  expected = {"w": data.reshape(3, 4), "wt": data.reshape(3, 4).T, "b": data[8:]}
  return obj, {"0": data}, expected


def test_handmade_files_are_real_checkpoints(tmp_path):
  """The writers above produce what torch.load reads (both formats), and so does our reader."""
  obj, storages, expected = a_state_dict()
  legacy = legacy_file(tmp_path / "legacy.pth", obj, storages)
  zipped = zip_file(tmp_path / "zip.pth", dumps(obj, legacy=False), {k: v.tobytes() for k, v in storages.items()})
  for path in (legacy, zipped):
    ref = torch.load(path, weights_only=True)
    ours = torch_legacy.load(path)
    assert list(ours) == list(ref) == list(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(ref[key].numpy(), value)
      np.testing.assert_array_equal(ours[key], value)


def attacks(sentinel: str) -> dict[str, object]:
  """Objects whose unpickling would create `sentinel`."""
  cmd = f"touch {sentinel}"
  code = f"__import__('os').system({cmd!r})"
  import builtins
  import copyreg
  return {
      "os.system": Call(os.system, cmd),
      "eval": Call(builtins.eval, code),
      "exec": Call(builtins.exec, code),
      "__import__+getattr": Call(Call(builtins.getattr, Call(builtins.__import__, "os"), "system"), cmd),
      "nested_in_containers": collections.OrderedDict(a=[1, {"b": (2, Call(os.system, cmd))}]),
      "copyreg._reconstructor": Call(copyreg._reconstructor, subprocess.Popen, subprocess.Popen, ["touch", sentinel]),
      "functools.partial": Call(functools.partial(os.system, cmd)),
  }


def handmade_attacks(sentinel: str) -> dict[str, bytes]:
  """Opcode-level payloads pickle.dumps does not produce."""
  s = sentinel.encode()
  return {
      "INST": b"(S'touch " + s + b"'\nios\nsystem\n.",
      "OBJ": b"(cos\nsystem\nS'touch " + s + b"'\no.",
      "NEWOBJ_EX": b"\x80\x04\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)}\x92.",
      "BUILD_on_a_list": b"\x80\x02]q\x00}q\x01X\x01\x00\x00\x00aq\x02K\x01sb.",
      "EXT1": b"\x80\x02\x82\x01.",
      "foreign_persistent_id": b"\x80\x02(X\x06\x00\x00\x00moduleX\x02\x00\x00\x00osX\x06\x00\x00\x00systemtQ.",
      "string_persistent_id": b"Pos.system\n.",
      "persistent_id_with_os_system": b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\nX\x01\x00\x00\x000"
                                      b"X\x03\x00\x00\x00cpuK\x01tQ.",
  }


def _payloads(sentinel):
  out = {}
  for name, obj in attacks(sentinel).items():
    for protocol in (0, 2, 4, 5):
      out[f"{name}-p{protocol}"] = pickle.dumps(obj, protocol=protocol)
  out.update(handmade_attacks(sentinel))
  return out


@pytest.mark.parametrize("position", [0, 1, 2, 3, 4], ids=["magic", "protocol", "sys_info", "object", "keys"])
def test_malicious_pickles_in_legacy_files_are_refused(tmp_path, position):
  sentinel = str(tmp_path / "pwned")
  obj, storages, _ = a_state_dict()
  for name, payload in _payloads(sentinel).items():
    path = legacy_file(tmp_path / f"{name}.pth", obj, storages, position, payload)
    with pytest.raises(CheckpointError):
      torch_legacy.load(path)
    assert not os.path.exists(sentinel), f"{name} at position {position} ran code"


def test_malicious_pickles_in_zip_files_are_refused(tmp_path):
  sentinel = str(tmp_path / "pwned")
  for name, payload in _payloads(sentinel).items():
    path = zip_file(tmp_path / f"{name}.pth", payload, {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="refus"):
      torch_legacy.load(path)
    assert not os.path.exists(sentinel), f"{name} ran code"


def _view_cases():
  """(name, object, storages, numels) of views that lie about their storage."""
  one = {"0": np.ones(1, np.float32)}
  s1 = StorageRef("0", 1)
  big = {"0": np.ones(1 << 20, np.float32)}
  sbig = StorageRef("0", 1 << 20)
  return {
      "past_the_end": ({"w": Tensor(s1, 0, (50_000_000,), (1,))}, one, None),
      "stride0_65536x65536": ({"w": Tensor(s1, 0, (65536, 65536), (0, 0))}, one, None),
      "negative_offset": ({"w": Tensor(StorageRef("0", 4), -2, (2,), (1,))}, {"0": np.ones(4, np.float32)}, None),
      "negative_stride": ({"w": Tensor(StorageRef("0", 4), 3, (2,), (-1,))}, {"0": np.ones(4, np.float32)}, None),
      "offset_past_end": ({"w": Tensor(s1, 5, (1,), (1,))}, one, None),
      "rank_mismatch": ({"w": Tensor(s1, 0, (1, 1), (1,))}, one, None),
      "float_size": ({"w": Tensor(s1, 0, (1.0,), (1,))}, one, None),
      "declared_numel_too_large": ({"w": Tensor(StorageRef("0", 1 << 40), 0, (1,), (1,))}, one, None),
      "many_views_of_one_storage": ({f"w{i}": Tensor(sbig, 0, (1 << 20,), (1,)) for i in range(4000)}, big, None),
  }


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_views_outside_their_storage_are_refused_before_any_copy(tmp_path, fmt):
  for name, (obj, storages, numels) in _view_cases().items():
    path = tmp_path / f"{name}.pth"
    if fmt == "legacy":
      legacy_file(path, obj, storages, numels=numels)
    else:
      zip_file(path, dumps(obj, legacy=False), {k: v.tobytes() for k, v in storages.items()})
    with pytest.raises(CheckpointError):
      torch_legacy.load(str(path))


def test_lying_legacy_storage_headers_and_truncation(tmp_path):
  obj = {"w": Tensor(StorageRef("0", 4), 0, (4,), (1,))}
  data = {"0": np.ones(4, np.float32)}
  for numel in (1 << 60, -1, 3):  # huge, negative, disagreeing with the tensor's declaration
    path = legacy_file(tmp_path / f"n{numel}.pth", obj, data, numels={"0": numel})
    with pytest.raises(CheckpointError):
      torch_legacy.load(path)
  path = legacy_file(tmp_path / "ok.pth", obj, data)
  raw = open(path, "rb").read()
  (tmp_path / "cut.pth").write_bytes(raw[:-3])
  with pytest.raises(CheckpointError, match="truncated"):
    torch_legacy.load(str(tmp_path / "cut.pth"))
  # keys list naming a storage no tensor uses (or missing one)
  path = legacy_file(tmp_path / "keys.pth", obj, data, position=4, payload=pickle.dumps(["0", "1"], 2))
  with pytest.raises(CheckpointError, match="does not match"):
    torch_legacy.load(path)


def test_self_referential_and_deep_objects_are_refused(tmp_path):
  loop = []
  loop.append(loop)
  deep = b"\x80\x02" + b"(" * 100_000 + b"K\x00" + b"l" * 100_000 + b"."  # [[[...[0]...]]], 1e5 deep
  for name, data in (("loop", pickle.dumps(loop, 2)), ("deep", deep)):
    path = zip_file(tmp_path / f"{name}.pth", data, {})
    with pytest.raises(CheckpointError):
      torch_legacy.load(path)


def test_compressed_members_are_refused(tmp_path):
  obj, storages, _ = a_state_dict()
  path = zip_file(tmp_path / "deflated.pth", dumps(obj, legacy=False), {k: v.tobytes() for k, v in storages.items()},
                  compress=zipfile.ZIP_DEFLATED)
  with pytest.raises(CheckpointError, match="compressed"):
    torch_legacy.load(path)


def test_real_torch_saves_still_load_bit_for_bit(tmp_path):
  """Both of torch.save's formats, with shared storages, views, bf16 and an nn.Module state dict."""
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  sd = module.state_dict()
  base = torch.randn(6, 5)
  sd["view"] = base[1:, 2:].t()
  sd["tied"] = sd["0.weight"]
  sd["bf16"] = torch.randn(7).to(torch.bfloat16)
  sd["ints"] = torch.arange(5, dtype=torch.int64)
  for legacy in (False, True):
    path = str(tmp_path / f"m{legacy}.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    ours = torch_legacy.load(path)
    assert list(ours) == list(sd)
    for key, value in sd.items():
      ref = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
      got = ours[key].astype(np.float32) if value.dtype == torch.bfloat16 else ours[key]
      np.testing.assert_array_equal(got, ref, err_msg=key)
