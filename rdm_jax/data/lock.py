"""An exclusive lock on writing a store: the file `<path>.lock`, safe across processes and hosts
that share a filesystem.

The file holds the pid, host and start time of its holder's process, and a thread of the
holder touches it every `HEARTBEAT_S` seconds. A lock whose process is gone (same host), or on
another host not touched for `STALE_S` seconds, is stale and is broken.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from rdm_jax import files, untrusted
from rdm_jax.errors import UserError, fail

HEARTBEAT_S = 60.0  # a held lock's file is touched this often, by a thread of its holder
STALE_S = 300.0  # a lock on another host that was not refreshed for this long is stale


class Lock:
  """An exclusive lock on writing the store at `path`: the file `<path>.lock`.

  The file holds the pid, host and process start time of its holder, and a thread of the holder
  touches it every `heartbeat_s` seconds while it is held. It is stale, and is broken, when that
  process is gone (same host) or when it was not touched for `stale_s` seconds (another host:
  a killed holder there, or a host that went away). `acquire` waits for a live holder, or with
  `wait=False` refuses it in one line naming it.
  """

  def __init__(
    self,
    path: str,
    log: Callable[[str], None] = print,
    stale_s: float = STALE_S,
    poll_s: float = 0.2,
    heartbeat_s: float = HEARTBEAT_S,
  ):
    why = "a lock needs a filesystem, not a bucket; give a local or mounted path"
    self.file = files.filesystem_path(path, why) + ".lock"
    self.log, self.stale_s, self.poll_s, self.heartbeat_s = log, stale_s, poll_s, heartbeat_s
    self._stop = threading.Event()
    self.text = json.dumps(
      {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
      }
    )

  @staticmethod
  def holder(file: str) -> dict | None:
    """The lock's contents, {} if it vanished or is being written, None if it is not one of ours."""
    try:
      with untrusted.open_regular(file, "r", encoding="utf-8") as f:
        text = f.read(4096)
    except FileNotFoundError:
      return {}
    except (
      OSError,
      UserError,
      UnicodeDecodeError,
    ):  # not a regular file, not text: not a lock of ours
      return None
    if not text:
      return {}  # created, not yet written
    try:
      info = json.loads(text)
    except ValueError:
      return None
    return info if isinstance(info, dict) and {"pid", "host", "token"} <= set(info) else None

  def _stale(self, info: dict) -> bool:
    try:
      age = time.time() - os.stat(self.file).st_mtime
    except FileNotFoundError:
      return False
    if not info:  # still empty long after it was created: its creator died before writing it
      return age > 30
    if info.get("host") == socket.gethostname():
      return not _alive(info["pid"], info.get("start"))
    return age > self.stale_s

  def _break(self, info: dict) -> None:
    aside = f"{self.file}.{uuid.uuid4().hex[:8]}.stale"
    try:
      os.rename(self.file, aside)
    except FileNotFoundError:
      return
    if (
      Lock.holder(aside) != info
    ):  # a fresh lock appeared between the check and the rename: give it back
      try:
        os.link(aside, self.file)
      except FileExistsError:
        pass
    os.remove(aside)

  def acquire(self, wait: bool = True, busy: str = "") -> "Lock":
    """Takes the lock, waiting for a live holder; with `wait=False` a live holder stops the job with
    one line naming it, followed by `busy` (what to do)."""
    try:
      os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
    except OSError as e:
      fail(
        f"cannot create {os.path.dirname(self.file)} ({e.strerror or e}); choose another "
        "output path"
      )
    last_note = 0.0
    while True:
      try:
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        info = Lock.holder(self.file)
        if info is None:
          fail(f"{self.file} exists but is not a lock of ours; move it away")
        if self._stale(info):
          self.log(
            f"{self.file}: breaking the stale lock of pid {info.get('pid')} on {info.get('host')}"
          )
          self._break(info)
          continue
        if info and not wait:
          fail(
            f"{self.file}: pid {info['pid']} on {info['host']} (started "
            f"{info.get('start') or '?'}) holds it{busy}"
          )
        if info and time.monotonic() - last_note > 60:
          self.log(
            f"{self.file}: pid {info['pid']} on {info['host']} is writing this store; waiting for "
            "it (its result is reused when it matches)"
          )
          last_note = time.monotonic()
        time.sleep(self.poll_s)
        continue
      with os.fdopen(fd, "w") as f:
        f.write(self.text)
      self._stop.clear()
      threading.Thread(target=self._heartbeat, name=f"heartbeat {self.file}", daemon=True).start()
      return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      self.refresh()

  def refresh(self) -> None:
    """Marks the lock as alive (a holder on another host is judged by this time)."""
    try:
      os.utime(self.file)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    self._stop.set()
    try:
      with untrusted.open_regular(self.file, "r", encoding="utf-8") as f:
        mine = f.read(4096) == self.text
    except (OSError, UserError, UnicodeDecodeError):
      return
    if mine:
      os.remove(self.file)

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _process_start(pid: int) -> str | None:
  """The start time of a process (Linux /proc), so a reused pid is not mistaken for the holder."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: Any, start: Any) -> bool:
  if type(pid) is not int or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return start is None or _process_start(pid) in (None, start)
