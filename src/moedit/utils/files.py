"""Small file helpers shared across moedit."""

from __future__ import annotations

import hashlib

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call write_fn(tmp_path) then os.replace onto `path`, so readers never see a partial file."""
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


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (checkpoints and weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
