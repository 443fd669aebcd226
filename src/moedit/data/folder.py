"""A user's image folder: one sub-folder per class, labels by sorted class-folder name.

    path/
      cat/001.png ...
      dog/xyz.jpg ...

or, with splits, path/train/<class>/... and path/test/<class>/... (`split` picks the sub-folder;
a folder without split sub-folders is the "train" split and has no other).

- Colour: all images become RGB unless every image is greyscale (PIL modes 1, L, LA), then "L".
  Alpha is dropped. Only 8-bit images are accepted (16-bit / float files raise).
- Size: with `image_size`, each image is resized so its shorter side is `image_size` (bicubic,
  antialiased by PIL) and centre-cropped to a square (`crop=center`), or first halved with a box filter
  while it is at least twice that size (`crop=adm`, ADM's and DiT's ImageNet crop). Without it every image must already share
  one square size.
- Hidden entries and files with other extensions are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from moedit.data.base import DatasetError, ImageDataset, check_split, make_dataset

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test")
GREY_MODES = ("1", "L", "LA")
UNSUPPORTED_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
PROGRESS_THRESHOLD = 1000  # show a progress bar above this many files
CROPS = ("center", "adm")


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(file, label)]) with clear errors for a missing or malformed tree."""
    if not root.exists():
        raise DatasetError(
            f"image folder {root} does not exist; set data.path to a folder with one sub-folder per class"
        )
    if not root.is_dir():
        raise DatasetError(f"data.path={root} is a file; the folder dataset needs a directory of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DatasetError(
            f"image folder {root} has no class sub-folders; put each class's images in its own "
            f"sub-folder, e.g. {root}/cat/001.png"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in EXTENSIONS
        )
        if not found:
            raise DatasetError(
                f"class folder {root / name} holds no images ({', '.join(EXTENSIONS)}); add images or remove the folder"
            )
        files.extend((p, label) for p in found)
    return classes, files


def _probe(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the header only."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}; fix or delete the file") from exc
    if mode in UNSUPPORTED_MODES:
        raise DatasetError(f"image {path} has mode {mode} (16-bit or float); convert it to an 8-bit PNG or JPEG")
    return mode, size


def center_crop(im: Image.Image, size: int, crop: str) -> Image.Image:
    """The square `size`×`size` crop: `center` or `adm` (lazy_folder.py's docstring says how they differ)."""
    if crop == "adm":
        while min(im.size) >= 2 * size:
            im = im.resize(tuple(s // 2 for s in im.size), resample=Image.Resampling.BOX)
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _load(path: Path, mode: str, image_size: int | None, crop: str = "center") -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except (UnidentifiedImageError, OSError) as exc:  # a header can parse while the data is damaged
        raise DatasetError(f"cannot read image {path}: {exc}; fix or delete the file") from exc
    if image_size is not None and im.size != (image_size, image_size):
        im = center_crop(im, image_size, crop)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _split_root(root: Path, split: str) -> Path:
    """root/split when root is laid out by split (its sub-folders are only split names), else root."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and _visible(p)}
    if "train" in subdirs and subdirs <= set(SPLITS):
        if split not in subdirs:
            raise DatasetError(f"image folder {root} has no {split!r} sub-folder; create {root}/{split}/<class>/...")
        return root / split
    if split == "train":
        return root
    raise DatasetError(
        f"image folder {root} has no {split!r} split: its sub-folders are classes; "
        f"lay it out as {root}/train/<class>/... and {root}/{split}/<class>/..., or use data.split=train"
    )


def load_folder(path: str | Path, split: str = "train", image_size: int | None = None,
                crop: str = "center") -> ImageDataset:
    """Load every image under `path` (see module docstring) into memory as uint8."""
    if path is None:
        raise DatasetError("the folder dataset needs data.path=<folder with one sub-folder per class>")
    root = Path(path).expanduser()
    check_split(split, SPLITS, "folder")
    if root.is_dir():
        root = _split_root(root, split)
    classes, files = scan_folder(root)
    show = len(files) > PROGRESS_THRESHOLD
    probes = [_probe(p) for p, _ in tqdm(files, desc=f"scanning {root.name}", disable=not show, unit="img")]
    mode = "L" if all(m in GREY_MODES for m, _ in probes) else "RGB"
    if image_size is None:
        _check_sizes(files, probes)
        image_size = probes[0][1][0]
    channels = 1 if mode == "L" else 3
    images_NCHW = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, (p, _) in enumerate(tqdm(files, desc=f"loading {root.name}", disable=not show, unit="img")):
        images_NCHW[i] = _load(p, mode, image_size, crop).transpose(2, 0, 1)
    labels_N = np.array([label for _, label in files], dtype=np.int64)
    return make_dataset(images_NCHW, labels_N, classes, name=f"folder:{root}")


def _check_sizes(files: list[tuple[Path, int]], probes: list[tuple[str, tuple[int, int]]]) -> None:
    first_path, first_size = files[0][0], probes[0][1]
    if first_size[0] != first_size[1]:
        raise DatasetError(
            f"image {first_path} is {first_size[0]}x{first_size[1]}, not square; "
            f"set data.image_size=N to resize and centre-crop every image"
        )
    for (p, _), (_, size) in zip(files, probes, strict=True):
        if size != first_size:
            raise DatasetError(
                f"image {p} is {size[0]}x{size[1]} but {first_path} is {first_size[0]}x{first_size[1]}; "
                f"images must share one size, or set data.image_size=N to resize them"
            )
