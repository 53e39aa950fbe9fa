"""Files we did not write: every byte read from them is hostile until checked.

Checkpoints, databases, sample sets, image folders and captions come from the internet. Every
reader in the package goes through the few mechanisms here, so that a small file can cost
neither unbounded memory nor unbounded time, nor make anything run:

- `open_regular`: a path is opened only when it is a regular file (a FIFO would block the job
  forever, `/dev/zero` would be read forever); the check is made on the opened descriptor,
  so a link swapped in between cannot slip past it.
- `Budget`: the bytes a job may take from what it reads (`memory_budget()`: half the machine's
  memory, or `RDM_MEMORY_BUDGET` bytes), charged per file (everything a file declares,
  together, before any of it is inflated) and per job (everything the job keeps at once).
- `zip_members`: an archive's members must not overlap, repeat a name, be encrypted, or
  declare more bytes than the archive holds (a 4 MiB file whose hundreds of members all
  point at one storage would otherwise inflate to GiBs).
- `Npz`: an `.npz` read without pickle, every member's header checked against its size and
  the budget before any member is inflated.
- `image`: an image file decoded only as one of `IMAGE_FORMATS` (PIL picks its decoder by
  content; a PostScript file named `.png` would make it run Ghostscript), with a pixel cap
  checked before the pixels are decoded.
- `parse_json` / `read_json`: bounded size, invalid UTF-8 and deep nesting are one line.
- `caption`: captions of bounded length.

Each refusal is a `UserError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import warnings
import zipfile
import zlib
from typing import IO, Any, Iterator

import numpy as np

from rdm_jax.errors import fail

MAX_JSON_BYTES = 64 << 20  # manifests, records, settings: far below this
MAX_IMAGE_PIXELS = 50_000_000  # per image, checked from its header before decoding
IMAGE_FORMATS = ("PNG", "JPEG")  # what image folders hold (sources.IMAGE_EXTENSIONS)
MAX_CAPTION_CHARS = 4096  # CLIP reads the first 77 tokens; longer captions are refused
_ZIP_LOCAL_HEADER = 30  # bytes of a zip local file header before its name


def memory_budget() -> int:
  """The bytes a job may take from the files it reads: `RDM_MEMORY_BUDGET` when set, else half
  the machine's memory."""
  env = os.environ.get("RDM_MEMORY_BUDGET", "")
  if env:
    try:
      return max(1, int(float(env)))
    except ValueError:
      fail(f"RDM_MEMORY_BUDGET={env!r}: give a number of bytes (e.g. 8e9)")
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
  except (ValueError, OSError, AttributeError):
    return 8 << 30


def _size(n: int) -> str:
  """A byte count for a message: 12.0 MiB, 3.5 GiB, 2^200 bytes."""
  for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
    if n >= 1 << shift:
      return f"{n / 2**shift:.1f} {unit}" if n < 2**70 else f"2^{n.bit_length() - 1} bytes"
  return f"{n} bytes"


class Budget:
  """Bytes a job may take from its input files, all together (`charge` refuses past the limit)."""

  def __init__(self, what: str, limit: int | None = None):
    self.what, self.limit, self.used = what, memory_budget() if limit is None else limit, 0

  def charge(self, nbytes: int, path: str, detail: str = "") -> None:
    if nbytes > self.limit - self.used:
      fail(
        f"{path}: {detail + ' ' if detail else ''}declares {_size(nbytes)}, more than the "
        f"{_size(self.limit - self.used)} {self.what} may still take from its input files (of "
        f"{_size(self.limit)}): the file is not what it claims to be, or set RDM_MEMORY_BUDGET "
        "(bytes) higher"
      )
    self.used += nbytes


def _file_kind(mode: int) -> str:
  for test, name in (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
  ):
    if test(mode):
      return name
  return "not a regular file"


def open_regular(path: str, mode: str = "rb", encoding: str | None = None) -> IO:
  """`open(path, mode)` for reading, refused (one line) unless `path` is a regular file.

  Opened without blocking (a FIFO would wait for a writer forever), then checked on the
  descriptor itself, so the file that is read is the file that was checked.
  """
  if any(c in mode for c in "wax+"):
    raise ValueError(f"open_regular reads; mode {mode!r}")
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  except IsADirectoryError:
    fail(f"{path} is a directory, not a file; give a file")
  try:
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
      fail(
        f"{path} is {_file_kind(kind)}, not a regular file; refusing to read it (replace it "
        "with a file)"
      )
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, encoding=encoding) if "b" not in mode else os.fdopen(fd, mode)
  except BaseException:
    os.close(fd)
    raise


def check_directory(path: str) -> None:
  """Refuses (one line) a directory a library reads by name (a saved transformers model or
  tokenizer) holding anything but regular files and directories, or a file past the budget."""
  for entry in os.scandir(path):
    try:
      st = os.stat(entry.path)
    except OSError as e:
      fail(f"{entry.path} cannot be read ({e})")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
      fail(f"{entry.path} is {_file_kind(st.st_mode)}, not a regular file; refusing to read {path}")
    if stat.S_ISREG(st.st_mode):
      Budget(f"reading {path}").charge(st.st_size, entry.path)


def parse_json(data: bytes | str, what: str) -> Any:
  """JSON of a file or a line (`what` names it): invalid UTF-8, bad syntax and deep nesting are one
  line."""
  try:
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    return json.loads(text)
  except UnicodeDecodeError as e:
    fail(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})")
  except RecursionError:
    fail(f"{what} nests JSON too deeply to be ours")
  except ValueError as e:
    fail(f"{what} is not valid JSON ({e})")


def read_json(path: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
  """`parse_json` of a local regular file of at most `max_bytes`."""
  with open_regular(path) as f:
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:
    fail(f"{path} is larger than {max_bytes >> 20} MiB; it is not a file this code wrote")
  return parse_json(data, path)


def caption(text: Any, what: str) -> str:
  """A caption as a str of at most MAX_CAPTION_CHARS characters (longer: one line naming `what`)."""
  text = str(text)
  if len(text) > MAX_CAPTION_CHARS:
    fail(
      f"{what}: a caption of {len(text)} characters; captions may have at most "
      f"{MAX_CAPTION_CHARS} (CLIP reads the first 77 tokens): shorten it"
    )
  return text


def zip_members(zf: zipfile.ZipFile, path: str, size: int) -> list[zipfile.ZipInfo]:
  """The members of an archive of `size` bytes, refused (ValueError) when two share a name or
  overlap, one is encrypted or uses a method other than stored/deflate, or they declare together
  more stored bytes than the archive holds."""
  infos = zf.infolist()
  if len({i.filename for i in infos}) != len(infos):
    raise ValueError("it names one member twice")
  end, stored = 0, 0
  for info in sorted(infos, key=lambda i: i.header_offset):
    if info.flag_bits & 0x1:
      raise ValueError(f"member {info.filename} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise ValueError(f"member {info.filename} uses compression method {info.compress_type}")
    if info.header_offset < end:
      raise ValueError(f"member {info.filename} overlaps the member before it")
    end = (
      info.header_offset
      + _ZIP_LOCAL_HEADER
      + len(info.orig_filename.encode("utf-8", "replace"))
      + info.compress_size
    )
    stored += info.compress_size
    if end > size or stored > size:
      raise ValueError(f"its members declare more bytes than the {size}-byte archive holds")
  return infos


_ZIP_ERRORS = (
  zipfile.BadZipFile,
  zlib.error,
  EOFError,
  RuntimeError,
  NotImplementedError,
  OSError,
  ValueError,
  OverflowError,
)


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran order, dtype) of the `.npy` header at f's position, read with a bounded
  header size; f is left at the first element."""
  version = np.lib.format.read_magic(f)
  read = (
    np.lib.format.read_array_header_1_0
    if version == (1, 0)
    else np.lib.format.read_array_header_2_0
  )
  return read(f, max_header_size=1 << 16)


class Npz:
  """An `.npz` read without pickle; every member's declared shape is checked before any is inflated.

  Members must be `.npy` arrays of no object dtype whose header and data fill the member
  exactly, and all of them together must fit the memory budget when the file is opened; each
  array read is then charged to the job's `budget` (what the job keeps of all its files).
  """

  def __init__(self, f: IO[bytes], path: str, size: int, budget: Budget | None = None):
    self.path, self._file, self.budget = path, f, budget
    self._zip = None
    try:
      self._zip = zipfile.ZipFile(f)
      infos = zip_members(self._zip, path, size)
    except _ZIP_ERRORS as e:
      self.close()
      fail(f"{path} is not a readable .npz ({type(e).__name__}: {str(e)[:200]})")
    self.headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._infos: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
      name = info.filename.removesuffix(".npy")
      if not info.filename.endswith(".npy"):
        self.close()
        fail(
          f"{path}: member {info.filename[:80]!r} is not an array; np.savez writes only "
          ".npy members"
        )
      shape, dtype, nbytes = self._header(info, name)
      self.headers[name], self._infos[name] = (shape, dtype), info
      total += nbytes
    try:
      Budget("one file", budget.limit if budget else None).charge(
        total, path, f"its {len(infos)} arrays together"
      )
    except BaseException:
      self.close()
      raise

  def _header(self, info: zipfile.ZipInfo, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
      with self._zip.open(info) as m:
        shape, _, dtype = npy_header(m)
        header = m.tell()
    except _ZIP_ERRORS as e:
      self.close()
      fail(f"{self.path}: {name} is not a readable array ({type(e).__name__}: {str(e)[:200]})")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if dtype.hasobject or header + nbytes != info.file_size:
      self.close()
      fail(
        f"{self.path}: {name} declares {dtype}{list(shape)[:8]} ({_size(nbytes)}) in a member of "
        f"{info.file_size} bytes; rewrite it with np.savez"
      )
    return tuple(shape), dtype, nbytes

  @property
  def files(self) -> list[str]:
    return list(self.headers)

  def __contains__(self, name: str) -> bool:
    return name in self.headers

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.headers:
      fail(f"{self.path} has no array {name!r} (it has {', '.join(self.headers)[:200] or 'none'})")
    if self.budget is not None:
      shape, dtype = self.headers[name]
      self.budget.charge(int(np.prod(shape, dtype=object)) * dtype.itemsize, self.path, name)
    try:
      with self._zip.open(self._infos[name]) as m:
        return np.lib.format.read_array(m, allow_pickle=False)
    except _ZIP_ERRORS as e:
      fail(f"{self.path}: {name} is damaged ({type(e).__name__}: {str(e)[:200]})")

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
    self._file.close()

  def __enter__(self) -> "Npz":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_npy(path: str, budget: Budget | None = None, mmap: bool = False) -> np.ndarray:
  """A `.npy` file without pickle, its declared shape checked against the file's size (and, read
  into memory, the budget) before anything is allocated; memory-mapped with `mmap`."""
  with open_regular(path) as f:
    size = os.fstat(f.fileno()).st_size
    try:
      shape, fortran, dtype = npy_header(f)
    except (ValueError, OSError, EOFError, OverflowError, SyntaxError) as e:
      fail(f"{path} is not a readable .npy array ({type(e).__name__}: {str(e)[:200]})")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if dtype.hasobject:
      fail(f"{path} holds Python objects (a pickle), which are never loaded; save a numeric array")
    if f.tell() + nbytes != size:
      fail(
        f"{path} is truncated or corrupt: it declares {dtype}{list(shape)[:8]} ({_size(nbytes)}) "
        f"in a file of {size} bytes"
      )
    if mmap:
      return np.memmap(
        f, dtype=dtype, mode="r", offset=f.tell(), shape=tuple(shape), order="F" if fortran else "C"
      )
    (budget or Budget(f"reading {path}")).charge(nbytes, path)
    f.seek(0)
    return np.lib.format.read_array(f, allow_pickle=False)


class UnreadableImage(ValueError):
  """An image file that is not one of IMAGE_FORMATS, exceeds the pixel cap, or does not decode;
  `why` is the short reason (the decoder's error type, or "pixels")."""

  def __init__(self, message: str, why: str):
    super().__init__(message)
    self.why = why


@contextlib.contextmanager
def image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Any]:
  """A PIL image of the PNG or JPEG file at `path`, its header read and its size checked against
  `max_pixels`; pixels are decoded only by `.load()` / `.convert()` within the block.

  Raises `UnreadableImage` (a ValueError) naming the file for anything else: another format
  (nothing is handed to an outside program such as Ghostscript), a header past the cap, a file
  that does not decode, a path that is not a regular file.
  """
  from PIL import Image

  from rdm_jax.errors import UserError

  try:
    f = open_regular(path)
  except (UserError, OSError) as e:
    raise UnreadableImage(f"{path}: {e}", type(e).__name__) from None
  with f:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter(
          "ignore", Image.DecompressionBombWarning
        )  # judged here, by max_pixels
        im = Image.open(f, formats=IMAGE_FORMATS)
    except (
      OSError,
      ValueError,
      SyntaxError,
      Image.DecompressionBombError,
      zlib.error,
      EOFError,
    ) as e:
      raise UnreadableImage(
        f"{path}: not a {' or '.join(IMAGE_FORMATS)} image ({type(e).__name__}: {str(e)[:100]})",
        type(e).__name__,
      ) from None
    with im:
      w, h = im.size
      if w * h > max_pixels:
        raise UnreadableImage(
          f"{path}: {w}x{h} pixels, more than the {max_pixels} an image may have here; "
          "downscale it",
          "pixels",
        )
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", Image.DecompressionBombWarning)
          yield im
      except (OSError, SyntaxError, Image.DecompressionBombError, zlib.error, EOFError) as e:
        raise UnreadableImage(
          f"{path}: does not decode ({type(e).__name__}: {str(e)[:100]})", type(e).__name__
        ) from None
