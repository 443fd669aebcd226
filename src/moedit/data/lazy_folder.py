"""An image folder read lazily: each image is decoded when it is asked for (in DataLoader workers), so a
folder of any size is never held in memory. The layout is folder.py's (one sub-folder per class, labels by
sorted class name, optional train/ and test/ splits), which is also ImageNet's `train/<wnid>/*.JPEG`.

- Scan cache: listing 1.28M files takes a minute on a network disk, so the first scan is written to
  `default_cache_dir()/folder_scans/` and reused while every class folder's modification time is the same
  (adding or removing a file changes its folder's mtime): later opens stat ~1,000 folders and read one file.
- Colour: RGB (every image converted, CMYK and greyscale JPEGs included) unless the first image of every
  class is greyscale, then L. Alpha is dropped.
- Crop (`crop`): `center` resizes the shorter side to `image_size` (bicubic) and takes the centred square,
  as folder.py does; `adm` is the crop of ADM (Dhariwal & Nichol 2021) that DiT's and the MoE papers'
  ImageNet pipelines use: while the shorter side is at least twice `image_size`, halve the image with a box
  filter, then resize the shorter side to `image_size` (bicubic) and take the centred square. The two differ
  by a little aliasing on large photos; use `adm` to match the peers' latents.
- An unreadable file is a DatasetError naming it (fix or delete it), never a silent skip.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from moedit.data.base import DatasetError, default_cache_dir
from moedit.data.folder import CROPS, EXTENSIONS, GREY_MODES, SPLITS, UNSUPPORTED_MODES, _split_root, center_crop
from moedit.utils.files import atomic_write_text

SCAN_VERSION = 1


def _class_dirs(root: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def _files(class_dir: str, suffixes: tuple[str, ...] = EXTENSIONS) -> list[str]:
    return sorted(e.name for e in os.scandir(class_dir)
                  if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(suffixes))


def _cache_path(root: Path, suffixes: tuple[str, ...]) -> Path:
    key = hashlib.sha256(f"{root.resolve()}|{'|'.join(suffixes)}".encode()).hexdigest()[:20]
    return default_cache_dir() / "folder_scans" / f"{key}.json"


def scan(root: Path, use_cache: bool = True, suffixes: tuple[str, ...] = EXTENSIONS, what: str = "images") -> dict:
    """{"classes": [...], "files": [[name, ...] per class], "mtimes": [...], "mode": "RGB"|"L"} of the files
    ending in one of `suffixes` (images by default; the peers' latent files for data/peer_latents.py)."""
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder; set data.path to a folder "
                           "with one sub-folder per class")
    dirs = _class_dirs(root)
    if not dirs:
        raise DatasetError(f"image folder {root} has no class sub-folders; put each class's images in its own "
                           f"sub-folder, e.g. {root}/cat/001.png")
    mtimes = [e.stat().st_mtime_ns for e in dirs]
    cache = _cache_path(root, suffixes)
    if use_cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            cached = None
        if (isinstance(cached, dict) and cached.get("version") == SCAN_VERSION and cached.get("root") == str(root.resolve())
                and cached.get("classes") == [e.name for e in dirs] and cached.get("mtimes") == mtimes):
            return cached
    files = [_files(e.path, suffixes) for e in dirs]
    empty = [e.name for e, names in zip(dirs, files) if not names]
    if empty:
        raise DatasetError(f"class folder {root / empty[0]} holds no {what} ({', '.join(suffixes)}); add them "
                           "or remove the folder")
    grey = suffixes == EXTENSIONS and all(_mode(root / e.name / n[0]) in GREY_MODES for e, n in zip(dirs, files))
    result = {"version": SCAN_VERSION, "root": str(root.resolve()), "classes": [e.name for e in dirs],
              "mtimes": mtimes, "files": files, "mode": "L" if grey else "RGB"}
    if use_cache:
        try:
            atomic_write_text(cache, json.dumps(result))
        except OSError:  # a read-only cache folder costs the next open a rescan, nothing else
            pass
    return result


def _mode(path: Path) -> str:
    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}; fix or delete the file") from exc


class LazyImageFolder(torch.utils.data.Dataset):
    """`ds[i]` = (uint8 C×H×W tensor, label); `ds.batch(indices)` = (x in [-1, 1], y) like ImageDataset."""

    def __init__(self, path: str | Path, split: str = "train", image_size: int | None = None, crop: str = "center",
                 use_cache: bool = True):
        if path is None:
            raise DatasetError("the folder dataset needs data.path=<folder with one sub-folder per class>")
        if crop not in CROPS:
            raise DatasetError(f"data.crop={crop!r} is not valid; choose one of: {', '.join(CROPS)}")
        if split not in SPLITS:
            raise DatasetError(f"data.split={split!r} is not valid for folder; choose one of: {', '.join(SPLITS)}")
        root = Path(path).expanduser()
        self.root = _split_root(root, split) if root.is_dir() else root
        listing = scan(self.root, use_cache)
        self.class_names, self.mode = listing["classes"], listing["mode"]
        self.num_classes = len(self.class_names)
        self._dirs = [str(self.root / c) for c in self.class_names]
        counts = [len(names) for names in listing["files"]]
        self._names = [n for names in listing["files"] for n in names]
        self.labels_N = torch.repeat_interleave(torch.arange(self.num_classes), torch.tensor(counts))
        self.image_size, self.crop = image_size, crop
        if image_size is None:
            with Image.open(self.path(0)) as first:
                if first.size[0] != first.size[1]:
                    raise DatasetError(f"image {self.path(0)} is {first.size[0]}x{first.size[1]}, not square; "
                                       "set data.image_size=N to resize and centre-crop every image")
                self.image_size = first.size[0]
        self.channels = 1 if self.mode == "L" else 3
        self.name = f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self._names)

    def path(self, i: int) -> Path:
        return Path(self._dirs[int(self.labels_N[i])]) / self._names[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.path(i)
        try:
            with Image.open(path) as im:
                if im.mode in UNSUPPORTED_MODES:
                    raise DatasetError(f"image {path} has mode {im.mode} (16-bit or float); convert it to 8-bit")
                im = center_crop(im.convert(self.mode), self.image_size, self.crop)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:  # truncated or damaged data, not only a bad header
            raise DatasetError(f"cannot read image {path}: {exc}; fix or delete the file") from exc
        if arr.shape[:2] != (self.image_size, self.image_size):
            raise DatasetError(f"image {path} is {arr.shape[1]}x{arr.shape[0]} but every image must be "
                               f"{self.image_size}x{self.image_size}; set data.image_size to resize them")
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C")), int(self.labels_N[i])  # a writable copy

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        """What a DataLoader worker reads (train/batches.py)."""
        return self[i]

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        x_BCHW = torch.stack([x for x, _ in items]).to(torch.float32) / 127.5 - 1.0
        return x_BCHW, torch.tensor([y for _, y in items], dtype=torch.long)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate([self.item(int(i)) for i in indices])
