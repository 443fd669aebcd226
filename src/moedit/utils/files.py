"""Small file helpers shared across moedit: atomic writes, checksums, and file-system errors that
name the path, the reason and what to do (never a bare traceback)."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path


class PathError(RuntimeError):
    """A path moedit cannot read or write as asked; the message names it, the reason and the fix."""


# what a user can do about the common file-system failures, by errno
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or choose another location",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another location",
    errno.EACCES: "permission denied: choose a location you can write, or fix its permissions",
    errno.EPERM: "not permitted: choose a location you can write, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: name a file",
    errno.EEXIST: "something of that name is already there: choose another path",
    errno.ENOENT: "a folder on the way does not exist and cannot be created there: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def describe_os_error(exc: OSError, action: str = "write") -> str:
    """One line: `cannot <action> PATH: <reason>; <what to do>`."""
    path = exc.filename if exc.filename is not None else "(unknown path)"
    reason = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno, "check the path and the disk, then run again")
    return f"cannot {action} {path}: {reason}; {advice}"


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder `path` if needed and prove that a file can be created in it, before any data is
    loaded or any training runs. `what` names the setting that chose it (e.g. "train.out_dir").
    Raises PathError with the path, the reason and the fix."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise PathError(f"{what}: {path} is a file where a folder is needed; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moedit-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PathError(f"{what}: {describe_os_error(exc)}") from exc
    return path


def ensure_writable_file(path: str | os.PathLike, what: str) -> Path:
    """`path` will be written as a file: its folder must be writable and `path` must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{what}: {path} is a folder; name a file, e.g. {path / 'out'}")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), what)
    return path


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call write_fn(tmp_path) then os.replace onto `path`, so readers never see a partial file: a kill or a
    full disk leaves either the old file or the new one, and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache or image should read like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`path` replaced by `text` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (checkpoints and weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
