"""A user's videos: one sub-folder per class, one entry per clip, labels by sorted class-folder name.

    path/
      walk/clip_a/frame_1.png frame_2.png ... frame_10.png   (a folder of frame images)
      walk/clip_b.npy                                        (a T×H×W×C uint8 array)
      run/clip_c.npz                                         (one array, or the key `frames`)

or, with splits, path/train/<class>/... and path/test/<class>/... (as data/folder.py: `split` picks the
sub-folder; a folder without split sub-folders is the "train" split and has no other).

- A frame folder's images (PNG, JPEG, or the other formats data/folder.py reads) are ordered by file
  name in natural order (frame_2 before frame_10). A clip is grey (C = 1) when all its frames are
  (PIL modes 1, L, LA), else RGB; alpha is dropped; only 8-bit images are accepted.
- An .npy / .npz clip holds a uint8 array T×H×W×C with C in {1, 3}, or T×H×W (grey, C = 1); an .npz
  holds that one array, or names it `frames`. Read with allow_pickle=False (a pickle is code).
- Every clip must have the same number of frames, the same channels and (without `image_size`) the
  same square frame size; the first clip that differs is named with its shape, the expected shape and
  the fix. With `image_size` every frame is resized (shorter side) and centre-cropped (base.resize_square).
- Hidden entries are ignored, and so are files that are neither images, .npy nor .npz.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from moedit.data.base import DatasetError, check_split, resize_square
from moedit.data.folder import EXTENSIONS, GREY_MODES, UNSUPPORTED_MODES
from moedit.data.video import VideoDataset, make_video_dataset
from moedit.utils.npz import NPZ_READ_ERRORS

SPLITS = ("train", "test")
ARRAY_EXTENSIONS = (".npy", ".npz")
CHANNELS = (1, 3)


def natural_key(name: str) -> tuple:
    """Sort key putting digit runs in numeric order: frame_2 < frame_10 (ties broken by the plain name)."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if i % 2 else (1, 0, p) for i, p in enumerate(parts)) + ((1, 0, name),)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_clip(p: Path) -> bool:
    if p.is_dir():
        return True
    return p.is_file() and p.suffix.lower() in ARRAY_EXTENSIONS


def _split_root(root: Path, split: str) -> Path:
    """root/split when root is laid out by split (its sub-folders are only split names), else root."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and _visible(p)}
    if "train" in subdirs and subdirs <= set(SPLITS):
        if split not in subdirs:
            raise DatasetError(f"video folder {root} has no {split!r} sub-folder; create {root}/{split}/<class>/<clip>")
        return root / split
    if split == "train":
        return root
    raise DatasetError(
        f"video folder {root} has no {split!r} split: its sub-folders are classes; "
        f"lay it out as {root}/train/<class>/<clip> and {root}/{split}/<class>/<clip>, or use data.split=train"
    )


def scan_video_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(clip path, label)]) with clear errors for a missing or malformed tree."""
    if not root.exists():
        raise DatasetError(
            f"video folder {root} does not exist; set data.path to a folder with one sub-folder per class"
        )
    if not root.is_dir():
        raise DatasetError(f"data.path={root} is a file; video_folder needs a directory of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DatasetError(
            f"video folder {root} has no class sub-folders; put each class's clips in its own sub-folder, "
            f"e.g. {root}/walk/clip_1/frame_1.png or {root}/walk/clip_1.npy"
        )
    clips: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        entries = [p for p in (root / name).iterdir() if _visible(p)]
        found = sorted((p for p in entries if _is_clip(p)), key=lambda p: natural_key(p.name))
        if not found:
            loose = any(p.is_file() and p.suffix.lower() in EXTENSIONS for p in entries)
            hint = (" (it holds loose images: put each clip's frames in a folder of their own, "
                    f"e.g. {root / name}/clip_1/frame_1.png)" if loose else "")
            raise DatasetError(
                f"class folder {root / name} holds no clips{hint}; each clip is a folder of frame images or a "
                f".npy/.npz array T×H×W×C: add clips or remove the folder"
            )
        clips.extend((p, label) for p in found)
    return classes, clips


def _read_frame(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            if im.mode in UNSUPPORTED_MODES:
                raise DatasetError(
                    f"frame {path} has mode {im.mode} (16-bit or float); convert it to an 8-bit PNG or JPEG"
                )
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read frame {path}: {exc}; fix or delete the file") from exc


def _load_frame_folder(clip: Path) -> np.ndarray:
    """T×H×W×C uint8 from a folder of frame images (natural order)."""
    files = sorted(
        (p for p in clip.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in EXTENSIONS),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise DatasetError(
            f"clip folder {clip} holds no frame images ({', '.join(EXTENSIONS)}); add frames or remove it"
        )
    images = [_read_frame(p) for p in files]
    mode = "L" if all(im.mode in GREY_MODES for im in images) else "RGB"
    first = images[0].size
    frames = []
    for p, im in zip(files, images, strict=True):
        if im.size != first:
            raise DatasetError(
                f"frame {p} is {im.size[0]}x{im.size[1]} but {files[0]} is {first[0]}x{first[1]}; "
                f"the frames of a clip must share one size: resize them"
            )
        arr = np.asarray(im.convert(mode), dtype=np.uint8)
        frames.append(arr[:, :, None] if arr.ndim == 2 else arr)
    return np.stack(frames)


def _load_array(clip: Path) -> np.ndarray:
    """T×H×W×C uint8 from an .npy or .npz clip."""
    try:
        if clip.suffix.lower() == ".npy":
            arr = np.load(clip, allow_pickle=False)
        else:
            with np.load(clip, allow_pickle=False) as z:
                keys = list(z.files)
                if "frames" in keys:
                    arr = z["frames"]
                elif len(keys) == 1:
                    arr = z[keys[0]]
                else:
                    raise DatasetError(
                        f"clip {clip} holds arrays {sorted(keys)}; an .npz clip must hold one array, or name it "
                        f"'frames': re-save it with numpy.savez(path, frames=clip_THWC)"
                    )
    except DatasetError:
        raise
    except NPZ_READ_ERRORS as exc:  # damaged, not numpy, or object arrays (pickle)
        raise DatasetError(
            f"cannot read clip {clip} as a plain numpy array: {exc}; re-save it with numpy.save / numpy.savez"
        ) from exc
    if arr.dtype != np.uint8:
        raise DatasetError(
            f"clip {clip} has dtype {arr.dtype}; clips must be uint8 (0..255): convert it, "
            f"e.g. np.rint(x * 255).astype(np.uint8) for floats in [0, 1]"
        )
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[3] not in CHANNELS:
        raise DatasetError(
            f"clip {clip} has shape {arr.shape}; expected T×H×W×C with C in {CHANNELS} (or T×H×W for grey): "
            f"re-save it frames first, channels last"
        )
    if arr.shape[0] < 1:
        raise DatasetError(f"clip {clip} has no frames (shape {arr.shape}); remove it or add frames")
    return arr


def load_clip(clip: Path) -> np.ndarray:
    """One clip as T×H×W×C uint8: a folder of frames, or an .npy / .npz array."""
    return _load_frame_folder(clip) if clip.is_dir() else _load_array(clip)


def _check_like(clip: Path, shape: tuple[int, ...], first: Path, want: tuple[int, ...], resized: bool) -> None:
    """`clip` (shape T×H×W×C, after any resize) against the first clip's `want`: name the clip and the fix."""
    t, h, w, c = shape
    if t != want[0]:
        fix = f"trim or pad every clip to {want[0]} frames"
    elif c != want[3]:
        fix = "give every clip the same channels (all grey, or all RGB)"
    elif (h, w) != want[1:3] and not resized:
        fix = f"resize its frames to {want[1]}x{want[2]}, or set data.image_size=N to resize every clip"
    else:
        return
    raise DatasetError(
        f"clip {clip} has shape T×H×W×C = {shape} but {first} has {want}; all clips must share length, "
        f"size and channels: {fix}"
    )


def load_video_folder(
    path: str | Path, split: str = "train", image_size: int | None = None, frames: int | None = None
) -> VideoDataset:
    """Load every clip under `path` (see module docstring) into memory as uint8 N×C×T×H×W.

    `frames`, when given, is the clip length every clip must have (e.g. what the model was built for).
    """
    if path is None:
        raise DatasetError("the video_folder dataset needs data.path=<folder with one sub-folder per class>")
    check_split(split, SPLITS, "video_folder")
    root = Path(path).expanduser()
    if root.is_dir():
        root = _split_root(root, split)
    classes, clips = scan_video_folder(root)
    loaded: list[np.ndarray] = []
    first: Path | None = None
    want: tuple[int, ...] = ()
    for clip, _ in clips:
        arr = load_clip(clip)
        if image_size is not None and arr.shape[1:3] != (image_size, image_size):
            x_TCHW = resize_square(torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))), image_size)
            arr = x_TCHW.numpy().transpose(0, 2, 3, 1)
        if first is None:
            first, want = clip, arr.shape
            t, h, w, _ = want
            if frames is not None and t != frames:
                raise DatasetError(
                    f"clip {clip} has {t} frames but data.frames={frames}; trim or pad every clip to {frames} "
                    f"frames, or set data.frames={t}"
                )
            if h != w:
                raise DatasetError(
                    f"clip {clip} has {h}x{w} frames, not square; crop them to a square, or set data.image_size=N "
                    f"to resize and centre-crop every frame"
                )
        else:
            _check_like(clip, arr.shape, first, want, resized=image_size is not None)
        loaded.append(arr)
    clips_NCTHW = np.stack(loaded).transpose(0, 4, 1, 2, 3)
    labels_N = np.array([label for _, label in clips], dtype=np.int64)
    return make_video_dataset(clips_NCTHW, labels_N, classes, name=f"video_folder:{root}")
