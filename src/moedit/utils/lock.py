"""An exclusive lock on a folder, held for the life of the process that writes it.

Two writers in one run directory interleave their metrics and routing records and overwrite each
other's config, so `moedit train` holds `RUN/.moedit.lock` from before it reads the directory until
its last file is written. The lock is the kernel's `flock` on that file:

- a second writer's non-blocking `flock` fails at once; it reads the holder's description (pid, host,
  start time, command), which the holder wrote into the file, and is refused with it;
- a holder killed with SIGKILL loses its lock with its file descriptor, so a lock is never stuck. The
  file still names the killed holder: the next writer sees a free lock with a description in it, reports
  the stale lock it cleared, and writes its own;
- the file is never deleted (a process that opened it just before the unlink would lock an orphan
  inode while a third process locks a new file): releasing empties it and unlocks.

`flock` is reliable on local file systems; on NFS it works where the server supports byte-range locks
(NFSv4, or v3 with lockd), the usual case on clusters.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".moedit.lock"


class LockedError(RuntimeError):
    """The folder is held by another live process; the message names it and what to do."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"pid": "?", "host": "?", "command": "unreadable lock description"}
    return holder if isinstance(holder, dict) else None


class DirLock:
    """`with DirLock(folder, purpose):` or `acquire()` / `release()`. Re-entrant use is a bug and raises."""

    def __init__(self, folder: str | os.PathLike, purpose: str, log=print):
        self.folder, self.purpose, self.log = Path(folder), purpose, log
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = _describe(holder) if holder else "another process (no description yet: it is starting)"
            raise LockedError(
                f"{self.folder} is in use by {who}. Two writers would mix their files, so nothing was changed. "
                f"Wait for it to finish or stop it, or write to another directory.") from None
        stale = _read_holder(fd)
        if stale is not None:
            self.log(f"note: cleared a stale lock on {self.folder} left by {_describe(stale)}: that process "
                     "ended without releasing it (killed or crashed)")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500], "purpose": self.purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # empty = released cleanly; see the module docstring for why it stays
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # an abandoned object (e.g. a Trainer never trained) frees its folder
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the os module may already be gone
            pass
