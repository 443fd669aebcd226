"""Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747) from the Debian package `dataset-fashion-mnist`.

The package installs the four official IDX files (gzipped) under /usr/share/datasets/fashion-mnist;
they are found through `dpkg -L dataset-fashion-mnist`, or in `path` when given (a folder holding
them, or the root of a `dpkg -x` extraction). 60k train + 10k test, 28x28 uint8, 10 classes.

IDX format (LeCun's MNIST page): 2 zero bytes, a type code (0x08 = uint8), the number of dims,
then each dim as a big-endian uint32, then the row-major data. Images have 3 dims, labels 1.
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np

from moedit.data.base import DatasetError, ImageDataset, check_split, make_dataset

PACKAGE = "dataset-fashion-mnist"
SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"train": 60000, "test": 10000}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_DEB_SUBDIR = Path("usr/share/datasets/fashion-mnist")
_IDX_UINT8 = 0x08

INSTALL_HINT = (
    f"install it with: apt-get install {PACKAGE}  "
    f"(without root: apt-get download {PACKAGE} && dpkg -x {PACKAGE}_*.deb DIR, "
    f"then set data.path=DIR/{_DEB_SUBDIR})"
)


def parse_idx(data: bytes, expected_ndim: int, what: str) -> np.ndarray:
    """Decode an uncompressed uint8 IDX blob into an array of its declared shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{what} is not an IDX file (bad magic number); reinstall {PACKAGE}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != _IDX_UINT8 or ndim != expected_ndim:
        raise DatasetError(
            f"{what}: expected uint8 IDX with {expected_ndim} dims, got type 0x{dtype_code:02x} with {ndim} dims"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{what} is truncated (header); reinstall {PACKAGE}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(dims)):
        raise DatasetError(
            f"{what}: header declares {dims} = {int(np.prod(dims))} bytes but holds {len(data) - header}; "
            f"the file is damaged, reinstall {PACKAGE}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_gz(path: Path, expected_ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; reinstall {PACKAGE}") from exc
    return parse_idx(data, expected_ndim, str(path))


def _dpkg_dir() -> Path | None:
    """The folder dpkg says holds the IDX files, or None when the package (or dpkg) is absent."""
    try:
        out = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None  # no dpkg on this system: only data.path can help
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        if line.strip().endswith(FILES["train"][0]):
            return Path(line.strip()).parent
    return None


def find_fashion_dir(path: str | Path | None = None) -> Path:
    if path is not None:
        root = Path(path).expanduser()
        for candidate in (root, root / _DEB_SUBDIR):
            if all((candidate / f).is_file() for names in FILES.values() for f in names):
                return candidate
        wanted = ", ".join(f for names in FILES.values() for f in names)
        raise DatasetError(f"data.path={path} does not hold the Fashion-MNIST files ({wanted}); {INSTALL_HINT}")
    found = _dpkg_dir()
    if found is None:
        raise DatasetError(f"Fashion-MNIST is not installed ({PACKAGE}); {INSTALL_HINT}")
    return found


def load_fashion_mnist(
    split: str = "train", path: str | Path | None = None, image_size: int | None = None
) -> ImageDataset:
    """Fashion-MNIST `split` ("train": 60k, "test": 10k) as 1x28x28 uint8 (resized when asked)."""
    check_split(split, SPLITS, "fashion_mnist")
    folder = find_fashion_dir(path)
    images_name, labels_name = FILES[split]
    x_NHW = _read_idx_gz(folder / images_name, expected_ndim=3)
    y_N = _read_idx_gz(folder / labels_name, expected_ndim=1)
    if x_NHW.shape != (SIZES[split], 28, 28) or y_N.shape != (SIZES[split],):
        raise DatasetError(
            f"Fashion-MNIST {split} in {folder}: got images {x_NHW.shape} and labels {y_N.shape}, "
            f"expected ({SIZES[split]}, 28, 28) and ({SIZES[split]},); reinstall {PACKAGE}"
        )
    if int(y_N.max()) >= len(CLASS_NAMES):
        raise DatasetError(f"Fashion-MNIST {split}: label {int(y_N.max())} out of range; reinstall {PACKAGE}")
    return make_dataset(x_NHW[:, None], y_N, CLASS_NAMES, name=f"fashion_mnist/{split}", image_size=image_size)
