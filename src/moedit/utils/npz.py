""".npz files written atomically, and the errors that mean one is damaged (caches are recomputed then)."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from moedit.utils.files import atomic_write

# What np.load and reading its members raise for a file that is not (or no longer) an .npz of plain arrays:
# random bytes or text (ValueError: "pickled data"), an empty file (EOFError), a truncated or overwritten
# zip (BadZipFile; also a bad CRC), a damaged compressed member (zlib.error), a missing member (KeyError).
NPZ_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def save_npz(path: str | os.PathLike, compressed: bool = False, **arrays: np.ndarray) -> Path:
    """`path` replaced atomically (see atomic_write): a full disk or a kill leaves no partial file. Written
    through a handle, so numpy never appends .npz to the name."""
    savez = np.savez_compressed if compressed else np.savez

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            savez(fh, **arrays)

    return atomic_write(path, write)
