"""A user's arrays in one `.npz`: `images` and `labels` (optionally `class_names`).

- images: (N, H, W) grey, (N, H, W, C) or (N, C, H, W) with C in {1, 3}; uint8 0..255, another
  integer type within 0..255, or floats in [0, 1] (scaled by 255 and rounded).
- labels: (N,) integers >= 0. num_classes = len(class_names) when the file has a `class_names`
  string array, else max label + 1.
- Splits: `<split>_images` / `<split>_labels` when present; otherwise the bare `images` / `labels`
  are the "train" split and the file has no other.
- Loaded with allow_pickle=False: an .npz can hold pickled objects, and a pickle is code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moedit.data.base import DatasetError, ImageDataset, check_split, make_dataset
from moedit.utils.npz import NPZ_READ_ERRORS

SPLITS = ("train", "test")
CHANNELS = (1, 3)


def _keys_for(z: np.lib.npyio.NpzFile, split: str, path: Path) -> tuple[str, str]:
    prefixed = (f"{split}_images", f"{split}_labels")
    if all(k in z.files for k in prefixed):
        return prefixed
    if split == "train" and all(k in z.files for k in ("images", "labels")):
        return "images", "labels"
    want = (
        f"'images' and 'labels' (or '{prefixed[0]}' and '{prefixed[1]}')"
        if split == "train"
        else f"'{prefixed[0]}' and '{prefixed[1]}'"
    )
    raise DatasetError(
        f"{path} has arrays {sorted(z.files)} but the {split} split needs {want}; re-save it with those keys"
    )


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        nhwc = images.shape[3] in CHANNELS
        nchw = images.shape[1] in CHANNELS
        if nhwc and nchw:  # e.g. (N, 3, 3, 3): let the square spatial dims decide
            nchw = images.shape[2] == images.shape[3]
            nhwc = not nchw
        if nchw:
            return images
        if nhwc:
            return images.transpose(0, 3, 1, 2)
    raise DatasetError(
        f"{path}: images have shape {images.shape}; "
        f"expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {CHANNELS}"
    )


def _to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(f"{path}: float images must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]; rescale them")
        return np.rint(images * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min(initial=0)), int(images.max(initial=0))
        if lo < 0 or hi > 255:
            raise DatasetError(f"{path}: integer images must lie in 0..255, found {lo}..{hi}; rescale them to uint8")
        return images.astype(np.uint8)
    raise DatasetError(f"{path}: images have dtype {images.dtype}; use uint8 (0..255) or float (0..1)")


def _class_names(raw: np.ndarray | None, labels: np.ndarray, path: Path) -> list[str]:
    max_label = int(labels.max(initial=-1))
    if raw is None:
        return [str(i) for i in range(max_label + 1)]
    names = [str(n) for n in raw.reshape(-1)]
    if len(names) <= max_label:
        raise DatasetError(f"{path}: label {max_label} but only {len(names)} class_names; fix the labels or the names")
    return names


def _read_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images, labels, class_names or None) as stored, with the labels validated."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images_key, labels_key = _keys_for(z, split, path)
            images, labels = z[images_key], z[labels_key]
            raw_names = z["class_names"] if "class_names" in z.files else None
    except DatasetError:
        raise
    except NPZ_READ_ERRORS as exc:  # not a zip, damaged, or object arrays (pickle)
        raise DatasetError(
            f"cannot read {path} as an .npz of plain arrays: {exc}; re-save it with numpy.savez"
        ) from exc
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {labels_key} must be a 1-D integer array, got shape {labels.shape} {labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise DatasetError(f"{path}: {labels_key} holds negative values; labels must be 0..num_classes-1")
    if len(images) != len(labels):
        raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels; they must match one to one")
    return images, labels, raw_names


def load_npz(path: str | Path, split: str = "train", image_size: int | None = None) -> ImageDataset:
    """Load `split` from an .npz (see module docstring); resized and centre-cropped when image_size is given."""
    if path is None:
        raise DatasetError("the npz dataset needs data.path=<file.npz with 'images' and 'labels'>")
    check_split(split, SPLITS, "npz")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"npz file {path} does not exist; set data.path to an .npz holding 'images' and 'labels'")
    images, labels, raw_names = _read_arrays(path, split)
    class_names = _class_names(raw_names, labels, path)
    images_NCHW = _to_uint8(_to_nchw(images, path), path)
    h, w = images_NCHW.shape[2:]
    if image_size is None and h != w:
        raise DatasetError(f"{path}: images are {h}x{w}, not square; set data.image_size=N to resize and crop them")
    return make_dataset(images_NCHW, labels, class_names, name=f"npz:{path}/{split}", image_size=image_size)
